//! The ops the Llama graph needs, forward and backward, over a backend's own buffers.
//!
//! Conventions for every op: buffers are flat and row-major; `m` is the number of token rows
//! (batch × sequence); a linear weight is `(rows = out_features, cols = in_features)` as PyTorch stores
//! it, so `linear` computes `y = x · Wᵀ`. Ops that write `out` overwrite it unless their name or
//! an `accumulate` flag says they add into it.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

use crate::config::ComputeDtype;
use crate::quant::Quant4;

/// A frozen weight as it arrives from a checkpoint, before a backend takes it.
#[derive(Debug, Clone)]
pub enum HostWeight {
    /// Dense values, `rows × cols`, row-major.
    Dense { rows: usize, cols: usize, data: Vec<f32> },
    /// 4-bit blockwise quantized (bitsandbytes layout) over the flattened `rows × cols` matrix,
    /// used in matmuls at `compute` precision.
    Quant4 { rows: usize, cols: usize, q: Quant4, compute: ComputeDtype },
}

impl HostWeight {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            HostWeight::Dense { rows, cols, .. } | HostWeight::Quant4 { rows, cols, .. } => (*rows, *cols),
        }
    }
    /// Dense f32 values (dequantized if needed).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostWeight::Dense { data, .. } => data.clone(),
            HostWeight::Quant4 { q, .. } => q.dequantize(),
        }
    }
}

/// Inverted dropout whose mask is a pure function of `(seed, flat index)`: it is regenerated in
/// backward and in a checkpointed replay instead of being stored, and a GPU kernel can compute the
/// same mask from the same formula.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub seed: u64,
}

impl Dropout {
    pub const NONE: Dropout = Dropout { p: 0.0, seed: 0 };

    pub fn is_active(&self) -> bool {
        self.p > 0.0
    }

    /// The multiplier of element `idx`: 0 (dropped) or 1/(1-p) (kept). Neighbours `2i` and `2i + 1`
    /// share one 32-bit hash of (i, seed), 16 bits each (the low half decides the even one): an element
    /// is dropped when its 16 bits fall below p·2¹⁶ (p is resolved to 2⁻¹⁶: 0.1 drops 6,554 of 65,536).
    /// The hash (murmur3's finalizer over the index, keyed by the seed) costs ~12 integer instructions
    /// on the GPU (kernels/common.cuh, dropout_factor and dropout_pair_keep, the same formula), and the
    /// fused LoRA kernels' `down` spent most of its instructions hashing one per element (ncu, H200,
    /// session 16: instruction-bound); one hash per pair halves that. (The 64-bit splitmix before it
    /// cost ~40 per element.)
    #[inline]
    pub fn factor(&self, idx: u64) -> f32 {
        if self.p <= 0.0 {
            return 1.0;
        }
        let h = element_hash(self.seed, idx >> 1);
        let bits = if idx & 1 == 0 { h & 0xFFFF } else { h >> 16 };
        // u = bits / 2¹⁶ < p, in integers: bits < ceil(p·2¹⁶) (p·2¹⁶ is exact in f32).
        let threshold = (self.p * 65_536.0).ceil() as u32;
        if bits < threshold {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }
}

/// A default-on A/B switch: off when the environment variable `var` is `0` or `off` (the CUDA
/// backend's path choices, the model's kept LoRA u).
pub(crate) fn switch_on(var: &str) -> bool {
    !std::env::var(var).is_ok_and(|v| v == "0" || v == "off")
}

/// 32 random bits for element `idx` of a draw seeded by `seed`: a pure function, so a replay (or the
/// other backend: kernels/common.cuh `element_hash`, the same formula) draws the same values.
#[inline]
pub fn element_hash(seed: u64, idx: u64) -> u32 {
    let key = mix32(seed as u32 ^ mix32((seed >> 32) as u32));
    mix32((idx as u32).wrapping_mul(0x9E37_79B1) ^ ((idx >> 32) as u32).wrapping_mul(0x7FEB_352D) ^ key)
}

/// NEFTune's noise for element `idx`: uniform on [-1, 1) in steps of 2⁻²³ (the hash's top 24 bits;
/// every step of the computation is exact in f32). kernels/common.cuh `uniform_pm1` is the same.
#[inline]
pub fn uniform_pm1(seed: u64, idx: u64) -> f32 {
    (element_hash(seed, idx) >> 8) as f32 * (1.0 / 8_388_608.0) - 1.0
}

/// murmur3's 32-bit finalizer: every input bit flips each output bit with probability ~1/2.
#[inline]
fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// One projection's LoRA branch in [`Backend::lora_forward_many`]: `a (r, in)`, `b (out, r)`, its
/// dropout, and the buffers it writes: `u (m, r)` and the projection's output `y (m, out)` it adds to.
/// With `u_ready`, `u` already holds `drop(x) · Aᵀ` and only the B product runs.
pub struct LoraBranch<'a, B: Backend + ?Sized> {
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    pub dropout: Dropout,
    pub u: &'a mut B::Buf,
    pub u_ready: bool,
    pub y: &'a mut B::Buf,
}

/// One projection's LoRA branch in [`Backend::linear_many_lora`], which adds it into the projection's
/// own output: `a (r, in)`, `b (out, r)`, its dropout, and `u (m, r)`, which it writes, unless
/// `u_ready`: then `u` already holds `drop(x) · Aᵀ` (backward's replay of a checkpointed layer is
/// given the `u` its first pass computed) and the A product is skipped.
pub struct LoraDown<'a, B: Backend + ?Sized> {
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    pub dropout: Dropout,
    pub u: &'a mut B::Buf,
    pub u_ready: bool,
}

/// One projection's LoRA branch in [`Backend::linear_lora_backward`]: what its forward saved (`x`,
/// `u (m, r)`), `a (r, in)`, `b (out, r)`, its dropout, and the gradients it adds into.
pub struct LoraGrad<'a, B: Backend + ?Sized> {
    pub x: &'a B::Buf,
    pub a: &'a B::Buf,
    pub b: &'a B::Buf,
    pub u: &'a B::Buf,
    pub dropout: Dropout,
    pub da: &'a mut B::Buf,
    pub db: &'a mut B::Buf,
}

/// One projection's part of [`Backend::linears_backward_input`]: its output gradient `dy (m, out)`,
/// its frozen weight and its LoRA branch, if any.
pub struct LinearGradPart<'a, B: Backend + ?Sized> {
    pub dy: &'a B::Buf,
    pub w: &'a B::Weight,
    pub lora: Option<LoraGrad<'a, B>>,
}

/// Geometry of one attention call. Queries are `(batch, q_len, heads, head_dim)`; keys and values
/// `(batch, kv_capacity, kv_heads, head_dim)` of which the first `kv_len` rows are valid. Query `t`
/// sits at absolute position `q_offset + t` and sees keys `s <= q_offset + t` (causal).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub kv_capacity: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q_offset: usize,
}

impl AttnShape {
    /// Training shape: queries and keys are the same `seq` positions.
    pub fn square(batch: usize, seq: usize, heads: usize, kv_heads: usize, head_dim: usize) -> Self {
        AttnShape { batch, q_len: seq, kv_len: seq, kv_capacity: seq, heads, kv_heads, head_dim, q_offset: 0 }
    }
    /// A training or evaluation shape: no cached prefix and as many key rows as query rows, so one
    /// RoPE table row serves query and key row `t` ([`Backend::rope_attention`]).
    pub fn is_square(&self) -> bool {
        self.q_offset == 0 && self.kv_capacity == self.q_len
    }
}

/// bitsandbytes' 32-bit Adam step for one value, in f32: returns the new `(param, m, v)`.
/// `step_size = -lr·c2/c1` and `c2 = sqrt(1 − β2^t)` come from [`AdamWStep::corrections`].
#[inline]
pub fn adam_value(p: f32, g: f32, m: f32, v: f32, hp: &AdamWStep, step_size: f32, c2: f32) -> (f32, f32, f32) {
    let g = g * hp.grad_scale;
    let m = m * hp.beta1 + (1.0 - hp.beta1) * g;
    let v = v * hp.beta2 + (1.0 - hp.beta2) * g * g;
    let mut p = p + step_size * (m / (v.sqrt() + hp.eps * c2));
    if hp.weight_decay > 0.0 {
        p *= 1.0 - hp.lr * hp.weight_decay;
    }
    (p, m, v)
}

/// One AdamW update's hyper-parameters (bitsandbytes' 32-bit Adam with decoupled weight decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count, for bias correction.
    pub step: u32,
    /// Multiplies the gradient first (gradient clipping's coefficient).
    pub grad_scale: f32,
}

impl AdamWStep {
    /// `(step_size, c2)`: the bias corrections folded the way bitsandbytes folds them, in f32.
    pub fn corrections(&self) -> (f32, f32) {
        let c1 = 1.0 - self.beta1.powi(self.step as i32);
        let c2 = (1.0 - self.beta2.powi(self.step as i32)).sqrt();
        (-self.lr * c2 / c1, c2)
    }
}

/// The ops of the Llama graph. `Buf` holds dense activations and trainable parameters in the
/// backend's float type; `Weight` holds a frozen base weight (dense or 4-bit).
pub trait Backend {
    type Buf: Clone;
    type Weight;
    /// Host memory the device streams optimizer state through (pinned on CUDA).
    type HostBuf;
    /// A recorded sequence of ops that can be replayed ([`Backend::record`]).
    type Recording;
    /// A buffer parked off the device until backward needs it ([`Backend::offload`]): pinned host
    /// memory on CUDA; the CPU backend keeps the buffer as it is.
    type Offloaded;
    /// An MLP's gate and up products kept from its forward for its backward ([`Backend::mlp_gate_up`]):
    /// two f32 buffers on the CPU; on CUDA, where the 4-bit products' second path runs, their 16-bit
    /// compute dtype as cuBLAS writes them (no f32 copy: half the memory and traffic).
    type MlpActs;
    /// An attention call's q, k and v kept from its forward for its backward
    /// ([`Backend::attn_acts`]): the three f32 buffers on the CPU; on CUDA, where the flash kernels
    /// take the call, q and k rotated by RoPE and all three in bf16, as those kernels read them (no
    /// f32 copy, no conversion in each pass that reads them).
    type AttnActs;
    /// A copy to the host under way ([`Backend::read_later`]): pinned memory and the copy's event on
    /// CUDA; the values themselves on the CPU.
    type PendingRead;

    fn name(&self) -> String;
    /// Whether activations can run in fp16/bf16 (transformers' `--fp16`/`--bf16`).
    fn supports_mixed_precision(&self) -> bool {
        false
    }
    /// Peak device memory in bytes since start, when the backend tracks it.
    fn peak_memory(&self) -> Option<u64> {
        None
    }
    /// Starts a new peak-memory window (so a benchmark can measure training apart from loading).
    fn reset_peak_memory(&self) {}
    /// Device memory the backend holds from the driver (in use or kept for reuse), when it tracks
    /// it: constant from one training step to the next once the first step has run means every
    /// allocation of a step is served from memory already held (no allocation from the device).
    fn reserved_memory(&self) -> Option<u64> {
        None
    }
    /// The board's energy counter in joules (any origin; differences matter), when the backend can
    /// read one (CUDA: NVML's total energy). A benchmark reads it around its timed steps: a device
    /// held at its power limit runs a step in its joules over that limit (docs/PERF.md).
    fn energy_joules(&self) -> Option<f64> {
        None
    }
    /// Waits until every queued operation has finished (timing needs it; the CPU is synchronous).
    fn synchronize(&self) {}
    /// Whether operations return before their work has run (CUDA: queued on a stream). Greedy
    /// decoding queues the next step before it streams a token only where this holds; a backend that
    /// runs each operation as it is called (the CPU) would compute that step before the token shows.
    fn queues_work(&self) -> bool {
        false
    }
    /// Starts a new window of the per-op profile when the backend keeps one (`LLAMATUNE_PROFILE=1` on
    /// CUDA), so a benchmark's timed steps leave out the first calls' one-time costs (module loading,
    /// cuBLAS heuristics, page-locked allocations).
    fn reset_profile(&self) {}

    // ---- memory --------------------------------------------------------------------------------
    fn zeros(&self, n: usize) -> Self::Buf;
    /// A buffer for an op's output that the op overwrites entirely, so its contents before the op
    /// do not matter: the CUDA backend skips the memset of [`Backend::zeros`] (and with
    /// `LLAMATUNE_POISON=1` fills NaN, so an op that leaves an element unwritten shows up).
    fn alloc_output(&self, n: usize) -> Self::Buf {
        self.zeros(n)
    }
    fn upload(&self, host: &[f32]) -> Self::Buf;
    fn upload_f64(&self, host: &[f64]) -> Self::Buf;
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    fn download_f64(&self, buf: &Self::Buf) -> Vec<f64>;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    fn upload_weight(&self, w: HostWeight) -> Self::Weight;
    /// `(rows, cols)` = `(out_features, in_features)`.
    fn weight_shape(&self, w: &Self::Weight) -> (usize, usize);
    fn weight_to_host(&self, w: &Self::Weight) -> HostWeight;
    /// A copy of `len` elements starting at `start`.
    fn read_range(&self, buf: &Self::Buf, start: usize, len: usize) -> Self::Buf;
    /// Copies all of `src` into `dst` starting at `offset`.
    fn write_range(&self, src: &Self::Buf, dst: &mut Self::Buf, offset: usize);

    // ---- elementwise -----------------------------------------------------------------------------
    /// `dst += src`.
    fn add_assign(&self, dst: &mut Self::Buf, src: &Self::Buf);
    /// `out = a + b`.
    fn add(&self, a: &Self::Buf, b: &Self::Buf, out: &mut Self::Buf);
    /// `buf *= s`.
    fn scale(&self, buf: &mut Self::Buf, s: f64);
    /// Σ buf², accumulated in f64 (for the global gradient norm).
    fn sum_squares(&self, buf: &Self::Buf) -> f64;
    /// Every buffer in `bufs` set to zeros, NaN or not (the gradients before each step): by default a
    /// fresh zeroed buffer each; a backend may zero them in place in one launch (CUDA:
    /// `zero_many_f32`; an all-linear adapter has 448).
    fn zero_all(&self, bufs: Vec<&mut Self::Buf>) {
        for b in bufs {
            *b = self.zeros(self.buf_len(b));
        }
    }
    /// Σ over all `bufs` of Σ buf² (the global gradient norm's square): one result to wait for
    /// instead of one per tensor.
    fn sum_squares_all(&self, bufs: &[&Self::Buf]) -> f64 {
        bufs.iter().map(|b| self.sum_squares(b)).sum()
    }
    /// True if any element is NaN or infinite.
    fn has_non_finite(&self, buf: &Self::Buf) -> bool;
    /// The index of the largest element, the first of equal ones, as [`crate::generate::argmax`]
    /// picks it from the downloaded values (greedy decoding): [`Backend::argmax_into`], then the
    /// index alone downloaded.
    fn argmax(&self, buf: &Self::Buf) -> u32 {
        let mut out = self.alloc_output(1);
        self.argmax_into(buf, &mut out);
        self.download(&out)[0] as u32
    }
    /// `out[0]` = [`Backend::argmax`] of `buf`, as an f32 (exact below 2^24): greedy decoding's
    /// choice left where the next step's [`Backend::decode_inputs_at`] reads it. A backend may pick
    /// it where the values are (CUDA: `argmax_f32`, recordable).
    fn argmax_into(&self, buf: &Self::Buf, out: &mut Self::Buf) {
        let index = crate::generate::argmax(&self.download(buf));
        self.upload_into(&[index as f32], out);
    }
    /// NEFTune: `buf[i] += magnitude · u_i`, `u_i` = [`uniform_pm1`]`(seed, i)` (the product and the sum
    /// each rounded once, so every backend adds the same values).
    fn add_uniform_noise(&self, buf: &mut Self::Buf, magnitude: f32, seed: u64);

    // ---- graph ops -------------------------------------------------------------------------------
    /// `out[i] = table[ids[i]]`: `(m, dim)` rows gathered from a `(vocab, dim)` weight.
    fn embedding(&self, table: &Self::Weight, ids: &[u32], out: &mut Self::Buf);
    /// `dtable[ids[i]] += dout[i]` (only needed when an embedding is trained).
    fn embedding_backward(&self, ids: &[u32], dout: &Self::Buf, dim: usize, dtable: &mut Self::Buf);
    /// RMSNorm over rows of `dim`: `out = x / sqrt(mean(x²) + eps) * w`; saves `rstd` `(m)`.
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, dim: usize, eps: f64, out: &mut Self::Buf, rstd: &mut Self::Buf);
    /// `sum = a + b`, then [`Backend::rmsnorm`] of `sum`: a residual add and the norm that follows it,
    /// which a backend can do in one pass (CUDA: one kernel, so decoding saves a launch per layer).
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        w: &Self::Buf,
        dim: usize,
        eps: f64,
        sum: &mut Self::Buf,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) {
        self.add(a, b, sum);
        self.rmsnorm(sum, w, dim, eps, out, rstd);
    }
    /// Input gradient of RMSNorm (the norm weight is frozen), written into `dx` or, with
    /// `accumulate`, added to it (the residual stream's gradient already there).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rstd: &Self::Buf,
        dout: &Self::Buf,
        dim: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    );
    /// `out (m, rows) = x (m, cols) · Wᵀ`.
    fn linear(&self, x: &Self::Buf, w: &Self::Weight, m: usize, out: &mut Self::Buf);
    /// `outs[i] = x · W_iᵀ` for products reading the same input (q/k/v, gate/up): the results of one
    /// [`Backend::linear`] each, with work on x shared where a backend can (CUDA converts it to the
    /// compute dtype once).
    fn linear_many(&self, x: &Self::Buf, ws: &[&Self::Weight], m: usize, outs: &mut [&mut Self::Buf]) {
        assert_eq!(ws.len(), outs.len(), "linear_many: one output per weight");
        for (w, out) in ws.iter().zip(outs.iter_mut()) {
            self.linear(x, w, m, out);
        }
    }
    /// [`Backend::linear_many`], then the LoRA branches of the projections that have one (`loras[i]`
    /// adds into `outs[i]`) as [`Backend::lora_forward_many`] computes them: one call, so that a backend
    /// can share launches across the two (CUDA, decoding: the A products ride in the frozen GEMVs'
    /// launch).
    #[allow(clippy::too_many_arguments)]
    fn linear_many_lora(
        &self,
        x: &Self::Buf,
        ws: &[&Self::Weight],
        m: usize,
        outs: &mut [&mut Self::Buf],
        loras: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
    ) {
        linear_many_lora_composed(self, x, ws, m, outs, loras, r, scale);
    }
    /// `out (m, rows) = silu(x · Gᵀ) · (x · Uᵀ)`: an MLP's gate and up products and [`Backend::swiglu`]
    /// in one call where their values are not needed apart (decoding without LoRA on gate/up; CUDA:
    /// one launch for one row of x).
    fn linear_swiglu(&self, x: &Self::Buf, gate: &Self::Weight, up: &Self::Weight, m: usize, out: &mut Self::Buf) {
        linear_swiglu_composed(self, x, gate, up, m, out);
    }
    /// The gate and up products `x · Gᵀ`, `x · Uᵀ` `(m, ffn)` of an MLP without LoRA branches from
    /// its input `x (m, hidden)`, for [`Backend::mlp_down`] and [`Backend::mlp_backward`] (`down`
    /// given too: a backend may keep them in a 16-bit dtype only where all three products allow it).
    fn mlp_gate_up(
        &self,
        x: &Self::Buf,
        gate: &Self::Weight,
        up: &Self::Weight,
        down: &Self::Weight,
        m: usize,
    ) -> Self::MlpActs;
    /// [`Backend::add_rmsnorm`] whose normalized rows feed only an MLP without LoRA branches
    /// ([`Backend::mlp_gate_up`] of `gate`, `up`, `down` at `m` rows): `sum` and `rstd` as
    /// add_rmsnorm writes them, and the MLP's products of the normalized rows, which are not kept.
    /// The default runs the two; CUDA's 16-bit MLP writes the norm's output straight in the compute
    /// dtype its products read, with no f32 copy.
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm_mlp_gate_up(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        w: &Self::Buf,
        eps: f64,
        [gate, up, down]: [&Self::Weight; 3],
        m: usize,
        sum: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Self::MlpActs {
        add_rmsnorm_mlp_gate_up_composed(self, a, b, w, eps, [gate, up, down], m, sum, rstd)
    }
    /// The o projection of attention's output `attn (m, heads · head_dim)` by `wo` (no LoRA branch)
    /// added to the residual `res` and normalized for an MLP without LoRA branches:
    /// [`Backend::add_rmsnorm_mlp_gate_up`] of `res` and `attn · woᵀ`, whose product is not kept. The
    /// default runs the two; CUDA's 16-bit MLP adds the o product as cuBLAS writes it in the compute
    /// dtype, never widened into f32.
    #[allow(clippy::too_many_arguments)]
    fn linear_add_rmsnorm_mlp_gate_up(
        &self,
        attn: &Self::Buf,
        wo: &Self::Weight,
        res: &Self::Buf,
        w: &Self::Buf,
        eps: f64,
        mlp: [&Self::Weight; 3],
        m: usize,
        sum: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) -> Self::MlpActs {
        linear_add_rmsnorm_mlp_gate_up_composed(self, attn, wo, res, w, eps, mlp, m, sum, rstd)
    }
    /// Elements (of either dtype) an MLP's saved products hold: `2 · m · ffn`.
    fn mlp_acts_len(&self, acts: &Self::MlpActs) -> usize;
    /// A projection of `x (m, cols)` by `w` with its LoRA branch (`lora`: its one slot, `u` written
    /// unless ready) added to the residual `res` and normalized by `norm_w`: `sum = res + x·Wᵀ (+ the
    /// branch)`, `out = rmsnorm(sum) · norm_w` and `rstd`, as `linear_many_lora` and `add_rmsnorm`
    /// write them; the product is not kept (this sum is its only reader). CUDA adds its 16-bit product
    /// into the sum as cuBLAS writes it, never widened. The default: the two calls.
    #[allow(clippy::too_many_arguments)]
    fn linear_lora_add_rmsnorm(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        m: usize,
        lora: &mut [Option<LoraDown<'_, Self>>],
        (r, scale): (usize, f32),
        (res, norm_w, eps): (&Self::Buf, &Self::Buf, f64),
        sum: &mut Self::Buf,
        out: &mut Self::Buf,
        rstd: &mut Self::Buf,
    ) {
        linear_lora_add_rmsnorm_composed(self, x, w, m, lora, (r, scale), (res, norm_w, eps), sum, out, rstd);
    }
    /// `out (m, rows) += x · Wᵀ (+ its LoRA branch)`: a projection added into `out` (the residual) as
    /// it lands, in a pass that records nothing (nothing else reads the product). CUDA widens its
    /// 16-bit product straight into the sum. The default: `linear_many_lora`, then `add_assign`.
    #[allow(clippy::too_many_arguments)]
    fn linear_lora_add_into(
        &self,
        x: &Self::Buf,
        w: &Self::Weight,
        m: usize,
        lora: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
        out: &mut Self::Buf,
    ) {
        linear_lora_add_into_composed(self, x, w, m, lora, r, scale, out);
    }
    /// The gate and up products `(m, ffn)` of an MLP's input `x (m, hidden)` with their LoRA branches
    /// (`loras`: gate's, then up's, each `u` written unless ready, as [`Backend::linear_many_lora`]
    /// writes it), kept as [`Self::MlpActs`] for [`Backend::mlp_swiglu`] and
    /// [`Backend::mlp_swiglu_backward`]: a backend may keep them in a 16-bit dtype (CUDA, where its
    /// products are rounded to that dtype anyway). The default: `linear_many_lora` into f32.
    #[allow(clippy::too_many_arguments)]
    fn mlp_gate_up_lora(
        &self,
        x: &Self::Buf,
        [gate, up]: [&Self::Weight; 2],
        m: usize,
        loras: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
    ) -> Self::MlpActs {
        mlp_gate_up_lora_composed(self, x, [gate, up], m, loras, r, scale)
    }
    /// An MLP's gate and up products held in f32, as [`Self::MlpActs`].
    fn mlp_acts_from_f32(&self, gate: Self::Buf, up: Self::Buf) -> Self::MlpActs;
    /// `out (m, ffn) = silu(g) · u` ([`Backend::swiglu`]) from an MLP's saved products.
    fn mlp_swiglu(&self, acts: &Self::MlpActs, out: &mut Self::Buf);
    /// [`Backend::swiglu_backward`] from an MLP's saved products: `dgate` and `dup` from `dout`.
    fn mlp_swiglu_backward(&self, acts: &Self::MlpActs, dout: &Self::Buf, dgate: &mut Self::Buf, dup: &mut Self::Buf);
    /// `out (m, hidden) (+)= (silu(g) · u) · Dᵀ` from an MLP's gate and up products `acts`, written
    /// over `out` or added into it (`accumulate`: the residual).
    fn mlp_down(&self, acts: &Self::MlpActs, down: &Self::Weight, m: usize, out: &mut Self::Buf, accumulate: bool);
    /// The input gradient of an MLP without LoRA branches (recorded as one op): from the down
    /// product's output gradient `dy (m, hidden)` and the saved products `acts`, `dx (m, hidden) (+)=`
    /// the up and then the gate product's input gradients (the order the tape walks them).
    #[allow(clippy::too_many_arguments)]
    fn mlp_backward(
        &self,
        dy: &Self::Buf,
        acts: &Self::MlpActs,
        gate: &Self::Weight,
        up: &Self::Weight,
        down: &Self::Weight,
        m: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
    );
    /// `dx (m, cols) (+)= dy (m, rows) · W`.
    fn linear_backward_input(&self, dy: &Self::Buf, w: &Self::Weight, m: usize, dx: &mut Self::Buf, accumulate: bool);
    /// A targeted projection's backward: [`Backend::linear_backward_input`], then
    /// [`Backend::lora_backward`] of its branch into the same `dx` (the default); a backend may fuse
    /// them (CUDA: the branch's dx term added in the pass that widens the product's gradient).
    #[allow(clippy::too_many_arguments)]
    fn linear_lora_backward(
        &self,
        dy: &Self::Buf,
        w: &Self::Weight,
        m: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
        lora: LoraGrad<'_, Self>,
        r: usize,
        scale: f32,
    ) {
        self.linear_backward_input(dy, w, m, dx, accumulate);
        let LoraGrad { x, a, b, u, dropout, da, db } = lora;
        self.lora_backward(x, a, b, u, dy, m, r, scale, dropout, da, db, dx);
    }
    /// The input gradient of projections that read the same `x (m, in)` (q/k/v, gate/up), each part
    /// landing in `dx` as [`Backend::linear_lora_backward`] (or [`Backend::linear_backward_input`]
    /// without a branch) would land it, in the order given: the first written over `dx` unless
    /// `accumulate`, the others added (the default makes those calls). A backend may land every part
    /// in one pass over `dx` (CUDA: the 16-bit products and the branches' dx terms added in one kernel,
    /// the same values in the same order).
    fn linears_backward_input(
        &self,
        parts: Vec<LinearGradPart<'_, Self>>,
        m: usize,
        dx: &mut Self::Buf,
        accumulate: bool,
        r: usize,
        scale: f32,
    ) {
        linears_backward_input_composed(self, parts, m, dx, accumulate, r, scale);
    }
    /// A LoRA branch's A product alone: `u (m, r) = drop(x) · Aᵀ`, `a (r, in)`. Backward's replay of
    /// a checkpointed layer runs it for a projection whose output it does not need (the down
    /// product, whose output the next checkpoint already holds) when the layer's first pass kept no
    /// `u`, since the branch's backward reads u. It computes u exactly as [`Backend::lora_forward`] does.
    fn lora_down(&self, x: &Self::Buf, a: &Self::Buf, m: usize, r: usize, dropout: Dropout, u: &mut Self::Buf);
    /// A LoRA branch's B product alone: `y (m, out) += scale · u · Bᵀ`, `u (m, r)`, `b (out, r)`.
    fn lora_b_forward(&self, u: &Self::Buf, b: &Self::Buf, m: usize, r: usize, scale: f32, y: &mut Self::Buf);
    /// LoRA branch: `u (m, r) = drop(x) · Aᵀ`, then `y (m, out) += scale · u · Bᵀ`.
    /// `a` is `(r, in)`, `b` is `(out, r)`.
    #[allow(clippy::too_many_arguments)]
    fn lora_forward(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        m: usize,
        r: usize,
        scale: f32,
        dropout: Dropout,
        u: &mut Self::Buf,
        y: &mut Self::Buf,
    ) {
        self.lora_down(x, a, m, r, dropout, u);
        self.lora_b_forward(u, b, m, r, scale, y);
    }
    /// The LoRA branches of projections that read the same `x` (q/k/v, gate/up):
    /// [`Backend::lora_forward`] of each, with launches shared where a backend can (CUDA, decoding:
    /// one launch for every branch's A product and one for every B product).
    fn lora_forward_many(&self, x: &Self::Buf, branches: &mut [LoraBranch<'_, Self>], m: usize, r: usize, scale: f32) {
        lora_forward_each(self, x, branches, m, r, scale);
    }
    /// LoRA backward: `da += (scale·dy·B)ᵀ · drop(x)`, `db += scale · dyᵀ · u`, `dx += drop'((scale·dy·B) · A)`.
    #[allow(clippy::too_many_arguments)]
    fn lora_backward(
        &self,
        x: &Self::Buf,
        a: &Self::Buf,
        b: &Self::Buf,
        u: &Self::Buf,
        dy: &Self::Buf,
        m: usize,
        r: usize,
        scale: f32,
        dropout: Dropout,
        da: &mut Self::Buf,
        db: &mut Self::Buf,
        dx: &mut Self::Buf,
    );
    /// Rotary embedding (rotate-half layout) of `x (m, heads, head_dim)` by per-row tables
    /// `cos, sin (m, head_dim/2)`; `inverse` rotates by the negative angle (the backward pass).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &Self::Buf,
        cos: &Self::Buf,
        sin: &Self::Buf,
        heads: usize,
        head_dim: usize,
        inverse: bool,
        out: &mut Self::Buf,
    );
    /// Causal attention with GQA; `segments` (length `batch × kv_capacity`, position-indexed) masks
    /// keys of other documents and padding (segment 0). Writes `out (batch, q_len, heads, head_dim)`
    /// and the log-sum-exp `lse (batch, heads, q_len)` that backward reuses.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
        segments: Option<&[u32]>,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        shape: AttnShape,
        segments: Option<&[u32]>,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    );
    /// [`Backend::attention`] of `q` and `k` before RoPE: both rotated by `rope` first
    /// ([`Backend::rope`]). For a square shape (training and evaluation: `q_offset` 0 and as many key
    /// rows as query rows, so one table row serves query and key row `t`). CUDA's flash kernels rotate
    /// q and k as they take them in, with no rotated copy in memory.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        rope: RopeTables<'_, Self>,
        shape: AttnShape,
        segments: Option<&[u32]>,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    ) {
        rope_attention_composed(self, q, k, v, rope, shape, segments, out, lse);
    }
    /// q `(m, heads·hd)`, k and v `(m, kv_heads·hd)` of a [`Backend::rope_attention`] call of shape
    /// `shape`, taken over into the form [`Backend::rope_attention_acts`] and its backward read; the
    /// training graph saves this instead of the three buffers.
    fn attn_acts(
        &self,
        q: Self::Buf,
        k: Self::Buf,
        v: Self::Buf,
        rope: RopeTables<'_, Self>,
        shape: AttnShape,
    ) -> Self::AttnActs;
    /// The q, k and v projections of `x` with their LoRA branches ([`Backend::linear_many_lora`] of
    /// `ws` = [q, k, v]) taken straight into the saved form of a [`Backend::rope_attention`] call of
    /// shape `shape` ([`Backend::attn_acts`]): training's forward and replay read the three
    /// projections only through it. The default computes them in f32 and hands them over; CUDA writes
    /// the flash kernels' bf16 inputs from cuBLAS's 16-bit products where it can, with the LoRA B
    /// product and RoPE applied in the same pass, and no f32 copy made.
    #[allow(clippy::too_many_arguments)]
    fn qkv_attn_acts(
        &self,
        x: &Self::Buf,
        ws: &[&Self::Weight],
        m: usize,
        loras: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
        rope: RopeTables<'_, Self>,
        shape: AttnShape,
    ) -> Self::AttnActs {
        qkv_attn_acts_composed(self, x, ws, m, loras, r, scale, rope, shape)
    }
    /// Elements (of either dtype) held by saved attention inputs: q, k and v together.
    fn attn_acts_len(&self, acts: &Self::AttnActs) -> usize;
    /// [`Backend::rope_attention`] of saved inputs ([`Backend::attn_acts`]).
    #[allow(clippy::too_many_arguments)]
    fn rope_attention_acts(
        &self,
        acts: &Self::AttnActs,
        rope: RopeTables<'_, Self>,
        shape: AttnShape,
        segments: Option<&[u32]>,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    );
    /// [`Backend::rope_attention_backward`] of saved inputs ([`Backend::attn_acts`]).
    #[allow(clippy::too_many_arguments)]
    fn rope_attention_acts_backward(
        &self,
        acts: &Self::AttnActs,
        rope: RopeTables<'_, Self>,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        shape: AttnShape,
        segments: Option<&[u32]>,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    );
    /// The backward of [`Backend::rope_attention`]: `dq`, `dk` are the gradients of the un-rotated
    /// `q` and `k`.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        rope: RopeTables<'_, Self>,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        shape: AttnShape,
        segments: Option<&[u32]>,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
    ) {
        rope_attention_backward_composed(self, q, k, v, rope, out, lse, dout, shape, segments, dq, dk, dv);
    }
    /// `out = silu(gate) * up`.
    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf, out: &mut Self::Buf);
    fn swiglu_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dout: &Self::Buf,
        dgate: &mut Self::Buf,
        dup: &mut Self::Buf,
    );
    /// Cross-entropy of `logits (m, vocab)` against `targets` (-100 = ignored). Returns the summed
    /// loss (f64) and the number of counted rows; writes `dlogits = scale · (softmax − onehot)` on
    /// counted rows and 0 elsewhere.
    fn cross_entropy(
        &self,
        logits: &Self::Buf,
        targets: &[i32],
        vocab: usize,
        scale: f32,
        dlogits: &mut Self::Buf,
    ) -> (f64, usize);

    /// The LM head's loss over one chunk of rows: `logits = x · Wᵀ` (`x (m, hidden)`, `head (vocab,
    /// hidden)`, `m = targets.len()`), [`Backend::cross_entropy`] against `targets`, and, when `dx` is
    /// given, `dx (m, hidden) = dlogits · W` (overwritten). One op so that a backend can keep the
    /// logits and their gradient in the form its products read (CUDA writes the gradient in a 16-bit
    /// head's dtype). Returns `(summed loss, counted rows)`.
    fn lm_head_cross_entropy(
        &self,
        x: &Self::Buf,
        head: &Self::Weight,
        targets: &[i32],
        scale: f32,
        dx: Option<&mut Self::Buf>,
    ) -> (f64, usize) {
        lm_head_cross_entropy_composed(self, x, head, targets, scale, dx)
    }

    // ---- optimizer -------------------------------------------------------------------------------
    /// One 32-bit AdamW update of `param` with state `m`, `v`.
    fn adamw(&self, param: &mut Self::Buf, grad: &Self::Buf, m: &mut Self::Buf, v: &mut Self::Buf, hp: &AdamWStep);
    /// [`Backend::adamw`] of every tensor of an adapter (`params[i]` with `grads[i]`, `m[i]`, `v[i]`);
    /// a backend may do them in one launch (CUDA: `adamw_many_f32`, the same arithmetic).
    fn adamw_all(
        &self,
        params: Vec<&mut Self::Buf>,
        grads: Vec<&Self::Buf>,
        m: &mut [Self::Buf],
        v: &mut [Self::Buf],
        hp: &AdamWStep,
    ) {
        for (((p, g), m), v) in params.into_iter().zip(grads).zip(m).zip(v) {
            self.adamw(p, g, m, v, hp);
        }
    }
    /// The same update with `m` and `v` in host memory, passed through the device `chunk` values at a
    /// time (a paged optimizer: its state costs no device memory beyond two chunks).
    fn adamw_paged(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        m: &mut Self::HostBuf,
        v: &mut Self::HostBuf,
        hp: &AdamWStep,
        chunk: usize,
    );
    fn host_buf(&self, data: &[f32]) -> Self::HostBuf;

    // ---- offloaded checkpoints -------------------------------------------------------------------
    /// Starts moving `buf` off the device; the copy overlaps the work queued after this call and the
    /// device memory is released once it is done (or `buf` stays where it is, when there is no
    /// host memory to take it).
    fn offload(&self, buf: Self::Buf) -> Self::Offloaded;
    /// Starts bringing an offloaded buffer back, overlapped with the work queued after this call.
    fn reload(&self, parked: Self::Offloaded) -> Self::Offloaded;
    /// The buffer on the device again, ready for the ops queued after this call (reloads it first
    /// if [`Backend::reload`] was not called).
    fn restore(&self, parked: Self::Offloaded) -> Self::Buf;
    fn host_to_vec(&self, h: &Self::HostBuf) -> Vec<f32>;
    /// Free device memory in bytes, when there is a device.
    fn free_memory(&self) -> Option<u64> {
        None
    }

    // ---- decoding: positions held on the device, recorded steps ---------------------------------
    /// Overwrites `dst[..host.len()]` with `host` (how a recorded step's inputs are refreshed).
    fn upload_into(&self, host: &[f32], dst: &mut Self::Buf) {
        self.write_range(&self.upload(host), dst, 0);
    }
    /// A one-token decoding step's inputs from device-held state, so that the step can be launched
    /// before the host knows its token: `h (hidden)` = row `token[0]` of `table (vocab, hidden)`,
    /// `cos` and `sin (head_dim/2)` = rows `pos[0]` of `cos_table` and `sin_table (positions,
    /// head_dim/2)` ([`crate::model::rope::tables`] of every position). `token` and `pos` hold
    /// integers as f32 ([`Backend::argmax_into`], [`Backend::advance_position`]).
    #[allow(clippy::too_many_arguments)]
    fn decode_inputs_at(
        &self,
        table: &Self::Weight,
        token: &Self::Buf,
        pos: &Self::Buf,
        cos_table: &Self::Buf,
        sin_table: &Self::Buf,
        h: &mut Self::Buf,
        cos: &mut Self::Buf,
        sin: &mut Self::Buf,
    ) {
        let (id, p) = (self.download(token)[0] as u32, self.download(pos)[0] as usize);
        self.embedding(table, &[id], h);
        let half = self.buf_len(cos);
        self.write_range(&self.read_range(cos_table, p * half, half), cos, 0);
        self.write_range(&self.read_range(sin_table, p * half, half), sin, 0);
    }
    /// `pos[0] += 1`: a decoding step moves its own position on, for the step queued behind it.
    fn advance_position(&self, pos: &mut Self::Buf) {
        let p = self.download(pos)[0];
        self.upload_into(&[p + 1.0], pos);
    }
    /// Starts copying `buf` to the host behind the work queued so far, without waiting for it
    /// ([`Backend::read_wait`] returns the values): greedy decoding queues the next step before it
    /// reads this one's token. The CPU backend copies at once.
    fn read_later(&self, buf: &Self::Buf) -> Self::PendingRead;
    /// The values of a [`Backend::read_later`], once the work before it has run.
    fn read_wait(&self, pending: Self::PendingRead) -> Vec<f32>;
    /// Appends `src` (whole rows of `row` values) to a KV cache at row `pos[0]`: the cache length,
    /// held in a buffer so that a recorded decoding step replays at any position.
    fn kv_write(&self, src: &Self::Buf, dst: &mut Self::Buf, pos: &Self::Buf, row: usize) {
        let p = self.download(pos)[0] as usize;
        self.write_range(src, dst, p * row);
    }
    /// Decoding after the q/k/v products: [`Backend::rope`] of `q (m, heads, head_dim)` into `q_out`,
    /// and of `k (m, kv_heads, head_dim)` appended with `v` to the KV caches at row `pos[0]`
    /// ([`Backend::kv_write`]), in one call (CUDA: one launch instead of four).
    #[allow(clippy::too_many_arguments)]
    fn rope_into_cache(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        cos: &Self::Buf,
        sin: &Self::Buf,
        (heads, kv_heads, head_dim): (usize, usize, usize),
        q_out: &mut Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        pos: &Self::Buf,
    ) {
        let mut k_rot = self.alloc_output(self.buf_len(k));
        self.rope(q, cos, sin, heads, head_dim, false, q_out);
        self.rope(k, cos, sin, kv_heads, head_dim, false, &mut k_rot);
        self.kv_write(&k_rot, k_cache, pos, kv_heads * head_dim);
        self.kv_write(v, v_cache, pos, kv_heads * head_dim);
    }
    /// Decoding's q/k/v: [`Backend::linear_many_lora`] of the three projections `ws` into `qkv` with
    /// the branches' `lora = (rank, scale)`, then [`Backend::rope_into_cache`] of them with
    /// `rope = (cos, sin)` into `q_out` and `cache = (keys, values)`, in one call (CUDA, one row of x:
    /// the LoRA B products ride in the launch that rotates and appends to the cache, so `qkv` is left
    /// without them). `qkv` is scratch: what it holds afterwards is not part of the result.
    #[allow(clippy::too_many_arguments)]
    fn qkv_into_cache(
        &self,
        x: &Self::Buf,
        ws: [&Self::Weight; 3],
        m: usize,
        qkv: [&mut Self::Buf; 3],
        loras: &mut [Option<LoraDown<'_, Self>>],
        lora: (usize, f32),
        rope: (&Self::Buf, &Self::Buf),
        dims: (usize, usize, usize),
        q_out: &mut Self::Buf,
        cache: (&mut Self::Buf, &mut Self::Buf),
        pos: &Self::Buf,
    ) {
        qkv_into_cache_composed(self, x, ws, m, qkv, loras, lora, rope, dims, q_out, cache, pos);
    }
    /// [`Backend::attention`] over a KV cache whose `q_offset` is `pos[0]` and `kv_len` is
    /// `pos[0] + q_len` (the shape's own two fields are ignored); no segments.
    #[allow(clippy::too_many_arguments)]
    fn attention_at(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        shape: AttnShape,
        pos: &Self::Buf,
        out: &mut Self::Buf,
        lse: &mut Self::Buf,
    ) {
        let p = self.download(pos)[0] as usize;
        let shape = AttnShape { q_offset: p, kv_len: p + shape.q_len, ..shape };
        self.attention(q, k, v, shape, None, out, lse);
    }
    /// Records the ops `f` issues, without running them, when this backend can replay a recording
    /// (CUDA graphs); `None`, and `f` is not called, when it cannot. Whatever `f` allocates must be
    /// dropped inside it; its inputs and outputs are buffers that outlive the recording.
    fn record(&self, _f: &mut dyn FnMut()) -> Option<Self::Recording> {
        None
    }
    /// Runs a recording once, on the buffers it was recorded with.
    fn replay(&self, _r: &Self::Recording) {}
    /// A hint, from `true` until `false`: what forward products derive from frozen weights may be
    /// kept for the input gradients that follow to reuse instead of deriving it again (CUDA: the
    /// 16-bit expansion of a 4-bit weight, which its product and its input gradient each made).
    /// Backward's replay of a checkpointed layer turns it on for the replay and off after the
    /// layer's backward, so at most one layer's expansions are held. Values are the same either way;
    /// `false` also lets go of whatever is still kept.
    fn keep_weight_expansions(&self, _on: bool) {}
}

/// The per-row RoPE tables `cos, sin (rows, head_dim/2)` of a training or evaluation pass
/// ([`Backend::rope_attention`]).
pub struct RopeTables<'a, B: Backend + ?Sized> {
    pub cos: &'a B::Buf,
    pub sin: &'a B::Buf,
}
impl<B: Backend + ?Sized> Clone for RopeTables<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend + ?Sized> Copy for RopeTables<'_, B> {}

/// `q (batch·q_len, heads, head_dim)` and `k (batch·kv_capacity, kv_heads, head_dim)` rotated into new
/// buffers; the shape must be square, so that the tables' row `t` is query row and key row `t`.
fn rotated_qk<B: Backend + ?Sized>(
    be: &B,
    q: &B::Buf,
    k: &B::Buf,
    rope: RopeTables<'_, B>,
    sh: AttnShape,
) -> (B::Buf, B::Buf) {
    assert!(sh.is_square(), "rope_attention: the shape must be square");
    let mut q_rot = be.alloc_output(be.buf_len(q));
    let mut k_rot = be.alloc_output(be.buf_len(k));
    be.rope(q, rope.cos, rope.sin, sh.heads, sh.head_dim, false, &mut q_rot);
    be.rope(k, rope.cos, rope.sin, sh.kv_heads, sh.head_dim, false, &mut k_rot);
    (q_rot, k_rot)
}

/// [`Backend::rope_attention`] as [`Backend::rope`] of q and k, then [`Backend::attention`]: the
/// trait's default and the CUDA backend's path where its flash kernels do not apply.
#[allow(clippy::too_many_arguments)]
pub fn rope_attention_composed<B: Backend + ?Sized>(
    be: &B,
    q: &B::Buf,
    k: &B::Buf,
    v: &B::Buf,
    rope: RopeTables<'_, B>,
    sh: AttnShape,
    segments: Option<&[u32]>,
    out: &mut B::Buf,
    lse: &mut B::Buf,
) {
    let (q_rot, k_rot) = rotated_qk(be, q, k, rope, sh);
    be.attention(&q_rot, &k_rot, v, sh, segments, out, lse);
}

/// [`Backend::rope_attention_backward`] as RoPE of q and k, [`Backend::attention_backward`], then
/// the inverse RoPE of their gradients.
#[allow(clippy::too_many_arguments)]
pub fn rope_attention_backward_composed<B: Backend + ?Sized>(
    be: &B,
    q: &B::Buf,
    k: &B::Buf,
    v: &B::Buf,
    rope: RopeTables<'_, B>,
    out: &B::Buf,
    lse: &B::Buf,
    dout: &B::Buf,
    sh: AttnShape,
    segments: Option<&[u32]>,
    dq: &mut B::Buf,
    dk: &mut B::Buf,
    dv: &mut B::Buf,
) {
    let (q_rot, k_rot) = rotated_qk(be, q, k, rope, sh);
    let mut dq_rot = be.alloc_output(be.buf_len(q));
    let mut dk_rot = be.alloc_output(be.buf_len(k));
    be.attention_backward(&q_rot, &k_rot, v, out, lse, dout, sh, segments, &mut dq_rot, &mut dk_rot, dv);
    be.rope(&dq_rot, rope.cos, rope.sin, sh.heads, sh.head_dim, true, dq);
    be.rope(&dk_rot, rope.cos, rope.sin, sh.kv_heads, sh.head_dim, true, dk);
}

/// [`Backend::linear_many_lora`] as [`Backend::linear_many`] then [`Backend::lora_forward_many`]: the
/// trait's default and the CUDA backend's path where its shared launch does not apply.
#[allow(clippy::too_many_arguments)]
pub fn linear_many_lora_composed<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    ws: &[&B::Weight],
    m: usize,
    outs: &mut [&mut B::Buf],
    loras: &mut [Option<LoraDown<'_, B>>],
    r: usize,
    scale: f32,
) {
    assert_eq!(outs.len(), loras.len(), "linear_many_lora: one LoRA slot per output");
    be.linear_many(x, ws, m, outs);
    lora_branches_into(be, x, outs, loras, m, r, scale);
}

/// [`Backend::qkv_into_cache`] as [`Backend::linear_many_lora`] then [`Backend::rope_into_cache`]: the
/// trait's default and the CUDA backend's path where its fused launch does not apply.
#[allow(clippy::too_many_arguments)]
pub fn qkv_into_cache_composed<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    ws: [&B::Weight; 3],
    m: usize,
    [q, k, v]: [&mut B::Buf; 3],
    loras: &mut [Option<LoraDown<'_, B>>],
    (r, scale): (usize, f32),
    (cos, sin): (&B::Buf, &B::Buf),
    dims: (usize, usize, usize),
    q_out: &mut B::Buf,
    (k_cache, v_cache): (&mut B::Buf, &mut B::Buf),
    pos: &B::Buf,
) {
    be.linear_many_lora(x, &ws, m, &mut [&mut *q, &mut *k, &mut *v], loras, r, scale);
    be.rope_into_cache(q, k, v, cos, sin, dims, q_out, k_cache, v_cache, pos);
}

/// [`Backend::add_rmsnorm_mlp_gate_up`] as [`Backend::add_rmsnorm`] into an f32 output, then
/// [`Backend::mlp_gate_up`] of it: the trait's default and CUDA's path outside its 16-bit MLP.
#[allow(clippy::too_many_arguments)]
pub fn add_rmsnorm_mlp_gate_up_composed<B: Backend + ?Sized>(
    be: &B,
    a: &B::Buf,
    b: &B::Buf,
    w: &B::Buf,
    eps: f64,
    [gate, up, down]: [&B::Weight; 3],
    m: usize,
    sum: &mut B::Buf,
    rstd: &mut B::Buf,
) -> B::MlpActs {
    let mut out = be.alloc_output(be.buf_len(a));
    be.add_rmsnorm(a, b, w, be.buf_len(w), eps, sum, &mut out, rstd);
    be.mlp_gate_up(&out, gate, up, down, m)
}

/// [`Backend::linear_add_rmsnorm_mlp_gate_up`] as [`Backend::linear`] into an f32 output, then
/// [`Backend::add_rmsnorm_mlp_gate_up`] of the residual and it: the trait's default and CUDA's path
/// where the o product or the MLP is not on its 16-bit path.
#[allow(clippy::too_many_arguments)]
pub fn linear_add_rmsnorm_mlp_gate_up_composed<B: Backend + ?Sized>(
    be: &B,
    attn: &B::Buf,
    wo: &B::Weight,
    res: &B::Buf,
    w: &B::Buf,
    eps: f64,
    mlp: [&B::Weight; 3],
    m: usize,
    sum: &mut B::Buf,
    rstd: &mut B::Buf,
) -> B::MlpActs {
    let mut o = be.alloc_output(m * be.weight_shape(wo).0);
    be.linear(attn, wo, m, &mut o);
    be.add_rmsnorm_mlp_gate_up(res, &o, w, eps, mlp, m, sum, rstd)
}

/// [`Backend::linears_backward_input`] as one [`Backend::linear_lora_backward`] (or
/// [`Backend::linear_backward_input`]) per part, in order, the first written over `dx` unless
/// `accumulate`: the default, and the reference a fused backend is compared with.
#[allow(clippy::too_many_arguments)]
pub fn linears_backward_input_composed<B: Backend + ?Sized>(
    be: &B,
    parts: Vec<LinearGradPart<'_, B>>,
    m: usize,
    dx: &mut B::Buf,
    accumulate: bool,
    r: usize,
    scale: f32,
) {
    for (k, p) in parts.into_iter().enumerate() {
        let acc = accumulate || k > 0;
        match p.lora {
            None => be.linear_backward_input(p.dy, p.w, m, dx, acc),
            Some(l) => be.linear_lora_backward(p.dy, p.w, m, dx, acc, l, r, scale),
        }
    }
}

/// [`Backend::qkv_attn_acts`] as [`Backend::linear_many_lora`] into f32 outputs, then
/// [`Backend::attn_acts`]: the trait's default and the CUDA backend's path where its direct one does
/// not apply.
#[allow(clippy::too_many_arguments)]
pub fn qkv_attn_acts_composed<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    ws: &[&B::Weight],
    m: usize,
    loras: &mut [Option<LoraDown<'_, B>>],
    r: usize,
    scale: f32,
    rope: RopeTables<'_, B>,
    shape: AttnShape,
) -> B::AttnActs {
    let [wq, wk, wv] = ws else { panic!("qkv_attn_acts: three weights, q, k and v") };
    let [mut q, mut k, mut v] = [wq, wk, wv].map(|w| be.alloc_output(m * be.weight_shape(w).0));
    be.linear_many_lora(x, ws, m, &mut [&mut q, &mut k, &mut v], loras, r, scale);
    be.attn_acts(q, k, v, rope, shape)
}

/// Each of `branches` on its own: [`Backend::lora_forward`], or only [`Backend::lora_b_forward`] where
/// its `u` is ready (the trait's default of [`Backend::lora_forward_many`], and CUDA's past a few rows).
pub fn lora_forward_each<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    branches: &mut [LoraBranch<'_, B>],
    m: usize,
    r: usize,
    scale: f32,
) {
    for br in branches.iter_mut() {
        if br.u_ready {
            be.lora_b_forward(br.u, br.b, m, r, scale, br.y);
        } else {
            be.lora_forward(x, br.a, br.b, m, r, scale, br.dropout, br.u, br.y);
        }
    }
}

/// The LoRA branches in `loras` (the empty slots skipped) added into their projections' outputs by
/// the backend's [`Backend::lora_forward_many`].
pub fn lora_branches_into<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    outs: &mut [&mut B::Buf],
    loras: &mut [Option<LoraDown<'_, B>>],
    m: usize,
    r: usize,
    scale: f32,
) {
    let mut branches: Vec<LoraBranch<'_, B>> = outs
        .iter_mut()
        .zip(loras.iter_mut())
        .filter_map(|(y, l)| {
            let l = l.as_mut()?;
            Some(LoraBranch { a: l.a, b: l.b, dropout: l.dropout, u: &mut *l.u, u_ready: l.u_ready, y: &mut **y })
        })
        .collect();
    if !branches.is_empty() {
        be.lora_forward_many(x, &mut branches, m, r, scale);
    }
}

/// [`Backend::mlp_gate_up`] as f32 buffers: `linear_many` (the CPU's, and a backend's fallback).
pub fn mlp_gate_up_composed<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    gate: &B::Weight,
    up: &B::Weight,
    m: usize,
) -> (B::Buf, B::Buf) {
    let ffn = be.weight_shape(gate).0;
    let (mut g, mut u) = (be.alloc_output(m * ffn), be.alloc_output(m * ffn));
    be.linear_many(x, &[gate, up], m, &mut [&mut g, &mut u]);
    (g, u)
}

/// [`Backend::linear_lora_add_rmsnorm`] as its two calls: `linear_many_lora` into f32, then
/// `add_rmsnorm` (the CPU's, and a backend's fallback).
#[allow(clippy::too_many_arguments)]
pub fn linear_lora_add_rmsnorm_composed<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    w: &B::Weight,
    m: usize,
    lora: &mut [Option<LoraDown<'_, B>>],
    (r, scale): (usize, f32),
    (res, norm_w, eps): (&B::Buf, &B::Buf, f64),
    sum: &mut B::Buf,
    out: &mut B::Buf,
    rstd: &mut B::Buf,
) {
    let mut o = be.alloc_output(m * be.weight_shape(w).0);
    be.linear_many_lora(x, &[w], m, &mut [&mut o], lora, r, scale);
    be.add_rmsnorm(res, &o, norm_w, be.buf_len(norm_w), eps, sum, out, rstd);
}

/// [`Backend::linear_lora_add_into`] as `linear_many_lora` into f32, then `add_assign` (the CPU's, and a
/// backend's fallback).
#[allow(clippy::too_many_arguments)]
pub fn linear_lora_add_into_composed<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    w: &B::Weight,
    m: usize,
    lora: &mut [Option<LoraDown<'_, B>>],
    r: usize,
    scale: f32,
    out: &mut B::Buf,
) {
    let mut o = be.alloc_output(m * be.weight_shape(w).0);
    be.linear_many_lora(x, &[w], m, &mut [&mut o], lora, r, scale);
    be.add_assign(out, &o);
}

/// [`Backend::mlp_gate_up_lora`] as f32 buffers: `linear_many_lora` (the CPU's, and a backend's
/// fallback).
#[allow(clippy::too_many_arguments)]
pub fn mlp_gate_up_lora_composed<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    [gate, up]: [&B::Weight; 2],
    m: usize,
    loras: &mut [Option<LoraDown<'_, B>>],
    r: usize,
    scale: f32,
) -> B::MlpActs {
    let ffn = be.weight_shape(gate).0;
    let (mut g, mut u) = (be.alloc_output(m * ffn), be.alloc_output(m * ffn));
    be.linear_many_lora(x, &[gate, up], m, &mut [&mut g, &mut u], loras, r, scale);
    be.mlp_acts_from_f32(g, u)
}

/// [`Backend::mlp_down`] from f32 products: `swiglu`, `linear` and `add_assign` (the CPU's, and a
/// backend's fallback).
pub fn mlp_down_composed<B: Backend + ?Sized>(
    be: &B,
    (g, u): (&B::Buf, &B::Buf),
    down: &B::Weight,
    m: usize,
    out: &mut B::Buf,
    accumulate: bool,
) {
    let mut s = be.alloc_output(be.buf_len(g));
    be.swiglu(g, u, &mut s);
    if accumulate {
        let mut d = be.alloc_output(be.buf_len(out));
        be.linear(&s, down, m, &mut d);
        be.add_assign(out, &d);
    } else {
        be.linear(&s, down, m, out);
    }
}

/// [`Backend::mlp_backward`] from f32 products: `linear_backward_input` and `swiglu_backward` (the
/// CPU's, and a backend's fallback).
#[allow(clippy::too_many_arguments)]
pub fn mlp_backward_composed<B: Backend + ?Sized>(
    be: &B,
    dy: &B::Buf,
    (g, u): (&B::Buf, &B::Buf),
    gate: &B::Weight,
    up: &B::Weight,
    down: &B::Weight,
    m: usize,
    dx: &mut B::Buf,
    accumulate: bool,
) {
    let ffn = be.weight_shape(gate).0;
    let mut ds = be.alloc_output(m * ffn);
    be.linear_backward_input(dy, down, m, &mut ds, false);
    let (mut dg, mut du) = (be.alloc_output(m * ffn), be.alloc_output(m * ffn));
    be.swiglu_backward(g, u, &ds, &mut dg, &mut du);
    drop(ds);
    be.linear_backward_input(&du, up, m, dx, accumulate);
    be.linear_backward_input(&dg, gate, m, dx, true);
}

/// [`Backend::linear_swiglu`] from the backend's `linear_many` and `swiglu` (its default, and a
/// backend's fallback).
pub fn linear_swiglu_composed<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    gate: &B::Weight,
    up: &B::Weight,
    m: usize,
    out: &mut B::Buf,
) {
    let rows = be.weight_shape(gate).0;
    let (mut g, mut u) = (be.alloc_output(m * rows), be.alloc_output(m * rows));
    be.linear_many(x, &[gate, up], m, &mut [&mut g, &mut u]);
    be.swiglu(&g, &u, out);
}

/// [`Backend::lm_head_cross_entropy`] from the backend's `linear`, `cross_entropy` and
/// `linear_backward_input` (its default, and a backend's fallback).
pub fn lm_head_cross_entropy_composed<B: Backend + ?Sized>(
    be: &B,
    x: &B::Buf,
    head: &B::Weight,
    targets: &[i32],
    scale: f32,
    dx: Option<&mut B::Buf>,
) -> (f64, usize) {
    let (vocab, _) = be.weight_shape(head);
    let m = targets.len();
    let mut logits = be.alloc_output(m * vocab);
    be.linear(x, head, m, &mut logits);
    let mut dlogits = be.alloc_output(m * vocab);
    let result = be.cross_entropy(&logits, targets, vocab, scale, &mut dlogits);
    drop(logits);
    if let Some(dx) = dx {
        be.linear_backward_input(&dlogits, head, m, dx, false);
    }
    result
}

/// The token id that marks a position ignored by the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

#[cfg(test)]
mod tests {
    use super::Dropout;

    #[test]
    fn dropout_keeps_the_right_fraction_and_depends_on_every_seed_bit_range() {
        let d = Dropout { p: 0.1, seed: 7 };
        let n = 1 << 20;
        let kept = (0..n).filter(|&i| d.factor(i) != 0.0).count() as f64 / n as f64;
        // 1M Bernoulli(0.9) draws: standard deviation 3e-4, so 0.003 is 10 sigma.
        assert!((kept - 0.9).abs() < 3e-3, "kept {kept}");
        assert!((0..n).all(|i| [0.0, 1.0 / 0.9].contains(&d.factor(i))));
        // Layers differ in the seed's high half, projections in its low half (model/llama.rs):
        // each must give a different mask, and so must elements past 2³³ (pairs past 2³²).
        let differs =
            |a: Dropout, b: Dropout, off: u64| (0..4096).filter(|&i| a.factor(i) != b.factor(i + off)).count();
        assert!(differs(d, Dropout { seed: 7 ^ (1 << 32), ..d }, 0) > 400);
        assert!(differs(d, Dropout { seed: 7 ^ (1 << 8), ..d }, 0) > 400);
        assert!(differs(d, d, 1 << 33) > 400);
        assert!((0..4096).all(|i| Dropout { p: 0.0, seed: 7 }.factor(i) == 1.0));
    }

    /// Neighbours share a hash (16 bits each): each half on its own keeps 1-p, and the two decisions
    /// of a pair are independent (both dropped about p² of the time, not p).
    #[test]
    fn dropout_pairs_sharing_a_hash_decide_independently() {
        let d = Dropout { p: 0.1, seed: 11 };
        let pairs = 1u64 << 19;
        let dropped = |i: u64| d.factor(i) == 0.0;
        for parity in [0, 1] {
            let kept = (0..pairs).filter(|&i| !dropped(2 * i + parity)).count() as f64 / pairs as f64;
            // 512k Bernoulli(0.9) draws: standard deviation 4.2e-4; 4e-3 is ~10 sigma.
            assert!((kept - 0.9).abs() < 4e-3, "parity {parity}: kept {kept}");
        }
        let both = (0..pairs).filter(|&i| dropped(2 * i) && dropped(2 * i + 1)).count() as f64 / pairs as f64;
        // p² = 0.01, standard deviation 1.4e-4.
        assert!((both - 0.01).abs() < 1.5e-3, "both dropped {both}");
    }
}
