//! Frozen products on cuBLAS (the second path): GEMM operands in the compute dtypes, a 4-bit
//! weight's product written in its 16-bit compute dtype and widened into f32 (a LoRA B product added
//! in the same pass, kernels/lora_fused.cu `lora_up_from_*`), and the products of weights sharing x.
//! CPU reference: `Cpu::linear`, `Cpu::linear_backward_input` (backend/cpu.rs).

use super::blas::{self, F32Math};
use super::lora::lora_up_launch;
use super::quant4::GEMV_MAX_M;
use super::{grid_for, Cuda, CudaWeight, DenseData};
use crate::backend::{Dropout, LoraDown};
use crate::config::ComputeDtype;
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::{bf16, f16};
use std::sync::Arc;

/// A LoRA B product `alpha · drop(U · W'ᵀ)` to add to a frozen product's output ([`Cuda::lora_up`]'s
/// operands: `u (m, r)`, W' as `w (n, r)` or, when `w_is_rn`, `w (r, n)`).
pub(super) struct UpTail<'a> {
    pub(super) u: &'a CudaSlice<f32>,
    pub(super) w: &'a CudaSlice<f32>,
    pub(super) w_is_rn: bool,
    pub(super) r: usize,
    pub(super) alpha: f32,
    pub(super) dropout: Dropout,
}

/// One GEMM of a frozen weight: `a (m, k) · op(b)` with `op(b)` `(k, n)`, row-major (see `blas::gemm_rm`).
pub(super) struct Gemm<'a> {
    pub(super) trans_b: bool,
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) a: OperandView<'a>,
    pub(super) lda: usize,
    pub(super) b: OperandView<'a>,
    pub(super) ldb: usize,
}

impl<'a> Gemm<'a> {
    /// A forward product `x (m, k) · Wᵀ` of a weight `W (n, k)`.
    pub(super) fn forward(m: usize, n: usize, k: usize, x: OperandView<'a>, w: OperandView<'a>) -> Self {
        Gemm { trans_b: true, m, n, k, a: x, lda: k, b: w, ldb: k }
    }
    /// An input gradient `dy (m, k) · W` of a weight `W (k, n)`.
    pub(super) fn input_grad(m: usize, n: usize, k: usize, dy: OperandView<'a>, w: OperandView<'a>) -> Self {
        Gemm { trans_b: false, m, n, k, a: dy, lda: k, b: w, ldb: n }
    }
}

/// A GEMM operand in one of the three compute dtypes.
pub enum Operand {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

impl Operand {
    pub(super) fn len(&self) -> usize {
        OperandView::from(self).len()
    }

    pub(super) fn dtype(&self) -> ComputeDtype {
        match self {
            Operand::F32(_) => ComputeDtype::F32,
            Operand::F16(_) => ComputeDtype::F16,
            Operand::BF16(_) => ComputeDtype::BF16,
        }
    }
}

pub enum OperandRef<'a> {
    Borrowed(&'a DenseData),
    Owned(Operand),
    /// A 4-bit weight's expansion also held by `KeptExpansions`.
    Shared(Arc<Operand>),
}

/// The 16-bit expansions of 4-bit weights that a checkpointed layer's replay made, kept for that
/// layer's input gradients ([`Backend::keep_weight_expansions`](crate::backend::Backend::keep_weight_expansions)):
/// each 4-bit product's input gradient would otherwise expand its weight again (H200: ~23 µs for a
/// 7B 4096² weight, ~43 µs for an MLP one, against the GEMM's ~135 / ~330 µs). Keyed by the weight's
/// address, which stays put while anything is kept (one layer's backward).
#[derive(Default)]
pub(super) struct KeptExpansions {
    /// Requests are honoured (`LLAMATUNE_KEEP_EXPANDED=0` or [`Cuda::set_keep_expansions`]: not).
    pub(super) enabled: bool,
    keeping: bool,
    /// (weight key, expansion, its row stride: the weight's cols, or more where the expansion is the
    /// frozen part of a wider operand, `Cuda::qkv_attn_acts`'s concatenated path).
    held: Vec<(usize, Arc<Operand>, usize)>,
    /// Expansions that an input gradient took instead of making its own (tests, A/B runs).
    reused: u64,
}

impl KeptExpansions {
    pub(super) fn new(enabled: bool) -> Self {
        KeptExpansions { enabled, ..Default::default() }
    }
}

fn weight_key(w: &CudaWeight) -> usize {
    w as *const CudaWeight as usize
}

impl OperandRef<'_> {
    pub(super) fn as_ref(&self) -> OperandView<'_> {
        match self {
            OperandRef::Borrowed(DenseData::BF16(b)) => OperandView::BF16(b),
            OperandRef::Borrowed(DenseData::F16(b)) => OperandView::F16(b),
            OperandRef::Owned(Operand::F32(x)) => OperandView::F32(x),
            OperandRef::Owned(Operand::F16(x)) => OperandView::F16(x),
            OperandRef::Owned(Operand::BF16(x)) => OperandView::BF16(x),
            OperandRef::Shared(o) => OperandView::from(&**o),
        }
    }
}

/// A borrowed GEMM operand.
#[derive(Clone, Copy)]
pub enum OperandView<'a> {
    F32(&'a CudaSlice<f32>),
    F16(&'a CudaSlice<f16>),
    BF16(&'a CudaSlice<bf16>),
}

impl OperandView<'_> {
    pub(super) fn len(&self) -> usize {
        match self {
            OperandView::F32(x) => x.len(),
            OperandView::F16(x) => x.len(),
            OperandView::BF16(x) => x.len(),
        }
    }
}

impl<'a> From<&'a Operand> for OperandView<'a> {
    fn from(o: &'a Operand) -> Self {
        match o {
            Operand::F32(x) => OperandView::F32(x),
            Operand::F16(x) => OperandView::F16(x),
            Operand::BF16(x) => OperandView::BF16(x),
        }
    }
}

impl Cuda {
    /// An operand's values on the host, widened to f32 exactly (tests, benches).
    pub fn operand_to_host(&self, o: &Operand) -> Vec<f32> {
        match o {
            Operand::F32(x) => ck!(self.stream.clone_dtoh(x), "download"),
            Operand::F16(x) => ck!(self.stream.clone_dtoh(x), "download").into_iter().map(f16::to_f32).collect(),
            Operand::BF16(x) => ck!(self.stream.clone_dtoh(x), "download").into_iter().map(bf16::to_f32).collect(),
        }
    }

    /// A copy of `x` converted to dtype `c`; `None` when `c` is f32 and `x` serves as it is.
    pub(super) fn convert(&self, x: &CudaSlice<f32>, c: ComputeDtype) -> Option<Operand> {
        let n = x.len();
        // SAFETY: the conversion below writes all n values before anything reads them.
        let mut out = match c {
            ComputeDtype::F32 => return None,
            ComputeDtype::BF16 => Operand::BF16(ck!(unsafe { self.stream.alloc::<bf16>(n.max(1)) }, "alloc")),
            ComputeDtype::F16 => Operand::F16(ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc")),
        };
        self.convert_into(x, n, &mut out);
        Some(out)
    }

    /// The first `n` values of `x` rounded into `out`'s 16-bit dtype (elementwise.cu `f32_to_bf16`,
    /// nf4.cu `f32_to_f16`).
    fn convert_into(&self, x: &CudaSlice<f32>, n: usize, out: &mut Operand) {
        let _span = self.span("convert f32 to 16-bit");
        let n64 = n as i64;
        match out {
            Operand::BF16(o) => launch!(self, "f32_to_bf16", grid_for(n); x, o, &n64),
            Operand::F16(o) => launch!(self, "f32_to_f16", grid_for(n); x, o, &n64),
            Operand::F32(_) => unreachable!("f32 activations are not converted"),
        }
    }

    /// The weight as a GEMM operand, and the dtype the activations must be converted to.
    pub(super) fn weight_operand<'a>(&self, w: &'a CudaWeight) -> (OperandRef<'a>, ComputeDtype) {
        if self.is_precise() {
            if let CudaWeight::Dense { rows, cols, data } = w {
                // Precise mode: the dense weight widened to f32, so the activations are not rounded.
                let n = rows * cols;
                let mut out = self.scratch(n);
                let n64 = n as i64;
                match data {
                    DenseData::BF16(d) => launch!(self, "bf16_to_f32", grid_for(n); d, &mut out, &n64),
                    DenseData::F16(d) => launch!(self, "f16_to_f32", grid_for(n); d, &mut out, &n64),
                }
                return (OperandRef::Owned(Operand::F32(out)), ComputeDtype::F32);
            }
        }
        match w {
            CudaWeight::Dense { data: d @ DenseData::BF16(_), .. } => (OperandRef::Borrowed(d), ComputeDtype::BF16),
            CudaWeight::Dense { data: d @ DenseData::F16(_), .. } => (OperandRef::Borrowed(d), ComputeDtype::F16),
            CudaWeight::Quant4 { compute, .. } => {
                let cols = w.shape().1;
                let held = self
                    .kept
                    .lock()
                    .unwrap()
                    .held
                    .iter()
                    .find(|(k, _, ld)| *k == weight_key(w) && *ld == cols)
                    .map(|(_, o, _)| o.clone());
                let o = held.unwrap_or_else(|| self.keep_expansion(w, self.dequantize(w, *compute), cols));
                (OperandRef::Shared(o), *compute)
            }
        }
    }

    /// The weight as an input gradient's GEMM operand and its row stride: [`Cuda::weight_operand`]
    /// (stride: the weight's cols), but a 4-bit weight's expansion kept from the replay is taken (its
    /// last use in the step) instead of made again, with the stride it was kept with.
    pub(super) fn weight_operand_for_grad<'a>(&self, w: &'a CudaWeight) -> (OperandRef<'a>, ComputeDtype, usize) {
        if let CudaWeight::Quant4 { compute, .. } = w {
            let mut kept = self.kept.lock().unwrap();
            if let Some(i) = kept.held.iter().position(|(k, _, _)| *k == weight_key(w)) {
                kept.reused += 1;
                let (_, o, ld) = kept.held.swap_remove(i);
                return (OperandRef::Shared(o), *compute, ld);
            }
        }
        let (o, c) = self.weight_operand(w);
        (o, c, w.shape().1)
    }

    /// Holds `o`, weight `w`'s expansion with row stride `ld`, for its input gradient when the replay
    /// keeps expansions (those [`Cuda::weight_operand`] makes, and the strided ones of the q/k/v path).
    pub(super) fn keep_expansion(&self, w: &CudaWeight, o: Operand, ld: usize) -> Arc<Operand> {
        let o = Arc::new(o);
        let mut kept = self.kept.lock().unwrap();
        if kept.enabled && kept.keeping {
            kept.held.push((weight_key(w), o.clone(), ld));
        }
        o
    }

    /// Honours (`true`, the default) or ignores [`Backend::keep_weight_expansions`](crate::backend::Backend::keep_weight_expansions)
    /// (`false`: every input gradient expands its weight again, as before; for A/B runs and tests).
    pub fn set_keep_expansions(&self, on: bool) {
        let mut kept = self.kept.lock().unwrap();
        kept.enabled = on;
        if !on {
            kept.held.clear();
        }
    }

    /// How many input gradients took a kept expansion instead of expanding their weight again.
    pub fn expansions_reused(&self) -> u64 {
        self.kept.lock().unwrap().reused
    }

    /// How many expansions are held now (none between steps).
    pub fn expansions_held(&self) -> usize {
        self.kept.lock().unwrap().held.len()
    }

    /// [`Backend::keep_weight_expansions`](crate::backend::Backend::keep_weight_expansions).
    pub(super) fn keep_expansions(&self, on: bool) {
        let mut kept = self.kept.lock().unwrap();
        kept.keeping = on;
        if !on {
            kept.held.clear();
        }
    }

    /// `c = a · op(b) + beta · c` (row-major, `c` of `g.n` columns), exact f32 math.
    pub(super) fn gemm(&self, g: &Gemm<'_>, c: blas::GemmOut<'_>, beta: f32, what: &str) {
        let _span = self.span("cuBLAS GEMM");
        let r = self.blas.gemm_rm(
            F32Math::Exact,
            false,
            g.trans_b,
            g.m,
            g.n,
            g.k,
            1.0,
            g.a,
            g.lda,
            g.b,
            g.ldb,
            beta,
            c,
            g.n,
        );
        ck!(r, what);
    }

    /// `a · op(b)` written by cuBLAS in the 16-bit dtype `c` (rounded as it writes), as a new operand.
    pub(super) fn gemm_16(&self, g: &Gemm<'_>, c: ComputeDtype, what: &str) -> Operand {
        let n = g.m * g.n;
        // SAFETY: the GEMM (beta = 0) writes all m·n values before anything reads them.
        match c {
            ComputeDtype::BF16 => {
                let mut o = ck!(unsafe { self.stream.alloc::<bf16>(n) }, "alloc");
                self.gemm(g, blas::GemmOut::BF16(&mut o), 0.0, what);
                Operand::BF16(o)
            }
            ComputeDtype::F16 => {
                let mut o = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                self.gemm(g, blas::GemmOut::F16(&mut o), 0.0, what);
                Operand::F16(o)
            }
            ComputeDtype::F32 => unreachable!("a 16-bit output"),
        }
    }

    /// `out (=|+=) a · op(b)` for a frozen weight `w`'s product. A 4-bit weight's product is rounded to
    /// its 16-bit compute dtype, as bitsandbytes' 16-bit matmul output is, before it lands in (or is
    /// added to) the f32 `out`: cuBLAS writes it in that dtype (rounding as it writes, where a separate
    /// pass over f32 would read and write it again) and one kernel widens it into `out`. With `up`,
    /// a LoRA B product is added after the product ([`UpTail`]): a forward one (no dropout) by cuBLAS
    /// into the 16-bit product before it is widened ([`Cuda::lora_b_into_product`], unless switched
    /// off), one with dropout (backward's dx term) in the widening kernel (`lora_up_from_*`, bit for
    /// bit the widening and then `lora_up`).
    pub(super) fn gemm_rounded(
        &self,
        w: &CudaWeight,
        g: Gemm<'_>,
        out: &mut CudaSlice<f32>,
        accumulate: bool,
        up: Option<UpTail<'_>>,
        what: &str,
    ) {
        match w {
            CudaWeight::Quant4 { compute: c @ (ComputeDtype::BF16 | ComputeDtype::F16), .. } => {
                let mut o16 = self.gemm_16(&g, *c, what);
                // A forward LoRA B product (no dropout on it) goes into the 16-bit product by cuBLAS.
                let up = match up {
                    Some(t) if !t.w_is_rn && !t.dropout.is_active() && self.lora_b_by_gemm() => {
                        self.lora_b_into_product(&mut o16, t.u, t.w, (g.m, g.n, t.r), t.alpha);
                        None
                    }
                    up => up,
                };
                self.widen_16(&o16, up, (g.m, g.n), accumulate, out);
            }
            _ => {
                self.gemm(&g, blas::GemmOut::F32(&mut *out), if accumulate { 1.0 } else { 0.0 }, what);
                if let Some(up) = up {
                    self.lora_up(up.u, up.w, up.w_is_rn, g.m, g.n, up.r, up.alpha, up.dropout, out);
                }
            }
        }
    }

    /// [`Cuda::widen_into`] of a 16-bit product of either dtype.
    pub(super) fn widen_16(
        &self,
        o16: &Operand,
        up: Option<UpTail<'_>>,
        mn: (usize, usize),
        accumulate: bool,
        out: &mut CudaSlice<f32>,
    ) {
        match o16 {
            Operand::BF16(o) => {
                let kernels = ["bf16_to_f32", "add_bf16_to_f32", "lora_up_from_bf16"];
                self.widen_into(o, kernels, up, mn, accumulate, out);
            }
            Operand::F16(o) => {
                let kernels = ["f16_to_f32", "add_f16_to_f32", "lora_up_from_f16"];
                self.widen_into(o, kernels, up, mn, accumulate, out);
            }
            Operand::F32(_) => unreachable!("a 16-bit product"),
        }
    }

    /// A 16-bit product `o16 (m, n)` landed in the f32 `out`, written over it or added to it
    /// (`accumulate`), by `kernels` = [widen, widen and add, widen with a LoRA B product]: with `up`,
    /// [`Cuda::lora_up`]'s product is added in the same pass (`lora_up_from_*`, kernels/lora_fused.cu).
    pub(super) fn widen_into<T: cudarc::driver::DeviceRepr>(
        &self,
        o16: &CudaSlice<T>,
        [widen, widen_add, with_up]: [&str; 3],
        up: Option<UpTail<'_>>,
        (m, n): (usize, usize),
        accumulate: bool,
        out: &mut CudaSlice<f32>,
    ) {
        let _span = self.span(if up.is_some() { "widen 16-bit product + LoRA B" } else { "widen 16-bit product" });
        let Some(up) = up else {
            let n64 = (m * n) as i64;
            return launch!(self, if accumulate { widen_add } else { widen }, grid_for(m * n); o16, &mut *out, &n64);
        };
        let (dims, rn, acc) = ([m as i32, n as i32, up.r as i32], up.w_is_rn as i32, accumulate as i32);
        let (u, w, d) = (up.u, up.w, up.dropout);
        launch!(self, with_up, lora_up_launch(m, n); u, w, o16, &mut *out, &dims[0], &dims[1], &dims[2], &rn, &up.alpha, &d.seed, &d.p, &acc);
    }

    /// The second path's input gradient `dx (m, cols) (+)= dy (m, rows) · W`, with `up` added as its
    /// 16-bit result is widened ([`Cuda::gemm_rounded`]). `dy16`: dy already rounded to the weight's
    /// compute dtype (by `lora_du`), instead of converting it here.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn dgrad_gemm(
        &self,
        dy: &CudaSlice<f32>,
        dy16: Option<Operand>,
        w: &CudaWeight,
        m: usize,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
        up: Option<UpTail<'_>>,
    ) {
        let (rows, cols) = w.shape();
        let (wop, c, ld) = self.weight_operand_for_grad(w);
        let dyc = self.dy_for_grad(dy, dy16, c);
        let dyop = dyc.as_ref().map_or(OperandView::F32(dy), OperandView::from);
        let product = Gemm { ldb: ld, ..Gemm::input_grad(m, cols, rows, dyop, wop.as_ref()) };
        self.gemm_rounded(w, product, dx, accumulate, up, "linear backward GEMM");
    }

    /// [`Cuda::dgrad_gemm`]'s product `dy (m, rows) · W` as cuBLAS writes it in the 4-bit weight's
    /// 16-bit compute dtype `c`, not widened (for `Cuda::linears_backward_input_one_pass`).
    pub(super) fn dgrad_16(
        &self,
        dy: &CudaSlice<f32>,
        dy16: Option<Operand>,
        w: &CudaWeight,
        m: usize,
        c: ComputeDtype,
    ) -> Operand {
        let (rows, cols) = w.shape();
        let (wop, wc, ld) = self.weight_operand_for_grad(w);
        assert_eq!(wc, c, "dgrad_16: the weight's compute dtype");
        let dyc = self.dy_for_grad(dy, dy16, c);
        let dyop = dyc.as_ref().map_or(OperandView::F32(dy), OperandView::from);
        let product = Gemm { ldb: ld, ..Gemm::input_grad(m, cols, rows, dyop, wop.as_ref()) };
        self.gemm_16(&product, c, "linear backward GEMM")
    }

    /// dy as the input gradient's GEMM takes it for compute dtype `c`: `dy16` (dy already rounded to
    /// it, by `lora_du`), else converted here (`None`: f32, taken as it is).
    fn dy_for_grad(&self, dy: &CudaSlice<f32>, dy16: Option<Operand>, c: ComputeDtype) -> Option<Operand> {
        match dy16 {
            Some(o) => {
                assert!(o.dtype() == c && o.len() >= dy.len(), "dgrad: dy16 is not dy in the compute dtype");
                Some(o)
            }
            None => self.convert(dy, c),
        }
    }

    /// [`Backend::linear_many_lora`](crate::backend::Backend::linear_many_lora) when the products do not share a GEMV
    /// launch (and [`Backend::linear_many`](crate::backend::Backend::linear_many), with no branches): each frozen
    /// product, and then the LoRA branches. A branch whose product goes through cuBLAS with a 16-bit output gets its B
    /// product added as that output is widened (`gemm_rounded`'s [`UpTail`]); the others run after all the products.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn products_with_lora(
        &self,
        x: &CudaSlice<f32>,
        ws: &[&CudaWeight],
        m: usize,
        outs: &mut [&mut CudaSlice<f32>],
        loras: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
    ) {
        assert_eq!(ws.len(), outs.len(), "linear_many: one output per weight");
        assert!(loras.is_empty() || loras.len() == outs.len(), "linear_many_lora: one LoRA slot per output");
        if self.gemv_many_fits(ws, m) {
            {
                let _span = self.span("linear (4-bit GEMV, several weights)");
                self.gemv_4bit_many(x, ws, outs);
            }
            return crate::backend::lora_branches_into(self, x, outs, loras, m, r, scale);
        }
        // x in each compute dtype the second path needs, converted once for all the products (a 4096-wide
        // conversion at 2048 rows is ~20 µs on the H200; q/k/v and gate/up share theirs). With the LoRA B
        // products along k ([`Cuda::set_lora_b_concat`]), a 16-bit x has its rows ld = cols + r apart,
        // the last r columns taking each branch's scale·u in turn (one stream: the product before has
        // read them).
        let mut converted: Vec<(ComputeDtype, Option<Operand>)> = Vec::new();
        // Decoding's few rows convert into kept buffers (see `small_operands`).
        let keep = m <= GEMV_MAX_M;
        let cols = x.len() / m.max(1);
        let concat = !keep && !self.is_precise() && self.lora_b_concat_applies(cols, r, loras);
        let ld = if concat { cols + r } else { cols };
        self.branch_us(x, loras, m, r);
        for (i, (w, out)) in ws.iter().zip(outs.iter_mut()).enumerate() {
            let (rows, cols) = w.shape();
            assert!(x.len() == m * cols && out.len() == m * rows, "linear: bad shapes");
            if m <= GEMV_MAX_M && matches!(w, CudaWeight::Quant4 { .. }) {
                let _span = self.span("linear (4-bit GEMV)");
                self.gemv_4bit(x, w, m, out);
                continue;
            }
            if self.uses_fused_4bit(w, m) {
                let _span = self.span("linear (fused 4-bit)");
                self.gemm_4bit(x, w, m, out, false, false);
                continue;
            }
            // This product's LoRA branch, taken here when its B product runs on `lora_up` (as
            // lora_forward runs it past a few rows), which can ride in the widening.
            let branch = match loras.get_mut(i) {
                Some(slot) if slot.is_some() && m > GEMV_MAX_M && self.uses_fused_lora_up(rows, r) => slot.take(),
                _ => None,
            };
            let _span = self.span(if branch.is_some() { "linear + LoRA" } else { "linear" });
            // Along k: w expanded with rows ld apart (None where that does not apply: a dense weight,
            // in-features no multiple of 1,024).
            let wb = match &branch {
                Some(_) if concat => self.dequantize_ld(w, ld),
                _ => None,
            };
            let (wop, c) = match (&wb, w) {
                (Some(_), CudaWeight::Quant4 { compute, .. }) => (None, *compute),
                _ => {
                    let (wop, c) = self.weight_operand(w);
                    (Some(wop), c)
                }
            };
            let j = match converted.iter().position(|(cc, _)| *cc == c) {
                Some(j) => j,
                None => {
                    let op = match c {
                        _ if keep => self.convert_small(x, c),
                        ComputeDtype::BF16 | ComputeDtype::F16 if concat => Some(self.x_in_16_bit(x, (m, cols), ld, c)),
                        _ => self.convert(x, c),
                    };
                    converted.push((c, op));
                    converted.len() - 1
                }
            };
            let lda = if concat && converted[j].1.is_some() { ld } else { cols };
            if let Some(wb) = wb {
                let mut l = branch.expect("w is expanded with a stride only for a branch");
                let xc = converted[j].1.as_mut().expect("x in a 16-bit dtype when w expands with a stride");
                let o16 = self.product_with_b_along_k(x, w, wb, &mut l, xc, (m, r, scale), c);
                self.widen_16(&o16, None, (m, rows), false, out);
                continue;
            }
            let wop = wop.expect("expanded above unless along k");
            let xop = converted[j].1.as_ref().map_or(OperandView::F32(x), OperandView::from);
            // out (m, rows) = x (m, cols) · Wᵀ [+ scale · (drop(x) · Aᵀ) · Bᵀ]
            let product = Gemm { lda, ..Gemm::forward(m, rows, cols, xop, wop.as_ref()) };
            let up = branch.map(|mut l| {
                self.branch_u(x, &mut l, m, r);
                UpTail { u: &*l.u, w: l.b, w_is_rn: false, r, alpha: scale, dropout: Dropout::NONE }
            });
            self.gemm_rounded(w, product, out, false, up, "linear GEMM");
        }
        if keep {
            let mut kept = self.small_operands.lock().unwrap();
            for (c, op) in converted.into_iter().filter_map(|(c, op)| Some((c, op?))) {
                kept.entry((c as u8, x.len())).or_default().push(op);
            }
        }
        crate::backend::lora_branches_into(self, x, outs, loras, m, r, scale);
    }

    /// [`Cuda::convert`] into a buffer kept from an earlier call of the same size and dtype when there
    /// is one. Why: decoding's recorded step must allocate nothing (a CUDA graph holding allocation
    /// nodes cannot have its kernel edges made programmatic, src/backend/cuda/graph.rs); its dense
    /// LM head converts x for cuBLAS, and the step run before the recording leaves the buffer here.
    fn convert_small(&self, x: &CudaSlice<f32>, c: ComputeDtype) -> Option<Operand> {
        let kept = self.small_operands.lock().unwrap().get_mut(&(c as u8, x.len())).and_then(Vec::pop);
        let Some(mut op) = kept else { return self.convert(x, c) };
        self.convert_into(x, x.len(), &mut op);
        Some(op)
    }

    /// The first `n` values of `x` rounded to bf16, in a fresh buffer.
    pub(super) fn bf16_prefix(&self, x: &CudaSlice<f32>, n: usize) -> CudaSlice<bf16> {
        // SAFETY: the conversion writes all n values before anything reads them.
        let mut out = Operand::BF16(ck!(unsafe { self.stream.alloc::<bf16>(n.max(1)) }, "alloc"));
        self.convert_into(x, n, &mut out);
        let Operand::BF16(out) = out else { unreachable!("made bf16 above") };
        out
    }
}
