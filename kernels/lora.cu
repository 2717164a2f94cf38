// The LoRA products of decoding (a few token rows): u = x·Aᵀ, then y += scale·u·Bᵀ, in f32, where a
// cuBLAS GEMM's setup costs more than the work. CPU reference: Cpu::lora_forward (src/backend/cpu.rs);
// the launcher is Cuda::lora_forward. Training shapes go to cuBLAS (TF32).
#include "common.cuh"

#define SMALL_M 8

// y (m, rows) = [y +] alpha · x (m, cols) · Wᵀ for W (rows, cols), m ≤ SMALL_M. One warp per row of W;
// lanes stride over the columns (16-byte loads when cols is a multiple of 4), so a warp reads W's row
// and x's rows contiguously; x, shared by every warp, stays in L1.
extern "C" __global__ void gemv_f32(const float* w, const float* x, float* y, int m, int rows, int cols, float alpha, int accumulate) {
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    float acc[SMALL_M];
#pragma unroll
    for (int j = 0; j < SMALL_M; j++) acc[j] = 0.f;
    const float* wr = w + (int64_t)row * cols;
    if (cols % 4 == 0) {
        const float4* w4 = reinterpret_cast<const float4*>(wr);
        for (int c = lane; c < cols / 4; c += WARP) {
            const float4 wv = w4[c];
#pragma unroll
            for (int j = 0; j < SMALL_M; j++) {
                if (j >= m) break;
                const float4 xv = reinterpret_cast<const float4*>(x + (int64_t)j * cols)[c];
                acc[j] += wv.x * xv.x + wv.y * xv.y + wv.z * xv.z + wv.w * xv.w;
            }
        }
    } else {
        for (int c = lane; c < cols; c += WARP)
#pragma unroll
            for (int j = 0; j < SMALL_M; j++)
                if (j < m) acc[j] += wr[c] * x[(int64_t)j * cols + c];
    }
#pragma unroll
    for (int j = 0; j < SMALL_M; j++) {
        const float s = warp_sum(acc[j]);
        if (lane == 0 && j < m) {
            float* o = y + (int64_t)j * rows + row;
            *o = (accumulate ? *o : 0.f) + alpha * s;
        }
    }
}
