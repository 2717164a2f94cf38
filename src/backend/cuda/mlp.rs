//! The MLP's gate and up products kept in the 16-bit compute dtype (`MlpActs::Half`), where all three
//! of its 4-bit products take the second path. CPU reference: the composed ops of backend/mod.rs.

use super::gemm::{Gemm, Operand, OperandView};
use super::quant4::GEMV_MAX_M;
use super::{grid_for, Cuda, CudaWeight};
use crate::backend::LoraDown;
use crate::config::ComputeDtype;
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::{bf16, f16};

/// An MLP's gate and up products `(m, ffn)` kept for its backward
/// ([`Backend::mlp_gate_up`](crate::backend::Backend::mlp_gate_up)).
pub enum MlpActs {
    /// Widened into f32, as every other product is (the composed ops).
    F32 { g: CudaSlice<f32>, u: CudaSlice<f32> },
    /// In the weights' 16-bit compute dtype as cuBLAS writes them, where all three products take the
    /// second path (`Cuda::mlp_in_16_bit`): the same values in half the memory, no widening pass.
    Half { g: Operand, u: Operand },
}

impl Cuda {
    /// The 16-bit dtype [`Backend::mlp_gate_up`](crate::backend::Backend::mlp_gate_up) keeps an MLP's products in, when
    /// it can: three 4-bit weights computing in one 16-bit dtype, all on the second path at `m` rows (dequantize +
    /// cuBLAS, whose outputs are rounded to that dtype anyway); not in precise mode.
    pub fn mlp_in_16_bit(&self, ws: [&CudaWeight; 3], m: usize) -> Option<ComputeDtype> {
        self.products_16_dtype(&ws, m, &[], 0)
    }

    /// The 16-bit dtype in which the products of `ws` at `m` rows, with the LoRA branches in `loras`
    /// (one slot per weight, or none), can be kept as cuBLAS writes them with each branch's B product
    /// inside ([`Cuda::product_16_with_lora`]: the values `Cuda::products_with_lora` widens): 4-bit
    /// weights of one 16-bit compute dtype, all on the second path, past decoding's few rows, not in
    /// precise mode; each branch's B product by cuBLAS or along k, at a rank the fused kernels take.
    pub(super) fn products_16_dtype(
        &self,
        ws: &[&CudaWeight],
        m: usize,
        loras: &[Option<LoraDown<'_, Self>>],
        r: usize,
    ) -> Option<ComputeDtype> {
        let c = match ws.first()? {
            CudaWeight::Quant4 { compute: c @ (ComputeDtype::BF16 | ComputeDtype::F16), .. } => *c,
            _ => return None,
        };
        let second_path = |w: &CudaWeight| {
            matches!(w, CudaWeight::Quant4 { compute, .. } if *compute == c) && !self.uses_fused_4bit(w, m)
        };
        let branch_fits = |(l, w): (&Option<LoraDown<'_, Self>>, &&CudaWeight)| {
            l.is_none() || (self.lora_b_by_gemm() && self.uses_fused_lora_up(w.shape().0, r))
        };
        let fits = ws.iter().all(|w| second_path(w)) && loras.iter().zip(ws).all(branch_fits);
        (m > GEMV_MAX_M && !self.is_precise() && fits).then_some(c)
    }

    /// [`Backend::mlp_gate_up`](crate::backend::Backend::mlp_gate_up) where [`Cuda::mlp_in_16_bit`] gives the compute
    /// dtype `c`: both products written by cuBLAS in `c` and kept so.
    pub(super) fn mlp_gate_up_16(
        &self,
        x: &CudaSlice<f32>,
        gate: &CudaWeight,
        up: &CudaWeight,
        m: usize,
        c: ComputeDtype,
    ) -> MlpActs {
        let _span = self.span("MLP gate and up (16-bit outputs)");
        // x converted once for both products, which stay in the compute dtype as cuBLAS writes them
        // (the values the other path widens into f32).
        let x16 = self.convert(x, c).expect("16-bit compute");
        self.mlp_gate_up_from_16(&x16, gate, up, m, c)
    }

    /// The 16-bit dtype [`Backend::mlp_gate_up_lora`](crate::backend::Backend::mlp_gate_up_lora) keeps an MLP's
    /// gate and up products in: [`Cuda::mlp_in_16_bit`]'s conditions for the two weights, and each branch's B
    /// product going into its 16-bit product (by cuBLAS or along k, as `Cuda::products_with_lora` puts it there
    /// before widening: the same values), unless switched off ([`Cuda::set_mlp_lora_16`]).
    pub fn mlp_lora_in_16_bit(
        &self,
        [gate, up]: [&CudaWeight; 2],
        m: usize,
        loras: &[Option<LoraDown<'_, Self>>],
        r: usize,
    ) -> Option<ComputeDtype> {
        let on = self.mlp_lora_16.load(std::sync::atomic::Ordering::Relaxed);
        let c = self.products_16_dtype(&[gate, up], m, loras, r);
        c.filter(|_| on && up.shape() == gate.shape())
    }

    /// Turns [`Cuda::mlp_lora_in_16_bit`]'s path on or off (off: the products widened into f32, as
    /// `linear_many_lora` writes them).
    pub fn set_mlp_lora_16(&self, on: bool) {
        self.mlp_lora_16.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`Backend::mlp_gate_up_lora`](crate::backend::Backend::mlp_gate_up_lora) where
    /// [`Cuda::mlp_lora_in_16_bit`] gives `c`: each product with its branch's B product in it, as
    /// `Cuda::products_with_lora` computes it before widening, kept in `c`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mlp_gate_up_lora_16(
        &self,
        x: &CudaSlice<f32>,
        ws: [&CudaWeight; 2],
        m: usize,
        loras: &mut [Option<LoraDown<'_, Self>>],
        (r, scale): (usize, f32),
        c: ComputeDtype,
    ) -> MlpActs {
        let _span = self.span("MLP gate and up + LoRA (16-bit outputs)");
        let cols = ws[0].shape().1;
        assert!(x.len() == m * cols && loras.len() == 2, "mlp_gate_up_lora: bad shapes");
        let concat = self.lora_b_concat_applies(cols, r, loras);
        let mut xc = self.x_in_16_bit(x, (m, cols), if concat { cols + r } else { cols }, c);
        self.branch_us(x, loras, m, r);
        let [g, u] = [0, 1].map(|i| {
            let o16 = self.product_16_with_lora(x, ws[i], &mut loras[i], &mut xc, (m, r, scale), concat, c, "MLP GEMM");
            assert!(loras[i].is_none(), "a branch's B product goes into its 16-bit product here");
            o16
        });
        MlpActs::Half { g, u }
    }

    /// `out (f32) = silu(g) · u` from 16-bit gate and up products (kernels/elementwise.cu
    /// `swiglu_{bf16,f16}_to_f32`): `swiglu_f32`'s values from the widened products.
    pub(super) fn swiglu_16_to_f32(&self, (g, u): (&Operand, &Operand), out: &mut CudaSlice<f32>) {
        let _span = self.span("swiglu (16-bit products)");
        let n = out.len();
        assert!(g.len() == n && u.len() == n, "swiglu: bad shapes");
        let n64 = n as i64;
        match (g, u) {
            (Operand::BF16(g), Operand::BF16(u)) => {
                launch!(self, "swiglu_bf16_to_f32", grid_for(n); g, u, &mut *out, &n64)
            }
            (Operand::F16(g), Operand::F16(u)) => {
                launch!(self, "swiglu_f16_to_f32", grid_for(n); g, u, &mut *out, &n64)
            }
            _ => unreachable!("gate and up in one 16-bit dtype"),
        }
    }

    /// SwiGLU's f32 gradients from 16-bit gate and up products and the f32 output gradient `dout`
    /// (kernels/elementwise.cu `swiglu_backward_{bf16,f16}_f32`): `swiglu_backward_f32`'s values from
    /// the widened products.
    pub(super) fn swiglu_backward_16_f32(
        &self,
        (g, u): (&Operand, &Operand),
        dout: &CudaSlice<f32>,
        dg: &mut CudaSlice<f32>,
        du: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("swiglu_backward (16-bit products)");
        let n = dout.len();
        assert!(g.len() == n && u.len() == n && dg.len() == n && du.len() == n, "swiglu_backward: bad shapes");
        let n64 = n as i64;
        match (g, u) {
            (Operand::BF16(g), Operand::BF16(u)) => {
                launch!(self, "swiglu_backward_bf16_f32", grid_for(n); g, u, dout, &mut *dg, &mut *du, &n64)
            }
            (Operand::F16(g), Operand::F16(u)) => {
                launch!(self, "swiglu_backward_f16_f32", grid_for(n); g, u, dout, &mut *dg, &mut *du, &n64)
            }
            _ => unreachable!("gate and up in one 16-bit dtype"),
        }
    }

    /// `sum = a + b` and `rmsnorm(sum) · w` written only in the compute dtype `c`, the 16-bit MLP's
    /// input, with rstd as add_rmsnorm writes it (kernels/norm.cu): `b` in f32
    /// (`add_rmsnorm_to_{bf16,f16}`: add_rmsnorm_f32's values rounded as f32_to_bf16/f16 rounds them)
    /// or, as the o projection's product comes from cuBLAS, in `c` (`add16_rmsnorm_to_{bf16,f16}`: b
    /// read as the f32 its widening would have given, so the same values bit for bit).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_rmsnorm_16(
        &self,
        a: &CudaSlice<f32>,
        b: OperandView<'_>,
        w: &CudaSlice<f32>,
        eps: f64,
        sum: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
        c: ComputeDtype,
    ) -> Operand {
        let wide = matches!(b, OperandView::F32(_));
        let _span =
            self.span(if wide { "add_rmsnorm (16-bit output)" } else { "add_rmsnorm (16-bit o product and output)" });
        let n = a.len();
        // SAFETY: the kernel writes all n values before anything reads them.
        match c {
            ComputeDtype::BF16 => {
                let mut o = ck!(unsafe { self.stream.alloc::<bf16>(n) }, "alloc");
                match b {
                    OperandView::F32(b) => {
                        self.add_rmsnorm_launch("add_rmsnorm_to_bf16", a, b, w, eps, sum, &mut o, rstd)
                    }
                    OperandView::BF16(b) => {
                        self.add_rmsnorm_launch("add16_rmsnorm_to_bf16", a, b, w, eps, sum, &mut o, rstd)
                    }
                    OperandView::F16(_) => unreachable!("b in f32 or in the output's dtype"),
                }
                Operand::BF16(o)
            }
            ComputeDtype::F16 => {
                let mut o = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                match b {
                    OperandView::F32(b) => {
                        self.add_rmsnorm_launch("add_rmsnorm_to_f16", a, b, w, eps, sum, &mut o, rstd)
                    }
                    OperandView::F16(b) => {
                        self.add_rmsnorm_launch("add16_rmsnorm_to_f16", a, b, w, eps, sum, &mut o, rstd)
                    }
                    OperandView::BF16(_) => unreachable!("b in f32 or in the output's dtype"),
                }
                Operand::F16(o)
            }
            ComputeDtype::F32 => unreachable!("a 16-bit MLP"),
        }
    }

    /// The compute dtype in which [`Backend::linear_add_rmsnorm_mlp_gate_up`](crate::backend::Backend::linear_add_rmsnorm_mlp_gate_up)
    /// keeps the o product (as cuBLAS writes it) and adds it into the residual: where the MLP takes
    /// its 16-bit path ([`Cuda::mlp_in_16_bit`]) and `wo` is a 4-bit weight of that compute dtype on
    /// the second path, unless switched off ([`Cuda::set_o_into_norm`]); `None`: the composed calls.
    pub fn o_product_in_16_bit(&self, wo: &CudaWeight, mlp: [&CudaWeight; 3], m: usize) -> Option<ComputeDtype> {
        let on = self.o_into_norm.load(std::sync::atomic::Ordering::Relaxed);
        self.mlp_in_16_bit(mlp, m).filter(|&c| on && self.mlp_in_16_bit([wo, wo, wo], m) == Some(c))
    }

    /// Turns [`Cuda::o_product_in_16_bit`]'s path on or off (off: the o product widened into f32 first).
    pub fn set_o_into_norm(&self, on: bool) {
        self.o_into_norm.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// `x (m, cols) · Wᵀ` for a 4-bit weight on the second path in its 16-bit compute dtype `c`, kept
    /// as cuBLAS writes it (the values `linear` widens into f32).
    pub(super) fn linear_16(&self, x: &CudaSlice<f32>, w: &CudaWeight, m: usize, c: ComputeDtype) -> Operand {
        let _span = self.span("linear (16-bit output)");
        let (rows, cols) = w.shape();
        assert!(x.len() == m * cols, "linear: bad shapes");
        let x16 = self.convert(x, c).expect("16-bit compute");
        let (wop, _) = self.weight_operand(w);
        let g = Gemm::forward(m, rows, cols, OperandView::from(&x16), wop.as_ref());
        self.gemm_16(&g, c, "linear GEMM")
    }

    /// [`Cuda::mlp_gate_up_16`] of `x16`, the MLP's input already in the compute dtype `c`.
    pub(super) fn mlp_gate_up_from_16(
        &self,
        x16: &Operand,
        gate: &CudaWeight,
        up: &CudaWeight,
        m: usize,
        c: ComputeDtype,
    ) -> MlpActs {
        let (ffn, hidden) = gate.shape();
        assert!(x16.len() == m * hidden && up.shape() == (ffn, hidden), "mlp_gate_up: bad shapes");
        let product = |w: &CudaWeight, what: &str| {
            let (wop, _) = self.weight_operand(w);
            let g = Gemm::forward(m, ffn, hidden, OperandView::from(x16), wop.as_ref());
            self.gemm_16(&g, c, what)
        };
        MlpActs::Half { g: product(gate, "MLP gate GEMM"), u: product(up, "MLP up GEMM") }
    }

    /// [`Backend::mlp_down`](crate::backend::Backend::mlp_down) from 16-bit gate and up products: SwiGLU into the down
    /// product's 16-bit input (kernels/elementwise.cu `swiglu_{bf16,f16}`), the product widened into (or added to) out.
    pub(super) fn mlp_down_16(
        &self,
        (g, u): (&Operand, &Operand),
        down: &CudaWeight,
        m: usize,
        out: &mut CudaSlice<f32>,
        accumulate: bool,
    ) {
        let _span = self.span("MLP SwiGLU and down (16-bit input)");
        let (d_rows, ffn) = down.shape();
        let n = m * ffn;
        assert!(g.len() == n && u.len() == n && out.len() == m * d_rows, "mlp_down: bad shapes");
        // SwiGLU straight from the 16-bit products into the down product's 16-bit input (the rounding
        // its conversion did), and the product widened into (or added to) out: linear_many + swiglu +
        // linear's values without the f32 round trips.
        let n64 = n as i64;
        // SAFETY: the kernel writes all n values before the GEMM reads them.
        let s16 = match (g, u) {
            (Operand::BF16(g), Operand::BF16(u)) => {
                let mut s = ck!(unsafe { self.stream.alloc::<bf16>(n) }, "alloc");
                launch!(self, "swiglu_bf16", grid_for(n); g, u, &mut s, &n64);
                Operand::BF16(s)
            }
            (Operand::F16(g), Operand::F16(u)) => {
                let mut s = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                launch!(self, "swiglu_f16", grid_for(n); g, u, &mut s, &n64);
                Operand::F16(s)
            }
            _ => unreachable!("gate and up in one 16-bit dtype"),
        };
        let (wop, _) = self.weight_operand(down);
        let product = Gemm::forward(m, d_rows, ffn, OperandView::from(&s16), wop.as_ref());
        self.gemm_rounded(down, product, out, accumulate, None, "MLP down GEMM");
    }

    /// [`Backend::mlp_backward`](crate::backend::Backend::mlp_backward) from 16-bit gate and up products
    /// (kernels/elementwise.cu `swiglu_backward_{bf16,f16}` between the GEMMs).
    pub(super) fn mlp_backward_16(
        &self,
        dy: &CudaSlice<f32>,
        (g, u): (&Operand, &Operand),
        [gate, up, down]: [&CudaWeight; 3],
        m: usize,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
    ) {
        let _span = self.span("MLP backward (16-bit intermediates)");
        let ((ffn, hidden), (d_rows, _)) = (gate.shape(), down.shape());
        let n = m * ffn;
        assert!(dy.len() == m * d_rows && dx.len() == m * hidden && g.len() == n, "mlp_backward: bad shapes");
        // The down product's input gradient as cuBLAS writes it in the compute dtype (the values the
        // other path widens), SwiGLU's backward from it and the 16-bit products into the gate and up
        // gradients in that dtype (the rounding their GEMMs' conversions did), and those GEMMs widened
        // into dx: the composed ops' values without the f32 round trips.
        let c = if matches!(g, Operand::F16(_)) { ComputeDtype::F16 } else { ComputeDtype::BF16 };
        let ds16 = {
            let (wop, _, ld) = self.weight_operand_for_grad(down);
            assert_eq!(ld, down.shape().1, "an MLP weight is kept unstrided");
            let dy16 = self.convert(dy, c).expect("16-bit compute");
            let product = Gemm::input_grad(m, ffn, d_rows, OperandView::from(&dy16), wop.as_ref());
            self.gemm_16(&product, c, "MLP down backward GEMM")
        };
        let n64 = n as i64;
        // SAFETY: the kernel writes all n values of both gradients before the GEMMs read them.
        let (dg16, du16) = match (g, u, &ds16) {
            (Operand::BF16(g), Operand::BF16(u), Operand::BF16(ds)) => {
                let mut dg = ck!(unsafe { self.stream.alloc::<bf16>(n) }, "alloc");
                let mut du = ck!(unsafe { self.stream.alloc::<bf16>(n) }, "alloc");
                launch!(self, "swiglu_backward_bf16", grid_for(n); g, u, ds, &mut dg, &mut du, &n64);
                (Operand::BF16(dg), Operand::BF16(du))
            }
            (Operand::F16(g), Operand::F16(u), Operand::F16(ds)) => {
                let mut dg = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                let mut du = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                launch!(self, "swiglu_backward_f16", grid_for(n); g, u, ds, &mut dg, &mut du, &n64);
                (Operand::F16(dg), Operand::F16(du))
            }
            _ => unreachable!("one 16-bit dtype"),
        };
        drop(ds16);
        // dx (m, hidden) (+)= du (m, ffn) · U (ffn, hidden), then += dg · G: up first, as the tape did;
        // both products in 16 bits, added into dx in one pass.
        let product = |w: &CudaWeight, d16: &Operand, what: &str| {
            let (wop, _, ld) = self.weight_operand_for_grad(w);
            assert_eq!(ld, w.shape().1, "an MLP weight is kept unstrided");
            let g = Gemm::input_grad(m, hidden, ffn, OperandView::from(d16), wop.as_ref());
            self.gemm_16(&g, c, what)
        };
        let up_dx = product(up, &du16, "MLP up backward GEMM");
        let gate_dx = product(gate, &dg16, "MLP gate backward GEMM");
        let _span = self.span("add two 16-bit products");
        let (n64, acc) = ((m * hidden) as i64, accumulate as i32);
        match (&up_dx, &gate_dx) {
            (Operand::BF16(a), Operand::BF16(b)) => {
                launch!(self, "add_two_bf16_to_f32", grid_for(m * hidden); a, b, &mut *dx, &n64, &acc)
            }
            (Operand::F16(a), Operand::F16(b)) => {
                launch!(self, "add_two_f16_to_f32", grid_for(m * hidden); a, b, &mut *dx, &n64, &acc)
            }
            _ => unreachable!("one 16-bit dtype"),
        }
    }
}
