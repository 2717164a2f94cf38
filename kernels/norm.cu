// RMSNorm forward and input-gradient, one block per row. CPU reference: Cpu::rmsnorm(_backward).
#include "common.cuh"

// Row blockIdx.x of out = x · rstd · w from this thread's share of Σx² (ss): the end of rmsnorm_f32
// and add_rmsnorm_f32. 16-byte accesses when rows allow: one row per block means decoding's single
// row is one block, and its latency is the number of dependent load rounds per thread.
__device__ __forceinline__ void normalize_row(const float* xr, const float* w, float* orow, float* rstd, float ss, int dim, float eps) {
    ss = block_sum(ss);
    const float r = rsqrtf(ss / dim + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    if (dim % 4 == 0)
        for (int j = threadIdx.x; j < dim / 4; j += blockDim.x) {
            const float4 v = reinterpret_cast<const float4*>(xr)[j], g = reinterpret_cast<const float4*>(w)[j];
            reinterpret_cast<float4*>(orow)[j] = make_float4(v.x * r * g.x, v.y * r * g.y, v.z * r * g.z, v.w * r * g.w);
        }
    else
        for (int j = threadIdx.x; j < dim; j += blockDim.x) orow[j] = xr[j] * r * w[j];
}

__device__ __forceinline__ float sum_squares4(float4 v) { return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w; }

// out = x · rstd · w, rstd = (mean x² + eps)^-1/2;  x, out (m, dim); rstd (m)
extern "C" __global__ void rmsnorm_f32(const float* x, const float* w, float* out, float* rstd, int dim, float eps) {
    const int64_t off = (int64_t)blockIdx.x * dim;
    float ss = 0.f;
    if (dim % 4 == 0)
        for (int j = threadIdx.x; j < dim / 4; j += blockDim.x) ss += sum_squares4(reinterpret_cast<const float4*>(x + off)[j]);
    else
        for (int j = threadIdx.x; j < dim; j += blockDim.x) ss += x[off + j] * x[off + j];
    normalize_row(x + off, w, out + off, rstd, ss, dim, eps);
}

// sum = a + b, then out = rmsnorm(sum): a residual add and the norm after it in one pass (decoding
// saves a launch per layer, training a read of the sum). Each thread reads back only the elements it
// wrote, and every value is computed as add_f32 then rmsnorm_f32 compute it, bit for bit.
// a, b, sum, out (m, dim); rstd (m). CPU reference: Backend::add_rmsnorm's default (add, rmsnorm).
extern "C" __global__ void add_rmsnorm_f32(const float* a, const float* b, const float* w, float* sum, float* out, float* rstd, int dim, float eps) {
    const int64_t off = (int64_t)blockIdx.x * dim;
    float ss = 0.f;
    if (dim % 4 == 0)
        for (int j = threadIdx.x; j < dim / 4; j += blockDim.x) {
            const float4 x = reinterpret_cast<const float4*>(a + off)[j], y = reinterpret_cast<const float4*>(b + off)[j];
            const float4 v = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
            reinterpret_cast<float4*>(sum + off)[j] = v;
            ss += sum_squares4(v);
        }
    else
        for (int j = threadIdx.x; j < dim; j += blockDim.x) {
            const float v = a[off + j] + b[off + j];
            sum[off + j] = v;
            ss += v * v;
        }
    normalize_row(sum + off, w, out + off, rstd, ss, dim, eps);
}

// dx (+)= r·(dy·w − x·r²·mean(dy·w·x)); accumulate: added to the gradient already in dx (the residual
// stream's), instead of a separate add_assign pass over it; the sum is rounded once, as that pass did.
extern "C" __global__ void rmsnorm_backward_f32(const float* x, const float* w, const float* rstd, const float* dy, float* dx, int dim, int accumulate) {
    const int64_t off = (int64_t)blockIdx.x * dim;
    const float r = rstd[blockIdx.x];
    float dot = 0.f;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) dot += dy[off + j] * w[j] * x[off + j];
    dot = block_sum(dot) / dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float d = r * (dy[off + j] * w[j] - x[off + j] * r * r * dot);
        dx[off + j] = accumulate ? __fadd_rn(dx[off + j], d) : d;
    }
}
