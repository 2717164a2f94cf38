//! Launchers of kernels/lora_fused.cu (LoRA branches at training shapes, the dropout mask
//! regenerated from its seed) and kernels/lora.cu (f32 products of decoding's few rows), and the
//! cuBLAS TF32 path they replace. CPU reference: `Cpu::lora_forward`, `Cpu::lora_backward`.

use super::blas::F32Math;
use super::gemm::{Operand, OperandView};
use super::quant4::GEMV_MAX_M;
use super::{grid_for, push_opt, Cuda};
use crate::backend::{Dropout, LoraDown};
use crate::config::ComputeDtype;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
use half::bf16;

/// The fused LoRA kernels (kernels/lora_fused.cu) by rank: r ≤ 16, ≤ 32, ≤ 64.
pub(super) const LORA_DOWN: [&str; 3] = ["lora_down_r16", "lora_down_r32", "lora_down_r64"];

pub(super) const LORA_OUTER: [&str; 3] = ["lora_outer_r16", "lora_outer_r32", "lora_outer_r64"];

/// Their wide forms (`down` over 128 rows of x, `outer` over 128 columns of T, 8 warps, two blocks
/// per SM) for r ≤ 32 and r ≤ 64: each stage's small-operand tile serves twice the values of the big
/// one, halving its reads from L2.
pub(super) const LORA_DOWN_WIDE: [&str; 2] = ["lora_down128_r32", "lora_down128_r64"];

pub(super) const LORA_OUTER_WIDE: [&str; 2] = ["lora_outer128_r32", "lora_outer128_r64"];

/// `lora_du` by the dtype of its 16-bit copy of dy (bf16, f16), then by rank.
pub(super) const LORA_DU: [[&str; 3]; 2] = [
    ["lora_du_r16_bf16", "lora_du_r32_bf16", "lora_du_r64_bf16"],
    ["lora_du_r16_f16", "lora_du_r32_f16", "lora_du_r64_f16"],
];

pub(super) fn lora_variant(r: usize) -> usize {
    match r {
        0..=16 => 0,
        17..=32 => 1,
        _ => 2,
    }
}

/// Their geometry (a block's rows of x or columns of T, STAGE_K, STAGES, UP_ROWS = UP_COLS, OUTER_COLS,
/// 128-thread blocks; twice the rows or columns and threads in the wide forms).
pub(super) const LORA_DOWN_ROWS: usize = 64;

pub(super) const LORA_STAGE: usize = 32;

pub(super) const LORA_STAGES: usize = 4;

pub(super) const LORA_UP_TILE: usize = 64;

pub(super) const LORA_OUTER_COLS: usize = 64;

pub(super) const LORA_THREADS: u32 = 128;

/// `lora_du`'s blocks: DU_ROWS rows of dy, DU_THREADS threads, two blocks per SM.
const LORA_DU_ROWS: usize = 128;

const LORA_DU_THREADS: u32 = 256;

const LORA_DU_BLOCKS_PER_SM: usize = 2;

/// Blocks per SM of the split kernels (`down` and `outer` are built for three: their registers and
/// shared memory allow it); the splits aim at one full wave of them.
pub(super) const LORA_BLOCKS_PER_SM: usize = 3;

/// Dynamic shared memory of `lora_down` variant v over `rows` rows of x: STAGES × (rows of x + 8·NT
/// of A) × 36 words.
pub(super) fn lora_down_smem(v: usize, rows: usize) -> usize {
    LORA_STAGES * (rows + (16 << v)) * 36 * 4
}

/// Of `lora_outer` variant v over `cols` columns of T: STAGES × 32 rows × (S: 8·NT + 8 words, T:
/// cols + 8 words).
pub(super) fn lora_outer_smem(v: usize, cols: usize) -> usize {
    LORA_STAGES * LORA_STAGE * ((16 << v) + 8 + cols + 8) * 4
}

/// A split-reduction kernel of kernels/lora_fused.cu and its launch geometry.
#[derive(Clone, Copy)]
pub(super) struct SplitKernel {
    name: &'static str,
    smem: usize,
    threads: u32,
    blocks_per_sm: usize,
    /// Rows of x (`down`) or columns of T (`outer`) per block.
    tile: usize,
}

impl SplitKernel {
    /// `lora_down` for rank variant v, wide (128 rows) where one exists and `wide`.
    fn down(v: usize, wide: bool) -> Self {
        match (wide, v) {
            (true, 1..) => Self::wide(LORA_DOWN_WIDE[v - 1], lora_down_smem(v, 2 * LORA_DOWN_ROWS), 2 * LORA_DOWN_ROWS),
            _ => Self::narrow(LORA_DOWN[v], lora_down_smem(v, LORA_DOWN_ROWS), LORA_DOWN_ROWS),
        }
    }

    /// `lora_outer` for rank variant v, wide (128 columns) where one exists and `wide`.
    fn outer(v: usize, wide: bool) -> Self {
        match (wide, v) {
            (true, 1..) => {
                Self::wide(LORA_OUTER_WIDE[v - 1], lora_outer_smem(v, 2 * LORA_OUTER_COLS), 2 * LORA_OUTER_COLS)
            }
            _ => Self::narrow(LORA_OUTER[v], lora_outer_smem(v, LORA_OUTER_COLS), LORA_OUTER_COLS),
        }
    }

    fn narrow(name: &'static str, smem: usize, tile: usize) -> Self {
        Self { name, smem, threads: LORA_THREADS, blocks_per_sm: LORA_BLOCKS_PER_SM, tile }
    }

    fn wide(name: &'static str, smem: usize, tile: usize) -> Self {
        Self { name, smem, threads: 2 * LORA_THREADS, blocks_per_sm: 2, tile }
    }

    /// Every split kernel with the dynamic shared memory it asks for (set as each one's maximum).
    pub(super) fn all() -> impl Iterator<Item = (&'static str, usize)> {
        (0..LORA_DOWN.len()).flat_map(|v| {
            let kernels = [Self::down(v, false), Self::down(v, true), Self::outer(v, false), Self::outer(v, true)];
            kernels.into_iter().map(|k| (k.name, k.smem))
        })
    }
}

/// Branches one split-kernel launch takes (kernels/lora_fused.cu SPLIT_BRANCHES).
pub(super) const SPLIT_BRANCHES: usize = 3;

/// kernels/lora_fused.cu `SplitBranches`, field for field: per branch its own small operand (A, or
/// du), its partials or output, its dropout; passed by value.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SplitBranches {
    own: [u64; SPLIT_BRANCHES],
    part: [u64; SPLIT_BRANCHES],
    seed: [u64; SPLIT_BRANCHES],
    p: [f32; SPLIT_BRANCHES],
    count: i32,
}
// SAFETY: plain data laid out as the kernel's `SplitBranches` (#[repr(C)], the same fields).
unsafe impl cudarc::driver::DeviceRepr for SplitBranches {}

/// One branch of a split-kernel launch: its small operand (A for the A product, du for dA), the
/// output it writes or adds into, and its dropout.
pub(super) struct SplitBranch<'a> {
    pub(super) own: &'a CudaSlice<f32>,
    pub(super) out: &'a mut CudaSlice<f32>,
    pub(super) dropout: Dropout,
}

/// Of `lora_du` variant v: STAGES × (128 rows of dy × 36 words + 32 rows of B × (8·NT + 8) words).
pub(super) fn lora_du_smem(v: usize) -> usize {
    LORA_STAGES * (LORA_DU_ROWS * 36 + LORA_STAGE * ((16 << v) + 8)) * 4
}

/// At most this many LoRA branches per `gemv_f32*_many` launch (kernels/gemv_f32.cuh LORA_MAX_TARGETS).
pub(super) const LORA_MAX_TARGETS: usize = 3;

/// Threads per block of `gemv_f32_many` (a group of lanes per row of B: [`lora_rows_per_warp`]).
pub(super) const LORA_UP_THREADS: usize = 128;

/// One product of a `gemv_f32*_many` launch: kernels/gemv_f32.cuh `GemvF32Target`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct GemvF32Target {
    pub(super) w: u64,
    pub(super) x: u64,
    pub(super) y: u64,
    pub(super) rows: i32,
    pub(super) first_block: i32,
}

/// kernels/gemv_f32.cuh `GemvF32Targets`, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(super) struct GemvF32Targets {
    pub(super) t: [GemvF32Target; LORA_MAX_TARGETS],
    pub(super) count: i32,
}

// SAFETY: plain old data with the layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for GemvF32Targets {}

/// Rows of W per warp in kernels/lora.cu `gemv_f32_row` (its `lanes_per_row`): a power-of-two group of
/// lanes covers a row's float4s, so B's 64-column rows go two to a warp.
pub(super) fn lora_rows_per_warp(cols: usize) -> usize {
    if cols % 4 != 0 || cols / 4 >= 32 {
        return 1;
    }
    32 / (cols / 4).next_power_of_two()
}

/// kernels/lora_fused.cu `lora_up` and `lora_up_from_*` over `out (m, n)`: a block per 64 × 64 tile.
pub(super) fn lora_up_launch(m: usize, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(LORA_UP_TILE) as u32, m.div_ceil(LORA_UP_TILE) as u32, 1),
        block_dim: (LORA_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Cuda {
    pub(super) fn lora_math(&self) -> F32Math {
        if self.is_precise() {
            F32Math::Exact
        } else {
            F32Math::Tf32
        }
    }

    /// The A products `u_i (m, r) = x (m, cols) · A_iᵀ` of up to LORA_MAX_TARGETS branches as the targets
    /// of a `gemv_f32_long_row` launch (kernels/gemv_f32.cuh): a block per row of every A_i, numbered
    /// from `first_block`; returns them and the launch's block count. `guards` keeps the addresses valid.
    pub(super) fn lora_down_targets<'a>(
        &'a self,
        x: &'a CudaSlice<f32>,
        downs: impl Iterator<Item = (&'a CudaSlice<f32>, &'a mut CudaSlice<f32>)>,
        m: usize,
        r: usize,
        first_block: usize,
        guards: &mut Vec<cudarc::driver::SyncOnDrop<'a>>,
    ) -> (GemvF32Targets, usize) {
        let cols = x.len() / m;
        let mut targets = GemvF32Targets::default();
        let (xp, gx) = x.device_ptr(&self.stream);
        guards.push(gx);
        let mut blocks = first_block;
        for (i, (a, u)) in downs.enumerate() {
            assert!(i < LORA_MAX_TARGETS && a.len() == r * cols && u.len() == m * r, "LoRA A products: bad shapes");
            let (ap, ga) = a.device_ptr(&self.stream);
            let (up, gu) = u.device_ptr_mut(&self.stream);
            targets.t[i] = GemvF32Target { w: ap, x: xp, y: up, rows: r as i32, first_block: blocks as i32 };
            targets.count = i as i32 + 1;
            blocks += r;
            guards.extend([ga, gu]);
        }
        (targets, blocks)
    }

    /// The fused LoRA backward's weight gradients: `du (m, r) = scale · dy · B` (returned) and `dB`
    /// ([`Cuda::lora_du_and_db`]), then `dA (r, cols) += duᵀ · drop(x)` (`lora_outer`, the mask
    /// regenerated from the seed). Each part has its own profile span.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lora_weight_grads(
        &self,
        x: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        (m, r, scale): (usize, usize, f32),
        dropout: Dropout,
        da: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
        dy16: Option<&mut Operand>,
    ) -> CudaSlice<f32> {
        let du = self.lora_du_and_db(b, u, dy, (m, r, scale), db, dy16);
        self.lora_das(vec![(x, &du, da, dropout)], m, r);
        du
    }

    /// `du (m, r) = scale · dy · B` (returned; kernels/lora_fused.cu `lora_du`, which also rounds dy
    /// into `dy16` when given, for the input gradient's GEMM) and `dB (rows, r) += scale · dyᵀ · u`
    /// (cuBLAS).
    ///
    /// dB reads `dy16` where it is bf16 (with u rounded to bf16, f32 accumulation): half the bytes of
    /// f32 dy, on the bf16 tensor cores, where the TF32 GEMM of f32 dy took ~28 µs per 7B projection
    /// (session 27's profile); bf16 keeps f32's range, and PEFT under autocast forms dB from bf16
    /// operands too. An f16 copy (float16 compute) stays off this path: gradients can fall below
    /// f16's range. `LLAMATUNE_LORA_DB_BF16=0` keeps TF32 throughout.
    pub(super) fn lora_du_and_db(
        &self,
        b: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        (m, r, scale): (usize, usize, f32),
        db: &mut CudaSlice<f32>,
        mut dy16: Option<&mut Operand>,
    ) -> CudaSlice<f32> {
        let rows = b.len() / r;
        let mut du = self.scratch(m * r);
        {
            let _part =
                self.span(if dy16.is_some() { "lora_backward: du + dy in 16 bits" } else { "lora_backward: du" });
            self.lora_du(dy, b, m, r, scale, &mut du, dy16.as_deref_mut());
        }
        // dy's bf16 copy where there is one and the path is on, else f32 dy in TF32.
        let dy_bf16 = dy16.as_deref().filter(|o| matches!(o, Operand::BF16(_)) && self.lora_db_bf16());
        let what = if dy_bf16.is_some() { "lora_backward: dB GEMM (bf16 dy)" } else { "lora_backward: dB GEMM" };
        let _part = self.span(what);
        let u16 = dy_bf16.map(|_| self.convert(u, ComputeDtype::BF16).expect("a bf16 copy of u"));
        let (math, dyop, uop) = match (dy_bf16, &u16) {
            (Some(d), Some(u16)) => (F32Math::Exact, OperandView::from(d), OperandView::from(u16)),
            _ => (F32Math::Tf32, OperandView::F32(dy), OperandView::F32(u)),
        };
        ck!(self.blas.gemm_rm(math, true, false, rows, r, m, scale, dyop, rows, uop, r, 1.0, db, r), what);
        du
    }

    /// `dA_i (r, cols) += du_iᵀ · drop_i(x_i)` for branches `(x_i, du_i, dA_i, dropout_i)`: in launches
    /// of up to [`SPLIT_BRANCHES`] where they all read the same x and grouping is on
    /// ([`Cuda::set_lora_grouped`]), else one launch each.
    #[allow(clippy::type_complexity)]
    pub(super) fn lora_das(
        &self,
        mut das: Vec<(&CudaSlice<f32>, &CudaSlice<f32>, &mut CudaSlice<f32>, Dropout)>,
        m: usize,
        r: usize,
    ) {
        let grouped = das.len() > 1 && self.lora_grouped() && das.windows(2).all(|w| std::ptr::eq(w[0].0, w[1].0));
        let _part = self.span(if grouped {
            "lora_backward: dA (outer), branches sharing x"
        } else {
            "lora_backward: dA (outer)"
        });
        for chunk in das.chunks_mut(if grouped { SPLIT_BRANCHES } else { 1 }) {
            let x = chunk[0].0;
            let mut branches: Vec<SplitBranch<'_>> = chunk
                .iter_mut()
                .map(|(_, du, da, dropout)| SplitBranch { own: du, out: da, dropout: *dropout })
                .collect();
            self.lora_outer_many(x, &mut branches, m, r);
        }
    }

    /// The A products `u = drop(x)·Aᵀ` of the branches in `loras` (all reading x) that are not ready,
    /// in launches of up to [`SPLIT_BRANCHES`] branches, each then marked ready: where they run on the
    /// fused split kernel, more than one is pending and grouping is on ([`Cuda::set_lora_grouped`]).
    /// Otherwise nothing happens here and [`Cuda::branch_u`] computes each on its own.
    pub(super) fn branch_us(&self, x: &CudaSlice<f32>, loras: &mut [Option<LoraDown<'_, Self>>], m: usize, r: usize) {
        let cols = x.len() / m.max(1);
        if !self.lora_grouped() || !self.uses_fused_lora_down(cols, r) {
            return;
        }
        // (A few rows without dropout take the row products of `lora_a_product`.)
        let mut pending: Vec<&mut LoraDown<'_, Self>> =
            loras.iter_mut().flatten().filter(|l| !l.u_ready && (m > GEMV_MAX_M || l.dropout.is_active())).collect();
        if pending.len() < 2 {
            return;
        }
        let _span = self.span("LoRA A products sharing x");
        let kernel = SplitKernel::down(lora_variant(r), self.lora_wide());
        let (tiles, dims) = (m.div_ceil(kernel.tile), [m as i32, cols as i32, r as i32]);
        for chunk in pending.chunks_mut(SPLIT_BRANCHES) {
            assert!(chunk.iter().all(|l| l.a.len() == r * cols && l.u.len() == m * r), "LoRA A products: bad shapes");
            let mut branches: Vec<SplitBranch<'_>> =
                chunk.iter_mut().map(|l| SplitBranch { own: l.a, out: &mut *l.u, dropout: l.dropout }).collect();
            self.lora_split_reduce(kernel, (tiles, cols), x, &mut branches, dims, false);
            drop(branches);
            chunk.iter_mut().for_each(|l| l.u_ready = true);
        }
    }

    /// `du (m, r) = scale · dy (m, rows) · B (rows, r)` (kernels/lora_fused.cu `lora_du_*`), split over
    /// `rows` to fill the GPU; with `dy16`, dy is also written rounded to that operand's 16-bit dtype, bit
    /// for bit what `f32_to_bf16` / `f32_to_f16` give, from the same read.
    #[allow(clippy::too_many_arguments)]
    pub fn lora_du(
        &self,
        dy: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        m: usize,
        r: usize,
        scale: f32,
        du: &mut CudaSlice<f32>,
        dy16: Option<&mut Operand>,
    ) {
        let rows = b.len() / r;
        assert!(self.uses_fused_lora_up(rows, r), "lora_du: rank {r} or {rows} rows not for the fused kernels");
        assert!(dy.len() == m * rows && du.len() == m * r, "lora_du: bad shapes");
        assert!(dy16.as_ref().is_none_or(|o| o.len() >= m * rows), "lora_du: dy16 too short");
        let (v, tiles) = (lora_variant(r), m.div_ceil(LORA_DU_ROWS));
        let (splits, per) = self.lora_splits(tiles, rows, LORA_DU_BLOCKS_PER_SM);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, splits as u32, 1),
            block_dim: (LORA_DU_THREADS, 1, 1),
            shared_mem_bytes: lora_du_smem(v) as u32,
        };
        let mut part = (splits > 1).then(|| self.scratch(splits * m * r));
        let dst = part.as_mut().unwrap_or(du);
        let dims = [m as i32, rows as i32, r as i32, per as i32];
        let kernel = LORA_DU[matches!(dy16, Some(Operand::F16(_))) as usize][v];
        let mut l = self.stream.launch_builder(self.f(kernel));
        l.arg(dy).arg(b).arg(&mut *dst);
        match dy16 {
            Some(Operand::BF16(o)) => push_opt(&mut l, Some(o)),
            Some(Operand::F16(o)) => push_opt(&mut l, Some(o)),
            Some(Operand::F32(_)) => unreachable!("a 16-bit copy of dy"),
            None => push_opt(&mut l, None::<&mut CudaSlice<bf16>>),
        }
        l.arg(&dims[0]).arg(&dims[1]).arg(&dims[2]).arg(&dims[3]).arg(&scale);
        // SAFETY: the kernel bounds-checks rows against m and columns against rows; dy16, when given,
        // holds m · rows values (asserted above).
        ck!(unsafe { l.launch(cfg) }, kernel);
        drop(l);
        if let Some(part) = part {
            let (ptr, g) = du.device_ptr_mut(&self.stream);
            let mut outs = SplitBranches { count: 1, ..Default::default() };
            outs.part[0] = ptr;
            self.sum_splits(&part, &outs, splits, m * r, false);
            drop(g);
        }
    }

    /// A branch's `u = drop(x) · Aᵀ` where it is not [`LoraDown::u_ready`] already.
    pub(super) fn branch_u(&self, x: &CudaSlice<f32>, l: &mut LoraDown<'_, Self>, m: usize, r: usize) {
        if !l.u_ready {
            self.lora_a_product(x, l.a, m, r, l.dropout, l.u);
        }
    }

    /// [`Backend::lora_down`](crate::backend::Backend::lora_down) (without its profile span, for
    /// [`Backend::lora_forward`](crate::backend::Backend::lora_forward) too).
    pub(super) fn lora_a_product(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        m: usize,
        r: usize,
        dropout: Dropout,
        u: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("LoRA A product");
        let cols = a.len() / r;
        assert!(x.len() == m * cols && u.len() == m * r, "lora_down: bad shapes");
        if m <= GEMV_MAX_M && !dropout.is_active() {
            // A few rows (decoding): the f32 row products, as lora_forward_many runs them.
            return self.lora_down_rows(x, std::iter::once((a, u)), m, r);
        }
        if self.uses_fused_lora_down(cols, r) {
            // kernels/lora_fused.cu, the mask regenerated where x is read.
            return self.lora_down_fused(x, a, m, cols, r, dropout, u);
        }
        let xd = self.dropped(x, dropout);
        // u (m, r) = drop(x) · Aᵀ
        ck!(
            self.blas.gemm_rm(
                self.lora_math(),
                false,
                true,
                m,
                r,
                cols,
                1.0,
                OperandView::F32(xd.as_ref().unwrap_or(x)),
                cols,
                OperandView::F32(a),
                cols,
                0.0,
                u,
                r
            ),
            "LoRA A GEMM"
        );
    }

    /// `u_i (m, r) = x (m, cols) · A_iᵀ` for up to LORA_MAX_TARGETS branches of a few rows, without
    /// dropout, in one launch (`gemv_f32_long_rows_many`: a block per row of every A_i).
    pub(super) fn lora_down_rows<'a>(
        &'a self,
        x: &'a CudaSlice<f32>,
        downs: impl Iterator<Item = (&'a CudaSlice<f32>, &'a mut CudaSlice<f32>)>,
        m: usize,
        r: usize,
    ) {
        let mut guards = Vec::new();
        let (down, blocks) = self.lora_down_targets(x, downs, m, r, 0, &mut guards);
        let (m32, cols32) = (m as i32, (x.len() / m) as i32);
        let long = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: each target's A, x and u are the live buffers whose addresses the guards hold;
        // the kernel reads A (r, cols) and x (m, cols) and writes u (m, r) of each.
        let mut b = self.stream.launch_builder(self.f("gemv_f32_long_rows_many"));
        b.arg(&down).arg(&m32).arg(&cols32).arg(&1f32).arg(&0i32);
        ck!(unsafe { b.launch(long) }, "gemv_f32_long_rows_many");
        drop(guards);
    }

    /// `y_i (m, rows_i) += scale · u_i (m, r) · B_iᵀ` for up to LORA_MAX_TARGETS branches in one launch
    /// (kernels/lora.cu `gemv_f32_many`: a group of lanes per row of every B_i): the B products of
    /// [`Backend::lora_forward_many`](crate::backend::Backend::lora_forward_many) and
    /// [`Backend::linear_many_lora`](crate::backend::Backend::linear_many_lora) in decoding.
    pub(super) fn lora_up_many<'a>(
        &self,
        ups: impl Iterator<Item = (&'a CudaSlice<f32>, &'a CudaSlice<f32>, &'a mut CudaSlice<f32>)>,
        m: usize,
        r: usize,
        scale: f32,
    ) {
        let mut up = GemvF32Targets::default();
        let mut guards = Vec::new();
        let mut blocks = 0;
        for (i, (b, u, y)) in ups.enumerate() {
            let rows = b.len() / r;
            assert!(i < LORA_MAX_TARGETS && u.len() == m * r && y.len() == m * rows, "LoRA B products: bad shapes");
            let (bp, gb) = b.device_ptr(&self.stream);
            let (up_ptr, gu) = u.device_ptr(&self.stream);
            let (yp, gy) = y.device_ptr_mut(&self.stream);
            up.t[i] = GemvF32Target { w: bp, x: up_ptr, y: yp, rows: rows as i32, first_block: blocks as i32 };
            up.count = i as i32 + 1;
            blocks += (rows.div_ceil(lora_rows_per_warp(r)) * 32).div_ceil(LORA_UP_THREADS);
            guards.extend([gb, gu, gy]);
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (LORA_UP_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m32, r32) = (m as i32, r as i32);
        // SAFETY: each target's B, u and y are the live buffers whose addresses the guards hold; the
        // kernel reads B (rows, r) and u (m, r) and adds into y (m, rows) of each.
        let mut b = self.stream.launch_builder(self.f("gemv_f32_many"));
        b.arg(&up).arg(&m32).arg(&r32).arg(&scale).arg(&1i32);
        ck!(unsafe { b.launch(cfg) }, "gemv_f32_many");
        drop(guards);
    }

    /// Whether a LoRA branch `cols → rows` of rank `r` with more than a few token rows runs on the fused
    /// kernels of kernels/lora_fused.cu: not in precise mode (f32 cuBLAS there), rank ≤ 64, and rows of
    /// 16 bytes (`LLAMATUNE_FUSED_LORA=0` or [`Cuda::set_fused_lora`] keep the cuBLAS TF32 path).
    pub fn uses_fused_lora(&self, rows: usize, cols: usize, r: usize) -> bool {
        self.uses_fused_lora_down(cols, r) && self.uses_fused_lora_up(rows, r)
    }

    /// Whether a branch's A product `u = drop(x)·Aᵀ` (`cols` in-features) runs on the fused `lora_down`.
    pub(super) fn uses_fused_lora_down(&self, cols: usize, r: usize) -> bool {
        self.fused_lora_rank(r) && cols % 4 == 0
    }

    /// Whether a branch's B product `y += scale·u·Bᵀ` (`rows` out-features) runs on the fused `lora_up`.
    pub(super) fn uses_fused_lora_up(&self, rows: usize, r: usize) -> bool {
        self.fused_lora_rank(r) && rows % 4 == 0
    }

    pub(super) fn fused_lora_rank(&self, r: usize) -> bool {
        self.fused_lora.load(std::sync::atomic::Ordering::Relaxed) && !self.is_precise() && r <= 64 && r % 4 == 0
    }

    /// Turns the fused LoRA kernels on or off (off: dropout pass + cuBLAS TF32 GEMMs, the rival).
    pub fn set_fused_lora(&self, on: bool) {
        self.fused_lora.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether dB is formed from dy's bf16 copy where there is one (`Cuda::lora_weight_grads`); for
    /// tests and A/B runs (`LLAMATUNE_LORA_DB_BF16=0`: TF32 from f32 dy).
    pub fn set_lora_db_bf16(&self, on: bool) {
        self.lora_db_bf16.store(on, std::sync::atomic::Ordering::Relaxed);
    }
    fn lora_db_bf16(&self) -> bool {
        self.lora_db_bf16.load(std::sync::atomic::Ordering::Relaxed) && !self.is_precise()
    }
    /// Runs the A products and dA on the wide split kernels (`lora_down128_*`, `lora_outer128_*`)
    /// where the rank has one (on by default; `LLAMATUNE_LORA_WIDE=0`: the 64-row and 64-column ones).
    pub fn set_lora_wide(&self, on: bool) {
        self.lora_wide.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn lora_wide(&self) -> bool {
        self.lora_wide.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Runs the A products, and dA, of branches that read the same x (q/k/v, gate/up) in one launch of
    /// the split kernels per three branches (`Cuda::branch_us`, `Cuda::lora_das`; on by default,
    /// `LLAMATUNE_LORA_GROUPED=0`: a launch per branch).
    pub fn set_lora_grouped(&self, on: bool) {
        self.lora_grouped.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    fn lora_grouped(&self) -> bool {
        self.lora_grouped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How to split a reduction of `len` (stages of [`LORA_STAGE`]) over blocks so that `tiles`
    /// output tiles × splits fill the GPU's `blocks_per_sm` block slots per SM in one wave (a
    /// second, nearly empty wave would cost as much as the first): (splits, length per split).
    pub(super) fn lora_splits(&self, tiles: usize, len: usize, blocks_per_sm: usize) -> (usize, usize) {
        let stages = len.div_ceil(LORA_STAGE);
        let want = self.splits_to_fill(tiles, blocks_per_sm, stages);
        let per = stages.div_ceil(want) * LORA_STAGE;
        (len.div_ceil(per), per)
    }

    /// Runs a split-reduction kernel of kernels/lora_fused.cu for up to [`SPLIT_BRANCHES`] branches
    /// that read the same big operand `shared` (x), over `tiles` output tiles per branch × splits of a
    /// reduction of length `len` (`dims` = (m, n, r); each branch's own operand, output and dropout in
    /// `branches`), and sums each branch's splits into its output, adding to it when `accumulate`.
    /// With one split and nothing to add to, the kernel writes the outputs itself. The splits aim at
    /// one wave of all the branches' blocks, so grouped branches also take fewer, longer splits.
    pub(super) fn lora_split_reduce(
        &self,
        kernel: SplitKernel,
        (tiles, len): (usize, usize),
        shared: &CudaSlice<f32>,
        branches: &mut [SplitBranch<'_>],
        dims: [i32; 3],
        accumulate: bool,
    ) {
        let count = branches.len();
        assert!((1..=SPLIT_BRANCHES).contains(&count), "split kernels: 1 to {SPLIT_BRANCHES} branches");
        let n = branches[0].out.len();
        assert!(branches.iter().all(|b| b.out.len() == n), "split kernels: branches of one shape");
        let (splits, per) = self.lora_splits(tiles * count, len, kernel.blocks_per_sm);
        let cfg = LaunchConfig {
            grid_dim: ((tiles * count) as u32, splits as u32, 1),
            block_dim: (kernel.threads, 1, 1),
            shared_mem_bytes: kernel.smem as u32,
        };
        // Partials (count, splits, n) in one scratch where the outputs are not written directly.
        let mut part = (splits > 1 || accumulate).then(|| self.scratch(count * splits * n));
        let mut table = SplitBranches { count: count as i32, ..Default::default() };
        let mut outs = table;
        let mut guards = Vec::new();
        let part_written = part.as_mut().map(|p| p.device_ptr_mut(&self.stream));
        for (i, b) in branches.iter_mut().enumerate() {
            let (own, g_own) = b.own.device_ptr(&self.stream);
            let (out, g_out) = b.out.device_ptr_mut(&self.stream);
            table.own[i] = own;
            outs.part[i] = out;
            table.part[i] = part_written.as_ref().map_or(out, |(base, _)| base + (i * splits * n * 4) as u64);
            (table.seed[i], table.p[i]) = (b.dropout.seed, b.dropout.p);
            guards.extend([g_own, g_out]);
        }
        let per = per as i32;
        // The table's buffers stay borrowed (the guards) until the sums are queued: each branch's own
        // operand of r · len values, its output of n values, its slice of splits · n partials.
        launch!(self, kernel.name, cfg; shared, &table, &dims[0], &dims[1], &dims[2], &per);
        drop(part_written);
        if let Some(part) = &part {
            self.sum_splits(part, &outs, splits, n, accumulate);
        }
        drop(guards);
    }

    /// `out_i = [out_i +] Σ_s part[i][s]` for `part (count, splits, n)` and the outputs whose addresses
    /// are `outs.part[i]`, i < `outs.count` (kernels/lora_fused.cu `lora_sum_splits`, a grid row per
    /// output). The caller holds the outputs' guards.
    fn sum_splits(&self, part: &CudaSlice<f32>, outs: &SplitBranches, splits: usize, n: usize, accumulate: bool) {
        let (s32, n64, acc) = (splits as i32, n as i64, accumulate as i32);
        let mut cfg = grid_for(n / 4);
        cfg.grid_dim.1 = outs.count as u32;
        launch!(self, "lora_sum_splits", cfg; part, outs, &s32, &n64, &acc);
    }

    /// `u (m, r) = drop(x) (m, cols) · Aᵀ` for `A (r, cols)`, split over `cols` to fill the GPU.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lora_down_fused(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        m: usize,
        cols: usize,
        r: usize,
        d: Dropout,
        u: &mut CudaSlice<f32>,
    ) {
        let kernel = SplitKernel::down(lora_variant(r), self.lora_wide());
        let (tiles, dims) = (m.div_ceil(kernel.tile), [m as i32, cols as i32, r as i32]);
        self.lora_split_reduce(
            kernel,
            (tiles, cols),
            x,
            &mut [SplitBranch { own: a, out: u, dropout: d }],
            dims,
            false,
        );
    }

    /// `out (m, n) += alpha · drop(U · W'ᵀ)` for `U (m, r)` and `W' (n, r)`, given as `w (n, r)` or, when
    /// `w_is_rn`, as `w (r, n)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lora_up(
        &self,
        u: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        w_is_rn: bool,
        m: usize,
        n: usize,
        r: usize,
        alpha: f32,
        d: Dropout,
        out: &mut CudaSlice<f32>,
    ) {
        let (dims, rn) = ([m as i32, n as i32, r as i32], w_is_rn as i32);
        launch!(self, "lora_up", lora_up_launch(m, n); u, w, &mut *out, &dims[0], &dims[1], &dims[2], &rn, &alpha, &d.seed, &d.p);
    }

    /// `out_i (r, n) += S_iᵀ · drop_i(T)` for up to [`SPLIT_BRANCHES`] branches `(S_i (m, r), out_i,
    /// dropout_i)` that share `T (m, n)`, in one launch, split over `m` to fill the GPU (dA = duᵀ·drop(x)
    /// of branches reading the same x).
    pub(super) fn lora_outer_many(&self, t: &CudaSlice<f32>, branches: &mut [SplitBranch<'_>], m: usize, r: usize) {
        let n = t.len() / m;
        assert!(branches.iter().all(|b| b.own.len() == m * r && b.out.len() == r * n), "lora_outer: bad shapes");
        let kernel = SplitKernel::outer(lora_variant(r), self.lora_wide());
        let (tiles, dims) = (n.div_ceil(kernel.tile), [m as i32, n as i32, r as i32]);
        self.lora_split_reduce(kernel, (tiles, m), t, branches, dims, true);
    }

    /// `x` with inverted dropout applied (`dropout_f32`: the same mask formula as the CPU's
    /// `Dropout::factor`); `None` when dropout is off and `x` serves as it is.
    pub fn dropped(&self, x: &CudaSlice<f32>, d: Dropout) -> Option<CudaSlice<f32>> {
        if !d.is_active() {
            return None;
        }
        let n = x.len();
        let mut out = self.scratch(n);
        let a0 = n as i64;
        launch!(self, "dropout_f32", grid_for(n); x, &mut out, &d.seed, &d.p, &a0);
        Some(out)
    }

    /// `y (m, rows) += scale · u (m, r) · Bᵀ` by cuBLAS (TF32, or f32 in precise mode): the B product
    /// where the fused `lora_up` does not run.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lora_b_product_cublas(
        &self,
        u: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        m: usize,
        rows: usize,
        r: usize,
        scale: f32,
        y: &mut CudaSlice<f32>,
    ) {
        // y (m, rows) += scale · u · Bᵀ
        ck!(
            self.blas.gemm_rm(
                self.lora_math(),
                false,
                true,
                m,
                rows,
                r,
                scale,
                OperandView::F32(u),
                r,
                OperandView::F32(b),
                r,
                1.0,
                y,
                rows
            ),
            "LoRA B GEMM"
        );
    }
}
