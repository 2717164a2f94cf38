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

// Lanes that share a row of W in gemv_f32_row: a power of two covering the row's float4s (so a
// 64-column row of B takes 16 lanes and a warp two rows), or the whole warp. Cuda::lora_rows_per_warp
// mirrors it.
__device__ __forceinline__ int lanes_per_row(int cols) {
    if (cols % 4 != 0 || cols / 4 >= WARP) return WARP;
    int g = 1;
    while (g < cols / 4) g <<= 1;
    return g;
}

// y (m, rows) = [y +] alpha · x (m, cols) · Wᵀ for W (rows, cols), m ≤ SMALL_M. A group of lanes per
// row of W (lanes_per_row; `warp` is the warp's index, it takes rows warp·(32/group) onward); lanes
// stride over the columns, so a group reads W's row and x's rows contiguously; x, shared by every
// warp, stays in L1. For the B product (many rows of r columns). A group's sum is the whole warp's
// butterfly with the other lanes' zeros left out, so the values do not depend on the group size.
__device__ __forceinline__ void gemv_f32_row(const float* w, const float* x, float* y, int m, int rows, int cols, float alpha, int accumulate, int warp) {
    const int lane = threadIdx.x % WARP, group = lanes_per_row(cols);
    const int row = warp * (WARP / group) + lane / group, first = lane % group;
    float acc[SMALL_M];
    partial_dots(w + (int64_t)min(row, rows - 1) * cols, x, m, cols, first, group, acc);
#pragma unroll
    for (int j = 0; j < SMALL_M; j++) {
        float s = acc[j];
        for (int o = group / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (first == 0 && j < m && row < rows) store_dot(y, (int64_t)j * rows + row, s, alpha, accumulate);
    }
}
extern "C" __global__ void gemv_f32(const float* w, const float* x, float* y, int m, int rows, int cols, float alpha, int accumulate) {
    gemv_f32_row(w, x, y, m, rows, cols, alpha, accumulate, (blockIdx.x * blockDim.x + threadIdx.x) / WARP);
}

// The same with one block per row of W, its threads splitting the columns: for the A product (r rows
// of in_features columns), where a warp per row left most of the GPU idle (64 warps for a 7B layer,
// each walking 16 KB: ~20 µs per call in decoding's synchronized profile).
__device__ __forceinline__ void gemv_f32_long_row(const float* w, const float* x, float* y, int m, int rows, int cols, float alpha, int accumulate, int row) {
    float acc[SMALL_M];
    partial_dots(w + (int64_t)row * cols, x, m, cols, threadIdx.x, blockDim.x, acc);
#pragma unroll
    for (int j = 0; j < SMALL_M; j++) {
        if (j >= m) break;  // the same j for every thread: block_sum's barriers stay uniform
        const float s = block_sum(acc[j]);
        if (threadIdx.x == 0 && j < m) store_dot(y, (int64_t)j * rows + row, s, alpha, accumulate);
    }
}
extern "C" __global__ void gemv_f32_long_rows(const float* w, const float* x, float* y, int m, int rows, int cols, float alpha, int accumulate) {
    gemv_f32_long_row(w, x, y, m, rows, cols, alpha, accumulate, blockIdx.x);
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
extern "C" __global__ void gemv_f32_many(const GemvF32Targets ts, int m, int cols, float alpha, int accumulate) {
    const GemvF32Target t = block_target(ts.t, ts.count);
    const int warp = (((int)blockIdx.x - t.first_block) * blockDim.x + threadIdx.x) / WARP;
    gemv_f32_row(t.w, t.x, t.y, m, t.rows, cols, alpha, accumulate, warp);
}
extern "C" __global__ void gemv_f32_long_rows_many(const GemvF32Targets ts, int m, int cols, float alpha, int accumulate) {
    const GemvF32Target t = block_target(ts.t, ts.count);
    gemv_f32_long_row(t.w, t.x, t.y, m, t.rows, cols, alpha, accumulate, (int)blockIdx.x - t.first_block);
}
