//! Row-major GEMM through cuBLAS `GemmEx`, over f32 / f16 / bf16 operands with f32 accumulation and
//! an f32 or 16-bit output. cuBLAS is column-major: a row-major `C = op(A)·op(B)` is the column-major
//! `Cᵀ = op(B)ᵀ·op(A)ᵀ`, so the operands are passed swapped.

use super::OperandView;
use cudarc::cublas::sys::{self, cublasComputeType_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};
use std::sync::Arc;

/// How a GEMM multiplies f32 operands (16-bit operands always use the tensor cores).
#[derive(Clone, Copy)]
pub enum F32Math {
    /// Full f32, so the GPU matches the f32 CPU reference closely.
    Exact,
    /// TF32 on the tensor cores (10-bit mantissa, f32 accumulation): the LoRA products, which are
    /// skinny (rank ≤ 256) and memory-bound in f32.
    Tf32,
}

/// A GEMM's output: f32, or 16-bit, which cuBLAS rounds to nearest as it writes (16-bit outputs take
/// f32 operands only in f32 math; 16-bit operands accumulate in f32 either way).
pub enum GemmOut<'a> {
    F32(&'a mut CudaSlice<f32>),
    F16(&'a mut CudaSlice<half::f16>),
    BF16(&'a mut CudaSlice<half::bf16>),
}

impl<'a> From<&'a mut CudaSlice<f32>> for GemmOut<'a> {
    fn from(c: &'a mut CudaSlice<f32>) -> Self {
        GemmOut::F32(c)
    }
}

pub struct Blas {
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    /// cuBLAS's workspace, ours: a GEMM captured into a CUDA graph must not make cuBLAS allocate.
    _workspace: CudaSlice<u8>,
}

/// 32 MiB, what cuBLAS asks for on Hopper.
const WORKSPACE_BYTES: usize = 32 << 20;

impl Blas {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, String> {
        let blas = CudaBlas::new(stream.clone()).map_err(|e| format!("{e:?}"))?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES).map_err(|e| format!("{e:?}"))?;
        {
            let (ptr, _rec) = workspace.device_ptr(&stream);
            // SAFETY: the workspace lives as long as the handle (both are fields of this struct).
            unsafe { sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut _, WORKSPACE_BYTES) }
                .result()
                .map_err(|e| format!("{e:?}"))?;
        }
        Ok(Blas { blas, stream, _workspace: workspace })
    }

    /// `C (m, n) = alpha · op(A) · op(B) + beta · C`, all row-major; `op(A)` is `(m, k)`, `op(B)` is
    /// `(k, n)`; `lda`/`ldb`/`ldc` are the stored matrices' row lengths. A and B have the same dtype;
    /// `math` says how f32 operands are multiplied.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_rm<'a, 'c>(
        &'a self,
        math: F32Math,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: impl Into<OperandView<'a>>,
        lda: usize,
        b: impl Into<OperandView<'a>>,
        ldb: usize,
        beta: f32,
        c: impl Into<GemmOut<'c>>,
        ldc: usize,
    ) -> Result<(), String> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (a, b) = (a.into(), b.into());
        let compute = match math {
            F32Math::Exact => cublasComputeType_t::CUBLAS_COMPUTE_32F,
            F32Math::Tf32 => cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        };
        let (pa, ta, _ga) = ptr(&a, &self.stream);
        let (pb, tb, _gb) = ptr(&b, &self.stream);
        if ta != tb {
            return Err(format!("GEMM operands of different dtypes ({ta:?}, {tb:?})"));
        }
        let (pc, tc, _gc) = match c.into() {
            GemmOut::F32(c) => {
                let (p, g) = c.device_ptr_mut(&self.stream);
                (p, cudaDataType_t::CUDA_R_32F, g)
            }
            GemmOut::F16(c) => {
                let (p, g) = c.device_ptr_mut(&self.stream);
                (p, cudaDataType_t::CUDA_R_16F, g)
            }
            GemmOut::BF16(c) => {
                let (p, g) = c.device_ptr_mut(&self.stream);
                (p, cudaDataType_t::CUDA_R_16BF, g)
            }
        };
        let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        // SAFETY: pointers come from live device buffers whose lengths the callers checked.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                op(trans_b),
                op(trans_a),
                n as i32,
                m as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                pb as *const _,
                tb,
                ldb as i32,
                pa as *const _,
                ta,
                lda as i32,
                &beta as *const f32 as *const _,
                pc as *mut _,
                tc,
                ldc as i32,
                compute,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("{e:?}"))
    }
}

fn ptr<'a>(o: &OperandView<'a>, s: &'a CudaStream) -> (u64, cudarc::cublas::sys::cudaDataType, SyncOnDrop<'a>) {
    match *o {
        OperandView::F32(x) => {
            let (p, g) = x.device_ptr(s);
            (p, cudaDataType_t::CUDA_R_32F, g)
        }
        OperandView::F16(x) => {
            let (p, g) = x.device_ptr(s);
            (p, cudaDataType_t::CUDA_R_16F, g)
        }
        OperandView::BF16(x) => {
            let (p, g) = x.device_ptr(s);
            (p, cudaDataType_t::CUDA_R_16BF, g)
        }
    }
}
