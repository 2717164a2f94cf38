// RMSNorm forward and input-gradient, one block per row. CPU reference: Cpu::rmsnorm(_backward).
#include "common.cuh"

// Float4s of a row each thread holds in registers: rows up to NORM_VEC · 4 · blockDim.x values are
// read once, with every load issued before the first use (a loop that stored the sum between its
// loads waited on one load round per iteration: decoding's single row is one block, so its time is
// those rounds); odd rows take the loops below. The launcher (norm_launch) gives every row of up to
// 16384 values enough threads, at most 1024, hence 64 registers.
#define NORM_VEC 4

__device__ __forceinline__ float round_to(float v, float*) { return v; }
__device__ __forceinline__ __nv_bfloat16 round_to(float v, __nv_bfloat16*) { return __float2bfloat16_rn(v); }
__device__ __forceinline__ __half round_to(float v, __half*) { return __float2half_rn(v); }

// Row blockIdx.x of out = rmsnorm(a [+ b]) · w, with sum = a + b stored when ADD (b, sum unused
// otherwise). Every value is computed as add_f32 then rmsnorm_f32 compute it, bit for bit: the
// same Σx² per thread in column order, the same block_sum for one block size. Out of type TO: f32,
// or rounded to bf16/f16 as f32_to_bf16/f16 would round the f32 output (the same rounding, bit for bit).
// b of type TB: f32, or a 16-bit product's output read as the f32 its widening would have written
// (load1/load4 of common.cuh: exact).
template <bool ADD, typename TB, typename TO>
__device__ __forceinline__ void norm_row(const float* a, const TB* b, const float* w, float* sum, TO* out, float* rstd, int dim, float eps) {
    const int64_t off = (int64_t)blockIdx.x * dim;
    const float* x = ADD ? sum + off : a + off;  // the row the norm reads back (odd sizes)
    float ss = 0.f;
    if (dim % 4 == 0 && dim / 4 <= NORM_VEC * (int)blockDim.x) {
        const float4* a4 = reinterpret_cast<const float4*>(a + off);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        float4 v[NORM_VEC], g[NORM_VEC];
#pragma unroll
        for (int i = 0; i < NORM_VEC; i++) {
            const int j = threadIdx.x + i * blockDim.x;
            if (j < dim / 4) {
                v[i] = a4[j], g[i] = w4[j];
                if (ADD) {
                    const float4 y = load4(b + off + 4 * j);
                    v[i] = make_float4(v[i].x + y.x, v[i].y + y.y, v[i].z + y.z, v[i].w + y.w);
                }
            }
        }
#pragma unroll
        for (int i = 0; i < NORM_VEC; i++) {
            const int j = threadIdx.x + i * blockDim.x;
            if (j < dim / 4) {
                if (ADD) reinterpret_cast<float4*>(sum + off)[j] = v[i];
                ss += v[i].x * v[i].x + v[i].y * v[i].y + v[i].z * v[i].z + v[i].w * v[i].w;
            }
        }
        ss = block_sum(ss);
        const float r = rsqrtf(ss / dim + eps);
        if (threadIdx.x == 0) rstd[blockIdx.x] = r;
#pragma unroll
        for (int i = 0; i < NORM_VEC; i++) {
            const int j = threadIdx.x + i * blockDim.x;
            if (j < dim / 4) store4(out + off + 4 * j, make_float4(v[i].x * r * g[i].x, v[i].y * r * g[i].y, v[i].z * r * g[i].z, v[i].w * r * g[i].w));
        }
        return;
    }
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float v = ADD ? a[off + j] + load1(b + off + j) : a[off + j];
        if (ADD) sum[off + j] = v;
        ss += v * v;
    }
    ss = block_sum(ss);
    const float r = rsqrtf(ss / dim + eps);
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) out[off + j] = round_to(x[j] * r * w[j], out);
}

// out = x · rstd · w, rstd = (mean x² + eps)^-1/2;  x, out (m, dim); rstd (m). One block per row.
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_f32(const float* x, const float* w, float* out, float* rstd, int dim, float eps) {
    grid_dependency_wait();
    norm_row<false, float, float>(x, nullptr, w, nullptr, out, rstd, dim, eps);
}

// sum = a + b, then out = rmsnorm(sum): a residual add and the norm after it in one pass (decoding
// saves a launch per layer, training a read of the sum). a, b, sum, out (m, dim); rstd (m).
// CPU reference: Backend::add_rmsnorm's default (add, rmsnorm).
// add_rmsnorm_to_bf16/f16: the same with out in the 16-bit compute dtype, where nothing reads the f32
// norm output but a 16-bit product (Cuda::add_rmsnorm_mlp_gate_up: an MLP without LoRA).
// add16_rmsnorm_to_bf16/f16: b too in that dtype, the o projection's 16-bit product as cuBLAS wrote it
// (Cuda::linear_add_rmsnorm_mlp_gate_up), so it is never widened into f32.
#define ADD_RMSNORM(name, TB, TO)                                                                                              \
    extern "C" __global__ void __launch_bounds__(1024) name(const float* a, const TB* b, const float* w, float* sum, TO* out, float* rstd, int dim, float eps) { \
        grid_dependency_wait();                                                                                                  \
        allow_dependent_launch();                                                                                                \
        norm_row<true, TB, TO>(a, b, w, sum, out, rstd, dim, eps);                                                               \
    }
ADD_RMSNORM(add_rmsnorm_f32, float, float)
ADD_RMSNORM(add_rmsnorm_to_bf16, float, __nv_bfloat16)
ADD_RMSNORM(add_rmsnorm_to_f16, float, __half)
ADD_RMSNORM(add16_rmsnorm_to_bf16, __nv_bfloat16, __nv_bfloat16)
ADD_RMSNORM(add16_rmsnorm_to_f16, __half, __half)
// add16_rmsnorm_bf16/f16: b in the 16-bit dtype, out in f32 (a projection with a LoRA branch before an
// MLP with branches, whose inputs are read in f32: Cuda::linear_lora_add_rmsnorm).
ADD_RMSNORM(add16_rmsnorm_bf16, __nv_bfloat16, float)
ADD_RMSNORM(add16_rmsnorm_f16, __half, float)

// Float4s of x, dy, w and dx per thread in the backward: its row in registers, every load issued
// before the first use, at most 64 registers of them (launch bound 1024); the launcher
// (Cuda::rmsnorm_backward) gives rows up to 8 · 1,024 values enough threads. The loops over the row
// it had before (scalar loads, x and dy read twice) ran at ~2.9 TB/s of DRAM traffic (session 30's
// census), ~70% of the card's copy rate.
#define NORM_BWD_VEC 2

// dx (+)= r·(dy·w − x·r²·mean(dy·w·x)); accumulate: added to the gradient already in dx (the residual
// stream's), instead of a separate add_assign pass over it; the sum is rounded once, as that pass did.
// Each element's terms are computed as the CPU computes them; only the order of mean's sum differs.
extern "C" __global__ void __launch_bounds__(1024) rmsnorm_backward_f32(const float* x, const float* w, const float* rstd, const float* dy, float* dx, int dim, int accumulate) {
    grid_dependency_wait();
    const int64_t off = (int64_t)blockIdx.x * dim;
    const float r = rstd[blockIdx.x];
    float dot = 0.f;
    if (dim % 4 == 0 && dim / 4 <= NORM_BWD_VEC * (int)blockDim.x) {
        const float4 *x4 = reinterpret_cast<const float4*>(x + off), *dy4 = reinterpret_cast<const float4*>(dy + off);
        const float4* w4 = reinterpret_cast<const float4*>(w);
        float4* dx4 = reinterpret_cast<float4*>(dx + off);
        float4 xv[NORM_BWD_VEC], g[NORM_BWD_VEC], old[NORM_BWD_VEC];
#pragma unroll
        for (int i = 0; i < NORM_BWD_VEC; i++) {
            const int j = threadIdx.x + i * blockDim.x;
            if (j < dim / 4) {
                xv[i] = x4[j], g[i] = dy4[j];
                const float4 wv = w4[j];
                if (accumulate) old[i] = dx4[j];
                g[i] = make_float4(g[i].x * wv.x, g[i].y * wv.y, g[i].z * wv.z, g[i].w * wv.w);  // dy·w
                dot += g[i].x * xv[i].x, dot += g[i].y * xv[i].y, dot += g[i].z * xv[i].z, dot += g[i].w * xv[i].w;
            }
        }
        dot = block_sum(dot) / dim;
#pragma unroll
        for (int i = 0; i < NORM_BWD_VEC; i++) {
            const int j = threadIdx.x + i * blockDim.x;
            if (j >= dim / 4) continue;
            float4 d;
            d.x = r * (g[i].x - xv[i].x * r * r * dot), d.y = r * (g[i].y - xv[i].y * r * r * dot);
            d.z = r * (g[i].z - xv[i].z * r * r * dot), d.w = r * (g[i].w - xv[i].w * r * r * dot);
            if (accumulate) d = make_float4(__fadd_rn(old[i].x, d.x), __fadd_rn(old[i].y, d.y), __fadd_rn(old[i].z, d.z), __fadd_rn(old[i].w, d.w));
            dx4[j] = d;
        }
        return;
    }
    for (int j = threadIdx.x; j < dim; j += blockDim.x) dot += dy[off + j] * w[j] * x[off + j];
    dot = block_sum(dot) / dim;
    for (int j = threadIdx.x; j < dim; j += blockDim.x) {
        const float d = r * (dy[off + j] * w[j] - x[off + j] * r * r * dot);
        dx[off + j] = accumulate ? __fadd_rn(dx[off + j], d) : d;
    }
}
