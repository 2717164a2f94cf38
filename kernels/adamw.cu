// 32-bit AdamW with bitsandbytes' update rule (bias corrections folded into the step size, then
// decoupled weight decay), gradients pre-multiplied by the clipping coefficient. CPU: Cpu::adamw.
// adamw_f32 updates one tensor; adamw_many_f32 every tensor of an adapter in one launch (an
// all-linear 7B adapter has 448, whose launches cost more than their ~1.6 ms of traffic).
#include "common.cuh"

struct AdamHyper {
    float lr, beta1, beta2, eps, weight_decay, step_size, c2, grad_scale;
};

// One value's update: m and v in place, the new parameter returned.
__device__ __forceinline__ float adam_value(float p, float g, float& m, float& v, const AdamHyper& h) {
    const float gi = g * h.grad_scale;
    m = m * h.beta1 + (1.f - h.beta1) * gi;
    v = v * h.beta2 + (1.f - h.beta2) * gi * gi;
    float pi = p + h.step_size * (m / (sqrtf(v) + h.eps * h.c2));
    if (h.weight_decay > 0.f) pi *= 1.f - h.lr * h.weight_decay;
    return pi;
}
__device__ __forceinline__ void adam_update(float* p, const float* g, float* m, float* v, int64_t i, const AdamHyper& h) {
    float mi = m[i], vi = v[i];
    const float pi = adam_value(p[i], g[i], mi, vi, h);
    m[i] = mi;
    v[i] = vi;
    p[i] = pi;
}
// Values i..i+3 (i a multiple of 4, every pointer 16-byte aligned) by 16-byte accesses: with one value
// per access the kernel moved its 28 bytes per value at 79% of the same run's copy rate (criterion,
// H200, session 42), the copy kernel itself four values per access. The same arithmetic per value.
__device__ __forceinline__ void adam_update4(float* p, const float* g, float* m, float* v, int64_t i, const AdamHyper& h) {
    float4 P = load4(p + i), M = load4(m + i), V = load4(v + i);
    const float4 G = load4(g + i);
    P.x = adam_value(P.x, G.x, M.x, V.x, h);
    P.y = adam_value(P.y, G.y, M.y, V.y, h);
    P.z = adam_value(P.z, G.z, M.z, V.z, h);
    P.w = adam_value(P.w, G.w, M.w, V.w, h);
    store4(m + i, M);
    store4(v + i, V);
    store4(p + i, P);
}
__device__ __forceinline__ bool adam_aligned(const float* p, const float* g, const float* m, const float* v) {
    return aligned_to(p, 16) && aligned_to(g, 16) && aligned_to(m, 16) && aligned_to(v, 16);
}

extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, AdamHyper h, int64_t n) {
    grid_dependency_wait();
    // Paged AdamW's staging pieces may start anywhere in a tensor: those go value by value.
    for_each4(
        n, adam_aligned(p, g, m, v), [&](int64_t q) { adam_update4(p, g, m, v, 4 * q, h); },
        [&](int64_t i) { adam_update(p, g, m, v, i, h); });
}

// One tensor of a multi-tensor launch (Rust: AdamTensor): its chunks are blocks first_chunk ..
// first_chunk + ceil(n / chunk) of the grid.
struct AdamTensor {
    float* p;
    const float* g;
    float* m;
    float* v;
    int64_t n;
    int64_t first_chunk;
};

// The tensor whose chunks include block b: the last with first_chunk <= b (ts sorted by it).
template <typename T>
__device__ __forceinline__ const T& tensor_of_block(const T* ts, int count, int64_t b) {
    int lo = 0, hi = count - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (ts[mid].first_chunk <= b) lo = mid;
        else hi = mid - 1;
    }
    return ts[lo];
}

// Block b updates `chunk` values of one tensor: the same arithmetic as adamw_f32, value for value.
extern "C" __global__ void adamw_many_f32(const AdamTensor* ts, int count, AdamHyper h, int64_t chunk) {
    grid_dependency_wait();
    const AdamTensor& t = tensor_of_block(ts, count, blockIdx.x);
    const int64_t start = (blockIdx.x - t.first_chunk) * chunk, end = min(t.n, start + chunk);
    // Chunks start at multiples of 16,384 values, so an aligned tensor's chunks are aligned too.
    const int64_t vec_end = adam_aligned(t.p, t.g, t.m, t.v) ? start + (end - start) / 4 * 4 : start;
    for (int64_t i = start + 4 * threadIdx.x; i < vec_end; i += 4 * blockDim.x) adam_update4(t.p, t.g, t.m, t.v, i, h);
    for (int64_t i = vec_end + threadIdx.x; i < end; i += blockDim.x) adam_update(t.p, t.g, t.m, t.v, i, h);
}

// One tensor of sum_squares_many_f32 (Rust: SumTensor).
struct SumTensor {
    const float* x;
    int64_t n;
    int64_t first_chunk;
};

// Σ x² over every tensor added into *acc (f64): block b sums `chunk` values of one tensor and adds
// them with one atomic (Cuda::sum_squares_all: the global gradient norm in one launch).
extern "C" __global__ void sum_squares_many_f32(const SumTensor* ts, int count, double* acc, int64_t chunk) {
    grid_dependency_wait();
    const SumTensor& t = tensor_of_block(ts, count, blockIdx.x);
    const int64_t start = (blockIdx.x - t.first_chunk) * chunk, end = min(t.n, start + chunk);
    double s = 0.0;
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) s += (double)t.x[i] * (double)t.x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(acc, s);
}

// Zeros into every tensor of the table in one launch (Cuda::zero_many: the gradients before each
// step, where an all-linear adapter's 448 fresh zeroed allocations had cost ~3 ms per step); the
// table as sum_squares_many_f32's, its tensors written. CPU: Backend::zero_all's default.
extern "C" __global__ void zero_many_f32(const SumTensor* ts, int count, int64_t chunk) {
    grid_dependency_wait();
    const SumTensor& t = tensor_of_block(ts, count, blockIdx.x);
    const int64_t start = (blockIdx.x - t.first_chunk) * chunk, end = min(t.n, start + chunk);
    float* const x = const_cast<float*>(t.x);
    for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) x[i] = 0.f;
}
