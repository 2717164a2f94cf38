//! Launchers of kernels/nf4.cu and kernels/nf4_gemm.cu: 4-bit weights dequantized for cuBLAS, the
//! decoding GEMVs that read the codes directly (one or several weights sharing x, SwiGLU, LoRA A
//! products), and the fused dequant-matmul on the tensor cores. CPU reference: `Cpu::linear` over
//! quant.rs.

use super::attention::warp_grid;
use super::gemm::Operand;
use super::lora::LORA_MAX_TARGETS;
use super::{grid_for, push_opt, Cuda, CudaWeight, DeviceAbsmax, NULL_PTR};
use crate::backend::LoraDown;
use crate::config::{ComputeDtype, QuantType};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

/// Rows of `x` up to which a 4-bit linear reads the codes directly (kernels/nf4.cu, gemv_4bit_*).
pub(super) const GEMV_MAX_M: usize = 8;

/// Output rows each warp of the row-blocked GEMV computes, and its block size (kernels/nf4.cu,
/// GEMV_ROWS, GEMV_THREADS).
pub(super) const GEMV_ROWS_PER_WARP: usize = 4;

pub(super) const GEMV_THREADS: usize = 256;

/// The row-blocked GEMV kernels of kernels/nf4.cu, indexed by compute dtype (f32, f16, bf16): one row
/// of x staged in shared memory, 4 then 2 output rows per warp, then 2 rows per warp for launches of
/// at most two blocks per SM (up to 128 registers); and up to 8 rows of x read through L1.
pub(super) const GEMV_ONE_ROW: [&str; 9] = [
    "gemv_4bit_rows_f32_m1",
    "gemv_4bit_rows_f16_m1",
    "gemv_4bit_rows_bf16_m1",
    "gemv_4bit_rows_f32_m1_r2",
    "gemv_4bit_rows_f16_m1_r2",
    "gemv_4bit_rows_bf16_m1_r2",
    "gemv_4bit_rows_f32_m1_r2_two_per_sm",
    "gemv_4bit_rows_f16_m1_r2_two_per_sm",
    "gemv_4bit_rows_bf16_m1_r2_two_per_sm",
];

/// The one-row GEMVs for matrices of few rows (kernels/nf4.cu `gemv_4bit_rows_*_m1_split`), indexed by
/// compute dtype: four rows per warp, each row's columns split between two warps, 16 rows per block.
pub(super) const GEMV_SPLIT: [&str; 3] =
    ["gemv_4bit_rows_f32_m1_split", "gemv_4bit_rows_f16_m1_split", "gemv_4bit_rows_bf16_m1_split"];

/// Output rows per block of [`GEMV_SPLIT`]'s kernels.
const GEMV_SPLIT_ROWS_PER_BLOCK: usize = 16;

pub(super) const GEMV_FEW_ROWS: [&str; 3] =
    ["gemv_4bit_rows_f32_m8", "gemv_4bit_rows_f16_m8", "gemv_4bit_rows_bf16_m8"];

/// The one-row GEMV over several weights in one launch (kernels/nf4.cu `gemv_4bit_many_*`), indexed by
/// compute dtype, 4 then 2 output rows per warp.
pub(super) const GEMV_MANY: [&str; 6] = [
    "gemv_4bit_many_f32",
    "gemv_4bit_many_f16",
    "gemv_4bit_many_bf16",
    "gemv_4bit_many_f32_r2",
    "gemv_4bit_many_f16_r2",
    "gemv_4bit_many_bf16_r2",
];

/// The same with the LoRA branches' A products in blocks after the weights' (kernels/nf4.cu `gemv_4bit_many_lora_*`,
/// [`Backend::linear_many_lora`](crate::backend::Backend::linear_many_lora)), indexed as [`GEMV_MANY`].
pub(super) const GEMV_MANY_LORA: [&str; 6] = [
    "gemv_4bit_many_lora_f32",
    "gemv_4bit_many_lora_f16",
    "gemv_4bit_many_lora_bf16",
    "gemv_4bit_many_lora_f32_r2",
    "gemv_4bit_many_lora_f16_r2",
    "gemv_4bit_many_lora_bf16_r2",
];

/// The fused SwiGLU GEMV of decoding (kernels/nf4.cu `gemv_4bit_swiglu_*`), indexed by compute dtype.
pub(super) const GEMV_SWIGLU: [&str; 3] = ["gemv_4bit_swiglu_f32", "gemv_4bit_swiglu_f16", "gemv_4bit_swiglu_bf16"];

/// A 4-bit weight's codes and absmax as device addresses: kernels/nf4.cu `Codes4`, field for field
/// (the up weight of a `gemv_4bit_swiglu_*` launch, each weight of a `gemv_4bit_many_*` one).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct Codes4 {
    pub(super) packed: u64,
    pub(super) absmax: u64,
    pub(super) absmax_q: u64,
    pub(super) absmax2: u64,
    pub(super) offset: f32,
}

// SAFETY: plain old data with the layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for Codes4 {}

/// At most this many weights per `gemv_4bit_many_*` launch (kernels/nf4.cu GEMV_MAX_TARGETS).
pub(super) const GEMV_MAX_TARGETS: usize = 3;

/// Blocks of the one-row GEMV kernels that share an SM (their `__launch_bounds__` minimum).
pub(super) const GEMV_BLOCKS_PER_SM: usize = 3;

/// One weight of a `gemv_4bit_many_*` launch: kernels/nf4.cu `GemvTarget`, field for field (device
/// addresses as u64, the same C layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct GemvTarget {
    pub(super) w: Codes4,
    pub(super) y: u64,
    pub(super) rows: i32,
    pub(super) first_block: i32,
}

/// kernels/nf4.cu `GemvTargets`, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct GemvTargets {
    pub(super) t: [GemvTarget; GEMV_MAX_TARGETS],
    pub(super) count: i32,
}

// SAFETY: plain old data with the layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for GemvTargets {}

/// Shared memory the one-row GEMV kernels may take for x (set as their limit when the module loads).
pub(super) const GEMV_MAX_X_SMEM: usize = 160 * 1024;

/// Bytes of shared memory a one-row GEMV stages x in (kernels/nf4.cu `gemv_rows`): `cols` floats and
/// 16 bytes of padding per 32-column chunk.
pub(super) fn gemv_x_smem(cols: usize) -> usize {
    (cols + cols / 32 * 4) * 4
}

/// The fused 4-bit kernels (kernels/nf4_gemm.cu), index 4·tile + 2·input-grad + bf16, tile as in
/// [`GEMM_4BIT_TILES`].
pub(super) const GEMM_4BIT: [&str; 8] = [
    "gemm_4bit_fwd_f16_t128",
    "gemm_4bit_fwd_bf16_t128",
    "gemm_4bit_dgrad_f16_t128",
    "gemm_4bit_dgrad_bf16_t128",
    "gemm_4bit_fwd_f16_t256",
    "gemm_4bit_fwd_bf16_t256",
    "gemm_4bit_dgrad_f16_t256",
    "gemm_4bit_dgrad_bf16_t256",
];

/// When 4-bit products take the fused kernel (kernels/nf4_gemm.cu) rather than dequantize + cuBLAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fused4bit {
    Off,
    /// Up to [`FUSED_4BIT_MAX_M`] rows (the default).
    Auto,
    Always,
}

/// Rows up to which the fused 4-bit kernel beats dequantize + cuBLAS (H200, 4096×4096, 2026-11-28;
/// the second path dequantizes all of W whatever m). Measured in docs/PERF.md.
pub const FUSED_4BIT_MAX_M: usize = 512;

/// W rows (forward) or W columns (input grad) per block of the fused 4-bit kernel (BM in
/// kernels/nf4_gemm.cu: 64 per warpgroup).
pub(super) const GEMM_4BIT_W_TILE: usize = 128;

/// One token-tile width of the fused 4-bit kernel (`Cfg<BT>` in kernels/nf4_gemm.cu).
pub(super) struct Gemm4bitTile {
    /// Tokens per block (the wgmma N), times [`GEMM_4BIT_W_TILE`] W rows or columns.
    pub(super) tokens: usize,
    /// Dynamic shared memory: `stages` × (token tile `tokens` × 64 16-bit values + 6 KiB of codes +
    /// 2 KiB of scale words), plus 1 KiB to align them.
    pub(super) smem: usize,
    /// Blocks per SM its registers and shared memory allow.
    pub(super) blocks_per_sm: usize,
}

pub(super) const fn gemm_4bit_tile(tokens: usize, stages: usize, blocks_per_sm: usize) -> Gemm4bitTile {
    Gemm4bitTile { tokens, smem: stages * (tokens * 64 * 2 + 6144 + 2048) + 1024, blocks_per_sm }
}

/// 128 tokens for products of up to 128 rows (less padding; two blocks per SM), 256 above (each
/// dequantized fragment serves twice the tokens).
pub(super) const GEMM_4BIT_TILES: [Gemm4bitTile; 2] = [gemm_4bit_tile(128, 4, 2), gemm_4bit_tile(256, 5, 1)];

/// Whether 4-bit absmax blocks of `blocksize` values suit the kernels that apply one scale per
/// 32-value code chunk and find its block by a shift (the row GEMVs and the fused matmul): a power of
/// two ≥ 32.
pub(super) fn scale_per_32_values(blocksize: usize) -> bool {
    blocksize >= 32 && blocksize.is_power_of_two()
}

/// Whether the row GEMVs' 32-bit code-chunk indices (16 bytes each, kernels/nf4.cu's gemv_rows) reach
/// every chunk of a `rows` × `cols` weight: fewer than 2³¹ chunks, 68 billion weights.
pub(super) fn gemv_chunks_fit_u32(rows: usize, cols: usize) -> bool {
    (rows as u64) * (cols as u64 / 32) < 1 << 31
}

/// A compute dtype as the kernels' `compute` argument takes it (round_to in kernels/quant4.cuh).
pub(super) fn dtype_code(c: ComputeDtype) -> i32 {
    match c {
        ComputeDtype::F32 => 0,
        ComputeDtype::F16 => 1,
        ComputeDtype::BF16 => 2,
    }
}

impl Cuda {
    /// When 4-bit products take the fused kernel (kernels/nf4_gemm.cu) instead of the second path
    /// (dequantize + cuBLAS). It stays off on devices without wgmma.
    pub fn set_fused_4bit(&self, mode: Fused4bit) {
        let mode = if self.wgmma { mode } else { Fused4bit::Off };
        self.fused_4bit.store(mode as u8, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a product of `m` rows with `w` takes the fused 4-bit kernel: a 4-bit weight with
    /// 16-bit compute, both of its sizes multiples of 64 (the reduction steps), absmax blocks of a
    /// power of two ≥ 32 values (each 32-value code group has one scale) and fewer than 2³¹ values
    /// (the kernel's block arithmetic is 32-bit); in auto mode only up to [`FUSED_4BIT_MAX_M`] rows,
    /// where it beats the second path; never in precise mode ([`Cuda::set_precise`]).
    pub fn uses_fused_4bit(&self, w: &CudaWeight, m: usize) -> bool {
        let mode = self.fused_4bit.load(std::sync::atomic::Ordering::Relaxed);
        let on = !self.is_precise()
            && (mode == Fused4bit::Always as u8 || (mode == Fused4bit::Auto as u8 && m <= FUSED_4BIT_MAX_M));
        matches!(w, CudaWeight::Quant4 { rows, cols, blocksize, compute, .. }
            if on && *compute != ComputeDtype::F32 && rows % 64 == 0 && cols % 64 == 0
                && scale_per_32_values(*blocksize) && rows * cols < 1 << 31)
    }

    /// Expands a 4-bit weight into a fresh buffer of dtype `compute` (`code · absmax` in f32, rounded
    /// to nearest even: `Quant4::dequantize`'s values rounded to the dtype).
    pub fn dequantize(&self, w: &CudaWeight, compute: ComputeDtype) -> Operand {
        let CudaWeight::Quant4 { rows, cols, quant_type, blocksize, packed, absmax, .. } = w else {
            unreachable!("dequantize takes 4-bit weights")
        };
        let _span = self.span("expand 4-bit weight");
        let n = rows * cols;
        // Whole segments of 1,024 values, a warp each (dequant_4bit_seg_*), when the sizes allow it;
        // else 16 bytes of codes (32 values in one absmax block) per thread; else a byte per thread.
        let seg = self.dequant_seg.load(std::sync::atomic::Ordering::Relaxed)
            && n % 1024 == 0
            && blocksize.is_power_of_two()
            && *blocksize >= 8;
        let vec = n % 32 == 0 && blocksize % 32 == 0;
        let (kernel, cfg) = match (seg, vec) {
            (true, _) => ("dequant_4bit_seg", grid_for(n / 32)),
            (false, true) => ("dequant_4bit_vec", grid_for(n / 32)),
            (false, false) => ("dequant_4bit", grid_for(n.div_ceil(2))),
        };
        // The segment kernel takes log2(blocksize), the others the block size.
        let bs = if seg { blocksize.trailing_zeros() as i32 } else { *blocksize as i32 };
        let n64 = n as i64;
        macro_rules! launch {
            ($dtype:expr, $out:expr) => {{
                let name = format!("{kernel}_{}", $dtype);
                let mut b = self.stream.launch_builder(self.f(&name));
                self.push_4bit(&mut b, packed, absmax, *quant_type);
                b.arg(&bs).arg(&n64).arg($out);
                // SAFETY: the kernel reads `packed`/`absmax` within n and writes `out[..n]`.
                ck!(unsafe { b.launch(cfg) }, name);
            }};
        }
        // Outputs from `scratch` / `alloc_16`: poisoned under `LLAMATUNE_POISON=1`, so a segment the
        // kernel misses shows up in the tests.
        let mut out = match compute {
            ComputeDtype::F32 => Operand::F32(self.scratch(n)),
            c => self.alloc_16(n, c),
        };
        match &mut out {
            Operand::F32(o) => launch!("f32", o),
            Operand::F16(o) => launch!("f16", o),
            Operand::BF16(o) => launch!("bf16", o),
        }
        out
    }

    /// A 4-bit weight `(rows, cols)` expanded into the first `cols` columns of a `(rows, ld)` matrix in
    /// its 16-bit compute dtype (`dequant_4bit_seg_ld_*`: the segment kernel's values), the other
    /// columns left for the caller to fill; `None` where that kernel does not apply (cols not a multiple
    /// of 1,024, ld not of 8, a block size the segment kernel does not take, f32 compute).
    pub(super) fn dequantize_ld(&self, w: &CudaWeight, ld: usize) -> Option<Operand> {
        let CudaWeight::Quant4 { rows, cols, quant_type, blocksize, packed, absmax, compute } = w else {
            return None;
        };
        let fits = cols % 1024 == 0 && ld >= *cols && ld % 8 == 0 && blocksize.is_power_of_two() && *blocksize >= 8;
        if !fits || !matches!(compute, ComputeDtype::BF16 | ComputeDtype::F16) {
            return None;
        }
        let _span = self.span("expand 4-bit weight");
        let n = rows * cols;
        let (bs, n64, c32, ld64) = (blocksize.trailing_zeros() as i32, n as i64, *cols as i32, ld as i64);
        let cfg = grid_for(n / 32);
        macro_rules! launch {
            ($name:expr, $out:expr) => {{
                let mut b = self.stream.launch_builder(self.f($name));
                self.push_4bit(&mut b, packed, absmax, *quant_type);
                b.arg(&bs).arg(&n64).arg($out).arg(&c32).arg(&ld64);
                // SAFETY: the kernel reads `packed`/`absmax` within n and writes the first cols values
                // of each of the rows rows of `out` (rows · ld values).
                ck!(unsafe { b.launch(cfg) }, $name);
            }};
        }
        // The kernel writes the first cols columns; the caller writes the rest before any GEMM reads
        // them (`alloc_16`: poisoned under `LLAMATUNE_POISON=1`).
        let mut out = self.alloc_16(rows * ld, *compute);
        match &mut out {
            Operand::BF16(o) => launch!("dequant_4bit_seg_ld_bf16", o),
            Operand::F16(o) => launch!("dequant_4bit_seg_ld_f16", o),
            Operand::F32(_) => unreachable!("16-bit compute only"),
        }
        Some(out)
    }

    /// Expands 4-bit weights by whole 1,024-value segments where the sizes allow (`true`, the default;
    /// `LLAMATUNE_DEQUANT_SEG=0`) or by the thread-per-32-values kernel (`false`; A/B runs and tests).
    pub fn set_dequant_seg(&self, on: bool) {
        self.dequant_seg.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// `out (m, rows) = x · dequant(W)ᵀ` straight from the 4-bit codes, for decoding's few rows.
    pub(super) fn gemv_4bit(&self, x: &CudaSlice<f32>, w: &CudaWeight, m: usize, out: &mut CudaSlice<f32>) {
        let CudaWeight::Quant4 { rows, cols, quant_type, blocksize, compute, packed, absmax } = w else {
            unreachable!("gemv_4bit takes 4-bit weights")
        };
        let compute = dtype_code(*compute);
        let (bs, m32, r32, c32) = (*blocksize as i32, m as i32, *rows as i32, *cols as i32);
        // The row-blocked kernel when every row starts on a 16-byte boundary and blocks span a power
        // of two ≥ 32 values (the usual case; its dtype is in its name), else the any-size one (dtype
        // argument).
        let row_blocked = cols % 32 == 0 && scale_per_32_values(*blocksize) && gemv_chunks_fit_u32(*rows, *cols);
        let (kernel, cfg, any_size) = if row_blocked {
            // One row of x is staged in shared memory when it fits.
            let x_smem = gemv_x_smem(*cols);
            let staged = m == 1 && x_smem <= GEMV_MAX_X_SMEM;
            // Two rows per warp when four would leave most warp slots empty (fewer than 8192 rows:
            // the 4096-row projections of a 7B model give 1024 warps for 132 SMs × 24 slots).
            let two_rows = staged && *rows < 8192;
            let warps = rows.div_ceil(if two_rows { 2 } else { GEMV_ROWS_PER_WARP });
            let mut blocks = warps.div_ceil(GEMV_THREADS / 32);
            let split_blocks = rows.div_ceil(GEMV_SPLIT_ROWS_PER_BLOCK);
            let split = self.gemv_split.load(std::sync::atomic::Ordering::Relaxed);
            let kernel = match (staged, two_rows) {
                (true, false) => GEMV_ONE_ROW[compute as usize],
                // Where two blocks per SM hold the launch, four rows per warp with each row's columns
                // split between two warps (the same blocks, twice the bytes in flight per warp).
                (true, true) if split && split_blocks <= 2 * self.sm_count => {
                    blocks = split_blocks;
                    GEMV_SPLIT[compute as usize]
                }
                // Where the launch leaves a third block per SM no work, its registers go to the two.
                (true, true) if blocks <= 2 * self.sm_count => GEMV_ONE_ROW[6 + compute as usize],
                (true, true) => GEMV_ONE_ROW[3 + compute as usize],
                (false, _) => GEMV_FEW_ROWS[compute as usize],
            };
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (GEMV_THREADS as u32, 1, 1),
                shared_mem_bytes: if staged { x_smem as u32 } else { 0 },
            };
            (kernel, cfg, false)
        } else {
            ("gemv_4bit_f32", warp_grid(*rows), true)
        };
        let mut b = self.stream.launch_builder(self.f(kernel));
        self.push_4bit(&mut b, packed, absmax, *quant_type);
        b.arg(&bs).arg(x).arg(&mut *out).arg(&m32).arg(&r32).arg(&c32);
        if any_size {
            b.arg(&compute);
        }
        // SAFETY: the kernel reads the codes and x within the sizes passed and writes `out (m, rows)`.
        ck!(unsafe { b.launch(cfg) }, kernel);
    }

    /// Whether [`Backend::linear_many_lora`](crate::backend::Backend::linear_many_lora) runs these products and
    /// branches in the shared launch (`gemv_4bit_many_lora_*`): where the several-weight GEMV takes the products
    /// (`Cuda::gemv_many_fits`) and 1 to 3 branches carry no dropout and no ready `u`.
    pub fn linear_many_lora_shares_launch(
        &self,
        ws: &[&CudaWeight],
        m: usize,
        loras: &[Option<LoraDown<'_, Self>>],
    ) -> bool {
        (1..=LORA_MAX_TARGETS).contains(&loras.iter().flatten().count())
            && loras.iter().flatten().all(|l| !l.dropout.is_active() && !l.u_ready)
            && self.gemv_many_fits(ws, m)
    }

    /// Whether the products of `ws` at `m` rows can share one `gemv_4bit_many_*` launch: 2 or 3
    /// weights [`Cuda::gemv_shares_x`] accepts, their blocks within one wave.
    pub(super) fn gemv_many_fits(&self, ws: &[&CudaWeight], m: usize) -> bool {
        // Only while all the blocks fit one wave (three per SM): one launch helps by filling the GPU
        // where each weight alone leaves it part empty (q/k/v: 3 × 128 blocks of 4096 rows, 677 →
        // 540 µs per 32 on the H200); past a wave it adds a tail (gate/up: 2 × 344 blocks, 972 →
        // 984 µs per 32).
        self.gemv_many.load(std::sync::atomic::Ordering::Relaxed)
            && (2..=GEMV_MAX_TARGETS).contains(&ws.len())
            && self.gemv_shares_x(ws, m)
            && self.gemv_many_blocks(ws.iter().map(|w| w.shape().0)).iter().sum::<usize>()
                <= GEMV_BLOCKS_PER_SM * self.sm_count
    }

    /// Whether the staged one-row GEMV can run `ws` at `m` rows in one launch: 4-bit weights of the
    /// same cols, quant type, blocksize, compute dtype and kind of absmax, one row of x.
    pub(super) fn gemv_shares_x(&self, ws: &[&CudaWeight], m: usize) -> bool {
        let key = |w: &CudaWeight| match w {
            CudaWeight::Quant4 { cols, quant_type, blocksize, compute, absmax, .. } => {
                Some((*cols, *quant_type, *blocksize, *compute, matches!(absmax, DeviceAbsmax::Nested { .. })))
            }
            CudaWeight::Dense { .. } => None,
        };
        let Some(first) = ws.first().and_then(|w| key(w)) else { return false };
        let (cols, _, blocksize, _, _) = first;
        m == 1
            && ws.iter().all(|w| key(w) == Some(first))
            && cols % 32 == 0
            && scale_per_32_values(blocksize)
            && gemv_x_smem(cols) <= GEMV_MAX_X_SMEM
            && ws.iter().all(|w| matches!(w, CudaWeight::Quant4 { rows, .. } if gemv_chunks_fit_u32(*rows, cols)))
    }

    /// Each weight's blocks in a `gemv_4bit_many_*` launch over weights of these row counts, and the
    /// rows per warp it takes (two when four would leave most warp slots empty, as in gemv_4bit).
    pub(super) fn gemv_many_blocks(&self, rows: impl Iterator<Item = usize> + Clone) -> Vec<usize> {
        let rows_per_warp = Self::gemv_many_rows_per_warp(rows.clone().sum());
        rows.map(|r| r.div_ceil(rows_per_warp).div_ceil(GEMV_THREADS / 32)).collect()
    }

    pub(super) fn gemv_many_rows_per_warp(total_rows: usize) -> usize {
        if total_rows < 8192 {
            2
        } else {
            GEMV_ROWS_PER_WARP
        }
    }

    /// `outs[i] (1, rows_i) = x (1, cols) · dequant(W_i)ᵀ` for the weights [`Cuda::gemv_many_fits`]
    /// accepts, in one launch: the products of [`Cuda::gemv_4bit`] on each.
    pub(super) fn gemv_4bit_many(&self, x: &CudaSlice<f32>, ws: &[&CudaWeight], outs: &mut [&mut CudaSlice<f32>]) {
        let mut guards = Vec::new();
        let (targets, blocks, kernel) = self.gemv_many_targets(x, ws, outs, &mut guards);
        let name = GEMV_MANY[kernel];
        let CudaWeight::Quant4 { quant_type, blocksize, cols, .. } = ws[0] else { unreachable!("4-bit weights") };
        let (bs, c32) = (*blocksize as i32, *cols as i32);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&targets).arg(&self.code256).arg(self.code16(*quant_type)).arg(&bs).arg(x).arg(&c32);
        // SAFETY: each target's codes, absmax and output are the live buffers whose addresses the
        // guards hold; the kernel reads x (cols) and writes each output's `rows` values.
        ck!(unsafe { b.launch(self.gemv_many_launch(ws[0], blocks)) }, name);
        drop(guards);
    }

    /// The several-weight GEMV's targets for `ws` and `outs` (guards keep their addresses valid), the
    /// launch's block count, and its kernel's index in [`GEMV_MANY`] / [`GEMV_MANY_LORA`] (compute
    /// dtype; four or two rows per warp).
    pub(super) fn gemv_many_targets<'a>(
        &'a self,
        x: &CudaSlice<f32>,
        ws: &[&'a CudaWeight],
        outs: &'a mut [&mut CudaSlice<f32>],
        guards: &mut Vec<cudarc::driver::SyncOnDrop<'a>>,
    ) -> (GemvTargets, usize, usize) {
        // gemv_many_fits checked that the weights differ only in their rows and data.
        let CudaWeight::Quant4 { cols, compute, .. } = ws[0] else {
            unreachable!("gemv_many_fits takes 4-bit weights")
        };
        let rows: Vec<usize> = ws.iter().map(|w| w.shape().0).collect();
        let two_rows = Self::gemv_many_rows_per_warp(rows.iter().sum()) == 2;
        let kernel = if two_rows { 3 } else { 0 } + dtype_code(*compute) as usize;
        let mut targets = GemvTargets { count: ws.len() as i32, ..Default::default() };
        let mut first_block = 0;
        let blocks_of = self.gemv_many_blocks(rows.iter().copied());
        for (i, (w, out)) in ws.iter().zip(outs.iter_mut()).enumerate() {
            let CudaWeight::Quant4 { packed, absmax, .. } = w else {
                unreachable!("gemv_many_fits takes 4-bit weights")
            };
            assert!(x.len() == *cols && out.len() == rows[i], "linear: bad shapes");
            let codes = self.codes4(packed, absmax, guards);
            let (y, gy) = out.device_ptr_mut(&self.stream);
            guards.push(gy);
            targets.t[i] = GemvTarget { w: codes, y, rows: rows[i] as i32, first_block: first_block as i32 };
            first_block += blocks_of[i];
        }
        (targets, first_block, kernel)
    }

    /// The several-weight GEMV's launch of `blocks` blocks: one row of x staged in shared memory.
    pub(super) fn gemv_many_launch(&self, first: &CudaWeight, blocks: usize) -> LaunchConfig {
        let cols = first.shape().1;
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (GEMV_THREADS as u32, 1, 1),
            shared_mem_bytes: gemv_x_smem(cols) as u32,
        }
    }

    /// A 4-bit weight's device addresses as the kernels' `Codes4` takes them; `guards` keeps them valid
    /// and the stream ordered until the launch that reads them is queued.
    pub(super) fn codes4<'a>(
        &'a self,
        packed: &'a CudaSlice<u8>,
        absmax: &'a DeviceAbsmax,
        guards: &mut Vec<cudarc::driver::SyncOnDrop<'a>>,
    ) -> Codes4 {
        let (p, g) = packed.device_ptr(&self.stream);
        guards.push(g);
        let mut codes = Codes4 { packed: p, ..Default::default() };
        match absmax {
            DeviceAbsmax::F32(a) => {
                let (p, g) = a.device_ptr(&self.stream);
                codes.absmax = p;
                guards.push(g);
            }
            DeviceAbsmax::Nested { q, absmax2, offset } => {
                let (pq, gq) = q.device_ptr(&self.stream);
                let (p2, g2) = absmax2.device_ptr(&self.stream);
                (codes.absmax_q, codes.absmax2, codes.offset) = (pq, p2, *offset);
                guards.extend([gq, g2]);
            }
        }
        codes
    }

    /// Turns the column-split one-row GEMV for matrices of few rows on or off (`LLAMATUNE_GEMV_SPLIT=0`;
    /// off: two rows per warp, whole rows per warp).
    pub fn set_gemv_split(&self, on: bool) {
        self.gemv_split.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Turns the several-weight decoding GEMVs on or off (off: one launch per weight, SwiGLU apart).
    pub fn set_gemv_many(&self, on: bool) {
        self.gemv_many.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Pushes the arguments every 4-bit kernel of kernels/nf4.cu starts with: the packed codes, the
    /// absmax (plain, or double-quantized as 8-bit codes + per-256 scales; the unused side null), the
    /// dynamic 8-bit map, its offset, and the 16-entry code table of the weight's quant type.
    pub(super) fn push_4bit<'a>(
        &'a self,
        b: &mut cudarc::driver::LaunchArgs<'a>,
        packed: &'a CudaSlice<u8>,
        absmax: &'a DeviceAbsmax,
        quant_type: QuantType,
    ) {
        static NO_OFFSET: f32 = 0.0;
        b.arg(packed);
        match absmax {
            DeviceAbsmax::F32(a) => b.arg(a).arg(&NULL_PTR).arg(&NULL_PTR).arg(&self.code256).arg(&NO_OFFSET),
            DeviceAbsmax::Nested { q, absmax2, offset } => {
                b.arg(&NULL_PTR).arg(q).arg(absmax2).arg(&self.code256).arg(offset)
            }
        };
        b.arg(self.code16(quant_type));
    }

    /// The 16-entry code table of a 4-bit quant type on the device.
    pub(super) fn code16(&self, quant_type: QuantType) -> &CudaSlice<f32> {
        if quant_type == QuantType::Nf4 {
            &self.nf4
        } else {
            &self.fp4
        }
    }

    /// The fused 4-bit matmul (kernels/nf4_gemm.cu): `out (m, rows) = a (m, cols) · Wᵀ`, or with
    /// `dgrad` `out (m, cols) (+)= a (m, rows) · W`, rounded to the compute dtype like the second path.
    /// `a` is first converted to the compute dtype (one pass; the kernel reads 16-bit tiles).
    pub(super) fn gemm_4bit(
        &self,
        a: &CudaSlice<f32>,
        w: &CudaWeight,
        m: usize,
        out: &mut CudaSlice<f32>,
        dgrad: bool,
        accumulate: bool,
    ) {
        let CudaWeight::Quant4 { rows, cols, quant_type, blocksize, compute, packed, absmax } = w else {
            unreachable!("gemm_4bit takes 4-bit weights")
        };
        let n_out = if dgrad { *cols } else { *rows };
        // The narrow token tile while it holds all the rows, the wide one above.
        let t = usize::from(m > GEMM_4BIT_TILES[0].tokens);
        let kernel = GEMM_4BIT[4 * t + usize::from(dgrad) * 2 + usize::from(*compute == ComputeDtype::BF16)];
        let tile = &GEMM_4BIT_TILES[t];
        let w_tiles = n_out.div_ceil(GEMM_4BIT_W_TILE);
        let tiles = w_tiles * m.div_ceil(tile.tokens);
        // Split-K when the tiles would leave SMs idle (small m): each split takes ≥ 4 of the 64-wide
        // reduction steps; partial sums go to a workspace that gemm_4bit_reduce adds and rounds.
        let steps = if dgrad { *rows } else { *cols } / 64;
        let splits = self.splits_to_fill(tiles, tile.blocks_per_sm, steps / 4);
        let cfg = LaunchConfig {
            grid_dim: (w_tiles as u32, m.div_ceil(tile.tokens) as u32, splits as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: tile.smem as u32,
        };
        let (bs, m32, r32, c32, acc) = (*blocksize as i32, m as i32, *rows as i32, *cols as i32, i32::from(accumulate));
        let a16 = self.convert(a, *compute).expect("16-bit compute");
        // SAFETY: the kernel writes every value of every split's m × n_out slab before the reduce reads it.
        let mut partial = (splits > 1).then(|| ck!(unsafe { self.stream.alloc::<f32>(splits * m * n_out) }, "alloc"));
        let mut b = self.stream.launch_builder(self.f(kernel));
        self.push_4bit(&mut b, packed, absmax, *quant_type);
        b.arg(&bs);
        match &a16 {
            Operand::BF16(x) => b.arg(x),
            Operand::F16(x) => b.arg(x),
            Operand::F32(_) => unreachable!("the fused kernel takes 16-bit compute"),
        };
        b.arg(&mut *out);
        push_opt(&mut b, partial.as_mut());
        b.arg(&m32).arg(&r32).arg(&c32).arg(&acc);
        // SAFETY: the kernel reads a16 (m × reduction) and W within their sizes and writes out
        // (m × n_out), or each split's slab of `partial`, inside the clipped tiles.
        ck!(unsafe { b.launch(cfg) }, kernel);
        if let Some(p) = partial {
            let (n, n64, splits32, c32) = (m * n_out, (m * n_out) as i64, splits as i32, dtype_code(*compute));
            launch!(self, "gemm_4bit_reduce", grid_for(n); &p, &mut *out, &n64, &splits32, &c32, &acc);
        }
    }

    /// [`Backend::linear_many_lora`](crate::backend::Backend::linear_many_lora) in one launch where
    /// [`Cuda::linear_many_lora_shares_launch`] allows it (decoding): the frozen products and every branch's A product
    /// (`gemv_4bit_many_lora_*`), then the branches' B products ([`Cuda::lora_up_many`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemv_4bit_many_lora(
        &self,
        x: &CudaSlice<f32>,
        ws: &[&CudaWeight],
        m: usize,
        outs: &mut [&mut CudaSlice<f32>],
        loras: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
    ) {
        self.gemv_4bit_many_lora_a(x, ws, outs, loras, r);
        let ups = outs.iter_mut().zip(loras.iter_mut()).filter_map(|(y, l)| {
            let l = l.as_mut()?;
            Some((l.b, &*l.u, &mut **y))
        });
        self.lora_up_many(ups, m, r, scale);
    }

    /// The launch of [`Cuda::gemv_4bit_many_lora`] without the B products: the frozen products of one
    /// row of x into `outs` and each branch's `u = x·Aᵀ`.
    pub(super) fn gemv_4bit_many_lora_a(
        &self,
        x: &CudaSlice<f32>,
        ws: &[&CudaWeight],
        outs: &mut [&mut CudaSlice<f32>],
        loras: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
    ) {
        let _span = self.span("linear + LoRA A (4-bit GEMV, several weights)");
        // One row of x (Cuda::gemv_shares_x). The frozen products and, in the blocks after theirs,
        // every branch's u = x·Aᵀ.
        let (cols, m) = (x.len(), 1);
        let mut guards = Vec::new();
        let (targets, first, kernel) = self.gemv_many_targets(x, ws, outs, &mut guards);
        let branches = loras.iter_mut().flatten().map(|l| (l.a, &mut *l.u));
        let (downs, blocks) = self.lora_down_targets(x, branches, m, r, first, &mut guards);
        let name = GEMV_MANY_LORA[kernel];
        let CudaWeight::Quant4 { quant_type, blocksize, .. } = ws[0] else { unreachable!("4-bit weights") };
        let (bs, c32) = (*blocksize as i32, cols as i32);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&targets).arg(&self.code256).arg(self.code16(*quant_type)).arg(&bs).arg(x).arg(&c32).arg(&downs);
        // SAFETY: each target's codes, absmax and output, each branch's A and u, and x are live
        // buffers whose addresses the guards hold; the kernel reads x (cols), writes each output's
        // rows and each u's r values.
        ck!(unsafe { b.launch(self.gemv_many_launch(ws[0], blocks)) }, name);
        drop(guards);
    }

    /// `out = silu(x·Gᵀ) ⊙ (x·Uᵀ)` for one row of x in one launch (`gemv_4bit_swiglu_*`), for the weight pairs
    /// [`Cuda::gemv_shares_x`] accepts ([`Backend::linear_swiglu`](crate::backend::Backend::linear_swiglu) in
    /// decoding).
    pub(super) fn gemv_4bit_swiglu(
        &self,
        x: &CudaSlice<f32>,
        gate: &CudaWeight,
        up: &CudaWeight,
        m: usize,
        out: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("linear_swiglu (4-bit GEMV)");
        let (
            CudaWeight::Quant4 { rows, cols, quant_type, blocksize, compute, packed, absmax },
            CudaWeight::Quant4 { packed: up_packed, absmax: up_absmax, .. },
        ) = (gate, up)
        else {
            unreachable!("gemv_shares_x takes 4-bit weights")
        };
        assert!(x.len() == *cols && out.len() == *rows, "linear_swiglu: bad shapes");
        let kernel = GEMV_SWIGLU[dtype_code(*compute) as usize];
        // Two pairs of rows per warp.
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(GEMV_ROWS_PER_WARP / 2).div_ceil(GEMV_THREADS / 32) as u32, 1, 1),
            block_dim: (GEMV_THREADS as u32, 1, 1),
            shared_mem_bytes: gemv_x_smem(*cols) as u32,
        };
        let mut guards = Vec::new();
        let codes = self.codes4(up_packed, up_absmax, &mut guards);
        let (bs, m32, r32, c32) = (*blocksize as i32, m as i32, *rows as i32, *cols as i32);
        let mut b = self.stream.launch_builder(self.f(kernel));
        self.push_4bit(&mut b, packed, absmax, *quant_type);
        b.arg(&bs).arg(x).arg(&mut *out).arg(&m32).arg(&r32).arg(&c32).arg(&codes);
        // SAFETY: the kernel reads both weights' codes and absmax (the up side through the addresses
        // the guards hold) and x (cols), and writes out (rows).
        ck!(unsafe { b.launch(cfg) }, kernel);
        drop(guards);
    }
}

#[cfg(test)]
mod tests {
    use super::gemv_chunks_fit_u32;

    /// The row GEMVs index 16-byte code chunks in 32 bits: every product of a 70B model fits, and the
    /// launcher refuses exactly from 2³¹ chunks on.
    #[test]
    fn row_gemv_chunk_indices_fit_32_bits_below_2_pow_31_chunks() {
        // Llama-2-70B's largest weights (MLP 28,672 × 8,192) and a 128k-token LM head.
        assert!(gemv_chunks_fit_u32(28_672, 8_192));
        assert!(gemv_chunks_fit_u32(128_256, 8_192));
        // 2³¹ − 2¹⁵ chunks, then 2³¹ (cols / 32 = 2¹⁵ chunks per row).
        assert!(gemv_chunks_fit_u32((1 << 16) - 1, 1 << 20));
        assert!(!gemv_chunks_fit_u32(1 << 16, 1 << 20));
        // Columns past a whole chunk do not count (those products take the any-size kernel anyway).
        assert!(!gemv_chunks_fit_u32(1 << 16, (1 << 20) + 31));
    }
}
