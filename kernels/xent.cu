// Cross-entropy over the vocabulary with ignore index -100, forward and gradient in one pass, one
// block per row (the caller feeds row chunks, so full-batch logits never exist). CPU: Cpu::cross_entropy.
#include "common.cuh"

// logits, dlogits (m, vocab); loss[0] += Σ (lse − logit[target]); count[0] += counted rows
extern "C" __global__ void cross_entropy_f32(const float* logits, const int* targets, float* dlogits, double* loss, int* count, int vocab, float scale) {
    const int64_t off = (int64_t)blockIdx.x * vocab;
    const int t = targets[blockIdx.x];
    if (t < 0 || t >= vocab) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) dlogits[off + j] = 0.f;
        if (t >= vocab && threadIdx.x == 0) atomicAdd(count, 1 << 30); // flags a bad target to the host
        return;
    }
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
