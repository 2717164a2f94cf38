// Elementwise ops of the graph: residual add, scaling, SwiGLU forward/backward, dtype conversion,
// dropout, embedding gather/scatter, and the reductions the optimizer needs (Σx², non-finite check).
// CPU references: src/backend/cpu.rs (add, add_assign, scale, swiglu*, embedding*, sum_squares).
#include "common.cuh"
#include <cuda_fp16.h>

extern "C" __global__ void add_f32(const float* a, const float* b, float* out, int64_t n) {
    FOR_EACH(i, n) out[i] = a[i] + b[i];
}
extern "C" __global__ void add_assign_f32(float* dst, const float* src, int64_t n) {
    FOR_EACH(i, n) dst[i] += src[i];
}
extern "C" __global__ void scale_f32(float* x, float s, int64_t n) {
    FOR_EACH(i, n) x[i] *= s;
}
// out = silu(g) * u
extern "C" __global__ void swiglu_f32(const float* g, const float* u, float* out, int64_t n) {
    FOR_EACH(i, n) {
        const float x = g[i];
        out[i] = x / (1.f + expf(-x)) * u[i];
    }
}
extern "C" __global__ void swiglu_backward_f32(const float* g, const float* u, const float* dout, float* dg, float* du, int64_t n) {
    FOR_EACH(i, n) {
        const float x = g[i], sig = 1.f / (1.f + expf(-x));
        du[i] = dout[i] * x * sig;
        dg[i] = dout[i] * u[i] * sig * (1.f + x * (1.f - sig));
    }
}
extern "C" __global__ void f32_to_bf16(const float* x, __nv_bfloat16* out, int64_t n) {
    FOR_EACH(i, n) out[i] = __float2bfloat16_rn(x[i]);
}
// A 4-bit matmul's 16-bit output (cuBLAS rounds it to the compute dtype as it writes, as bitsandbytes'
// output is; the CPU reference rounds the same way in Cpu::linear), widened into the f32 activations.
extern "C" __global__ void bf16_to_f32(const __nv_bfloat16* x, float* out, int64_t n) {
    FOR_EACH(i, n) out[i] = __bfloat162float(x[i]);
}
extern "C" __global__ void f16_to_f32(const __half* x, float* out, int64_t n) {
    FOR_EACH(i, n) out[i] = __half2float(x[i]);
}
// dst += widened src: an input gradient accumulated after its rounding, as on the CPU.
extern "C" __global__ void add_bf16_to_f32(const __nv_bfloat16* src, float* dst, int64_t n) {
    FOR_EACH(i, n) dst[i] += __bfloat162float(src[i]);
}
extern "C" __global__ void add_f16_to_f32(const __half* src, float* dst, int64_t n) {
    FOR_EACH(i, n) dst[i] += __half2float(src[i]);
}
// out = x * dropout(seed, i)
extern "C" __global__ void dropout_f32(const float* x, float* out, uint64_t seed, float p, int64_t n) {
    FOR_EACH(i, n) out[i] = x[i] * dropout_factor(seed, (uint64_t)i, p);
}
// dst += g * dropout(seed, i)
extern "C" __global__ void dropout_add_f32(float* dst, const float* g, uint64_t seed, float p, int64_t n) {
    FOR_EACH(i, n) dst[i] += g[i] * dropout_factor(seed, (uint64_t)i, p);
}
// out (m, dim) = table[ids] (bf16 table)
extern "C" __global__ void embedding_bf16(const __nv_bfloat16* table, const uint32_t* ids, float* out, int m, int dim) {
    FOR_EACH(i, (int64_t)m * dim) {
        const int64_t r = i / dim, c = i % dim;
        out[i] = __bfloat162float(table[(int64_t)ids[r] * dim + c]);
    }
}
extern "C" __global__ void embedding_f16(const __half* table, const uint32_t* ids, float* out, int m, int dim) {
    FOR_EACH(i, (int64_t)m * dim) {
        const int64_t r = i / dim, c = i % dim;
        out[i] = __half2float(table[(int64_t)ids[r] * dim + c]);
    }
}
extern "C" __global__ void embedding_backward_f32(const uint32_t* ids, const float* dout, float* dtable, int m, int dim) {
    FOR_EACH(i, (int64_t)m * dim) {
        const int64_t r = i / dim, c = i % dim;
        atomicAdd(&dtable[(int64_t)ids[r] * dim + c], dout[i]);
    }
}
// acc[0] += Σ x² (f64 accumulation)
extern "C" __global__ void sum_squares_f32(const float* x, double* acc, int64_t n) {
    double s = 0.0;
    FOR_EACH(i, n) s += (double)x[i] * (double)x[i];
    s = warp_sum_d(s);
    if (threadIdx.x % WARP == 0) atomicAdd(acc, s);
}
extern "C" __global__ void non_finite_f32(const float* x, int* flag, int64_t n) {
    FOR_EACH(i, n) if (!isfinite(x[i])) atomicOr(flag, 1);
}

// Appends rows to a KV cache at the position held on the device: dst[(pos[0] + r) * row + j] =
// src[r * row + j] for the n rows of src. CPU reference: Cpu::kv_write.
extern "C" __global__ void kv_write_f32(const float* src, float* dst, const float* pos, int64_t row, int64_t n) {
    const int64_t off = (int64_t)pos[0] * row;
    FOR_EACH(i, n) dst[off + i] = src[i];
}
