//! kernels/adamw.cu's parameter structs and the multi-tensor launch geometry: AdamW and the global
//! gradient norm over every tensor of an adapter in one launch. CPU reference: `Cpu::adamw`,
//! `Cpu::sum_squares`.

use super::Cuda;
use crate::backend::AdamWStep;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

/// kernels/adamw.cu `AdamHyper`, passed by value: an AdamW step's hyper-parameters with the step size
/// and bias correction worked out as Cpu::adamw works them out (the same f32 arithmetic).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct AdamHyper {
    pub(super) lr: f32,
    pub(super) beta1: f32,
    pub(super) beta2: f32,
    pub(super) eps: f32,
    pub(super) weight_decay: f32,
    pub(super) step_size: f32,
    pub(super) c2: f32,
    pub(super) grad_scale: f32,
}

impl AdamHyper {
    pub(super) fn of(hp: &AdamWStep) -> Self {
        let (step_size, c2) = hp.corrections();
        let AdamWStep { lr, beta1, beta2, eps, weight_decay, grad_scale, .. } = *hp;
        AdamHyper { lr, beta1, beta2, eps, weight_decay, step_size, c2, grad_scale }
    }
}

// SAFETY: plain old data with the layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for AdamHyper {}

/// kernels/adamw.cu `AdamTensor`: one tensor of `adamw_many_f32` (device addresses as u64).
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct AdamTensor {
    pub(super) p: u64,
    pub(super) g: u64,
    pub(super) m: u64,
    pub(super) v: u64,
    pub(super) n: i64,
    pub(super) first_chunk: i64,
}

// SAFETY: plain old data with the layout of the kernel's struct (uploaded as an array).
unsafe impl cudarc::driver::DeviceRepr for AdamTensor {}

/// kernels/adamw.cu `SumTensor`: one tensor of `sum_squares_many_f32`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct SumTensor {
    pub(super) x: u64,
    pub(super) n: i64,
    pub(super) first_chunk: i64,
}

// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for SumTensor {}

/// Values per block of the multi-tensor optimizer kernels (256 threads, 64 values each): an
/// all-linear 7B adapter's 160M values are ~9,800 blocks, its 1 MB tensors 16 each.
pub(super) const MULTI_CHUNK: usize = 16384;

/// The chunks of a multi-tensor launch: hands each tensor its first chunk (block) in turn and gives
/// the grid, a block of 256 threads per chunk.
#[derive(Default)]
pub(super) struct Chunks(usize);

impl Chunks {
    /// The first chunk of the next tensor, of `n` values.
    pub(super) fn take(&mut self, n: usize) -> i64 {
        let first = self.0;
        self.0 += n.div_ceil(MULTI_CHUNK);
        first as i64
    }
    /// The launch over every chunk taken; `None` when there is none.
    pub(super) fn launch(&self) -> Option<LaunchConfig> {
        let grid = LaunchConfig { grid_dim: (self.0 as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        (self.0 > 0).then_some(grid)
    }
}

impl Cuda {
    /// `acc += Σ buf²` (f64, on the device). Each block adds its sum atomically: few blocks (up to
    /// two per SM, each thread summing 8 or more values), so the atomics do not queue.
    pub(super) fn add_sum_squares(&self, buf: &CudaSlice<f32>, acc: &mut CudaSlice<f64>) {
        let blocks = buf.len().div_ceil(256 * 8).clamp(1, 2 * 132) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let n = buf.len() as i64;
        launch!(self, "sum_squares_f32", cfg; buf, &mut *acc, &n);
    }
}
