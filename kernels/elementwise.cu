// Elementwise ops of the graph: residual add, scaling, NEFTune's embedding noise, SwiGLU
// forward/backward, dtype conversion, dropout, embedding gather/scatter, and the reductions the
// optimizer needs (Σx², non-finite check).
// CPU references: src/backend/cpu.rs (add, add_assign, scale, add_uniform_noise, swiglu*, embedding*, sum_squares).
#include "common.cuh"
#include <cuda_fp16.h>

extern "C" __global__ void add_f32(const float* a, const float* b, float* out, int64_t n) {
    grid_dependency_wait();
    for_each4(
        n, aligned_to(a, 16) && aligned_to(b, 16) && aligned_to(out, 16),
        [&](int64_t q) { reinterpret_cast<float4*>(out)[q] = add4(reinterpret_cast<const float4*>(a)[q], reinterpret_cast<const float4*>(b)[q]); },
        [&](int64_t i) { out[i] = a[i] + b[i]; });
}
extern "C" __global__ void add_assign_f32(float* dst, const float* src, int64_t n) {
    grid_dependency_wait();
    for_each4(
        n, aligned_to(dst, 16) && aligned_to(src, 16),
        [&](int64_t q) { reinterpret_cast<float4*>(dst)[q] = add4(reinterpret_cast<float4*>(dst)[q], reinterpret_cast<const float4*>(src)[q]); },
        [&](int64_t i) { dst[i] += src[i]; });
}
extern "C" __global__ void scale_f32(float* x, float s, int64_t n) {
    grid_dependency_wait();
    FOR_EACH(i, n) x[i] *= s;
}
// NEFTune: x[i] += magnitude · u_i, u_i = uniform_pm1(seed, i); product and sum each rounded once (no
// FMA contraction), as the CPU reference computes them (Cpu::add_uniform_noise).
extern "C" __global__ void add_uniform_noise_f32(float* x, float magnitude, uint64_t seed, int64_t n) {
    grid_dependency_wait();
    FOR_EACH(i, n) x[i] = __fadd_rn(x[i], __fmul_rn(magnitude, uniform_pm1(seed, (uint64_t)i)));
}
// out = silu(g) * u, in f32 or a 16-bit dtype (an MLP's gate and up products as cuBLAS writes them,
// and the down product's input as its GEMM reads it: Cuda::mlp_down): computed in f32 from the
// widened values, a 16-bit output rounded to nearest even as the down product's conversion rounded it.
// With 16-bit products and an f32 output (`swiglu_*_to_f32`: an MLP whose down product has a LoRA
// branch, Cuda::mlp_swiglu), the values swiglu_f32 gives from the widened products, bit for bit.
template <typename T, typename O>
__device__ __forceinline__ void swiglu_t(const T* g, const T* u, O* out, int64_t n) {
    constexpr int V = 4 * sizeof(T), VO = 4 * sizeof(O);  // bytes of four values
    for_each4(
        n, aligned_to(g, V) && aligned_to(u, V) && aligned_to(out, VO),
        [&](int64_t q) {
            const float4 a = load4(g + 4 * q), b = load4(u + 4 * q);
            store4(out + 4 * q, make_float4(swiglu1(a.x, b.x), swiglu1(a.y, b.y), swiglu1(a.z, b.z), swiglu1(a.w, b.w)));
        },
        [&](int64_t i) { store1(out + i, swiglu1(load1(g + i), load1(u + i))); });
}
extern "C" __global__ void swiglu_f32(const float* g, const float* u, float* out, int64_t n) { grid_dependency_wait(); swiglu_t(g, u, out, n); }
extern "C" __global__ void swiglu_bf16(const __nv_bfloat16* g, const __nv_bfloat16* u, __nv_bfloat16* out, int64_t n) { grid_dependency_wait(); swiglu_t(g, u, out, n); }
extern "C" __global__ void swiglu_f16(const __half* g, const __half* u, __half* out, int64_t n) { grid_dependency_wait(); swiglu_t(g, u, out, n); }
extern "C" __global__ void swiglu_bf16_to_f32(const __nv_bfloat16* g, const __nv_bfloat16* u, float* out, int64_t n) { grid_dependency_wait(); swiglu_t(g, u, out, n); }
extern "C" __global__ void swiglu_f16_to_f32(const __half* g, const __half* u, float* out, int64_t n) { grid_dependency_wait(); swiglu_t(g, u, out, n); }
// (dg, du) of one element from gate x, up u and the output's gradient d.
__device__ __forceinline__ float2 swiglu_grad1(float x, float u, float d) {
    const float sig = 1.f / (1.f + expf(-x));
    return make_float2(d * u * sig * (1.f + x * (1.f - sig)), d * x * sig);
}
// The gradients of swiglu_t, in f32 or a 16-bit dtype: the gate and up products and the output's
// gradient as cuBLAS wrote them (Cuda::mlp_backward), dg and du written in that dtype (rounded to
// nearest even, as the gate and up products' input-gradient GEMMs' conversions rounded them). With
// 16-bit products and f32 gradients (`swiglu_backward_*_f32`: an MLP with LoRA branches, whose
// gradients feed the branches in f32; Cuda::mlp_swiglu_backward), swiglu_backward_f32's values from
// the widened products, bit for bit.
template <typename T, typename D>
__device__ __forceinline__ void swiglu_backward_t(const T* g, const T* u, const D* dout, D* dg, D* du, int64_t n) {
    constexpr int V = 4 * sizeof(T), VD = 4 * sizeof(D);  // bytes of four values
    for_each4(
        n, aligned_to(g, V) && aligned_to(u, V) && aligned_to(dout, VD) && aligned_to(dg, VD) && aligned_to(du, VD),
        [&](int64_t q) {
            const float4 x = load4(g + 4 * q), v = load4(u + 4 * q), d = load4(dout + 4 * q);
            const float2 a = swiglu_grad1(x.x, v.x, d.x), b = swiglu_grad1(x.y, v.y, d.y), c = swiglu_grad1(x.z, v.z, d.z), e = swiglu_grad1(x.w, v.w, d.w);
            store4(dg + 4 * q, make_float4(a.x, b.x, c.x, e.x));
            store4(du + 4 * q, make_float4(a.y, b.y, c.y, e.y));
        },
        [&](int64_t i) {
            const float2 r = swiglu_grad1(load1(g + i), load1(u + i), load1(dout + i));
            store1(dg + i, r.x);
            store1(du + i, r.y);
        });
}
#define SWIGLU_BACKWARD(name, T, D)                                                                        \
    extern "C" __global__ void name(const T* g, const T* u, const D* dout, D* dg, D* du, int64_t n) { \
        grid_dependency_wait();                                                                        \
        swiglu_backward_t(g, u, dout, dg, du, n);                                                      \
    }
SWIGLU_BACKWARD(swiglu_backward_f32, float, float)
SWIGLU_BACKWARD(swiglu_backward_bf16, __nv_bfloat16, __nv_bfloat16)
SWIGLU_BACKWARD(swiglu_backward_f16, __half, __half)
SWIGLU_BACKWARD(swiglu_backward_bf16_f32, __nv_bfloat16, float)
SWIGLU_BACKWARD(swiglu_backward_f16_f32, __half, float)
extern "C" __global__ void f32_to_bf16(const float* x, __nv_bfloat16* out, int64_t n) {
    grid_dependency_wait();
    for_each4(
        n, aligned_to(x, 16) && aligned_to(out, 8),
        [&](int64_t q) { reinterpret_cast<uint2*>(out)[q] = pack_bf16x4(reinterpret_cast<const float4*>(x)[q]); },
        [&](int64_t i) { out[i] = __float2bfloat16_rn(x[i]); });
}
// s · x rounded to 16 bits (s multiplies in f32 before the single rounding), into columns col0.. of a
// row-major matrix with `ld` columns: out[r·ld + col0 + c] = s · x[r·cols + c] for x (rows, cols).
// A LoRA branch's u (scaled by alpha / r) and its B as cuBLAS operands, each on its own (ld = cols,
// Cuda::lora_b_into_product) or as the columns that join two matrices along k (Cuda::qkv_attn_acts's
// concatenated path: [x | scale·u] and [W | B]).
template <typename T>
__device__ __forceinline__ void scaled_to_16_2d(const float* x, T* out, int rows, int cols, int64_t ld, int col0, float s) {
    const bool vector = cols % 4 == 0 && ld % 4 == 0 && col0 % 4 == 0 && aligned_to(x, 16) && aligned_to(out, 8);
    if (vector) {
        const int q_per_row = cols / 4;
        FOR_EACH(q, (int64_t)rows * q_per_row) {
            const int64_t r = q / q_per_row, c = 4 * (q % q_per_row);
            const float4 v = load4(x + r * cols + c);
            store4(out + r * ld + col0 + c, make_float4(s * v.x, s * v.y, s * v.z, s * v.w));
        }
    } else {
        FOR_EACH(i, (int64_t)rows * cols) {
            const int64_t r = i / cols, c = i % cols;
            store1(out + r * ld + col0 + c, s * x[i]);
        }
    }
}
extern "C" __global__ void scaled_f32_to_bf16_2d(const float* x, __nv_bfloat16* out, int rows, int cols, int64_t ld, int col0, float s) {
    grid_dependency_wait();
    scaled_to_16_2d(x, out, rows, cols, ld, col0, s);
}
extern "C" __global__ void scaled_f32_to_f16_2d(const float* x, __half* out, int rows, int cols, int64_t ld, int col0, float s) {
    grid_dependency_wait();
    scaled_to_16_2d(x, out, rows, cols, ld, col0, s);
}
// A 4-bit matmul's 16-bit output (cuBLAS rounds it to the compute dtype as it writes, as bitsandbytes'
// output is; the CPU reference rounds the same way in Cpu::linear), widened into the f32 activations.
extern "C" __global__ void bf16_to_f32(const __nv_bfloat16* x, float* out, int64_t n) {
    grid_dependency_wait();
    for_each4(
        n, aligned_to(x, 8) && aligned_to(out, 16),
        [&](int64_t q) { reinterpret_cast<float4*>(out)[q] = unpack_bf16x4(reinterpret_cast<const uint2*>(x)[q]); },
        [&](int64_t i) { out[i] = __bfloat162float(x[i]); });
}
extern "C" __global__ void f16_to_f32(const __half* x, float* out, int64_t n) {
    grid_dependency_wait();
    for_each4(
        n, aligned_to(x, 8) && aligned_to(out, 16),
        [&](int64_t q) { reinterpret_cast<float4*>(out)[q] = unpack_f16x4(reinterpret_cast<const uint2*>(x)[q]); },
        [&](int64_t i) { out[i] = __half2float(x[i]); });
}
// dst += widened src: an input gradient accumulated after its rounding, as on the CPU.
extern "C" __global__ void add_bf16_to_f32(const __nv_bfloat16* src, float* dst, int64_t n) {
    grid_dependency_wait();
    for_each4(
        n, aligned_to(src, 8) && aligned_to(dst, 16),
        [&](int64_t q) { reinterpret_cast<float4*>(dst)[q] = add4(reinterpret_cast<float4*>(dst)[q], unpack_bf16x4(reinterpret_cast<const uint2*>(src)[q])); },
        [&](int64_t i) { dst[i] += __bfloat162float(src[i]); });
}
extern "C" __global__ void add_f16_to_f32(const __half* src, float* dst, int64_t n) {
    grid_dependency_wait();
    for_each4(
        n, aligned_to(src, 8) && aligned_to(dst, 16),
        [&](int64_t q) { reinterpret_cast<float4*>(dst)[q] = add4(reinterpret_cast<float4*>(dst)[q], unpack_f16x4(reinterpret_cast<const uint2*>(src)[q])); },
        [&](int64_t i) { dst[i] += __half2float(src[i]); });
}
// dst = ([dst +] widened a) + widened b: two input gradients accumulated after their rounding, in
// that order, in one pass over dst (the MLP's up and gate products, Cuda::mlp_backward_16): the
// values of the two passes above, bit for bit. CPU reference: two adds.
template <typename T>
__device__ __forceinline__ void add_two_16_to_f32(const T* a, const T* b, float* dst, int64_t n, int accumulate) {
    for_each4(
        n, aligned_to(a, 8) && aligned_to(b, 8) && aligned_to(dst, 16),
        [&](int64_t q) {
            const float4 va = load4(a + 4 * q), vb = load4(b + 4 * q);
            float4* d = reinterpret_cast<float4*>(dst) + q;
            *d = add4(accumulate ? add4(*d, va) : va, vb);
        },
        [&](int64_t i) { dst[i] = (accumulate ? dst[i] + load1(a + i) : load1(a + i)) + load1(b + i); });
}
extern "C" __global__ void add_two_bf16_to_f32(const __nv_bfloat16* a, const __nv_bfloat16* b, float* dst, int64_t n, int accumulate) {
    grid_dependency_wait();
    add_two_16_to_f32(a, b, dst, n, accumulate);
}
extern "C" __global__ void add_two_f16_to_f32(const __half* a, const __half* b, float* dst, int64_t n, int accumulate) {
    grid_dependency_wait();
    add_two_16_to_f32(a, b, dst, n, accumulate);
}
// out = x * dropout(seed, i)
extern "C" __global__ void dropout_f32(const float* x, float* out, uint64_t seed, float p, int64_t n) {
    grid_dependency_wait();
    FOR_EACH(i, n) out[i] = x[i] * dropout_factor(seed, (uint64_t)i, p);
}
// dst += g * dropout(seed, i)
extern "C" __global__ void dropout_add_f32(float* dst, const float* g, uint64_t seed, float p, int64_t n) {
    grid_dependency_wait();
    FOR_EACH(i, n) dst[i] += g[i] * dropout_factor(seed, (uint64_t)i, p);
}
// out (m, dim) = table[ids] (bf16 table)
extern "C" __global__ void embedding_bf16(const __nv_bfloat16* table, const uint32_t* ids, float* out, int m, int dim) {
    grid_dependency_wait();
    FOR_EACH(i, (int64_t)m * dim) {
        const int64_t r = i / dim, c = i % dim;
        out[i] = __bfloat162float(table[(int64_t)ids[r] * dim + c]);
    }
}
extern "C" __global__ void embedding_f16(const __half* table, const uint32_t* ids, float* out, int m, int dim) {
    grid_dependency_wait();
    FOR_EACH(i, (int64_t)m * dim) {
        const int64_t r = i / dim, c = i % dim;
        out[i] = __half2float(table[(int64_t)ids[r] * dim + c]);
    }
}
extern "C" __global__ void embedding_backward_f32(const uint32_t* ids, const float* dout, float* dtable, int m, int dim) {
    grid_dependency_wait();
    FOR_EACH(i, (int64_t)m * dim) {
        const int64_t r = i / dim, c = i % dim;
        atomicAdd(&dtable[(int64_t)ids[r] * dim + c], dout[i]);
    }
}
// Σ x² added into *acc (f64): one atomic add per block, launched with few blocks (Cuda::sum_squares;
// sum_squares_all takes every tensor in one launch: adamw.cu sum_squares_many_f32).
// An atomic per warp on the one address serialized: ~3.7M of them for an all-linear 7B adapter's 448
// gradients took ~9 ms per step on the H200.
extern "C" __global__ void sum_squares_f32(const float* x, double* acc, int64_t n) {
    grid_dependency_wait();
    double s = 0.0;
    FOR_EACH(i, n) s += (double)x[i] * (double)x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(acc, s);
}
extern "C" __global__ void non_finite_f32(const float* x, int* flag, int64_t n) {
    grid_dependency_wait();
    FOR_EACH(i, n) if (!isfinite(x[i])) atomicOr(flag, 1);
}

// Appends rows to a KV cache at the position held on the device: dst[(pos[0] + r) * row + j] =
// src[r * row + j] for the n rows of src. CPU reference: Cpu::kv_write.
extern "C" __global__ void kv_write_f32(const float* src, float* dst, const float* pos, int64_t row, int64_t n) {
    grid_dependency_wait();
    const int64_t off = (int64_t)pos[0] * row;
    FOR_EACH(i, n) dst[off + i] = src[i];
}
