//! The MLP's gate and up products kept in the 16-bit compute dtype (`MlpActs::Half`), where all three
//! of its 4-bit products take the second path. CPU reference: the composed ops of backend/mod.rs.

use super::gemm::Operand;
use super::quant4::GEMV_MAX_M;
use super::{Cuda, CudaWeight};
use crate::config::ComputeDtype;
use cudarc::driver::CudaSlice;

/// An MLP's gate and up products `(m, ffn)` kept for its backward ([`Backend::mlp_gate_up`]).
pub enum MlpActs {
    /// Widened into f32, as every other product is (the composed ops).
    F32 { g: CudaSlice<f32>, u: CudaSlice<f32> },
    /// In the weights' 16-bit compute dtype as cuBLAS writes them, where all three products take the
    /// second path (`Cuda::mlp_in_16_bit`): the same values in half the memory, no widening pass.
    Half { g: Operand, u: Operand },
}

impl Cuda {
    /// The 16-bit dtype [`Backend::mlp_gate_up`] keeps an MLP's products in, when it can: three 4-bit
    /// weights computing in one 16-bit dtype, all on the second path at `m` rows (dequantize +
    /// cuBLAS, whose outputs are rounded to that dtype anyway); not in precise mode.
    pub(super) fn mlp_in_16_bit(&self, ws: [&CudaWeight; 3], m: usize) -> Option<ComputeDtype> {
        let c = match ws[0] {
            CudaWeight::Quant4 { compute: c @ (ComputeDtype::BF16 | ComputeDtype::F16), .. } => *c,
            _ => return None,
        };
        let second_path = |w: &CudaWeight| {
            matches!(w, CudaWeight::Quant4 { compute, .. } if *compute == c) && !self.uses_fused_4bit(w, m)
        };
        (m > GEMV_MAX_M && !self.is_precise() && ws.iter().all(|w| second_path(w))).then_some(c)
    }
}
