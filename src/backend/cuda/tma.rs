//! Tensor maps for the copy engine's tiled loads (TMA: `cp.async.bulk.tensor`, kernels/wgmma.cuh
//! `tma_load_4d`): one map describes a tensor in global memory and the box a load brings into shared
//! memory, in the 128-byte-swizzled layout the wgmma kernels read, so one thread issues a tile's copy.

use cudarc::driver::sys::{
    self, CUtensorMap, CUtensorMapDataType, CUtensorMapFloatOOBfill, CUtensorMapInterleave, CUtensorMapL2promotion,
    CUtensorMapSwizzle,
};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DeviceRepr, PushKernelArg};
use half::bf16;

/// A `CUtensorMap` as a kernel parameter (`const __grid_constant__ TmaMap`: 128 bytes, 64-byte
/// aligned), copied by value into the launch.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
pub(super) struct TmaMap(CUtensorMap);

// SAFETY: plain bytes with the layout of kernels/wgmma.cuh's `TmaMap`, read by value by the kernel.
unsafe impl DeviceRepr for TmaMap {}

/// A (batch, cap, heads, 128) bf16 tensor whose first `len` positions of each sequence are read, as
/// boxes of 64 positions × 64 columns of one head: the 128-byte-swizzled half tiles of
/// kernels/flash_wgmma.cu `copy_tile` (row r's 16-byte chunk c at r·128 + (c XOR r % 8)·16). A load's
/// coordinates are (column 0 or 64, head, position, batch); positions from `len` on read as zeros.
pub(super) fn head_rows(
    stream: &CudaStream,
    t: &CudaSlice<bf16>,
    (batch, cap, len, heads): (usize, usize, usize, usize),
) -> Result<TmaMap, String> {
    assert!(len <= cap && t.len() >= batch * cap * heads * 128, "a tensor map over {} values", t.len());
    let (ptr, _sync) = t.device_ptr(stream);
    let dims: [u64; 4] = [128, heads as u64, len as u64, batch as u64];
    // Byte strides of dimensions 1..3 (dimension 0's elements are contiguous).
    let strides: [u64; 3] = [256, heads as u64 * 256, (cap * heads) as u64 * 256];
    let boxes: [u32; 4] = [64, 1, 64, 1];
    let element_strides: [u32; 4] = [1; 4];
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::uninit();
    // SAFETY: every array has the rank's length; the address is a live device allocation of at least
    // batch · cap · heads · 128 bf16 (asserted) and 256-byte aligned; the map is written before it is
    // read.
    let r = unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            4,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(format!("cuTensorMapEncodeTiled ({batch} × {len} of {cap} positions × {heads} heads): {r:?}"));
    }
    // SAFETY: initialized by the successful call above.
    Ok(TmaMap(unsafe { map.assume_init() }))
}

impl super::Cuda {
    /// One 64-row tile of `head_rows`' map over `host` (`batch` sequences of `len` positions of
    /// `heads` head vectors) at (`head`, position `t0`, sequence `b`), both column halves, as the copy
    /// engine lays them into shared memory (16,384 bytes; kernels/flash_wgmma.cu `tma_probe`), for the
    /// test that holds them to copy_tile's layout. `None` without wgmma (the maps serve only the wgmma
    /// forward).
    pub fn tma_probe(
        &self,
        host: &[bf16],
        (batch, len, heads): (usize, usize, usize),
        (head, t0, b): (usize, usize, usize),
    ) -> Option<Vec<u8>> {
        if !self.wgmma {
            return None;
        }
        let t = ck!(self.stream.clone_htod(host), "upload");
        let map = ck!(head_rows(&self.stream, &t, (batch, len, len, heads)), "tensor map");
        // Poisoned, so that a byte the kernel fails to write cannot pass for a zero-filled row.
        let mut out = ck!(self.stream.clone_htod(&[0xa5u8; 16384]), "upload");
        let [h32, t32, b32] = [head, t0, b].map(|x| x as i32);
        let mut lb = self.stream.launch_builder(self.f("tma_probe"));
        lb.arg(&map).arg(&h32).arg(&t32).arg(&b32).arg(&mut out);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 16384 + 1024,
        };
        // SAFETY: the kernel writes the 16,384 bytes of `out` and reads the map's tile.
        ck!(unsafe { lb.launch(cfg) }, "tma_probe");
        Some(ck!(self.stream.clone_dtoh(&out), "download"))
    }
}
