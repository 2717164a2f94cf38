// What the flash kernels (flash.cu on mma.sync, flash_wgmma.cu on wgmma) share: the attention
// geometry, its visibility rule (causal, lengths, segments), bf16 packing of score tiles into the next
// product's A fragments, the forward's output stores, and the backward's dQ reductions and RoPE inverse.
#pragma once
#include "common.cuh"

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

#define LN2 0.6931471805599453f

struct FGeom {
    int batch, q_len, kv_len, kv_cap, heads, kv_heads, q_offset;
};
#define FGEOM_ARGS int batch, int q_len, int kv_len, int kv_cap, int heads, int kv_heads, int q_offset
#define MAKE_FGEOM FGeom g{batch, q_len, kv_len, kv_cap, heads, kv_heads, q_offset}

// Segment id of position `pos` of batch row b (1 when there are no segments; 0 = padding).
__device__ __forceinline__ uint32_t seg_of(const uint32_t* seg, const FGeom& g, int b, int pos) {
    return seg ? seg[(int64_t)b * g.kv_cap + pos] : 1u;
}
// Query t (segment qs) sees key s (segment ks)?
__device__ __forceinline__ bool sees(const FGeom& g, int t, uint32_t qs, int s, uint32_t ks) {
    return t < g.q_len && s < g.kv_len && s <= g.q_offset + t && qs != 0 && ks == qs;
}
// A forward block's end, per thread: its two rows' sums l0, l1 (each spread over a quad) added up,
// O's rows r0 and r1 divided by them into out (value (j, e) of `o_at`: column 8j + 2·t4 + e % 2 of row
// r0 for e < 2, of r1 otherwise: mma's C fragment layout, which wgmma's accumulators share) and their
// lse (natural log; running max m in log2 units) from the quad's first lane; rows from q_len on are not
// written.
template <int HD, typename OAt>
__device__ __forceinline__ void flash_fwd_store(OAt o_at, float m0, float m1, float l0, float l1, const FGeom& g, int b, int h, int r0, int r1, int t4, float* out, float* lse) {
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    if (r0 < g.q_len) {
        float* po = out + (((int64_t)b * g.q_len + r0) * g.heads + h) * HD;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) *reinterpret_cast<float2*>(po + j * 8 + 2 * t4) = make_float2(o_at(j, 0) * i0, o_at(j, 1) * i0);
        if (t4 == 0) lse[((int64_t)b * g.heads + h) * g.q_len + r0] = l0 > 0.f ? m0 * LN2 + logf(l0) : -INFINITY;
    }
    if (r1 < g.q_len) {
        float* po = out + (((int64_t)b * g.q_len + r1) * g.heads + h) * HD;
#pragma unroll
        for (int j = 0; j < HD / 8; j++) *reinterpret_cast<float2*>(po + j * 8 + 2 * t4) = make_float2(o_at(j, 2) * i1, o_at(j, 3) * i1);
        if (t4 == 0) lse[((int64_t)b * g.heads + h) * g.q_len + r1] = l1 > 0.f ? m1 * LN2 + logf(l1) : -INFINITY;
    }
}
// *p += v.x, *(p + 1) += v.y atomically (p 8-byte aligned): one vector reduction on sm_90, half the
// atomic operations of two scalar ones.
__device__ __forceinline__ void red_add2(float* p, float2 v) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(v.x), "f"(v.y) : "memory");
#else
    atomicAdd(p, v.x);
    atomicAdd(p + 1, v.y);
#endif
}
// *p .. *(p + 3) += v atomically (p 16-byte aligned): one vector reduction on sm_90.
__device__ __forceinline__ void red_add4(float* p, float4 v) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
#else
    red_add2(p, make_float2(v.x, v.y));
    red_add2(p + 2, make_float2(v.z, v.w));
#endif
}
// Rotates a gradient pair back (RoPE's inverse: the angle negated): lo, hi are columns j and j + HD/2,
// c and sn the angle's cosines and sines at j, j + 1; `unrotate` reads them from table row `row` when
// there are tables.
__device__ __forceinline__ void unrotate_by(float2 c, float2 sn, float2& lo, float2& hi) { rope_pairs(lo, hi, c, make_float2(-sn.x, -sn.y)); }
template <int HD>
__device__ __forceinline__ void unrotate(const float* cos_t, const float* sin_t, int64_t row, int j, float2& lo, float2& hi) {
    if (!cos_t) return;
    const int64_t ti = row * (HD / 2) + j;
    unrotate_by(*reinterpret_cast<const float2*>(cos_t + ti), *reinterpret_cast<const float2*>(sin_t + ti), lo, hi);
}
// A backward block walks every (head of the GQA group, query block) pair that can see its keys: rep
// heads share K/V head grp, and nq query blocks from qb0 (the first that can see the block's first
// key). Step it is head h and query block qb, with qbase the offset of (b, query 0, head h) in q, dout
// and dq; with one head per K/V head (no GQA) without the division.
struct FlashBwdStep {
    int h, qb;
    int64_t qbase;
};
template <int HD>
__device__ __forceinline__ FlashBwdStep flash_bwd_step(const FGeom& g, int b, int grp, int rep, int qb0, int nq, int it) {
    const int hi = rep == 1 ? 0 : it / nq, h = grp * rep + hi;
    return FlashBwdStep{h, qb0 + it - hi * nq, (int64_t)b * g.q_len * g.heads * HD + (int64_t)h * HD};
}
