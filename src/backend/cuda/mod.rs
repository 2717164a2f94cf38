//! The CUDA backend: every op of [`Backend`] as a hand-written kernel from `kernels/*.cu` (compiled by
//! `build.rs`, embedded as fatbins) or a cuBLAS GEMM, on one stream. Activations and trainable
//! parameters are f32 on the device; frozen dense weights are bf16; 4-bit weights stay in the
//! bitsandbytes layout and are read from it by the decoding GEMV and the fused dequant-matmul
//! (kernels/nf4.cu, nf4_gemm.cu), or expanded to the compute dtype right before a cuBLAS GEMM (the
//! second path, which training shapes take). LoRA branches run on kernels/lora_fused.cu.
//! Each launcher names its kernel's file; the CPU reference of every op is in `backend/cpu.rs`.
//! This module holds the device state and the [`Backend`] impl, which dispatches; the launchers sit
//! in one module per kernel family (gemm, quant4, lora, attention, mlp, xent, adamw), frozen weights
//! in weights.rs and the embedded modules' kernel names in kernels.rs.

mod blas;

use super::{
    rope_attention_backward_composed, rope_attention_composed, AdamWStep, AttnShape, Backend, Dropout, HostWeight,
    LinearGradPart, LoraBranch, LoraDown, LoraGrad, RopeTables,
};
use crate::config::ComputeDtype;
use crate::error::{Error, Result};
use crate::quant;
use cudarc::driver::{
    result, CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtrMut, LaunchConfig, PinnedHostSlice,
    PushKernelArg,
};
use half::bf16;
use std::collections::HashMap;
use std::sync::Arc;

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
    /// [`Cuda::set_lora_wide`]: the wide split kernels for A products and dA (`LLAMATUNE_LORA_WIDE=0`:
    /// the narrow ones).
    lora_wide: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_lora_grouped`]: the A products and dA of branches sharing x in one launch
    /// (`LLAMATUNE_LORA_GROUPED=0`: a launch per branch).
    lora_grouped: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_shared_x_dgrad`]: the input gradients of projections sharing x landed in one pass
    /// (`Cuda::linears_in_one_pass`); `LLAMATUNE_SHARED_X_DGRAD=0`: one widening per projection.
    shared_x_dgrad: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_lora_db_bf16`]: LoRA dB from dy's bf16 copy (on unless `LLAMATUNE_LORA_DB_BF16=0`).
    lora_db_bf16: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_o_into_norm`]: the o product added into the residual in its 16-bit dtype
    /// (`Cuda::o_product_in_16_bit`); `LLAMATUNE_O_INTO_NORM=0`: widened first (A/B runs).
    o_into_norm: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_mlp_lora_16`]: an MLP's gate and up products with LoRA branches kept in their
    /// 16-bit compute dtype (`Cuda::mlp_lora_in_16_bit`); `LLAMATUNE_MLP_LORA_16=0`: widened into f32.
    mlp_lora_16: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_residual_16`]: a projection whose only reader is the residual stream added into it
    /// in its 16-bit dtype (`Cuda::residual_in_16_bit`); `LLAMATUNE_RESIDUAL_16=0`: widened first.
    residual_16: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_lora_b_gemm`]: forward LoRA B products past a few rows added into their frozen
    /// products' 16-bit outputs by cuBLAS (`Cuda::lora_b_into_product`); `LLAMATUNE_LORA_B_GEMM=0`: by
    /// the fused kernels (`lora_up_acts_*`, `lora_up_from_*`).
    lora_b_gemm: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_lora_b_concat`]: those of q/k/v along k of the frozen product's GEMM
    /// (`LLAMATUNE_LORA_B_CONCAT=0`: by a second GEMM).
    lora_b_concat: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_gemv_many`]: decoding's products that share one row of x in one launch: q/k/v
    /// (`gemv_4bit_many_*`), gate/up with SwiGLU (`gemv_4bit_swiglu_*`); `LLAMATUNE_GEMV_MANY=0`: a
    /// launch per weight.
    gemv_many: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_gemv_split`]: one-row GEMVs of few rows (a 7B model's o and down) at four rows
    /// per warp with each row's columns split between two warps (`LLAMATUNE_GEMV_SPLIT=0`: two rows
    /// per warp).
    gemv_split: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_rope_lora`]: decoding's LoRA B products of q/k/v in the launch that rotates q and k
    /// and appends k and v to the cache (`LLAMATUNE_ROPE_LORA=0`: two launches).
    rope_lora: std::sync::atomic::AtomicBool,
    /// [`Backend::keep_weight_expansions`]: a replayed layer's 4-bit weight expansions, held for its
    /// input gradients (`LLAMATUNE_KEEP_EXPANDED=0` ignores the hint).
    kept: std::sync::Mutex<gemm::KeptExpansions>,
    /// 16-bit copies of decoding's few activation rows for cuBLAS, kept by (dtype, length) for the
    /// next conversion of that size (`Cuda::convert_small`).
    small_operands: std::sync::Mutex<HashMap<(u8, usize), Vec<gemm::Operand>>>,
    /// [`Cuda::set_dequant_seg`]: 4-bit weights expanded a warp per 1,024 values
    /// (`LLAMATUNE_DEQUANT_SEG=0`: the thread-per-32-values kernel).
    dequant_seg: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_zero_many`]: gradients zeroed in one launch (`LLAMATUNE_ZERO_MANY`).
    zero_many: std::sync::atomic::AtomicBool,
    /// [`Cuda::set_pdl`]: how decoding's graph lets a kernel start while the previous one runs
    /// (`LLAMATUNE_PDL=0|exit|launch`, default exit; off before compute capability 9.0).
    pdl: std::sync::Mutex<graph::Pdl>,
    /// [`Cuda::last_graph_edges`]: of the last captured graph, the edges made programmatic and the
    /// edges between two of our kernels.
    graph_edges: std::sync::Mutex<(usize, usize)>,
    /// The device runs the wgmma kernels (compute capability 9.0, built for sm_90a).
    wgmma: bool,
    /// Streaming multiprocessors (for sizing split-K grids).
    sm_count: usize,
    /// Which of [`XENT_STREAM`]'s kernels this device gives their shared memory (a row of up to
    /// 1024 × 8, 16, 32 logits); `LLAMATUNE_XENT_STREAM=0` turns them off (A/B runs).
    xent_stream: [bool; 3],
    /// The two-pass cross-entropy kernels (`XENT_TWO_PASS`) take the rows no streaming kernel takes
    /// whose vocabulary is a multiple of 4 (past 32,768, or no multiple of 8);
    /// `LLAMATUNE_XENT_TWO_PASS=0` turns them off (16-bit logits of such rows then go through the
    /// composed f32 ops; A/B runs).
    xent_two_pass: bool,
    /// Head size 128's flash forward from bf16 q (the training step's saved attention inputs) and
    /// flash backward run on wgmma (kernels/flash_wgmma.cu) rather than mma.sync (flash.cu); needs
    /// `wgmma`. `LLAMATUNE_FLASH_WGMMA=0` keeps flash.cu's kernels, `=fwd` or `=bwd` takes wgmma for
    /// that direction only; [`Cuda::set_flash_wgmma`] sets them at run time (A/B runs).
    flash_wgmma: [std::sync::atomic::AtomicBool; 2],
    /// Bytes of L2 cache: the two-pass kernels keep the rows in flight within half of it.
    l2_bytes: usize,
    /// The side stream and buffers of offloaded checkpoints (offload.rs).
    offload: offload::OffloadState,
    /// `LLAMATUNE_PROFILE`: device time per op (profile.rs; for finding hot spots).
    profile: Option<profile::Profiler>,
    /// The board's energy counter (energy.rs), opened at the first reading.
    nvml: std::sync::OnceLock<Option<energy::Nvml>>,
    /// Pinned host memory of finished [`Backend::read_later`] copies, for the next ones (greedy
    /// decoding reads a token per step; a pinned allocation costs more than the copy).
    pinned_reads: std::sync::Mutex<Vec<decode_state::PinnedRead>>,
}

impl Drop for Cuda {
    /// Frees the device buffers of offloaded checkpoints once their copies are done, and prints the
    /// profile (`LLAMATUNE_PROFILE`), when the backend goes away.
    fn drop(&mut self) {
        self.release_offloaded();
        if let Some(p) = &self.profile {
            p.print();
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

mod adamw;
mod attention;
mod decode_qkv;
mod decode_state;
mod energy;
mod gemm;
mod graph;
mod kernels;
mod lora;
mod mlp;
mod offload;
mod profile;
mod qkv;
mod quant4;
mod read_floor;
mod residual;
mod shared_x;
mod tma;
mod weights;
mod xent;
use crate::backend::switch_on;
use adamw::AdamHyper;
pub use attention::AttnActs;
use attention::{flash_bwd_smem, flash_wgmma_bwd_smem, FlashQ, FLASH_WGMMA_SMEM};
use gemm::UpTail;
pub use gemm::{Operand, OperandRef, OperandView};
pub use graph::{Pdl, StepGraph};
use lora::{lora_du_smem, SplitKernel, LORA_DOWN, LORA_DU, LORA_MAX_TARGETS};
pub use mlp::MlpActs;
pub use offload::Offloaded;
pub use quant4::{Fused4bit, FUSED_4BIT_MAX_M};
use quant4::{
    GEMM_4BIT, GEMM_4BIT_TILES, GEMV_MANY, GEMV_MANY_LORA, GEMV_MAX_M, GEMV_MAX_X_SMEM, GEMV_ONE_ROW, GEMV_SPLIT,
    GEMV_SWIGLU,
};
pub use weights::{CudaWeight, DenseData, DeviceAbsmax};
use xent::{xent_stream_smem, XentIo, XENT_REG_VALUES, XENT_STREAM};

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
        for (module, bytes) in kernels::embedded::MODULES {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(bytes.to_vec()))
                .map_err(|e| Error::Other(format!("loading kernels/{module}.cu on {device_name}: {e:?}")))?;
            for name in kernels::kernel_names(module) {
                let f = m.load_function(name).map_err(|e| Error::Other(format!("kernel {name}: {e:?}")))?;
                funcs.insert(name.to_string(), f);
            }
        }
        let attr = cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        for (name, hd) in [("flash_bwd_hd64", 64), ("flash_bwd_hd128", 128)] {
            funcs[name].set_attribute(attr, flash_bwd_smem(hd, true) as i32).map_err(dev_err)?;
        }
        for name in GEMV_ONE_ROW.iter().chain(&GEMV_SPLIT).chain(&GEMV_MANY).chain(&GEMV_MANY_LORA).chain(&GEMV_SWIGLU)
        {
            funcs[*name].set_attribute(attr, GEMV_MAX_X_SMEM as i32).map_err(dev_err)?;
        }
        for (name, smem) in SplitKernel::all() {
            funcs[name].set_attribute(attr, smem as i32).map_err(dev_err)?;
        }
        for v in 0..LORA_DOWN.len() {
            for names in LORA_DU {
                funcs[names[v]].set_attribute(attr, lora_du_smem(v) as i32).map_err(dev_err)?;
            }
        }
        // The fused 4-bit matmul needs compute capability 9.0 and sm_90a code (wgmma).
        let compute_capability = ctx.compute_capability().map_err(dev_err)?;
        let wgmma = cfg!(wgmma_kernels) && compute_capability.0 == 9;
        let pdl =
            if graph::pdl_supported(compute_capability) { graph::Pdl::from_env() } else { graph::Pdl::Off }.into();
        let sm_count = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(dev_err)? as usize;
        if wgmma {
            for (i, name) in GEMM_4BIT.iter().enumerate() {
                funcs[*name].set_attribute(attr, GEMM_4BIT_TILES[i / 4].smem as i32).map_err(dev_err)?;
            }
            funcs["flash_fwd_wgmma_hd128"].set_attribute(attr, FLASH_WGMMA_SMEM as i32).map_err(dev_err)?;
            // Its three blocks per SM take ~200 KB: the largest shared-memory carveout, not the
            // driver's pick for one block.
            let carveout =
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT;
            funcs["flash_fwd_wgmma_hd128"].set_attribute(carveout, 100).map_err(dev_err)?;
            funcs["flash_bwd_wgmma_hd128"].set_attribute(attr, flash_wgmma_bwd_smem(true) as i32).map_err(dev_err)?;
        }
        let flash_wgmma = match std::env::var("LLAMATUNE_FLASH_WGMMA").as_deref() {
            Ok("0" | "off") => [false, false],
            Ok("fwd") => [true, false],
            Ok("bwd") => [false, true],
            _ => [true, true],
        }
        .map(|on| (on && wgmma).into());
        let smem_optin = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .map_err(dev_err)? as usize;
        let l2_bytes = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE)
            .map_err(dev_err)? as usize;
        let xent_two_pass = switch_on("LLAMATUNE_XENT_TWO_PASS");
        let stream_on = switch_on("LLAMATUNE_XENT_STREAM");
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
        let profile = profile::ProfileMode::from_env().map(|mode| profile::Profiler::new(mode, stream.clone()));
        let poison = std::env::var("LLAMATUNE_POISON").is_ok_and(|v| v == "1");
        let precise = false.into();
        let fused_4bit = match std::env::var("LLAMATUNE_FUSED_4BIT").as_deref() {
            _ if !wgmma => Fused4bit::Off,
            Ok("off" | "0") => Fused4bit::Off,
            Ok("always") => Fused4bit::Always,
            _ => Fused4bit::Auto,
        };
        let fused_4bit = (fused_4bit as u8).into();
        let fused_lora = switch_on("LLAMATUNE_FUSED_LORA").into();
        let lora_wide = switch_on("LLAMATUNE_LORA_WIDE").into();
        let lora_grouped = switch_on("LLAMATUNE_LORA_GROUPED").into();
        let shared_x_dgrad = switch_on("LLAMATUNE_SHARED_X_DGRAD").into();
        let lora_db_bf16 = switch_on("LLAMATUNE_LORA_DB_BF16").into();
        let o_into_norm = switch_on("LLAMATUNE_O_INTO_NORM").into();
        let mlp_lora_16 = switch_on("LLAMATUNE_MLP_LORA_16").into();
        let residual_16 = switch_on("LLAMATUNE_RESIDUAL_16").into();
        let lora_b_gemm = switch_on("LLAMATUNE_LORA_B_GEMM").into();
        let lora_b_concat = switch_on("LLAMATUNE_LORA_B_CONCAT").into();
        let gemv_many = switch_on("LLAMATUNE_GEMV_MANY").into();
        let gemv_split = switch_on("LLAMATUNE_GEMV_SPLIT").into();
        let rope_lora = switch_on("LLAMATUNE_ROPE_LORA").into();
        let dequant_seg = switch_on("LLAMATUNE_DEQUANT_SEG").into();
        let zero_many = switch_on("LLAMATUNE_ZERO_MANY").into();
        let kept = gemm::KeptExpansions::new(switch_on("LLAMATUNE_KEEP_EXPANDED")).into();
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
            xent_two_pass,
            flash_wgmma,
            l2_bytes,
            offload,
            fused_4bit,
            fused_lora,
            lora_wide,
            lora_grouped,
            shared_x_dgrad,
            lora_db_bf16,
            o_into_norm,
            mlp_lora_16,
            residual_16,
            lora_b_gemm,
            lora_b_concat,
            gemv_many,
            gemv_split,
            rope_lora,
            kept,
            small_operands: Default::default(),
            dequant_seg,
            zero_many,
            pdl,
            graph_edges: Default::default(),
            profile,
            nvml: Default::default(),
            pinned_reads: Default::default(),
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

    /// `sum = a + b`, `out = rmsnorm(sum) · w` by `kernel` (kernels/norm.cu `add_rmsnorm_f32`,
    /// `add_rmsnorm_to_{bf16,f16}` or `add16_rmsnorm_to_{bf16,f16}`: b of type TB, out of type T), a
    /// block per row of `w.len()` values.
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm_launch<TB: cudarc::driver::DeviceRepr, T: cudarc::driver::DeviceRepr>(
        &self,
        kernel: &str,
        a: &CudaSlice<f32>,
        b: &CudaSlice<TB>,
        w: &CudaSlice<f32>,
        eps: f64,
        sum: &mut CudaSlice<f32>,
        out: &mut CudaSlice<T>,
        rstd: &mut CudaSlice<f32>,
    ) {
        let (n, dim) = (a.len(), w.len());
        assert!(
            b.len() == n && sum.len() == n && out.len() == n && n % dim == 0 && rstd.len() == n / dim,
            "add_rmsnorm: bad shapes"
        );
        let (cfg, dim32, eps32) = (norm_launch(n / dim, dim), dim as i32, eps as f32);
        launch!(self, kernel, cfg; a, b, w, &mut *sum, &mut *out, &mut *rstd, &dim32, &eps32);
    }

    /// Times the enclosing op when profiling (`LLAMATUNE_PROFILE`).
    fn span(&self, op: &'static str) -> Option<profile::Span<'_>> {
        self.profile.as_ref().map(|p| p.span(op))
    }

    /// The profile so far: (op, total seconds, calls, inside another timed op), slowest first.
    pub fn profile_report(&self) -> Vec<(&'static str, f64, u64, bool)> {
        self.profile.as_ref().map_or_else(Vec::new, |p| p.report())
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
    fn is_precise(&self) -> bool {
        self.precise.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether head size 128's flash forward from saved bf16 inputs and flash backward run on wgmma
    /// (kernels/flash_wgmma.cu, the default where the device has it) or on flash.cu's mma.sync
    /// kernels; for tests and A/B runs that compare them. Without wgmma they stay off.
    pub fn set_flash_wgmma(&self, forward: bool, backward: bool) {
        for (switch, on) in self.flash_wgmma.iter().zip([forward, backward]) {
            switch.store(on && self.wgmma, std::sync::atomic::Ordering::Relaxed);
        }
    }
    /// See [`Cuda::set_flash_wgmma`]: (forward, backward).
    pub fn uses_flash_wgmma(&self) -> (bool, bool) {
        let on = |i: usize| self.flash_wgmma[i].load(std::sync::atomic::Ordering::Relaxed);
        (on(0), on(1))
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

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;
    type Weight = CudaWeight;
    type HostBuf = PinnedHostSlice<f32>;
    type Recording = graph::StepGraph;
    type Offloaded = Offloaded;
    type MlpActs = MlpActs;
    type AttnActs = AttnActs;
    type PendingRead = decode_state::PendingRead;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.ordinal, self.device_name)
    }
    fn peak_memory(&self) -> Option<u64> {
        Some(self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH))
    }
    fn reserved_memory(&self) -> Option<u64> {
        Some(self.pool_attribute(cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT))
    }
    fn queues_work(&self) -> bool {
        true
    }
    fn energy_joules(&self) -> Option<f64> {
        let nvml = self.nvml.get_or_init(|| energy::Nvml::open(self.ctx.cu_device()));
        nvml.as_ref()?.energy_mj().map(|mj| mj as f64 / 1e3)
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
            p.reset();
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
        CudaWeight::upload(&self.stream, w)
    }
    fn weight_shape(&self, w: &CudaWeight) -> (usize, usize) {
        w.shape()
    }
    fn weight_to_host(&self, w: &CudaWeight) -> HostWeight {
        w.to_host(&self.stream)
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
    fn add_uniform_noise(&self, buf: &mut CudaSlice<f32>, magnitude: f32, seed: u64) {
        let _span = self.span("add_uniform_noise");
        let n = buf.len();
        let n64 = n as i64;
        launch!(self, "add_uniform_noise_f32", grid_for(n); &mut *buf, &magnitude, &seed, &n64);
    }
    fn sum_squares(&self, buf: &CudaSlice<f32>) -> f64 {
        let _span = self.span("sum_squares");
        let mut acc = self.scalar_f64();
        self.add_sum_squares(buf, &mut acc);
        ck!(self.stream.clone_dtoh(&acc), "download")[0]
    }
    fn zero_all(&self, bufs: Vec<&mut CudaSlice<f32>>) {
        self.zero_many(bufs)
    }
    fn sum_squares_all(&self, bufs: &[&CudaSlice<f32>]) -> f64 {
        // Timed under this name by sum_squares_many itself.
        self.sum_squares_many(bufs)
    }
    fn argmax_into(&self, buf: &CudaSlice<f32>, out: &mut CudaSlice<f32>) {
        self.argmax_to(buf, out)
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
        assert_eq!(w.len(), dim, "add_rmsnorm: bad shapes");
        self.add_rmsnorm_launch("add_rmsnorm_f32", a, b, w, eps, sum, out, rstd);
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
        // A thread per NORM_BWD_VEC (kernels/norm.cu) float4s of the row, so the row sits in registers
        // (4096 values: 512 threads); wider rows than 1,024 such threads take the kernel's loops.
        let threads = dim.div_ceil(4 * NORM_BWD_VEC).next_multiple_of(32).clamp(64, 1024);
        let cfg = LaunchConfig { grid_dim: (m as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 };
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
        self.gemv_4bit_many_lora(x, ws, m, outs, loras, r, scale);
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
        self.gemv_4bit_swiglu(x, gate, up, m, out);
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
        self.mlp_gate_up_16(x, gate, up, m, c)
    }
    fn add_rmsnorm_mlp_gate_up(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f64,
        ws: [&CudaWeight; 3],
        m: usize,
        sum: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) -> MlpActs {
        let Some(c) = self.mlp_in_16_bit(ws, m) else {
            return super::add_rmsnorm_mlp_gate_up_composed(self, a, b, w, eps, ws, m, sum, rstd);
        };
        let x16 = self.add_rmsnorm_16(a, OperandView::F32(b), w, eps, sum, rstd, c);
        let _span = self.span("MLP gate and up (16-bit outputs)");
        self.mlp_gate_up_from_16(&x16, ws[0], ws[1], m, c)
    }
    fn linear_add_rmsnorm_mlp_gate_up(
        &self,
        attn: &CudaSlice<f32>,
        wo: &CudaWeight,
        res: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        eps: f64,
        ws: [&CudaWeight; 3],
        m: usize,
        sum: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) -> MlpActs {
        let Some(c) = self.o_product_in_16_bit(wo, ws, m) else {
            return super::linear_add_rmsnorm_mlp_gate_up_composed(self, attn, wo, res, w, eps, ws, m, sum, rstd);
        };
        let o16 = self.linear_16(attn, wo, m, c);
        let x16 = self.add_rmsnorm_16(res, OperandView::from(&o16), w, eps, sum, rstd, c);
        let _span = self.span("MLP gate and up (16-bit outputs)");
        self.mlp_gate_up_from_16(&x16, ws[0], ws[1], m, c)
    }
    fn mlp_acts_len(&self, acts: &MlpActs) -> usize {
        match acts {
            MlpActs::F32 { g, u } => g.len() + u.len(),
            MlpActs::Half { g, u } => g.len() + u.len(),
        }
    }
    fn mlp_gate_up_lora(
        &self,
        x: &CudaSlice<f32>,
        ws: [&CudaWeight; 2],
        m: usize,
        loras: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
    ) -> MlpActs {
        match self.mlp_lora_in_16_bit(ws, m, loras, r) {
            Some(c) => self.mlp_gate_up_lora_16(x, ws, m, loras, (r, scale), c),
            None => super::mlp_gate_up_lora_composed(self, x, ws, m, loras, r, scale),
        }
    }
    fn linear_lora_add_rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        m: usize,
        lora: &mut [Option<LoraDown<'_, Self>>],
        (r, scale): (usize, f32),
        (res, norm_w, eps): (&CudaSlice<f32>, &CudaSlice<f32>, f64),
        sum: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        rstd: &mut CudaSlice<f32>,
    ) {
        match self.residual_in_16_bit(w, m, lora, r) {
            Some(c) => {
                let outs = (sum, out, rstd);
                self.linear_lora_add_rmsnorm_16(x, w, m, lora, (r, scale), (res, norm_w, eps), outs, c);
            }
            None => super::linear_lora_add_rmsnorm_composed(
                self,
                x,
                w,
                m,
                lora,
                (r, scale),
                (res, norm_w, eps),
                sum,
                out,
                rstd,
            ),
        }
    }
    fn linear_lora_add_into(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaWeight,
        m: usize,
        lora: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
        out: &mut CudaSlice<f32>,
    ) {
        match self.residual_in_16_bit(w, m, lora, r) {
            Some(c) => self.linear_lora_add_into_16(x, w, m, lora, (r, scale), out, c),
            None => super::linear_lora_add_into_composed(self, x, w, m, lora, r, scale, out),
        }
    }
    fn mlp_acts_from_f32(&self, g: CudaSlice<f32>, u: CudaSlice<f32>) -> MlpActs {
        MlpActs::F32 { g, u }
    }
    fn mlp_swiglu(&self, acts: &MlpActs, out: &mut CudaSlice<f32>) {
        match acts {
            MlpActs::F32 { g, u } => self.swiglu(g, u, out),
            MlpActs::Half { g, u } => self.swiglu_16_to_f32((g, u), out),
        }
    }
    fn mlp_swiglu_backward(
        &self,
        acts: &MlpActs,
        dout: &CudaSlice<f32>,
        dgate: &mut CudaSlice<f32>,
        dup: &mut CudaSlice<f32>,
    ) {
        match acts {
            MlpActs::F32 { g, u } => self.swiglu_backward(g, u, dout, dgate, dup),
            MlpActs::Half { g, u } => self.swiglu_backward_16_f32((g, u), dout, dgate, dup),
        }
    }
    fn mlp_down(&self, acts: &MlpActs, down: &CudaWeight, m: usize, out: &mut CudaSlice<f32>, accumulate: bool) {
        let (g, u) = match acts {
            MlpActs::F32 { g, u } => return super::mlp_down_composed(self, (g, u), down, m, out, accumulate),
            MlpActs::Half { g, u } => (g, u),
        };
        self.mlp_down_16((g, u), down, m, out, accumulate);
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
        self.mlp_backward_16(dy, (g, u), [gate, up, down], m, dx, accumulate);
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
        self.dgrad_gemm(dy, None, w, m, dx, accumulate, None);
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
        // du's kernel also rounds dy for the input gradient's GEMM where a 4-bit weight's product takes
        // it in 16 bits, saving that conversion its own pass over dy.
        let mut dy16 = match w {
            CudaWeight::Quant4 { compute: c @ (ComputeDtype::BF16 | ComputeDtype::F16), .. } => {
                Some(self.alloc_16(m * rows, *c))
            }
            _ => None,
        };
        let du = self.lora_weight_grads(x, b, u, dy, (m, r, scale), dropout, da, db, dy16.as_mut());
        // dx (+)= dy · W + drop'(du · A): the branch's term added as the product's gradient is widened.
        let up = UpTail { u: &du, w: a, w_is_rn: true, r, alpha: 1.0, dropout };
        self.dgrad_gemm(dy, dy16, w, m, dx, accumulate, Some(up));
    }

    fn linears_backward_input(
        &self,
        parts: Vec<LinearGradPart<'_, Self>>,
        m: usize,
        dx: &mut CudaSlice<f32>,
        accumulate: bool,
        r: usize,
        scale: f32,
    ) {
        match self.linears_in_one_pass(&parts, m, r) {
            Some(c) => self.linears_backward_input_one_pass(parts, m, dx, accumulate, r, scale, c),
            None => super::linears_backward_input_composed(self, parts, m, dx, accumulate, r, scale),
        }
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
        if m <= GEMV_MAX_M && !dropout.is_active() {
            // Decoding: two f32 products (kernels/lora.cu) instead of two GEMMs, as lora_forward_many
            // runs them for one branch.
            return self.lora_forward_many(x, &mut [LoraBranch { a, b, dropout, u, u_ready: false, y }], m, r, scale);
        }
        self.lora_a_product(x, a, m, r, dropout, u);
        self.lora_b_forward(u, b, m, r, scale, y);
    }
    fn lora_b_forward(
        &self,
        u: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        m: usize,
        r: usize,
        scale: f32,
        y: &mut CudaSlice<f32>,
    ) {
        let rows = b.len() / r;
        if self.uses_fused_lora_up(rows, r) {
            // y (m, rows) += scale · u · Bᵀ (kernels/lora_fused.cu).
            self.lora_up(u, b, false, m, rows, r, scale, Dropout::NONE, y);
            return;
        }
        self.lora_b_product_cublas(u, b, m, rows, r, scale, y);
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
            && branches.iter().all(|br| !br.dropout.is_active() && !br.u_ready);
        if !shared {
            return super::lora_forward_each(self, x, branches, m, r, scale);
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
            let du = self.lora_weight_grads(x, b, u, dy, (m, r, scale), dropout, da, db, None);
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

    fn qkv_into_cache(
        &self,
        x: &CudaSlice<f32>,
        ws: [&CudaWeight; 3],
        m: usize,
        qkv: [&mut CudaSlice<f32>; 3],
        loras: &mut [Option<LoraDown<'_, Self>>],
        lora: (usize, f32),
        rope: (&CudaSlice<f32>, &CudaSlice<f32>),
        dims: (usize, usize, usize),
        q_out: &mut CudaSlice<f32>,
        cache: (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        pos: &CudaSlice<f32>,
    ) {
        if !self.qkv_into_cache_fuses(&ws, m, loras, lora.0) {
            return super::qkv_into_cache_composed(self, x, ws, m, qkv, loras, lora, rope, dims, q_out, cache, pos);
        }
        self.qkv_into_cache_fused(x, ws, qkv, loras, lora, rope, dims, q_out, cache, pos);
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
        let seg = self.segments_on_device(segments);
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
        let seg = self.segments_on_device(segments);
        if self.flash(&sh) {
            return self.flash_backward(q, k, v, None, out, lse, dout, sh, seg.as_ref(), dq, dk, dv);
        }
        self.attention_split_backward(q, k, v, out, lse, dout, sh, seg.as_ref(), dq, dk, dv);
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
        let seg = self.segments_on_device(segments);
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
        let seg = self.segments_on_device(segments);
        self.flash_backward(q, k, v, Some(rope), out, lse, dout, sh, seg.as_ref(), dq, dk, dv);
    }

    fn qkv_attn_acts(
        &self,
        x: &CudaSlice<f32>,
        ws: &[&CudaWeight],
        m: usize,
        loras: &mut [Option<LoraDown<'_, Self>>],
        r: usize,
        scale: f32,
        rope: RopeTables<'_, Self>,
        sh: AttnShape,
    ) -> AttnActs {
        match self.qkv_direct(ws, m, loras, r, &sh) {
            Some(c) => self.qkv_attn_acts_direct(x, ws, m, loras, (r, scale), rope, sh, c),
            None => super::qkv_attn_acts_composed(self, x, ws, m, loras, r, scale, rope, sh),
        }
    }
    fn attn_acts(
        &self,
        q: CudaSlice<f32>,
        k: CudaSlice<f32>,
        v: CudaSlice<f32>,
        rope: RopeTables<'_, Self>,
        sh: AttnShape,
    ) -> AttnActs {
        self.saved_attention_inputs([q, k, v], rope, sh)
    }
    fn attn_acts_len(&self, acts: &AttnActs) -> usize {
        match acts {
            AttnActs::F32 { q, k, v } => q.len() + k.len() + v.len(),
            AttnActs::Bf16 { q, k, v } => q.len() + k.len() + v.len(),
        }
    }
    fn rope_attention_acts(
        &self,
        acts: &AttnActs,
        rope: RopeTables<'_, Self>,
        sh: AttnShape,
        segments: Option<&[u32]>,
        out: &mut CudaSlice<f32>,
        lse: &mut CudaSlice<f32>,
    ) {
        let (q, k, v) = match acts {
            AttnActs::F32 { q, k, v } => return self.rope_attention(q, k, v, rope, sh, segments, out, lse),
            AttnActs::Bf16 { q, k, v } => (q, k, v),
        };
        let _span = self.span("attention (saved bf16 inputs)");
        let seg = self.segments_on_device(segments);
        self.flash_forward_launch(FlashQ::Bf16(q), (k, v), sh, seg.as_ref(), out, lse);
    }
    fn rope_attention_acts_backward(
        &self,
        acts: &AttnActs,
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
        let (q, k, v) = match acts {
            AttnActs::F32 { q, k, v } => {
                return self.rope_attention_backward(q, k, v, rope, out, lse, dout, sh, segments, dq, dk, dv);
            }
            AttnActs::Bf16 { q, k, v } => (q, k, v),
        };
        let _span = self.span("attention_backward (saved bf16 inputs)");
        let seg = self.segments_on_device(segments);
        // Q is already in bf16: the prep pass reads only out and dout.
        let (delta, db) = self.flash_bwd_prep(None, None, out, dout, sh, dq);
        self.flash_backward_launch((q, k, v), Some(rope), (lse, &delta, &db), sh, seg.as_ref(), (dq, dk, dv));
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
        let (vocab, _) = head.shape();
        // A 16-bit dense head, run as transformers runs a bf16 one: its GEMM writes the logits in
        // the head's dtype, the loss kernel reads them and writes dlogits in that dtype for the
        // input-gradient GEMM (4 bytes per logit, where f32 logits and f32 dlogits took 8 + 8 and a
        // conversion). With or without a backward pass, so that a batch's evaluation loss is its
        // training loss. Otherwise (4-bit or precise heads, vocabularies no kernel takes in 16 bits):
        // the composed ops on f32 logits.
        let sixteen_bit = matches!(head, CudaWeight::Dense { .. }) && !self.is_precise();
        if !sixteen_bit || !self.xent_takes_16_bit(vocab) {
            return super::lm_head_cross_entropy_composed(self, x, head, targets, scale, dx);
        }
        self.lm_head_cross_entropy_16(x, head, targets, scale, dx)
    }

    fn free_memory(&self) -> Option<u64> {
        self.ctx.mem_get_info().ok().map(|(free, _)| free as u64)
    }

    fn upload_into(&self, host: &[f32], dst: &mut CudaSlice<f32>) {
        let _span = self.span("upload_into");
        ck!(self.stream.memcpy_htod(host, &mut dst.slice_mut(0..host.len())), "upload");
    }
    fn decode_inputs_at(
        &self,
        table: &CudaWeight,
        token: &CudaSlice<f32>,
        pos: &CudaSlice<f32>,
        cos_table: &CudaSlice<f32>,
        sin_table: &CudaSlice<f32>,
        h: &mut CudaSlice<f32>,
        cos: &mut CudaSlice<f32>,
        sin: &mut CudaSlice<f32>,
    ) {
        self.inputs_at(table, token, pos, (cos_table, sin_table), h, cos, sin)
    }
    fn advance_position(&self, pos: &mut CudaSlice<f32>) {
        self.advance(pos)
    }
    fn read_later(&self, buf: &CudaSlice<f32>) -> decode_state::PendingRead {
        self.start_read(buf)
    }
    fn read_wait(&self, pending: decode_state::PendingRead) -> Vec<f32> {
        self.finish_read(pending)
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
    fn record(&self, f: &mut dyn FnMut()) -> Option<graph::StepGraph> {
        if self.profile.is_some() || std::env::var("LLAMATUNE_CUDA_GRAPHS").is_ok_and(|v| v == "0") {
            return None;
        }
        // A driver that cannot capture or instantiate the step costs speed, not the answer: nothing
        // captured has run, so the caller runs the step op by op instead.
        self.capture_step(f)
    }
    fn replay(&self, r: &graph::StepGraph) {
        let _span = self.span("replay");
        ck!(self.launch_step(r), "graph launch");
    }
    fn keep_weight_expansions(&self, on: bool) {
        self.keep_expansions(on);
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
        self.adamw_paged_chunks(param, grad, m, v, hp, chunk);
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
        self.adamw_many(params, grads, m, v, hp);
    }
}

impl Cuda {
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

    /// How many ways to split a reduction so that `tiles` output tiles × splits fill, in one wave, the
    /// GPU's `blocks_per_sm` block slots per SM: at least 1, at most `max_splits` (shared by the split-K
    /// kernels: kernels/nf4_gemm.cu, kernels/lora_fused.cu).
    fn splits_to_fill(&self, tiles: usize, blocks_per_sm: usize, max_splits: usize) -> usize {
        (self.sm_count * blocks_per_sm / tiles.max(1)).clamp(1, max_splits.max(1))
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
/// Float4s of a row per thread in `rmsnorm_backward_f32` (kernels/norm.cu `NORM_BWD_VEC`).
const NORM_BWD_VEC: usize = 2;
/// Below this many rows a norm's launch takes a thread per four values ([`norm_launch`]).
const NORM_FEW_ROWS: usize = 64;
