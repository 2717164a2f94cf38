// RMSNorm forward and input-gradient, one block per row. CPU reference: Cpu::rmsnorm(_backward).
#include "common.cuh"

// out = x · rstd · w, rstd = (mean x² + eps)^-1/2;  x, out (m, dim); rstd (m)
extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* out, float* rstd, int dim, float eps) {
    const float* xr = x + (int64_t)blockIdx.x * dim;
    float* orow = out + (int64_t)blockIdx.x * dim;
    float ss = 0.f;
    // 16-byte loads when rows allow: one row per block means decoding's single row is one block, and
    // its latency is the number of dependent load rounds per thread.
    const bool vec = dim % 4 == 0;
    if (vec)
        for (int j = threadIdx.x; j < dim / 4; j += blockDim.x) {
            const float4 v = reinterpret_cast<const float4*>(xr)[j];
            ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
        }
    else
        for (int j = threadIdx.x; j < dim; j += blockDim.x) ss += xr[j] * xr[j];
    ss = block_sum(ss);
    const float r = rsqrtf(ss / dim + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    if (vec)
        for (int j = threadIdx.x; j < dim / 4; j += blockDim.x) {
            const float4 v = reinterpret_cast<const float4*>(xr)[j], g = reinterpret_cast<const float4*>(w)[j];
            reinterpret_cast<float4*>(orow)[j] = make_float4(v.x * r * g.x, v.y * r * g.y, v.z * r * g.z, v.w * r * g.w);
        }
    else
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
