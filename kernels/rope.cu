// Rotary embedding, rotate-half layout, per-row tables; inverse = the backward pass. CPU: Cpu::rope.
#include "common.cuh"

// Pair i (of m · heads · head_dim/2) of x rotated into out, which may start at another row offset
// (out_base: rope_cache_f32 writes into the KV cache).
__device__ __forceinline__ void rotate_pair(const float* x, const float* cos_t, const float* sin_t, float* out, int64_t out_base, int64_t i, int heads, int head_dim, bool inverse) {
    const int half = head_dim / 2;
    const int64_t t = i / ((int64_t)heads * half);
    const int h = (i / half) % heads, j = i % half;
    const float c = cos_t[t * half + j], s = inverse ? -sin_t[t * half + j] : sin_t[t * half + j];
    const int64_t base = (t * heads + h) * head_dim;
    const float2 r = rope_pair(x[base + j], x[base + half + j], c, s);
    out[out_base + base + j] = r.x;
    out[out_base + base + half + j] = r.y;
}

// x, out (m, heads, head_dim); cos, sin (m, head_dim/2)
extern "C" __global__ void rope_f32(const float* x, const float* cos_t, const float* sin_t, float* out, int m, int heads, int head_dim, int inverse) {
    grid_dependency_wait();
    FOR_EACH(i, (int64_t)m * heads * (head_dim / 2)) rotate_pair(x, cos_t, sin_t, out, 0, i, heads, head_dim, inverse);
}

// The rotated k of flash attention's forward and q and k of its backward (Cuda::rope_attention and its
// backward), rounded to bf16 for the kernels' asynchronous copies: rope_f32 then f32_to_bf16 in one
// pass, four pairs per thread (head_dim % 8 = 0). x (rows, heads, head_dim) f32, or (`_from_bf16/f16`)
// a 16-bit product as cuBLAS wrote it (Cuda::qkv_attn_acts: k without a LoRA branch; widening it to
// f32 first gives the same values bit for bit); out the same in bf16; cos, sin (rows, head_dim/2).
template <typename T>
__device__ __forceinline__ void rope_to_bf16(const T* x, const float* cos_t, const float* sin_t, __nv_bfloat16* out, int rows, int heads, int head_dim) {
    const int half = head_dim / 2, quads = half / 4;
    FOR_EACH(i, (int64_t)rows * heads * quads) {
        const int64_t row_head = i / quads, t = row_head / heads;
        const int j = (int)(i % quads) * 4;
        const int64_t base = row_head * head_dim;
        float4 x1 = load4(x + base + j), x2 = load4(x + base + half + j);
        rope_pairs(x1, x2, load4(cos_t + t * half + j), load4(sin_t + t * half + j));
        store4(out + base + j, x1);
        store4(out + base + half + j, x2);
    }
}
#define ROPE_TO_BF16(name, T)                                                                                               \
    extern "C" __global__ void name(const T* x, const float* cos_t, const float* sin_t, __nv_bfloat16* out, int rows, int heads, int head_dim) { \
        grid_dependency_wait();                                                                                              \
        rope_to_bf16(x, cos_t, sin_t, out, rows, heads, head_dim);                                                           \
    }
ROPE_TO_BF16(rope_bf16, float)
ROPE_TO_BF16(rope_bf16_from_bf16, __nv_bfloat16)
ROPE_TO_BF16(rope_bf16_from_f16, __half)

// Decoding after the q/k/v products, in one launch instead of four (each ~3 µs of a ~3.9 ms token
// on the H200): q rotated into q_out, k rotated into the key cache and v copied into the value
// cache, both at row pos[0] (the cache length, held on the device so a recorded step replays at any
// position). The values are rope_f32's and kv_write_f32's, bit for bit. CPU reference:
// Backend::rope_into_cache's default (rope, rope, kv_write, kv_write).
// q, q_out (m, heads, head_dim); k, v (m, kv_heads, head_dim); caches (capacity, kv_heads, head_dim)
extern "C" __global__ void rope_cache_f32(const float* q, const float* k, const float* v, const float* cos_t, const float* sin_t, float* q_out, float* k_cache, float* v_cache, const float* pos, int m, int heads, int kv_heads, int head_dim) {
    // pos changes only between steps (the host's upload, or advance_position_f32 as the previous
    // step's last kernel, in its own graph launch, complete before this one starts), never inside
    // one: read before the wait, so its load overlaps the previous kernel's tail.
    const int64_t cache_off = (int64_t)pos[0] * kv_heads * head_dim;
    grid_dependency_wait();
    allow_dependent_launch();  // a few µs of loads and stores in all: the attention may be placed now
    const int half = head_dim / 2;
    const int64_t q_pairs = (int64_t)m * heads * half, k_pairs = (int64_t)m * kv_heads * half, v_values = (int64_t)m * kv_heads * head_dim;
    FOR_EACH(i, q_pairs + k_pairs + v_values) {
        if (i < q_pairs)
            rotate_pair(q, cos_t, sin_t, q_out, 0, i, heads, head_dim, false);
        else if (i < q_pairs + k_pairs)
            rotate_pair(k, cos_t, sin_t, k_cache, cache_off, i - q_pairs, kv_heads, head_dim, false);
        else
            v_cache[cache_off + (i - q_pairs - k_pairs)] = v[i - q_pairs - k_pairs];
    }
}
