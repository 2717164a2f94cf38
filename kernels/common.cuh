// Shared helpers of every kernel: reductions, bf16 conversion, and the seeded dropout mask that the
// CPU reference (src/backend/mod.rs, Dropout::factor) computes bit for bit.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define WARP 32

// Programmatic dependent launch (PDL): decoding's CUDA graph lets a kernel launch before the one before
// it has completed (src/backend/cuda/graph.rs turns the graph's edges between our kernels into
// programmatic ones), so each kernel calls this before it reads anything an earlier kernel wrote or
// writes anything an earlier kernel reads. It returns once the kernels it depends on have finished
// and their writes are visible; outside such a graph (and before sm_90) it returns at once. Only
// data no kernel writes (4-bit weights, absmax, code tables) may be read before it.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// The other half of PDL: lets the kernel after this one in decoding's graph launch once every block
// of this one has called it (or exited), instead of once every block has exited, so its blocks are
// placed and issue their weight loads while this one still runs. Decoding's kernels call it right
// after their grid wait, the LoRA f32 products after their dots (H200, session 36: +6.9% decoding
// when called after each kernel's last large load, +1.9% more right after the wait; the LoRA
// products' moved too, within the spread). The next kernel's grid_dependency_wait() still waits for
// this one to complete, so this changes no value. Without programmatic dependents (training, eager
// launches) it does nothing.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Sum over a warp (T: float, or double for the f64 accumulations); every lane gets it.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets it.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
    __shared__ T s[WARP];
    const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) s[wid] = v;
    __syncthreads();
    v = lane < nw ? s[lane] : T(0);
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v) {
    __shared__ float s[WARP];
    const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) s[wid] = v;
    __syncthreads();
    v = lane < nw ? s[lane] : -INFINITY;
    return warp_max(v);
}

#define LOG2E 1.4426950408889634f
// 2^x by the special-function unit alone (flash attention's softmax, cross_entropy_two_pass). exp2f
// adds a range check and two multiplies to each call so that results under 2^-126 come out
// denormal; here they flush to 0 (no softmax weight needs them), and every other result is the same
// MUFU.EX2 value bit for bit.
__device__ __forceinline__ float exp2_ftz(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// murmur3's 32-bit finalizer.
__device__ __forceinline__ uint32_t mix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    return h ^ (h >> 16);
}
// 32 random bits for element idx of the draw seeded by seed. Same formula as the CPU
// (src/backend/mod.rs, element_hash); the key depends only on the kernel's arguments, so loops hoist it.
__device__ __forceinline__ uint32_t element_hash(uint64_t seed, uint64_t idx) {
    const uint32_t key = mix32((uint32_t)seed ^ mix32((uint32_t)(seed >> 32)));
    return mix32(((uint32_t)idx * 0x9E3779B1u) ^ ((uint32_t)(idx >> 32) * 0x7FEB352Du) ^ key);
}
// Keep element idx with probability 1-p, scaled by 1/(1-p). Neighbours 2i and 2i+1 share the hash of
// pair i, 16 bits each (the low half decides the even one): dropped when those bits fall below p·2¹⁶
// (the CPU's Dropout::factor). dropout_pair_keep takes both decisions of pair i from one hash.
__device__ __forceinline__ uint32_t dropout_threshold(float p) { return (uint32_t)ceilf(p * 65536.f); }
__device__ __forceinline__ float dropout_factor(uint64_t seed, uint64_t idx, float p) {
    if (p <= 0.f) return 1.f;
    const uint32_t h = element_hash(seed, idx >> 1), bits = idx & 1 ? h >> 16 : h & 0xFFFFu;
    return bits < dropout_threshold(p) ? 0.f : 1.f / (1.f - p);
}
// Bits 0 and 1: elements 2i and 2i+1 are kept (p > 0).
__device__ __forceinline__ uint32_t dropout_pair_keep(uint64_t seed, uint64_t pair, float p) {
    const uint32_t h = element_hash(seed, pair), t = dropout_threshold(p);
    return (uint32_t)((h & 0xFFFFu) >= t) | ((uint32_t)((h >> 16) >= t) << 1);
}
// Uniform on [-1, 1) in steps of 2⁻²³ from the hash's top 24 bits, exact in f32 (the CPU's uniform_pm1).
__device__ __forceinline__ float uniform_pm1(uint64_t seed, uint64_t idx) {
    return __fsub_rn(__fmul_rn((float)(element_hash(seed, idx) >> 8), 1.f / 8388608.f), 1.f);
}

// A shared-memory pointer as the 32-bit address cp.async, ldmatrix and wgmma descriptors take.
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// 16 bytes read once, past L1 (read-only, no L1 allocation): the decoding GEMVs' codes (nf4.cu) and
// the read floor they are measured against (read_floor.cu).
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 u;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(u.x), "=r"(u.y), "=r"(u.z), "=r"(u.w) : "l"(p));
    return u;
}

// 16 bytes global → shared without registers; `valid` false fills zeros (src is then not read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0) : "memory");
}
// 4 bytes global → shared (one value per thread: scale words, lse/delta rows); `valid` false fills zeros.
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 4 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// Rotate-half RoPE of one pair (x1 at column j, x2 at j + head_dim/2) by the angle whose cosine and
// sine are c and s (s negated for the inverse): rope.cu's kernels and flash.cu's rotation on load.
__device__ __forceinline__ float2 rope_pair(float x1, float x2, float c, float s) { return make_float2(x1 * c - x2 * s, x2 * c + x1 * s); }
// rope_pair over two or four consecutive columns at once: lo holds columns j.., hi columns
// j + head_dim/2.., rotated in place by the angles' cosines c and sines s of those columns.
__device__ __forceinline__ void rope_pairs(float2& lo, float2& hi, float2 c, float2 s) {
    const float2 a = rope_pair(lo.x, hi.x, c.x, s.x), b = rope_pair(lo.y, hi.y, c.y, s.y);
    lo = make_float2(a.x, b.x);
    hi = make_float2(a.y, b.y);
}
__device__ __forceinline__ void rope_pairs(float4& lo, float4& hi, float4 c, float4 s) {
    const float2 a = rope_pair(lo.x, hi.x, c.x, s.x), b = rope_pair(lo.y, hi.y, c.y, s.y);
    const float2 d = rope_pair(lo.z, hi.z, c.z, s.z), e = rope_pair(lo.w, hi.w, c.w, s.w);
    lo = make_float4(a.x, b.x, d.x, e.x);
    hi = make_float4(a.y, b.y, d.y, e.y);
}

// SwiGLU of one element: silu(g) · u (elementwise.cu's swiglu_f32 and nf4.cu's fused decoding GEMV).
__device__ __forceinline__ float swiglu1(float g, float u) { return g / (1.f + expf(-g)) * u; }

// The target of a several-target launch that owns this block: each target (a struct with a
// `first_block` field) owns the run of blocks from its first_block to the next one's, and the first
// `count` targets are in use. Constant indices only: a runtime index into a kernel's parameter struct
// would copy the struct to local memory. (nf4.cu's several-weight GEMV, lora.cu's LoRA branches.)
template <typename Target, int N>
__device__ __forceinline__ Target block_target(const Target (&targets)[N], int count) {
    Target t = targets[0];
#pragma unroll
    for (int k = 1; k < N; k++)
        if (k < count && (int)blockIdx.x >= targets[k].first_block) t = targets[k];
    return t;
}

// Grid-stride loop over n elements.
#define FOR_EACH(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (int64_t)(n); i += (int64_t)gridDim.x * blockDim.x)

// A grid-stride loop four consecutive elements at a time, for streaming kernels: body4(q) takes
// elements 4q..4q+3 (16-byte f32 accesses), body1(i) one element: the last n % 4, or all of them when
// `vector` is false (a pointer not aligned for the wide accesses). One element per step keeps too few
// bytes in flight: the f32 → bf16 conversion ran at ~2.5 TB/s on the H200 (ncu, 19.5 µs for 48 MB).
template <typename Body4, typename Body1>
__device__ __forceinline__ void for_each4(int64_t n, bool vector, Body4 body4, Body1 body1) {
    const int64_t first = blockIdx.x * (int64_t)blockDim.x + threadIdx.x, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t groups = vector ? n / 4 : 0;
    for (int64_t q = first; q < groups; q += stride) body4(q);
    for (int64_t i = 4 * groups + first; i < n; i += stride) body1(i);
}
__device__ __forceinline__ float4 add4(float4 a, float4 b) { return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w); }
__device__ __forceinline__ bool aligned_to(const void* p, int bytes) { return ((uintptr_t)p & (bytes - 1)) == 0; }
// Four 16-bit values in 8 bytes, each rounded to nearest even as __float2bfloat16_rn / __float2half_rn do.
__device__ __forceinline__ uint2 pack_bf16x4(float4 v) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    return make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
}
__device__ __forceinline__ float4 unpack_bf16x4(uint2 u) {
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}
__device__ __forceinline__ uint2 pack_f16x4(float4 v) {
    const __half2 lo = __floats2half2_rn(v.x, v.y), hi = __floats2half2_rn(v.z, v.w);
    return make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
}
__device__ __forceinline__ float4 unpack_f16x4(uint2 u) {
    const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&u.x));
    const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&u.y));
    return make_float4(lo.x, lo.y, hi.x, hi.y);
}
// f32 or 16-bit values read as f32 and written from f32 (rounded to nearest even): one value, or four
// consecutive ones at a 16-byte (f32) or 8-byte (16-bit) aligned address.
__device__ __forceinline__ float load1(const float* p) { return *p; }
__device__ __forceinline__ float load1(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load1(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store1(float* p, float v) { *p = v; }
__device__ __forceinline__ void store1(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store1(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) { return unpack_bf16x4(*reinterpret_cast<const uint2*>(p)); }
__device__ __forceinline__ float4 load4(const __half* p) { return unpack_f16x4(*reinterpret_cast<const uint2*>(p)); }
__device__ __forceinline__ void store4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void store4(__nv_bfloat16* p, float4 v) { *reinterpret_cast<uint2*>(p) = pack_bf16x4(v); }
__device__ __forceinline__ void store4(__half* p, float4 v) { *reinterpret_cast<uint2*>(p) = pack_f16x4(v); }
