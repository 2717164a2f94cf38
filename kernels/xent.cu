// Cross-entropy over the vocabulary with ignore index -100, forward and gradient in one launch (the
// caller feeds row chunks, so full-batch logits never exist). CPU: Cpu::cross_entropy.
// Three kernels with the same results: cross_entropy_stream and cross_entropy_reg keep a row in
// registers, so the logits are read once and the gradient written once (the floor: 8 bytes per
// logit), for vocabularies up to 1024 × 32 (Llama-2's 32000; 48 per thread would spill);
// cross_entropy_f32 reads the row three times (max, sum, gradient) and takes any vocabulary.
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
    const float p = scale / sum;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        dlogits[off + j] = expf(logits[off + j] - mx) * p - (j == t ? scale : 0.f);
    }
}

// The loss and gradient of row `off` (target t, counted) from its values j = threadIdx.x +
// XENT_THREADS·i held in v (−inf past the end) and, in thread 0, the target's logit xt (fetched by the
// caller ahead of time: a load here would put its latency on every row's critical path). Each
// exponential is taken once, and the softmax is exp(v − max) / sum (Cpu::cross_entropy computes the same).
template <int VPT>
__device__ __forceinline__ void row_from_registers(float (&v)[VPT], float xt, float* dlogits, int64_t off, int t, double* loss, int* count, int vocab, float scale) {
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < VPT; i++) mx = fmaxf(mx, v[i]);
    mx = block_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        v[i] = expf(v[i] - mx);  // exp(-inf) = 0 past the end
        sum += v[i];
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        atomicAdd(loss, (double)(mx + logf(sum) - xt));
        atomicAdd(count, 1);
    }
    const float p = scale / sum;
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int j = threadIdx.x + XENT_THREADS * i;
        if (j < vocab) dlogits[off + j] = v[i] * p - (j == t ? scale : 0.f);
    }
}

// A block per row, its values loaded into registers; for vocab ≤ XENT_THREADS·VPT.
template <int VPT>
__device__ void cross_entropy_reg(const float* logits, const int* targets, float* dlogits, double* loss, int* count, int vocab, float scale) {
    const int64_t off = (int64_t)blockIdx.x * vocab;
    const int t = targets[blockIdx.x];
    if (skip_row(dlogits, off, t, count, vocab)) return;
    const float xt = threadIdx.x == 0 ? logits[off + t] : 0.f;
    float v[VPT];
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int j = threadIdx.x + XENT_THREADS * i;
        v[i] = j < vocab ? logits[off + j] : -INFINITY;
    }
    row_from_registers<VPT>(v, xt, dlogits, off, t, loss, count, vocab, scale);
}
#define XENT_REG(VPT) \
    extern "C" __global__ void __launch_bounds__(XENT_THREADS, 1) cross_entropy_reg##VPT(const float* logits, const int* targets, float* dlogits, double* loss, int* count, int vocab, float scale) { \
        cross_entropy_reg<VPT>(logits, targets, dlogits, loss, count, vocab, scale); \
    }
XENT_REG(8)
XENT_REG(16)
XENT_REG(32)

// Persistent blocks (one per SM: the row in registers takes the whole register file) walk rows
// blockIdx.x, + gridDim.x. While one row is reduced and its gradient written from registers, the
// next row streams into shared memory by cp.async, so reading logits overlaps writing gradients;
// cross_entropy_reg has one row per SM at a time and alternates the two (~64% of copy bandwidth at
// 2048 × 32000 on the H200). Needs vocab % 4 == 0 (16-byte copies) and vocab·4 bytes of dynamic
// shared memory (VPT·4 KiB reserved by the launcher).
template <int VPT>
__device__ void cross_entropy_stream(const float* logits, const int* targets, float* dlogits, double* loss, int* count, int rows, int vocab, float scale) {
    extern __shared__ float4 next_row[];  // (vocab) the logits of the block's next row
    const uint32_t next_addr = smem_addr(next_row);
    const float* next = reinterpret_cast<const float*>(next_row);
    auto prefetch = [&](int r) {
        const float* src = logits + (int64_t)r * vocab;
        for (int c = threadIdx.x; c < vocab / 4; c += XENT_THREADS) cp_async16(next_addr + 16 * c, src + 4 * c, true);
        cp_async_commit();
    };
    // The next row's target is loaded with its logits, off the critical path.
    int next_target = 0;
    if (blockIdx.x < rows) prefetch(blockIdx.x), next_target = targets[blockIdx.x];
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const int t = next_target;
        cp_async_wait<0>();
        __syncthreads();  // row r is in shared memory
        float v[VPT];
#pragma unroll
        for (int i = 0; i < VPT; i++) {
            const int j = threadIdx.x + XENT_THREADS * i;
            v[i] = j < vocab ? next[j] : -INFINITY;
        }
        const float xt = threadIdx.x == 0 && t >= 0 && t < vocab ? next[t] : 0.f;
        __syncthreads();  // every thread holds its values: the buffer takes the following row
        if (r + gridDim.x < rows) prefetch(r + gridDim.x), next_target = targets[r + gridDim.x];
        const int64_t off = (int64_t)r * vocab;
        if (skip_row(dlogits, off, t, count, vocab)) continue;
        row_from_registers<VPT>(v, xt, dlogits, off, t, loss, count, vocab, scale);
    }
}
#define XENT_STREAM(VPT) \
    extern "C" __global__ void __launch_bounds__(XENT_THREADS, 1) cross_entropy_stream##VPT(const float* logits, const int* targets, float* dlogits, double* loss, int* count, int rows, int vocab, float scale) { \
        cross_entropy_stream<VPT>(logits, targets, dlogits, loss, count, rows, vocab, scale); \
    }
XENT_STREAM(8)
XENT_STREAM(16)
XENT_STREAM(32)
