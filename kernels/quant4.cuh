// What the 4-bit kernels (nf4.cu: dequantize and decoding GEMVs; nf4_gemm.cu: the fused matmul)
// share: the bitsandbytes block scale lookup and rounding to the 16-bit compute dtype.
#pragma once
#include "common.cuh"
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// The absmax of block `blk`: plain f32, or double-quantized (an 8-bit code over the dynamic map, one
// f32 scale per 256 blocks, plus an offset).
__device__ __forceinline__ float block_absmax(const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, int64_t blk) {
    return absmax_q ? code256[absmax_q[blk]] * absmax2[blk / 256] + offset : absmax[blk];
}
// The same with a 32-bit block index, for the decoding GEMVs' inner loop: unsigned 32-bit arithmetic
// is a third of the address instructions of the signed 64-bit one (SASS, session 39).
__device__ __forceinline__ float block_absmax_u32(const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, uint32_t blk) {
    return absmax_q ? code256[absmax_q[blk]] * absmax2[blk >> 8] + offset : absmax[blk];
}

// v rounded to the compute dtype (0 f32, 1 f16, 2 bf16), kept in an f32.
__device__ __forceinline__ float round_to(float v, int compute) {
    if (compute == 1) return __half2float(__float2half_rn(v));
    if (compute == 2) return __bfloat162float(__float2bfloat16_rn(v));
    return v;
}

// The 16-entry code table in shared memory (the caller synchronizes before use).
__device__ __forceinline__ void load_lut(float* lut, const float* code16) {
    if (threadIdx.x < 16) lut[threadIdx.x] = code16[threadIdx.x];
}

// Two values rounded to the 16-bit compute dtype C (1 f16, 2 bf16), packed as one 32-bit pair
// (lo in the low half, as the tensor-core fragments take them).
template <int C> __device__ __forceinline__ uint32_t pack16(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack16<1>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack16<2>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}
