// The f32 products of decoding's LoRA branches that more than one kernel file runs: lora.cu's own
// launches, and nf4.cu's q/k/v GEMV, which takes the branches' A products into its launch
// (gemv_4bit_many_lora_*). CPU reference: Cpu::lora_forward (src/backend/cpu.rs).
#pragma once
#include "common.cuh"

#define SMALL_M 8

// Σ_c w[c]·x[j][c] over this thread's share of the columns (stride `step` from `first`), for each
// row j < m of x; 16-byte loads when cols is a multiple of 4.
__device__ __forceinline__ void partial_dots(const float* wr, const float* x, int m, int cols, int first, int step, float (&acc)[SMALL_M]) {
#pragma unroll
    for (int j = 0; j < SMALL_M; j++) acc[j] = 0.f;
    if (cols % 4 == 0) {
        const float4* w4 = reinterpret_cast<const float4*>(wr);
        // Unrolled so that four iterations' loads are in flight together (the sums keep their order).
#pragma unroll 4
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

// y (m, rows) = [y +] alpha · x (m, cols) · Wᵀ, row `row` of W by one block whose threads split the
// columns: for the A product (r rows of in_features columns), where a warp per row left most of the GPU idle (64 warps for a 7B layer,
// each walking 16 KB: ~20 µs per call in decoding's synchronized profile).
__device__ __forceinline__ void gemv_f32_long_row(const float* w, const float* x, float* y, int m, int rows, int cols, float alpha, int accumulate, int row) {
    float acc[SMALL_M];
    partial_dots(w + (int64_t)row * cols, x, m, cols, threadIdx.x, blockDim.x, acc);
    allow_dependent_launch();
#pragma unroll
    for (int j = 0; j < SMALL_M; j++) {
        if (j >= m) break;  // the same j for every thread: block_sum's barriers stay uniform
        const float s = block_sum(acc[j]);
        if (threadIdx.x == 0 && j < m) store_dot(y, (int64_t)j * rows + row, s, alpha, accumulate);
    }
}
// Both products for the LoRA branches of up to LORA_MAX_TARGETS projections in one launch each
// (decoding's q and v: Backend::lora_forward_many): each target has its own W, x and y and a run of
// whole blocks from first_block; cols, m, alpha and accumulate are shared. The values are those of
// one launch per target. Why: each launch is ~3 µs of a ~3.8 ms token, and the A product of one
// branch (64 blocks) leaves half of the GPU's SMs idle.
#define LORA_MAX_TARGETS 3
struct GemvF32Target {
    const float* w;
    const float* x;
    float* y;
    int rows;
    int first_block;
};
struct GemvF32Targets {
    GemvF32Target t[LORA_MAX_TARGETS];
    int count;
};
