//! The tape: a record of the forward pass, specialised to the ops of the Llama graph.
//!
//! Forward ops store their outputs in the tape (addressed by [`Id`]) and, when recording, push an
//! [`Op`] naming their inputs, outputs and saved tensors. [`Tape::backward`] walks the ops in reverse,
//! propagating input gradients through frozen weights and accumulating gradients only into LoRA
//! parameters. A checkpointed decoder layer is one [`Op::Segment`]: forward keeps only the layer's
//! input and output; backward replays the layer on a fresh recording sub-tape and walks that.
//!
//! Memory follows PyTorch's autograd: a value stays on the tape only while the forward pass still
//! reads it ([`Tape::done_with`]) or a recorded op's backward will ([`Op::saved_values`]), and the
//! backward walk drops each saved value after the last op that reads it.

use crate::backend::{AttnShape, Backend, Dropout, LinearGradPart, LoraGrad, RopeTables};
use crate::model::llama::Graph;
use crate::model::lora::{LoraGrads, LoraPair, Proj};

/// Index of a value held by a [`Tape`].
pub type Id = usize;
/// Index of an MLP's saved gate and up products ([`Backend::MlpActs`]) held by a [`Tape`].
pub type MlpId = usize;
/// Index of an attention call's saved q, k and v ([`Backend::AttnActs`]) held by a [`Tape`].
pub type AttnId = usize;

/// Which frozen norm weight an [`Op::RmsNorm`] used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormRef {
    Attn(usize),
    Mlp(usize),
    Final,
}

/// A `Linear` op's LoRA branch as recorded: its saved `u` and its dropout.
type LoraSaved = Option<(Id, Dropout)>;

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
        lora: LoraSaved,
    },
    /// RoPE of `q` and `k` and causal attention ([`Backend::rope_attention_acts`]): `q`, `k` and `v`
    /// are the projections' ids, which backward gives gradients to (un-rotated for q and k); their
    /// values are held apart, in the backend's own form ([`Tape::put_attn_acts`]).
    Attention {
        q: Id,
        k: Id,
        v: Id,
        acts: AttnId,
        out: Id,
        lse: Id,
        shape: AttnShape,
    },
    /// SwiGLU of an MLP's gate and up products held apart ([`Tape::put_mlp_acts`], in the backend's
    /// own form: [`Backend::mlp_gate_up_lora`]); `gate` and `up` hold no value and take the products'
    /// gradients, which their `Linear` ops (with LoRA branches) then carry back.
    SwiGluActs {
        gate: Id,
        up: Id,
        acts: MlpId,
        out: Id,
    },
    /// An MLP without LoRA branches from its input `x` to the down product `out`; its gate and up
    /// products are held apart ([`Tape::put_mlp_acts`], in the backend's own form) and its input
    /// gradient is one backend call ([`Backend::mlp_backward`]).
    Mlp {
        x: Id,
        layer: usize,
        acts: MlpId,
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

impl Op {
    /// The values this op's backward reads besides its output's gradient: what the tape keeps for it.
    pub fn saved_values(&self) -> Vec<Id> {
        match *self {
            Op::RmsNorm { x, rstd, .. } => vec![x, rstd],
            // The frozen product's input gradient needs only dy; the LoRA branch also reads x and u.
            Op::Linear { x, lora: Some((u, _)), .. } => vec![x, u],
            Op::Linear { lora: None, .. } | Op::Add { .. } | Op::Mlp { .. } | Op::SwiGluActs { .. } => vec![],
            Op::Attention { out, lse, .. } => vec![out, lse],
            Op::Segment { input, .. } => vec![input],
            Op::LmHeadLoss { dx, .. } => vec![dx],
        }
    }
}

/// What a checkpointed layer's first pass keeps for the layer's replay in backward, instead of the
/// replay computing it again: the same values, so the same gradients bit for bit, held on the device
/// from the first pass to the layer's backward.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayKeeps {
    /// The LoRA branches' `u = drop(x) · Aᵀ`. Why: a `u` is `m × r` values (0.5 MB for a 7B
    /// projection at 2,048 rows) while computing it again reads all of `x`; the A products were
    /// half of them recomputations (session 23's profile: 15.2 ms per all-linear 7B step).
    pub lora_us: bool,
    /// The MLP's gate and up products (`2 · m · intermediate_size` values in the backend's form:
    /// 90 MB in bf16 for Llama-2-7B at 2,048 rows), whose two GEMMs are the larger part of a
    /// layer's recompute (370 of its 645 GFLOP at 7B): memory traded for time, per layer as asked.
    pub mlp_acts: bool,
    /// Attention's saved inputs, output and lse ([`KeptAttention`]: ~84 MB for a Llama-2-7B layer at
    /// 2,048 rows), so that the replay runs neither the q/k/v products (206 GFLOP at 7B, with their
    /// B products and RoPE) nor the attention forward.
    pub attention: bool,
}

/// Moves the entries of `from` whose keys `wanted` picks into `to`.
fn move_entries<K: Copy + Eq + std::hash::Hash, V>(
    from: &mut std::collections::HashMap<K, V>,
    to: &mut std::collections::HashMap<K, V>,
    wanted: impl Fn(&K) -> bool,
) {
    let keys: Vec<K> = from.keys().copied().filter(|k| wanted(k)).collect();
    for key in keys {
        let value = from.remove(&key).expect("listed above");
        to.insert(key, value);
    }
}

/// A layer's attention as its first pass computed it, kept for the replay ([`ReplayKeeps::attention`]).
pub struct KeptAttention<B: Backend> {
    /// q, k and v as [`Backend::qkv_attn_acts`] saved them.
    pub acts: B::AttnActs,
    /// Attention's output (the o projection's input) and its log-sum-exp rows.
    pub out: B::Buf,
    pub lse: B::Buf,
}

/// What a first pass keeps of a layer's attention: its saved inputs, its lse, and (once the o
/// product has read it) its output.
type AttentionParts<B> = (<B as Backend>::AttnActs, <B as Backend>::Buf, Option<<B as Backend>::Buf>);

/// Values and (when `recording`) the ops that made them.
pub struct Tape<B: Backend> {
    pub recording: bool,
    vals: Vec<Option<B::Buf>>,
    /// `saved[id]`: a recorded op's backward reads value `id`, so forward may not drop it.
    saved: Vec<bool>,
    /// Values moved off the device until backward needs them (offloaded checkpoints).
    parked: std::collections::HashMap<Id, B::Offloaded>,
    ops: Vec<Op>,
    /// The saved products of recorded [`Op::Mlp`]s and [`Op::SwiGluActs`], each dropped once its
    /// backward has run.
    mlp_acts: Vec<Option<B::MlpActs>>,
    /// The saved inputs of recorded [`Op::Attention`]s, each dropped once its backward has run.
    attn_acts: Vec<Option<B::AttnActs>>,
    /// Released values, kept instead of dropped when the tape is [`Tape::keeping_released`].
    released: Option<Vec<B::Buf>>,
    /// LoRA branches' `u = drop(x) · Aᵀ` by (layer, projection), kept from a checkpointed layer's
    /// first pass for its replay, which then runs no A product ([`Tape::keep_lora_u`]).
    lora_us: std::collections::HashMap<(usize, Proj), B::Buf>,
    /// MLPs' gate and up products by layer, kept from a checkpointed layer's first pass for its
    /// replay, which then runs neither product ([`Tape::keep_mlp_acts`]).
    kept_mlp_acts: std::collections::HashMap<usize, B::MlpActs>,
    /// Attention's saved inputs and lse by layer, and (once the o product has read it) its output:
    /// kept from a checkpointed layer's first pass for its replay ([`Tape::keep_attention`]).
    kept_attention: std::collections::HashMap<usize, AttentionParts<B>>,
    /// What a checkpointed layer's first pass keeps for its replay ([`Tape::keeping`]).
    keeps: ReplayKeeps,
}

/// Buffers kept for reuse, by length. Decoding's recorded step draws every buffer from one and hands
/// them all back after each layer, so that a CUDA graph of the step allocates and frees nothing: the
/// graph's allocation and free nodes would otherwise stand between its kernels (551 of each per 7B
/// token), and a graph holding such nodes cannot have its kernel-to-kernel edges made programmatic
/// (src/backend/cuda/graph.rs).
pub struct BufPool<B: Backend> {
    free: std::cell::RefCell<std::collections::HashMap<usize, Vec<B::Buf>>>,
    misses: std::cell::Cell<usize>,
}

impl<B: Backend> Default for BufPool<B> {
    fn default() -> Self {
        BufPool { free: Default::default(), misses: Default::default() }
    }
}

impl<B: Backend> BufPool<B> {
    /// A kept buffer of `n` elements (its contents are whatever it last held), or a new one.
    pub fn take(&self, be: &B, n: usize) -> B::Buf {
        if let Some(b) = self.free.borrow_mut().get_mut(&n).and_then(Vec::pop) {
            return b;
        }
        self.misses.set(self.misses.get() + 1);
        be.alloc_output(n)
    }
    /// Keeps `bufs` for later [`BufPool::take`]s.
    pub fn give(&self, be: &B, bufs: impl IntoIterator<Item = B::Buf>) {
        let mut free = self.free.borrow_mut();
        for b in bufs {
            free.entry(be.buf_len(&b)).or_default().push(b);
        }
    }
    /// How many takes found no kept buffer and allocated one.
    pub fn misses(&self) -> usize {
        self.misses.get()
    }
}

impl<B: Backend> Tape<B> {
    pub fn new(recording: bool) -> Self {
        Tape {
            recording,
            vals: Vec::new(),
            saved: Vec::new(),
            parked: Default::default(),
            ops: Vec::new(),
            mlp_acts: Vec::new(),
            attn_acts: Vec::new(),
            released: None,
            lora_us: Default::default(),
            kept_mlp_acts: Default::default(),
            kept_attention: Default::default(),
            keeps: ReplayKeeps::default(),
        }
    }
    /// The tape of a checkpointed layer's first pass (not recording), keeping what `keeps` names for
    /// the layer's replay ([`Tape::keep_lora_u`], [`Tape::keep_mlp_acts`]).
    pub fn keeping(keeps: ReplayKeeps) -> Self {
        Tape { keeps, ..Self::new(false) }
    }
    /// Hands the `u` of `(layer, proj)`'s LoRA branch to the tape: kept for the layer's replay on a
    /// tape [`Tape::keeping`] them (returns `None`), given back otherwise.
    pub fn keep_lora_u(&mut self, layer: usize, proj: Proj, u: B::Buf) -> Option<B::Buf> {
        if !self.keeps.lora_us {
            return Some(u);
        }
        self.lora_us.insert((layer, proj), u);
        None
    }
    /// The kept `u` of `(layer, proj)`'s LoRA branch, if any (removed from the tape).
    pub fn take_lora_u(&mut self, layer: usize, proj: Proj) -> Option<B::Buf> {
        self.lora_us.remove(&(layer, proj))
    }
    /// Hands `layer`'s MLP gate and up products to the tape: kept for the layer's replay on a tape
    /// [`Tape::keeping`] them (returns `None`), given back otherwise.
    pub fn keep_mlp_acts(&mut self, layer: usize, acts: B::MlpActs) -> Option<B::MlpActs> {
        if !self.keeps.mlp_acts {
            return Some(acts);
        }
        self.kept_mlp_acts.insert(layer, acts);
        None
    }
    /// `layer`'s kept MLP products, if any (removed from the tape).
    pub fn take_kept_mlp_acts(&mut self, layer: usize) -> Option<B::MlpActs> {
        self.kept_mlp_acts.remove(&layer)
    }
    /// Hands `layer`'s attention inputs and lse to the tape: kept for the layer's replay on a tape
    /// [`Tape::keeping`] them (returns `None`; the output follows, [`Tape::keep_attention_out`]),
    /// given back otherwise.
    pub fn keep_attention(&mut self, layer: usize, acts: B::AttnActs, lse: B::Buf) -> Option<(B::AttnActs, B::Buf)> {
        if !self.keeps.attention {
            return Some((acts, lse));
        }
        self.kept_attention.insert(layer, (acts, lse, None));
        None
    }
    /// Whether `layer`'s attention output is awaited by what [`Tape::keep_attention`] kept.
    pub fn awaits_attention_out(&self, layer: usize) -> bool {
        self.kept_attention.get(&layer).is_some_and(|(_, _, out)| out.is_none())
    }
    /// Adds `layer`'s attention output to what [`Tape::keep_attention`] kept.
    pub fn keep_attention_out(&mut self, layer: usize, out: B::Buf) {
        let kept = self.kept_attention.get_mut(&layer).expect("keep_attention came first");
        kept.2 = Some(out);
    }
    /// `layer`'s kept attention, if the first pass kept all of it (removed from the tape).
    pub fn take_kept_attention(&mut self, layer: usize) -> Option<KeptAttention<B>> {
        match self.kept_attention.remove(&layer)? {
            (acts, lse, Some(out)) => Some(KeptAttention { acts, out, lse }),
            _ => None,
        }
    }
    /// Whether the tape holds anything a first pass kept for a replay.
    fn holds_kept(&self) -> bool {
        !(self.lora_us.is_empty() && self.kept_mlp_acts.is_empty() && self.kept_attention.is_empty())
    }
    /// Moves what `other` kept for `layer`'s replay (for every layer: `None`) onto this tape: a
    /// layer's first pass hands it to the tape that records the step, which hands it to the replay.
    pub fn adopt_kept(&mut self, other: &mut Tape<B>, layer: Option<usize>) {
        let wanted = |l: usize| layer.is_none_or(|want| l == want);
        move_entries(&mut other.lora_us, &mut self.lora_us, |&(l, _)| wanted(l));
        move_entries(&mut other.kept_mlp_acts, &mut self.kept_mlp_acts, |&l| wanted(l));
        move_entries(&mut other.kept_attention, &mut self.kept_attention, |&l| wanted(l));
    }
    /// A tape whose released values are kept for [`Tape::into_buffers`] instead of freed.
    pub fn keeping_released(recording: bool) -> Self {
        Tape { released: Some(Vec::new()), ..Self::new(recording) }
    }
    /// A temporary no value of the tape refers to, no longer read: kept like a released value when
    /// the tape keeps them, dropped otherwise.
    pub fn discard(&mut self, v: B::Buf) {
        if let Some(kept) = &mut self.released {
            kept.push(v);
        }
    }
    /// Every buffer the tape holds: its live values and what it kept of the released ones.
    pub fn into_buffers(mut self) -> Vec<B::Buf> {
        let mut out = self.released.take().unwrap_or_default();
        out.extend(self.vals.drain(..).flatten());
        out
    }
    /// Stores a value and returns its id.
    pub fn put(&mut self, v: B::Buf) -> Id {
        self.vals.push(Some(v));
        self.saved.push(false);
        self.vals.len() - 1
    }
    /// Keeps an MLP's gate and up products for the [`Op::Mlp`] or [`Op::SwiGluActs`] that will read
    /// them in backward.
    pub fn put_mlp_acts(&mut self, acts: B::MlpActs) -> MlpId {
        self.mlp_acts.push(Some(acts));
        self.mlp_acts.len() - 1
    }
    /// Keeps an attention call's inputs for the [`Op::Attention`] that will read them in backward.
    pub fn put_attn_acts(&mut self, acts: B::AttnActs) -> AttnId {
        self.attn_acts.push(Some(acts));
        self.attn_acts.len() - 1
    }
    /// An id for a value that is recorded but never computed: backward's replay of a checkpointed
    /// layer gives one to an output no backward reads (see [`Graph::layer_replay`]). Reading it
    /// panics like reading a released value.
    pub fn put_uncomputed(&mut self) -> Id {
        self.vals.push(None);
        self.saved.push(false);
        self.vals.len() - 1
    }
    /// The forward pass has made its last read of `id`: the value is dropped now unless a recorded
    /// op's backward needs it (then the backward walk drops it after its last use).
    pub fn done_with(&mut self, id: Id) {
        if !self.saved[id] {
            if let Some(v) = self.vals[id].take() {
                self.discard(v);
            }
        }
    }
    /// Moves value `id` off the device until backward takes it back (an offloaded checkpoint).
    pub fn offload(&mut self, be: &B, id: Id) {
        let v = self.take(id);
        self.parked.insert(id, be.offload(v));
    }
    /// Starts bringing value `id` back to the device if it is offloaded.
    fn start_reload(&mut self, be: &B, id: Id) {
        if let Some(p) = self.parked.remove(&id) {
            self.parked.insert(id, be.reload(p));
        }
    }
    /// Removes value `id`, back on the device if it was offloaded.
    fn take_on_device(&mut self, be: &B, id: Id) -> B::Buf {
        match self.parked.remove(&id) {
            Some(p) => be.restore(p),
            None => self.take(id),
        }
    }
    /// Elements held by the tape's live values on the device, the MLPs' saved products, the
    /// attention calls' saved inputs and what first passes kept for replays included (what the
    /// memory tests count).
    pub fn live_elements(&self, be: &B) -> usize {
        self.vals.iter().flatten().map(|v| be.buf_len(v)).sum::<usize>()
            + self.mlp_acts.iter().flatten().map(|a| be.mlp_acts_len(a)).sum::<usize>()
            + self.attn_acts.iter().flatten().map(|a| be.attn_acts_len(a)).sum::<usize>()
            + self.lora_us.values().map(|u| be.buf_len(u)).sum::<usize>()
            + self.kept_mlp_acts.values().map(|a| be.mlp_acts_len(a)).sum::<usize>()
            + (self.kept_attention.values())
                .map(|(acts, lse, out)| {
                    be.attn_acts_len(acts) + be.buf_len(lse) + out.as_ref().map_or(0, |o| be.buf_len(o))
                })
                .sum::<usize>()
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
            for id in op.saved_values() {
                assert!(
                    self.vals[id].is_some() || self.parked.contains_key(&id),
                    "an op saves value {id} for backward, which was never computed or already released"
                );
                self.saved[id] = true;
            }
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
        // The gradient buffer of `id` for an op to write (`false`: a new one) or add into (`true`: the
        // gradient already there), instead of writing a new one and adding it in a second pass.
        fn grad_slot<B: Backend>(be: &B, dv: &mut [Option<B::Buf>], id: Id, n: usize) -> (B::Buf, bool) {
            match dv[id].take() {
                Some(cur) => (cur, true),
                None => (be.alloc_output(n), false),
            }
        }
        // Adds `d` into the gradient slot of `id`.
        fn acc<B: Backend>(be: &B, dv: &mut [Option<B::Buf>], id: Id, d: B::Buf) {
            match &mut dv[id] {
                Some(cur) => be.add_assign(cur, &d),
                slot @ None => *slot = Some(d),
            }
        }
        let ops = std::mem::take(&mut self.ops);
        // The backward walk reads a saved value last at the first op (in forward order) saving it;
        // values in `want` stay for the answer's shapes.
        let mut last_reader = vec![usize::MAX; self.vals.len()];
        for (i, op) in ops.iter().enumerate().rev() {
            for id in op.saved_values() {
                last_reader[id] = i;
            }
        }
        for &id in want {
            last_reader[id] = usize::MAX;
        }
        for (i, op) in ops.iter().enumerate().rev() {
            match *op {
                Op::LmHeadLoss { x, dx } => {
                    let d = self.take(dx);
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
                        let w = g.norm_weight(norm);
                        // Added straight into a gradient x already has (the residual stream's).
                        let (mut dx, accumulate) = grad_slot(be, &mut dv, x, be.buf_len(xv));
                        be.rmsnorm_backward(xv, w, self.get(rstd), &d, be.buf_len(w), &mut dx, accumulate);
                        dv[x] = Some(dx);
                    }
                }
                Op::Linear { x, layer, out, .. } if dv[out].is_some() => {
                    // This op and those recorded just before it that read the same x (q/k/v and
                    // gate/up, recorded side by side): their input gradients in one call, in this
                    // walk's order (the later ops find their gradients taken and pass).
                    let group: Vec<(Proj, B::Buf, LoraSaved)> = (0..=i)
                        .rev()
                        .map_while(|j| match ops[j] {
                            Op::Linear { x: xj, layer: lj, proj, out, lora } if xj == x && lj == layer => {
                                dv[out].take().map(|d| (proj, d, lora))
                            }
                            _ => None,
                        })
                        .collect();
                    let (rows, cols) = be.weight_shape(g.model.proj(layer, group[0].0));
                    let m = be.buf_len(&group[0].1) / rows;
                    // Added straight into a gradient x already has (its residual stream's, or none).
                    let (mut dx, accumulate) = grad_slot(be, &mut dv, x, m * cols);
                    // Each branch's weight gradients: disjoint entries of the layer's gradients.
                    let mut layer_grads: Vec<Option<&mut LoraPair<B>>> =
                        grads.layers[layer].iter_mut().map(Option::as_mut).collect();
                    let parts = group
                        .iter()
                        .map(|(proj, d, lora)| LinearGradPart {
                            dy: d,
                            w: g.model.proj(layer, *proj),
                            lora: lora.map(|(u, dropout)| {
                                let pair = g.lora_pair(layer, *proj).expect("LoRA op without adapter");
                                let gp = layer_grads[*proj as usize].take().expect("LoRA grads missing");
                                LoraGrad {
                                    x: self.get(x),
                                    a: &pair.a,
                                    b: &pair.b,
                                    u: self.get(u),
                                    dropout,
                                    da: &mut gp.a,
                                    db: &mut gp.b,
                                }
                            }),
                        })
                        .collect();
                    be.linears_backward_input(parts, m, &mut dx, accumulate, g.lora_rank(), g.lora_scale());
                    dv[x] = Some(dx);
                }
                Op::Linear { .. } => {}
                Op::Attention { q, k, v, acts, out, lse, shape } => {
                    let saved = self.attn_acts[acts].take().expect("an attention call's inputs are read once");
                    if let Some(d) = dv[out].take() {
                        let (nq, nkv) = (shape.batch * shape.q_len * shape.heads, shape.batch * shape.kv_capacity);
                        let mut dq = be.alloc_output(nq * shape.head_dim);
                        let mut dk = be.alloc_output(nkv * shape.kv_heads * shape.head_dim);
                        let mut dvv = be.alloc_output(nkv * shape.kv_heads * shape.head_dim);
                        be.rope_attention_acts_backward(
                            &saved,
                            RopeTables { cos: &g.cos, sin: &g.sin },
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
                Op::SwiGluActs { gate, up, acts, out } => {
                    // Its only reader: the products go with this op's backward.
                    let acts = self.mlp_acts[acts].take().expect("an MLP's products are read once");
                    if let Some(d) = dv[out].take() {
                        let n = be.buf_len(&d);
                        let (mut dg, mut du) = (be.alloc_output(n), be.alloc_output(n));
                        be.mlp_swiglu_backward(&acts, &d, &mut dg, &mut du);
                        acc(be, &mut dv, gate, dg);
                        acc(be, &mut dv, up, du);
                    }
                }
                Op::Mlp { x, layer, acts, out } => {
                    // Its only reader: the products go with this op's backward.
                    let acts = self.mlp_acts[acts].take().expect("an MLP's products are read once");
                    if let Some(d) = dv[out].take() {
                        let [wg, wu, wd] = [Proj::Gate, Proj::Up, Proj::Down].map(|p| g.model.proj(layer, p));
                        // down is (hidden, ffn): d and dx are (m, hidden).
                        let hidden = be.weight_shape(wd).0;
                        let m = be.buf_len(&d) / hidden;
                        // Added straight into a gradient x already has, as a Linear op's would be.
                        let (mut dx, accumulate) = grad_slot(be, &mut dv, x, m * hidden);
                        be.mlp_backward(&d, &acts, wg, wu, wd, m, &mut dx, accumulate);
                        dv[x] = Some(dx);
                    }
                }
                Op::Segment { layer, input, out } => {
                    if let Some(d) = dv[out].take() {
                        // Replay the layer from its saved input, recording this time, then walk it.
                        let mut sub = Tape::<B>::new(true);
                        let saved_input = self.take_on_device(be, input);
                        if last_reader[input] != i {
                            self.vals[input] = Some(saved_input.clone());
                        }
                        // The next segment's checkpoint comes back while this one replays.
                        if let Some(Op::Segment { input: next, .. }) =
                            ops[..i].iter().rev().find(|op| matches!(op, Op::Segment { .. }))
                        {
                            self.start_reload(be, *next);
                        }
                        sub.adopt_kept(self, Some(layer));
                        let x = sub.put(saved_input);
                        // Only what the layer's backward reads is computed: its output is `out`'s value,
                        // already known (the next checkpoint), so the replay never makes it.
                        // The replay's expanded weights wait for the layer's input gradients.
                        be.keep_weight_expansions(true);
                        let y = g.layer_replay(&mut sub, layer, x);
                        // Whatever the first pass kept, the replay must have taken instead of
                        // computing it again (else it held that memory for nothing).
                        assert!(!sub.holds_kept(), "layer {layer}'s replay left values its first pass kept");
                        let dx = sub.backward(g, grads, Some((y, d)), &[x]).pop().expect("one gradient");
                        be.keep_weight_expansions(false);
                        acc(be, &mut dv, input, dx);
                    }
                }
            }
            for id in op.saved_values() {
                if last_reader[id] == i {
                    self.vals[id] = None;
                }
            }
        }
        want.iter().map(|&id| dv[id].take().unwrap_or_else(|| be.zeros(be.buf_len(self.get(id))))).collect()
    }
}
