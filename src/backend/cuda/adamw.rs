//! kernels/adamw.cu's parameter structs and the multi-tensor launch geometry: AdamW and the global
//! gradient norm over every tensor of an adapter in one launch. CPU reference: `Cpu::adamw`,
//! `Cpu::sum_squares`.

use super::{grid_for, Cuda};
use crate::backend::{AdamWStep, Backend};
use cudarc::driver::{result, CudaSlice, DevicePtr, DevicePtrMut, LaunchConfig, PinnedHostSlice, PushKernelArg};

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

    /// Σ x² over every buffer in `bufs` (the global gradient norm's square), in one launch.
    pub(super) fn sum_squares_many(&self, bufs: &[&CudaSlice<f32>]) -> f64 {
        let _span = self.span("sum_squares_all");
        // Every tensor in one launch (a block per chunk of MULTI_CHUNK values, one f64 atomic each)
        // and a single download (a download per tensor stalled the step 128 times for a 7B q,v
        // adapter, a launch per tensor cost ~1.8 ms for an all-linear one's 448).
        let mut acc = self.scalar_f64();
        let mut guards = Vec::new();
        let mut table = Vec::with_capacity(bufs.len());
        let mut chunks = Chunks::default();
        for buf in bufs {
            let (x, g) = buf.device_ptr(&self.stream);
            guards.push(g);
            table.push(SumTensor { x, n: buf.len() as i64, first_chunk: chunks.take(buf.len()) });
        }
        if let Some(cfg) = chunks.launch() {
            let table = ck!(self.stream.clone_htod(&table), "upload sum table");
            let (count, chunk) = (bufs.len() as i32, MULTI_CHUNK as i64);
            let mut b = self.stream.launch_builder(self.f("sum_squares_many_f32"));
            b.arg(&table).arg(&count).arg(&mut acc).arg(&chunk);
            // SAFETY: the table holds the addresses and lengths of live buffers (guards held until the
            // launch is queued); the kernel reads n values of each and adds into acc.
            ck!(unsafe { b.launch(cfg) }, "sum_squares_many_f32");
        }
        drop(guards);
        ck!(self.stream.clone_dtoh(&acc), "download")[0]
    }

    /// Zeros into every buffer in `bufs` in one launch (`zero_many_f32`,
    /// [`Backend::zero_all`](crate::backend::Backend::zero_all)); `LLAMATUNE_ZERO_MANY=0` (or
    /// [`Cuda::set_zero_many`]) gives each a fresh zeroed buffer instead, as the trait's default does.
    pub(super) fn zero_many(&self, bufs: Vec<&mut CudaSlice<f32>>) {
        if !self.zero_many.load(std::sync::atomic::Ordering::Relaxed) {
            for b in bufs {
                *b = self.zeros(b.len());
            }
            return;
        }
        let _span = self.span("zero_all");
        let mut guards = Vec::new();
        let mut table = Vec::with_capacity(bufs.len());
        let mut chunks = Chunks::default();
        for buf in bufs {
            let n = buf.len();
            let (x, g) = buf.device_ptr_mut(&self.stream);
            guards.push(g);
            table.push(SumTensor { x, n: n as i64, first_chunk: chunks.take(n) });
        }
        if let Some(cfg) = chunks.launch() {
            let table_d = ck!(self.stream.clone_htod(&table), "upload zero table");
            let (count, chunk) = (table.len() as i32, MULTI_CHUNK as i64);
            let mut b = self.stream.launch_builder(self.f("zero_many_f32"));
            b.arg(&table_d).arg(&count).arg(&chunk);
            // SAFETY: the table holds the addresses and lengths of live buffers (guards held until the
            // launch is queued); the kernel writes n values of each.
            ck!(unsafe { b.launch(cfg) }, "zero_many_f32");
        }
        drop(guards);
    }

    /// Gradients zeroed in one launch (`true`, the default) or each given a fresh zeroed buffer
    /// (`false`; A/B runs).
    pub fn set_zero_many(&self, on: bool) {
        self.zero_many.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// AdamW with the moments in pinned host memory ([`Backend::adamw_paged`](crate::backend::Backend::adamw_paged)):
    /// `chunk` values of m and v at a time go host → staging buffers → `adamw_f32` → host.
    pub(super) fn adamw_paged_chunks(
        &self,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        m: &mut PinnedHostSlice<f32>,
        v: &mut PinnedHostSlice<f32>,
        hp: &AdamWStep,
        chunk: usize,
    ) {
        let _span = self.span("adamw_paged");
        // Each chunk of m and v goes host → staging → kernel → host on the one stream, so a chunk's
        // staging buffers are reused only after its copies back are done (stream order).
        let n = param.len();
        let chunk = chunk.clamp(1, n.max(1));
        let (mut sm, mut sv) = (self.zeros(chunk), self.zeros(chunk));
        let hyper = AdamHyper::of(hp);
        let cu = self.stream.cu_stream();
        let mp = ck!(m.as_mut_ptr(), "pinned access");
        let vp = ck!(v.as_mut_ptr(), "pinned access");
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            // SAFETY: [start, start+len) lies inside both pinned buffers (length n) and both staging
            // buffers (length ≥ len); the host memory is not touched until the final synchronize.
            unsafe {
                let (dm, _g1) = sm.device_ptr_mut(&self.stream);
                ck!(
                    result::memcpy_htod_async(dm, std::slice::from_raw_parts(mp.add(start), len), cu),
                    "paged state upload"
                );
                let (dv, _g2) = sv.device_ptr_mut(&self.stream);
                ck!(
                    result::memcpy_htod_async(dv, std::slice::from_raw_parts(vp.add(start), len), cu),
                    "paged state upload"
                );
            }
            {
                let mut pv = param.slice_mut(start..start + len);
                let gv = grad.slice(start..start + len);
                let n64 = len as i64;
                launch!(self, "adamw_f32", grid_for(len); &mut pv, &gv, &mut sm, &mut sv, &hyper, &n64);
            }
            // SAFETY: as above; the device → host copies land in the same ranges.
            unsafe {
                let (dm, _g1) = sm.device_ptr(&self.stream);
                ck!(
                    result::memcpy_dtoh_async(std::slice::from_raw_parts_mut(mp.add(start), len), dm, cu),
                    "paged state download"
                );
                let (dv, _g2) = sv.device_ptr(&self.stream);
                ck!(
                    result::memcpy_dtoh_async(std::slice::from_raw_parts_mut(vp.add(start), len), dv, cu),
                    "paged state download"
                );
            }
            start += len;
        }
        self.synchronize();
    }

    /// AdamW over every tensor of an adapter in one launch (`adamw_many_f32`,
    /// [`Backend::adamw_all`](crate::backend::Backend::adamw_all)).
    pub(super) fn adamw_many(
        &self,
        params: Vec<&mut CudaSlice<f32>>,
        grads: Vec<&CudaSlice<f32>>,
        m: &mut [CudaSlice<f32>],
        v: &mut [CudaSlice<f32>],
        hp: &AdamWStep,
    ) {
        assert!(grads.len() == params.len() && m.len() == params.len() && v.len() == params.len(), "adamw_all");
        // Every tensor in one launch: a table of their addresses, each tensor cut into chunks of
        // MULTI_CHUNK values, a block per chunk.
        let mut guards = Vec::new();
        let mut table = Vec::with_capacity(params.len());
        let mut chunks = Chunks::default();
        for (((p, g), m), v) in params.into_iter().zip(grads).zip(m.iter_mut()).zip(v.iter_mut()) {
            let n = p.len();
            assert!(g.len() == n && m.len() == n && v.len() == n, "adamw_all: a tensor's shapes differ");
            let (pp, gp_) = p.device_ptr_mut(&self.stream);
            let (gp, gg) = g.device_ptr(&self.stream);
            let (mp, gm) = m.device_ptr_mut(&self.stream);
            let (vp, gv) = v.device_ptr_mut(&self.stream);
            guards.extend([gp_, gg, gm, gv]);
            table.push(AdamTensor { p: pp, g: gp, m: mp, v: vp, n: n as i64, first_chunk: chunks.take(n) });
        }
        let Some(cfg) = chunks.launch() else { return };
        let (hyper, count, chunk) = (AdamHyper::of(hp), table.len() as i32, MULTI_CHUNK as i64);
        let table = ck!(self.stream.clone_htod(&table), "upload adamw table");
        let mut b = self.stream.launch_builder(self.f("adamw_many_f32"));
        b.arg(&table).arg(&count).arg(&hyper).arg(&chunk);
        // SAFETY: the table holds the addresses of live buffers (their guards held until the launch is
        // queued) and each tensor's length; the kernel touches n values of each.
        ck!(unsafe { b.launch(cfg) }, "adamw_many_f32");
        drop(guards);
    }
}
