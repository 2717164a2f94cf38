// 4-bit (NF4/FP4, bitsandbytes layout) dequantization to the matmul's compute dtype: element 2j in
// the high nibble, one absmax per block, optionally double-quantized (8-bit codes over the dynamic
// map, one f32 scale per 256 blocks, plus an offset). CPU reference: Quant4::dequantize (src/quant.rs).
#include "common.cuh"
#include <cuda_fp16.h>

__device__ __forceinline__ float block_absmax(const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, int64_t blk) {
    return absmax_q ? code256[absmax_q[blk]] * absmax2[blk / 256] + offset : absmax[blk];
}

template <typename T> __device__ __forceinline__ T to_t(float x);
template <> __device__ __forceinline__ float to_t<float>(float x) { return x; }
template <> __device__ __forceinline__ __half to_t<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 to_t<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// out (n) = code16[nibble] * absmax[block]; each thread expands one byte (two values).
template <typename T>
__device__ void dequant(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, int64_t n, T* out) {
    FOR_EACH(i, (n + 1) / 2) {
        const uint8_t b = packed[i];
        const int64_t e = 2 * i;
        const float a0 = block_absmax(absmax, absmax_q, absmax2, code256, offset, e / blocksize);
        out[e] = to_t<T>(code16[b >> 4] * a0);
        if (e + 1 < n) {
            const float a1 = block_absmax(absmax, absmax_q, absmax2, code256, offset, (e + 1) / blocksize);
            out[e + 1] = to_t<T>(code16[b & 15] * a1);
        }
    }
}

#define DEQUANT(name, T) \
    extern "C" __global__ void name(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, int64_t n, T* out) { \
        dequant<T>(packed, absmax, absmax_q, absmax2, code256, offset, code16, blocksize, n, out); \
    }
DEQUANT(dequant_4bit_f32, float)
DEQUANT(dequant_4bit_f16, __half)
DEQUANT(dequant_4bit_bf16, __nv_bfloat16)

extern "C" __global__ void f32_to_f16(const float* x, __half* out, int64_t n) {
    FOR_EACH(i, n) out[i] = __float2half_rn(x[i]);
}

// Small-M product for decoding: y (m, rows) = x (m, cols) · dequant(W)ᵀ with m ≤ 8, reading the 4-bit
// codes directly (0.5 byte per weight instead of expanding W first). One warp per output row; values
// and the output are rounded to the compute dtype (0 f32, 1 f16, 2 bf16) as the dequantize + GEMM path
// does, and accumulated in f32. CPU reference: Cpu::linear with a 4-bit weight.
__device__ __forceinline__ float round_to(float v, int compute) {
    if (compute == 1) return __half2float(__float2half_rn(v));
    if (compute == 2) return __bfloat162float(__float2bfloat16_rn(v));
    return v;
}

#define GEMV_MAX_M 8
extern "C" __global__ void gemv_4bit_f32(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, const float* x, float* y, int m, int rows, int cols, int compute) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = code16[threadIdx.x];
    __syncthreads();
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int j = 0; j < GEMV_MAX_M; j++) acc[j] = 0.f;
    const int64_t base = (int64_t)row * cols;
    for (int c = lane; c < cols; c += WARP) {
        const int64_t e = base + c;
        const uint8_t b = packed[e >> 1];
        const int q = (e & 1) ? (b & 15) : (b >> 4);
        const float w = round_to(lut[q] * block_absmax(absmax, absmax_q, absmax2, code256, offset, e / blocksize), compute);
#pragma unroll
        for (int j = 0; j < GEMV_MAX_M; j++)
            if (j < m) acc[j] += round_to(x[(int64_t)j * cols + c], compute) * w;
    }
#pragma unroll
    for (int j = 0; j < GEMV_MAX_M; j++) {
        const float s = warp_sum(acc[j]);
        if (j < m && lane == 0) y[(int64_t)j * rows + row] = round_to(s, compute);
    }
}
