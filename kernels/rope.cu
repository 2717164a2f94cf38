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

// Decoding's q/k/v after their frozen products and LoRA A products (one row of x: the q/k/v GEMV,
// gemv_4bit_many_lora_*), in one launch where gemv_f32_many and rope_cache_f32 took two: each
// projection's LoRA B product added where it has a branch (y += scale · u·Bᵀ), then rope_cache_f32's
// work. ROPE_LORA_LANES lanes per item, an item being a pair of rows (j, j + head_dim/2) of one head:
// of q (rotated into q_out), k (rotated into the key cache) or v (copied into the value cache), so
// each lane's share of both rows' B products (up to ROPE_LORA_K 16-byte loads per row: r ≤ 64) is
// in registers before the grid wait. B is a parameter the optimizer writes, not a frozen weight,
// but the kernel before this one (the q/k/v GEMV) lets it launch only after its own grid wait, by
// which every kernel before that one, the optimizer's included, has completed. The values are
// gemv_f32_many's then rope_cache_f32's up to the order of each B product's sum. CPU reference:
// Backend::qkv_into_cache's default (linear_many_lora, then rope_into_cache).
#define ROPE_LORA_LANES 8
#define ROPE_LORA_K 2
struct LoraUp {
    const float* b;  // (rows, r); null: no branch
    const float* u;  // (r)
};
struct LoraUps {
    LoraUp t[3];  // q, k, v
};
// q, q_out (heads, head_dim); k, v (kv_heads, head_dim); caches (capacity, kv_heads, head_dim);
// cos, sin (head_dim/2) of the step's position; r % 4 == 0, r ≤ 4 · ROPE_LORA_LANES · ROPE_LORA_K.
extern "C" __global__ void lora_rope_cache_f32(const float* q, const float* k, const float* v, LoraUps ups, float scale, int r, const float* cos_t, const float* sin_t, float* q_out, float* k_cache, float* v_cache, const float* pos, int heads, int kv_heads, int head_dim) {
    const int half = head_dim / 2;
    const int q_items = heads * half, k_items = kv_heads * half, items = q_items + 2 * k_items;
    const int item = (int)((blockIdx.x * blockDim.x + threadIdx.x) / ROPE_LORA_LANES), sub = threadIdx.x % ROPE_LORA_LANES;
    const bool live = item < items;  // whole groups of lanes: a group is live or not together
    const int p = item < q_items ? 0 : item < q_items + k_items ? 1 : 2;
    const int idx = item - (p == 0 ? 0 : p == 1 ? q_items : q_items + k_items);
    const int j = idx % half;
    const int row0 = (idx / half) * head_dim + j, row1 = row0 + half;
    const LoraUp up = p == 0 ? ups.t[0] : p == 1 ? ups.t[1] : ups.t[2];
    const bool lora = live && up.b != nullptr;
    float4 b0[ROPE_LORA_K], b1[ROPE_LORA_K];
#pragma unroll
    for (int i = 0; i < ROPE_LORA_K; i++) {
        const int c = sub + i * ROPE_LORA_LANES;  // this lane's i-th 16-byte column of B's rows
        const bool in = lora && c < r / 4;
        b0[i] = in ? load4(up.b + (int64_t)row0 * r + 4 * c) : make_float4(0.f, 0.f, 0.f, 0.f);
        b1[i] = in ? load4(up.b + (int64_t)row1 * r + 4 * c) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    // pos changes only between steps (see rope_cache_f32).
    const int64_t cache_off = (int64_t)pos[0] * kv_heads * head_dim;
    grid_dependency_wait();
    allow_dependent_launch();  // a few µs of loads and stores: the attention may be placed now
    float d0 = 0.f, d1 = 0.f;
#pragma unroll
    for (int i = 0; i < ROPE_LORA_K; i++) {
        const int c = sub + i * ROPE_LORA_LANES;
        if (lora && c < r / 4) {
            const float4 u = load4(up.u + 4 * c);
            d0 += b0[i].x * u.x + b0[i].y * u.y + b0[i].z * u.z + b0[i].w * u.w;
            d1 += b1[i].x * u.x + b1[i].y * u.y + b1[i].z * u.z + b1[i].w * u.w;
        }
    }
#pragma unroll
    for (int o = ROPE_LORA_LANES / 2; o > 0; o >>= 1) {
        d0 += __shfl_xor_sync(0xffffffffu, d0, o);
        d1 += __shfl_xor_sync(0xffffffffu, d1, o);
    }
    if (!live || sub != 0) return;
    const float* y = p == 0 ? q : p == 1 ? k : v;
    float y0 = y[row0], y1 = y[row1];
    if (lora) y0 += scale * d0, y1 += scale * d1;  // gemv_f32_many's store_dot
    if (p == 2) {
        v_cache[cache_off + row0] = y0;
        v_cache[cache_off + row1] = y1;
        return;
    }
    const float2 rot = rope_pair(y0, y1, cos_t[j], sin_t[j]);
    float* out = p == 0 ? q_out : k_cache + cache_off;
    out[row0] = rot.x;
    out[row1] = rot.y;
}
