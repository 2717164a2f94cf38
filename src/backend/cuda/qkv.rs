//! Training's q, k and v projections straight into attention's saved inputs
//! ([`Backend::qkv_attn_acts`](crate::backend::Backend::qkv_attn_acts)). The flash kernels read q and
//! k rotated and all three in bf16 (`AttnActs::Bf16`); the composed path gets there through f32: each
//! 4-bit product written by cuBLAS in 16 bits, widened into f32 (with its LoRA B product added), then
//! rotated and rounded to bf16 again. Here the 16-bit product goes to bf16 in one pass instead:
//! `lora_up_acts_*` (kernels/lora_fused.cu: the B product, RoPE and the rounding) for a projection
//! with a LoRA branch, `rope_bf16_from_*` (kernels/rope.cu) for q or k without one, and v without one
//! is cuBLAS's bf16 output as it is. Each step computes the same f32 values as the composed one and
//! rounds them once at the same point, so the saved inputs are the composed path's bit for bit; what
//! goes is ~64 MB of f32 traffic per 7B projection and pass, and a launch or two.
//! CPU reference: the trait's default, `qkv_attn_acts_composed` (backend/mod.rs).

use super::attention::AttnActs;
use super::blas;
use super::gemm::{Gemm, Operand, OperandView};
use super::lora::lora_up_launch;
use super::quant4::GEMV_MAX_M;
use super::{grid_for, Cuda, CudaWeight};
use crate::backend::{AttnShape, LoraDown, RopeTables};
use crate::config::ComputeDtype;
use cudarc::driver::{result, CudaSlice, DevicePtrMut, PushKernelArg};
use half::{bf16, f16};

impl Cuda {
    /// The compute dtype of the direct path when it takes these products: not in precise mode; a
    /// square flash shape; past decoding's few rows; all three weights 4-bit with one 16-bit compute
    /// dtype, on the second path (cuBLAS: the fused 4-bit kernel writes f32); every LoRA branch of a
    /// rank the fused `lora_up` handles.
    pub fn qkv_direct(
        &self,
        ws: &[&CudaWeight],
        m: usize,
        loras: &[Option<LoraDown<'_, Self>>],
        r: usize,
        sh: &AttnShape,
    ) -> Option<ComputeDtype> {
        if self.is_precise() || !self.flash(sh) || !sh.is_square() || m <= GEMV_MAX_M || ws.len() != 3 {
            return None;
        }
        let CudaWeight::Quant4 { compute: c @ (ComputeDtype::BF16 | ComputeDtype::F16), .. } = ws[0] else {
            return None;
        };
        let same_path = ws
            .iter()
            .all(|w| matches!(w, CudaWeight::Quant4 { compute, .. } if compute == c) && !self.uses_fused_4bit(w, m));
        let branches_fit = ws.iter().zip(loras).all(|(w, l)| l.is_none() || self.uses_fused_lora_up(w.shape().0, r));
        (same_path && branches_fit).then_some(*c)
    }

    /// [`Backend::qkv_attn_acts`](crate::backend::Backend::qkv_attn_acts) on the direct path
    /// ([`Cuda::qkv_direct`] gave `c`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn qkv_attn_acts_direct(
        &self,
        x: &CudaSlice<f32>,
        ws: &[&CudaWeight],
        m: usize,
        loras: &mut [Option<LoraDown<'_, Self>>],
        (r, scale): (usize, f32),
        rope: RopeTables<'_, Self>,
        sh: AttnShape,
        c: ComputeDtype,
    ) -> AttnActs {
        let _span = self.span("q/k/v products into attention inputs (bf16)");
        let cols = ws[0].shape().1;
        // With the B products along k ([`Cuda::set_lora_b_concat`]): x and a branch's scale·u side by
        // side, [x | scale·u] (m, cols + r) in the compute dtype, the u columns written anew for each
        // branch after the previous product has read them (one stream).
        let concat = self.lora_b_concat_applies(cols, r, loras);
        let mut xc = self.x_in_16_bit(x, (m, cols), if concat { cols + r } else { cols }, c);
        self.branch_us(x, loras, m, r);
        // (heads, rotated) of q, k and v.
        let layout = [(sh.heads, true), (sh.kv_heads, true), (sh.kv_heads, false)];
        let mut saved = Vec::with_capacity(3);
        for ((w, slot), (heads, rotated)) in ws.iter().zip(loras.iter_mut()).zip(layout) {
            let rows = w.shape().0;
            assert_eq!(rows, heads * sh.head_dim, "qkv_attn_acts: a projection of the wrong width");
            let tables = rotated.then_some(rope);
            let o16 = self.product_16_with_lora(x, w, slot, &mut xc, (m, r, scale), concat, c, "q/k/v GEMM");
            saved.push(match slot.take() {
                // The B product left to the fused kernel ([`Cuda::set_lora_b_gemm`] off), with RoPE
                // and the rounding in the same pass.
                Some(mut l) => {
                    self.branch_u(x, &mut l, m, r);
                    self.lora_up_acts(&o16, l.u, l.b, (m, rows, r), scale, tables, sh.head_dim)
                }
                None => self.as_attn_input(o16, tables, heads, sh.head_dim),
            });
        }
        let [q, k, v]: [CudaSlice<bf16>; 3] = saved.try_into().expect("three projections");
        AttnActs::Bf16 { q, k, v }
    }

    /// A branch's frozen product with its B product along k: `[x | scale·u] · [W | B]ᵀ` (m, rows), one
    /// GEMM written in the 16-bit dtype `c`, the sum rounded once. `xc` holds x (m, cols) in `c` with
    /// rows `ld = cols + r` apart, whose last r columns take this branch's `scale·u` (computed here
    /// unless ready); `wb` is w's expansion with the same stride ([`Cuda::dequantize_ld`]), whose last
    /// r columns take B. The expansion is kept for the input gradient when the replay keeps them.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn product_with_b_along_k(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        mut wb: Operand,
        l: &mut LoraDown<'_, Self>,
        xc: &mut Operand,
        (m, r, scale): (usize, usize, f32),
        c: ComputeDtype,
    ) -> Operand {
        let (rows, cols) = w.shape();
        let ld = cols + r;
        self.branch_u(x, l, m, r);
        self.scaled_into(l.u, (m, r), scale, xc, ld, cols);
        self.scaled_into(l.b, (rows, r), 1.0, &mut wb, ld, cols);
        let wb = self.keep_expansion(w, wb, ld);
        let product =
            Gemm { lda: ld, ldb: ld, ..Gemm::forward(m, rows, ld, OperandView::from(&*xc), OperandView::from(&*wb)) };
        self.gemm_16(&product, c, "GEMM with the LoRA B product along k")
    }

    /// x (m, cols) in the 16-bit dtype `c` with rows `ld` apart, as training's products read it: `ld =
    /// cols + r` leaves the last r columns of each row to the branches' scale·u (B along k).
    pub(super) fn x_in_16_bit(
        &self,
        x: &CudaSlice<f32>,
        (m, cols): (usize, usize),
        ld: usize,
        c: ComputeDtype,
    ) -> Operand {
        if ld == cols {
            return self.convert(x, c).expect("a 16-bit compute dtype");
        }
        let mut xu = self.alloc_16(m * ld, c);
        self.scaled_into(x, (m, cols), 1.0, &mut xu, ld, 0);
        xu
    }

    /// A frozen product written in the 16-bit dtype `c`, with the LoRA B product of the branch in
    /// `slot` in it where one is there: along k ([`Cuda::product_with_b_along_k`], when `concat`), else
    /// added by cuBLAS ([`Cuda::lora_b_into_product`]); the branch is taken from the slot then. With
    /// [`Cuda::set_lora_b_gemm`] off and not along k, the slot is left to the caller. `xc`: x in `c`
    /// ([`Cuda::x_in_16_bit`], rows `cols + r` apart when `concat`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn product_16_with_lora(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        slot: &mut Option<LoraDown<'_, Self>>,
        xc: &mut Operand,
        (m, r, scale): (usize, usize, f32),
        concat: bool,
        c: ComputeDtype,
        what: &str,
    ) -> Operand {
        let (rows, cols) = w.shape();
        let ld = if concat { cols + r } else { cols };
        let wb = match slot.as_ref() {
            Some(_) if concat => self.dequantize_ld(w, ld),
            _ => None,
        };
        // (The slot is taken only where its branch is used: a tuple pattern would take it even where
        // wb is None, and the branch would be lost.)
        if let Some(wb) = wb {
            let mut l = slot.take().expect("wb is expanded only for a projection with a branch");
            return self.product_with_b_along_k(x, w, wb, &mut l, xc, (m, r, scale), c);
        }
        let mut o16 = {
            let (wop, _) = self.weight_operand(w);
            let product = Gemm { lda: ld, ..Gemm::forward(m, rows, cols, OperandView::from(&*xc), wop.as_ref()) };
            self.gemm_16(&product, c, what)
        };
        if self.lora_b_by_gemm() {
            if let Some(mut l) = slot.take() {
                self.branch_u(x, &mut l, m, r);
                self.lora_b_into_product(&mut o16, l.u, l.b, (m, rows, r), scale);
            }
        }
        o16
    }

    /// A 16-bit product (its LoRA B product in it, if any) as attention's saved input: rotated by
    /// `tables` into bf16 (`rope_bf16_from_*`), as it is (bf16), or converted (f16).
    fn as_attn_input(
        &self,
        o16: Operand,
        tables: Option<RopeTables<'_, Self>>,
        heads: usize,
        head_dim: usize,
    ) -> CudaSlice<bf16> {
        match (tables, o16) {
            (Some(t), o16) => self.rope_bf16(OperandView::from(&o16), t, heads, head_dim),
            (None, Operand::BF16(o)) => o,
            (None, Operand::F16(o)) => self.bf16_of_f16(&o),
            (None, Operand::F32(_)) => unreachable!("gemm_16 writes a 16-bit product"),
        }
    }

    /// Whether training's products take their LoRA B products along k (`[x | scale·u] · [W | B]ᵀ`, one
    /// GEMM per projection, [`Cuda::set_lora_b_concat`]): switched on, with the B products by cuBLAS
    /// ([`Cuda::set_lora_b_gemm`]), some branch present, in-features a multiple of 1,024 (the strided
    /// expansion's segments) and r of 8 (16-byte rows).
    pub(super) fn lora_b_concat_applies(&self, cols: usize, r: usize, loras: &[Option<LoraDown<'_, Self>>]) -> bool {
        self.lora_b_concat.load(std::sync::atomic::Ordering::Relaxed)
            && self.lora_b_by_gemm()
            && cols % 1024 == 0
            && r % 8 == 0
            && loras.iter().any(Option::is_some)
    }

    /// Training's LoRA B products along k of their frozen products (`true`, the default: the q/k/v path
    /// and `Cuda::products_with_lora`) or by a second GEMM into each 16-bit product (`false`,
    /// `LLAMATUNE_LORA_B_CONCAT=0`; for A/B runs and tests).
    /// Why: the second GEMM reads and writes the whole product again (~16 µs per 7B projection on
    /// the H200, session 18's events profile) where r more columns of k cost the first one ~1.6%.
    /// The values: the sum is rounded to 16 bits once instead of twice.
    pub fn set_lora_b_concat(&self, on: bool) {
        self.lora_b_concat.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// A fresh uninitialized 16-bit operand of `n` values in dtype `c`.
    /// With `LLAMATUNE_POISON=1` it starts as NaN (0xFFFF in either dtype), as [`Cuda::scratch`] does.
    pub(super) fn alloc_16(&self, n: usize, c: ComputeDtype) -> Operand {
        // SAFETY: every caller writes the values its GEMMs read before they run.
        let mut o = match c {
            ComputeDtype::BF16 => Operand::BF16(ck!(unsafe { self.stream.alloc::<bf16>(n.max(1)) }, "alloc")),
            ComputeDtype::F16 => Operand::F16(ck!(unsafe { self.stream.alloc::<f16>(n.max(1)) }, "alloc")),
            ComputeDtype::F32 => unreachable!("a 16-bit operand"),
        };
        if self.poison {
            let (ptr, _rec) = match &mut o {
                Operand::BF16(b) => b.device_ptr_mut(&self.stream),
                Operand::F16(h) => h.device_ptr_mut(&self.stream),
                Operand::F32(_) => unreachable!("a 16-bit operand"),
            };
            // SAFETY: `ptr` addresses the `n.max(1)` 16-bit values of `o`, alive for the whole call.
            ck!(unsafe { result::memset_d8_async(ptr, 0xff, n.max(1) * 2, self.stream.cu_stream()) }, "poison");
        }
        o
    }

    /// `out[i·ld + col0 + j] = 16-bit(s · x[i·cols + j])` for `x (rows, cols)` (kernels/elementwise.cu
    /// `scaled_f32_to_*_2d`): a block of columns of a 16-bit GEMM operand with rows `ld` apart.
    pub(super) fn scaled_into(
        &self,
        x: &CudaSlice<f32>,
        (rows, cols): (usize, usize),
        s: f32,
        out: &mut Operand,
        ld: usize,
        col0: usize,
    ) {
        assert!(x.len() >= rows * cols && col0 + cols <= ld && out.len() >= rows * ld, "scaled_into: bad shapes");
        let (r32, c32, ld64, c0) = (rows as i32, cols as i32, ld as i64, col0 as i32);
        let cfg = grid_for(rows * cols / 4 + 1);
        match out {
            Operand::BF16(o) => launch!(self, "scaled_f32_to_bf16_2d", cfg; x, o, &r32, &c32, &ld64, &c0, &s),
            Operand::F16(o) => launch!(self, "scaled_f32_to_f16_2d", cfg; x, o, &r32, &c32, &ld64, &c0, &s),
            Operand::F32(_) => unreachable!("a 16-bit operand"),
        }
    }

    /// `bf16(rope(widen(o16) + scale · u · Bᵀ))` (kernels/lora_fused.cu `lora_up_acts_*`): a
    /// projection's 16-bit product `o16 (m, n)` with its LoRA B product (`u (m, r)`, `b (n, r)`)
    /// added, rotated by `rope` (heads of `head_dim`) when given, in bf16.
    #[allow(clippy::too_many_arguments)]
    fn lora_up_acts(
        &self,
        o16: &Operand,
        u: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        (m, n, r): (usize, usize, usize),
        scale: f32,
        rope: Option<RopeTables<'_, Self>>,
        head_dim: usize,
    ) -> CudaSlice<bf16> {
        let _span = self.span("LoRA B (+ RoPE) into bf16");
        let rope_hd = if rope.is_some() { head_dim } else { 0 };
        assert!(rope_hd % 64 == 0 && n % 64 == 0, "lora_up_acts: {n} columns, head_dim {head_dim}");
        // Without rotation the tables are not read; any live buffer stands in for them.
        let (cos, sin) = rope.map_or((u, u), |t| (t.cos, t.sin));
        assert!(rope.is_none() || cos.len() >= m * head_dim / 2, "lora_up_acts: fewer table rows than x rows");
        // SAFETY: the kernel writes all m·n values before anything reads them.
        let mut out = ck!(unsafe { self.stream.alloc::<bf16>(m * n) }, "alloc");
        let (m32, n32, r32, hd32) = (m as i32, n as i32, r as i32, rope_hd as i32);
        let cfg = lora_up_launch(m, n);
        match o16 {
            Operand::BF16(o) => {
                launch!(self, "lora_up_acts_bf16", cfg; u, b, o, &mut out, cos, sin, &m32, &n32, &r32, &scale, &hd32)
            }
            Operand::F16(o) => {
                launch!(self, "lora_up_acts_f16", cfg; u, b, o, &mut out, cos, sin, &m32, &n32, &r32, &scale, &hd32)
            }
            Operand::F32(_) => unreachable!("a 16-bit product"),
        }
        out
    }

    /// `o16 (m, n) += 16-bit(scale · u) · 16-bit(B)ᵀ` in `o16`'s dtype: a LoRA branch's B product
    /// (`u (m, r)`, `b (n, r)`) added into its frozen product's cuBLAS output by one more cuBLAS GEMM
    /// (k = r, beta = 1; kernels/elementwise.cu `scaled_f32_to_*_2d` round its operands). Why: the fused
    /// `lora_up_acts_*` kernel took ~47 µs per 7B projection (latency-bound at low occupancy, see
    /// docs/PERF.md), where a GEMM reading and writing the 16 MB product has ~10 µs of traffic. The
    /// numbers: the branch's operands are rounded to 16 bits (TF32 in the kernel; f32 in PEFT, which
    /// then rounds the branch's output to 16 bits and adds it to the 16-bit product), the sum is taken
    /// in f32 and rounded once, as in the kernel.
    pub(super) fn lora_b_into_product(
        &self,
        o16: &mut Operand,
        u: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        (m, n, r): (usize, usize, usize),
        scale: f32,
    ) {
        let _span = self.span("LoRA B GEMM into the 16-bit product");
        assert!(u.len() >= m * r && b.len() == n * r && o16.len() == m * n, "lora_b_into_product: bad shapes");
        let c = match o16 {
            Operand::BF16(_) => ComputeDtype::BF16,
            Operand::F16(_) => ComputeDtype::F16,
            Operand::F32(_) => unreachable!("a 16-bit product"),
        };
        let (u16, b16) = (self.scaled_16(u, (m, r), scale, c), self.scaled_16(b, (n, r), 1.0, c));
        let g = Gemm::forward(m, n, r, OperandView::from(&u16), OperandView::from(&b16));
        let out = match o16 {
            Operand::BF16(o) => blas::GemmOut::BF16(o),
            Operand::F16(o) => blas::GemmOut::F16(o),
            Operand::F32(_) => unreachable!("a 16-bit product"),
        };
        self.gemm(&g, out, 1.0, "LoRA B GEMM");
    }

    /// `s · x (rows, cols)` rounded to the 16-bit dtype `c`, in a fresh buffer ([`Cuda::scaled_into`]
    /// with rows `cols` apart).
    fn scaled_16(&self, x: &CudaSlice<f32>, (rows, cols): (usize, usize), s: f32, c: ComputeDtype) -> Operand {
        let mut o = self.alloc_16(rows * cols, c);
        self.scaled_into(x, (rows, cols), s, &mut o, cols, 0);
        o
    }

    /// Whether a LoRA branch's forward B product goes into its frozen product's 16-bit output by
    /// cuBLAS (`Cuda::lora_b_into_product`; default) or by the fused kernels that add it as they
    /// widen the product (`lora_up_from_*`) or take it to attention's inputs (`lora_up_acts_*`)
    /// (`LLAMATUNE_LORA_B_GEMM=0`; for A/B runs and tests).
    pub fn set_lora_b_gemm(&self, on: bool) {
        self.lora_b_gemm.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Not in precise mode, whose LoRA products stay in exact f32.
    pub(super) fn lora_b_by_gemm(&self) -> bool {
        self.lora_b_gemm.load(std::sync::atomic::Ordering::Relaxed) && !self.is_precise()
    }

    /// An f16 product's values in bf16 (widened to f32 exactly, then rounded: the composed path's
    /// values).
    fn bf16_of_f16(&self, x: &CudaSlice<f16>) -> CudaSlice<bf16> {
        let n = x.len();
        let mut wide = self.scratch(n);
        let n64 = n as i64;
        launch!(self, "f16_to_f32", grid_for(n); x, &mut wide, &n64);
        self.bf16_prefix(&wide, n)
    }
}
