//! The CUDA backend: every op of [`Backend`] as a hand-written kernel from `kernels/*.cu` (compiled by
//! `build.rs`, embedded as fatbins) or a cuBLAS GEMM, on one stream. Activations and trainable
//! parameters are f32 on the device; frozen dense weights are bf16; 4-bit weights stay in the
//! bitsandbytes layout and are read from it by the decoding GEMV and the fused dequant-matmul
//! (kernels/nf4.cu, nf4_gemm.cu), or expanded to the compute dtype right before a cuBLAS GEMM (the
//! second path, which training shapes take). LoRA branches run on kernels/lora_fused.cu.
//! Each launcher names its kernel's file; the CPU reference of every op is in `backend/cpu.rs`.

mod blas;
use blas::F32Math;

use super::{
    rope_attention_backward_composed, rope_attention_composed, AdamWStep, AttnShape, Backend, Dropout, HostWeight,
    LoraBranch, LoraDown, LoraGrad, RopeTables,
};
use crate::config::{ComputeDtype, QuantType};
use crate::error::{Error, Result};
use crate::quant::{self, Absmax, Quant4};
use cudarc::driver::{
    result, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::Arc;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// A frozen weight on the device.
pub enum CudaWeight {
    /// `(rows, cols)`, fp16 when every value is exactly an fp16 (an fp16 checkpoint), else bf16.
    Dense { rows: usize, cols: usize, data: DenseData },
    Quant4 {
        rows: usize,
        cols: usize,
        quant_type: QuantType,
        blocksize: usize,
        compute: ComputeDtype,
        /// `ceil(rows·cols/2)` bytes, element 2j in the high nibble.
        packed: CudaSlice<u8>,
        absmax: DeviceAbsmax,
    },
}

pub enum DenseData {
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

pub enum DeviceAbsmax {
    F32(CudaSlice<f32>),
    Nested { q: CudaSlice<u8>, absmax2: CudaSlice<f32>, offset: f32 },
}

impl CudaWeight {
    fn shape(&self) -> (usize, usize) {
        match self {
            CudaWeight::Dense { rows, cols, .. } | CudaWeight::Quant4 { rows, cols, .. } => (*rows, *cols),
        }
    }
}

/// The CUDA backend on one device.
pub struct Cuda {
    ordinal: usize,
    device_name: String,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: blas::Blas,
    funcs: HashMap<String, CudaFunction>,
    /// The dynamic 8-bit map (double-quantized absmax) and the two 4-bit code tables, on the device.
    code256: CudaSlice<f32>,
    nf4: CudaSlice<f32>,
    fp4: CudaSlice<f32>,
    /// The device's default memory pool, which every `alloc` of this backend draws from
    /// (cudarc allocates with `cuMemAllocAsync`); its used-memory high-water mark is our peak.
    pool: Pool,
    /// `LLAMATUNE_POISON=1`: op outputs start as NaN instead of uninitialized (tests).
    poison: bool,
    /// [`Cuda::set_precise`]: f32 attention kernels, exact-f32 LoRA products, 4-bit products on the
    /// second path.
    precise: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_fused_4bit`]: when 4-bit products take the fused tensor-core kernel (a
    /// [`Fused4bit`] as u8; `LLAMATUNE_FUSED_4BIT=off|auto|always`, default auto; off without wgmma).
    fused_4bit: std::sync::atomic::AtomicU8,
    /// [`Cuda::set_fused_lora`]: LoRA branches at training shapes on kernels/lora_fused.cu
    /// (`LLAMATUNE_FUSED_LORA=0|off` for the cuBLAS path; default on).
    fused_lora: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_gemv_many`]: decoding's products that share one row of x in one launch: q/k/v
    /// (`gemv_4bit_many_*`), gate/up with SwiGLU (`gemv_4bit_swiglu_*`); `LLAMATUNE_GEMV_MANY=0`: a
    /// launch per weight.
    gemv_many: std::sync::atomic::AtomicBool,
    /// The device runs the wgmma kernels (compute capability 9.0, built for sm_90a).
    wgmma: bool,
    /// Streaming multiprocessors (for sizing split-K grids).
    sm_count: usize,
    /// Which of [`XENT_STREAM`]'s kernels this device gives their shared memory (a row of up to
    /// 1024 × 8, 16, 32 logits); `LLAMATUNE_XENT_STREAM=0` turns them off (A/B runs).
    xent_stream: [bool; 3],
    /// The side stream and buffers of offloaded checkpoints (offload.rs).
    offload: offload::OffloadState,
    /// `LLAMATUNE_PROFILE=1`: device time per op (each op synchronizes; for finding hot spots).
    profile: Option<std::sync::Mutex<HashMap<&'static str, (f64, u64)>>>,
}

impl Drop for Cuda {
    /// Frees the device buffers of offloaded checkpoints once their copies are done, and prints the
    /// profile (`LLAMATUNE_PROFILE=1`), when the backend goes away.
    fn drop(&mut self) {
        self.release_offloaded();
        let report = self.profile_report();
        if !report.is_empty() {
            let total: f64 = report.iter().map(|r| r.1).sum();
            eprintln!("device time by op (each op synchronized), total {:.3} s:", total);
            for (op, t, n) in report {
                eprintln!("  {op:<24}{:>10.1} ms {:>6.1}% {n:>8} calls", t * 1e3, 100.0 * t / total);
            }
        }
    }
}

struct Span<'a> {
    cuda: &'a Cuda,
    op: &'static str,
    start: std::time::Instant,
}

impl Drop for Span<'_> {
    fn drop(&mut self) {
        if let Some(p) = &self.cuda.profile {
            self.cuda.synchronize();
            let dt = self.start.elapsed().as_secs_f64();
            let mut p = p.lock().expect("profile lock");
            let e = p.entry(self.op).or_insert((0.0, 0));
            e.0 += dt;
            e.1 += 1;
        }
    }
}

/// A `CUmemoryPool` handle. The driver's pool handles are process-wide and thread-safe.
struct Pool(cudarc::driver::sys::CUmemoryPool);
// SAFETY: driver API calls on a pool handle may come from any thread (the handle is not thread-bound).
unsafe impl Send for Pool {}
// SAFETY: as above; the handle itself is never mutated.
unsafe impl Sync for Pool {}

/// Panics with the op's name on a device error: the trait's ops have no error channel, and a failed
/// launch or copy means the device or the program is broken, not the user's input.
macro_rules! ck {
    ($e:expr, $what:expr) => {
        $e.unwrap_or_else(|e| panic!("CUDA {} failed: {e:?}", $what))
    };
}

/// Launches `kernel` with `cfg` and the given arguments (references to live values, in the kernel's
/// parameter order).
macro_rules! launch {
    ($self:expr, $kernel:expr, $cfg:expr; $($arg:expr),* $(,)?) => {{
        let mut b = $self.stream.launch_builder($self.f($kernel));
        $( b.arg($arg); )*
        // SAFETY: each kernel bounds-checks its indices against the sizes passed with it, and every
        // buffer argument is a live device allocation of at least that size.
        ck!(unsafe { b.launch($cfg) }, $kernel);
    }};
}

mod offload;
pub use offload::Offloaded;

/// The device's default memory pool, told to keep what it frees (the default threshold of 0 hands
/// memory back to the driver at every synchronization, and the next step maps it again).
fn default_pool(
    ctx: &CudaContext,
) -> std::result::Result<cudarc::driver::sys::CUmemoryPool, cudarc::driver::DriverError> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    ctx.bind_to_thread()?;
    // SAFETY: plain driver queries on a live context; the threshold attribute is a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        let mut keep = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut keep as *mut u64).cast(),
        )
        .result()?;
    }
    Ok(pool)
}

fn grid_for(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 132 * 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

impl Cuda {
    /// Opens device `ordinal`. A missing driver or cuBLAS is an error here (cudarc would panic later).
    pub fn new(ordinal: usize) -> Result<Self> {
        // SAFETY: these only try to dlopen the libraries.
        let (drv, blas_ok) =
            unsafe { (cudarc::driver::sys::is_culib_present(), cudarc::cublas::sys::is_culib_present()) };
        if !drv {
            return Err(Error::Other(
                "CUDA driver library (libcuda.so) not found: is an NVIDIA driver installed?".into(),
            ));
        }
        if !blas_ok {
            return Err(Error::Other(
                "cuBLAS (libcublas.so.13) not found: add CUDA 13's lib64 to LD_LIBRARY_PATH".into(),
            ));
        }
        let dev_err = |e: cudarc::driver::DriverError| Error::Other(format!("cuda:{ordinal}: {e:?}"));
        let ctx = CudaContext::new(ordinal).map_err(dev_err)?;
        // The per-buffer event tracking cudarc does for multi-stream safety is not needed.
        // SAFETY: every buffer of this backend is used on `stream` only, except the copies of
        // offloaded checkpoints on offload.rs's side stream, which orders them by events itself.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own: the legacy default stream cannot be captured into a CUDA graph.
        let stream = ctx.new_stream().map_err(dev_err)?;
        let device_name = ctx.name().map_err(dev_err)?;
        let blas = blas::Blas::new(stream.clone()).map_err(|e| Error::Other(format!("cuBLAS: {e:?}")))?;
        let mut funcs = HashMap::new();
        for (module, bytes) in embedded::MODULES {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))
                .map_err(|e| Error::Other(format!("loading kernels/{module}.cu on {device_name}: {e:?}")))?;
            for name in kernel_names(module) {
                let f = m.load_function(name).map_err(|e| Error::Other(format!("kernel {name}: {e:?}")))?;
                funcs.insert(name.to_string(), f);
            }
        }
        let attr = cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        for (name, hd) in [("flash_bwd_hd64", 64), ("flash_bwd_hd128", 128)] {
            funcs[name].set_attribute(attr, flash_bwd_smem(hd, true) as i32).map_err(dev_err)?;
        }
        for name in GEMV_ONE_ROW.iter().chain(&GEMV_MANY).chain(&GEMV_MANY_LORA).chain(&GEMV_SWIGLU) {
            funcs[*name].set_attribute(attr, GEMV_MAX_X_SMEM as i32).map_err(dev_err)?;
        }
        for v in 0..LORA_DOWN.len() {
            funcs[LORA_DOWN[v]].set_attribute(attr, lora_down_smem(v) as i32).map_err(dev_err)?;
            funcs[LORA_OUTER[v]].set_attribute(attr, lora_outer_smem(v) as i32).map_err(dev_err)?;
        }
        // The fused 4-bit matmul needs compute capability 9.0 and sm_90a code (wgmma).
        let wgmma = cfg!(wgmma_kernels) && ctx.compute_capability().map_err(dev_err)?.0 == 9;
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(dev_err)? as usize;
        if wgmma {
            for (i, name) in GEMM_4BIT.iter().enumerate() {
                funcs[*name].set_attribute(attr, GEMM_4BIT_TILES[i / 4].smem as i32).map_err(dev_err)?;
            }
        }
        let smem_optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(dev_err)? as usize;
        let stream_on = !std::env::var("LLAMATUNE_XENT_STREAM").is_ok_and(|v| v == "0" || v == "off");
        let mut xent_stream = [false; 3];
        for i in 0..XENT_REG_VALUES.len() {
            let smem = xent_stream_smem(i);
            if stream_on && smem <= smem_optin {
                for by_dtype in XENT_STREAM {
                    funcs[by_dtype[i]].set_attribute(attr, smem as i32).map_err(dev_err)?;
                }
                xent_stream[i] = true;
            }
        }
        let offload = offload::OffloadState::new(ctx.new_stream().map_err(dev_err)?);
        let code256 = stream.clone_htod(&quant::dynamic_map_signed()).map_err(dev_err)?;
        let nf4 = stream.clone_htod(&quant::NF4_CODE).map_err(dev_err)?;
        let fp4 = stream.clone_htod(&quant::FP4_CODE).map_err(dev_err)?;
        let pool = Pool(default_pool(&ctx).map_err(dev_err)?);
        let profile = std::env::var_os("LLAMATUNE_PROFILE").map(|_| std::sync::Mutex::new(HashMap::new()));
        let poison = std::env::var("LLAMATUNE_POISON").is_ok_and(|v| v == "1");
        let precise = false.into();
        let fused_4bit = match std::env::var("LLAMATUNE_FUSED_4BIT").as_deref() {
            _ if !wgmma => Fused4bit::Off,
            Ok("off" | "0") => Fused4bit::Off,
            Ok("always") => Fused4bit::Always,
            _ => Fused4bit::Auto,
        };
        let fused_4bit = (fused_4bit as u8).into();
        let fused_lora = (!std::env::var("LLAMATUNE_FUSED_LORA").is_ok_and(|v| v == "0" || v == "off")).into();
        let gemv_many = (!std::env::var("LLAMATUNE_GEMV_MANY").is_ok_and(|v| v == "0" || v == "off")).into();
        Ok(Cuda {
            ordinal,
            device_name,
            ctx,
            stream,
            blas,
            funcs,
            code256,
            nf4,
            fp4,
            pool,
            poison,
            precise,
            wgmma,
            sm_count,
            xent_stream,
            offload,
            fused_4bit,
            fused_lora,
            gemv_many,
            profile,
        })
    }

    fn f(&self, name: &str) -> &CudaFunction {
        self.funcs.get(name).unwrap_or_else(|| panic!("kernel {name} is not in the embedded modules"))
    }

    fn pool_attribute(&self, attr: cudarc::driver::sys::CUmemPool_attribute) -> u64 {
        let mut v = 0u64;
        // SAFETY: `pool` is the live default pool of our device; the attribute is a u64.
        ck!(
            unsafe {
                cudarc::driver::sys::cuMemPoolGetAttribute(self.pool.0, attr, (&mut v as *mut u64).cast()).result()
            },
            "pool attribute"
        );
        v
    }

    /// Times the enclosing op when profiling (synchronizing before and after it).
    fn span(&self, op: &'static str) -> Span<'_> {
        if self.profile.is_some() {
            self.synchronize();
        }
        Span { cuda: self, op, start: std::time::Instant::now() }
    }

    /// The profile so far: (op, total seconds, calls), slowest first.
    pub fn profile_report(&self) -> Vec<(&'static str, f64, u64)> {
        let Some(p) = &self.profile else { return vec![] };
        let mut v: Vec<_> = p.lock().expect("profile lock").iter().map(|(k, (t, n))| (*k, *t, *n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }

    /// Whether attention of shape `sh` runs on the tensor-core flash kernels (kernels/flash.cu): head
    /// sizes 64 and 128 with at least 16 queries (training, prefill); otherwise the f32 kernels of
    /// attention.cu (other head sizes, decoding). Precise mode never takes them ([`Cuda::set_precise`]).
    pub fn uses_flash(sh: &AttnShape) -> bool {
        matches!(sh.head_dim, 64 | 128) && sh.q_len >= 16
    }

    pub fn synchronize(&self) {
        ck!(self.stream.synchronize(), "synchronize");
    }

    /// Precise mode: attention on the f32 kernels of attention.cu instead of the bf16 tensor-core
    /// ones, LoRA products in full f32 instead of TF32, and dense (16-bit stored) weights multiplied
    /// in f32 instead of rounding the activations to 16 bits, so the whole step rounds only where the
    /// CPU reference does (the 4-bit linears' compute dtype); 4-bit products take the second path
    /// (dequantize + cuBLAS, the computation bitsandbytes itself runs). The fused 4-bit kernel rounds
    /// at the same points but sums in another order (split-K for few rows), and on SmolLM2 that alone
    /// moved 2 of 420 gradients just past the test's criterion (docs/PARITY.md). Slower; the GPU
    /// tests use it to show the step equals the CPU's on a model that amplifies rounding noise.
    pub fn set_precise(&self, on: bool) {
        self.precise.store(on, std::sync::atomic::Ordering::Relaxed);
    }
    /// When 4-bit products take the fused kernel (kernels/nf4_gemm.cu) instead of the second path
    /// (dequantize + cuBLAS). It stays off on devices without wgmma.
    pub fn set_fused_4bit(&self, mode: Fused4bit) {
        let mode = if self.wgmma { mode } else { Fused4bit::Off };
        self.fused_4bit.store(mode as u8, std::sync::atomic::Ordering::Relaxed);
    }
    /// Whether a product of `m` rows with `w` takes the fused 4-bit kernel: a 4-bit weight with
    /// 16-bit compute, both of its sizes multiples of 64 (the reduction steps), absmax blocks of a
    /// power of two ≥ 32 values (each 32-value code group has one scale) and fewer than 2³¹ values
    /// (the kernel's block arithmetic is 32-bit); in auto mode only up to [`FUSED_4BIT_MAX_M`] rows,
    /// where it beats the second path; never in precise mode ([`Cuda::set_precise`]).
    pub fn uses_fused_4bit(&self, w: &CudaWeight, m: usize) -> bool {
        let mode = self.fused_4bit.load(std::sync::atomic::Ordering::Relaxed);
        let on = !self.is_precise()
            && (mode == Fused4bit::Always as u8 || (mode == Fused4bit::Auto as u8 && m <= FUSED_4BIT_MAX_M));
        matches!(w, CudaWeight::Quant4 { rows, cols, blocksize, compute, .. }
            if on && *compute != ComputeDtype::F32 && rows % 64 == 0 && cols % 64 == 0
                && scale_per_32_values(*blocksize) && rows * cols < 1 << 31)
    }
    /// The 16-bit dtype [`Backend::mlp_gate_up`] keeps an MLP's products in, when it can: three 4-bit
    /// weights computing in one 16-bit dtype, all on the second path at `m` rows (dequantize +
    /// cuBLAS, whose outputs are rounded to that dtype anyway); not in precise mode.
    fn mlp_in_16_bit(&self, ws: [&CudaWeight; 3], m: usize) -> Option<ComputeDtype> {
        let c = match ws[0] {
            CudaWeight::Quant4 { compute: c @ (ComputeDtype::BF16 | ComputeDtype::F16), .. } => *c,
            _ => return None,
        };
        let second_path = |w: &CudaWeight| {
            matches!(w, CudaWeight::Quant4 { compute, .. } if *compute == c) && !self.uses_fused_4bit(w, m)
        };
        (m > GEMV_MAX_M && !self.is_precise() && ws.iter().all(|w| second_path(w))).then_some(c)
    }
    fn is_precise(&self) -> bool {
        self.precise.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Whether this attention call takes the flash kernels (never in precise mode).
    fn flash(&self, sh: &AttnShape) -> bool {
        Cuda::uses_flash(sh) && !self.is_precise()
    }
    fn lora_math(&self) -> F32Math {
        if self.is_precise() {
            F32Math::Exact
        } else {
            F32Math::Tf32
        }
    }

    /// Expands a 4-bit weight into a fresh buffer of dtype `compute`.
    fn dequantize(&self, w: &CudaWeight, compute: ComputeDtype) -> Operand {
        let CudaWeight::Quant4 { rows, cols, quant_type, blocksize, packed, absmax, .. } = w else {
            unreachable!("dequantize takes 4-bit weights")
        };
        let n = rows * cols;
        // 16 bytes of codes (32 values in one absmax block) per thread when the sizes allow it.
        let vec = n % 32 == 0 && blocksize % 32 == 0;
        let cfg = if vec { grid_for(n / 32) } else { grid_for(n.div_ceil(2)) };
        let (n64, bs) = (n as i64, *blocksize as i32);
        macro_rules! launch {
            ($kernel:expr, $out:expr) => {{
                let mut b = self.stream.launch_builder(self.f($kernel));
                self.push_4bit(&mut b, packed, absmax, *quant_type);
                b.arg(&bs).arg(&n64).arg(&mut $out);
                // SAFETY: the kernel reads `packed`/`absmax` within n and writes `out[..n]`.
                ck!(unsafe { b.launch(cfg) }, $kernel);
            }};
        }
        match compute {
            ComputeDtype::F32 => {
                // SAFETY: the kernel writes all n values before anything reads them.
                let mut out = ck!(unsafe { self.stream.alloc::<f32>(n) }, "alloc");
                launch!(if vec { "dequant_4bit_vec_f32" } else { "dequant_4bit_f32" }, out);
                Operand::F32(out)
            }
            ComputeDtype::F16 => {
                // SAFETY: the kernel writes all n values before anything reads them.
                let mut out = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                launch!(if vec { "dequant_4bit_vec_f16" } else { "dequant_4bit_f16" }, out);
                Operand::F16(out)
            }
            ComputeDtype::BF16 => {
                // SAFETY: the kernel writes all n values before anything reads them.
                let mut out = ck!(unsafe { self.stream.alloc::<bf16>(n) }, "alloc");
                launch!(if vec { "dequant_4bit_vec_bf16" } else { "dequant_4bit_bf16" }, out);
                Operand::BF16(out)
            }
        }
    }

    /// A copy of `x` converted to dtype `c`; `None` when `c` is f32 and `x` serves as it is.
    fn convert(&self, x: &CudaSlice<f32>, c: ComputeDtype) -> Option<Operand> {
        let n = x.len();
        Some(match c {
            ComputeDtype::F32 => return None,
            ComputeDtype::BF16 => Operand::BF16(self.bf16_prefix(x, n)),
            ComputeDtype::F16 => {
                // SAFETY: the conversion writes all n values before anything reads them.
                let mut out = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                let n64 = n as i64;
                launch!(self, "f32_to_f16", grid_for(n); x, &mut out, &n64);
                Operand::F16(out)
            }
        })
    }

    /// The weight as a GEMM operand, and the dtype the activations must be converted to.
    fn weight_operand<'a>(&self, w: &'a CudaWeight) -> (OperandRef<'a>, ComputeDtype) {
        if self.is_precise() {
            if let CudaWeight::Dense { rows, cols, data } = w {
                // Precise mode: the dense weight widened to f32, so the activations are not rounded.
                let n = rows * cols;
                let mut out = self.scratch(n);
                let n64 = n as i64;
                match data {
                    DenseData::BF16(d) => launch!(self, "bf16_to_f32", grid_for(n); d, &mut out, &n64),
                    DenseData::F16(d) => launch!(self, "f16_to_f32", grid_for(n); d, &mut out, &n64),
                }
                return (OperandRef::Owned(Operand::F32(out)), ComputeDtype::F32);
            }
        }
        match w {
            CudaWeight::Dense { data: d @ DenseData::BF16(_), .. } => (OperandRef::Borrowed(d), ComputeDtype::BF16),
            CudaWeight::Dense { data: d @ DenseData::F16(_), .. } => (OperandRef::Borrowed(d), ComputeDtype::F16),
            CudaWeight::Quant4 { compute, .. } => (OperandRef::Owned(self.dequantize(w, *compute)), *compute),
        }
    }

    /// `c = a · op(b) + beta · c` (row-major, `c` of `g.n` columns), exact f32 math.
    fn gemm(&self, g: &Gemm<'_>, c: blas::GemmOut<'_>, beta: f32, what: &str) {
        let r = self.blas.gemm_rm(
            F32Math::Exact,
            false,
            g.trans_b,
            g.m,
            g.n,
            g.k,
            1.0,
            g.a,
            g.lda,
            g.b,
            g.ldb,
            beta,
            c,
            g.n,
        );
        ck!(r, what);
    }

    /// `a · op(b)` written by cuBLAS in the 16-bit dtype `c` (rounded as it writes), as a new operand.
    fn gemm_16(&self, g: &Gemm<'_>, c: ComputeDtype, what: &str) -> Operand {
        let n = g.m * g.n;
        // SAFETY: the GEMM (beta = 0) writes all m·n values before anything reads them.
        match c {
            ComputeDtype::BF16 => {
                let mut o = ck!(unsafe { self.stream.alloc::<bf16>(n) }, "alloc");
                self.gemm(g, blas::GemmOut::BF16(&mut o), 0.0, what);
                Operand::BF16(o)
            }
            ComputeDtype::F16 => {
                let mut o = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                self.gemm(g, blas::GemmOut::F16(&mut o), 0.0, what);
                Operand::F16(o)
            }
            ComputeDtype::F32 => unreachable!("a 16-bit output"),
        }
    }

    /// `out (=|+=) a · op(b)` for a frozen weight `w`'s product. A 4-bit weight's product is rounded to
    /// its 16-bit compute dtype, as bitsandbytes' 16-bit matmul output is, before it lands in (or is
    /// added to) the f32 `out`: cuBLAS writes it in that dtype (rounding as it writes, where a separate
    /// pass over f32 would read and write it again) and one kernel widens it into `out`. With `up`,
    /// a LoRA B product is added after the product ([`UpTail`]): where the product is widened, in the
    /// same kernel (`lora_up_from_*`, bit for bit the widening and then `lora_up`).
    fn gemm_rounded(
        &self,
        w: &CudaWeight,
        g: Gemm<'_>,
        out: &mut CudaSlice<f32>,
        accumulate: bool,
        up: Option<UpTail<'_>>,
        what: &str,
    ) {
        let gemm = |c: blas::GemmOut<'_>, beta: f32| self.gemm(&g, c, beta, what);
        match w {
            CudaWeight::Quant4 { compute: ComputeDtype::BF16, .. } => {
                // SAFETY: the GEMM (beta = 0) writes all m·n values before the kernel reads them.
                let mut o16 = ck!(unsafe { self.stream.alloc::<bf16>(g.m * g.n) }, "alloc");
                gemm(blas::GemmOut::BF16(&mut o16), 0.0);
                let kernels = ["bf16_to_f32", "add_bf16_to_f32", "lora_up_from_bf16"];
                self.widen_into(&o16, kernels, up, (g.m, g.n), accumulate, out);
            }
            CudaWeight::Quant4 { compute: ComputeDtype::F16, .. } => {
                // SAFETY: as above.
                let mut o16 = ck!(unsafe { self.stream.alloc::<f16>(g.m * g.n) }, "alloc");
                gemm(blas::GemmOut::F16(&mut o16), 0.0);
                let kernels = ["f16_to_f32", "add_f16_to_f32", "lora_up_from_f16"];
                self.widen_into(&o16, kernels, up, (g.m, g.n), accumulate, out);
            }
            _ => {
                gemm(blas::GemmOut::F32(&mut *out), if accumulate { 1.0 } else { 0.0 });
                if let Some(up) = up {
                    self.lora_up(up.u, up.w, up.w_is_rn, g.m, g.n, up.r, up.alpha, up.dropout, out);
                }
            }
        }
    }

    /// A 16-bit product `o16 (m, n)` landed in the f32 `out`, written over it or added to it
    /// (`accumulate`), by `kernels` = [widen, widen and add, widen with a LoRA B product]: with `up`,
    /// [`Cuda::lora_up`]'s product is added in the same pass (`lora_up_from_*`, kernels/lora_fused.cu).
    fn widen_into<T: cudarc::driver::DeviceRepr>(
        &self,
        o16: &CudaSlice<T>,
        [widen, widen_add, with_up]: [&str; 3],
        up: Option<UpTail<'_>>,
        (m, n): (usize, usize),
        accumulate: bool,
        out: &mut CudaSlice<f32>,
    ) {
        let Some(up) = up else {
            let n64 = (m * n) as i64;
            return launch!(self, if accumulate { widen_add } else { widen }, grid_for(m * n); o16, &mut *out, &n64);
        };
        let (dims, rn, acc) = ([m as i32, n as i32, up.r as i32], up.w_is_rn as i32, accumulate as i32);
        let (u, w, d) = (up.u, up.w, up.dropout);
        launch!(self, with_up, lora_up_launch(m, n); u, w, o16, &mut *out, &dims[0], &dims[1], &dims[2], &rn, &up.alpha, &d.seed, &d.p, &acc);
    }

    /// An uninitialized temporary for a kernel or GEMM (beta = 0) that writes every element before
    /// anything reads it; saves the memset of [`Backend::zeros`].
    /// With `LLAMATUNE_POISON=1` it starts as NaN, so a kernel that misses an element shows up.
    fn scratch(&self, n: usize) -> CudaSlice<f32> {
        // SAFETY: callers overwrite all n values before reading them (see each use).
        let mut buf = ck!(unsafe { self.stream.alloc::<f32>(n.max(1)) }, "alloc");
        if self.poison {
            // 0xFFFFFFFF is a NaN in every element.
            let (ptr, _rec) = buf.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` addresses the `n.max(1)` f32 of `buf`, alive for the whole call.
            ck!(unsafe { result::memset_d8_async(ptr, 0xff, n.max(1) * 4, self.stream.cu_stream()) }, "poison");
        }
        buf
    }

    fn scalar_f64(&self) -> CudaSlice<f64> {
        ck!(self.stream.alloc_zeros::<f64>(1), "alloc")
    }
}

/// A LoRA B product `alpha · drop(U · W'ᵀ)` to add to a frozen product's output ([`Cuda::lora_up`]'s
/// operands: `u (m, r)`, W' as `w (n, r)` or, when `w_is_rn`, `w (r, n)`).
struct UpTail<'a> {
    u: &'a CudaSlice<f32>,
    w: &'a CudaSlice<f32>,
    w_is_rn: bool,
    r: usize,
    alpha: f32,
    dropout: Dropout,
}

/// One GEMM of a frozen weight: `a (m, k) · op(b)` with `op(b)` `(k, n)`, row-major (see `blas::gemm_rm`).
struct Gemm<'a> {
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    a: OperandView<'a>,
    lda: usize,
    b: OperandView<'a>,
    ldb: usize,
}

impl<'a> Gemm<'a> {
    /// A forward product `x (m, k) · Wᵀ` of a weight `W (n, k)`.
    fn forward(m: usize, n: usize, k: usize, x: OperandView<'a>, w: OperandView<'a>) -> Self {
        Gemm { trans_b: true, m, n, k, a: x, lda: k, b: w, ldb: k }
    }
    /// An input gradient `dy (m, k) · W` of a weight `W (k, n)`.
    fn input_grad(m: usize, n: usize, k: usize, dy: OperandView<'a>, w: OperandView<'a>) -> Self {
        Gemm { trans_b: false, m, n, k, a: dy, lda: k, b: w, ldb: n }
    }
}

/// A GEMM operand in one of the three compute dtypes.
pub enum Operand {
    F32(CudaSlice<f32>),
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
}

/// An MLP's gate and up products `(m, ffn)` kept for its backward ([`Backend::mlp_gate_up`]).
pub enum MlpActs {
    /// Widened into f32, as every other product is (the composed ops).
    F32 { g: CudaSlice<f32>, u: CudaSlice<f32> },
    /// In the weights' 16-bit compute dtype as cuBLAS writes them, where all three products take the
    /// second path (`Cuda::mlp_in_16_bit`): the same values in half the memory, no widening pass.
    Half { g: Operand, u: Operand },
}

impl Operand {
    fn len(&self) -> usize {
        match self {
            Operand::F32(x) => x.len(),
            Operand::F16(x) => x.len(),
            Operand::BF16(x) => x.len(),
        }
    }
}

pub enum OperandRef<'a> {
    Borrowed(&'a DenseData),
    Owned(Operand),
}

/// Every kernel of a module (the names `Cuda::new` resolves).
fn kernel_names(module: &str) -> &'static [&'static str] {
    match module {
        "adamw" => &["adamw_f32", "adamw_many_f32", "sum_squares_many_f32"],
        "attention" => &["attention_fwd_f32", "attention_bwd_dq_f32", "attention_bwd_dkdv_f32"],
        "flash" => &[
            "flash_fwd_hd64",
            "flash_fwd_hd128",
            "flash_bwd_prep_hd64",
            "flash_bwd_prep_hd128",
            "flash_bwd_hd64",
            "flash_bwd_hd128",
        ],
        "elementwise" => &[
            "add_f32",
            "add_assign_f32",
            "scale_f32",
            "swiglu_f32",
            "swiglu_backward_f32",
            "swiglu_bf16",
            "swiglu_f16",
            "swiglu_backward_bf16",
            "swiglu_backward_f16",
            "f32_to_bf16",
            "add_bf16_to_f32",
            "add_f16_to_f32",
            "bf16_to_f32",
            "f16_to_f32",
            "dropout_f32",
            "dropout_add_f32",
            "embedding_bf16",
            "embedding_f16",
            "embedding_backward_f32",
            "sum_squares_f32",
            "non_finite_f32",
            "kv_write_f32",
        ],
        "nf4" => &[
            "dequant_4bit_f32",
            "dequant_4bit_f16",
            "dequant_4bit_bf16",
            "dequant_4bit_vec_f32",
            "dequant_4bit_vec_f16",
            "dequant_4bit_vec_bf16",
            "f32_to_f16",
            "gemv_4bit_f32",
            GEMV_ONE_ROW[0],
            GEMV_ONE_ROW[1],
            GEMV_ONE_ROW[2],
            GEMV_ONE_ROW[3],
            GEMV_ONE_ROW[4],
            GEMV_ONE_ROW[5],
            GEMV_FEW_ROWS[0],
            GEMV_FEW_ROWS[1],
            GEMV_FEW_ROWS[2],
            GEMV_MANY[0],
            GEMV_MANY[1],
            GEMV_MANY[2],
            GEMV_MANY[3],
            GEMV_MANY[4],
            GEMV_MANY[5],
            GEMV_MANY_LORA[0],
            GEMV_MANY_LORA[1],
            GEMV_MANY_LORA[2],
            GEMV_MANY_LORA[3],
            GEMV_MANY_LORA[4],
            GEMV_MANY_LORA[5],
            GEMV_SWIGLU[0],
            GEMV_SWIGLU[1],
            GEMV_SWIGLU[2],
        ],
        "lora" => &["gemv_f32_many", "gemv_f32_long_rows_many"],
        "lora_fused" => &[
            LORA_DOWN[0],
            LORA_DOWN[1],
            LORA_DOWN[2],
            LORA_OUTER[0],
            LORA_OUTER[1],
            LORA_OUTER[2],
            "lora_sum_splits",
            "lora_up",
            "lora_up_from_bf16",
            "lora_up_from_f16",
        ],
        "nf4_gemm" => &[
            GEMM_4BIT[0],
            GEMM_4BIT[1],
            GEMM_4BIT[2],
            GEMM_4BIT[3],
            GEMM_4BIT[4],
            GEMM_4BIT[5],
            GEMM_4BIT[6],
            GEMM_4BIT[7],
            "gemm_4bit_reduce",
        ],
        "norm" => &["rmsnorm_f32", "add_rmsnorm_f32", "rmsnorm_backward_f32"],
        "rope" => &["rope_f32", "rope_bf16", "rope_cache_f32"],
        "xent" => &[
            "cross_entropy_f32",
            XENT_REG[0],
            XENT_REG[1],
            XENT_REG[2],
            XENT_STREAM[0][0],
            XENT_STREAM[0][1],
            XENT_STREAM[0][2],
            XENT_STREAM[1][0],
            XENT_STREAM[1][1],
            XENT_STREAM[1][2],
            XENT_STREAM[2][0],
            XENT_STREAM[2][1],
            XENT_STREAM[2][2],
        ],
        _ => &[],
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Weight = CudaWeight;
    type HostBuf = PinnedHostSlice<f32>;
    type Recording = cudarc::driver::CudaGraph;
    type Offloaded = Offloaded;
    type MlpActs = MlpActs;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.device_name)
    }
    fn peak_memory(&self) -> Option<u64> {
        Some(self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH))
    }
    fn reserved_memory(&self) -> Option<u64> {
        Some(self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT))
    }
    fn reset_peak_memory(&self) {
        let mut zero = 0u64;
        let attr = cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
        // SAFETY: resetting the high-water mark (the only value the driver accepts is 0).
        ck!(
            unsafe {
                cudarc::driver::sys::cuMemPoolSetAttribute(self.pool.0, attr, (&mut zero as *mut u64).cast()).result()
            },
            "pool reset"
        );
    }
    fn synchronize(&self) {
        Cuda::synchronize(self);
    }
    fn reset_profile(&self) {
        if let Some(p) = &self.profile {
            p.lock().expect("profile lock").clear();
        }
    }

    fn zeros(&self, n: usize) -> CudaSlice<f32> {
        let _span = self.span("zeros");
        // The driver refuses 0-byte allocations; the graph never asks for one, but be safe.
        ck!(self.stream.alloc_zeros::<f32>(n.max(1)), "alloc")
    }
    fn alloc_output(&self, n: usize) -> CudaSlice<f32> {
        let _span = self.span("alloc_output");
        self.scratch(n)
    }
    fn upload(&self, host: &[f32]) -> CudaSlice<f32> {
        let _span = self.span("upload");
        ck!(self.stream.clone_htod(host), "upload")
    }
    fn upload_f64(&self, host: &[f64]) -> CudaSlice<f32> {
        let v: Vec<f32> = host.iter().map(|&x| x as f32).collect();
        self.upload(&v)
    }
    fn download(&self, buf: &CudaSlice<f32>) -> Vec<f32> {
        let _span = self.span("download");
        ck!(self.stream.clone_dtoh(buf), "download")
    }
    fn download_f64(&self, buf: &CudaSlice<f32>) -> Vec<f64> {
        self.download(buf).into_iter().map(|x| x as f64).collect()
    }
    fn buf_len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }
    fn upload_weight(&self, w: HostWeight) -> CudaWeight {
        let out = match w {
            HostWeight::Dense { rows, cols, data } => {
                // Keep an fp16 checkpoint's values exact; anything else goes to bf16 (its range).
                let data = if data.iter().all(|&x| f16::from_f32(x).to_f32() == x) {
                    let h: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                    DenseData::F16(ck!(self.stream.clone_htod(&h), "upload weight"))
                } else {
                    let b: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x)).collect();
                    DenseData::BF16(ck!(self.stream.clone_htod(&b), "upload weight"))
                };
                CudaWeight::Dense { rows, cols, data }
            }
            HostWeight::Quant4 { rows, cols, q, compute } => {
                let absmax = match &q.absmax {
                    Absmax::F32(a) => DeviceAbsmax::F32(ck!(self.stream.clone_htod(a), "upload absmax")),
                    Absmax::Nested { q, absmax2, offset } => DeviceAbsmax::Nested {
                        q: ck!(self.stream.clone_htod(q), "upload absmax"),
                        absmax2: ck!(self.stream.clone_htod(absmax2), "upload absmax"),
                        offset: *offset,
                    },
                };
                CudaWeight::Quant4 {
                    rows,
                    cols,
                    quant_type: q.quant_type,
                    blocksize: q.blocksize,
                    compute,
                    packed: ck!(self.stream.clone_htod(&q.packed), "upload weight"),
                    absmax,
                }
            }
        };
        out
    }
    fn weight_shape(&self, w: &CudaWeight) -> (usize, usize) {
        w.shape()
    }
    fn weight_to_host(&self, w: &CudaWeight) -> HostWeight {
        match w {
            CudaWeight::Dense { rows, cols, data } => {
                let data: Vec<f32> = match data {
                    DenseData::BF16(d) => {
                        ck!(self.stream.clone_dtoh(d), "download weight").iter().map(|x| x.to_f32()).collect()
                    }
                    DenseData::F16(d) => {
                        ck!(self.stream.clone_dtoh(d), "download weight").iter().map(|x| x.to_f32()).collect()
                    }
                };
                HostWeight::Dense { rows: *rows, cols: *cols, data }
            }
            CudaWeight::Quant4 { rows, cols, quant_type, blocksize, compute, packed, absmax } => {
                let absmax = match absmax {
                    DeviceAbsmax::F32(a) => Absmax::F32(ck!(self.stream.clone_dtoh(a), "download")),
                    DeviceAbsmax::Nested { q, absmax2, offset } => Absmax::Nested {
                        q: ck!(self.stream.clone_dtoh(q), "download"),
                        absmax2: ck!(self.stream.clone_dtoh(absmax2), "download"),
                        offset: *offset,
                    },
                };
                let q = Quant4 {
                    quant_type: *quant_type,
                    blocksize: *blocksize,
                    n: rows * cols,
                    packed: ck!(self.stream.clone_dtoh(packed), "download"),
                    absmax,
                };
                HostWeight::Quant4 { rows: *rows, cols: *cols, q, compute: *compute }
            }
        }
    }
    fn read_range(&self, buf: &CudaSlice<f32>, start: usize, len: usize) -> CudaSlice<f32> {
        let _span = self.span("read_range");
        let mut out = self.scratch(len);
        ck!(self.stream.memcpy_dtod(&buf.slice(start..start + len), &mut out), "read_range");
        out
    }
    fn write_range(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>, offset: usize) {
        let _span = self.span("write_range");
        let n = src.len();
        ck!(self.stream.memcpy_dtod(src, &mut dst.slice_mut(offset..offset + n)), "write_range");
    }

    fn add_assign(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>) {
        let _span = self.span("add_assign");
        assert_eq!(dst.len(), src.len(), "add_assign: length mismatch");
        let n = dst.len();
        let a0 = n as i64;
        launch!(self, "add_assign_f32", grid_for(n); &mut *dst, src, &a0);
    }
    fn add(&self, a: &CudaSlice<f32>, b: &CudaSlice<f32>, out: &mut CudaSlice<f32>) {
        let _span = self.span("add");
        let n = out.len();
        let a0 = n as i64;
        launch!(self, "add_f32", grid_for(n); a, b, &mut *out, &a0);
    }
    fn scale(&self, buf: &mut CudaSlice<f32>, s: f64) {
        let _span = self.span("scale");
        let n = buf.len();
        let a0 = s as f32;
        let a1 = n as i64;
        launch!(self, "scale_f32", grid_for(n); &mut *buf, &a0, &a1);
    }
    fn sum_squares(&self, buf: &CudaSlice<f32>) -> f64 {
        let _span = self.span("sum_squares");
        let mut acc = self.scalar_f64();
        self.add_sum_squares(buf, &mut acc);
        ck!(self.stream.clone_dtoh(&acc), "download")[0]
    }
    fn sum_squares_all(&self, bufs: &[&CudaSlice<f32>]) -> f64 {
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
    fn has_non_finite(&self, buf: &CudaSlice<f32>) -> bool {
        let _span = self.span("has_non_finite");
        let mut flag = ck!(self.stream.alloc_zeros::<i32>(1), "alloc");
        let n = buf.len();
        let a0 = n as i64;
        launch!(self, "non_finite_f32", grid_for(n); buf, &mut flag, &a0);
        ck!(self.stream.clone_dtoh(&flag), "download")[0] != 0
    }

    fn embedding(&self, table: &CudaWeight, ids: &[u32], out: &mut CudaSlice<f32>) {
        let _span = self.span("embedding");
        let (vocab, dim) = table.shape();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
            panic!("token id {bad} >= vocab {vocab}");
        }
        let ids_d = ck!(self.stream.clone_htod(ids), "upload ids");
        let (m32, dim32) = (ids.len() as i32, dim as i32);
        let n = ids.len() * dim;
        match table {
            CudaWeight::Dense { data: DenseData::BF16(d), .. } => {
                launch!(self, "embedding_bf16", grid_for(n); d, &ids_d, &mut *out, &m32, &dim32)
            }
            CudaWeight::Dense { data: DenseData::F16(d), .. } => {
                launch!(self, "embedding_f16", grid_for(n); d, &ids_d, &mut *out, &m32, &dim32)
            }
            q => {
                let Operand::BF16(d) = self.dequantize(q, ComputeDtype::BF16) else { unreachable!() };
                launch!(self, "embedding_bf16", grid_for(n); &d, &ids_d, &mut *out, &m32, &dim32)
            }
        }
    }
    fn embedding_backward(&self, ids: &[u32], dout: &CudaSlice<f32>, dim: usize, dtable: &mut CudaSlice<f32>) {
        let _span = self.span("embedding_backward");
        let ids_d = ck!(self.stream.clone_htod(ids), "upload ids");
        let m = ids.len();
        let a0 = m as i32;
        let a1 = dim as i32;
        launch!(self, "embedding_backward_f32", grid_for(m * dim); &ids_d, dout, &mut *dtable, &a0, &a1);
    }

    fn rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dim: usize,
        eps: f64,
        out: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("rmsnorm");
        let m = x.len() / dim;
        let cfg = norm_launch(m, dim);
        let (dim32, eps32) = (dim as i32, eps as f32);
        launch!(self, "rmsnorm_f32", cfg; x, w, out, rstd, &dim32, &eps32);
    }
    fn add_rmsnorm(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dim: usize,
        eps: f64,
        sum: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("add_rmsnorm");
        let m = a.len() / dim;
        assert!(
            b.len() == a.len() && sum.len() == a.len() && out.len() == a.len() && rstd.len() == m && w.len() == dim,
            "add_rmsnorm: bad shapes"
        );
        let cfg = norm_launch(m, dim);
        let (dim32, eps32) = (dim as i32, eps as f32);
        launch!(self, "add_rmsnorm_f32", cfg; a, b, w, &mut *sum, &mut *out, &mut *rstd, &dim32, &eps32);
    }
    fn rmsnorm_backward(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rstd: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dim: usize,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
    ) {
        let _span = self.span("rmsnorm_backward");
        let m = x.len() / dim;
        let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (dim32, accumulate32) = (dim as i32, accumulate as i32);
        launch!(self, "rmsnorm_backward_f32", cfg; x, w, rstd, dout, dx, &dim32, &accumulate32);
    }

    fn linear(&self, x: &CudaSlice<f32>, w: &CudaWeight, m: usize, out: &mut CudaSlice<f32>) {
        self.linear_many(x, &[w], m, &mut [out]);
    }
    fn linear_many(&self, x: &CudaSlice<f32>, ws: &[&CudaWeight], m: usize, outs: &mut [&mut CudaSlice<f32>]) {
        self.products_with_lora(x, ws, m, outs, &mut [], 0, 0.0);
    }
    fn linear_many_lora(
        &self,
        x: &CudaSlice<f32>,
        ws: &[&CudaWeight],
        m: usize,
        outs: &mut [&mut CudaSlice<f32>],
        loras: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
    ) {
        if !self.linear_many_lora_shares_launch(ws, m, loras) {
            return self.products_with_lora(x, ws, m, outs, loras, r, scale);
        }
        let _span = self.span("linear + LoRA A (4-bit GEMV, several weights)");
        let cols = x.len();
        {
            // The frozen products and, in the blocks after theirs, every branch's u = x·Aᵀ.
            let mut guards = Vec::new();
            let (targets, first, kernel) = self.gemv_many_targets(x, ws, outs, &mut guards);
            let branches = loras.iter_mut().flatten().map(|l| (l.a, &mut *l.u));
            let (downs, blocks) = self.lora_down_targets(x, branches, m, r, first, &mut guards);
            let name = GEMV_MANY_LORA[kernel];
            let CudaWeight::Quant4 { quant_type, blocksize, .. } = ws[0] else { unreachable!("4-bit weights") };
            let (bs, c32) = (*blocksize as i32, cols as i32);
            let mut b = self.stream.launch_builder(self.f(name));
            b.arg(&targets).arg(&self.code256).arg(self.code16(*quant_type)).arg(&bs).arg(x).arg(&c32).arg(&downs);
            // SAFETY: each target's codes, absmax and output, each branch's A and u, and x are live
            // buffers whose addresses the guards hold; the kernel reads x (cols), writes each output's
            // rows and each u's r values.
            ck!(unsafe { b.launch(self.gemv_many_launch(ws[0], blocks)) }, name);
            drop(guards);
        }
        let ups = outs.iter_mut().zip(loras.iter_mut()).filter_map(|(y, l)| {
            let l = l.as_mut()?;
            Some((l.b, &*l.u, &mut **y))
        });
        self.lora_up_many(ups, m, r, scale);
    }
    fn linear_swiglu(
        &self,
        x: &CudaSlice<f32>,
        gate: &CudaWeight,
        up: &CudaWeight,
        m: usize,
        out: &mut CudaSlice<f32>,
    ) {
        // One row of x and two 4-bit weights the staged GEMV takes alike: one launch
        // (gemv_4bit_swiglu_*); otherwise the two products and swiglu.
        let pair = [gate, up];
        let fused = gate.shape() == up.shape()
            && self.gemv_shares_x(&pair, m)
            && self.gemv_many.load(std::sync::atomic::Ordering::Relaxed);
        if !fused {
            return super::linear_swiglu_composed(self, x, gate, up, m, out);
        }
        let _span = self.span("linear_swiglu (4-bit GEMV)");
        let (
            CudaWeight::Quant4 { rows, cols, quant_type, blocksize, compute, packed, absmax },
            CudaWeight::Quant4 { packed: up_packed, absmax: up_absmax, .. },
        ) = (gate, up)
        else {
            unreachable!("gemv_shares_x takes 4-bit weights")
        };
        assert!(x.len() == *cols && out.len() == *rows, "linear_swiglu: bad shapes");
        let kernel = GEMV_SWIGLU[dtype_code(*compute) as usize];
        // Two pairs of rows per warp.
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(GEMV_ROWS_PER_WARP / 2).div_ceil(GEMV_THREADS / 32) as u32, 1, 1),
            block_dim: (GEMV_THREADS as u32, 1, 1),
            shared_mem_bytes: ((cols + cols / 32) * 4) as u32,
        };
        let mut guards = Vec::new();
        let codes = self.codes4(up_packed, up_absmax, &mut guards);
        let (bs, m32, r32, c32) = (*blocksize as i32, m as i32, *rows as i32, *cols as i32);
        let mut b = self.stream.launch_builder(self.f(kernel));
        self.push_4bit(&mut b, packed, absmax, *quant_type);
        b.arg(&bs).arg(x).arg(&mut *out).arg(&m32).arg(&r32).arg(&c32).arg(&codes);
        // SAFETY: the kernel reads both weights' codes and absmax (the up side through the addresses
        // the guards hold) and x (cols), and writes out (rows).
        ck!(unsafe { b.launch(cfg) }, kernel);
        drop(guards);
    }

    fn mlp_gate_up(
        &self,
        x: &CudaSlice<f32>,
        gate: &CudaWeight,
        up: &CudaWeight,
        down: &CudaWeight,
        m: usize,
    ) -> MlpActs {
        let Some(c) = self.mlp_in_16_bit([gate, up, down], m) else {
            let (g, u) = super::mlp_gate_up_composed(self, x, gate, up, m);
            return MlpActs::F32 { g, u };
        };
        let _span = self.span("MLP gate and up (16-bit outputs)");
        let (ffn, hidden) = gate.shape();
        assert!(x.len() == m * hidden && up.shape() == (ffn, hidden), "mlp_gate_up: bad shapes");
        // x converted once for both products, which stay in the compute dtype as cuBLAS writes them
        // (the values the other path widens into f32).
        let x16 = self.convert(x, c).expect("16-bit compute");
        let product = |w: &CudaWeight, what: &str| {
            let (wop, _) = self.weight_operand(w);
            let g = Gemm::forward(m, ffn, hidden, OperandView::from(&x16), wop.as_ref());
            self.gemm_16(&g, c, what)
        };
        MlpActs::Half { g: product(gate, "MLP gate GEMM"), u: product(up, "MLP up GEMM") }
    }
    fn mlp_acts_len(&self, acts: &MlpActs) -> usize {
        match acts {
            MlpActs::F32 { g, u } => g.len() + u.len(),
            MlpActs::Half { g, u } => g.len() + u.len(),
        }
    }
    fn mlp_down(&self, acts: &MlpActs, down: &CudaWeight, m: usize, out: &mut CudaSlice<f32>, accumulate: bool) {
        let (g, u) = match acts {
            MlpActs::F32 { g, u } => return super::mlp_down_composed(self, (g, u), down, m, out, accumulate),
            MlpActs::Half { g, u } => (g, u),
        };
        let _span = self.span("MLP SwiGLU and down (16-bit input)");
        let (d_rows, ffn) = down.shape();
        let n = m * ffn;
        assert!(g.len() == n && u.len() == n && out.len() == m * d_rows, "mlp_down: bad shapes");
        // SwiGLU straight from the 16-bit products into the down product's 16-bit input (the rounding
        // its conversion did), and the product widened into (or added to) out: linear_many + swiglu +
        // linear's values without the f32 round trips.
        let n64 = n as i64;
        // SAFETY: the kernel writes all n values before the GEMM reads them.
        let s16 = match (g, u) {
            (Operand::BF16(g), Operand::BF16(u)) => {
                let mut s = ck!(unsafe { self.stream.alloc::<bf16>(n) }, "alloc");
                launch!(self, "swiglu_bf16", grid_for(n); g, u, &mut s, &n64);
                Operand::BF16(s)
            }
            (Operand::F16(g), Operand::F16(u)) => {
                let mut s = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                launch!(self, "swiglu_f16", grid_for(n); g, u, &mut s, &n64);
                Operand::F16(s)
            }
            _ => unreachable!("gate and up in one 16-bit dtype"),
        };
        let (wop, _) = self.weight_operand(down);
        let product = Gemm::forward(m, d_rows, ffn, OperandView::from(&s16), wop.as_ref());
        self.gemm_rounded(down, product, out, accumulate, None, "MLP down GEMM");
    }
    fn mlp_backward(
        &self,
        dy: &CudaSlice<f32>,
        acts: &MlpActs,
        gate: &CudaWeight,
        up: &CudaWeight,
        down: &CudaWeight,
        m: usize,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
    ) {
        let (g, u) = match acts {
            MlpActs::F32 { g, u } => {
                return super::mlp_backward_composed(self, dy, (g, u), gate, up, down, m, dx, accumulate);
            }
            MlpActs::Half { g, u } => (g, u),
        };
        let _span = self.span("MLP backward (16-bit intermediates)");
        let ((ffn, hidden), (d_rows, _)) = (gate.shape(), down.shape());
        let n = m * ffn;
        assert!(dy.len() == m * d_rows && dx.len() == m * hidden && g.len() == n, "mlp_backward: bad shapes");
        // The down product's input gradient as cuBLAS writes it in the compute dtype (the values the
        // other path widens), SwiGLU's backward from it and the 16-bit products into the gate and up
        // gradients in that dtype (the rounding their GEMMs' conversions did), and those GEMMs widened
        // into dx: the composed ops' values without the f32 round trips.
        let c = if matches!(g, Operand::F16(_)) { ComputeDtype::F16 } else { ComputeDtype::BF16 };
        let ds16 = {
            let (wop, _) = self.weight_operand(down);
            let dy16 = self.convert(dy, c).expect("16-bit compute");
            let product = Gemm::input_grad(m, ffn, d_rows, OperandView::from(&dy16), wop.as_ref());
            self.gemm_16(&product, c, "MLP down backward GEMM")
        };
        let n64 = n as i64;
        // SAFETY: the kernel writes all n values of both gradients before the GEMMs read them.
        let (dg16, du16) = match (g, u, &ds16) {
            (Operand::BF16(g), Operand::BF16(u), Operand::BF16(ds)) => {
                let mut dg = ck!(unsafe { self.stream.alloc::<bf16>(n) }, "alloc");
                let mut du = ck!(unsafe { self.stream.alloc::<bf16>(n) }, "alloc");
                launch!(self, "swiglu_backward_bf16", grid_for(n); g, u, ds, &mut dg, &mut du, &n64);
                (Operand::BF16(dg), Operand::BF16(du))
            }
            (Operand::F16(g), Operand::F16(u), Operand::F16(ds)) => {
                let mut dg = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                let mut du = ck!(unsafe { self.stream.alloc::<f16>(n) }, "alloc");
                launch!(self, "swiglu_backward_f16", grid_for(n); g, u, ds, &mut dg, &mut du, &n64);
                (Operand::F16(dg), Operand::F16(du))
            }
            _ => unreachable!("one 16-bit dtype"),
        };
        drop(ds16);
        // dx (m, hidden) (+)= du (m, ffn) · U (ffn, hidden), then += dg · G: up first, as the tape did.
        for (w, d16, acc, what) in
            [(up, &du16, accumulate, "MLP up backward GEMM"), (gate, &dg16, true, "MLP gate backward GEMM")]
        {
            let (wop, _) = self.weight_operand(w);
            let product = Gemm::input_grad(m, hidden, ffn, OperandView::from(d16), wop.as_ref());
            self.gemm_rounded(w, product, dx, acc, None, what);
        }
    }
    fn linear_backward_input(
        &self,
        dy: &CudaSlice<f32>,
        w: &CudaWeight,
        m: usize,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
    ) {
        let (rows, cols) = w.shape();
        assert!(dy.len() == m * rows && dx.len() == m * cols, "linear_backward_input: bad shapes");
        if self.uses_fused_4bit(w, m) {
            let _span = self.span("linear_backward_input (fused 4-bit)");
            return self.gemm_4bit(dy, w, m, dx, true, accumulate);
        }
        let _span = self.span("linear_backward_input");
        self.dgrad_gemm(dy, w, m, dx, accumulate, None);
    }
    fn linear_lora_backward(
        &self,
        dy: &CudaSlice<f32>,
        w: &CudaWeight,
        m: usize,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
        lora: LoraGrad<'_, Self>,
        r: usize,
        scale: f32,
    ) {
        let (rows, cols) = w.shape();
        if self.uses_fused_4bit(w, m) || !self.uses_fused_lora(rows, cols, r) {
            self.linear_backward_input(dy, w, m, dx, accumulate);
            let LoraGrad { x, a, b, u, dropout, da, db } = lora;
            return self.lora_backward(x, a, b, u, dy, m, r, scale, dropout, da, db, dx);
        }
        assert!(dy.len() == m * rows && dx.len() == m * cols, "linear_backward_input: bad shapes");
        let _span = self.span("linear_backward_input + LoRA");
        let LoraGrad { x, a, b, u, dropout, da, db } = lora;
        let du = self.lora_weight_grads(x, a, b, u, dy, m, r, scale, dropout, da, db);
        // dx (+)= dy · W + drop'(du · A): the branch's term added as the product's gradient is widened.
        let up = UpTail { u: &du, w: a, w_is_rn: true, r, alpha: 1.0, dropout };
        self.dgrad_gemm(dy, w, m, dx, accumulate, Some(up));
    }

    fn lora_forward(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        m: usize,
        r: usize,
        scale: f32,
        dropout: Dropout,
        u: &mut CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("lora_forward");
        let rows = b.len() / r;
        if m <= GEMV_MAX_M && !dropout.is_active() {
            // Decoding: two f32 products (kernels/lora.cu) instead of two GEMMs, as lora_forward_many
            // runs them for one branch.
            return self.lora_forward_many(x, &mut [LoraBranch { a, b, dropout, u, y }], m, r, scale);
        }
        self.lora_a_product(x, a, m, r, dropout, u);
        if self.uses_fused_lora_up(rows, r) {
            // y (m, rows) += scale · u · Bᵀ (kernels/lora_fused.cu).
            self.lora_up(u, b, false, m, rows, r, scale, Dropout::NONE, y);
            return;
        }
        // y (m, rows) += scale · u · Bᵀ
        ck!(
            self.blas.gemm_rm(
                self.lora_math(),
                false,
                true,
                m,
                rows,
                r,
                scale,
                OperandView::F32(u),
                r,
                OperandView::F32(b),
                r,
                1.0,
                y,
                rows
            ),
            "LoRA B GEMM"
        );
    }
    fn lora_down(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        m: usize,
        r: usize,
        dropout: Dropout,
        u: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("lora_down");
        self.lora_a_product(x, a, m, r, dropout, u);
    }
    fn lora_forward_many(
        &self,
        x: &CudaSlice<f32>,
        branches: &mut [LoraBranch<'_, Self>],
        m: usize,
        r: usize,
        scale: f32,
    ) {
        let shared = m <= GEMV_MAX_M
            && (1..=LORA_MAX_TARGETS).contains(&branches.len())
            && branches.iter().all(|br| !br.dropout.is_active());
        if !shared {
            for br in branches.iter_mut() {
                self.lora_forward(x, br.a, br.b, m, r, scale, br.dropout, br.u, br.y);
            }
            return;
        }
        let _span = self.span("lora_forward (f32 products of a few rows)");
        // Decoding: the two f32 products, each over all branches in one launch (kernels/lora.cu
        // *_many): u_i = x·A_iᵀ with a block per row of every A_i, then y_i += scale·u_i·B_iᵀ
        // ([`Cuda::lora_up_many`]).
        self.lora_down_rows(x, branches.iter_mut().map(|br| (br.a, &mut *br.u)), m, r);
        self.lora_up_many(branches.iter_mut().map(|br| (br.b, &*br.u, &mut *br.y)), m, r, scale);
    }
    fn lora_backward(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        m: usize,
        r: usize,
        scale: f32,
        dropout: Dropout,
        da: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("lora_backward");
        let cols = a.len() / r;
        let rows = b.len() / r;
        let (dyop, uop) = (OperandView::F32(dy), OperandView::F32(u));
        let (aop, bop) = (OperandView::F32(a), OperandView::F32(b));
        if self.uses_fused_lora(rows, cols, r) {
            let du = self.lora_weight_grads(x, a, b, u, dy, m, r, scale, dropout, da, db);
            // dx += drop'(du · A) (kernels/lora_fused.cu; the mask regenerated from the seed).
            let _part = self.span("lora_backward: dx (up)");
            self.lora_up(&du, a, true, m, cols, r, 1.0, dropout, dx);
            return;
        }
        // db (rows, r) += scale · dyᵀ · u
        ck!(
            self.blas.gemm_rm(self.lora_math(), true, false, rows, r, m, scale, dyop, rows, uop, r, 1.0, db, r),
            "LoRA dB GEMM"
        );
        // du (m, r) = scale · dy · B
        let mut du = self.scratch(m * r);
        ck!(
            self.blas.gemm_rm(self.lora_math(), false, false, m, r, rows, scale, dyop, rows, bop, r, 0.0, &mut du, r),
            "LoRA du GEMM"
        );
        // da (r, cols) += duᵀ · drop(x)
        let xd = self.dropped(x, dropout);
        let duop = OperandView::F32(&du);
        ck!(
            self.blas.gemm_rm(
                self.lora_math(),
                true,
                false,
                r,
                cols,
                m,
                1.0,
                duop,
                r,
                OperandView::F32(xd.as_ref().unwrap_or(x)),
                cols,
                1.0,
                da,
                cols
            ),
            "LoRA dA GEMM"
        );
        // dx += drop'(du · A)
        let mut dxd = self.scratch(m * cols);
        ck!(
            self.blas.gemm_rm(self.lora_math(), false, false, m, cols, r, 1.0, duop, r, aop, cols, 0.0, &mut dxd, cols),
            "LoRA dx GEMM"
        );
        let n = dx.len();
        let a0 = n as i64;
        launch!(self, "dropout_add_f32", grid_for(n); &mut *dx, &dxd, &dropout.seed, &dropout.p, &a0);
    }

    fn rope(
        &self,
        x: &CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
        inverse: bool,
        out: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("rope");
        let m = x.len() / (heads * head_dim);
        let a0 = m as i32;
        let a1 = heads as i32;
        let a2 = head_dim as i32;
        let a3 = inverse as i32;
        launch!(self, "rope_f32", grid_for(m * heads * head_dim / 2); x, cos, sin, &mut *out, &a0, &a1, &a2, &a3);
    }

    fn rope_into_cache(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        (heads, kv_heads, head_dim): (usize, usize, usize),
        q_out: &mut CudaSlice<f32>,
        k_cache: &mut CudaSlice<f32>,
        v_cache: &mut CudaSlice<f32>,
        pos: &CudaSlice<f32>,
    ) {
        let _span = self.span("rope_into_cache");
        let m = q.len() / (heads * head_dim);
        assert!(
            q_out.len() == q.len() && k.len() == m * kv_heads * head_dim && v.len() == k.len(),
            "rope_into_cache: bad shapes"
        );
        let work = m * (heads + kv_heads) * head_dim / 2 + v.len();
        let (m32, h32, kv32, hd32) = (m as i32, heads as i32, kv_heads as i32, head_dim as i32);
        launch!(self, "rope_cache_f32", grid_for(work); q, k, v, cos, sin, &mut *q_out, &mut *k_cache, &mut *v_cache, pos, &m32, &h32, &kv32, &hd32);
    }

    fn attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        sh: AttnShape,
        segments: Option<&[u32]>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("attention");
        assert!(sh.head_dim <= 256, "head_dim {} > 256 is not supported", sh.head_dim);
        let seg = segments.map(|s| ck!(self.stream.clone_htod(s), "upload segments"));
        if self.flash(&sh) {
            return self.flash_forward(q, k, v, None, sh, seg.as_ref(), out, lse);
        }
        self.attention_split(q, k, v, sh, seg.as_ref(), None, out, lse);
    }
    fn attention_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        out: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        sh: AttnShape,
        segments: Option<&[u32]>,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("attention_backward");
        let seg = segments.map(|s| ck!(self.stream.clone_htod(s), "upload segments"));
        if self.flash(&sh) {
            return self.flash_backward(q, k, v, None, out, lse, dout, sh, seg.as_ref(), dq, dk, dv);
        }
        let mut delta = self.scratch(sh.batch * sh.heads * sh.q_len);
        let g = geom(sh);
        let mut b = self.stream.launch_builder(self.f("attention_bwd_dq_f32"));
        b.arg(q).arg(k).arg(v).arg(out).arg(lse).arg(dout);
        push_opt(&mut b, seg.as_ref());
        b.arg(&mut *dq).arg(&mut delta);
        push_geom(&mut b, &g);
        ck!(unsafe { b.launch(warp_grid(sh.batch * sh.heads * sh.q_len)) }, "attention_bwd_dq_f32");
        ck!(self.stream.memset_zeros(dk), "memset");
        ck!(self.stream.memset_zeros(dv), "memset");
        let mut b = self.stream.launch_builder(self.f("attention_bwd_dkdv_f32"));
        b.arg(q).arg(k).arg(v).arg(lse).arg(&delta).arg(dout);
        push_opt(&mut b, seg.as_ref());
        b.arg(&mut *dk).arg(&mut *dv);
        push_geom(&mut b, &g);
        ck!(unsafe { b.launch(warp_grid(sh.batch * sh.kv_heads * sh.kv_len)) }, "attention_bwd_dkdv_f32");
    }
    fn rope_attention(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        rope: RopeTables<'_, Self>,
        sh: AttnShape,
        segments: Option<&[u32]>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        if !self.flash(&sh) {
            return rope_attention_composed(self, q, k, v, rope, sh, segments, out, lse);
        }
        let _span = self.span("attention (RoPE inside)");
        assert!(sh.is_square(), "rope_attention: the shape must be square");
        let seg = segments.map(|s| ck!(self.stream.clone_htod(s), "upload segments"));
        self.flash_forward(q, k, v, Some(rope), sh, seg.as_ref(), out, lse);
    }
    fn rope_attention_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        rope: RopeTables<'_, Self>,
        out: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        sh: AttnShape,
        segments: Option<&[u32]>,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
    ) {
        if !self.flash(&sh) {
            return rope_attention_backward_composed(self, q, k, v, rope, out, lse, dout, sh, segments, dq, dk, dv);
        }
        let _span = self.span("attention_backward (RoPE inside)");
        assert!(sh.is_square(), "rope_attention: the shape must be square");
        let seg = segments.map(|s| ck!(self.stream.clone_htod(s), "upload segments"));
        self.flash_backward(q, k, v, Some(rope), out, lse, dout, sh, seg.as_ref(), dq, dk, dv);
    }

    fn swiglu(&self, gate: &CudaSlice<f32>, up: &CudaSlice<f32>, out: &mut CudaSlice<f32>) {
        let _span = self.span("swiglu");
        let n = out.len();
        let a0 = n as i64;
        launch!(self, "swiglu_f32", grid_for(n); gate, up, &mut *out, &a0);
    }
    fn swiglu_backward(
        &self,
        gate: &CudaSlice<f32>,
        up: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        dgate: &mut CudaSlice<f32>,
        dup: &mut CudaSlice<f32>,
    ) {
        let _span = self.span("swiglu_backward");
        let n = gate.len();
        let a0 = n as i64;
        launch!(self, "swiglu_backward_f32", grid_for(n); gate, up, dout, &mut *dgate, &mut *dup, &a0);
    }

    fn cross_entropy(
        &self,
        logits: &CudaSlice<f32>,
        targets: &[i32],
        vocab: usize,
        scale: f32,
        dlogits: &mut CudaSlice<f32>,
    ) -> (f64, usize) {
        self.xent(XentIo::F32(logits, dlogits), targets, vocab, scale)
    }

    fn lm_head_cross_entropy(
        &self,
        x: &CudaSlice<f32>,
        head: &CudaWeight,
        targets: &[i32],
        scale: f32,
        dx: Option<&mut CudaSlice<f32>>,
    ) -> (f64, usize) {
        let (vocab, hidden) = head.shape();
        let m = targets.len();
        // A 16-bit dense head, run as transformers runs a bf16 one: its GEMM writes the logits in
        // the head's dtype, the loss kernel reads them and writes dlogits in that dtype for the
        // input-gradient GEMM (4 bytes per logit, where f32 logits and f32 dlogits took 8 + 8 and a
        // conversion). With or without a backward pass, so that a batch's evaluation loss is its
        // training loss. Otherwise (4-bit or precise heads, vocabularies the streaming kernels do not
        // take): the composed ops on f32 logits.
        let sixteen_bit = matches!(head, CudaWeight::Dense { .. }) && !self.is_precise();
        if !sixteen_bit || self.xent_stream_index(vocab, true).is_none() {
            return super::lm_head_cross_entropy_composed(self, x, head, targets, scale, dx);
        }
        let _span = self.span("lm_head_cross_entropy");
        assert!(x.len() == m * hidden, "lm_head_cross_entropy: bad shapes");
        assert!(dx.as_ref().is_none_or(|dx| dx.len() == m * hidden), "lm_head_cross_entropy: bad shapes");
        let (wop, c) = self.weight_operand(head);
        let x16 = self.convert(x, c).expect("a 16-bit head takes 16-bit activations");
        // logits (m, vocab) = x (m, hidden) · Wᵀ, in the head's dtype
        let logits = Gemm::forward(m, vocab, hidden, OperandView::from(&x16), wop.as_ref());
        let logits = self.gemm_16(&logits, c, "LM head GEMM");
        drop(x16);
        // SAFETY: the loss kernel writes every gradient value before anything reads it.
        let (result, dlogits) = match &logits {
            Operand::BF16(l16) => {
                let mut d = ck!(unsafe { self.stream.alloc::<bf16>(m * vocab) }, "alloc");
                (self.xent(XentIo::BF16(l16, &mut d), targets, vocab, scale), Operand::BF16(d))
            }
            Operand::F16(l16) => {
                let mut d = ck!(unsafe { self.stream.alloc::<f16>(m * vocab) }, "alloc");
                (self.xent(XentIo::F16(l16, &mut d), targets, vocab, scale), Operand::F16(d))
            }
            Operand::F32(_) => unreachable!("a 16-bit head"),
        };
        drop(logits);
        if let Some(dx) = dx {
            // dx (m, hidden) = dlogits (m, vocab) · W (vocab, hidden)
            let product = Gemm::input_grad(m, hidden, vocab, OperandView::from(&dlogits), wop.as_ref());
            self.gemm_rounded(head, product, dx, false, None, "LM head backward GEMM");
        }
        result
    }

    fn free_memory(&self) -> Option<u64> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free as u64)
    }

    fn upload_into(&self, host: &[f32], dst: &mut CudaSlice<f32>) {
        let _span = self.span("upload_into");
        ck!(self.stream.memcpy_htod(host, &mut dst.slice_mut(0..host.len())), "upload");
    }
    fn kv_write(&self, src: &CudaSlice<f32>, dst: &mut CudaSlice<f32>, pos: &CudaSlice<f32>, row: usize) {
        let _span = self.span("kv_write");
        let (n, row64) = (src.len() as i64, row as i64);
        launch!(self, "kv_write_f32", grid_for(src.len()); src, &mut *dst, pos, &row64, &n);
    }
    fn attention_at(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        sh: AttnShape,
        pos: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        assert!(sh.head_dim <= 256, "head_dim {} > 256 is not supported", sh.head_dim);
        if self.flash(&sh) {
            // A prompt (never recorded): read the position and take the tensor-core kernels.
            let p = self.download(pos)[0] as usize;
            let sh = AttnShape { q_offset: p, kv_len: p + sh.q_len, ..sh };
            return self.attention(q, k, v, sh, None, out, lse);
        }
        let _span = self.span("attention");
        self.attention_split(q, k, v, sh, None, Some(pos), out, lse);
    }
    /// Captures the ops `f` issues on our stream into a CUDA graph. Not while profiling (a profiled
    /// op synchronizes, which a capture forbids) or with `LLAMATUNE_CUDA_GRAPHS=0`.
    fn record(&self, f: &mut dyn FnMut()) -> Option<cudarc::driver::CudaGraph> {
        if self.profile.is_some() || std::env::var("LLAMATUNE_CUDA_GRAPHS").is_ok_and(|v| v == "0") {
            return None;
        }
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        // A driver that cannot capture or instantiate the step costs speed, not the answer: nothing
        // captured has run, so the caller runs the step op by op instead.
        let fallback = |what: &str, e: cudarc::driver::DriverError| {
            eprintln!("warning: {what} failed ({e:?}); decoding without CUDA graphs");
            None
        };
        if let Err(e) = self.stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL) {
            return fallback("CUDA graph capture", e);
        }
        f();
        self.stream.end_capture(CUgraphInstantiate_flags(0)).unwrap_or_else(|e| fallback("CUDA graph instantiation", e))
    }
    fn replay(&self, r: &cudarc::driver::CudaGraph) {
        let _span = self.span("replay");
        ck!(r.launch(), "graph launch");
    }
    fn offload(&self, buf: CudaSlice<f32>) -> Offloaded {
        let _span = self.span("offload");
        self.offload_buf(buf)
    }
    fn reload(&self, parked: Offloaded) -> Offloaded {
        let _span = self.span("reload");
        self.reload_buf(parked)
    }
    fn restore(&self, parked: Offloaded) -> CudaSlice<f32> {
        self.restore_buf(parked)
    }
    fn host_buf(&self, data: &[f32]) -> PinnedHostSlice<f32> {
        // Plain page-locked memory (not write-combined: checkpoints read it back on the host).
        // SAFETY: every element is written right below before anyone reads it.
        let mut h = ck!(unsafe { self.ctx.alloc_pinned_with_flags::<f32>(data.len().max(1), 0) }, "pinned alloc");
        ck!(h.as_mut_slice(), "pinned access")[..data.len()].copy_from_slice(data);
        h
    }
    fn host_to_vec(&self, h: &PinnedHostSlice<f32>) -> Vec<f32> {
        self.synchronize();
        ck!(h.as_slice(), "pinned access").to_vec()
    }
    fn adamw_paged(
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

    fn adamw(
        &self,
        param: &mut CudaSlice<f32>,
        grad: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        hp: &AdamWStep,
    ) {
        let _span = self.span("adamw");
        let (hyper, n) = (AdamHyper::of(hp), param.len());
        let a0 = n as i64;
        launch!(self, "adamw_f32", grid_for(n); &mut *param, grad, &mut *m, &mut *v, &hyper, &a0);
    }
    fn adamw_all(
        &self,
        params: Vec<&mut CudaSlice<f32>>,
        grads: Vec<&CudaSlice<f32>>,
        m: &mut [CudaSlice<f32>],
        v: &mut [CudaSlice<f32>],
        hp: &AdamWStep,
    ) {
        let _span = self.span("adamw (all tensors)");
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

/// The fused LoRA kernels (kernels/lora_fused.cu) by rank: r ≤ 16, ≤ 32, ≤ 64.
const LORA_DOWN: [&str; 3] = ["lora_down_r16", "lora_down_r32", "lora_down_r64"];
const LORA_OUTER: [&str; 3] = ["lora_outer_r16", "lora_outer_r32", "lora_outer_r64"];
fn lora_variant(r: usize) -> usize {
    match r {
        0..=16 => 0,
        17..=32 => 1,
        _ => 2,
    }
}
/// Their geometry (DOWN_ROWS, STAGE_K, STAGES, UP_ROWS = UP_COLS, OUTER_COLS, 128-thread blocks).
const LORA_DOWN_ROWS: usize = 64;
const LORA_STAGE: usize = 32;
const LORA_STAGES: usize = 4;
const LORA_UP_TILE: usize = 64;
const LORA_OUTER_COLS: usize = 32;
const LORA_THREADS: u32 = 128;
/// Blocks per SM of the split kernels (`down` and `outer` are built for three: their registers and
/// shared memory allow it); the splits aim at one full wave of them.
const LORA_BLOCKS_PER_SM: usize = 3;
/// Dynamic shared memory of `lora_down` variant v: STAGES × (64 rows of x + 8·NT of A) × 36 words.
fn lora_down_smem(v: usize) -> usize {
    LORA_STAGES * (LORA_DOWN_ROWS + (16 << v)) * 36 * 4
}
/// Of `lora_outer` variant v: STAGES × 32 rows × (S: 16·MT + 8 words, T: 40 words).
fn lora_outer_smem(v: usize) -> usize {
    LORA_STAGES * LORA_STAGE * ((16 << v) + 8 + 40) * 4
}

/// Warps per query row of the non-flash attention forward (kernels/attention.cu, SPLIT_WARPS).
const ATTENTION_SPLIT_WARPS: u32 = 8;

/// Rows of `x` up to which a 4-bit linear reads the codes directly (kernels/nf4.cu, gemv_4bit_*).
const GEMV_MAX_M: usize = 8;
/// Output rows each warp of the row-blocked GEMV computes, and its block size (kernels/nf4.cu,
/// GEMV_ROWS, GEMV_THREADS).
const GEMV_ROWS_PER_WARP: usize = 4;
const GEMV_THREADS: usize = 256;
/// The row-blocked GEMV kernels of kernels/nf4.cu, indexed by compute dtype (f32, f16, bf16): one row
/// of x staged in shared memory, 4 then 2 output rows per warp; and up to 8 rows of x read through L1.
const GEMV_ONE_ROW: [&str; 6] = [
    "gemv_4bit_rows_f32_m1",
    "gemv_4bit_rows_f16_m1",
    "gemv_4bit_rows_bf16_m1",
    "gemv_4bit_rows_f32_m1_r2",
    "gemv_4bit_rows_f16_m1_r2",
    "gemv_4bit_rows_bf16_m1_r2",
];
const GEMV_FEW_ROWS: [&str; 3] = ["gemv_4bit_rows_f32_m8", "gemv_4bit_rows_f16_m8", "gemv_4bit_rows_bf16_m8"];
/// The one-row GEMV over several weights in one launch (kernels/nf4.cu `gemv_4bit_many_*`), indexed by
/// compute dtype, 4 then 2 output rows per warp.
const GEMV_MANY: [&str; 6] = [
    "gemv_4bit_many_f32",
    "gemv_4bit_many_f16",
    "gemv_4bit_many_bf16",
    "gemv_4bit_many_f32_r2",
    "gemv_4bit_many_f16_r2",
    "gemv_4bit_many_bf16_r2",
];
/// The same with the LoRA branches' A products in blocks after the weights' (kernels/nf4.cu
/// `gemv_4bit_many_lora_*`, [`Backend::linear_many_lora`]), indexed as [`GEMV_MANY`].
const GEMV_MANY_LORA: [&str; 6] = [
    "gemv_4bit_many_lora_f32",
    "gemv_4bit_many_lora_f16",
    "gemv_4bit_many_lora_bf16",
    "gemv_4bit_many_lora_f32_r2",
    "gemv_4bit_many_lora_f16_r2",
    "gemv_4bit_many_lora_bf16_r2",
];
/// The fused SwiGLU GEMV of decoding (kernels/nf4.cu `gemv_4bit_swiglu_*`), indexed by compute dtype.
const GEMV_SWIGLU: [&str; 3] = ["gemv_4bit_swiglu_f32", "gemv_4bit_swiglu_f16", "gemv_4bit_swiglu_bf16"];
/// A 4-bit weight's codes and absmax as device addresses: kernels/nf4.cu `Codes4`, field for field
/// (the up weight of a `gemv_4bit_swiglu_*` launch, each weight of a `gemv_4bit_many_*` one).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Codes4 {
    packed: u64,
    absmax: u64,
    absmax_q: u64,
    absmax2: u64,
    offset: f32,
}
// SAFETY: plain old data with the layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for Codes4 {}
/// At most this many weights per `gemv_4bit_many_*` launch (kernels/nf4.cu GEMV_MAX_TARGETS).
const GEMV_MAX_TARGETS: usize = 3;
/// At most this many LoRA branches per `gemv_f32*_many` launch (kernels/gemv_f32.cuh LORA_MAX_TARGETS).
const LORA_MAX_TARGETS: usize = 3;
/// Threads per block of `gemv_f32_many` (a group of lanes per row of B: [`lora_rows_per_warp`]).
const LORA_UP_THREADS: usize = 128;

/// One product of a `gemv_f32*_many` launch: kernels/gemv_f32.cuh `GemvF32Target`, field for field.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvF32Target {
    w: u64,
    x: u64,
    y: u64,
    rows: i32,
    first_block: i32,
}
/// kernels/gemv_f32.cuh `GemvF32Targets`, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvF32Targets {
    t: [GemvF32Target; LORA_MAX_TARGETS],
    count: i32,
}
// SAFETY: plain old data with the layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for GemvF32Targets {}

/// Blocks of the one-row GEMV kernels that share an SM (their `__launch_bounds__` minimum).
const GEMV_BLOCKS_PER_SM: usize = 3;

/// One weight of a `gemv_4bit_many_*` launch: kernels/nf4.cu `GemvTarget`, field for field (device
/// addresses as u64, the same C layout).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvTarget {
    w: Codes4,
    y: u64,
    rows: i32,
    first_block: i32,
}
/// kernels/nf4.cu `GemvTargets`, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct GemvTargets {
    t: [GemvTarget; GEMV_MAX_TARGETS],
    count: i32,
}
// SAFETY: plain old data with the layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for GemvTargets {}
/// kernels/adamw.cu `AdamHyper`, passed by value: an AdamW step's hyper-parameters with the step size
/// and bias correction worked out as Cpu::adamw works them out (the same f32 arithmetic).
#[repr(C)]
#[derive(Clone, Copy)]
struct AdamHyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    step_size: f32,
    c2: f32,
    grad_scale: f32,
}
impl AdamHyper {
    fn of(hp: &AdamWStep) -> Self {
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
struct AdamTensor {
    p: u64,
    g: u64,
    m: u64,
    v: u64,
    n: i64,
    first_chunk: i64,
}
// SAFETY: plain old data with the layout of the kernel's struct (uploaded as an array).
unsafe impl cudarc::driver::DeviceRepr for AdamTensor {}
/// kernels/adamw.cu `SumTensor`: one tensor of `sum_squares_many_f32`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SumTensor {
    x: u64,
    n: i64,
    first_chunk: i64,
}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for SumTensor {}
/// Values per block of the multi-tensor optimizer kernels (256 threads, 64 values each): an
/// all-linear 7B adapter's 160M values are ~9,800 blocks, its 1 MB tensors 16 each.
const MULTI_CHUNK: usize = 16384;
/// The chunks of a multi-tensor launch: hands each tensor its first chunk (block) in turn and gives
/// the grid, a block of 256 threads per chunk.
#[derive(Default)]
struct Chunks(usize);
impl Chunks {
    /// The first chunk of the next tensor, of `n` values.
    fn take(&mut self, n: usize) -> i64 {
        let first = self.0;
        self.0 += n.div_ceil(MULTI_CHUNK);
        first as i64
    }
    /// The launch over every chunk taken; `None` when there is none.
    fn launch(&self) -> Option<LaunchConfig> {
        let grid = LaunchConfig { grid_dim: (self.0 as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        (self.0 > 0).then_some(grid)
    }
}
/// Shared memory the one-row GEMV kernels may take for x (set as their limit when the module loads).
const GEMV_MAX_X_SMEM: usize = 160 * 1024;
/// The fused 4-bit kernels (kernels/nf4_gemm.cu), index 4·tile + 2·input-grad + bf16, tile as in
/// [`GEMM_4BIT_TILES`].
const GEMM_4BIT: [&str; 8] = [
    "gemm_4bit_fwd_f16_t128",
    "gemm_4bit_fwd_bf16_t128",
    "gemm_4bit_dgrad_f16_t128",
    "gemm_4bit_dgrad_bf16_t128",
    "gemm_4bit_fwd_f16_t256",
    "gemm_4bit_fwd_bf16_t256",
    "gemm_4bit_dgrad_f16_t256",
    "gemm_4bit_dgrad_bf16_t256",
];
/// When 4-bit products take the fused kernel (kernels/nf4_gemm.cu) rather than dequantize + cuBLAS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fused4bit {
    Off,
    /// Up to [`FUSED_4BIT_MAX_M`] rows (the default).
    Auto,
    Always,
}
/// Rows up to which the fused 4-bit kernel beats dequantize + cuBLAS (H200, 4096×4096, 2026-11-28;
/// the second path dequantizes all of W whatever m). Measured in docs/PERF.md.
pub const FUSED_4BIT_MAX_M: usize = 512;
/// W rows (forward) or W columns (input grad) per block of the fused 4-bit kernel (BM in
/// kernels/nf4_gemm.cu: 64 per warpgroup).
const GEMM_4BIT_W_TILE: usize = 128;
/// One token-tile width of the fused 4-bit kernel (`Cfg<BT>` in kernels/nf4_gemm.cu).
struct Gemm4bitTile {
    /// Tokens per block (the wgmma N), times [`GEMM_4BIT_W_TILE`] W rows or columns.
    tokens: usize,
    /// Dynamic shared memory: `stages` × (token tile `tokens` × 64 16-bit values + 6 KiB of codes +
    /// 2 KiB of scale words), plus 1 KiB to align them.
    smem: usize,
    /// Blocks per SM its registers and shared memory allow.
    blocks_per_sm: usize,
}
const fn gemm_4bit_tile(tokens: usize, stages: usize, blocks_per_sm: usize) -> Gemm4bitTile {
    Gemm4bitTile { tokens, smem: stages * (tokens * 64 * 2 + 6144 + 2048) + 1024, blocks_per_sm }
}
/// 128 tokens for products of up to 128 rows (less padding; two blocks per SM), 256 above (each
/// dequantized fragment serves twice the tokens).
const GEMM_4BIT_TILES: [Gemm4bitTile; 2] = [gemm_4bit_tile(128, 4, 2), gemm_4bit_tile(256, 5, 1)];
/// The register-resident cross-entropy kernels of kernels/xent.cu: a block of
/// [`XENT_REG_THREADS`] holds a row of up to that many × [`XENT_REG_VALUES`] logits.
const XENT_REG: [&str; 3] = ["cross_entropy_reg8", "cross_entropy_reg16", "cross_entropy_reg32"];
const XENT_REG_VALUES: [usize; 3] = [8, 16, 32];
const XENT_REG_THREADS: usize = 1024;
/// The persistent-block variants of [`XENT_REG`] (the next row streamed into shared memory), by the
/// dtype of the logits they read and the gradient they write (f32, bf16, f16), then values per thread.
const XENT_STREAM: [[&str; 3]; 3] = [
    ["cross_entropy_stream8", "cross_entropy_stream16", "cross_entropy_stream32"],
    ["cross_entropy_stream8_bf16", "cross_entropy_stream16_bf16", "cross_entropy_stream32_bf16"],
    ["cross_entropy_stream8_f16", "cross_entropy_stream16_f16", "cross_entropy_stream32_f16"],
];
/// The logits a cross-entropy launch reads and the gradient it writes, in one dtype: f32, or a 16-bit
/// LM head's (the streaming kernels only).
enum XentIo<'a> {
    F32(&'a CudaSlice<f32>, &'a mut CudaSlice<f32>),
    BF16(&'a CudaSlice<bf16>, &'a mut CudaSlice<bf16>),
    F16(&'a CudaSlice<f16>, &'a mut CudaSlice<f16>),
}
/// The index into [`XENT_REG`] (and [`XENT_STREAM`]) whose kernels hold a row of `vocab` logits in
/// registers: the fewest values per thread that cover it, if any does.
fn xent_reg_index(vocab: usize) -> Option<usize> {
    XENT_REG_VALUES.iter().position(|&v| vocab <= XENT_REG_THREADS * v)
}
/// Dynamic shared memory of `XENT_STREAM[i]`: one row of its largest vocabulary in f32.
fn xent_stream_smem(i: usize) -> usize {
    XENT_REG_THREADS * XENT_REG_VALUES[i] * 4
}
/// Whether 4-bit absmax blocks of `blocksize` values suit the kernels that apply one scale per
/// 32-value code chunk and find its block by a shift (the row GEMVs and the fused matmul): a power of
/// two ≥ 32.
fn scale_per_32_values(blocksize: usize) -> bool {
    blocksize >= 32 && blocksize.is_power_of_two()
}
/// A compute dtype as the kernels' `compute` argument takes it (round_to in kernels/quant4.cuh).
fn dtype_code(c: ComputeDtype) -> i32 {
    match c {
        ComputeDtype::F32 => 0,
        ComputeDtype::F16 => 1,
        ComputeDtype::BF16 => 2,
    }
}

impl Cuda {
    /// `out (m, rows) = x · dequant(W)ᵀ` straight from the 4-bit codes, for decoding's few rows.
    fn gemv_4bit(&self, x: &CudaSlice<f32>, w: &CudaWeight, m: usize, out: &mut CudaSlice<f32>) {
        let CudaWeight::Quant4 { rows, cols, quant_type, blocksize, compute, packed, absmax } = w else {
            unreachable!("gemv_4bit takes 4-bit weights")
        };
        let compute = dtype_code(*compute);
        let (bs, m32, r32, c32) = (*blocksize as i32, m as i32, *rows as i32, *cols as i32);
        // The row-blocked kernel when every row starts on a 16-byte boundary and blocks span a power
        // of two ≥ 32 values (the usual case; its dtype is in its name), else the any-size one (dtype
        // argument).
        let (kernel, cfg, any_size) = if cols % 32 == 0 && scale_per_32_values(*blocksize) {
            // One row of x is staged in shared memory (cols + cols/32 floats) when it fits.
            let x_smem = (cols + cols / 32) * 4;
            let staged = m == 1 && x_smem <= GEMV_MAX_X_SMEM;
            // Two rows per warp when four would leave most warp slots empty (fewer than 8192 rows:
            // the 4096-row projections of a 7B model give 1024 warps for 132 SMs × 24 slots).
            let two_rows = staged && *rows < 8192;
            let kernel = match (staged, two_rows) {
                (true, false) => GEMV_ONE_ROW[compute as usize],
                (true, true) => GEMV_ONE_ROW[3 + compute as usize],
                (false, _) => GEMV_FEW_ROWS[compute as usize],
            };
            let warps = rows.div_ceil(if two_rows { 2 } else { GEMV_ROWS_PER_WARP });
            let cfg = LaunchConfig {
                grid_dim: (warps.div_ceil(GEMV_THREADS / 32) as u32, 1, 1),
                block_dim: (GEMV_THREADS as u32, 1, 1),
                shared_mem_bytes: if staged { x_smem as u32 } else { 0 },
            };
            (kernel, cfg, false)
        } else {
            ("gemv_4bit_f32", warp_grid(*rows), true)
        };
        let mut b = self.stream.launch_builder(self.f(kernel));
        self.push_4bit(&mut b, packed, absmax, *quant_type);
        b.arg(&bs).arg(x).arg(&mut *out).arg(&m32).arg(&r32).arg(&c32);
        if any_size {
            b.arg(&compute);
        }
        // SAFETY: the kernel reads the codes and x within the sizes passed and writes `out (m, rows)`.
        ck!(unsafe { b.launch(cfg) }, kernel);
    }

    /// The index into [`XENT_STREAM`]'s kernels that takes a row of `vocab` logits of f32 or (with
    /// `sixteen_bit`) a 16-bit dtype, when one does (the row fits 1024 threads × 8, 16 or 32 values,
    /// whole 16-byte copies, the device's shared memory).
    fn xent_stream_index(&self, vocab: usize, sixteen_bit: bool) -> Option<usize> {
        let i = xent_reg_index(vocab)?;
        let per_copy = if sixteen_bit { 8 } else { 4 };
        (self.xent_stream[i] && vocab % per_copy == 0).then_some(i)
    }

    /// Loss and gradient of the logits `(m, vocab)` in `io` against `targets`
    /// (Backend::cross_entropy), the gradient in the logits' dtype; 16-bit logits need a streaming
    /// kernel ([`Cuda::xent_stream_index`]).
    fn xent(&self, io: XentIo<'_>, targets: &[i32], vocab: usize, scale: f32) -> (f64, usize) {
        let _span = self.span("cross_entropy");
        let m = targets.len();
        let t = ck!(self.stream.clone_htod(targets), "upload targets");
        let mut loss = self.scalar_f64();
        let mut count = ck!(self.stream.alloc_zeros::<i32>(1), "alloc");
        // The row in registers (one read of the logits) when the vocabulary fits 1024 threads × 8, 16
        // or 32 values: streamed through persistent blocks where 16-byte copies and the shared memory
        // allow, else a block per row; past that, three passes over the row.
        let (vocab32, rows) = (vocab as i32, m as i32);
        let sixteen_bit = !matches!(io, XentIo::F32(..));
        match (self.xent_stream_index(vocab, sixteen_bit), io) {
            (Some(i), io) => {
                let cfg = LaunchConfig {
                    grid_dim: (m.min(self.sm_count).max(1) as u32, 1, 1),
                    block_dim: (XENT_REG_THREADS as u32, 1, 1),
                    shared_mem_bytes: xent_stream_smem(i) as u32,
                };
                match io {
                    XentIo::F32(l, d) => {
                        launch!(self, XENT_STREAM[0][i], cfg; l, &t, &mut *d, &mut loss, &mut count, &rows, &vocab32, &scale)
                    }
                    XentIo::BF16(l, d) => {
                        launch!(self, XENT_STREAM[1][i], cfg; l, &t, &mut *d, &mut loss, &mut count, &rows, &vocab32, &scale)
                    }
                    XentIo::F16(l, d) => {
                        launch!(self, XENT_STREAM[2][i], cfg; l, &t, &mut *d, &mut loss, &mut count, &rows, &vocab32, &scale)
                    }
                }
            }
            (None, XentIo::F32(logits, dlogits)) => {
                let (kernel, threads) = match xent_reg_index(vocab) {
                    Some(i) => (XENT_REG[i], XENT_REG_THREADS),
                    None => ("cross_entropy_f32", 256),
                };
                let block_dim = (threads as u32, 1, 1);
                let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim, shared_mem_bytes: 0 };
                launch!(self, kernel, cfg; logits, &t, &mut *dlogits, &mut loss, &mut count, &vocab32, &scale);
            }
            (None, _) => unreachable!("16-bit logits need a streaming cross-entropy kernel"),
        }
        let c = ck!(self.stream.clone_dtoh(&count), "download")[0];
        assert!(c < (1 << 30), "a target id is >= vocab {vocab}");
        (ck!(self.stream.clone_dtoh(&loss), "download")[0], c as usize)
    }

    /// Whether [`Backend::linear_many_lora`] runs these products and branches in the shared launch
    /// (`gemv_4bit_many_lora_*`): where the several-weight GEMV takes the products
    /// (`Cuda::gemv_many_fits`) and 1 to 3 branches carry no dropout.
    pub fn linear_many_lora_shares_launch(
        &self,
        ws: &[&CudaWeight],
        m: usize,
        loras: &[Option<LoraDown<'_, Self>>],
    ) -> bool {
        (1..=LORA_MAX_TARGETS).contains(&loras.iter().flatten().count())
            && loras.iter().flatten().all(|l| !l.dropout.is_active())
            && self.gemv_many_fits(ws, m)
    }
    /// Whether the products of `ws` at `m` rows can share one `gemv_4bit_many_*` launch: 2 or 3
    /// weights [`Cuda::gemv_shares_x`] accepts, their blocks within one wave.
    fn gemv_many_fits(&self, ws: &[&CudaWeight], m: usize) -> bool {
        // Only while all the blocks fit one wave (three per SM): one launch helps by filling the GPU
        // where each weight alone leaves it part empty (q/k/v: 3 × 128 blocks of 4096 rows, 677 →
        // 540 µs per 32 on the H200); past a wave it adds a tail (gate/up: 2 × 344 blocks, 972 →
        // 984 µs per 32).
        self.gemv_many.load(std::sync::atomic::Ordering::Relaxed)
            && (2..=GEMV_MAX_TARGETS).contains(&ws.len())
            && self.gemv_shares_x(ws, m)
            && self.gemv_many_blocks(ws.iter().map(|w| w.shape().0)).iter().sum::<usize>()
                <= GEMV_BLOCKS_PER_SM * self.sm_count
    }

    /// Whether the staged one-row GEMV can run `ws` at `m` rows in one launch: 4-bit weights of the
    /// same cols, quant type, blocksize, compute dtype and kind of absmax, one row of x.
    fn gemv_shares_x(&self, ws: &[&CudaWeight], m: usize) -> bool {
        let key = |w: &CudaWeight| match w {
            CudaWeight::Quant4 { cols, quant_type, blocksize, compute, absmax, .. } => {
                Some((*cols, *quant_type, *blocksize, *compute, matches!(absmax, DeviceAbsmax::Nested { .. })))
            }
            CudaWeight::Dense { .. } => None,
        };
        let Some(first) = ws.first().and_then(|w| key(w)) else { return false };
        let (cols, _, blocksize, _, _) = first;
        m == 1
            && ws.iter().all(|w| key(w) == Some(first))
            && cols % 32 == 0
            && scale_per_32_values(blocksize)
            && (cols + cols / 32) * 4 <= GEMV_MAX_X_SMEM
    }

    /// Each weight's blocks in a `gemv_4bit_many_*` launch over weights of these row counts, and the
    /// rows per warp it takes (two when four would leave most warp slots empty, as in gemv_4bit).
    fn gemv_many_blocks(&self, rows: impl Iterator<Item = usize> + Clone) -> Vec<usize> {
        let rows_per_warp = Self::gemv_many_rows_per_warp(rows.clone().sum());
        rows.map(|r| r.div_ceil(rows_per_warp).div_ceil(GEMV_THREADS / 32)).collect()
    }
    fn gemv_many_rows_per_warp(total_rows: usize) -> usize {
        if total_rows < 8192 {
            2
        } else {
            GEMV_ROWS_PER_WARP
        }
    }

    /// `outs[i] (1, rows_i) = x (1, cols) · dequant(W_i)ᵀ` for the weights [`Cuda::gemv_many_fits`]
    /// accepts, in one launch: the products of [`Cuda::gemv_4bit`] on each.
    fn gemv_4bit_many(&self, x: &CudaSlice<f32>, ws: &[&CudaWeight], outs: &mut [&mut CudaSlice<f32>]) {
        let mut guards = Vec::new();
        let (targets, blocks, kernel) = self.gemv_many_targets(x, ws, outs, &mut guards);
        let name = GEMV_MANY[kernel];
        let CudaWeight::Quant4 { quant_type, blocksize, cols, .. } = ws[0] else { unreachable!("4-bit weights") };
        let (bs, c32) = (*blocksize as i32, *cols as i32);
        let mut b = self.stream.launch_builder(self.f(name));
        b.arg(&targets).arg(&self.code256).arg(self.code16(*quant_type)).arg(&bs).arg(x).arg(&c32);
        // SAFETY: each target's codes, absmax and output are the live buffers whose addresses the
        // guards hold; the kernel reads x (cols) and writes each output's `rows` values.
        ck!(unsafe { b.launch(self.gemv_many_launch(ws[0], blocks)) }, name);
        drop(guards);
    }

    /// The several-weight GEMV's targets for `ws` and `outs` (guards keep their addresses valid), the
    /// launch's block count, and its kernel's index in [`GEMV_MANY`] / [`GEMV_MANY_LORA`] (compute
    /// dtype; four or two rows per warp).
    fn gemv_many_targets<'a>(
        &'a self,
        x: &CudaSlice<f32>,
        ws: &[&'a CudaWeight],
        outs: &'a mut [&mut CudaSlice<f32>],
        guards: &mut Vec<cudarc::driver::SyncOnDrop<'a>>,
    ) -> (GemvTargets, usize, usize) {
        // gemv_many_fits checked that the weights differ only in their rows and data.
        let CudaWeight::Quant4 { cols, compute, .. } = ws[0] else {
            unreachable!("gemv_many_fits takes 4-bit weights")
        };
        let rows: Vec<usize> = ws.iter().map(|w| w.shape().0).collect();
        let two_rows = Self::gemv_many_rows_per_warp(rows.iter().sum()) == 2;
        let kernel = if two_rows { 3 } else { 0 } + dtype_code(*compute) as usize;
        let mut targets = GemvTargets { count: ws.len() as i32, ..Default::default() };
        let mut first_block = 0;
        let blocks_of = self.gemv_many_blocks(rows.iter().copied());
        for (i, (w, out)) in ws.iter().zip(outs.iter_mut()).enumerate() {
            let CudaWeight::Quant4 { packed, absmax, .. } = w else {
                unreachable!("gemv_many_fits takes 4-bit weights")
            };
            assert!(x.len() == *cols && out.len() == rows[i], "linear: bad shapes");
            let codes = self.codes4(packed, absmax, guards);
            let (y, gy) = out.device_ptr_mut(&self.stream);
            guards.push(gy);
            targets.t[i] = GemvTarget { w: codes, y, rows: rows[i] as i32, first_block: first_block as i32 };
            first_block += blocks_of[i];
        }
        (targets, first_block, kernel)
    }
    /// The several-weight GEMV's launch of `blocks` blocks: one row of x staged in shared memory.
    fn gemv_many_launch(&self, first: &CudaWeight, blocks: usize) -> LaunchConfig {
        let cols = first.shape().1;
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (GEMV_THREADS as u32, 1, 1),
            shared_mem_bytes: ((cols + cols / 32) * 4) as u32,
        }
    }

    /// The A products `u_i (m, r) = x (m, cols) · A_iᵀ` of up to LORA_MAX_TARGETS branches as the targets
    /// of a `gemv_f32_long_row` launch (kernels/gemv_f32.cuh): a block per row of every A_i, numbered
    /// from `first_block`; returns them and the launch's block count. `guards` keeps the addresses valid.
    fn lora_down_targets<'a>(
        &'a self,
        x: &'a CudaSlice<f32>,
        downs: impl Iterator<Item = (&'a CudaSlice<f32>, &'a mut CudaSlice<f32>)>,
        m: usize,
        r: usize,
        first_block: usize,
        guards: &mut Vec<cudarc::driver::SyncOnDrop<'a>>,
    ) -> (GemvF32Targets, usize) {
        let cols = x.len() / m;
        let mut targets = GemvF32Targets::default();
        let (xp, gx) = x.device_ptr(&self.stream);
        guards.push(gx);
        let mut blocks = first_block;
        for (i, (a, u)) in downs.enumerate() {
            assert!(i < LORA_MAX_TARGETS && a.len() == r * cols && u.len() == m * r, "LoRA A products: bad shapes");
            let (ap, ga) = a.device_ptr(&self.stream);
            let (up, gu) = u.device_ptr_mut(&self.stream);
            targets.t[i] = GemvF32Target { w: ap, x: xp, y: up, rows: r as i32, first_block: blocks as i32 };
            targets.count = i as i32 + 1;
            blocks += r;
            guards.extend([ga, gu]);
        }
        (targets, blocks)
    }

    /// `acc += Σ buf²` (f64, on the device). Each block adds its sum atomically: few blocks (up to
    /// two per SM, each thread summing 8 or more values), so the atomics do not queue.
    fn add_sum_squares(&self, buf: &CudaSlice<f32>, acc: &mut CudaSlice<f64>) {
        let blocks = buf.len().div_ceil(256 * 8).clamp(1, 2 * 132) as u32;
        let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let n = buf.len() as i64;
        launch!(self, "sum_squares_f32", cfg; buf, &mut *acc, &n);
    }

    /// The second path's input gradient `dx (m, cols) (+)= dy (m, rows) · W`, with `up` added as its
    /// 16-bit result is widened ([`Cuda::gemm_rounded`]).
    fn dgrad_gemm(
        &self,
        dy: &CudaSlice<f32>,
        w: &CudaWeight,
        m: usize,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
        up: Option<UpTail<'_>>,
    ) {
        let (rows, cols) = w.shape();
        let (wop, c) = self.weight_operand(w);
        let dyc = self.convert(dy, c);
        let dyop = dyc.as_ref().map_or(OperandView::F32(dy), OperandView::from);
        let product = Gemm::input_grad(m, cols, rows, dyop, wop.as_ref());
        self.gemm_rounded(w, product, dx, accumulate, up, "linear backward GEMM");
    }

    /// The fused LoRA backward's weight gradients: `du (m, r) = scale · dy · B` (returned), `dB (rows,
    /// r) += scale · dyᵀ · u` (both cuBLAS TF32), `dA (r, cols) += duᵀ · drop(x)` (kernels/lora_fused.cu
    /// `lora_outer`, the mask regenerated from the seed). Each part has its own profile span.
    #[allow(clippy::too_many_arguments)]
    fn lora_weight_grads(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        m: usize,
        r: usize,
        scale: f32,
        dropout: Dropout,
        da: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) -> CudaSlice<f32> {
        let (cols, rows) = (a.len() / r, b.len() / r);
        let (dyop, uop, bop) = (OperandView::F32(dy), OperandView::F32(u), OperandView::F32(b));
        let mut du = self.scratch(m * r);
        {
            let _part = self.span("lora_backward: du GEMM");
            ck!(
                self.blas.gemm_rm(F32Math::Tf32, false, false, m, r, rows, scale, dyop, rows, bop, r, 0.0, &mut du, r),
                "LoRA du GEMM"
            );
        }
        {
            let _part = self.span("lora_backward: dB GEMM");
            ck!(
                self.blas.gemm_rm(F32Math::Tf32, true, false, rows, r, m, scale, dyop, rows, uop, r, 1.0, db, r),
                "LoRA dB GEMM"
            );
        }
        let _part = self.span("lora_backward: dA (outer)");
        self.lora_outer(&du, x, m, cols, r, dropout, da);
        du
    }

    /// [`Backend::linear_many_lora`] when the products do not share a GEMV launch (and
    /// [`Backend::linear_many`], with no branches): each frozen product, and then the LoRA branches.
    /// A branch whose product goes through cuBLAS with a 16-bit output gets its B product added as
    /// that output is widened (`gemm_rounded`'s [`UpTail`]); the others run after all the products.
    #[allow(clippy::too_many_arguments)]
    fn products_with_lora(
        &self,
        x: &CudaSlice<f32>,
        ws: &[&CudaWeight],
        m: usize,
        outs: &mut [&mut CudaSlice<f32>],
        loras: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
    ) {
        assert_eq!(ws.len(), outs.len(), "linear_many: one output per weight");
        assert!(loras.is_empty() || loras.len() == outs.len(), "linear_many_lora: one LoRA slot per output");
        if self.gemv_many_fits(ws, m) {
            {
                let _span = self.span("linear (4-bit GEMV, several weights)");
                self.gemv_4bit_many(x, ws, outs);
            }
            return super::lora_branches_into(self, x, outs, loras, m, r, scale);
        }
        // x in each compute dtype the second path needs, converted once for all the products (a 4096-wide
        // conversion at 2048 rows is ~20 µs on the H200; q/k/v and gate/up share theirs).
        let mut converted: Vec<(ComputeDtype, Option<Operand>)> = Vec::new();
        for (i, (w, out)) in ws.iter().zip(outs.iter_mut()).enumerate() {
            let (rows, cols) = w.shape();
            assert!(x.len() == m * cols && out.len() == m * rows, "linear: bad shapes");
            if m <= GEMV_MAX_M && matches!(w, CudaWeight::Quant4 { .. }) {
                let _span = self.span("linear (4-bit GEMV)");
                self.gemv_4bit(x, w, m, out);
                continue;
            }
            if self.uses_fused_4bit(w, m) {
                let _span = self.span("linear (fused 4-bit)");
                self.gemm_4bit(x, w, m, out, false, false);
                continue;
            }
            // This product's LoRA branch, taken here when its B product runs on `lora_up` (as
            // lora_forward runs it past a few rows), which can ride in the widening.
            let branch = match loras.get_mut(i) {
                Some(slot) if slot.is_some() && m > GEMV_MAX_M && self.uses_fused_lora_up(rows, r) => slot.take(),
                _ => None,
            };
            let _span = self.span(if branch.is_some() { "linear + LoRA" } else { "linear" });
            let (wop, c) = self.weight_operand(w);
            let j = match converted.iter().position(|(cc, _)| *cc == c) {
                Some(j) => j,
                None => {
                    converted.push((c, self.convert(x, c)));
                    converted.len() - 1
                }
            };
            let xop = converted[j].1.as_ref().map_or(OperandView::F32(x), OperandView::from);
            // out (m, rows) = x (m, cols) · Wᵀ [+ scale · (drop(x) · Aᵀ) · Bᵀ]
            let product = Gemm::forward(m, rows, cols, xop, wop.as_ref());
            let up = branch.map(|l| {
                self.lora_a_product(x, l.a, m, r, l.dropout, l.u);
                UpTail { u: &*l.u, w: l.b, w_is_rn: false, r, alpha: scale, dropout: Dropout::NONE }
            });
            self.gemm_rounded(w, product, out, false, up, "linear GEMM");
        }
        super::lora_branches_into(self, x, outs, loras, m, r, scale);
    }

    /// [`Backend::lora_down`] (without its profile span, for [`Backend::lora_forward`] too).
    fn lora_a_product(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        m: usize,
        r: usize,
        dropout: Dropout,
        u: &mut CudaSlice<f32>,
    ) {
        let cols = a.len() / r;
        assert!(x.len() == m * cols && u.len() == m * r, "lora_down: bad shapes");
        if m <= GEMV_MAX_M && !dropout.is_active() {
            // A few rows (decoding): the f32 row products, as lora_forward_many runs them.
            return self.lora_down_rows(x, std::iter::once((a, u)), m, r);
        }
        if self.uses_fused_lora_down(cols, r) {
            // kernels/lora_fused.cu, the mask regenerated where x is read.
            return self.lora_down_fused(x, a, m, cols, r, dropout, u);
        }
        let xd = self.dropped(x, dropout);
        // u (m, r) = drop(x) · Aᵀ
        ck!(
            self.blas.gemm_rm(
                self.lora_math(),
                false,
                true,
                m,
                r,
                cols,
                1.0,
                OperandView::F32(xd.as_ref().unwrap_or(x)),
                cols,
                OperandView::F32(a),
                cols,
                0.0,
                u,
                r
            ),
            "LoRA A GEMM"
        );
    }

    /// `u_i (m, r) = x (m, cols) · A_iᵀ` for up to LORA_MAX_TARGETS branches of a few rows, without
    /// dropout, in one launch (`gemv_f32_long_rows_many`: a block per row of every A_i).
    fn lora_down_rows<'a>(
        &'a self,
        x: &'a CudaSlice<f32>,
        downs: impl Iterator<Item = (&'a CudaSlice<f32>, &'a mut CudaSlice<f32>)>,
        m: usize,
        r: usize,
    ) {
        let mut guards = Vec::new();
        let (down, blocks) = self.lora_down_targets(x, downs, m, r, 0, &mut guards);
        let (m32, cols32) = (m as i32, (x.len() / m) as i32);
        let long = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: each target's A, x and u are the live buffers whose addresses the guards hold;
        // the kernel reads A (r, cols) and x (m, cols) and writes u (m, r) of each.
        let mut b = self.stream.launch_builder(self.f("gemv_f32_long_rows_many"));
        b.arg(&down).arg(&m32).arg(&cols32).arg(&1f32).arg(&0i32);
        ck!(unsafe { b.launch(long) }, "gemv_f32_long_rows_many");
        drop(guards);
    }

    /// `y_i (m, rows_i) += scale · u_i (m, r) · B_iᵀ` for up to LORA_MAX_TARGETS branches in one launch
    /// (kernels/lora.cu `gemv_f32_many`: a group of lanes per row of every B_i): the B products of
    /// [`Backend::lora_forward_many`] and [`Backend::linear_many_lora`] in decoding.
    fn lora_up_many<'a>(
        &self,
        ups: impl Iterator<Item = (&'a CudaSlice<f32>, &'a CudaSlice<f32>, &'a mut CudaSlice<f32>)>,
        m: usize,
        r: usize,
        scale: f32,
    ) {
        let mut up = GemvF32Targets::default();
        let mut guards = Vec::new();
        let mut blocks = 0;
        for (i, (b, u, y)) in ups.enumerate() {
            let rows = b.len() / r;
            assert!(i < LORA_MAX_TARGETS && u.len() == m * r && y.len() == m * rows, "LoRA B products: bad shapes");
            let (bp, gb) = b.device_ptr(&self.stream);
            let (up_ptr, gu) = u.device_ptr(&self.stream);
            let (yp, gy) = y.device_ptr_mut(&self.stream);
            up.t[i] = GemvF32Target { w: bp, x: up_ptr, y: yp, rows: rows as i32, first_block: blocks as i32 };
            up.count = i as i32 + 1;
            blocks += (rows.div_ceil(lora_rows_per_warp(r)) * 32).div_ceil(LORA_UP_THREADS);
            guards.extend([gb, gu, gy]);
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (LORA_UP_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (m32, r32) = (m as i32, r as i32);
        // SAFETY: each target's B, u and y are the live buffers whose addresses the guards hold; the
        // kernel reads B (rows, r) and u (m, r) and adds into y (m, rows) of each.
        let mut b = self.stream.launch_builder(self.f("gemv_f32_many"));
        b.arg(&up).arg(&m32).arg(&r32).arg(&scale).arg(&1i32);
        ck!(unsafe { b.launch(cfg) }, "gemv_f32_many");
        drop(guards);
    }

    /// [`Backend::cross_entropy`] of bf16 logits with the gradient in bf16 (what
    /// [`Backend::lm_head_cross_entropy`] runs for a bf16 head), for benchmarks and tests; `None` when
    /// no streaming kernel takes rows of `vocab` 16-bit logits.
    pub fn cross_entropy_bf16(
        &self,
        logits: &CudaSlice<bf16>,
        targets: &[i32],
        vocab: usize,
        scale: f32,
        dlogits: &mut CudaSlice<bf16>,
    ) -> Option<(f64, usize)> {
        self.xent_stream_index(vocab, true)?;
        Some(self.xent(XentIo::BF16(logits, dlogits), targets, vocab, scale))
    }

    /// `values` rounded to bf16 (to nearest even), on the device.
    pub fn upload_bf16(&self, values: &[f32]) -> CudaSlice<bf16> {
        let host: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
        ck!(self.stream.clone_htod(&host), "upload")
    }

    /// A bf16 buffer's values, widened to f32.
    pub fn download_bf16(&self, buf: &CudaSlice<bf16>) -> Vec<f32> {
        ck!(self.stream.clone_dtoh(buf), "download").iter().map(|v| v.to_f32()).collect()
    }

    /// A zeroed bf16 buffer of `n` values on the device.
    pub fn zeros_bf16(&self, n: usize) -> CudaSlice<bf16> {
        ck!(self.stream.alloc_zeros::<bf16>(n.max(1)), "alloc")
    }

    /// A 4-bit weight's device addresses as the kernels' `Codes4` takes them; `guards` keeps them valid
    /// and the stream ordered until the launch that reads them is queued.
    fn codes4<'a>(
        &'a self,
        packed: &'a CudaSlice<u8>,
        absmax: &'a DeviceAbsmax,
        guards: &mut Vec<cudarc::driver::SyncOnDrop<'a>>,
    ) -> Codes4 {
        let (p, g) = packed.device_ptr(&self.stream);
        guards.push(g);
        let mut codes = Codes4 { packed: p, ..Default::default() };
        match absmax {
            DeviceAbsmax::F32(a) => {
                let (p, g) = a.device_ptr(&self.stream);
                codes.absmax = p;
                guards.push(g);
            }
            DeviceAbsmax::Nested { q, absmax2, offset } => {
                let (pq, gq) = q.device_ptr(&self.stream);
                let (p2, g2) = absmax2.device_ptr(&self.stream);
                (codes.absmax_q, codes.absmax2, codes.offset) = (pq, p2, *offset);
                guards.extend([gq, g2]);
            }
        }
        codes
    }

    /// Turns the several-weight decoding GEMVs on or off (off: one launch per weight, SwiGLU apart).
    pub fn set_gemv_many(&self, on: bool) {
        self.gemv_many.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Pushes the arguments every 4-bit kernel of kernels/nf4.cu starts with: the packed codes, the
    /// absmax (plain, or double-quantized as 8-bit codes + per-256 scales; the unused side null), the
    /// dynamic 8-bit map, its offset, and the 16-entry code table of the weight's quant type.
    fn push_4bit<'a>(
        &'a self,
        b: &mut cudarc::driver::LaunchArgs<'a>,
        packed: &'a CudaSlice<u8>,
        absmax: &'a DeviceAbsmax,
        quant_type: QuantType,
    ) {
        static NO_OFFSET: f32 = 0.0;
        b.arg(packed);
        match absmax {
            DeviceAbsmax::F32(a) => b.arg(a).arg(&NULL_PTR).arg(&NULL_PTR).arg(&self.code256).arg(&NO_OFFSET),
            DeviceAbsmax::Nested { q, absmax2, offset } => {
                b.arg(&NULL_PTR).arg(q).arg(absmax2).arg(&self.code256).arg(offset)
            }
        };
        b.arg(self.code16(quant_type));
    }

    /// The 16-entry code table of a 4-bit quant type on the device.
    fn code16(&self, quant_type: QuantType) -> &CudaSlice<f32> {
        if quant_type == QuantType::Nf4 {
            &self.nf4
        } else {
            &self.fp4
        }
    }

    /// The fused 4-bit matmul (kernels/nf4_gemm.cu): `out (m, rows) = a (m, cols) · Wᵀ`, or with
    /// `dgrad` `out (m, cols) (+)= a (m, rows) · W`, rounded to the compute dtype like the second path.
    /// `a` is first converted to the compute dtype (one pass; the kernel reads 16-bit tiles).
    fn gemm_4bit(
        &self,
        a: &CudaSlice<f32>,
        w: &CudaWeight,
        m: usize,
        out: &mut CudaSlice<f32>,
        dgrad: bool,
        accumulate: bool,
    ) {
        let CudaWeight::Quant4 { rows, cols, quant_type, blocksize, compute, packed, absmax } = w else {
            unreachable!("gemm_4bit takes 4-bit weights")
        };
        let n_out = if dgrad { *cols } else { *rows };
        // The narrow token tile while it holds all the rows, the wide one above.
        let t = usize::from(m > GEMM_4BIT_TILES[0].tokens);
        let kernel = GEMM_4BIT[4 * t + usize::from(dgrad) * 2 + usize::from(*compute == ComputeDtype::BF16)];
        let tile = &GEMM_4BIT_TILES[t];
        let w_tiles = n_out.div_ceil(GEMM_4BIT_W_TILE);
        let tiles = w_tiles * m.div_ceil(tile.tokens);
        // Split-K when the tiles would leave SMs idle (small m): each split takes ≥ 4 of the 64-wide
        // reduction steps; partial sums go to a workspace that gemm_4bit_reduce adds and rounds.
        let steps = if dgrad { *rows } else { *cols } / 64;
        let splits = self.splits_to_fill(tiles, tile.blocks_per_sm, steps / 4);
        let cfg = LaunchConfig {
            grid_dim: (w_tiles as u32, m.div_ceil(tile.tokens) as u32, splits as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: tile.smem as u32,
        };
        let (bs, m32, r32, c32, acc) = (*blocksize as i32, m as i32, *rows as i32, *cols as i32, i32::from(accumulate));
        let a16 = self.convert(a, *compute).expect("16-bit compute");
        // SAFETY: the kernel writes every value of every split's m × n_out slab before the reduce reads it.
        let mut partial = (splits > 1).then(|| ck!(unsafe { self.stream.alloc::<f32>(splits * m * n_out) }, "alloc"));
        let mut b = self.stream.launch_builder(self.f(kernel));
        self.push_4bit(&mut b, packed, absmax, *quant_type);
        b.arg(&bs);
        match &a16 {
            Operand::BF16(x) => b.arg(x),
            Operand::F16(x) => b.arg(x),
            Operand::F32(_) => unreachable!("the fused kernel takes 16-bit compute"),
        };
        b.arg(&mut *out);
        push_opt(&mut b, partial.as_mut());
        b.arg(&m32).arg(&r32).arg(&c32).arg(&acc);
        // SAFETY: the kernel reads a16 (m × reduction) and W within their sizes and writes out
        // (m × n_out), or each split's slab of `partial`, inside the clipped tiles.
        ck!(unsafe { b.launch(cfg) }, kernel);
        if let Some(p) = partial {
            let (n, n64, splits32, c32) = (m * n_out, (m * n_out) as i64, splits as i32, dtype_code(*compute));
            launch!(self, "gemm_4bit_reduce", grid_for(n); &p, &mut *out, &n64, &splits32, &c32, &acc);
        }
    }

    /// The block-per-query-row attention of kernels/attention.cu; with `pos`, the geometry's q_offset
    /// and kv_len come from the device (`pos[0]`, `pos[0] + q_len`).
    #[allow(clippy::too_many_arguments)]
    fn attention_split(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        sh: AttnShape,
        seg: Option<&CudaSlice<u32>>,
        pos: Option<&CudaSlice<f32>>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        let mut b = self.stream.launch_builder(self.f("attention_fwd_f32"));
        b.arg(q).arg(k).arg(v);
        push_opt(&mut b, seg);
        push_opt(&mut b, pos);
        b.arg(out).arg(lse);
        let g = geom(sh);
        push_geom(&mut b, &g);
        let cfg = LaunchConfig {
            grid_dim: ((sh.batch * sh.heads * sh.q_len) as u32, 1, 1),
            block_dim: (ATTENTION_SPLIT_WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads q/k/v/seg within the geometry and writes one out row and lse per block.
        ck!(unsafe { b.launch(cfg) }, "attention_fwd_f32");
    }

    /// Whether a LoRA branch `cols → rows` of rank `r` with more than a few token rows runs on the fused
    /// kernels of kernels/lora_fused.cu: not in precise mode (f32 cuBLAS there), rank ≤ 64, and rows of
    /// 16 bytes (`LLAMATUNE_FUSED_LORA=0` or [`Cuda::set_fused_lora`] keep the cuBLAS TF32 path).
    pub fn uses_fused_lora(&self, rows: usize, cols: usize, r: usize) -> bool {
        self.uses_fused_lora_down(cols, r) && self.uses_fused_lora_up(rows, r)
    }
    /// Whether a branch's A product `u = drop(x)·Aᵀ` (`cols` in-features) runs on the fused `lora_down`.
    fn uses_fused_lora_down(&self, cols: usize, r: usize) -> bool {
        self.fused_lora_rank(r) && cols % 4 == 0
    }
    /// Whether a branch's B product `y += scale·u·Bᵀ` (`rows` out-features) runs on the fused `lora_up`.
    fn uses_fused_lora_up(&self, rows: usize, r: usize) -> bool {
        self.fused_lora_rank(r) && rows % 4 == 0
    }
    fn fused_lora_rank(&self, r: usize) -> bool {
        self.fused_lora.load(std::sync::atomic::Ordering::Relaxed) && !self.is_precise() && r <= 64 && r % 4 == 0
    }

    /// Turns the fused LoRA kernels on or off (off: dropout pass + cuBLAS TF32 GEMMs, the rival).
    pub fn set_fused_lora(&self, on: bool) {
        self.fused_lora.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many ways to split a reduction so that `tiles` output tiles × splits fill, in one wave, the
    /// GPU's `blocks_per_sm` block slots per SM: at least 1, at most `max_splits` (shared by the split-K
    /// kernels: kernels/nf4_gemm.cu, kernels/lora_fused.cu).
    fn splits_to_fill(&self, tiles: usize, blocks_per_sm: usize, max_splits: usize) -> usize {
        (self.sm_count * blocks_per_sm / tiles.max(1)).clamp(1, max_splits.max(1))
    }

    /// How to split a reduction of `len` (stages of [`LORA_STAGE`]) over blocks so that `tiles`
    /// output tiles × splits fill the GPU's [`LORA_BLOCKS_PER_SM`] block slots per SM in one wave (a
    /// second, nearly empty wave would cost as much as the first): (splits, length per split).
    fn lora_splits(&self, tiles: usize, len: usize) -> (usize, usize) {
        let stages = len.div_ceil(LORA_STAGE);
        let want = self.splits_to_fill(tiles, LORA_BLOCKS_PER_SM, stages);
        let per = stages.div_ceil(want) * LORA_STAGE;
        (len.div_ceil(per), per)
    }

    /// `out = [out +] alpha · Σ_s part[s]` for `part (splits, n)`, `out (n)` (kernels/lora_fused.cu,
    /// lora_sum_splits).
    fn lora_sum_splits(
        &self,
        part: &CudaSlice<f32>,
        splits: usize,
        alpha: f32,
        accumulate: bool,
        out: &mut CudaSlice<f32>,
    ) {
        let n = out.len();
        let (s32, n64, acc) = (splits as i32, n as i64, accumulate as i32);
        launch!(self, "lora_sum_splits", grid_for(n / 4); part, &mut *out, &s32, &n64, &alpha, &acc);
    }

    /// Runs a split-reduction kernel of kernels/lora_fused.cu over `tiles` output tiles × splits of a
    /// reduction of length `len` (arguments: the two inputs, the partials, `dims` = (m, n, r), the
    /// split length, the dropout) and sums the splits into `out`, adding to it when `accumulate`. With
    /// one split and nothing to add to, the kernel writes `out` itself.
    #[allow(clippy::too_many_arguments)]
    fn lora_split_reduce(
        &self,
        (kernel, smem): (&str, usize),
        (tiles, len): (usize, usize),
        (a, b): (&CudaSlice<f32>, &CudaSlice<f32>),
        dims: [i32; 3],
        d: Dropout,
        accumulate: bool,
        out: &mut CudaSlice<f32>,
    ) {
        let (splits, per) = self.lora_splits(tiles, len);
        let cfg = LaunchConfig {
            grid_dim: (tiles as u32, splits as u32, 1),
            block_dim: (LORA_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let per = per as i32;
        let mut part = (splits > 1 || accumulate).then(|| self.scratch(splits * out.len()));
        let dst = part.as_mut().unwrap_or(out);
        launch!(self, kernel, cfg; a, b, dst, &dims[0], &dims[1], &dims[2], &per, &d.seed, &d.p);
        if let Some(part) = part {
            self.lora_sum_splits(&part, splits, 1.0, accumulate, out);
        }
    }

    /// `u (m, r) = drop(x) (m, cols) · Aᵀ` for `A (r, cols)`, split over `cols` to fill the GPU.
    #[allow(clippy::too_many_arguments)]
    fn lora_down_fused(
        &self,
        x: &CudaSlice<f32>,
        a: &CudaSlice<f32>,
        m: usize,
        cols: usize,
        r: usize,
        d: Dropout,
        u: &mut CudaSlice<f32>,
    ) {
        let v = lora_variant(r);
        let (tiles, dims) = (m.div_ceil(LORA_DOWN_ROWS), [m as i32, cols as i32, r as i32]);
        self.lora_split_reduce((LORA_DOWN[v], lora_down_smem(v)), (tiles, cols), (x, a), dims, d, false, u);
    }

    /// `out (m, n) += alpha · drop(U · W'ᵀ)` for `U (m, r)` and `W' (n, r)`, given as `w (n, r)` or, when
    /// `w_is_rn`, as `w (r, n)`.
    #[allow(clippy::too_many_arguments)]
    fn lora_up(
        &self,
        u: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        w_is_rn: bool,
        m: usize,
        n: usize,
        r: usize,
        alpha: f32,
        d: Dropout,
        out: &mut CudaSlice<f32>,
    ) {
        let (dims, rn) = ([m as i32, n as i32, r as i32], w_is_rn as i32);
        launch!(self, "lora_up", lora_up_launch(m, n); u, w, &mut *out, &dims[0], &dims[1], &dims[2], &rn, &alpha, &d.seed, &d.p);
    }

    /// `out (r, n) += Sᵀ · drop(T)` for `S (m, r)`, `T (m, n)`, split over `m` to fill the GPU.
    #[allow(clippy::too_many_arguments)]
    fn lora_outer(
        &self,
        s: &CudaSlice<f32>,
        t: &CudaSlice<f32>,
        m: usize,
        n: usize,
        r: usize,
        d: Dropout,
        out: &mut CudaSlice<f32>,
    ) {
        let v = lora_variant(r);
        let (tiles, dims) = (n.div_ceil(LORA_OUTER_COLS), [m as i32, n as i32, r as i32]);
        self.lora_split_reduce((LORA_OUTER[v], lora_outer_smem(v)), (tiles, m), (s, t), dims, d, true, out);
    }

    /// K and V of a flash launch in bf16 (kernels/flash.cu reads them by cp.async): the rows the kernel
    /// may read, K rotated by `rope` when given (kernels/rope.cu `rope_bf16`).
    fn kv_bf16(
        &self,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        rope: Option<RopeTables<'_, Self>>,
        sh: AttnShape,
    ) -> (CudaSlice<bf16>, CudaSlice<bf16>) {
        let rows = if sh.batch == 1 { sh.kv_len } else { sh.batch * sh.kv_capacity };
        let n = rows * sh.kv_heads * sh.head_dim;
        let kb = match rope {
            Some(r) => self.rope_bf16(k, r, sh.kv_heads, sh.head_dim),
            None => self.bf16_prefix(k, n),
        };
        (kb, self.bf16_prefix(v, n))
    }

    /// `x (rows, heads, head_dim)` rotated by `rope` and rounded to bf16, in a fresh buffer.
    fn rope_bf16(
        &self,
        x: &CudaSlice<f32>,
        rope: RopeTables<'_, Self>,
        heads: usize,
        head_dim: usize,
    ) -> CudaSlice<bf16> {
        assert!(head_dim % 8 == 0, "rope_bf16: head_dim {head_dim} is not a multiple of 8");
        let rows = x.len() / (heads * head_dim);
        assert!(rope.cos.len() >= rows * head_dim / 2, "rope_bf16: fewer table rows than x rows");
        // SAFETY: the kernel writes all of x.len() values before anything reads them.
        let mut out = ck!(unsafe { self.stream.alloc::<bf16>(x.len().max(1)) }, "alloc");
        let (r32, h32, d32) = (rows as i32, heads as i32, head_dim as i32);
        launch!(self, "rope_bf16", grid_for(x.len() / 8); x, rope.cos, rope.sin, &mut out, &r32, &h32, &d32);
        out
    }

    /// The flash forward (kernels/flash.cu `flash_fwd_hd*`): q rotated as it is loaded and K by its
    /// conversion when `rope` is given.
    #[allow(clippy::too_many_arguments)]
    fn flash_forward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        rope: Option<RopeTables<'_, Self>>,
        sh: AttnShape,
        seg: Option<&CudaSlice<u32>>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        let kernel = if sh.head_dim == 64 { "flash_fwd_hd64" } else { "flash_fwd_hd128" };
        let (kb, vb) = self.kv_bf16(k, v, rope, sh);
        let mut b = self.stream.launch_builder(self.f(kernel));
        b.arg(q).arg(&kb).arg(&vb);
        push_opt(&mut b, seg);
        push_opt(&mut b, rope.map(|r| r.cos));
        push_opt(&mut b, rope.map(|r| r.sin));
        b.arg(out).arg(lse);
        let g = flash_geom(sh);
        push_geom(&mut b, &g);
        let cfg = LaunchConfig {
            grid_dim: (sh.q_len.div_ceil(64) as u32, sh.heads as u32, sh.batch as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads q, K, V, seg and the tables within the geometry and writes out and
        // lse rows of its own queries.
        ck!(unsafe { b.launch(cfg) }, kernel);
    }

    /// The flash backward (kernels/flash.cu `flash_bwd_prep_hd*`, `flash_bwd_hd*`): with `rope`, Q and
    /// K are rotated by their conversions and dq, dk come out un-rotated.
    #[allow(clippy::too_many_arguments)]
    fn flash_backward(
        &self,
        q: &CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        rope: Option<RopeTables<'_, Self>>,
        out: &CudaSlice<f32>,
        lse: &CudaSlice<f32>,
        dout: &CudaSlice<f32>,
        sh: AttnShape,
        seg: Option<&CudaSlice<u32>>,
        dq: &mut CudaSlice<f32>,
        dk: &mut CudaSlice<f32>,
        dv: &mut CudaSlice<f32>,
    ) {
        // Q, K, V and dO in bf16 for the kernel's asynchronous copies, Q (and K) rotated with tables;
        // Q, dO and delta = rowsum(dO ⊙ O) from one pass over q, out and dout (flash_bwd_prep).
        let nq = sh.batch * sh.q_len * sh.heads * sh.head_dim;
        let mut delta = self.scratch(sh.batch * sh.heads * sh.q_len);
        // SAFETY: flash_bwd_prep writes every value of both before anything reads them.
        let mut qb = ck!(unsafe { self.stream.alloc::<bf16>(nq) }, "alloc");
        let mut db = ck!(unsafe { self.stream.alloc::<bf16>(nq) }, "alloc");
        {
            let prep = if sh.head_dim == 64 { "flash_bwd_prep_hd64" } else { "flash_bwd_prep_hd128" };
            let threads = sh.batch * sh.q_len * sh.heads * (sh.head_dim / 8);
            let cfg = LaunchConfig {
                grid_dim: (threads.div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (b32, q32, h32) = (sh.batch as i32, sh.q_len as i32, sh.heads as i32);
            let mut b = self.stream.launch_builder(self.f(prep));
            b.arg(q).arg(out).arg(dout);
            push_opt(&mut b, rope.map(|r| r.cos));
            push_opt(&mut b, rope.map(|r| r.sin));
            b.arg(&mut qb).arg(&mut db).arg(&mut delta).arg(&b32).arg(&q32).arg(&h32);
            // SAFETY: one row of HD/8 threads per query row, each reading and writing its own row.
            ck!(unsafe { b.launch(cfg) }, prep);
        }
        let (kb, vb) = self.kv_bf16(k, v, rope, sh);
        // dq is accumulated with atomics; dk/dv rows from kv_len on are not written, so they are
        // zeroed only when there are such rows.
        ck!(self.stream.memset_zeros(dq), "memset");
        if sh.kv_len < sh.kv_capacity {
            ck!(self.stream.memset_zeros(dk), "memset");
            ck!(self.stream.memset_zeros(dv), "memset");
        }
        let kernel = if sh.head_dim == 64 { "flash_bwd_hd64" } else { "flash_bwd_hd128" };
        let mut b = self.stream.launch_builder(self.f(kernel));
        b.arg(&qb).arg(&kb).arg(&vb).arg(lse).arg(&delta).arg(&db);
        push_opt(&mut b, seg);
        push_opt(&mut b, rope.map(|r| r.cos));
        push_opt(&mut b, rope.map(|r| r.sin));
        b.arg(&mut *dq).arg(&mut *dk).arg(&mut *dv);
        let g = flash_geom(sh);
        push_geom(&mut b, &g);
        let cfg = LaunchConfig {
            grid_dim: (sh.kv_len.div_ceil(64) as u32, sh.kv_heads as u32, sh.batch as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: flash_bwd_smem(sh.head_dim, rope.is_some()) as u32,
        };
        // SAFETY: the kernel reads its inputs within the geometry, adds into dq (zeroed above) and writes
        // the dk/dv rows below kv_len.
        ck!(unsafe { b.launch(cfg) }, kernel);
    }

    /// The first `n` values of `x` rounded to bf16, in a fresh buffer.
    fn bf16_prefix(&self, x: &CudaSlice<f32>, n: usize) -> CudaSlice<bf16> {
        // SAFETY: the conversion writes all n values before anything reads them.
        let mut out = ck!(unsafe { self.stream.alloc::<bf16>(n.max(1)) }, "alloc");
        let n64 = n as i64;
        launch!(self, "f32_to_bf16", grid_for(n); x, &mut out, &n64);
        out
    }

    /// `x` with inverted dropout applied (the same mask formula as the CPU); `None` when dropout is
    /// off and `x` serves as it is.
    fn dropped(&self, x: &CudaSlice<f32>, d: Dropout) -> Option<CudaSlice<f32>> {
        if !d.is_active() {
            return None;
        }
        let n = x.len();
        let mut out = self.scratch(n);
        let a0 = n as i64;
        launch!(self, "dropout_f32", grid_for(n); x, &mut out, &d.seed, &d.p, &a0);
        Some(out)
    }
}

impl OperandRef<'_> {
    fn as_ref(&self) -> OperandView<'_> {
        match self {
            OperandRef::Borrowed(DenseData::BF16(b)) => OperandView::BF16(b),
            OperandRef::Borrowed(DenseData::F16(b)) => OperandView::F16(b),
            OperandRef::Owned(Operand::F32(x)) => OperandView::F32(x),
            OperandRef::Owned(Operand::F16(x)) => OperandView::F16(x),
            OperandRef::Owned(Operand::BF16(x)) => OperandView::BF16(x),
        }
    }
}

/// A borrowed GEMM operand.
#[derive(Clone, Copy)]
pub enum OperandView<'a> {
    F32(&'a CudaSlice<f32>),
    F16(&'a CudaSlice<f16>),
    BF16(&'a CudaSlice<bf16>),
}

impl<'a> From<&'a Operand> for OperandView<'a> {
    fn from(o: &'a Operand) -> Self {
        match o {
            Operand::F32(x) => OperandView::F32(x),
            Operand::F16(x) => OperandView::F16(x),
            Operand::BF16(x) => OperandView::BF16(x),
        }
    }
}

fn geom(sh: AttnShape) -> [i32; 8] {
    [sh.batch, sh.q_len, sh.kv_len, sh.kv_capacity, sh.heads, sh.kv_heads, sh.head_dim, sh.q_offset].map(|x| x as i32)
}
/// The flash kernels' geometry (kernels/flash.cu, FGEOM_ARGS): head_dim is a template parameter.
fn flash_geom(sh: AttnShape) -> [i32; 7] {
    [sh.batch, sh.q_len, sh.kv_len, sh.kv_capacity, sh.heads, sh.kv_heads, sh.q_offset].map(|x| x as i32)
}
/// `sizeof(BwdSmem<HD>)` of kernels/flash.cu: K, V (64 × (HD+8)), two buffers each of Q and dO
/// (32 × (HD+8)), dS (32 × 72), all bf16; then lse, delta, query segments (2 × 32 each) and key
/// segments (64), 4 bytes each; with RoPE tables, `RopeSmem<HD>` after it.
fn flash_bwd_smem(hd: usize, rope: bool) -> usize {
    let base = 2 * (2 * 64 * (hd + 8) + 2 * 2 * 32 * (hd + 8) + 32 * 72) + 4 * (3 * 2 * 32 + 64);
    // RopeSmem<HD>: cos and sin rows of two query blocks, 32 × (HD/2 + 8) f32 each.
    base + if rope { 2 * 2 * 32 * (hd / 2 + 8) * 4 } else { 0 }
}
fn push_geom<'a, const N: usize>(b: &mut cudarc::driver::LaunchArgs<'a>, g: &'a [i32; N]) {
    for x in g {
        b.arg(x);
    }
}
/// A null device pointer, for a kernel argument the kernel tests before use.
static NULL_PTR: u64 = 0;
/// Pushes an optional buffer, or [`NULL_PTR`] when there is none.
fn push_opt<'a, A>(b: &mut cudarc::driver::LaunchArgs<'a>, s: Option<A>)
where
    cudarc::driver::LaunchArgs<'a>: cudarc::driver::PushKernelArg<A> + cudarc::driver::PushKernelArg<&'static u64>,
{
    use cudarc::driver::PushKernelArg;
    match s {
        Some(s) => {
            PushKernelArg::<A>::arg(b, s);
        }
        None => {
            PushKernelArg::<&u64>::arg(b, &NULL_PTR);
        }
    }
}
/// RMSNorm forward (kernels/norm.cu): a block per row, whose threads hold the row in registers, four
/// float4s each at most (NORM_VEC); 256 threads or more when there are rows enough to fill the GPU,
/// and for a few rows (decoding) a thread per float4, up to 1024, so that a row is read in one round
/// of loads. rmsnorm_f32 and add_rmsnorm_f32 take the same launch, so the fused op gives the composed
/// ops' values bit for bit.
fn norm_launch(rows: usize, dim: usize) -> LaunchConfig {
    let per_thread = if rows < NORM_FEW_ROWS { 4 } else { 16 };
    let floor = if rows < NORM_FEW_ROWS { 32 } else { 256 };
    let threads = dim.div_ceil(per_thread).next_multiple_of(32).clamp(floor, 1024);
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}
/// Rows of W per warp in kernels/lora.cu `gemv_f32_row` (its `lanes_per_row`): a power-of-two group of
/// lanes covers a row's float4s, so B's 64-column rows go two to a warp.
fn lora_rows_per_warp(cols: usize) -> usize {
    if cols % 4 != 0 || cols / 4 >= 32 {
        return 1;
    }
    32 / (cols / 4).next_power_of_two()
}
/// kernels/lora_fused.cu `lora_up` and `lora_up_from_*` over `out (m, n)`: a block per 64 × 64 tile.
fn lora_up_launch(m: usize, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(LORA_UP_TILE) as u32, m.div_ceil(LORA_UP_TILE) as u32, 1),
        block_dim: (LORA_THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}
/// Below this many rows a norm's launch takes a thread per four values ([`norm_launch`]).
const NORM_FEW_ROWS: usize = 64;

fn warp_grid(warps: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((warps * 32).div_ceil(128).max(1) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::kernel_names;

    /// Every kernel a `kernels/*.cu` file declares by a literal name is one `Cuda::new` resolves (a
    /// missing one fails only when it is first launched, on a GPU host); names made by macros (`name`,
    /// `prefix##SUFFIX`, or on the macro's next line) are listed through their name tables and not
    /// seen here.
    #[test]
    fn every_declared_kernel_is_registered_with_its_module() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("kernels/") {
            let path = entry.expect("a kernels/ entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("cu") {
                continue;
            }
            let module = path.file_stem().and_then(|s| s.to_str()).expect("a file name").to_string();
            let src = std::fs::read_to_string(&path).expect("a kernel source");
            for line in src.lines() {
                let Some(rest) = line.split("extern \"C\" __global__ void ").nth(1) else { continue };
                let rest = match rest.strip_prefix("__launch_bounds__(") {
                    Some(r) => r.split_once(')').map_or("", |(_, after)| after).trim_start(),
                    None => rest,
                };
                let name = rest.split('(').next().unwrap_or("").trim();
                let identifier = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !identifier || name == "name" {
                    continue;
                }
                seen += 1;
                assert!(
                    kernel_names(&module).contains(&name),
                    "kernels/{module}.cu declares {name}, which kernel_names(\"{module}\") does not list"
                );
            }
        }
        assert!(seen > 40, "only {seen} kernel declarations found: the scan no longer matches the sources");
    }
}
