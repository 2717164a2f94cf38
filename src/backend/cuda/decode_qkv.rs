//! Decoding's q/k/v after their GEMV, one row of x: each projection's LoRA B product, RoPE of q and
//! k, and k and v appended to the KV cache in one launch (kernels/rope.cu `lora_rope_cache_f32`)
//! where `gemv_f32_many` and `rope_cache_f32` took two. CPU reference:
//! [`qkv_into_cache_composed`](crate::backend::qkv_into_cache_composed).

use std::sync::atomic::Ordering::Relaxed;

use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::{Cuda, CudaWeight};
use crate::backend::LoraDown;

/// Lanes per pair of rows and 16-byte loads per lane and row of B in `lora_rope_cache_f32`
/// (kernels/rope.cu `ROPE_LORA_LANES`, `ROPE_LORA_K`): ranks up to 4 · 8 · 2 = 64.
const ROPE_LORA_LANES: usize = 8;
const ROPE_LORA_K: usize = 2;
const ROPE_LORA_MAX_RANK: usize = 4 * ROPE_LORA_LANES * ROPE_LORA_K;

/// kernels/rope.cu `LoraUp`, field for field: B `(rows, r)` and u `(r)`, or nulls (no branch).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraUp {
    b: u64,
    u: u64,
}

/// kernels/rope.cu `LoraUps` (q, k, v), passed by value.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct LoraUps {
    t: [LoraUp; 3],
}

// SAFETY: plain old data with the layout of the kernel's parameter struct.
unsafe impl cudarc::driver::DeviceRepr for LoraUps {}

impl Cuda {
    /// Turns the fused launch of decoding's LoRA B products with RoPE and the cache appends on or off
    /// (`LLAMATUNE_ROPE_LORA=0`; off: `gemv_f32_many`, then `rope_cache_f32`).
    pub fn set_rope_lora(&self, on: bool) {
        self.rope_lora.store(on, Relaxed);
    }

    /// Whether [`Backend::qkv_into_cache`](crate::backend::Backend::qkv_into_cache) runs fused: one row,
    /// the q/k/v GEMV taking the branches' A products into its launch, a rank of 4k ≤ 64, and the switch on.
    pub fn qkv_into_cache_fuses(
        &self,
        ws: &[&CudaWeight; 3],
        m: usize,
        loras: &[Option<LoraDown<'_, Self>>],
        r: usize,
    ) -> bool {
        m == 1
            && r % 4 == 0
            && r <= ROPE_LORA_MAX_RANK
            && self.rope_lora.load(Relaxed)
            && self.linear_many_lora_shares_launch(ws, m, loras)
    }

    /// The fused [`Backend::qkv_into_cache`](crate::backend::Backend::qkv_into_cache): the q/k/v GEMV with
    /// the A products, then `lora_rope_cache_f32`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn qkv_into_cache_fused(
        &self,
        x: &CudaSlice<f32>,
        ws: [&CudaWeight; 3],
        qkv: [&mut CudaSlice<f32>; 3],
        loras: &mut [Option<LoraDown<'_, Self>>],
        (r, scale): (usize, f32),
        (cos, sin): (&CudaSlice<f32>, &CudaSlice<f32>),
        (heads, kv_heads, head_dim): (usize, usize, usize),
        q_out: &mut CudaSlice<f32>,
        (k_cache, v_cache): (&mut CudaSlice<f32>, &mut CudaSlice<f32>),
        pos: &CudaSlice<f32>,
    ) {
        let [q, k, v] = qkv;
        assert!(
            q.len() == heads * head_dim
                && q_out.len() == q.len()
                && k.len() == kv_heads * head_dim
                && v.len() == k.len()
                && head_dim % 2 == 0
                && cos.len() >= head_dim / 2
                && sin.len() >= head_dim / 2,
            "qkv_into_cache: bad shapes"
        );
        self.gemv_4bit_many_lora_a(x, &ws, &mut [&mut *q, &mut *k, &mut *v], loras, r);
        let _span = self.span("LoRA B + rope_into_cache");
        let mut ups = LoraUps::default();
        let mut guards = Vec::new();
        for (up, lora) in ups.t.iter_mut().zip(loras.iter()) {
            let Some(l) = lora else { continue };
            let (b, gb) = l.b.device_ptr(&self.stream);
            let (u, gu) = l.u.device_ptr(&self.stream);
            *up = LoraUp { b, u };
            guards.extend([gb, gu]);
        }
        let items = (heads + 2 * kv_heads) * head_dim / 2;
        let cfg = LaunchConfig {
            grid_dim: ((items * ROPE_LORA_LANES).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (r32, h32, kv32, hd32) = (r as i32, heads as i32, kv_heads as i32, head_dim as i32);
        let mut b = self.stream.launch_builder(self.f("lora_rope_cache_f32"));
        b.arg(&*q).arg(&*k).arg(&*v).arg(&ups).arg(&scale).arg(&r32).arg(cos).arg(sin);
        b.arg(&mut *q_out).arg(&mut *k_cache).arg(&mut *v_cache).arg(pos).arg(&h32).arg(&kv32).arg(&hd32);
        // SAFETY: each branch's B (rows, r) and u (r) are live buffers whose addresses the guards hold;
        // the kernel reads q, k, v, cos, sin and pos within the shapes checked above, writes q_out and
        // row pos[0] of each cache (the caller's cache holds that row: check_room).
        ck!(unsafe { b.launch(cfg) }, "lora_rope_cache_f32");
        drop(guards);
    }
}
