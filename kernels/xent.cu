// Cross-entropy over the vocabulary with ignore index -100, forward and gradient in one launch (the
// caller feeds row chunks, so full-batch logits never exist). CPU: Cpu::cross_entropy.
// Four kernels with the same results: cross_entropy_stream and cross_entropy_reg keep a row in
// registers, so the logits are read once and the gradient written once (the floor: 8 bytes per
// logit in f32), for vocabularies up to 1024 × 32 (Llama-2's 32000; 48 per thread would spill);
// cross_entropy_two_pass (at the end) reads the rows of other vocabularies twice, the second time
// from L2; cross_entropy_f32 reads the row three times (any vocabulary).
// cross_entropy_stream and cross_entropy_two_pass also read bf16 or f16 logits and write the
// gradient in the same dtype (`_bf16`, `_f16`: 4 bytes per logit): what a 16-bit LM head's GEMM
// writes and its input-gradient GEMM reads (Cuda::lm_head_cross_entropy), as transformers computes
// the loss from a bf16 head's logits cast to f32 and casts the gradient back; the gradient rounded
// to nearest even as that cast.
#include "common.cuh"

#define XENT_THREADS 1024

// Logits and gradients are f32 or 16-bit (common.cuh's load1/load4 and store1/store4; the gradient
// rounded to nearest even).

// A row whose target is ignored (-100, any negative) or out of range gets a zero gradient and no
// loss; an out-of-range one also flags the host through sums[1] (+2^30). True when the row is done.
template <typename T>
__device__ __forceinline__ bool skip_row(T* dlogits, int64_t off, int t, double* sums, int vocab) {
    if (t < 0 || t >= vocab) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) store1(dlogits + off + j, 0.f);
        if (t >= vocab && threadIdx.x == 0) atomicAdd(sums + 1, 1073741824.0);
        return true;
    }
    return false;
}

// logits, dlogits (m, vocab); sums[0] += Σ (lse − logit[target]); sums[1] += counted rows (one
// f64 pair, so the host reads both in one download)
extern "C" __global__ void cross_entropy_f32(const float* logits, const int* targets, float* dlogits, double* sums, int vocab, float scale) {
    grid_dependency_wait();
    const int64_t off = (int64_t)blockIdx.x * vocab;
    const int t = targets[blockIdx.x];
    if (skip_row(dlogits, off, t, sums, vocab)) return;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, logits[off + j]);
    mx = block_max(mx);
    float sum = 0.f;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) sum += expf(logits[off + j] - mx);
    sum = block_sum(sum);
    const float lse = mx + logf(sum);
    if (threadIdx.x == 0) {
        atomicAdd(sums, (double)(lse - logits[off + t]));
        atomicAdd(sums + 1, 1.0);
    }
    const float p = scale / sum;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        dlogits[off + j] = expf(logits[off + j] - mx) * p - (j == t ? scale : 0.f);
    }
}

// The softmax of a counted row from its values held in registers by the block (−inf where there is
// none) and, in thread 0, the target's logit xt (fetched by the caller ahead of time: a load here
// would put its latency on every row's critical path). Each exponential is taken once: v becomes
// exp(v − max), and the gradient is v · (scale / sum) − scale at the target (Cpu::cross_entropy
// computes the same). Adds the row's loss and count to sums; returns scale / sum.
template <int N>
__device__ __forceinline__ float row_softmax(float (&v)[N], float xt, double* sums, float scale) {
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < N; i++) mx = fmaxf(mx, v[i]);
    mx = block_max(mx);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < N; i++) {
        v[i] = expf(v[i] - mx);  // exp(-inf) = 0 past the end
        sum += v[i];
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        atomicAdd(sums, (double)(mx + logf(sum) - xt));
        atomicAdd(sums + 1, 1.0);
    }
    return scale / sum;
}

// The loss and gradient of row `off` (target t, counted) from its values j = threadIdx.x +
// XENT_THREADS·i held in v.
template <int VPT>
__device__ __forceinline__ void row_from_registers(float (&v)[VPT], float xt, float* dlogits, int64_t off, int t, double* sums, int vocab, float scale) {
    const float p = row_softmax<VPT>(v, xt, sums, scale);
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int j = threadIdx.x + XENT_THREADS * i;
        if (j < vocab) dlogits[off + j] = v[i] * p - (j == t ? scale : 0.f);
    }
}

// A block per row, its values loaded into registers; for vocab ≤ XENT_THREADS·VPT.
template <int VPT>
__device__ void cross_entropy_reg(const float* logits, const int* targets, float* dlogits, double* sums, int vocab, float scale) {
    const int64_t off = (int64_t)blockIdx.x * vocab;
    const int t = targets[blockIdx.x];
    if (skip_row(dlogits, off, t, sums, vocab)) return;
    const float xt = threadIdx.x == 0 ? logits[off + t] : 0.f;
    float v[VPT];
#pragma unroll
    for (int i = 0; i < VPT; i++) {
        const int j = threadIdx.x + XENT_THREADS * i;
        v[i] = j < vocab ? logits[off + j] : -INFINITY;
    }
    row_from_registers<VPT>(v, xt, dlogits, off, t, sums, vocab, scale);
}
#define XENT_REG(VPT) \
    extern "C" __global__ void __launch_bounds__(XENT_THREADS, 1) cross_entropy_reg##VPT(const float* logits, const int* targets, float* dlogits, double* sums, int vocab, float scale) { \
        grid_dependency_wait(); \
        cross_entropy_reg<VPT>(logits, targets, dlogits, sums, vocab, scale); \
    }
XENT_REG(8)
XENT_REG(16)
XENT_REG(32)

// Persistent blocks (one per SM: the row in registers takes the whole register file) walk rows
// blockIdx.x, + gridDim.x. While one row is reduced and its gradient written from registers, the
// next row streams into shared memory by cp.async, so reading logits overlaps writing gradients;
// cross_entropy_reg has one row per SM at a time and alternates the two (~64% of copy bandwidth at
// 2048 × 32000 on the H200). Each thread holds four consecutive values per step (j = 4·(threadIdx.x +
// XENT_THREADS·i) + 0..3), so the gradient goes out in 16-byte (f32) or 8-byte (16-bit) stores. Needs
// rows of whole 16-byte pieces (vocab % 4 == 0 for f32 logits, % 8 for 16-bit ones) and a row of
// logits in dynamic shared memory (VPT·4 KiB reserved by the launcher: the f32 row).
template <int VPT, typename TIn, typename TOut>
__device__ void cross_entropy_stream(const TIn* logits, const int* targets, TOut* dlogits, double* sums, int rows, int vocab, float scale) {
    constexpr int GROUPS = VPT / 4;               // groups of four values per thread
    constexpr int PER_COPY = 16 / sizeof(TIn);    // logits per 16-byte copy
    extern __shared__ float4 next_row_raw[];      // (vocab) the logits of the block's next row
    const TIn* next_row = reinterpret_cast<const TIn*>(next_row_raw);
    const uint32_t next_addr = smem_addr(next_row_raw);
    const int vocab4 = vocab / 4, copies = vocab / PER_COPY;
    auto prefetch = [&](int r) {
        const TIn* src = logits + (int64_t)r * vocab;
        for (int c = threadIdx.x; c < copies; c += XENT_THREADS) cp_async16(next_addr + 16 * c, src + PER_COPY * c, true);
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
        for (int g = 0; g < GROUPS; g++) {
            const int c = threadIdx.x + XENT_THREADS * g;
            const float4 q = c < vocab4 ? load4(next_row + 4 * c) : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
            v[4 * g] = q.x, v[4 * g + 1] = q.y, v[4 * g + 2] = q.z, v[4 * g + 3] = q.w;
        }
        const float xt = threadIdx.x == 0 && t >= 0 && t < vocab ? load1(next_row + t) : 0.f;
        __syncthreads();  // every thread holds its values: the buffer takes the following row
        if (r + gridDim.x < rows) prefetch(r + gridDim.x), next_target = targets[r + gridDim.x];
        const int64_t off = (int64_t)r * vocab;
        if (skip_row(dlogits, off, t, sums, vocab)) continue;
        const float p = row_softmax<VPT>(v, xt, sums, scale);
#pragma unroll
        for (int g = 0; g < GROUPS; g++) {
            const int c = threadIdx.x + XENT_THREADS * g, j = 4 * c;
            if (c < vocab4)
                store4(dlogits + off + j, make_float4(v[4 * g] * p - (j == t ? scale : 0.f), v[4 * g + 1] * p - (j + 1 == t ? scale : 0.f),
                                                           v[4 * g + 2] * p - (j + 2 == t ? scale : 0.f), v[4 * g + 3] * p - (j + 3 == t ? scale : 0.f)));
        }
    }
}
#define XENT_STREAM(VPT, SUFFIX, T) \
    extern "C" __global__ void __launch_bounds__(XENT_THREADS, 1) cross_entropy_stream##VPT##SUFFIX(const T* logits, const int* targets, T* dlogits, double* sums, int rows, int vocab, float scale) { \
        grid_dependency_wait(); \
        cross_entropy_stream<VPT, T, T>(logits, targets, dlogits, sums, rows, vocab, scale); \
    }
XENT_STREAM(8, , float)
XENT_STREAM(16, , float)
XENT_STREAM(32, , float)
XENT_STREAM(8, _bf16, __nv_bfloat16)
XENT_STREAM(16, _bf16, __nv_bfloat16)
XENT_STREAM(32, _bf16, __nv_bfloat16)
XENT_STREAM(8, _f16, __half)
XENT_STREAM(16, _f16, __half)
XENT_STREAM(32, _f16, __half)

// ---- two passes over each row from global memory: vocabularies that are a multiple of 4 -----------
// For the rows the kernels above do not take (past 1024 × 32 values, or no whole 16-byte copies):
// Llama-3's 128,256 or SmolLM2's 49,152, in 16 bits as an LM head writes them. A row is read twice:
// pass 1 keeps a running max and a sum of exponentials rescaled to it (online softmax, one block
// reduction of (max, sum) pairs per row), pass 2 reads the row again, from L2, and writes the
// gradient. Nothing of the row is held, so XENT2_BLOCKS blocks of XENT2_THREADS share an SM and one
// block's reduction overlaps the others' traffic; the launcher keeps gridDim.x small enough
// (persistent blocks) that the rows in flight stay in L2 between the passes. At 2048 × 32000 it is
// slower than the streaming kernel (bf16 ~108 µs with every logit read once from DRAM, at 46% of
// its peak: two exponentials per logit and the latency bind; docs/PERF.md, session 21).
// Each thread takes groups of four consecutive values (16-byte f32 or 8-byte 16-bit accesses), the
// same groups for every dtype, so bf16 logits that are exact give the f32 kernel's values bit for bit.
// Exponentials as 2^x (common.cuh exp2_ftz: ex2.approx, relative error ~2^-22):
// e^(v − max) = 2^(v·log2 e − max·log2 e).
#define XENT2_THREADS 512
#define XENT2_UNROLL 3
#define XENT2_BLOCKS 3  // per SM: 1,536 threads at ≤ 42 registers each

// e^(v − m) where mL = m·log2 e.
__device__ __forceinline__ float exp_minus(float v, float mL) { return exp2_ftz(fmaf(v, LOG2E, -mL)); }
// (m, s) and (om, os), each a max and a sum of e^(v − max), as one pair; a side with max −inf has
// sum 0 (no values), so its factor is taken as 1 rather than 2^(−inf + inf).
__device__ __forceinline__ void combine_max_sum(float& m, float& s, float om, float os) {
    const float nm = fmaxf(m, om);
    s = s * (m == nm ? 1.f : exp2_ftz((m - nm) * LOG2E)) + os * (om == nm ? 1.f : exp2_ftz((om - nm) * LOG2E));
    m = nm;
}

// Pass 2's accesses as streaming ones (ld/st .cs: evict first): the gradient is written once and the
// row read for the last time, so neither should push the rows still between their passes out of L2.
__device__ __forceinline__ float4 load4_last(const float* p) { return __ldcs(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ float4 load4_last(const __nv_bfloat16* p) { return unpack_bf16x4(__ldcs(reinterpret_cast<const uint2*>(p))); }
__device__ __forceinline__ float4 load4_last(const __half* p) { return unpack_f16x4(__ldcs(reinterpret_cast<const uint2*>(p))); }
__device__ __forceinline__ void store4_stream(float* p, float4 v) { __stcs(reinterpret_cast<float4*>(p), v); }
__device__ __forceinline__ void store4_stream(__nv_bfloat16* p, float4 v) { __stcs(reinterpret_cast<uint2*>(p), pack_bf16x4(v)); }
__device__ __forceinline__ void store4_stream(__half* p, float4 v) { __stcs(reinterpret_cast<uint2*>(p), pack_f16x4(v)); }

template <typename T>
__device__ void cross_entropy_two_pass(const T* logits, const int* targets, T* dlogits, double* sums, int rows, int vocab, float scale) {
    __shared__ float red_m[2][XENT2_THREADS / WARP], red_s[2][XENT2_THREADS / WARP];  // by row parity
    const int groups = vocab / 4, lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    constexpr int NW = XENT2_THREADS / WARP, STEP = XENT2_THREADS * XENT2_UNROLL;
    int next_target = blockIdx.x < rows ? targets[blockIdx.x] : 0;
    int parity = 0;  // which reduction slots this row uses: they alternate between reduced rows
    for (int r = blockIdx.x; r < rows; r += gridDim.x) {
        const int t = next_target;
        if (r + gridDim.x < rows) next_target = targets[r + gridDim.x];
        const int64_t off = (int64_t)r * vocab;
        if (skip_row(dlogits, off, t, sums, vocab)) continue;
        const T* row = logits + off;
        const float xt = threadIdx.x == 0 ? load1(row + t) : 0.f;
        // Pass 1: this thread's max and sum, XENT2_UNROLL groups loaded before any is used.
        float m = -INFINITY, s = 0.f;
        for (int g0 = threadIdx.x; g0 < groups; g0 += STEP) {
            float4 v[XENT2_UNROLL];
#pragma unroll
            for (int u = 0; u < XENT2_UNROLL; u++) {
                const int g = g0 + u * XENT2_THREADS;
                v[u] = g < groups ? load4(row + 4 * g) : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
            }
            float cm = m;
#pragma unroll
            for (int u = 0; u < XENT2_UNROLL; u++) cm = fmaxf(cm, fmaxf(fmaxf(v[u].x, v[u].y), fmaxf(v[u].z, v[u].w)));
            if (cm > m) s *= exp2_ftz((m - cm) * LOG2E), m = cm;  // s is 0 while m is −inf
            const float mL = m * LOG2E;
#pragma unroll
            for (int u = 0; u < XENT2_UNROLL; u++) s += (exp_minus(v[u].x, mL) + exp_minus(v[u].y, mL)) + (exp_minus(v[u].z, mL) + exp_minus(v[u].w, mL));
        }
        // The block's pair: over the warp, then the warps' pairs combined by every warp alike.
#pragma unroll
        for (int o = WARP / 2; o > 0; o >>= 1) combine_max_sum(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
        if (lane == 0) red_m[parity][wid] = m, red_s[parity][wid] = s;
        // This barrier also orders every warp's reads of the other slots (the previous reduced row)
        // before any warp writes them for the next one.
        __syncthreads();
        m = lane < NW ? red_m[parity][lane] : -INFINITY;
        s = lane < NW ? red_s[parity][lane] : 0.f;
        parity ^= 1;
#pragma unroll
        for (int o = WARP / 2; o > 0; o >>= 1) combine_max_sum(m, s, __shfl_xor_sync(0xffffffffu, m, o), __shfl_xor_sync(0xffffffffu, s, o));
        if (threadIdx.x == 0) {
            atomicAdd(sums, (double)(m + logf(s) - xt));
            atomicAdd(sums + 1, 1.0);
        }
        // Pass 2: the gradient, e^(v − max) · scale / sum − scale at the target.
        const float p = scale / s, mL = m * LOG2E;
        for (int g0 = threadIdx.x; g0 < groups; g0 += STEP) {
            float4 v[XENT2_UNROLL];
#pragma unroll
            for (int u = 0; u < XENT2_UNROLL; u++) {
                const int g = g0 + u * XENT2_THREADS;
                if (g < groups) v[u] = load4_last(row + 4 * g);
            }
#pragma unroll
            for (int u = 0; u < XENT2_UNROLL; u++) {
                const int g = g0 + u * XENT2_THREADS, j = 4 * g;
                if (g < groups)
                    store4_stream(dlogits + off + j, make_float4(exp_minus(v[u].x, mL) * p - (j == t ? scale : 0.f), exp_minus(v[u].y, mL) * p - (j + 1 == t ? scale : 0.f),
                                                          exp_minus(v[u].z, mL) * p - (j + 2 == t ? scale : 0.f), exp_minus(v[u].w, mL) * p - (j + 3 == t ? scale : 0.f)));
            }
        }
    }
}
#define XENT_TWO_PASS(SUFFIX, T) \
    extern "C" __global__ void __launch_bounds__(XENT2_THREADS, XENT2_BLOCKS) cross_entropy_two_pass##SUFFIX(const T* logits, const int* targets, T* dlogits, double* sums, int rows, int vocab, float scale) { \
        grid_dependency_wait(); \
        cross_entropy_two_pass<T>(logits, targets, dlogits, sums, rows, vocab, scale); \
    }
XENT_TWO_PASS(_f32, float)
XENT_TWO_PASS(_bf16, __nv_bfloat16)
XENT_TWO_PASS(_f16, __half)
