//! Greedy decoding's state held on the device (kernels/decode_state.cu): the chosen token, the next
//! step's inputs read at the device's token and position, the position moved on by the step itself,
//! and reads to the host that do not wait. Together they let `generate` queue a step before it has
//! read the token of the step before, so the GPU is never idle between two tokens. CPU references:
//! the `Backend` trait's defaults.

use super::weights::{CudaWeight, DenseData};
use super::{grid_for, Cuda};
use cudarc::driver::{result, CudaEvent, CudaSlice, DevicePtr, LaunchConfig, PinnedHostSlice, PushKernelArg};

/// A copy to the host under way: pinned memory (so the copy runs behind the queued work without
/// blocking the host) of at least `len` values, and the event recorded after the copy.
pub struct PendingRead {
    pinned: PinnedRead,
    len: usize,
}

/// Pinned memory for reads and the event that marks a copy into it done (this backend's context
/// tracks no events itself, so cudarc's own event on the pinned slice is never recorded).
pub(super) struct PinnedRead {
    host: PinnedHostSlice<f32>,
    done: CudaEvent,
}

impl Drop for PinnedRead {
    /// A read dropped unwaited (a failed generation) must not free memory a copy still writes.
    fn drop(&mut self) {
        let _ = self.done.synchronize();
    }
}

impl Cuda {
    /// `out[0]` = the index of `x`'s largest value, as an f32 (`argmax_f32`, one block).
    pub(super) fn argmax_to(&self, x: &CudaSlice<f32>, out: &mut CudaSlice<f32>) {
        let _span = self.span("argmax");
        let n = x.len() as i64;
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (1024, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "argmax_f32", cfg; x, &n, &mut *out);
    }

    /// A one-token step's embedded token and RoPE rows at the device-held `token` and `pos`
    /// (`decode_inputs_at_*`: one launch, recordable).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn inputs_at(
        &self,
        table: &CudaWeight,
        token: &CudaSlice<f32>,
        pos: &CudaSlice<f32>,
        (cos_table, sin_table): (&CudaSlice<f32>, &CudaSlice<f32>),
        h: &mut CudaSlice<f32>,
        cos: &mut CudaSlice<f32>,
        sin: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("decode_inputs_at");
        let (_, dim) = table.shape();
        let half = cos.len();
        assert!(h.len() >= dim && sin.len() == half, "decode_inputs_at: h (dim) and cos, sin (half)");
        let (dim32, half32) = (dim as i32, half as i32);
        let cfg = grid_for(dim + 2 * half);
        match table {
            CudaWeight::Dense { data: DenseData::BF16(d), .. } => launch!(self, "decode_inputs_at_bf16", cfg;
                d, token, pos, cos_table, sin_table, &mut *h, &mut *cos, &mut *sin, &dim32, &half32),
            CudaWeight::Dense { data: DenseData::F16(d), .. } => launch!(self, "decode_inputs_at_f16", cfg;
                d, token, pos, cos_table, sin_table, &mut *h, &mut *cos, &mut *sin, &dim32, &half32),
            // Llama::load keeps the embedding dense; a 4-bit table would be expanded whole per token.
            _ => panic!("decode_inputs_at: the embedding table must be dense (bf16 or f16)"),
        }
    }

    /// `pos[0] += 1` on the device (`advance_position_f32`).
    pub(super) fn advance(&self, pos: &mut CudaSlice<f32>) {
        let _span = self.span("advance_position");
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
        launch!(self, "advance_position_f32", cfg; &mut *pos);
    }

    /// Queues a copy of `buf` to pinned host memory taken from the backend's free list.
    pub(super) fn start_read(&self, buf: &CudaSlice<f32>) -> PendingRead {
        let _span = self.span("read_later");
        let len = buf.len();
        let reused = {
            let mut free = self.pinned_reads.lock().unwrap();
            free.iter().position(|p| p.host.len() >= len).map(|i| free.swap_remove(i))
        };
        let mut pinned = match reused {
            Some(p) => p,
            None => PinnedRead {
                // SAFETY: the copy below writes the `len` values read_wait returns; the rest is unread.
                host: ck!(unsafe { self.ctx.alloc_pinned_with_flags::<f32>(len.max(1), 0) }, "pinned alloc"),
                done: ck!(self.ctx.new_event(None), "event"),
            },
        };
        let hp = ck!(pinned.host.as_mut_ptr(), "pinned access");
        {
            let (src, _order) = buf.device_ptr(&self.stream);
            // SAFETY: `hp` holds at least `len` values, untouched on the host until read_wait has
            // waited for `done`; exactly `len` are copied (cudarc's memcpy_dtoh would copy the
            // whole pinned slice, past the end of a shorter `buf`).
            let dst = unsafe { std::slice::from_raw_parts_mut(hp, len) };
            ck!(unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }, "read_later");
        }
        ck!(pinned.done.record(&self.stream), "event record");
        PendingRead { pinned, len }
    }

    /// Waits for a [`Cuda::start_read`]'s copy and gives its pinned memory back to the free list.
    pub(super) fn finish_read(&self, pending: PendingRead) -> Vec<f32> {
        ck!(pending.pinned.done.synchronize(), "read_wait");
        let hp = ck!(pending.pinned.host.as_ptr(), "pinned access");
        // SAFETY: the copy of `len` values into `hp` has completed (its event above).
        let values = unsafe { std::slice::from_raw_parts(hp, pending.len) }.to_vec();
        self.pinned_reads.lock().unwrap().push(pending.pinned);
        values
    }
}
