// RMSNorm forward and input-gradient, one block per row. CPU reference: Cpu::rmsnorm(_backward).
#include "common.cuh"

// out = x · rstd · w, rstd = (mean x² + eps)^-1/2;  x, out (m, dim); rstd (m)
extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* out, float* rstd, int dim, float eps) {
    const float* xr = x + (int64_t)blockIdx.x * dim;
    float* orow = out + (int64_t)blockIdx.x * dim;
    float ss = 0.f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss);
    const float r = rsqrtf(ss / dim + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) orow[j] = xr[j] * r * w[j];
}

// dx = r·(dy·w − x·r²·mean(dy·w·x))
extern "C" __global__ void rmsnorm_backward_f32(const float* x, const float* w, const float* rstd, const float* dy, float* dx, int dim) {
    const int64_t off = (int64_t)blockIdx.x * dim;
    const float r = rstd[blockIdx.x];
    float dot = 0.f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) dot += dy[off + j] * w[j] * x[off + j];
    dot = block_sum(dot) / dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) dx[off + j] = r * (dy[off + j] * w[j] - x[off + j] * r * r * dot);
}
