//! The tape: a record of the forward pass, specialised to the ops of the Llama graph.
//!
//! Forward ops store their outputs in the tape (addressed by [`Id`]) and, when recording, push an
//! [`Op`] naming their inputs, outputs and saved tensors. [`Tape::backward`] walks the ops in reverse,
//! propagating input gradients through frozen weights and accumulating gradients only into LoRA
//! parameters. A checkpointed decoder layer is one [`Op::Segment`]: forward keeps only the layer's
//! input and output; backward replays the layer on a fresh recording sub-tape and walks that.

use crate::backend::{AttnShape, Backend, Dropout};
use crate::model::llama::Graph;
use crate::model::lora::{LoraGrads, Proj};

/// Index of a value held by a [`Tape`].
pub type Id = usize;

/// Which frozen norm weight an [`Op::RmsNorm`] used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormRef {
    Attn(usize),
    Mlp(usize),
    Final,
}

/// One recorded op with the ids of what its backward needs.
#[derive(Debug, Clone)]
pub enum Op {
    RmsNorm {
        x: Id,
        norm: NormRef,
        rstd: Id,
        out: Id,
    },
    /// A frozen projection plus, when the module is targeted, its LoRA branch (`u` = drop(x)·Aᵀ).
    Linear {
        x: Id,
        layer: usize,
        proj: Proj,
        out: Id,
        lora: Option<(Id, Dropout)>,
    },
    Rope {
        x: Id,
        out: Id,
        heads: usize,
    },
    Attention {
        q: Id,
        k: Id,
        v: Id,
        out: Id,
        lse: Id,
        shape: AttnShape,
    },
    SwiGlu {
        gate: Id,
        up: Id,
        out: Id,
    },
    Add {
        a: Id,
        b: Id,
        out: Id,
    },
    /// A checkpointed decoder layer: replayed in backward.
    Segment {
        layer: usize,
        input: Id,
        out: Id,
    },
    /// Final norm output → lm_head → cross-entropy, with `dx` (its gradient) computed in forward.
    LmHeadLoss {
        x: Id,
        dx: Id,
    },
}

/// Values and (when `recording`) the ops that made them.
pub struct Tape<B: Backend> {
    pub recording: bool,
    vals: Vec<Option<B::Buf>>,
    ops: Vec<Op>,
}

impl<B: Backend> Tape<B> {
    pub fn new(recording: bool) -> Self {
        Tape { recording, vals: Vec::new(), ops: Vec::new() }
    }
    /// Stores a value and returns its id.
    pub fn put(&mut self, v: B::Buf) -> Id {
        self.vals.push(Some(v));
        self.vals.len() - 1
    }
    pub fn get(&self, id: Id) -> &B::Buf {
        self.vals[id].as_ref().expect("tape value was already released")
    }
    /// Removes a value from the tape (the caller takes ownership).
    pub fn take(&mut self, id: Id) -> B::Buf {
        self.vals[id].take().expect("tape value was already released")
    }
    pub fn record(&mut self, op: Op) {
        if self.recording {
            self.ops.push(op);
        }
    }
    pub fn num_ops(&self) -> usize {
        self.ops.len()
    }

    /// Walks the tape backwards from `seed` (the gradient of value `root`; `None` when the loss op
    /// on the tape already carries it), accumulating LoRA gradients into `grads`. Returns the
    /// gradients of the values listed in `want` (zeros if nothing flowed there).
    pub fn backward(
        &mut self,
        g: &Graph<'_, B>,
        grads: &mut LoraGrads<B>,
        seed: Option<(Id, B::Buf)>,
        want: &[Id],
    ) -> Vec<B::Buf> {
        let be = g.be;
        let mut dv: Vec<Option<B::Buf>> = (0..self.vals.len()).map(|_| None).collect();
        if let Some((root, grad)) = seed {
            dv[root] = Some(grad);
        }
        // Adds `d` into the gradient slot of `id`.
        fn acc<B: Backend>(be: &B, dv: &mut [Option<B::Buf>], id: Id, d: B::Buf) {
            match &mut dv[id] {
                Some(cur) => be.add_assign(cur, &d),
                slot @ None => *slot = Some(d),
            }
        }
        let ops = std::mem::take(&mut self.ops);
        for op in ops.iter().rev() {
            match *op {
                Op::LmHeadLoss { x, dx } => {
                    let d = self.get(dx).clone();
                    acc(be, &mut dv, x, d);
                }
                Op::Add { a, b, out } => {
                    if let Some(d) = dv[out].take() {
                        acc(be, &mut dv, a, d.clone());
                        acc(be, &mut dv, b, d);
                    }
                }
                Op::RmsNorm { x, norm, rstd, out } => {
                    if let Some(d) = dv[out].take() {
                        let xv = self.get(x);
                        let mut dx = be.alloc_output(be.buf_len(xv));
                        let w = g.norm_weight(norm);
                        be.rmsnorm_backward(xv, w, self.get(rstd), &d, be.buf_len(w), &mut dx);
                        acc(be, &mut dv, x, dx);
                    }
                }
                Op::Linear { x, layer, proj, out, lora } => {
                    if let Some(d) = dv[out].take() {
                        let xv = self.get(x);
                        let w = g.model.proj(layer, proj);
                        let m = be.buf_len(xv) / be.weight_shape(w).1;
                        let mut dx = be.alloc_output(be.buf_len(xv));
                        be.linear_backward_input(&d, w, m, &mut dx, false);
                        if let Some((u, dropout)) = lora {
                            let pair = g.lora_pair(layer, proj).expect("LoRA op without adapter");
                            let gp = grads.layers[layer][proj as usize].as_mut().expect("LoRA grads missing");
                            be.lora_backward(
                                xv,
                                &pair.a,
                                &pair.b,
                                self.get(u),
                                &d,
                                m,
                                g.lora_rank(),
                                g.lora_scale(),
                                dropout,
                                &mut gp.a,
                                &mut gp.b,
                                &mut dx,
                            );
                        }
                        acc(be, &mut dv, x, dx);
                    }
                }
                Op::Rope { x, out, heads } => {
                    if let Some(d) = dv[out].take() {
                        let mut dx = be.alloc_output(be.buf_len(&d));
                        be.rope(&d, &g.cos, &g.sin, heads, g.model.cfg.head_dim, true, &mut dx);
                        acc(be, &mut dv, x, dx);
                    }
                }
                Op::Attention { q, k, v, out, lse, shape } => {
                    if let Some(d) = dv[out].take() {
                        let (qv, kv, vv) = (self.get(q), self.get(k), self.get(v));
                        let mut dq = be.alloc_output(be.buf_len(qv));
                        let mut dk = be.alloc_output(be.buf_len(kv));
                        let mut dvv = be.alloc_output(be.buf_len(vv));
                        be.attention_backward(
                            qv,
                            kv,
                            vv,
                            self.get(out),
                            self.get(lse),
                            &d,
                            shape,
                            g.segments,
                            &mut dq,
                            &mut dk,
                            &mut dvv,
                        );
                        acc(be, &mut dv, q, dq);
                        acc(be, &mut dv, k, dk);
                        acc(be, &mut dv, v, dvv);
                    }
                }
                Op::SwiGlu { gate, up, out } => {
                    if let Some(d) = dv[out].take() {
                        let (gv, uv) = (self.get(gate), self.get(up));
                        let mut dg = be.alloc_output(be.buf_len(gv));
                        let mut du = be.alloc_output(be.buf_len(uv));
                        be.swiglu_backward(gv, uv, &d, &mut dg, &mut du);
                        acc(be, &mut dv, gate, dg);
                        acc(be, &mut dv, up, du);
                    }
                }
                Op::Segment { layer, input, out } => {
                    if let Some(d) = dv[out].take() {
                        // Replay the layer from its saved input, recording this time, then walk it.
                        let mut sub = Tape::<B>::new(true);
                        let x = sub.put(self.get(input).clone());
                        let y = g.layer_forward(&mut sub, layer, x);
                        let dx = sub.backward(g, grads, Some((y, d)), &[x]).pop().expect("one gradient");
                        acc(be, &mut dv, input, dx);
                    }
                }
            }
        }
        want.iter().map(|&id| dv[id].take().unwrap_or_else(|| be.zeros(be.buf_len(self.get(id))))).collect()
    }
}
