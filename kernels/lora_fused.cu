// The LoRA branch at training shapes, fused around its dropout: y += scale·(drop(x)·Aᵀ)·Bᵀ forward;
// dA += duᵀ·drop(x) and dx += drop'(du·A) backward, with the dropout mask regenerated from its seed
// wherever x or dx is touched (never stored, never materialized as a dropped copy of x). TF32 tensor
// cores (mma.m16n8k8), f32 accumulation, as the cuBLAS TF32 path they replace. Launchers:
// Cuda::lora_forward / lora_backward (src/backend/cuda/mod.rs); CPU reference: Cpu::lora_forward /
// lora_backward (src/backend/cpu.rs). Every kernel here is memory-bound at r ≤ 64 (the products are
// 2·m·r·K FLOPs against m·K values read), so the design goal is streaming x, y and dx once with
// enough bytes in flight; the splits over the reduction axis exist to fill the GPU with blocks.
// Shapes the launcher guarantees: K, N and r multiples of 4 (16-byte rows), r ≤ 64.
#include "common.cuh"

// mma.m16n8k8 TF32 fragments (PTX ISA), with g = lane / 4, t = lane % 4:
//   A (16×8, row major): a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)
//   B (8×8, col major):  b0 (k=t, n=g)  b1 (k=t+4, n=g)
//   C (16×8):            c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)
__device__ __forceinline__ uint32_t to_tf32(float v) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
}
__device__ __forceinline__ void mma_tf32(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ uint4 tf32x4(float4 v) { return make_uint4(to_tf32(v.x), to_tf32(v.y), to_tf32(v.z), to_tf32(v.w)); }
// v[i] · the dropout factor of element idx0 + i (p > 0 only: the caller skips it otherwise).
__device__ __forceinline__ float4 drop4(float4 v, uint64_t seed, float p, int64_t idx0) {
    v.x *= dropout_factor(seed, idx0, p), v.y *= dropout_factor(seed, idx0 + 1, p);
    v.z *= dropout_factor(seed, idx0 + 2, p), v.w *= dropout_factor(seed, idx0 + 3, p);
    return v;
}
__device__ __forceinline__ float4 ld4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }
__device__ __forceinline__ uint4 lds4(const uint32_t* p) { return *reinterpret_cast<const uint4*>(p); }

// ---- down: part[split] (m, r) = drop(x) (m, K) · W (r, K)ᵀ over the split's range of K ----------
// Block: 4 warps, 64 rows of x (16 per warp) × all r ≤ 8·NT columns; K in stages of 32, staged in
// shared memory as TF32 (dropout applied on the way in), double-buffered with the next stage's
// global loads held in registers. The k axis is a reduction, so the fragments may take it in any
// order both operands agree on: for sub-step j of a stage, fragment k-slots t and t+4 of lane (g, t)
// are columns 8t+2j and 8t+2j+1, so each lane reads its 8 columns of a row with two 16-byte shared
// loads (row stride 36 words: the 8 lanes of each load phase hit 32 distinct banks).
#define DOWN_ROWS 64
#define STAGE_K 32
#define DOWN_STRIDE 36
#define DOWN_THREADS 128

template <int NT>
__device__ void lora_down(const float* x, const float* w, float* part, int m, int K, int r, int k_split, uint64_t seed, float p) {
    __shared__ __align__(16) uint32_t xs[2][DOWN_ROWS * DOWN_STRIDE];  // (64 rows, 32 k) + pad
    __shared__ __align__(16) uint32_t ws[2][8 * NT * DOWN_STRIDE];     // (8·NT rows of W, 32 k) + pad
    constexpr int XV = DOWN_ROWS * STAGE_K / 4 / DOWN_THREADS;              // x float4s per thread: 4
    constexpr int WV = (8 * NT * STAGE_K / 4 + DOWN_THREADS - 1) / DOWN_THREADS;  // W float4s: NT/2
    const int row0 = blockIdx.x * DOWN_ROWS;
    const int k_begin = blockIdx.y * k_split, k_end = min(K, k_begin + k_split);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, t = lane % 4;
    float4 xr[XV], wr[WV];
    // Stage k0's global loads into registers (zeros past the edges). Thread i's float4 q covers row
    // (i + 128q) / 8, columns 4·((i + 128q) % 8)..+3 of the stage.
    auto load = [&](int k0) {
#pragma unroll
        for (int q = 0; q < XV; q++) {
            const int e = threadIdx.x + q * DOWN_THREADS, row = row0 + e / 8, k = k0 + 4 * (e % 8);
            xr[q] = row < m && k < k_end ? ld4(x + (int64_t)row * K + k) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int q = 0; q < WV; q++) {
            const int e = threadIdx.x + q * DOWN_THREADS, n = e / 8, k = k0 + 4 * (e % 8);
            wr[q] = n < r && k < k_end ? ld4(w + (int64_t)n * K + k) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    // The dropout mask is applied here, not at the load: the loads stay in flight during a stage's
    // products, and the factors do not wait on them.
    auto store = [&](int buf, int k0) {
#pragma unroll
        for (int q = 0; q < XV; q++) {
            const int e = threadIdx.x + q * DOWN_THREADS, row = row0 + e / 8, k = k0 + 4 * (e % 8);
            const float4 v = p > 0.f ? drop4(xr[q], seed, p, (int64_t)row * K + k) : xr[q];
            *reinterpret_cast<uint4*>(&xs[buf][(e / 8) * DOWN_STRIDE + 4 * (e % 8)]) = tf32x4(v);
        }
#pragma unroll
        for (int q = 0; q < WV; q++) {
            const int e = threadIdx.x + q * DOWN_THREADS;
            if (e < 8 * NT * STAGE_K / 4) *reinterpret_cast<uint4*>(&ws[buf][(e / 8) * DOWN_STRIDE + 4 * (e % 8)]) = tf32x4(wr[q]);
        }
    };
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const int stages = (k_end - k_begin + STAGE_K - 1) / STAGE_K;
    load(k_begin);
    for (int s = 0; s < stages; s++) {
        const int buf = s & 1;
        store(buf, k_begin + s * STAGE_K);
        // One barrier per stage: the buffer written next (s+1) was last read in stage s−1, which
        // every warp finished before passing this barrier.
        __syncthreads();
        if (s + 1 < stages) load(k_begin + (s + 1) * STAGE_K);
        const uint32_t* xa = &xs[buf][(warp * 16 + g) * DOWN_STRIDE + 8 * t];
        const uint4 x0 = lds4(xa), x1 = lds4(xa + 4), x8 = lds4(xa + 8 * DOWN_STRIDE), x9 = lds4(xa + 8 * DOWN_STRIDE + 4);
        const uint32_t ag[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};  // row g, columns 8t..8t+7
        const uint32_t ah[8] = {x8.x, x8.y, x8.z, x8.w, x9.x, x9.y, x9.z, x9.w};  // row g+8
#pragma unroll
        for (int n = 0; n < NT; n++) {
            const uint32_t* wb = &ws[buf][(n * 8 + g) * DOWN_STRIDE + 8 * t];
            const uint4 w0 = lds4(wb), w1 = lds4(wb + 4);
            const uint32_t b[8] = {w0.x, w0.y, w0.z, w0.w, w1.x, w1.y, w1.z, w1.w};
#pragma unroll
            for (int j = 0; j < 4; j++) mma_tf32(acc[n], ag[2 * j], ah[2 * j], ag[2 * j + 1], ah[2 * j + 1], b[2 * j], b[2 * j + 1]);
        }
    }
    float* out = part + (int64_t)blockIdx.y * m * r;
    const int ra = row0 + warp * 16 + g, rb = ra + 8;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const int c = n * 8 + 2 * t;  // r is a multiple of 4, so c < r implies c + 1 < r
        if (c >= r) continue;
        if (ra < m) *reinterpret_cast<float2*>(out + (int64_t)ra * r + c) = make_float2(acc[n][0], acc[n][1]);
        if (rb < m) *reinterpret_cast<float2*>(out + (int64_t)rb * r + c) = make_float2(acc[n][2], acc[n][3]);
    }
}
#define LORA_DOWN(name, NT) \
    extern "C" __global__ void __launch_bounds__(DOWN_THREADS, 4) name(const float* x, const float* w, float* part, int m, int K, int r, int k_split, uint64_t seed, float p) { \
        lora_down<NT>(x, w, part, m, K, r, k_split, seed, p); \
    }
LORA_DOWN(lora_down_r16, 2)
LORA_DOWN(lora_down_r32, 4)
LORA_DOWN(lora_down_r64, 8)

// ---- the sum of split partials: out = [out +] alpha · Σ_s part[s], part[s] (a, b) -----------------
// transpose = 0: out (a, b); 1: out (b, a) (dB is computed as (dBᵀ) = uᵀ·dy, r × rows).
extern "C" __global__ void lora_sum_splits(const float* part, float* out, int splits, int a, int b, float alpha, int accumulate, int transpose) {
    const int64_t n = (int64_t)a * b;
    FOR_EACH(i, n) {
        float s = 0.f;
        for (int k = 0; k < splits; k++) s += part[k * n + i];
        const int64_t o = transpose ? (i % b) * a + i / b : i;
        out[o] = (accumulate ? out[o] : 0.f) + alpha * s;
    }
}

// ---- up: out (m, N) += alpha · [drop] (U (m, r) · W'ᵀ) ------------------------------------------
// W' (N, r) is given either as W (N, r) (forward: B) or transposed as W (r, N) (backward: A, for
// dx += drop'(du·A), whose mask applies to the product before it is added). K = r ≤ 64 is small, so
// a block stages its whole U tile (64 rows) and W' tile (64 columns of out) once, as TF32, and each
// warp computes 16 rows × 64 columns; out is read and written once, which is the cost.
// Fragments read shared memory one word at a time in the natural k order; the strides keep each
// load's 32 lanes on 32 banks: U and W (N, r) tiles as (row, k) with stride r8 + 4 (r8 = r rounded
// up to 8), W (r, N) as (k, n) with stride 72.
#define UP_ROWS 64
#define UP_COLS 64
#define UP_THREADS 128
#define UP_KN_STRIDE 72

extern "C" __global__ void __launch_bounds__(UP_THREADS) lora_up(const float* u, const float* w, float* out, int m, int N, int r, int w_is_rn, float alpha, uint64_t seed, float p) {
    __shared__ __align__(16) uint32_t us[UP_ROWS * 68];
    __shared__ __align__(16) uint32_t wsh[64 * UP_KN_STRIDE];  // (64 n, 68) or (64 k, 72)
    const int r8 = (r + 7) / 8 * 8, rs = r8 + 4;
    const int row0 = blockIdx.y * UP_ROWS, col0 = blockIdx.x * UP_COLS;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, t = lane % 4;
    const int kq = r8 / 4;  // float4s per staged row of length r8
    for (int e = threadIdx.x; e < UP_ROWS * kq; e += UP_THREADS) {
        const int row = row0 + e / kq, k = 4 * (e % kq);
        const float4 v = row < m && k < r ? ld4(u + (int64_t)row * r + k) : make_float4(0.f, 0.f, 0.f, 0.f);
        *reinterpret_cast<uint4*>(&us[(e / kq) * rs + k]) = tf32x4(v);
    }
    if (w_is_rn) {
        for (int e = threadIdx.x; e < r8 * (UP_COLS / 4); e += UP_THREADS) {
            const int k = e / (UP_COLS / 4), n = 4 * (e % (UP_COLS / 4));
            const float4 v = k < r && col0 + n < N ? ld4(w + (int64_t)k * N + col0 + n) : make_float4(0.f, 0.f, 0.f, 0.f);
            *reinterpret_cast<uint4*>(&wsh[k * UP_KN_STRIDE + n]) = tf32x4(v);
        }
    } else {
        for (int e = threadIdx.x; e < UP_COLS * kq; e += UP_THREADS) {
            const int n = e / kq, k = 4 * (e % kq);
            const float4 v = col0 + n < N && k < r ? ld4(w + (int64_t)(col0 + n) * r + k) : make_float4(0.f, 0.f, 0.f, 0.f);
            *reinterpret_cast<uint4*>(&wsh[n * rs + k]) = tf32x4(v);
        }
    }
    __syncthreads();
    float acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const uint32_t* ua = &us[(warp * 16 + g) * rs + t];
    for (int k0 = 0; k0 < r8; k0 += 8) {
        const uint32_t a0 = ua[k0], a1 = ua[k0 + 8 * rs], a2 = ua[k0 + 4], a3 = ua[k0 + 8 * rs + 4];
#pragma unroll
        for (int n = 0; n < 8; n++) {
            uint32_t b0, b1;
            if (w_is_rn) {
                b0 = wsh[(k0 + t) * UP_KN_STRIDE + n * 8 + g], b1 = wsh[(k0 + t + 4) * UP_KN_STRIDE + n * 8 + g];
            } else {
                b0 = wsh[(n * 8 + g) * rs + k0 + t], b1 = wsh[(n * 8 + g) * rs + k0 + t + 4];
            }
            mma_tf32(acc[n], a0, a1, a2, a3, b0, b1);
        }
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int row = row0 + warp * 16 + g + 8 * h;
        if (row >= m) continue;
#pragma unroll
        for (int n = 0; n < 8; n++) {
            const int c = col0 + n * 8 + 2 * t;  // N is a multiple of 4: c < N implies c + 1 < N
            if (c >= N) continue;
            float2* o = reinterpret_cast<float2*>(out + (int64_t)row * N + c);
            float v0 = alpha * acc[n][2 * h], v1 = alpha * acc[n][2 * h + 1];
            if (p > 0.f) {
                const int64_t idx = (int64_t)row * N + c;
                v0 *= dropout_factor(seed, idx, p), v1 *= dropout_factor(seed, idx + 1, p);
            }
            const float2 old = *o;
            *o = make_float2(old.x + v0, old.y + v1);
        }
    }
}

// ---- outer: part[split] (r, N) = S (m, r)ᵀ · [drop] (T (m, N)) over the split's range of m --------
// dA = duᵀ·drop(x) (S = du, T = x, masked) and dBᵀ = uᵀ·dy (S = u, T = dy). Block: 4 warps, 32
// columns of T (8 per warp) × all r8 ≤ 64 rows of the result; m in stages of 32 rows staged as TF32
// in shared memory (dropout applied on the way in), double-buffered like `down`. Fragments read one
// word at a time in the natural k (= row of S, T) order: S staged as (k, r) with stride r8 + 8 and T
// as (k, n) with stride 40 keep every load on 32 banks.
#define OUTER_COLS 32
#define OUTER_THREADS 128
#define OUTER_T_STRIDE 40

template <int MT>  // 16-row tiles of the result: r ≤ 16·MT
__device__ void lora_outer(const float* S, const float* T, float* part, int m, int N, int r, int m_split, uint64_t seed, float p) {
    constexpr int R = 16 * MT, SS = R + 8;
    __shared__ __align__(16) uint32_t ss[2][STAGE_K * SS];
    __shared__ __align__(16) uint32_t ts[2][STAGE_K * OUTER_T_STRIDE];
    constexpr int SV = (STAGE_K * R / 4 + OUTER_THREADS - 1) / OUTER_THREADS;  // S float4s per thread
    constexpr int TV = STAGE_K * OUTER_COLS / 4 / OUTER_THREADS;                // T float4s: 2
    const int col0 = blockIdx.x * OUTER_COLS;
    const int m_begin = blockIdx.y * m_split, m_end = min(m, m_begin + m_split);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, t = lane % 4;
    float4 sr[SV], tr[TV];
    auto load = [&](int k0) {
#pragma unroll
        for (int q = 0; q < SV; q++) {
            const int e = threadIdx.x + q * OUTER_THREADS, k = k0 + e / (R / 4), i = 4 * (e % (R / 4));
            sr[q] = e < STAGE_K * R / 4 && k < m_end && i < r ? ld4(S + (int64_t)k * r + i) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int q = 0; q < TV; q++) {
            const int e = threadIdx.x + q * OUTER_THREADS, k = k0 + e / (OUTER_COLS / 4), n = col0 + 4 * (e % (OUTER_COLS / 4));
            const bool in = k < m_end && n < N;
            tr[q] = in ? ld4(T + (int64_t)k * N + n) : make_float4(0.f, 0.f, 0.f, 0.f);
        }
    };
    auto store = [&](int buf, int k0) {  // the mask applied here, as in `down`
#pragma unroll
        for (int q = 0; q < SV; q++) {
            const int e = threadIdx.x + q * OUTER_THREADS;
            if (e < STAGE_K * R / 4) *reinterpret_cast<uint4*>(&ss[buf][(e / (R / 4)) * SS + 4 * (e % (R / 4))]) = tf32x4(sr[q]);
        }
#pragma unroll
        for (int q = 0; q < TV; q++) {
            const int e = threadIdx.x + q * OUTER_THREADS, k = k0 + e / (OUTER_COLS / 4), n = col0 + 4 * (e % (OUTER_COLS / 4));
            const float4 v = p > 0.f ? drop4(tr[q], seed, p, (int64_t)k * N + n) : tr[q];
            *reinterpret_cast<uint4*>(&ts[buf][(e / (OUTER_COLS / 4)) * OUTER_T_STRIDE + 4 * (e % (OUTER_COLS / 4))]) = tf32x4(v);
        }
    };
    float acc[MT][4];
#pragma unroll
    for (int i = 0; i < MT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    const int stages = (m_end - m_begin + STAGE_K - 1) / STAGE_K;
    load(m_begin);
    for (int s = 0; s < stages; s++) {
        const int buf = s & 1;
        store(buf, m_begin + s * STAGE_K);
        __syncthreads();  // as in `down`: one barrier per stage with two buffers
        if (s + 1 < stages) load(m_begin + (s + 1) * STAGE_K);
#pragma unroll
        for (int k0 = 0; k0 < STAGE_K; k0 += 8) {
            const uint32_t b0 = ts[buf][(k0 + t) * OUTER_T_STRIDE + warp * 8 + g];
            const uint32_t b1 = ts[buf][(k0 + t + 4) * OUTER_T_STRIDE + warp * 8 + g];
#pragma unroll
            for (int i = 0; i < MT; i++) {
                const uint32_t* sa = &ss[buf][(k0 + t) * SS + i * 16 + g];
                mma_tf32(acc[i], sa[0], sa[8], sa[4 * SS], sa[4 * SS + 8], b0, b1);
            }
        }
    }
    float* out = part + (int64_t)blockIdx.y * r * N;
    const int c = col0 + warp * 8 + 2 * t;  // N is a multiple of 4: c < N implies c + 1 < N
    if (c >= N) return;
#pragma unroll
    for (int i = 0; i < MT; i++) {
        const int ra = i * 16 + g, rb = ra + 8;
        if (ra < r) *reinterpret_cast<float2*>(out + (int64_t)ra * N + c) = make_float2(acc[i][0], acc[i][1]);
        if (rb < r) *reinterpret_cast<float2*>(out + (int64_t)rb * N + c) = make_float2(acc[i][2], acc[i][3]);
    }
}
#define LORA_OUTER(name, MT) \
    extern "C" __global__ void __launch_bounds__(OUTER_THREADS, 4) name(const float* S, const float* T, float* part, int m, int N, int r, int m_split, uint64_t seed, float p) { \
        lora_outer<MT>(S, T, part, m, N, r, m_split, seed, p); \
    }
LORA_OUTER(lora_outer_r16, 1)
LORA_OUTER(lora_outer_r32, 2)
LORA_OUTER(lora_outer_r64, 4)
