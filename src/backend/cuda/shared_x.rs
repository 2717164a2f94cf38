//! The input gradients of projections that read the same x (q/k/v, gate/up) landed in dx in one
//! pass ([`Backend::linears_backward_input`](crate::backend::Backend::linears_backward_input)): each
//! part's 16-bit product by cuBLAS as before, then kernels/lora_fused.cu `lora_up_many_{bf16,f16}`
//! widens them all and adds every branch's dx term, reading and writing dx once instead of once per
//! part (the same values: the parts are added in the same order by the same operations). Composed path and reference:
//! `backend::linears_backward_input_composed` (one `linear_lora_backward` per part).

use super::gemm::Operand;
use super::lora::lora_up_launch;
use super::{Cuda, CudaWeight};
use crate::backend::{Dropout, LinearGradPart, LoraGrad};
use crate::config::ComputeDtype;
use cudarc::driver::{CudaSlice, DevicePtr, PushKernelArg};

/// Parts one launch takes (kernels/lora_fused.cu UP_PARTS).
const UP_PARTS: usize = 3;

/// The kernel's `UpParts` argument: per part its 16-bit product, its branch's du (0: no branch) and
/// A, and that branch's dropout.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UpParts {
    base: [u64; UP_PARTS],
    u: [u64; UP_PARTS],
    a: [u64; UP_PARTS],
    seed: [u64; UP_PARTS],
    p: [f32; UP_PARTS],
}
// SAFETY: plain data laid out as kernels/lora_fused.cu's `UpParts` (#[repr(C)], the same fields).
unsafe impl cudarc::driver::DeviceRepr for UpParts {}

/// A part's LoRA branch once its du is made: what its dA (`Cuda::lora_das`) and its dx term read.
struct BranchDu<'a> {
    x: &'a CudaSlice<f32>,
    a: &'a CudaSlice<f32>,
    du: CudaSlice<f32>,
    da: &'a mut CudaSlice<f32>,
    dropout: Dropout,
}

impl Cuda {
    /// The 16-bit dtype in which
    /// [`Backend::linears_backward_input`](crate::backend::Backend::linears_backward_input) lands its
    /// parts in one pass: two or three parts, each a 4-bit weight whose input gradient cuBLAS writes
    /// in that dtype (not the fused 4-bit matmul), each branch on the fused LoRA kernels; `None` (the
    /// composed path) otherwise or when switched off ([`Cuda::set_shared_x_dgrad`]).
    pub fn linears_in_one_pass(&self, parts: &[LinearGradPart<'_, Self>], m: usize, r: usize) -> Option<ComputeDtype> {
        if !self.shared_x_dgrad.load(std::sync::atomic::Ordering::Relaxed) || !(2..=UP_PARTS).contains(&parts.len()) {
            return None;
        }
        let mut dtype = None;
        for p in parts {
            let CudaWeight::Quant4 { compute: c @ (ComputeDtype::BF16 | ComputeDtype::F16), .. } = p.w else {
                return None;
            };
            let (rows, cols) = p.w.shape();
            let branch_ok = p.lora.is_none() || self.uses_fused_lora(rows, cols, r);
            if self.uses_fused_4bit(p.w, m) || !branch_ok || dtype.is_some_and(|d| d != *c) {
                return None;
            }
            dtype = Some(*c);
        }
        dtype
    }

    /// Turns [`Cuda::linears_in_one_pass`]'s path on or off (`LLAMATUNE_SHARED_X_DGRAD=0`: one
    /// widening per part, as the composed path lands them).
    pub fn set_shared_x_dgrad(&self, on: bool) {
        self.shared_x_dgrad.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`Backend::linears_backward_input`](crate::backend::Backend::linears_backward_input) where
    /// [`Cuda::linears_in_one_pass`] gave `c`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linears_backward_input_one_pass(
        &self,
        parts: Vec<LinearGradPart<'_, Self>>,
        m: usize,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
        r: usize,
        scale: f32,
        c: ComputeDtype,
    ) {
        let _span = self.span("input gradients sharing x (one pass)");
        let cols = parts[0].w.shape().1;
        assert!(dx.len() == m * cols, "linears_backward_input: bad shapes");
        // Each part's weight gradients and its input gradient's 16-bit product, as
        // linear_lora_backward makes them (du's kernel also rounds dy for the GEMM).
        // dA of the branches after all their du: one launch for the branches reading the same x.
        let mut products = Vec::with_capacity(parts.len());
        for p in parts {
            let (rows, w_cols) = p.w.shape();
            assert!(p.dy.len() == m * rows && w_cols == cols, "linears_backward_input: bad shapes");
            match p.lora {
                Some(LoraGrad { x, a, b, u, dropout, da, db }) => {
                    let mut dy16 = self.alloc_16(m * rows, c);
                    let du = self.lora_du_and_db(b, u, p.dy, (m, r, scale), db, Some(&mut dy16));
                    let branch = BranchDu { x, a, du, da, dropout };
                    products.push((self.dgrad_16(p.dy, Some(dy16), p.w, m, c), Some(branch)));
                }
                None => products.push((self.dgrad_16(p.dy, None, p.w, m, c), None)),
            }
        }
        let das = products.iter_mut().filter_map(|(_, branch)| branch.as_mut());
        self.lora_das(das.map(|br| (br.x, &br.du, &mut *br.da, br.dropout)).collect(), m, r);
        let _part = self.span("widen 16-bit products + LoRA dx terms");
        let mut arg = UpParts::default();
        let mut guards = Vec::new();
        for (t, (o16, branch)) in products.iter().enumerate() {
            let (ptr, g) = match o16 {
                Operand::BF16(o) => o.device_ptr(&self.stream),
                Operand::F16(o) => o.device_ptr(&self.stream),
                Operand::F32(_) => unreachable!("a 16-bit product"),
            };
            arg.base[t] = ptr;
            guards.push(g);
            if let Some(br) = branch {
                let (u, gu) = br.du.device_ptr(&self.stream);
                let (ap, ga) = br.a.device_ptr(&self.stream);
                (arg.u[t], arg.a[t], arg.seed[t], arg.p[t]) = (u, ap, br.dropout.seed, br.dropout.p);
                guards.extend([gu, ga]);
            }
        }
        let kernel = if c == ComputeDtype::F16 { "lora_up_many_f16" } else { "lora_up_many_bf16" };
        let (n, mi, ni, ri, acc) = (products.len() as i32, m as i32, cols as i32, r as i32, accumulate as i32);
        let mut b = self.stream.launch_builder(self.f(kernel));
        b.arg(&arg).arg(&n).arg(&mut *dx).arg(&mi).arg(&ni).arg(&ri).arg(&acc);
        // SAFETY: the table holds live buffers of the sizes the shapes say (guards held until the
        // launch is queued); the kernel bounds-checks rows against m and columns against N.
        ck!(unsafe { b.launch(lora_up_launch(m, cols)) }, kernel);
        drop(guards);
    }
}
