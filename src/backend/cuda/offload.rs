//! Offloaded gradient checkpoints: a decoder layer's saved input waits in pinned host memory between
//! the forward pass and that layer's backward (Unsloth's offloaded checkpointing). The copies run on a
//! side stream, ordered against the compute stream by events, so they overlap the layers computed
//! meanwhile; only the checkpoint being replayed and the one being brought back stay on the device.

use super::Cuda;
use cudarc::driver::{result, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice};
use std::sync::{Arc, Mutex, MutexGuard};

/// A checkpoint parked by [`Cuda`]'s `offload`.
pub enum Offloaded {
    /// Still on the device (no page-locked host memory could be had).
    Device(CudaSlice<f32>),
    /// The first `len` values of `host` (once the side stream's copy, queued at offload, is done).
    Host { host: PinnedHostSlice<f32>, len: usize },
    /// On its way back: `buf` may be used on the compute stream after `ready`.
    Reloading { buf: CudaSlice<f32>, ready: CudaEvent, host: PinnedHostSlice<f32> },
}

/// The side stream and the buffers in flight.
pub struct OffloadState {
    side: Arc<CudaStream>,
    /// Page-locked buffers not in use, kept for the next step's checkpoints (allocating them takes
    /// milliseconds; a step needs one per layer).
    spare: Mutex<Vec<PinnedHostSlice<f32>>>,
    /// Device buffers whose copy to the host may still be running, each with the event its copy ends.
    leaving: Mutex<Vec<(CudaSlice<f32>, CudaEvent)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl OffloadState {
    pub fn new(side: Arc<CudaStream>) -> Self {
        OffloadState { side, spare: Mutex::new(Vec::new()), leaving: Mutex::new(Vec::new()) }
    }
}

impl Cuda {
    /// The side stream starts after the work queued so far on the compute stream.
    fn side_after_compute(&self) {
        let now = ck!(self.stream.record_event(None), "event record");
        ck!(self.offload.side.wait(&now), "stream wait");
    }

    /// A spare page-locked buffer of at least `len` values (the smallest that fits), else a new one;
    /// `None` when none can be allocated. When none fits (the batch grew), the smallest spare goes,
    /// so the pool holds no more buffers than a step has in flight.
    fn pinned_for(&self, len: usize) -> Option<PinnedHostSlice<f32>> {
        let mut spare = lock(&self.offload.spare);
        let by_size = |fits: bool| {
            spare
                .iter()
                .enumerate()
                .filter(|(_, h)| !fits || h.len() >= len)
                .min_by_key(|(_, h)| h.len())
                .map(|(i, _)| i)
        };
        if let Some(i) = by_size(true) {
            return Some(spare.swap_remove(i));
        }
        if let Some(i) = by_size(false) {
            // Freeing page-locked memory must not race a copy still queued on the side stream.
            ck!(self.offload.side.synchronize(), "side stream synchronize");
            spare.swap_remove(i);
        }
        // SAFETY: the buffer is written by a device copy before anything reads it.
        unsafe { self.ctx.alloc_pinned_with_flags::<f32>(len.max(1), 0) }.ok()
    }

    /// Frees the device buffers of earlier offloads. The compute stream first waits for their copies,
    /// which were queued at least a layer earlier and so are done by the time it gets here.
    pub(super) fn release_offloaded(&self) {
        for (buf, done) in lock(&self.offload.leaving).drain(..) {
            ck!(self.stream.wait(&done), "stream wait");
            drop(buf);
        }
    }

    pub(super) fn offload_buf(&self, buf: CudaSlice<f32>) -> Offloaded {
        self.release_offloaded();
        let len = buf.len();
        let Some(mut host) = self.pinned_for(len) else { return Offloaded::Device(buf) };
        self.side_after_compute(); // buf's value is complete
        let side = &self.offload.side;
        let hp = ck!(host.as_mut_ptr(), "pinned access");
        {
            let (src, _order) = buf.device_ptr(side);
            // SAFETY: host holds at least len values and is not touched on the host until reloaded;
            // buf stays alive (in `leaving`) until the copy's event has completed.
            let dst = unsafe { std::slice::from_raw_parts_mut(hp, len) };
            ck!(unsafe { result::memcpy_dtoh_async(dst, src, side.cu_stream()) }, "checkpoint download");
        }
        let done = ck!(side.record_event(None), "event record");
        lock(&self.offload.leaving).push((buf, done));
        Offloaded::Host { host, len }
    }

    pub(super) fn reload_buf(&self, parked: Offloaded) -> Offloaded {
        let Offloaded::Host { host, len } = parked else { return parked };
        self.release_offloaded();
        let mut buf = self.scratch(len); // allocated in compute-stream order
        self.side_after_compute();
        let side = &self.offload.side;
        let hp = ck!(host.as_ptr(), "pinned access");
        {
            let (dst, _order) = buf.device_ptr_mut(side);
            // SAFETY: host holds len values written by the side stream's earlier download, which
            // this upload follows in the side stream's order.
            let src = unsafe { std::slice::from_raw_parts(hp, len) };
            ck!(unsafe { result::memcpy_htod_async(dst, src, side.cu_stream()) }, "checkpoint upload");
        }
        let ready = ck!(side.record_event(None), "event record");
        Offloaded::Reloading { buf, ready, host }
    }

    pub(super) fn restore_buf(&self, parked: Offloaded) -> CudaSlice<f32> {
        match parked {
            Offloaded::Device(buf) => buf,
            host @ Offloaded::Host { .. } => self.restore_buf(self.reload_buf(host)),
            Offloaded::Reloading { buf, ready, host } => {
                ck!(self.stream.wait(&ready), "stream wait");
                // Reusable now: a later download into it queues behind this upload on the side stream.
                lock(&self.offload.spare).push(host);
                buf
            }
        }
    }
}
