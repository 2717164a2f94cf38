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

// ---- vectorized paths (n, cols and blocksize multiples of 32) -----------------------------------
// Each thread takes 16 bytes of codes = 32 values, which lie in one absmax block, so one absmax
// lookup and one 16-byte load serve 32 outputs. Same values as the scalar kernels above.
template <typename T> struct Vec8;
template <> struct Vec8<__nv_bfloat16> {
    static __device__ __forceinline__ void store(__nv_bfloat16* p, const float* v) {
        uint4 u;
        __nv_bfloat162 h[4] = {__floats2bfloat162_rn(v[0], v[1]), __floats2bfloat162_rn(v[2], v[3]), __floats2bfloat162_rn(v[4], v[5]), __floats2bfloat162_rn(v[6], v[7])};
        u = *reinterpret_cast<uint4*>(h);
        *reinterpret_cast<uint4*>(p) = u;
    }
};
template <> struct Vec8<__half> {
    static __device__ __forceinline__ void store(__half* p, const float* v) {
        __half2 h[4] = {__floats2half2_rn(v[0], v[1]), __floats2half2_rn(v[2], v[3]), __floats2half2_rn(v[4], v[5]), __floats2half2_rn(v[6], v[7])};
        *reinterpret_cast<uint4*>(p) = *reinterpret_cast<uint4*>(h);
    }
};
template <> struct Vec8<float> {
    static __device__ __forceinline__ void store(float* p, const float* v) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
};

template <typename T>
__device__ void dequant_vec(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, int64_t n, T* out) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = code16[threadIdx.x];
    __syncthreads();
    FOR_EACH(c, n / 32) {
        const uint4 u = reinterpret_cast<const uint4*>(packed)[c];
        const float a = block_absmax(absmax, absmax_q, absmax2, code256, offset, c * 32 / blocksize);
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float v[8];
#pragma unroll
            for (int byte = 0; byte < 4; byte++) {
                const uint32_t b = (w[j] >> (8 * byte)) & 0xffu;
                v[2 * byte] = lut[b >> 4] * a;
                v[2 * byte + 1] = lut[b & 15] * a;
            }
            Vec8<T>::store(out + c * 32 + j * 8, v);
        }
    }
}
#define DEQUANT_VEC(name, T) \
    extern "C" __global__ void name(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, int64_t n, T* out) { \
        dequant_vec<T>(packed, absmax, absmax_q, absmax2, code256, offset, code16, blocksize, n, out); \
    }
DEQUANT_VEC(dequant_4bit_vec_f32, float)
DEQUANT_VEC(dequant_4bit_vec_f16, __half)
DEQUANT_VEC(dequant_4bit_vec_bf16, __nv_bfloat16)

// y (m, rows) = x (m, cols) · dequant(W)ᵀ for m ≤ 8, one warp per row, each lane 32 values per step
// from one 16-byte load of codes (so a warp reads 512 contiguous bytes). Rounding as gemv_4bit_f32.
extern "C" __global__ void gemv_4bit_vec_f32(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, const float* x, float* y, int m, int rows, int cols, int compute) {
    __shared__ float lut[16];
    if (threadIdx.x < 16) lut[threadIdx.x] = code16[threadIdx.x];
    __syncthreads();
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    float acc[GEMV_MAX_M];
#pragma unroll
    for (int j = 0; j < GEMV_MAX_M; j++) acc[j] = 0.f;
    const int64_t chunk0 = (int64_t)row * cols / 32; // 16-byte chunks before this row
    for (int c = lane; c < cols / 32; c += WARP) {
        const uint4 u = reinterpret_cast<const uint4*>(packed)[chunk0 + c];
        const float a = block_absmax(absmax, absmax_q, absmax2, code256, offset, (chunk0 + c) * 32 / blocksize);
        const uint32_t w4[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int q4 = 0; q4 < 4; q4++) {
            float w[8];
#pragma unroll
            for (int byte = 0; byte < 4; byte++) {
                const uint32_t b = (w4[q4] >> (8 * byte)) & 0xffu;
                w[2 * byte] = round_to(lut[b >> 4] * a, compute);
                w[2 * byte + 1] = round_to(lut[b & 15] * a, compute);
            }
            const int col = c * 32 + q4 * 8;
#pragma unroll
            for (int j = 0; j < GEMV_MAX_M; j++) {
                if (j < m) {
                    const float4 x0 = *reinterpret_cast<const float4*>(x + (int64_t)j * cols + col);
                    const float4 x1 = *reinterpret_cast<const float4*>(x + (int64_t)j * cols + col + 4);
                    acc[j] += round_to(x0.x, compute) * w[0] + round_to(x0.y, compute) * w[1] + round_to(x0.z, compute) * w[2] + round_to(x0.w, compute) * w[3] +
                              round_to(x1.x, compute) * w[4] + round_to(x1.y, compute) * w[5] + round_to(x1.z, compute) * w[6] + round_to(x1.w, compute) * w[7];
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < GEMV_MAX_M; j++) {
        const float s = warp_sum(acc[j]);
        if (j < m && lane == 0) y[(int64_t)j * rows + row] = round_to(s, compute);
    }
}
