//! Training's projections whose only reader is the residual stream (an o projection with a LoRA branch
//! before its residual add and norm; the down projection of a pass that records nothing): their
//! 16-bit products, each branch's B product inside, go into the f32 sum as cuBLAS writes them, instead
//! of being widened into f32 first and read again by the add. The values are the composed calls'
//! (`linear_many_lora`, then `add_rmsnorm` or `add_assign`) bit for bit: the same 16-bit product, read
//! as the f32 its widening would have written, in the same f32 add.
//! CPU reference: the trait's defaults (backend/mod.rs `linear_lora_add_rmsnorm`, `linear_lora_add_into`).

use super::gemm::Operand;
use super::{Cuda, CudaWeight};
use crate::backend::LoraDown;
use crate::config::ComputeDtype;
use cudarc::driver::CudaSlice;

impl Cuda {
    /// The 16-bit dtype in which a projection by `w` with the branch in `lora` goes into the residual
    /// (`Cuda::products_16_dtype`), unless switched off ([`Cuda::set_residual_16`]).
    pub fn residual_in_16_bit(
        &self,
        w: &CudaWeight,
        m: usize,
        lora: &[Option<LoraDown<'_, Self>>],
        r: usize,
    ) -> Option<ComputeDtype> {
        let on = self.residual_16.load(std::sync::atomic::Ordering::Relaxed);
        self.products_16_dtype(&[w], m, lora, r).filter(|_| on && lora.len() <= 1)
    }

    /// Turns [`Cuda::residual_in_16_bit`]'s path on or off (off: the product widened into f32 first).
    pub fn set_residual_16(&self, on: bool) {
        self.residual_16.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The projection's 16-bit product with its branch's B product inside, where
    /// [`Cuda::residual_in_16_bit`] gave `c`.
    fn residual_product_16(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        m: usize,
        lora: &mut [Option<LoraDown<'_, Self>>],
        (r, scale): (usize, f32),
        c: ComputeDtype,
    ) -> Operand {
        let cols = w.shape().1;
        assert!(x.len() == m * cols, "linear: bad shapes");
        let concat = self.lora_b_concat_applies(cols, r, lora);
        let mut xc = self.x_in_16_bit(x, (m, cols), if concat { cols + r } else { cols }, c);
        let mut none = None;
        let slot = lora.first_mut().unwrap_or(&mut none);
        let o16 = self.product_16_with_lora(x, w, slot, &mut xc, (m, r, scale), concat, c, "linear GEMM");
        assert!(slot.is_none(), "a branch's B product goes into its 16-bit product here");
        o16
    }

    /// [`Backend::linear_lora_add_rmsnorm`](crate::backend::Backend::linear_lora_add_rmsnorm) where
    /// [`Cuda::residual_in_16_bit`] gave `c`: the 16-bit product added by the norm's kernel
    /// (kernels/norm.cu `add16_rmsnorm_{bf16,f16}`, f32 output).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_lora_add_rmsnorm_16(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        m: usize,
        lora: &mut [Option<LoraDown<'_, Self>>],
        rs: (usize, f32),
        (res, norm_w, eps): (&CudaSlice<f32>, &CudaSlice<f32>, f64),
        (sum, out, rstd): (&mut CudaSlice<f32>, &mut CudaSlice<f32>, &mut CudaSlice<f32>),
        c: ComputeDtype,
    ) {
        let _span = self.span("linear + LoRA into the residual and norm (16-bit product)");
        match self.residual_product_16(x, w, m, lora, rs, c) {
            Operand::BF16(o) => self.add_rmsnorm_launch("add16_rmsnorm_bf16", res, &o, norm_w, eps, sum, out, rstd),
            Operand::F16(o) => self.add_rmsnorm_launch("add16_rmsnorm_f16", res, &o, norm_w, eps, sum, out, rstd),
            Operand::F32(_) => unreachable!("a 16-bit product"),
        }
    }

    /// [`Backend::linear_lora_add_into`](crate::backend::Backend::linear_lora_add_into) where
    /// [`Cuda::residual_in_16_bit`] gave `c`: the 16-bit product widened and added into `out` in one
    /// pass (`add_{bf16,f16}_to_f32`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear_lora_add_into_16(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        m: usize,
        lora: &mut [Option<LoraDown<'_, Self>>],
        rs: (usize, f32),
        out: &mut CudaSlice<f32>,
        c: ComputeDtype,
    ) {
        let _span = self.span("linear + LoRA into the residual (16-bit product)");
        let o16 = self.residual_product_16(x, w, m, lora, rs, c);
        self.widen_16(&o16, None, (m, w.shape().0), true, out);
    }
}
