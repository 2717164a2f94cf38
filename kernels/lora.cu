// The LoRA products of decoding (a few token rows): u = x·Aᵀ, then y += scale·u·Bᵀ, in f32, where a
// cuBLAS GEMM's setup costs more than the work. CPU reference: Cpu::lora_forward (src/backend/cpu.rs);
// the launcher is Cuda::lora_forward. Training shapes go to cuBLAS (TF32).
#include "gemv_f32.cuh"

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
    allow_dependent_launch();
#pragma unroll
    for (int j = 0; j < SMALL_M; j++) {
        float s = acc[j];
        for (int o = group / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (first == 0 && j < m && row < rows) store_dot(y, (int64_t)j * rows + row, s, alpha, accumulate);
    }
}
// The two products over up to LORA_MAX_TARGETS branches in one launch each (gemv_f32.cuh's
// GemvF32Targets): u = x·Aᵀ with a block per row of every A (gemv_f32_long_row), y += scale·u·Bᵀ
// with a group of lanes per row of every B; one branch is a launch of one target.
extern "C" __global__ void gemv_f32_many(const GemvF32Targets ts, int m, int cols, float alpha, int accumulate) {
    grid_dependency_wait();
    const GemvF32Target t = block_target(ts.t, ts.count);
    const int warp = (((int)blockIdx.x - t.first_block) * blockDim.x + threadIdx.x) / WARP;
    gemv_f32_row(t.w, t.x, t.y, m, t.rows, cols, alpha, accumulate, warp);
}
extern "C" __global__ void gemv_f32_long_rows_many(const GemvF32Targets ts, int m, int cols, float alpha, int accumulate) {
    grid_dependency_wait();
    const GemvF32Target t = block_target(ts.t, ts.count);
    gemv_f32_long_row(t.w, t.x, t.y, m, t.rows, cols, alpha, accumulate, (int)blockIdx.x - t.first_block);
}
