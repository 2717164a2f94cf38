// Cross-entropy over the vocabulary with ignore index -100, forward and gradient in one launch, one
// block per row (the caller feeds row chunks, so full-batch logits never exist). CPU: Cpu::cross_entropy.
// Two kernels with the same arguments and results: cross_entropy_reg keeps its row in registers, so
// the logits are read once and the gradient written once (the floor: 8 bytes per logit), for
// vocabularies up to 1024 × 32 (Llama-2's 32000; 48 per thread would spill); cross_entropy_f32
// reads the row three times (max, sum, gradient) and takes any vocabulary.
#include "common.cuh"

#define XENT_THREADS 1024

// A row whose target is ignored (-100, any negative) or out of range gets a zero gradient and no
// loss; an out-of-range one also flags the host through `count`. True when the row is done.
__device__ __forceinline__ bool skip_row(float* dlogits, int64_t off, int t, int* count, int vocab) {
    if (t < 0 || t >= vocab) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) dlogits[off + j] = 0.f;
        if (t >= vocab && threadIdx.x == 0) atomicAdd(count, 1 << 30);
        return true;
    }
    return false;
}

// logits, dlogits (m, vocab); loss[0] += Σ (lse − logit[target]); count[0] += counted rows
extern "C" __global__ void cross_entropy_f32(const float* logits, const int* targets, float* dlogits, double* loss, int* count, int vocab, float scale) {
    const int64_t off = (int64_t)blockIdx.x * vocab;
    const int t = targets[blockIdx.x];
    if (skip_row(dlogits, off, t, count, vocab)) return;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, logits[off + j]);
    mx = block_max(mx);
    float sum = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(logits[off + j] - mx);
    sum = block_sum(sum);
    const float lse = mx + logf(sum);
    if (threadIdx.x == 0) {
        atomicAdd(loss, (double)(lse - logits[off + t]));
        atomicAdd(count, 1);
    }
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        dlogits[off + j] = expf(logits[off + j] - lse) * scale - (j == t ? scale : 0.f);
    }
}

// The same, with row values j = threadIdx.x + XENT_THREADS·i (i < VPT) held in registers; for
// vocab ≤ XENT_THREADS·VPT.
template <int VPT>
__device__ void cross_entropy_reg(const float* logits, const int* targets, float* dlogits, double* loss, int* count, int vocab, float scale) {
    const int64_t off = (int64_t)blockIdx.x * vocab;
    const int t = targets[blockIdx.x];
    if (skip_row(dlogits, off, t, count, vocab)) return;
    float v[VPT];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int j = threadIdx.x + XENT_THREADS * i;
        v[i] = j < vocab ? logits[off + j] : -INFINITY;
        mx = fmaxf(mx, v[i]);
    }
    mx = block_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; i++) sum += expf(v[i] - mx);  // exp(-inf) = 0 past the end
    sum = block_sum(sum);
    const float lse = mx + logf(sum);
    if (threadIdx.x == 0) {
        atomicAdd(loss, (double)(lse - logits[off + t]));
        atomicAdd(count, 1);
    }
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int j = threadIdx.x + XENT_THREADS * i;
        if (j < vocab) dlogits[off + j] = expf(v[i] - lse) * scale - (j == t ? scale : 0.f);
    }
}
#define XENT_REG(VPT) \
    extern "C" __global__ void __launch_bounds__(XENT_THREADS, 1) cross_entropy_reg##VPT(const float* logits, const int* targets, float* dlogits, double* loss, int* count, int vocab, float scale) { \
        cross_entropy_reg<VPT>(logits, targets, dlogits, loss, count, vocab, scale); \
    }
XENT_REG(8)
XENT_REG(16)
XENT_REG(32)
