//! Launchers of kernels/flash.cu (tensor-core attention, RoPE optionally inside), kernels/attention.cu
//! (f32 attention: decoding, other head sizes, precise mode) and kernels/rope.cu's rotated bf16
//! conversion. CPU reference: `Cpu::attention`, `Cpu::attention_backward` and the composed
//! `rope_attention` of backend/mod.rs.

use super::gemm::OperandView;
use super::{grid_for, push_opt, tma, Cuda};
use crate::backend::{AttnShape, RopeTables};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use half::bf16;

/// An attention call's saved q, k and v ([`Backend::AttnActs`](crate::backend::Backend::AttnActs)).
pub enum AttnActs {
    /// As the projections wrote them (calls the flash kernels do not take).
    F32 { q: CudaSlice<f32>, k: CudaSlice<f32>, v: CudaSlice<f32> },
    /// q and k rotated by RoPE, all three rounded to bf16: what the flash kernels read, converted once
    /// for the forward pass, its replay's, and the backward instead of in each.
    Bf16 { q: CudaSlice<bf16>, k: CudaSlice<bf16>, v: CudaSlice<bf16> },
}

/// The queries of a flash forward launch.
#[derive(Clone, Copy)]
pub(super) enum FlashQ<'a> {
    /// f32, rotated by the tables (when given) as the kernel loads them.
    F32(&'a CudaSlice<f32>, Option<RopeTables<'a, Cuda>>),
    /// bf16, already rotated.
    Bf16(&'a CudaSlice<bf16>),
}

/// Dynamic shared memory of kernels/flash_wgmma.cu's forward (`WSMEM`): Q, two stages of K and one of
/// V, 64 rows × 128 bf16 each (16 KB), the two stages' 64 key segment ids, four 8-byte mbarriers, and
/// 1,024 bytes of alignment slack (three blocks fit an SM).
pub(super) const FLASH_WGMMA_SMEM: usize = 4 * 64 * 128 * 2 + 2 * 64 * 4 + 4 * 8 + 1024;

/// Dynamic shared memory of kernels/flash_wgmma.cu's backward (`BWD2_SMEM`, `BWD2_SMEM_ROPE`): K and V
/// (128 rows × 128 bf16 each), Q and dO of two steps (64 rows each), each warpgroup's dSᵀ (64 × 64
/// bf16); lse, delta and query segment ids of two steps (64 each) and 128 key segment ids, 4 bytes
/// each; the dQ tile (64 × 136 f32) and the dQ writer's cos and sin rows of a step (64 × 64 f32 each),
/// whose place the epilogue's key tables take with RoPE (cos and sin rows of 128 keys, 128 × 72 f32
/// each); 1,024 bytes of alignment slack.
pub(super) fn flash_wgmma_bwd_smem(rope: bool) -> usize {
    let tiles = 2 * (2 * 128 * 128 + 2 * 2 * 64 * 128 + 2 * 64 * 64);
    let small = 4 * (3 * 2 * 64 + 128);
    let dq_writer = 64 * 136 * 4 + 2 * 64 * 64 * 4;
    let key_tables = 2 * 128 * 72 * 4;
    tiles + small + if rope { dq_writer.max(key_tables) } else { dq_writer } + 1024
}

/// Threads of kernels/flash_wgmma.cu's backward (`BWD2_THREADS`): two warpgroups on the products and
/// the dQ writer.
pub(super) const FLASH_WGMMA_BWD_THREADS: u32 = 384;

/// Warps per query row of the non-flash attention forward (kernels/attention.cu, SPLIT_WARPS).
pub(super) const ATTENTION_SPLIT_WARPS: u32 = 8;

pub(super) fn geom(sh: AttnShape) -> [i32; 8] {
    [sh.batch, sh.q_len, sh.kv_len, sh.kv_capacity, sh.heads, sh.kv_heads, sh.head_dim, sh.q_offset].map(|x| x as i32)
}

/// The flash kernels' geometry (kernels/flash.cu, FGEOM_ARGS): head_dim is a template parameter.
pub(super) fn flash_geom(sh: AttnShape) -> [i32; 7] {
    [sh.batch, sh.q_len, sh.kv_len, sh.kv_capacity, sh.heads, sh.kv_heads, sh.q_offset].map(|x| x as i32)
}

/// `sizeof(BwdSmem<HD>)` of kernels/flash.cu: K, V (64 × (HD+8)), two buffers each of Q and dO
/// (32 × (HD+8)), dS (32 × 72), all bf16; then lse, delta, query segments (2 × 32 each) and key
/// segments (64), 4 bytes each; with RoPE tables, `RopeSmem<HD>` after it.
pub(super) fn flash_bwd_smem(hd: usize, rope: bool) -> usize {
    let base = 2 * (2 * 64 * (hd + 8) + 2 * 2 * 32 * (hd + 8) + 32 * 72) + 4 * (3 * 2 * 32 + 64);
    // RopeSmem<HD>: cos and sin rows of two query blocks, 32 × (HD/2 + 8) f32 each.
    base + if rope { 2 * 2 * 32 * (hd / 2 + 8) * 4 } else { 0 }
}

pub(super) fn warp_grid(warps: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((warps * 32).div_ceil(128).max(1) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Pushes a geometry's values as separate `int` arguments.
pub(super) fn push_geom<'a, const N: usize>(b: &mut cudarc::driver::LaunchArgs<'a>, g: &'a [i32; N]) {
    for x in g {
        b.arg(x);
    }
}

impl Cuda {
    /// Whether attention of shape `sh` runs on the tensor-core flash kernels (kernels/flash.cu): head
    /// sizes 64 and 128 with at least 16 queries (training, prefill); otherwise the f32 kernels of
    /// attention.cu (other head sizes, decoding). Precise mode never takes them ([`Cuda::set_precise`]).
    pub fn uses_flash(sh: &AttnShape) -> bool {
        matches!(sh.head_dim, 64 | 128) && sh.q_len >= 16
    }

    /// Whether this attention call takes the flash kernels (never in precise mode).
    pub(super) fn flash(&self, sh: &AttnShape) -> bool {
        Cuda::uses_flash(sh) && !self.is_precise()
    }

    /// A packed batch's segment ids (one per key row) copied to the device for an attention launch.
    pub(super) fn segments_on_device(&self, segments: Option<&[u32]>) -> Option<CudaSlice<u32>> {
        segments.map(|s| ck!(self.stream.clone_htod(s), "upload segments"))
    }

    /// The block-per-query-row attention of kernels/attention.cu; with `pos`, the geometry's q_offset
    /// and kv_len come from the device (`pos[0]`, `pos[0] + q_len`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_split(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        sh: AttnShape,
        seg: Option<&CudaSlice<u32>>,
        pos: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        let mut b = self.stream.launch_builder(self.f("attention_fwd_f32"));
        b.arg(q).arg(k).arg(v);
        push_opt(&mut b, seg);
        push_opt(&mut b, pos);
        b.arg(out).arg(lse);
        let g = geom(sh);
        push_geom(&mut b, &g);
        let cfg = LaunchConfig {
            grid_dim: ((sh.batch * sh.heads * sh.q_len) as u32, 1, 1),
            block_dim: (ATTENTION_SPLIT_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads q/k/v/seg within the geometry and writes one out row and lse per block.
        ck!(unsafe { b.launch(cfg) }, "attention_fwd_f32");
    }

    /// K and V of a flash launch in bf16 (kernels/flash.cu reads them by cp.async): the rows the kernel
    /// may read, K rotated by `rope` when given (kernels/rope.cu `rope_bf16`).
    pub(super) fn kv_bf16(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        rope: Option<RopeTables<'_, Self>>,
        sh: AttnShape,
    ) -> (CudaSlice<bf16>, CudaSlice<bf16>) {
        let rows = if sh.batch == 1 { sh.kv_len } else { sh.batch * sh.kv_capacity };
        let n = rows * sh.kv_heads * sh.head_dim;
        let kb = match rope {
            Some(r) => self.rope_bf16(OperandView::F32(k), r, sh.kv_heads, sh.head_dim),
            None => self.bf16_prefix(k, n),
        };
        (kb, self.bf16_prefix(v, n))
    }

    /// `x (rows, heads, head_dim)` (f32, or a 16-bit product as cuBLAS wrote it) rotated by `rope` and
    /// rounded to bf16, in a fresh buffer (kernels/rope.cu `rope_bf16`, `rope_bf16_from_*`).
    pub(super) fn rope_bf16(
        &self,
        x: OperandView<'_>,
        rope: RopeTables<'_, Self>,
        heads: usize,
        head_dim: usize,
    ) -> CudaSlice<bf16> {
        let _span = self.span("RoPE into bf16");
        let n = x.len();
        assert!(head_dim % 8 == 0, "rope_bf16: head_dim {head_dim} is not a multiple of 8");
        let rows = n / (heads * head_dim);
        assert!(rope.cos.len() >= rows * head_dim / 2, "rope_bf16: fewer table rows than x rows");
        // SAFETY: the kernel writes all n values before anything reads them.
        let mut out = ck!(unsafe { self.stream.alloc::<bf16>(n.max(1)) }, "alloc");
        let (r32, h32, d32) = (rows as i32, heads as i32, head_dim as i32);
        let cfg = grid_for(n / 8);
        match x {
            OperandView::F32(x) => launch!(self, "rope_bf16", cfg; x, rope.cos, rope.sin, &mut out, &r32, &h32, &d32),
            OperandView::BF16(x) => {
                launch!(self, "rope_bf16_from_bf16", cfg; x, rope.cos, rope.sin, &mut out, &r32, &h32, &d32)
            }
            OperandView::F16(x) => {
                launch!(self, "rope_bf16_from_f16", cfg; x, rope.cos, rope.sin, &mut out, &r32, &h32, &d32)
            }
        }
        out
    }

    /// The flash forward (kernels/flash.cu `flash_fwd_hd*`) of f32 inputs: q rotated as it is loaded
    /// and K by its conversion when `rope` is given.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_forward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        rope: Option<RopeTables<'_, Self>>,
        sh: AttnShape,
        seg: Option<&CudaSlice<u32>>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        let (kb, vb) = self.kv_bf16(k, v, rope, sh);
        self.flash_forward_launch(FlashQ::F32(q, rope), (&kb, &vb), sh, seg, out, lse);
    }

    /// The flash forward launch over bf16 K and V: `q` f32 (rotated by its tables, if any, as it is
    /// loaded) or bf16 as it is (already rotated). Head size 128 from bf16 q takes the wgmma kernel
    /// (kernels/flash_wgmma.cu, the same contract as `flash_fwd_hd128`) where it is switched on.
    pub(super) fn flash_forward_launch(
        &self,
        q: FlashQ<'_>,
        (kb, vb): (&CudaSlice<bf16>, &CudaSlice<bf16>),
        sh: AttnShape,
        seg: Option<&CudaSlice<u32>>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        let wgmma = matches!(q, FlashQ::Bf16(_)) && sh.head_dim == 128 && self.uses_flash_wgmma().0;
        let kernel = match (sh.head_dim, wgmma) {
            (64, _) => "flash_fwd_hd64",
            (_, false) => "flash_fwd_hd128",
            (_, true) => "flash_fwd_wgmma_hd128",
        };
        let mut b = self.stream.launch_builder(self.f(kernel));
        // flash.cu's kernels take q as f32 or bf16 (one of them null) and RoPE tables; the wgmma
        // kernel only bf16 q, already rotated.
        let rope = match q {
            FlashQ::F32(q, rope) => {
                b.arg(q);
                push_opt(&mut b, None::<&CudaSlice<bf16>>);
                rope
            }
            FlashQ::Bf16(q) => {
                if !wgmma {
                    push_opt(&mut b, None::<&CudaSlice<f32>>);
                }
                b.arg(q);
                None
            }
        };
        b.arg(kb).arg(vb);
        push_opt(&mut b, seg);
        if !wgmma {
            push_opt(&mut b, rope.map(|r| r.cos));
            push_opt(&mut b, rope.map(|r| r.sin));
        }
        b.arg(out).arg(lse);
        let g = flash_geom(sh);
        push_geom(&mut b, &g);
        // The wgmma kernel reads its tiles by the copy engine, through tensor maps of q, k and v.
        let maps = match (wgmma, q) {
            (true, FlashQ::Bf16(q)) => {
                let map = |t, rows| ck!(tma::head_rows(&self.stream, t, rows), "tensor map");
                let kv_rows = (sh.batch, sh.kv_capacity, sh.kv_len, sh.kv_heads);
                Some([map(q, (sh.batch, sh.q_len, sh.q_len, sh.heads)), map(kb, kv_rows), map(vb, kv_rows)])
            }
            _ => None,
        };
        for m in maps.iter().flatten() {
            b.arg(m);
        }
        // Query blocks of 64, the heaviest of every head first: flash.cu's on z; the wgmma kernel's on y
        // with the batch on z (one batch row's blocks together, sharing its K and V in L2).
        let query_blocks = sh.q_len.div_ceil(64) as u32;
        let cfg = LaunchConfig {
            grid_dim: if wgmma {
                (sh.heads as u32, query_blocks, sh.batch as u32)
            } else {
                (sh.heads as u32, sh.batch as u32, query_blocks)
            },
            block_dim: (128, 1, 1),
            shared_mem_bytes: if wgmma { FLASH_WGMMA_SMEM as u32 } else { 0 },
        };
        // SAFETY: the kernel reads q, K, V, seg and the tables within the geometry and writes out and
        // lse rows of its own queries; the wgmma kernel's shared memory is FLASH_WGMMA_SMEM, set as its
        // maximum in Cuda::new.
        ck!(unsafe { b.launch(cfg) }, kernel);
    }

    /// The flash backward (kernels/flash.cu `flash_bwd_prep_hd*`, `flash_bwd_hd*`) of f32 inputs: with
    /// `rope`, Q and K are rotated by their conversions and dq, dk come out un-rotated.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flash_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        rope: Option<RopeTables<'_, Self>>,
        out: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        sh: AttnShape,
        seg: Option<&CudaSlice<u32>>,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
    ) {
        let nq = sh.batch * sh.q_len * sh.heads * sh.head_dim;
        // SAFETY: flash_bwd_prep writes every value before anything reads it.
        let mut qb = ck!(unsafe { self.stream.alloc::<bf16>(nq) }, "alloc");
        let (delta, db) = self.flash_bwd_prep(Some((q, &mut qb)), rope, out, dout, sh, dq);
        let (kb, vb) = self.kv_bf16(k, v, rope, sh);
        self.flash_backward_launch((&qb, &kb, &vb), rope, (lse, &delta, &db), sh, seg, (dq, dk, dv));
    }

    /// What the backward kernel reads of the queries besides Q (kernels/flash.cu `flash_bwd_prep_hd*`,
    /// one pass over out and dout): delta = rowsum(dO ⊙ O) `(batch, heads, q_len)` and dO in bf16; with
    /// `q`, also the f32 q rounded (and rotated by `rope`) into its bf16 buffer; `dq` zeroed for the
    /// backward kernel's reductions ([`Cuda::flash_backward_launch`]).
    pub(super) fn flash_bwd_prep(
        &self,
        q: Option<(&CudaSlice<f32>, &mut CudaSlice<bf16>)>,
        rope: Option<RopeTables<'_, Self>>,
        out: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        sh: AttnShape,
        dq: &mut CudaSlice<f32>,
    ) -> (CudaSlice<f32>, CudaSlice<bf16>) {
        let nq = sh.batch * sh.q_len * sh.heads * sh.head_dim;
        let mut delta = self.scratch(sh.batch * sh.heads * sh.q_len);
        // SAFETY: flash_bwd_prep writes every value before anything reads it.
        let mut db = ck!(unsafe { self.stream.alloc::<bf16>(nq) }, "alloc");
        let prep = if sh.head_dim == 64 { "flash_bwd_prep_hd64" } else { "flash_bwd_prep_hd128" };
        let threads = sh.batch * sh.q_len * sh.heads * (sh.head_dim / 8);
        let cfg = LaunchConfig {
            grid_dim: (threads.div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b32, q32, h32) = (sh.batch as i32, sh.q_len as i32, sh.heads as i32);
        let mut b = self.stream.launch_builder(self.f(prep));
        let (q, qb) = match q {
            Some((q, qb)) => (Some(q), Some(qb)),
            None => (None, None),
        };
        push_opt(&mut b, q);
        b.arg(out).arg(dout);
        push_opt(&mut b, rope.map(|r| r.cos));
        push_opt(&mut b, rope.map(|r| r.sin));
        push_opt(&mut b, qb);
        b.arg(&mut db).arg(&mut delta).arg(dq).arg(&b32).arg(&q32).arg(&h32);
        // SAFETY: one row of HD/8 threads per query row, each reading and writing its own row.
        ck!(unsafe { b.launch(cfg) }, prep);
        (delta, db)
    }

    /// The flash backward launch over bf16 Q (rotated), K (rotated) and V: dq, dk un-rotated by the
    /// tables when there are any; dq zero beforehand ([`Cuda::flash_bwd_prep`] zeroes it).
    pub(super) fn flash_backward_launch(
        &self,
        (qb, kb, vb): (&CudaSlice<bf16>, &CudaSlice<bf16>, &CudaSlice<bf16>),
        rope: Option<RopeTables<'_, Self>>,
        (lse, delta, db): (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<bf16>),
        sh: AttnShape,
        seg: Option<&CudaSlice<u32>>,
        (dq, dk, dv): (&mut CudaSlice<f32>, &mut CudaSlice<f32>, &mut CudaSlice<f32>),
    ) {
        // dq is accumulated with atomics: the prep pass zeroed it (−1.9% of the backward against a
        // memset launch, session 43). dk/dv rows from kv_len on are not written, so they are zeroed
        // only when there are such rows.
        if sh.kv_len < sh.kv_capacity {
            ck!(self.stream.memset_zeros(dk), "memset");
            ck!(self.stream.memset_zeros(dv), "memset");
        }
        let wgmma = sh.head_dim == 128 && self.uses_flash_wgmma().1;
        let kernel = match (sh.head_dim, wgmma) {
            (64, _) => "flash_bwd_hd64",
            (_, false) => "flash_bwd_hd128",
            (_, true) => "flash_bwd_wgmma_hd128",
        };
        let mut b = self.stream.launch_builder(self.f(kernel));
        b.arg(qb).arg(kb).arg(vb).arg(lse).arg(delta).arg(db);
        push_opt(&mut b, seg);
        push_opt(&mut b, rope.map(|r| r.cos));
        push_opt(&mut b, rope.map(|r| r.sin));
        b.arg(&mut *dq).arg(&mut *dk).arg(&mut *dv);
        let g = flash_geom(sh);
        push_geom(&mut b, &g);
        // The heaviest key blocks of every head start first. flash.cu: 64 keys and one warpgroup per
        // block, key blocks on z; flash_wgmma.cu: 128 keys, two warpgroups on the products and the dQ
        // writer, key blocks on y and the batch on z (one batch row's blocks together, sharing its Q, dO
        // and dq in L2).
        let cfg = if wgmma {
            LaunchConfig {
                grid_dim: (sh.kv_heads as u32, sh.kv_len.div_ceil(128) as u32, sh.batch as u32),
                block_dim: (FLASH_WGMMA_BWD_THREADS, 1, 1),
                shared_mem_bytes: flash_wgmma_bwd_smem(rope.is_some()) as u32,
            }
        } else {
            LaunchConfig {
                grid_dim: (sh.kv_heads as u32, sh.batch as u32, sh.kv_len.div_ceil(64) as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: flash_bwd_smem(sh.head_dim, rope.is_some()) as u32,
            }
        };
        // SAFETY: the kernel reads its inputs within the geometry, adds into dq (zeroed above) and writes
        // the dk/dv rows below kv_len.
        ck!(unsafe { b.launch(cfg) }, kernel);
    }

    /// Saved attention inputs' values on the host, widened to f32 exactly: `[q, k, v]` (tests).
    pub fn attn_acts_to_host(&self, acts: &AttnActs) -> [Vec<f32>; 3] {
        let wide =
            |x: &CudaSlice<bf16>| ck!(self.stream.clone_dtoh(x), "download").into_iter().map(bf16::to_f32).collect();
        match acts {
            AttnActs::F32 { q, k, v } => [q, k, v].map(|x| ck!(self.stream.clone_dtoh(x), "download")),
            AttnActs::Bf16 { q, k, v } => [q, k, v].map(wide),
        }
    }

    /// Saved attention inputs ([`Backend::attn_acts`](crate::backend::Backend::attn_acts)): in bf16 as
    /// the flash kernels read them (q and k rotated by `rope`, kernels/rope.cu `rope_bf16`) where the
    /// flash kernels take the call and the shape is square; otherwise the f32 buffers as they are.
    pub(super) fn saved_attention_inputs(
        &self,
        [q, k, v]: [CudaSlice<f32>; 3],
        rope: RopeTables<'_, Self>,
        sh: AttnShape,
    ) -> AttnActs {
        if !self.flash(&sh) || !sh.is_square() {
            return AttnActs::F32 { q, k, v };
        }
        let _span = self.span("attention inputs saved (bf16, rotated)");
        let n = v.len();
        AttnActs::Bf16 {
            q: self.rope_bf16(OperandView::F32(&q), rope, sh.heads, sh.head_dim),
            k: self.rope_bf16(OperandView::F32(&k), rope, sh.kv_heads, sh.head_dim),
            v: self.bf16_prefix(&v, n),
        }
    }
    /// The f32 backward of kernels/attention.cu: dq and delta = rowsum(dO ⊙ O) with a warp per query
    /// row (`attention_bwd_dq_f32`), then dk and dv with a warp per key row (`attention_bwd_dkdv_f32`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention_split_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        sh: AttnShape,
        seg: Option<&CudaSlice<u32>>,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
    ) {
        let mut delta = self.scratch(sh.batch * sh.heads * sh.q_len);
        let g = geom(sh);
        let mut b = self.stream.launch_builder(self.f("attention_bwd_dq_f32"));
        b.arg(q).arg(k).arg(v).arg(out).arg(lse).arg(dout);
        push_opt(&mut b, seg);
        b.arg(&mut *dq).arg(&mut delta);
        push_geom(&mut b, &g);
        // SAFETY: a warp per query row reads q/k/v/out/dout/seg within the geometry and writes that
        // row of dq and its delta.
        ck!(unsafe { b.launch(warp_grid(sh.batch * sh.heads * sh.q_len)) }, "attention_bwd_dq_f32");
        ck!(self.stream.memset_zeros(dk), "memset");
        ck!(self.stream.memset_zeros(dv), "memset");
        let mut b = self.stream.launch_builder(self.f("attention_bwd_dkdv_f32"));
        b.arg(q).arg(k).arg(v).arg(lse).arg(&delta).arg(dout);
        push_opt(&mut b, seg);
        b.arg(&mut *dk).arg(&mut *dv);
        push_geom(&mut b, &g);
        // SAFETY: a warp per key row reads the inputs within the geometry and writes that row of dk
        // and dv (zeroed above: rows from kv_len on are not written).
        ck!(unsafe { b.launch(warp_grid(sh.batch * sh.kv_heads * sh.kv_len)) }, "attention_bwd_dkdv_f32");
    }
}
