// What both flash forward kernels (flash.cu on mma.sync, flash_fwd_wgmma.cu on wgmma) and the flash
// backward share: the attention geometry, its visibility rule (causal, lengths, segments) and bf16
// packing of score tiles into the next product's A fragments.
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
