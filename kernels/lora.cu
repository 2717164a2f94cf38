// The LoRA products of decoding (a few token rows): u = x·Aᵀ, then y += scale·u·Bᵀ, in f32, where a
// cuBLAS GEMM's setup costs more than the work. CPU reference: Cpu::lora_forward (src/backend/cpu.rs);
// the launcher is Cuda::lora_forward. Training shapes go to cuBLAS (TF32).
#include "common.cuh"

#define SMALL_M 8

// Σ_c w[c]·x[j][c] over this thread's share of the columns (stride `step` from `first`), for each
// row j < m of x; 16-byte loads when cols is a multiple of 4.
__device__ __forceinline__ void partial_dots(const float* wr, const float* x, int m, int cols, int first, int step, float (&acc)[SMALL_M]) {
#pragma unroll
    for (int j = 0; j < SMALL_M; j++) acc[j] = 0.f;
    if (cols % 4 == 0) {
        const float4* w4 = reinterpret_cast<const float4*>(wr);
        for (int c = first; c < cols / 4; c += step) {
            const float4 wv = w4[c];
#pragma unroll
            for (int j = 0; j < SMALL_M; j++) {
                if (j >= m) break;
                const float4 xv = reinterpret_cast<const float4*>(x + (int64_t)j * cols)[c];
                acc[j] += wv.x * xv.x + wv.y * xv.y + wv.z * xv.z + wv.w * xv.w;
            }
        }
    } else {
        for (int c = first; c < cols; c += step)
#pragma unroll
            for (int j = 0; j < SMALL_M; j++)
                if (j < m) acc[j] += wr[c] * x[(int64_t)j * cols + c];
    }
}

__device__ __forceinline__ void store_dot(float* y, int64_t idx, float s, float alpha, int accumulate) {
    y[idx] = (accumulate ? y[idx] : 0.f) + alpha * s;
}

// y (m, rows) = [y +] alpha · x (m, cols) · Wᵀ for W (rows, cols), m ≤ SMALL_M. One warp per row of W;
// lanes stride over the columns, so a warp reads W's row and x's rows contiguously; x, shared by every
// warp, stays in L1. For the B product (many rows of r columns).
extern "C" __global__ void gemv_f32(const float* w, const float* x, float* y, int m, int rows, int cols, float alpha, int accumulate) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    float acc[SMALL_M];
    partial_dots(w + (int64_t)row * cols, x, m, cols, lane, WARP, acc);
#pragma unroll
    for (int j = 0; j < SMALL_M; j++) {
        const float s = warp_sum(acc[j]);
        if (lane == 0 && j < m) store_dot(y, (int64_t)j * rows + row, s, alpha, accumulate);
    }
}

// The same with one block per row of W, its threads splitting the columns: for the A product (r rows
// of in_features columns), where a warp per row left most of the GPU idle (64 warps for a 7B layer,
// each walking 16 KB: ~20 µs per call in decoding's synchronized profile).
extern "C" __global__ void gemv_f32_long_rows(const float* w, const float* x, float* y, int m, int rows, int cols, float alpha, int accumulate) {
    const int row = blockIdx.x;
    float acc[SMALL_M];
    partial_dots(w + (int64_t)row * cols, x, m, cols, threadIdx.x, blockDim.x, acc);
#pragma unroll
    for (int j = 0; j < SMALL_M; j++) {
        if (j >= m) break;  // the same j for every thread: block_sum's barriers stay uniform
        const float s = block_sum(acc[j]);
        if (threadIdx.x == 0 && j < m) store_dot(y, (int64_t)j * rows + row, s, alpha, accumulate);
    }
}
