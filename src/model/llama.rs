//! The Llama graph: embedding → L × (RMSNorm → attention with RoPE and GQA → residual → RMSNorm →
//! SwiGLU MLP → residual) → RMSNorm → lm_head → cross-entropy, written once over any [`Backend`]
//! and used for training (recording a [`Tape`]), evaluation and cached decoding.

use crate::backend::{AttnShape, Backend, Dropout, HostWeight, LoraDown, RopeTables, IGNORE_INDEX};
use crate::config::{ModelConfig, QuantConfig};
use crate::error::{Error, Result};
use crate::model::lora::{Lora, LoraGrads, LoraPair, Proj};
use crate::model::rope;
use crate::model::weights::{HostTensor, WeightSource};
use crate::quant::Quant4;
use crate::tape::{BufPool, Id, NormRef, Op, ReplayKeeps, Tape};

/// One decoder layer's frozen weights.
pub struct Layer<B: Backend> {
    /// `(hidden)`
    pub attn_norm: B::Buf,
    /// `(hidden)`
    pub mlp_norm: B::Buf,
    /// The seven projections, indexed by [`Proj`].
    pub proj: [B::Weight; 7],
}

/// A Llama-family model with frozen weights on backend `B`.
pub struct Llama<B: Backend> {
    pub cfg: ModelConfig,
    /// `(vocab, hidden)`
    pub embed: B::Weight,
    pub layers: Vec<Layer<B>>,
    /// `(hidden)`
    pub norm: B::Buf,
    /// `(vocab, hidden)`; `None` when tied to `embed`.
    pub lm_head: Option<B::Weight>,
}

/// Checks a tensor's shape against what the config implies.
fn expect_shape(name: &str, t: &HostTensor, want: &[usize]) -> Result<()> {
    if t.shape != want {
        return Err(Error::tensor(
            name,
            format!("shape {:?} disagrees with the config, which implies {want:?}", t.shape),
        ));
    }
    Ok(())
}

impl<B: Backend> Llama<B> {
    /// Loads every tensor from `src`, checking shapes, and stores the seven projections of each layer
    /// 4-bit when `quant` is given (embedding, norms and lm_head stay dense, as bitsandbytes leaves them).
    pub fn load(be: &B, src: &dyn WeightSource, quant: Option<QuantConfig>) -> Result<Self> {
        Self::load_with_progress(be, src, quant, &mut |_, _| {})
    }

    /// As [`Llama::load`], calling `progress(done, total)` after each tensor.
    pub fn load_with_progress(
        be: &B,
        src: &dyn WeightSource,
        quant: Option<QuantConfig>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let cfg = src.config().clone();
        let (v, h) = (cfg.vocab_size, cfg.hidden_size);
        // The sizes come from config.json: nothing is sized by them before the tensors that must match
        // them have been read (a corrupt layer count fails at its first missing layer).
        let total = cfg.num_hidden_layers.saturating_mul(9).saturating_add(2 + usize::from(!cfg.tie_word_embeddings));
        let mut done = 0;
        let mut step = |done: &mut usize| {
            *done += 1;
            progress(*done, total);
        };
        let dense = |name: &str, want: &[usize]| -> Result<HostTensor> {
            let t = src.tensor(name)?;
            expect_shape(name, &t, want)?;
            if let Some(i) = t.data.iter().position(|x| !x.is_finite()) {
                return Err(Error::tensor(name, format!("holds a non-finite value at flat index {i}")));
            }
            Ok(t)
        };
        let weight = |t: HostTensor, q: Option<QuantConfig>| -> HostWeight {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            match q {
                Some(q) => {
                    HostWeight::Quant4 { rows, cols, q: Quant4::quantize(&t.data, &q), compute: q.compute_dtype }
                }
                None => HostWeight::Dense { rows, cols, data: t.data },
            }
        };
        let embed = be.upload_weight(weight(dense("model.embed_tokens.weight", &[v, h])?, None));
        step(&mut done);
        let mut layers = Vec::new();
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let attn_norm = be.upload(&dense(&format!("{p}.input_layernorm.weight"), &[h])?.data);
            let mlp_norm = be.upload(&dense(&format!("{p}.post_attention_layernorm.weight"), &[h])?.data);
            step(&mut done);
            step(&mut done);
            let mut projs = Vec::with_capacity(7);
            for pr in Proj::ALL {
                let (o, i) = pr.shape(&cfg);
                let name = format!("{p}.{}.weight", pr.hf_path());
                projs.push(be.upload_weight(weight(dense(&name, &[o, i])?, quant)));
                step(&mut done);
            }
            let proj: [B::Weight; 7] = projs.try_into().unwrap_or_else(|_| unreachable!("seven projections"));
            layers.push(Layer { attn_norm, mlp_norm, proj });
        }
        let norm = be.upload(&dense("model.norm.weight", &[h])?.data);
        step(&mut done);
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            let w = be.upload_weight(weight(dense("lm_head.weight", &[v, h])?, None));
            step(&mut done);
            Some(w)
        };
        Ok(Llama { cfg, embed, layers, norm, lm_head })
    }

    pub fn proj(&self, layer: usize, p: Proj) -> &B::Weight {
        &self.layers[layer].proj[p as usize]
    }
    pub fn lm_head(&self) -> &B::Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

/// One token batch: `batch` rows of `seq` tokens, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<u32>,
    /// Unshifted labels as transformers takes them (`labels[t]` is the token at `t`; -100 = ignore).
    pub labels: Vec<i32>,
    /// Position of each token (resets at each document when packing).
    pub positions: Vec<u32>,
    /// Document id of each token (0 = padding); `None` = one document per row, no padding.
    pub segments: Option<Vec<u32>>,
}

impl Batch {
    /// A batch of equal-length rows with labels = inputs and positions 0..seq.
    pub fn causal_lm(rows: &[Vec<u32>]) -> Self {
        let seq = rows.first().map_or(0, |r| r.len());
        assert!(rows.iter().all(|r| r.len() == seq), "rows must have equal length");
        let input_ids: Vec<u32> = rows.concat();
        let labels = input_ids.iter().map(|&t| t as i32).collect();
        let positions = (0..rows.len()).flat_map(|_| 0..seq as u32).collect();
        Batch { batch: rows.len(), seq, input_ids, labels, positions, segments: None }
    }

    /// Per-position targets: `labels` shifted left by one within each row (last position ignored),
    /// as transformers' causal-LM loss does.
    pub fn targets(&self) -> Vec<i32> {
        let mut t = vec![IGNORE_INDEX; self.labels.len()];
        for b in 0..self.batch {
            for s in 0..self.seq.saturating_sub(1) {
                t[b * self.seq + s] = self.labels[b * self.seq + s + 1];
            }
        }
        t
    }

    /// Number of tokens the loss counts.
    pub fn num_targets(&self) -> usize {
        self.targets().iter().filter(|&&t| t != IGNORE_INDEX).count()
    }
}

/// One layer's key/value cache for decoding: `(capacity, kv_heads, head_dim)` each, batch 1.
pub struct KvLayer<B: Backend> {
    pub k: B::Buf,
    pub v: B::Buf,
}

/// The KV cache of every layer plus how many positions it holds.
pub struct KvCache<B: Backend> {
    pub layers: Vec<KvLayer<B>>,
    pub len: usize,
    pub capacity: usize,
    /// The one-token step's state and recording, made by the first one-token step.
    token_step: Option<TokenStep<B>>,
}

impl<B: Backend> KvCache<B> {
    pub fn new(be: &B, cfg: &ModelConfig, capacity: usize) -> Self {
        let n = capacity * cfg.kv_dim();
        KvCache {
            layers: (0..cfg.num_hidden_layers).map(|_| KvLayer { k: be.zeros(n), v: be.zeros(n) }).collect(),
            len: 0,
            capacity,
            token_step: None,
        }
    }
}

/// A decoding step's inputs and output, in buffers that outlive a recording of the step.
struct StepIo<B: Backend> {
    /// The embedded tokens `(n, hidden)`.
    h: B::Buf,
    /// RoPE tables of their positions, `(n, head_dim/2)` each.
    cos: B::Buf,
    sin: B::Buf,
    /// `[positions already in the cache]`: where the step writes keys and values and what it attends to.
    pos: B::Buf,
    /// Logits of the last token `(vocab)`.
    logits: B::Buf,
}

impl<B: Backend> StepIo<B> {
    fn new(be: &B, c: &ModelConfig, n: usize) -> Self {
        StepIo {
            h: be.alloc_output(n * c.hidden_size),
            cos: be.alloc_output(n * c.head_dim / 2),
            sin: be.alloc_output(n * c.head_dim / 2),
            pos: be.alloc_output(1),
            logits: be.alloc_output(c.vocab_size),
        }
    }

    /// Fills the inputs for `tokens` at positions `past..`.
    fn load(&mut self, be: &B, model: &Llama<B>, tokens: &[u32], past: usize) {
        let positions: Vec<u32> = (past as u32..(past + tokens.len()) as u32).collect();
        let (cos, sin) = rope::tables(&model.cfg, &positions);
        be.embedding(&model.embed, tokens, &mut self.h);
        be.upload_into(&cos, &mut self.cos);
        be.upload_into(&sin, &mut self.sin);
        be.upload_into(&[past as f32], &mut self.pos);
    }
}

/// What a one-token step takes as its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepToken {
    /// A token the host has (the prompt's last, a sampled one): uploaded before the step.
    Host(u32),
    /// The token the one-token step before chose greedily, still on the device: the step can be
    /// queued before the host has read it.
    Chosen,
}

/// The one-token step. Its inputs are read on the device, from the token the step before chose
/// (or the host uploaded) and the position the step before moved on, so a greedy step needs nothing
/// from the host; recorded once where the backend can (a CUDA graph: one launch per token instead
/// of hundreds) and replayed for every later token.
struct TokenStep<B: Backend> {
    io: StepIo<B>,
    /// `(1)`: the step's token, as an f32; each step leaves its greedy choice here
    /// ([`Backend::argmax_into`]) for the next.
    token: B::Buf,
    /// RoPE tables of every cache position, `(capacity, head_dim/2)` each: row `p` is what
    /// [`rope::tables`] gives a step at position `p` (dynamic scaling included).
    cos_table: B::Buf,
    sin_table: B::Buf,
    /// The position `io.pos` holds: where the last one-token step left it (a prompt step in between
    /// moves the cache on without it).
    pos_held: usize,
    /// Whether `token` holds a step's choice (only `StepToken::Host` may start a chain).
    chosen: bool,
    recording: Option<B::Recording>,
    /// Whether recording was tried (a backend that cannot record is asked once).
    record_tried: bool,
    /// Every buffer the step uses besides those above and the cache's: the recording takes the same
    /// ones as the first step, so it allocates and frees nothing.
    buffers: BufPool<B>,
}

impl<B: Backend> TokenStep<B> {
    fn new(be: &B, cfg: &ModelConfig, capacity: usize) -> Self {
        let half = cfg.head_dim / 2;
        let (mut cos, mut sin) = (Vec::with_capacity(capacity * half), Vec::with_capacity(capacity * half));
        for p in 0..capacity as u32 {
            let (c, s) = rope::tables(cfg, &[p]);
            cos.extend(c);
            sin.extend(s);
        }
        TokenStep {
            io: StepIo::new(be, cfg, 1),
            token: be.zeros(1),
            cos_table: be.upload(&cos),
            sin_table: be.upload(&sin),
            pos_held: usize::MAX,
            chosen: false,
            recording: None,
            record_tried: false,
            buffers: BufPool::default(),
        }
    }
}

/// Everything one forward pass shares: the model, adapters, RoPE tables, mask and dropout seed.
pub struct Graph<'a, B: Backend> {
    pub be: &'a B,
    pub model: &'a Llama<B>,
    pub lora: Option<&'a Lora<B>>,
    /// `(m, head_dim/2)` each.
    pub cos: B::Buf,
    pub sin: B::Buf,
    pub segments: Option<&'a [u32]>,
    /// Attention geometry of a training pass (`None` while decoding with a cache).
    pub shape: AttnShape,
    /// Seed of this step's dropout masks; `None` disables dropout (evaluation, generation).
    pub dropout_seed: Option<u64>,
    pub checkpointing: Checkpointing,
    /// NEFTune's α (`neftune_noise_alpha`): a training pass (one with a `dropout_seed`) adds noise
    /// uniform on ±α/√(seq·hidden) to the embeddings, as transformers' NEFTune hook does; `None`: none.
    pub neftune_noise_alpha: Option<f32>,
    /// Where the layer's ops take their output buffers: a pool (decoding's recorded step) or, `None`,
    /// fresh allocations.
    pub pool: Option<&'a BufPool<B>>,
    /// A checkpointed layer's first pass keeps its LoRA branches' `u` for the replay, which then runs
    /// no A product ([`ReplayKeeps::lora_us`]); `LLAMATUNE_KEEP_LORA_U=0` recomputes them instead.
    pub keep_lora_us: bool,
    /// With checkpointing, this many of the checkpointed layers nearest the output keep their MLP's
    /// gate and up products from the first pass for the replay ([`ReplayKeeps::mlp_acts`]; the
    /// `gradient_checkpointing_keep_mlp` setting); 0: every replay recomputes them.
    pub keep_mlp_layers: usize,
    /// As `keep_mlp_layers`, for attention's inputs, output and lse ([`ReplayKeeps::attention`]; the
    /// `gradient_checkpointing_keep_attention` setting): those layers' replays run neither the q/k/v
    /// products nor the attention forward.
    pub keep_attention_layers: usize,
}

/// Salt of the NEFTune noise's seed (the LoRA dropout seeds set bits from 8 up, with a zero low byte).
const NEFTUNE_SALT: u64 = 0x4E45_4654;

/// Gradient checkpointing: whether decoder layers are recomputed in backward, and where their inputs
/// wait meanwhile. `true` / `false` convert to `OnDevice` / `Off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpointing {
    /// Every layer's activations stay for backward (no recompute; the most memory).
    Off,
    /// Only each layer's input stays, on the device; backward recomputes the layer from it.
    OnDevice,
    /// As `OnDevice`, but each layer's input waits in host memory: copied out while the next layers
    /// run and brought back one layer ahead of its backward (Unsloth's offloaded checkpointing; the
    /// same numbers, the device holding two inputs instead of one per layer).
    Offload,
}

impl Checkpointing {
    /// From the `gradient_checkpointing` and `gradient_checkpointing_offload` settings.
    pub fn from_flags(on: bool, offload: bool) -> Self {
        match (on, offload) {
            (false, _) => Checkpointing::Off,
            (true, false) => Checkpointing::OnDevice,
            (true, true) => Checkpointing::Offload,
        }
    }
}

impl From<bool> for Checkpointing {
    fn from(on: bool) -> Self {
        Checkpointing::from_flags(on, false)
    }
}

impl<'a, B: Backend> Graph<'a, B> {
    /// A graph for a training or evaluation pass over `batch`.
    pub fn new(
        be: &'a B,
        model: &'a Llama<B>,
        lora: Option<&'a Lora<B>>,
        batch: &'a Batch,
        dropout_seed: Option<u64>,
        checkpointing: impl Into<Checkpointing>,
    ) -> Self {
        let c = &model.cfg;
        let (cos, sin) = rope::tables(c, &batch.positions);
        Graph {
            be,
            model,
            lora,
            cos: be.upload(&cos),
            sin: be.upload(&sin),
            segments: batch.segments.as_deref(),
            shape: AttnShape::square(batch.batch, batch.seq, c.num_attention_heads, c.num_key_value_heads, c.head_dim),
            dropout_seed,
            checkpointing: checkpointing.into(),
            neftune_noise_alpha: None,
            pool: None,
            keep_lora_us: crate::backend::switch_on("LLAMATUNE_KEEP_LORA_U"),
            keep_mlp_layers: 0,
            keep_attention_layers: 0,
        }
    }

    /// An op's output buffer of `n` elements, from the pool when there is one.
    fn alloc(&self, n: usize) -> B::Buf {
        match self.pool {
            Some(pool) => pool.take(self.be, n),
            None => self.be.alloc_output(n),
        }
    }

    pub fn norm_weight(&self, n: NormRef) -> &B::Buf {
        match n {
            NormRef::Attn(l) => &self.model.layers[l].attn_norm,
            NormRef::Mlp(l) => &self.model.layers[l].mlp_norm,
            NormRef::Final => &self.model.norm,
        }
    }
    pub fn lora_pair(&self, layer: usize, p: Proj) -> Option<&LoraPair<B>> {
        self.lora.and_then(|l| l.layers[layer][p as usize].as_ref())
    }
    pub fn lora_rank(&self) -> usize {
        self.lora.map_or(0, |l| l.cfg.r)
    }
    pub fn lora_scale(&self) -> f32 {
        self.lora.map_or(0.0, |l| l.scaling())
    }

    /// Dropout of the LoRA branch of `(layer, proj)`: a seed derived from the step seed, so that a
    /// checkpointed replay draws the same mask.
    fn lora_dropout(&self, layer: usize, p: Proj) -> Dropout {
        match (self.dropout_seed, self.lora) {
            (Some(seed), Some(l)) if l.cfg.dropout > 0.0 => {
                Dropout { p: l.cfg.dropout as f32, seed: seed ^ ((layer as u64 + 1) << 32) ^ ((p as u64 + 1) << 8) }
            }
            _ => Dropout::NONE,
        }
    }

    fn rmsnorm(&self, t: &mut Tape<B>, x: Id, norm: NormRef) -> Id {
        let be = self.be;
        let w = self.norm_weight(norm);
        let dim = be.buf_len(w);
        let xv = t.get(x);
        let m = be.buf_len(xv) / dim;
        let mut out = self.alloc(be.buf_len(xv));
        let mut rstd = self.alloc(m);
        be.rmsnorm(xv, w, dim, self.model.cfg.rms_norm_eps, &mut out, &mut rstd);
        let (out, rstd) = (t.put(out), t.put(rstd));
        t.record(Op::RmsNorm { x, norm, rstd, out });
        out
    }

    /// `x2 = a + b` and `rmsnorm(x2)` in one backend call, recorded as the `Add` and `RmsNorm` they
    /// are (backward is theirs). Returns `(x2, norm output)`.
    fn add_rmsnorm(&self, t: &mut Tape<B>, a: Id, b: Id, norm: NormRef) -> (Id, Id) {
        let be = self.be;
        let w = self.norm_weight(norm);
        let dim = be.buf_len(w);
        let n = be.buf_len(t.get(a));
        let (mut sum, mut out, mut rstd) = (self.alloc(n), self.alloc(n), self.alloc(n / dim));
        be.add_rmsnorm(t.get(a), t.get(b), w, dim, self.model.cfg.rms_norm_eps, &mut sum, &mut out, &mut rstd);
        let (sum, out, rstd) = (t.put(sum), t.put(out), t.put(rstd));
        t.record(Op::Add { a, b, out: sum });
        t.record(Op::RmsNorm { x: sum, norm, rstd, out });
        (sum, out)
    }

    /// Projection `p` of `x` at `layer` added to the residual `res` and normalized ([`Graph::add_rmsnorm`])
    /// in one backend call ([`Backend::linear_lora_add_rmsnorm`]): the product's id holds no value (the
    /// sum is its only reader) and serves as the target of its gradient. Returns `(sum, norm output)`.
    fn linear_add_rmsnorm(&self, t: &mut Tape<B>, x: Id, res: Id, layer: usize, p: Proj, norm: NormRef) -> (Id, Id) {
        let be = self.be;
        let w = self.model.proj(layer, p);
        let m = be.buf_len(t.get(x)) / be.weight_shape(w).1;
        let (nw, eps) = (self.norm_weight(norm), self.model.cfg.rms_norm_eps);
        let n = be.buf_len(t.get(res));
        let (mut sum, mut out, mut rstd) = (self.alloc(n), self.alloc(n), self.alloc(m));
        let slots = self.lora_u_slots(t, layer, [p], m);
        let rs = (self.lora_rank(), self.lora_scale());
        let ((), us) = self.with_lora_downs(layer, [p], slots, |lora| {
            let (xv, resv) = (t.get(x), t.get(res));
            be.linear_lora_add_rmsnorm(xv, w, m, lora, rs, (resv, nw, eps), &mut sum, &mut out, &mut rstd);
        });
        let o = t.put_uncomputed();
        let [o] = self.record_linears(t, x, layer, [p], us, [o]);
        let (sum, out, rstd) = (t.put(sum), t.put(out), t.put(rstd));
        t.record(Op::Add { a: res, b: o, out: sum });
        t.record(Op::RmsNorm { x: sum, norm, rstd, out });
        (sum, out)
    }

    /// `y += x · Wᵀ` (with its LoRA branch) for projection `p` at `layer`, in a pass that records
    /// nothing ([`Backend::linear_lora_add_into`]: the product added as it lands, never kept apart).
    fn linear_add_into(&self, t: &mut Tape<B>, x: Id, layer: usize, p: Proj, y: &mut B::Buf) {
        let be = self.be;
        let w = self.model.proj(layer, p);
        let m = be.buf_len(t.get(x)) / be.weight_shape(w).1;
        let slots = self.lora_u_slots(t, layer, [p], m);
        let (r, scale) = (self.lora_rank(), self.lora_scale());
        let ((), us) =
            self.with_lora_downs(layer, [p], slots, |lora| be.linear_lora_add_into(t.get(x), w, m, lora, r, scale, y));
        self.release_lora_us(t, layer, [p], us);
    }

    /// [`Graph::add_rmsnorm`] before layer `l`'s MLP without LoRA branches, whose gate and up
    /// products ([`Backend::add_rmsnorm_mlp_gate_up`]) are its output's only reader: the output holds
    /// no value on the tape (its id is the target of the MLP's input gradient). Returns `(x2, norm
    /// output, the MLP's products)`.
    fn add_rmsnorm_mlp_gate_up(
        &self,
        t: &mut Tape<B>,
        a: Id,
        b: Id,
        l: usize,
        ws: [&B::Weight; 3],
    ) -> (Id, Id, B::MlpActs) {
        let be = self.be;
        self.add_rmsnorm_into_mlp(t, (a, b), l, |t, w, eps, m, sum, rstd| {
            be.add_rmsnorm_mlp_gate_up(t.get(a), t.get(b), w, eps, ws, m, sum, rstd)
        })
    }

    /// The o projection of attention's output `attn` (no LoRA branch) added to the residual `x` and
    /// normalized for an MLP without LoRA branches ([`Backend::linear_add_rmsnorm_mlp_gate_up`]):
    /// recorded as the linear, the add and the norm, the product and the norm's output holding no
    /// value (their backward reads neither); returns the sum, the norm's output and the MLP's products.
    fn linear_add_rmsnorm_mlp_gate_up(
        &self,
        t: &mut Tape<B>,
        attn: Id,
        x: Id,
        l: usize,
        ws: [&B::Weight; 3],
    ) -> (Id, Id, B::MlpActs) {
        let be = self.be;
        let wo = self.model.proj(l, Proj::O);
        let o = t.put_uncomputed();
        t.record(Op::Linear { x: attn, layer: l, proj: Proj::O, out: o, lora: None });
        self.add_rmsnorm_into_mlp(t, (x, o), l, |t, w, eps, m, sum, rstd| {
            be.linear_add_rmsnorm_mlp_gate_up(t.get(attn), wo, t.get(x), w, eps, ws, m, sum, rstd)
        })
    }

    /// The residual add `a + b` and layer `l`'s MLP norm, computed with the MLP's products by `run`
    /// (given the tape, the norm's weight, eps, the rows, and the sum and rstd to fill) and recorded
    /// as the add and the norm, the norm's output holding no value.
    fn add_rmsnorm_into_mlp(
        &self,
        t: &mut Tape<B>,
        (a, b): (Id, Id),
        l: usize,
        run: impl FnOnce(&Tape<B>, &B::Buf, f64, usize, &mut B::Buf, &mut B::Buf) -> B::MlpActs,
    ) -> (Id, Id, B::MlpActs) {
        let be = self.be;
        let norm = NormRef::Mlp(l);
        let w = self.norm_weight(norm);
        let n = be.buf_len(t.get(a));
        let m = n / be.buf_len(w);
        let (mut sum, mut rstd) = (self.alloc(n), self.alloc(m));
        let acts = run(t, w, self.model.cfg.rms_norm_eps, m, &mut sum, &mut rstd);
        let (sum, rstd, out) = (t.put(sum), t.put(rstd), t.put_uncomputed());
        t.record(Op::Add { a, b, out: sum });
        t.record(Op::RmsNorm { x: sum, norm, rstd, out });
        (sum, out, acts)
    }

    fn linear(&self, t: &mut Tape<B>, x: Id, layer: usize, p: Proj) -> Id {
        let [y] = self.linears(t, x, layer, [p]);
        y
    }

    /// Projections of the same input `x` (q/k/v, gate/up): the frozen products in one call (the backend
    /// shares its work on x), then each targeted module's LoRA branch; one `Linear` op each on the tape.
    fn linears<const N: usize>(&self, t: &mut Tape<B>, x: Id, layer: usize, projs: [Proj; N]) -> [Id; N] {
        let be = self.be;
        let ws: Vec<&B::Weight> = projs.iter().map(|&p| self.model.proj(layer, p)).collect();
        let m = be.buf_len(t.get(x)) / be.weight_shape(ws[0]).1;
        let mut ys: Vec<B::Buf> = ws.iter().map(|w| self.alloc(m * be.weight_shape(w).0)).collect();
        let slots = self.lora_u_slots(t, layer, projs, m);
        let ((), us) = self.with_lora_downs(layer, projs, slots, |loras| {
            let mut outs: Vec<&mut B::Buf> = ys.iter_mut().collect();
            be.linear_many_lora(t.get(x), &ws, m, &mut outs, loras, self.lora_rank(), self.lora_scale());
        });
        let outs: Vec<Id> = ys.into_iter().map(|y| t.put(y)).collect();
        self.record_linears(t, x, layer, projs, us, outs.try_into().expect("one output per projection"))
    }

    /// The `u (m, r)` of each targeted projection among `projs` at `layer`: the one the layer's first
    /// pass kept on `t` (a replay; `true`: it holds its value already), or a new buffer to write.
    fn lora_u_slots<const N: usize>(
        &self,
        t: &mut Tape<B>,
        layer: usize,
        projs: [Proj; N],
        m: usize,
    ) -> [Option<(B::Buf, bool)>; N] {
        projs.map(|p| {
            self.lora_pair(layer, p)?;
            Some(match t.take_lora_u(layer, p) {
                Some(u) => (u, true),
                None => (self.alloc(m * self.lora_rank()), false),
            })
        })
    }

    /// The LoRA branches of `projs` at `layer`, their `u` in `slots` ([`Graph::lora_u_slots`]): `run`
    /// gets one slot per projection (a targeted one's branch, whose `u` it writes unless ready);
    /// returned are `run`'s result and each branch's `u`.
    fn with_lora_downs<const N: usize, R>(
        &self,
        layer: usize,
        projs: [Proj; N],
        slots: [Option<(B::Buf, bool)>; N],
        run: impl FnOnce(&mut [Option<LoraDown<'_, B>>]) -> R,
    ) -> (R, [Option<B::Buf>; N]) {
        let ready = slots.each_ref().map(|s| s.as_ref().is_some_and(|&(_, ready)| ready));
        let mut us: [Option<B::Buf>; N] = slots.map(|s| s.map(|(u, _)| u));
        let mut loras: Vec<Option<LoraDown<'_, B>>> = projs
            .iter()
            .zip(us.iter_mut())
            .zip(ready)
            .map(|((&p, u), u_ready)| {
                let pair = self.lora_pair(layer, p)?;
                let dropout = self.lora_dropout(layer, p);
                Some(LoraDown { a: &pair.a, b: &pair.b, dropout, u: u.as_mut()?, u_ready })
            })
            .collect();
        let res = run(&mut loras);
        drop(loras);
        (res, us)
    }

    /// The `u` of each targeted projection among `projs` from its slot ([`Graph::lora_u_slots`]),
    /// computed (`Backend::lora_down`) where the slot is not ready: for a replay that runs no product.
    fn lora_us_ready<const N: usize>(
        &self,
        t: &Tape<B>,
        x: Id,
        layer: usize,
        projs: [Proj; N],
        slots: [Option<(B::Buf, bool)>; N],
    ) -> [Option<B::Buf>; N] {
        let be = self.be;
        let mut us = slots;
        for (&p, slot) in projs.iter().zip(us.iter_mut()) {
            let (Some((u, false)), Some(pair)) = (slot.as_mut(), self.lora_pair(layer, p)) else { continue };
            let xv = t.get(x);
            let m = be.buf_len(xv) / be.weight_shape(self.model.proj(layer, p)).1;
            be.lora_down(xv, &pair.a, m, self.lora_rank(), self.lora_dropout(layer, p), u);
        }
        us.map(|s| s.map(|(u, _)| u))
    }

    /// One `Linear` op per projection: its input `x`, output id, and LoRA branch's `u` (put on the tape;
    /// on a tape that records nothing, kept for the layer's replay or released: [`Graph::release_lora_us`]).
    fn record_linears<const N: usize>(
        &self,
        t: &mut Tape<B>,
        x: Id,
        layer: usize,
        projs: [Proj; N],
        us: [Option<B::Buf>; N],
        outs: [Id; N],
    ) -> [Id; N] {
        if !t.recording {
            self.release_lora_us(t, layer, projs, us);
            return outs;
        }
        for ((&p, u), &out) in projs.iter().zip(us).zip(&outs) {
            let lora = u.map(|u| (t.put(u), self.lora_dropout(layer, p)));
            t.record(Op::Linear { x, layer, proj: p, out, lora });
        }
        outs
    }

    /// The LoRA branches' `u` of a pass that records nothing: kept for the layer's replay on a
    /// checkpointed layer's first pass ([`Tape::keep_lora_u`]), released otherwise.
    fn release_lora_us<const N: usize>(
        &self,
        t: &mut Tape<B>,
        layer: usize,
        projs: [Proj; N],
        us: [Option<B::Buf>; N],
    ) {
        for (p, u) in projs.into_iter().zip(us) {
            if let Some(u) = u.and_then(|u| t.keep_lora_u(layer, p, u)) {
                t.discard(u);
            }
        }
    }

    /// Records projection `p` of `x` without computing its output (a replay, see
    /// [`Graph::layer_replay`]); only a LoRA branch's `u`, which its backward reads, is computed
    /// unless the layer's first pass kept it.
    fn linear_output_uncomputed(&self, t: &mut Tape<B>, x: Id, layer: usize, p: Proj) -> Id {
        // x is read only for a branch's u that was not kept: without a branch on down, x (SwiGLU's
        // output) is itself uncomputed in a replay.
        let be = self.be;
        let lora = self.lora_pair(layer, p).map(|pair| {
            let dropout = self.lora_dropout(layer, p);
            let u = t.take_lora_u(layer, p).unwrap_or_else(|| {
                let r = self.lora_rank();
                let xv = t.get(x);
                let m = be.buf_len(xv) / be.weight_shape(self.model.proj(layer, p)).1;
                let mut u = self.alloc(m * r);
                be.lora_down(xv, &pair.a, m, r, dropout, &mut u);
                u
            });
            (t.put(u), dropout)
        });
        let out = t.put_uncomputed();
        t.record(Op::Linear { x, layer, proj: p, out, lora });
        out
    }

    fn add(&self, t: &mut Tape<B>, a: Id, b: Id) -> Id {
        let be = self.be;
        let mut out = self.alloc(be.buf_len(t.get(a)));
        be.add(t.get(a), t.get(b), &mut out);
        let out = t.put(out);
        t.record(Op::Add { a, b, out });
        out
    }

    /// The q, k and v projections of `x` and RoPE and attention over this pass's own keys
    /// (training/eval; the cached variant is in `layer`). The projections go straight into the
    /// backend's saved form of attention's inputs ([`Backend::qkv_attn_acts`]); their ids hold no
    /// value and serve as the targets of their gradients in backward.
    fn qkv_attention(&self, t: &mut Tape<B>, x: Id, layer: usize, pass: Pass) -> Id {
        let be = self.be;
        let sh = self.shape;
        let projs = [Proj::Q, Proj::K, Proj::V];
        let ws = projs.map(|p| self.model.proj(layer, p));
        let m = be.buf_len(t.get(x)) / be.weight_shape(ws[0]).1;
        let rope = RopeTables { cos: &self.cos, sin: &self.sin };
        let slots = self.lora_u_slots(t, layer, projs, m);
        // A replay whose first pass kept its attention computes neither the products nor attention,
        // only any branch's u the first pass did not keep (its backward reads them).
        if let Some(kept) = if pass == Pass::Replay { t.take_kept_attention(layer) } else { None } {
            let us = self.lora_us_ready(t, x, layer, projs, slots);
            let (out, lse) = (t.put(kept.out), t.put(kept.lse));
            let qkv = [(); 3].map(|_| t.put_uncomputed());
            let [q, k, v] = self.record_linears(t, x, layer, projs, us, qkv);
            let acts = t.put_attn_acts(kept.acts);
            t.record(Op::Attention { q, k, v, acts, out, lse, shape: sh });
            return out;
        }
        let (acts, us) = self.with_lora_downs(layer, projs, slots, |loras| {
            be.qkv_attn_acts(t.get(x), &ws, m, loras, self.lora_rank(), self.lora_scale(), rope, sh)
        });
        let mut out = self.alloc(m * be.weight_shape(ws[0]).0);
        let mut lse = self.alloc(sh.batch * sh.heads * sh.q_len);
        be.rope_attention_acts(&acts, rope, sh, self.segments, &mut out, &mut lse);
        let (out, lse) = (t.put(out), t.put(lse));
        if t.recording {
            let qkv = [(); 3].map(|_| t.put_uncomputed());
            let [q, k, v] = self.record_linears(t, x, layer, projs, us, qkv);
            let acts = t.put_attn_acts(acts);
            t.record(Op::Attention { q, k, v, acts, out, lse, shape: sh });
        } else {
            self.release_lora_us(t, layer, projs, us);
            // Kept for the replay when the first pass keeps them (the output follows once the o
            // product has read it: `attention_out_done`), given back otherwise.
            let lse = t.take(lse);
            if let Some((_, lse)) = t.keep_attention(layer, acts, lse) {
                t.discard(lse);
            }
        }
        out
    }

    /// Attention's output `a` after its last read in layer `l` (the o product's): kept for the
    /// layer's replay where the first pass keeps its attention ([`Tape::keep_attention`]), handed
    /// back to the tape otherwise.
    fn attention_out_done(&self, t: &mut Tape<B>, l: usize, a: Id) {
        if t.awaits_attention_out(l) {
            let out = t.take(a);
            t.keep_attention_out(l, out);
        } else {
            t.done_with(a);
        }
    }

    /// SwiGLU of the gate and up projections of `x` (with their LoRA branches), computed unless a
    /// replay's down product has no branch to read it (recorded uncomputed then). The products stay
    /// in the backend's own form ([`Backend::mlp_gate_up_lora`]: CUDA keeps them in their 16-bit
    /// dtype, never widened), saved for one [`Op::SwiGluActs`], or on a first pass kept for the
    /// layer's replay ([`ReplayKeeps::mlp_acts`]), which then computes neither product; the gate and
    /// up ids hold no value and serve as the targets of their gradients, carried on by their `Linear`
    /// ops.
    fn gate_up_swiglu(&self, t: &mut Tape<B>, x: Id, layer: usize, pass: Pass) -> Id {
        let be = self.be;
        let need_out = pass != Pass::Replay || self.lora_pair(layer, Proj::Down).is_some();
        let projs = [Proj::Gate, Proj::Up];
        let ws = projs.map(|p| self.model.proj(layer, p));
        let m = be.buf_len(t.get(x)) / be.weight_shape(ws[0]).1;
        let slots = self.lora_u_slots(t, layer, projs, m);
        // A replay whose first pass kept the products computes neither, only any branch's u the
        // first pass did not keep (its backward reads them).
        let kept = if pass == Pass::Replay { t.take_kept_mlp_acts(layer) } else { None };
        let (acts, us) = match kept {
            Some(acts) => (acts, self.lora_us_ready(t, x, layer, projs, slots)),
            None => self.with_lora_downs(layer, projs, slots, |loras| {
                be.mlp_gate_up_lora(t.get(x), ws, m, loras, self.lora_rank(), self.lora_scale())
            }),
        };
        let out = if need_out {
            let mut s = self.alloc(m * be.weight_shape(ws[0]).0);
            be.mlp_swiglu(&acts, &mut s);
            t.put(s)
        } else {
            t.put_uncomputed()
        };
        if t.recording {
            let outs = [(); 2].map(|_| t.put_uncomputed());
            let [gate, up] = self.record_linears(t, x, layer, projs, us, outs);
            let acts = t.put_mlp_acts(acts);
            t.record(Op::SwiGluActs { gate, up, acts, out });
        } else {
            self.release_lora_us(t, layer, projs, us);
            // Kept for the replay when the first pass keeps them, dropped otherwise.
            drop(t.keep_mlp_acts(layer, acts));
        }
        out
    }

    /// One decoder layer on tape `t`, from hidden state `x` `(m, hidden)`. The layer is the last
    /// reader of `x`: the tape drops it unless a recorded op saved it for backward.
    pub fn layer_forward(&self, t: &mut Tape<B>, l: usize, x: Id) -> Id {
        match self.layer(t, l, Hidden::Value(x), None, Pass::Full) {
            Hidden::Value(y) => y,
            Hidden::Sum(..) => unreachable!("only decoding defers the residual sum"),
        }
    }

    /// Backward's replay of checkpointed layer `l` from its input `x`: records the layer as
    /// [`Graph::layer_forward`] does, but computes only what the recorded ops' backward reads. The
    /// layer's output is already known (it is the next checkpoint), and no backward reads the down
    /// product's output or the residual sum, so the down projection's frozen product and LoRA B
    /// product and the last residual add are recorded without being computed (their ids hold no
    /// value: [`Tape::put_uncomputed`]); so is SwiGLU's output when down has no LoRA branch to save
    /// it. Gradients are the same as from the full replay, bit for bit.
    pub fn layer_replay(&self, t: &mut Tape<B>, l: usize, x: Id) -> Id {
        match self.layer(t, l, Hidden::Value(x), None, Pass::Replay) {
            Hidden::Value(y) => y,
            Hidden::Sum(..) => unreachable!("only decoding defers the residual sum"),
        }
    }

    /// The decoder layer. With `cache` (decoding: `(layer's KV cache, [positions already in it])`,
    /// the count held on the device), the new keys and values are appended to the cache and
    /// attention reads the whole cache; that path is never recorded on the tape, and it leaves the
    /// layer's last residual sum to the next norm ([`Hidden::Sum`]).
    fn layer(
        &self,
        t: &mut Tape<B>,
        l: usize,
        x: Hidden,
        cache: Option<(&mut KvLayer<B>, &B::Buf)>,
        pass: Pass,
    ) -> Hidden {
        // Each value is handed back to the tape (`done_with`) after its last read in this pass: it is
        // freed then unless a recorded op's backward keeps it.
        let c = &self.model.cfg;
        let decoding = cache.is_some();
        let (x, n1) = match x {
            Hidden::Value(x) => (x, self.rmsnorm(t, x, NormRef::Attn(l))),
            Hidden::Sum(a, b) => {
                let (x, n1) = self.add_rmsnorm(t, a, b, NormRef::Attn(l));
                t.done_with(a);
                t.done_with(b);
                (x, n1)
            }
        };
        let a = match cache {
            None => {
                let a = self.qkv_attention(t, n1, l, pass);
                t.done_with(n1);
                a
            }
            Some((kv, pos)) => {
                // The q/k/v products with their LoRA branches, then rotated q, and the rotated keys
                // and the values appended to the cache, in one call.
                let be = self.be;
                let projs = [Proj::Q, Proj::K, Proj::V];
                let ws = projs.map(|p| self.model.proj(l, p));
                let m = be.buf_len(t.get(n1)) / c.hidden_size;
                let mut qkv = ws.map(|w| self.alloc(m * be.weight_shape(w).0));
                let mut q_rot = self.alloc(be.buf_len(&qkv[0]));
                let dims = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
                let slots = self.lora_u_slots(t, l, projs, m);
                let lora = (self.lora_rank(), self.lora_scale());
                let ((), us) = self.with_lora_downs(l, projs, slots, |loras| {
                    let rope = (&self.cos, &self.sin);
                    let [q, k, v] = qkv.each_mut();
                    let cache = (&mut kv.k, &mut kv.v);
                    be.qkv_into_cache(t.get(n1), ws, m, [q, k, v], loras, lora, rope, dims, &mut q_rot, cache, pos);
                });
                self.release_lora_us(t, l, projs, us);
                t.done_with(n1);
                for buf in qkv {
                    t.discard(buf);
                }
                let mut a = self.alloc(be.buf_len(&q_rot));
                let mut lse = self.alloc(self.shape.heads * self.shape.q_len);
                be.attention_at(&q_rot, &kv.k, &kv.v, self.shape, pos, &mut a, &mut lse);
                t.discard(q_rot);
                t.discard(lse);
                t.put(a)
            }
        };
        let mlp_has_lora = [Proj::Gate, Proj::Up, Proj::Down].into_iter().any(|p| self.lora_pair(l, p).is_some());
        if !decoding && !mlp_has_lora {
            // The norm with the gate and up products (kept in their 16-bit dtype where the backend
            // can, the norm's output then written only in that dtype), then SwiGLU and the down
            // product from them. A pass that records nothing (a checkpointed layer's first pass,
            // evaluation) adds the MLP's output straight into the residual; a recorded one saves the
            // products in one op whose backward is one call (Backend::mlp_backward), and a replay
            // leaves SwiGLU and the down product uncomputed.
            let be = self.be;
            let [wg, wu, wd] = [Proj::Gate, Proj::Up, Proj::Down].map(|p| self.model.proj(l, p));
            // The o product goes into the residual add with the norm unless a LoRA branch reads it.
            // A replay whose first pass kept the products computes only the sum and the norm: the
            // same calls' values bit for bit (tests/gpu.rs: the fused paths against the composed).
            let kept = if pass == Pass::Replay { t.take_kept_mlp_acts(l) } else { None };
            let o_plain = self.lora_pair(l, Proj::O).is_none();
            let (x2, n2, acts) = match kept {
                Some(acts) if o_plain => {
                    let (x2, n2) = self.linear_add_rmsnorm(t, a, x, l, Proj::O, NormRef::Mlp(l));
                    self.attention_out_done(t, l, a);
                    (x2, n2, acts)
                }
                Some(acts) => {
                    let o = self.linear(t, a, l, Proj::O);
                    self.attention_out_done(t, l, a);
                    let (x2, n2) = self.add_rmsnorm(t, x, o, NormRef::Mlp(l));
                    t.done_with(o);
                    (x2, n2, acts)
                }
                None if o_plain => {
                    let r = self.linear_add_rmsnorm_mlp_gate_up(t, a, x, l, [wg, wu, wd]);
                    self.attention_out_done(t, l, a);
                    r
                }
                None => {
                    let o = self.linear(t, a, l, Proj::O);
                    self.attention_out_done(t, l, a);
                    let r = self.add_rmsnorm_mlp_gate_up(t, x, o, l, [wg, wu, wd]);
                    t.done_with(o);
                    r
                }
            };
            t.done_with(x);
            let m = be.buf_len(t.get(x2)) / be.weight_shape(wg).1;
            if !t.recording {
                let mut y = t.take(x2);
                be.mlp_down(&acts, wd, m, &mut y, true);
                // Kept for the replay when the first pass keeps them, dropped otherwise.
                drop(t.keep_mlp_acts(l, acts));
                return Hidden::Value(t.put(y));
            }
            let d = match pass {
                Pass::Full => {
                    let mut d = self.alloc(be.buf_len(t.get(x2)));
                    be.mlp_down(&acts, wd, m, &mut d, false);
                    t.put(d)
                }
                Pass::Replay => t.put_uncomputed(),
            };
            let acts = t.put_mlp_acts(acts);
            t.record(Op::Mlp { x: n2, layer: l, acts, out: d });
            return self.residual_out(t, x2, d, pass);
        }
        let (x2, n2) = if decoding {
            let o = self.linear(t, a, l, Proj::O);
            let sum_norm = self.add_rmsnorm(t, x, o, NormRef::Mlp(l));
            t.done_with(o);
            sum_norm
        } else {
            // The o product's only reader is the residual sum: added into it as it lands.
            self.linear_add_rmsnorm(t, a, x, l, Proj::O, NormRef::Mlp(l))
        };
        self.attention_out_done(t, l, a);
        t.done_with(x);
        let s = if decoding && self.lora_pair(l, Proj::Gate).is_none() && self.lora_pair(l, Proj::Up).is_none() {
            // Nothing needs gate and up apart: the products and SwiGLU in one call.
            let be = self.be;
            let (wg, wu) = (self.model.proj(l, Proj::Gate), self.model.proj(l, Proj::Up));
            let m = be.buf_len(t.get(n2)) / be.weight_shape(wg).1;
            let mut out = self.alloc(m * be.weight_shape(wg).0);
            be.linear_swiglu(t.get(n2), wg, wu, m, &mut out);
            t.done_with(n2);
            t.put(out)
        } else if decoding {
            // Decoding's few rows (never recorded): the products into the step's own buffers, as a
            // recorded step takes every buffer from its pool; then SwiGLU.
            let [gate, up] = self.linears(t, n2, l, [Proj::Gate, Proj::Up]);
            t.done_with(n2);
            let be = self.be;
            let mut s = self.alloc(be.buf_len(t.get(gate)));
            be.swiglu(t.get(gate), t.get(up), &mut s);
            t.done_with(gate);
            t.done_with(up);
            t.put(s)
        } else {
            // Down's product reads SwiGLU's output; a replay computes only its LoRA branch's A product.
            let s = self.gate_up_swiglu(t, n2, l, pass);
            t.done_with(n2);
            s
        };
        if !decoding && !t.recording {
            // A pass that records nothing (a checkpointed layer's first pass, evaluation): the down
            // product goes straight into the residual, whose buffer nothing else reads now.
            let mut y = t.take(x2);
            self.linear_add_into(t, s, l, Proj::Down, &mut y);
            t.done_with(s);
            return Hidden::Value(t.put(y));
        }
        let d = if pass == Pass::Replay {
            self.linear_output_uncomputed(t, s, l, Proj::Down)
        } else {
            self.linear(t, s, l, Proj::Down)
        };
        t.done_with(s);
        if decoding {
            return Hidden::Sum(x2, d);
        }
        self.residual_out(t, x2, d, pass)
    }

    /// The layer's output `x2 + d` (the MLP's residual add); a replay records it uncomputed (the
    /// layer's output is the next checkpoint already).
    fn residual_out(&self, t: &mut Tape<B>, x2: Id, d: Id, pass: Pass) -> Hidden {
        let y = if pass == Pass::Replay {
            let y = t.put_uncomputed();
            t.record(Op::Add { a: x2, b: d, out: y });
            y
        } else {
            self.add(t, x2, d)
        };
        t.done_with(x2);
        t.done_with(d);
        Hidden::Value(y)
    }

    /// Embedding and every decoder layer; returns the last hidden state's id. With checkpointing
    /// each layer but the last runs on a throw-away tape and only its input is kept (on the device or
    /// offloaded). The last layer is recorded whole: its backward comes right after the loss, so
    /// replaying it would recompute what is still there to keep; while the loss is computed its
    /// values take no more memory than a replayed layer's backward takes later.
    pub fn body(&self, t: &mut Tape<B>, ids: &[u32]) -> Id {
        let be = self.be;
        let mut h = self.alloc(ids.len() * self.model.cfg.hidden_size);
        be.embedding(&self.model.embed, ids, &mut h);
        if let (Some(alpha), Some(seed)) = (self.neftune_noise_alpha, self.dropout_seed) {
            // transformers' hook: uniform(-m, m) with m = α / √(L·d) over the (batch, L, d) embeddings.
            let magnitude = alpha / ((self.shape.q_len * self.model.cfg.hidden_size) as f32).sqrt();
            be.add_uniform_noise(&mut h, magnitude, seed ^ NEFTUNE_SALT);
        }
        let mut x = t.put(h);
        let layers = self.model.layers.len();
        for l in 0..layers {
            if self.checkpointing != Checkpointing::Off && t.recording && l + 1 < layers {
                // The last `keep_mlp_layers` (`keep_attention_layers`) checkpointed layers keep their
                // MLP products (attention) for the replay; the last layer is recorded whole.
                let mlp_acts = l + 1 + self.keep_mlp_layers >= layers;
                let attention = l + 1 + self.keep_attention_layers >= layers;
                let mut sub = Tape::<B>::keeping(ReplayKeeps { lora_us: self.keep_lora_us, mlp_acts, attention });
                let sx = sub.put(t.get(x).clone());
                if self.checkpointing == Checkpointing::Offload {
                    t.offload(be, x);
                }
                let sy = self.layer_forward(&mut sub, l, sx);
                t.adopt_kept(&mut sub, None);
                let out = t.put(sub.take(sy));
                t.record(Op::Segment { layer: l, input: x, out });
                x = out;
            } else if t.recording {
                x = self.layer_forward(t, l, x);
            } else {
                // Not recording: keep only the running hidden state.
                let mut sub = Tape::<B>::new(false);
                let sx = sub.put(t.take(x));
                let sy = self.layer_forward(&mut sub, l, sx);
                x = t.put(sub.take(sy));
            }
        }
        x
    }

    /// Final norm, lm_head and cross-entropy against `targets`, in row chunks so the full logits are
    /// never held at once. The gradient `dLoss/dx` (loss scaled by `loss_scale`) is computed here and
    /// kept on the tape. Returns `(summed loss, counted tokens)`.
    pub fn lm_head_loss(&self, t: &mut Tape<B>, x: Id, targets: &[i32], loss_scale: f32) -> (f64, usize) {
        const CHUNK_ROWS: usize = 512;
        let be = self.be;
        let n = self.rmsnorm(t, x, NormRef::Final);
        let head = self.model.lm_head();
        let (_, hidden) = be.weight_shape(head);
        let m = targets.len();
        // dLoss/dx of the final norm's output, only when a backward pass will follow.
        let mut dn = t.recording.then(|| be.zeros(m * hidden));
        let (mut loss, mut count) = (0f64, 0usize);
        let mut r0 = 0;
        while r0 < m {
            let rows = CHUNK_ROWS.min(m - r0);
            let xc = be.read_range(t.get(n), r0 * hidden, rows * hidden);
            let mut dx = dn.is_some().then(|| self.alloc(rows * hidden));
            let (l, c) = be.lm_head_cross_entropy(&xc, head, &targets[r0..r0 + rows], loss_scale, dx.as_mut());
            loss += l;
            count += c;
            if let (Some(dn), Some(dx)) = (dn.as_mut(), dx) {
                be.write_range(&dx, dn, r0 * hidden);
            }
            r0 += rows;
        }
        t.done_with(n);
        if let Some(dn) = dn {
            let dx = t.put(dn);
            t.record(Op::LmHeadLoss { x: n, dx });
        }
        (loss, count)
    }

    /// Logits `(m, vocab)` of the final hidden state `x`.
    pub fn logits(&self, t: &mut Tape<B>, x: Id) -> B::Buf {
        let n = self.rmsnorm(t, x, NormRef::Final);
        self.head_logits(t, n)
    }

    /// Logits `(m, vocab)` of the final norm's output `n`.
    fn head_logits(&self, t: &mut Tape<B>, n: Id) -> B::Buf {
        let be = self.be;
        let head = self.model.lm_head();
        let (vocab, _) = be.weight_shape(head);
        let nv = t.get(n);
        let m = be.buf_len(nv) / self.model.cfg.hidden_size;
        let mut logits = self.alloc(m * vocab);
        be.linear(nv, head, m, &mut logits);
        logits
    }
}

/// Result of one forward+backward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepLoss {
    /// Summed token losses.
    pub loss_sum: f64,
    /// Tokens counted.
    pub count: usize,
}

impl StepLoss {
    pub fn mean(&self) -> f64 {
        self.loss_sum / self.count.max(1) as f64
    }
}

/// Forward and backward over one batch: accumulates `loss_scale · d(summed loss)` into `grads`.
/// Pass `loss_scale = 1 / (tokens counted across the accumulated batches)` for a mean loss.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: &Lora<B>,
    grads: &mut LoraGrads<B>,
    batch: &Batch,
    loss_scale: f32,
    dropout_seed: Option<u64>,
    checkpointing: impl Into<Checkpointing>,
) -> StepLoss {
    let opts = StepOptions {
        dropout_seed,
        checkpointing: checkpointing.into(),
        neftune_noise_alpha: None,
        keep_mlp_layers: 0,
        keep_attention_layers: 0,
    };
    forward_backward_with(be, model, lora, grads, batch, loss_scale, opts)
}

/// How a training step runs, beyond its batch ([`forward_backward_with`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    /// Seed of the step's random draws (LoRA dropout masks, NEFTune noise); `None`: neither.
    pub dropout_seed: Option<u64>,
    pub checkpointing: Checkpointing,
    /// NEFTune's α ([`Graph::neftune_noise_alpha`]); needs a `dropout_seed`.
    pub neftune_noise_alpha: Option<f32>,
    /// [`Graph::keep_mlp_layers`]: checkpointed layers whose MLP products wait for their replay.
    pub keep_mlp_layers: usize,
    /// [`Graph::keep_attention_layers`]: checkpointed layers whose attention waits for their replay.
    pub keep_attention_layers: usize,
}

/// Checks the replay keeps a run asks for (`--gradient-checkpointing-keep-mlp`,
/// `--gradient-checkpointing-keep-attention`; [`StepOptions::keep_mlp_layers`] and
/// [`StepOptions::keep_attention_layers`]) against its checkpointing: without it nothing is recomputed,
/// so nothing can be kept, and the setting is refused by name rather than ignored.
pub fn check_replay_keeps(checkpointing: bool, keep_mlp_layers: usize, keep_attention_layers: usize) -> Result<()> {
    for (name, layers) in [
        ("--gradient-checkpointing-keep-mlp", keep_mlp_layers),
        ("--gradient-checkpointing-keep-attention", keep_attention_layers),
    ] {
        if layers > 0 && !checkpointing {
            return Err(Error::Config(format!("{name} needs --gradient-checkpointing")));
        }
    }
    Ok(())
}

/// [`forward_backward`] with every option of a training step.
pub fn forward_backward_with<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: &Lora<B>,
    grads: &mut LoraGrads<B>,
    batch: &Batch,
    loss_scale: f32,
    opts: StepOptions,
) -> StepLoss {
    let mut g = Graph::new(be, model, Some(lora), batch, opts.dropout_seed, opts.checkpointing);
    g.neftune_noise_alpha = opts.neftune_noise_alpha;
    g.keep_mlp_layers = opts.keep_mlp_layers;
    g.keep_attention_layers = opts.keep_attention_layers;
    let mut tape = Tape::new(true);
    let x = g.body(&mut tape, &batch.input_ids);
    let (loss_sum, count) = g.lm_head_loss(&mut tape, x, &batch.targets(), loss_scale);
    tape.backward(&g, grads, None, &[]);
    StepLoss { loss_sum, count }
}

/// Forward only: the summed loss and token count of `batch` (evaluation).
pub fn evaluate<B: Backend>(be: &B, model: &Llama<B>, lora: Option<&Lora<B>>, batch: &Batch) -> StepLoss {
    let g = Graph::new(be, model, lora, batch, None, false);
    let mut tape = Tape::new(false);
    let x = g.body(&mut tape, &batch.input_ids);
    let (loss_sum, count) = g.lm_head_loss(&mut tape, x, &batch.targets(), 1.0);
    StepLoss { loss_sum, count }
}

/// Full-sequence logits `(batch·seq, vocab)` without a cache (the reference for cached decoding).
pub fn full_logits<B: Backend>(be: &B, model: &Llama<B>, lora: Option<&Lora<B>>, batch: &Batch) -> Vec<f32> {
    let g = Graph::new(be, model, lora, batch, None, false);
    let mut tape = Tape::new(false);
    let x = g.body(&mut tape, &batch.input_ids);
    be.download(&g.logits(&mut tape, x))
}

/// Runs `tokens` (batch 1) through the model at positions `cache.len..`, appending their keys and
/// values to `cache`; returns the logits of the last token `(vocab)`. One token runs as the cache's
/// one-token step ([`decode_step_greedy_launch`], which a CUDA graph replays). The cache's steps
/// belong to it: call with the same model and adapter for the cache's whole life (as `generate` does).
pub fn decode_step<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&Lora<B>>,
    cache: &mut KvCache<B>,
    tokens: &[u32],
) -> Result<Vec<f32>> {
    if let [token] = tokens {
        let step = token_step(be, model, lora, cache, StepToken::Host(*token))?;
        return Ok(be.download(&step.io.logits));
    }
    prompt_step(be, model, lora, cache, tokens, |logits| be.download(logits))
}

/// [`decode_step`] for greedy decoding: the index of the last token's largest logit
/// ([`Backend::argmax`], so a device backend downloads 4 bytes instead of the vocab's logits and the
/// host does not scan them).
pub fn decode_step_argmax<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&Lora<B>>,
    cache: &mut KvCache<B>,
    tokens: &[u32],
) -> Result<u32> {
    if let [token] = tokens {
        let step = token_step(be, model, lora, cache, StepToken::Host(*token))?;
        return Ok(be.download(&step.token)[0] as u32);
    }
    prompt_step(be, model, lora, cache, tokens, |logits| be.argmax(logits))
}

/// Queues a greedy one-token step on `token` and returns the pending read of its choice
/// ([`Backend::read_wait`] gives `[token id as f32]`). With [`StepToken::Chosen`] the step reads the
/// choice of the step queued before it, on the device: the host can queue it before it has read
/// that token, and the device then runs step after step with no gap for the host between them.
pub fn decode_step_greedy_launch<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&Lora<B>>,
    cache: &mut KvCache<B>,
    token: StepToken,
) -> Result<B::PendingRead> {
    let step = token_step(be, model, lora, cache, token)?;
    Ok(be.read_later(&step.token))
}

/// Runs the cache's one-token step on `token` at position `cache.len` (the first time op by op, then
/// recorded if the backend can, later replayed).
fn token_step<'c, B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&Lora<B>>,
    cache: &'c mut KvCache<B>,
    token: StepToken,
) -> Result<&'c TokenStep<B>> {
    check_room(cache, 1)?;
    let capacity = cache.capacity;
    let step = cache.token_step.get_or_insert_with(|| TokenStep::new(be, &model.cfg, capacity));
    match token {
        StepToken::Host(id) if id as usize >= model.cfg.vocab_size => {
            return Err(Error::Other(format!("token id {id} is outside the model's vocab ({})", model.cfg.vocab_size)));
        }
        StepToken::Host(id) => be.upload_into(&[id as f32], &mut step.token),
        StepToken::Chosen if !step.chosen => {
            return Err(Error::Other("no greedy choice on the device to decode from: start with a host token".into()));
        }
        StepToken::Chosen => {}
    }
    if step.pos_held != cache.len {
        be.upload_into(&[cache.len as f32], &mut step.io.pos);
    }
    let layers = &mut cache.layers;
    let TokenStep { io, token, cos_table, sin_table, buffers, recording, record_tried, .. } = &mut *step;
    let tables = (&*cos_table, &*sin_table);
    match recording {
        Some(recording) => be.replay(recording),
        None => {
            run_token_step(be, model, lora, layers, capacity, io, token, tables, buffers);
            if !*record_tried {
                *record_tried = true;
                *recording =
                    be.record(&mut || run_token_step(be, model, lora, layers, capacity, io, token, tables, buffers));
            }
        }
    }
    cache.len += 1;
    step.pos_held = cache.len;
    step.chosen = true;
    Ok(step)
}

/// The one-token step: its inputs at the device-held token and position, the step, its greedy
/// choice into `token` and the position moved on, all on the device (so that it can be recorded).
#[allow(clippy::too_many_arguments)]
fn run_token_step<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&Lora<B>>,
    layers: &mut [KvLayer<B>],
    capacity: usize,
    io: &mut StepIo<B>,
    token: &mut B::Buf,
    (cos_table, sin_table): (&B::Buf, &B::Buf),
    pool: &BufPool<B>,
) {
    let StepIo { h, cos, sin, pos, logits } = io;
    be.decode_inputs_at(&model.embed, token, pos, cos_table, sin_table, h, cos, sin);
    run_step(be, model, lora, layers, capacity, h, cos, sin, pos, logits, Some(pool));
    be.argmax_into(logits, token);
    be.advance_position(pos);
}

/// A step of several tokens (a prompt), op by op with its inputs from the host, then `read` of the
/// last token's logits `(vocab)` on the device.
fn prompt_step<B: Backend, T>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&Lora<B>>,
    cache: &mut KvCache<B>,
    tokens: &[u32],
    read: impl Fn(&B::Buf) -> T,
) -> Result<T> {
    if tokens.is_empty() {
        return Err(Error::Other("a decoding step needs at least one token".into()));
    }
    check_room(cache, tokens.len())?;
    let mut io = StepIo::new(be, &model.cfg, tokens.len());
    io.load(be, model, tokens, cache.len);
    let StepIo { h, cos, sin, pos, logits } = &mut io;
    run_step(be, model, lora, &mut cache.layers, cache.capacity, h, cos, sin, pos, logits, None);
    cache.len += tokens.len();
    Ok(read(logits))
}

fn check_room<B: Backend>(cache: &KvCache<B>, n: usize) -> Result<()> {
    if cache.len + n > cache.capacity {
        return Err(Error::Other(format!(
            "sequence of {} tokens exceeds the KV cache capacity {}",
            cache.len + n,
            cache.capacity
        )));
    }
    Ok(())
}

/// The decoding step proper: every layer over the embedded tokens `h` at the device-held position
/// `pos`, then the last token's logits into `logits`. Allocates only temporaries it frees, so it
/// can be recorded; with a `pool` it takes every buffer from it and gives each back, so once the
/// pool holds what one step needs the step allocates nothing.
#[allow(clippy::too_many_arguments)]
fn run_step<B: Backend>(
    be: &B,
    model: &Llama<B>,
    lora: Option<&Lora<B>>,
    layers: &mut [KvLayer<B>],
    capacity: usize,
    h: &B::Buf,
    cos: &B::Buf,
    sin: &B::Buf,
    pos: &B::Buf,
    logits: &mut B::Buf,
    pool: Option<&BufPool<B>>,
) {
    let c = &model.cfg;
    let n = be.buf_len(h) / c.hidden_size;
    // A copy of an input the step may consume or release.
    let copy = |src: &B::Buf| match pool {
        Some(pool) => {
            let mut b = pool.take(be, be.buf_len(src));
            be.write_range(src, &mut b, 0);
            b
        }
        None => src.clone(),
    };
    let new_tape = || if pool.is_some() { Tape::<B>::keeping_released(false) } else { Tape::<B>::new(false) };
    let give_back = |t: Tape<B>| {
        if let Some(pool) = pool {
            pool.give(be, t.into_buffers());
        }
    };
    let g = Graph {
        be,
        model,
        lora,
        cos: copy(cos),
        sin: copy(sin),
        segments: None,
        // q_offset and kv_len come from `pos` on the device (Backend::attention_at).
        shape: AttnShape {
            batch: 1,
            q_len: n,
            kv_len: n,
            kv_capacity: capacity,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            q_offset: 0,
        },
        dropout_seed: None,
        checkpointing: Checkpointing::Off,
        neftune_noise_alpha: None,
        keep_lora_us: false,
        keep_mlp_layers: 0,
        keep_attention_layers: 0,
        pool,
    };
    // The hidden state between layers: each layer leaves its last residual sum (a, b) to the next
    // layer's norm, which forms it in the same launch.
    let (mut a, mut b) = (copy(h), None::<B::Buf>);
    for (l, kv) in layers.iter_mut().enumerate() {
        let mut t = new_tape();
        let input = match b {
            Some(b) => Hidden::Sum(t.put(a), t.put(b)),
            None => Hidden::Value(t.put(a)),
        };
        (a, b) = match g.layer(&mut t, l, input, Some((kv, pos)), Pass::Full) {
            Hidden::Sum(x2, d) => (t.take(x2), Some(t.take(d))),
            Hidden::Value(y) => (t.take(y), None),
        };
        give_back(t);
    }
    // The final norm and the head on the last row only.
    let mut t = new_tape();
    let last_row = |buf: B::Buf| {
        if n == 1 {
            buf
        } else {
            be.read_range(&buf, (n - 1) * c.hidden_size, c.hidden_size)
        }
    };
    let last = t.put(last_row(a));
    let normed = match b {
        Some(b) => {
            let b = t.put(last_row(b));
            g.add_rmsnorm(&mut t, last, b, NormRef::Final).1
        }
        None => g.rmsnorm(&mut t, last, NormRef::Final),
    };
    if n == 1 {
        be.linear(t.get(normed), model.lm_head(), 1, logits);
    } else {
        be.write_range(&g.head_logits(&mut t, normed), logits, 0);
    }
    give_back(t);
    if let Some(pool) = pool {
        let Graph { cos, sin, .. } = g;
        pool.give(be, [cos, sin]);
    }
}

/// How much of a decoder layer a pass computes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Every value (training's first pass, evaluation, decoding).
    Full,
    /// Backward's replay of a checkpointed layer: only what the recorded ops' backward reads
    /// ([`Graph::layer_replay`]).
    Replay,
}

/// A decoder layer's input or output: a hidden state, or (decoding) the two terms of its residual
/// sum, which the next RMSNorm adds in the same launch ([`Backend::add_rmsnorm`]).
#[derive(Clone, Copy)]
enum Hidden {
    Value(Id),
    Sum(Id, Id),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::config::{LoraConfig, QuantConfig};
    use crate::model::random::{random_source, tiny_config};

    /// Decoding's recorded step takes every buffer from a pool and gives each back: the first step
    /// fills the pool, later steps allocate nothing (what lets the CUDA graph of the step hold no
    /// allocation nodes), and the logits are those of the step without a pool, bit for bit.
    #[test]
    fn pooled_decoding_steps_allocate_only_in_the_first_and_match_plain_steps() {
        let be = Cpu::<f32>::new();
        let cfg = tiny_config(false);
        let model = Llama::load(&be, &random_source(&cfg, 3), Some(QuantConfig::default())).unwrap();
        let lcfg = LoraConfig { r: 4, alpha: 8.0, ..LoraConfig::default() }.with_targets(&["all-linear"]).unwrap();
        let mut lora = Lora::init(&be, &cfg, lcfg, 5);
        for (i, pair) in lora.layers.iter_mut().flat_map(|l| l.iter_mut().flatten()).enumerate() {
            pair.b.iter_mut().enumerate().for_each(|(j, x)| *x = ((i * 31 + j * 7) % 13) as f32 * 0.02 - 0.12);
        }
        let (mut plain, mut pooled) = (KvCache::new(&be, &cfg, 8), KvCache::new(&be, &cfg, 8));
        let pool = BufPool::default();
        let mut first_misses = 0;
        for (i, token) in [5u32, 9, 13, 2, 7].into_iter().enumerate() {
            let step = |cache: &mut KvCache<Cpu<f32>>, pool: Option<&BufPool<Cpu<f32>>>| {
                let mut io = StepIo::new(&be, &cfg, 1);
                io.load(&be, &model, &[token], i);
                let StepIo { h, cos, sin, pos, logits } = &mut io;
                run_step(&be, &model, Some(&lora), &mut cache.layers, 8, h, cos, sin, pos, logits, pool);
                io.logits
            };
            let want = step(&mut plain, None);
            let got = step(&mut pooled, Some(&pool));
            assert!(want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "token {i}: logits differ");
            if i == 0 {
                first_misses = pool.misses();
                assert!(first_misses > 0, "the first step fills the pool");
            }
            assert_eq!(pool.misses(), first_misses, "token {i}: a pooled step after the first allocated");
        }
    }
}
