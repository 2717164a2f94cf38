//! Launchers of kernels/xent.cu: cross-entropy loss and gradient in one launch, rows of logits held in
//! registers, streamed by persistent blocks where the device's shared memory allows; rows of larger
//! vocabularies (Llama-3's 128,256) read twice, the second time from L2. CPU reference:
//! `Cpu::cross_entropy`.

use super::gemm::{Gemm, Operand, OperandView};
use super::{Cuda, CudaWeight};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::{bf16, f16};

/// The register-resident cross-entropy kernels of kernels/xent.cu: a block of
/// [`XENT_REG_THREADS`] holds a row of up to that many × [`XENT_REG_VALUES`] logits.
pub(super) const XENT_REG: [&str; 3] = ["cross_entropy_reg8", "cross_entropy_reg16", "cross_entropy_reg32"];

pub(super) const XENT_REG_VALUES: [usize; 3] = [8, 16, 32];

pub(super) const XENT_REG_THREADS: usize = 1024;

/// The persistent-block variants of [`XENT_REG`] (the next row streamed into shared memory), by the
/// dtype of the logits they read and the gradient they write (f32, bf16, f16), then values per thread.
pub(super) const XENT_STREAM: [[&str; 3]; 3] = [
    ["cross_entropy_stream8", "cross_entropy_stream16", "cross_entropy_stream32"],
    ["cross_entropy_stream8_bf16", "cross_entropy_stream16_bf16", "cross_entropy_stream32_bf16"],
    ["cross_entropy_stream8_f16", "cross_entropy_stream16_f16", "cross_entropy_stream32_f16"],
];

/// The two-pass kernels (vocabularies that are a multiple of 4 and no streaming kernel takes), by the
/// dtype of the logits they read and the gradient they write (f32, bf16, f16).
pub(super) const XENT_TWO_PASS: [&str; 3] =
    ["cross_entropy_two_pass_f32", "cross_entropy_two_pass_bf16", "cross_entropy_two_pass_f16"];

/// Threads of a two-pass block, and how many such blocks share an SM (kernels/xent.cu
/// `XENT2_THREADS`, `XENT2_BLOCKS`).
const XENT2_THREADS: usize = 512;
const XENT2_BLOCKS: usize = 3;

/// The logits a cross-entropy launch reads and the gradient it writes, in one dtype: f32, or a 16-bit
/// LM head's (the streaming and two-pass kernels only).
pub(super) enum XentIo<'a> {
    F32(&'a CudaSlice<f32>, &'a mut CudaSlice<f32>),
    BF16(&'a CudaSlice<bf16>, &'a mut CudaSlice<bf16>),
    F16(&'a CudaSlice<f16>, &'a mut CudaSlice<f16>),
}

/// The index into [`XENT_REG`] (and [`XENT_STREAM`]) whose kernels hold a row of `vocab` logits in
/// registers: the fewest values per thread that cover it, if any does.
pub(super) fn xent_reg_index(vocab: usize) -> Option<usize> {
    XENT_REG_VALUES.iter().position(|&v| vocab <= XENT_REG_THREADS * v)
}

/// Dynamic shared memory of `XENT_STREAM[i]`: one row of its largest vocabulary in f32.
pub(super) fn xent_stream_smem(i: usize) -> usize {
    XENT_REG_THREADS * XENT_REG_VALUES[i] * 4
}

impl Cuda {
    /// The index into [`XENT_STREAM`]'s kernels that takes a row of `vocab` logits, when one does
    /// (the row fits 1024 threads × 8, 16 or 32 values, whole 16-byte copies of 16-bit logits, the
    /// device's shared memory). The same for every dtype, so that 16-bit logits and their f32
    /// widening go through the same kernel family (the GPU tests compare them bit for bit).
    fn xent_stream_index(&self, vocab: usize) -> Option<usize> {
        let i = xent_reg_index(vocab)?;
        (self.xent_stream[i] && vocab % 8 == 0).then_some(i)
    }

    /// Whether the two-pass kernels take rows of `vocab` logits: those no streaming kernel takes,
    /// whose rows are whole 8-byte (16-bit) or 16-byte (f32) groups of four.
    fn xent_two_pass_takes(&self, vocab: usize) -> bool {
        self.xent_two_pass && vocab % 4 == 0 && self.xent_stream_index(vocab).is_none()
    }

    /// Whether a kernel takes 16-bit logits in rows of `vocab` (the gradient in the same dtype).
    pub(super) fn xent_takes_16_bit(&self, vocab: usize) -> bool {
        self.xent_stream_index(vocab).is_some() || self.xent_two_pass_takes(vocab)
    }

    /// The two-pass kernels' persistent blocks for `rows` rows of `row_bytes` each: up to
    /// `XENT2_BLOCKS` per SM, fewer where the rows in flight (one per block) would pass half the L2
    /// (pass 2 reads each row again from there), but at least one per SM.
    fn xent_two_pass_grid(&self, rows: usize, row_bytes: usize) -> usize {
        let fits_l2 = self.l2_bytes / 2 / row_bytes.max(1);
        fits_l2.clamp(self.sm_count, self.sm_count * XENT2_BLOCKS).min(rows).max(1)
    }

    /// Loss and gradient of the logits `(m, vocab)` in `io` against `targets`
    /// (Backend::cross_entropy), the gradient in the logits' dtype; 16-bit logits need a kernel that
    /// takes them ([`Cuda::xent_takes_16_bit`]).
    pub(super) fn xent(&self, io: XentIo<'_>, targets: &[i32], vocab: usize, scale: f32) -> (f64, usize) {
        let _span = self.span("cross_entropy");
        let m = targets.len();
        let t = ck!(self.stream.clone_htod(targets), "upload targets");
        // [summed loss, counted rows (+2^30 per target id past the vocabulary)]: one download.
        let mut sums = ck!(self.stream.alloc_zeros::<f64>(2), "alloc");
        // The row in registers (one read of the logits) when the vocabulary fits 1024 threads × 8, 16
        // or 32 values: streamed through persistent blocks where 16-byte copies of 16-bit logits and
        // the shared memory allow; else two passes over the row where it is whole groups of four;
        // else (f32 only) a block per row in registers, or three passes over the row.
        let (vocab32, rows) = (vocab as i32, m as i32);
        // The persistent kernels (by dtype: f32, bf16, f16) and their launch, where one takes the rows.
        let persistent = if let Some(i) = self.xent_stream_index(vocab) {
            let cfg = LaunchConfig {
                grid_dim: (m.min(self.sm_count).max(1) as u32, 1, 1),
                block_dim: (XENT_REG_THREADS as u32, 1, 1),
                shared_mem_bytes: xent_stream_smem(i) as u32,
            };
            Some((XENT_STREAM.map(|of_dtype| of_dtype[i]), cfg))
        } else if self.xent_two_pass_takes(vocab) {
            let row_bytes = vocab * if matches!(io, XentIo::F32(..)) { 4 } else { 2 };
            let cfg = LaunchConfig {
                grid_dim: (self.xent_two_pass_grid(m, row_bytes) as u32, 1, 1),
                block_dim: (XENT2_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            Some((XENT_TWO_PASS, cfg))
        } else {
            None
        };
        match (persistent, io) {
            (Some((kernels, cfg)), io) => match io {
                XentIo::F32(l, d) => launch!(self, kernels[0], cfg; l, &t, &mut *d, &mut sums, &rows, &vocab32, &scale),
                XentIo::BF16(l, d) => {
                    launch!(self, kernels[1], cfg; l, &t, &mut *d, &mut sums, &rows, &vocab32, &scale)
                }
                XentIo::F16(l, d) => launch!(self, kernels[2], cfg; l, &t, &mut *d, &mut sums, &rows, &vocab32, &scale),
            },
            (None, XentIo::F32(logits, dlogits)) => {
                let (kernel, threads) = match xent_reg_index(vocab) {
                    Some(i) => (XENT_REG[i], XENT_REG_THREADS),
                    None => ("cross_entropy_f32", 256),
                };
                let block_dim = (threads as u32, 1, 1);
                let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim, shared_mem_bytes: 0 };
                launch!(self, kernel, cfg; logits, &t, &mut *dlogits, &mut sums, &vocab32, &scale);
            }
            (None, _) => unreachable!("16-bit logits need a streaming or two-pass cross-entropy kernel"),
        }
        let [loss, rows] = ck!(self.stream.clone_dtoh(&sums), "download")[..] else { unreachable!("two sums") };
        assert!(rows < (1u64 << 30) as f64, "a target id is >= vocab {vocab}");
        (loss, rows as usize)
    }

    /// [`Backend::cross_entropy`](crate::backend::Backend::cross_entropy) of bf16 logits with the gradient in bf16
    /// (what [`Backend::lm_head_cross_entropy`](crate::backend::Backend::lm_head_cross_entropy) runs for a bf16 head),
    /// for benchmarks and tests; `None` when no kernel takes rows of `vocab` 16-bit logits.
    pub fn cross_entropy_bf16(
        &self,
        logits: &CudaSlice<bf16>,
        targets: &[i32],
        vocab: usize,
        scale: f32,
        dlogits: &mut CudaSlice<bf16>,
    ) -> Option<(f64, usize)> {
        if !self.xent_takes_16_bit(vocab) {
            return None;
        }
        Some(self.xent(XentIo::BF16(logits, dlogits), targets, vocab, scale))
    }

    /// [`Backend::lm_head_cross_entropy`](crate::backend::Backend::lm_head_cross_entropy) for a 16-bit dense head whose
    /// vocabulary a kernel takes in 16 bits: logits and dlogits in the head's dtype.
    pub(super) fn lm_head_cross_entropy_16(
        &self,
        x: &CudaSlice<f32>,
        head: &CudaWeight,
        targets: &[i32],
        scale: f32,
        dx: Option<&mut CudaSlice<f32>>,
    ) -> (f64, usize) {
        let (vocab, hidden) = head.shape();
        let m = targets.len();
        let _span = self.span("lm_head_cross_entropy");
        assert!(x.len() == m * hidden, "lm_head_cross_entropy: bad shapes");
        assert!(dx.as_ref().is_none_or(|dx| dx.len() == m * hidden), "lm_head_cross_entropy: bad shapes");
        let (wop, c) = self.weight_operand(head);
        let x16 = self.convert(x, c).expect("a 16-bit head takes 16-bit activations");
        // logits (m, vocab) = x (m, hidden) · Wᵀ, in the head's dtype
        let logits = Gemm::forward(m, vocab, hidden, OperandView::from(&x16), wop.as_ref());
        let logits = self.gemm_16(&logits, c, "LM head GEMM");
        drop(x16);
        // SAFETY: the loss kernel writes every gradient value before anything reads it.
        let (result, dlogits) = match &logits {
            Operand::BF16(l16) => {
                let mut d = ck!(unsafe { self.stream.alloc::<bf16>(m * vocab) }, "alloc");
                (self.xent(XentIo::BF16(l16, &mut d), targets, vocab, scale), Operand::BF16(d))
            }
            Operand::F16(l16) => {
                let mut d = ck!(unsafe { self.stream.alloc::<f16>(m * vocab) }, "alloc");
                (self.xent(XentIo::F16(l16, &mut d), targets, vocab, scale), Operand::F16(d))
            }
            Operand::F32(_) => unreachable!("a 16-bit head"),
        };
        drop(logits);
        if let Some(dx) = dx {
            // dx (m, hidden) = dlogits (m, vocab) · W (vocab, hidden)
            let product = Gemm::input_grad(m, hidden, vocab, OperandView::from(&dlogits), wop.as_ref());
            self.gemm_rounded(head, product, dx, false, None, "LM head backward GEMM");
        }
        result
    }
}
