//! The read floor (kernels/read_floor.cu): one launch that only reads a buffer, for the benches to set
//! the decoding GEMVs against. No op calls it.

use super::Cuda;
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

impl Cuda {
    /// One launch reading every byte of `buf` (its length a multiple of 4 floats) with `unroll`
    /// (2, 4, 8 or 16) 16-byte loads in flight per thread, in `blocks_per_sm` blocks of 256 threads
    /// per SM (blocks past what fits at once wait for a second wave); `sink` `(1)` is written only in a
    /// case the inputs never give.
    pub fn read_floor(&self, buf: &CudaSlice<f32>, unroll: usize, blocks_per_sm: usize, sink: &mut CudaSlice<f32>) {
        assert!(buf.len() % 4 == 0, "read_floor: whole 16-byte words");
        let kernel = match unroll {
            2 => "read_floor_u2",
            4 => "read_floor_u4",
            8 => "read_floor_u8",
            16 => "read_floor_u16",
            _ => panic!("read_floor: unroll {unroll} is not 2, 4, 8 or 16"),
        };
        let words = (buf.len() / 4) as i64;
        let blocks = (self.sm_count * blocks_per_sm).max(1) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        launch!(self, kernel, cfg; buf, &words, &mut *sink);
    }
}
