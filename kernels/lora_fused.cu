// The LoRA branch at training shapes, fused around its dropout: y += scale·(drop(x)·Aᵀ)·Bᵀ forward;
// dA += duᵀ·drop(x) and dx += drop'(du·A) backward, with the dropout mask regenerated from its seed
// wherever x or dx is touched (never stored, never materialized as a dropped copy of x). TF32 tensor
// cores (mma.m16n8k8), f32 accumulation, as the cuBLAS TF32 path they replace. Operands are rounded
// to TF32 (nearest, ties away) by one integer add on their bits (`tf32`), the tensor cores ignoring
// the 13 low mantissa bits; plain truncation was cheaper still, but its bias flipped a near-tie in the
// GPU-vs-CPU greedy decoding test. Launchers: Cuda::lora_forward / lora_backward
// (src/backend/cuda/mod.rs); CPU reference: Cpu::lora_forward / lora_backward (src/backend/cpu.rs). Every kernel here is memory-bound at r ≤ 64 (the products are
// 2·m·r·K FLOPs against m·K values read), so the design goal is streaming x, y and dx once with
// enough bytes in flight; the splits over the reduction axis exist to fill the GPU with blocks.
// Shapes the launcher guarantees: K, N and r multiples of 4 (16-byte rows), r ≤ 64.
#include <type_traits>

#include "common.cuh"

// mma.m16n8k8 TF32 fragments (PTX ISA), with g = lane / 4, t = lane % 4:
//   A (16×8, row major): a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)
//   B (8×8, col major):  b0 (k=t, n=g)  b1 (k=t+4, n=g)
//   C (16×8):            c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)
__device__ __forceinline__ void mma_tf32(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
// The dropout decisions of elements idx0..idx0+3 as bits (bit i: element idx0 + i is kept), p > 0.
// idx0 is even (callers pass 4-aligned pieces of rows whose lengths are multiples of 4), so the four
// decisions take two hashes (pairs share one, kernels/common.cuh); gathered up front, the independent
// hash chains overlap each other and the loads in flight.
__device__ __forceinline__ uint32_t keep_bits4(uint64_t seed, float p, int64_t idx0) {
    return dropout_pair_keep(seed, idx0 >> 1, p) | dropout_pair_keep(seed, (idx0 >> 1) + 1, p) << 2;
}
// v[i] · the dropout factor of element idx0 + i (p > 0 only: the caller skips it otherwise).
__device__ __forceinline__ float4 drop4(float4 v, uint64_t seed, float p, int64_t idx0) {
    const uint32_t keep = keep_bits4(seed, p, idx0);
    const float s = 1.f / (1.f - p);
    v.x *= keep & 1 ? s : 0.f, v.y *= keep & 2 ? s : 0.f, v.z *= keep & 4 ? s : 0.f, v.w *= keep & 8 ? s : 0.f;
    return v;
}
// v rounded to TF32 as cvt.rna does (nearest, ties away from zero) for finite v: add half of the
// last kept bit; the tensor cores drop the 13 low bits.
__device__ __forceinline__ uint32_t tf32(float v) { return __float_as_uint(v) + 0x1000u; }
__device__ __forceinline__ float4 ld4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }

// ---- down: part[split] (m, r) = drop(x) (m, K) · W (r, K)ᵀ over the split's range of K ----------
// Block: 4 or 8 warps, 64 or 128 rows of x (16 per warp) × all r ≤ 8·NT columns; K in stages of 32 copied raw
// (f32) into shared memory by cp.async, STAGES deep, so each block keeps STAGES−1 stages of loads in
// flight (ncu, H200: with one stage prefetched through registers, 16% of DRAM bandwidth). Dropout is
// applied as the fragments are read: each x value is read by exactly one lane.
// The k axis is a reduction, so the fragments may take it in any order both operands agree on: for
// sub-step j of a stage, fragment k-slots t and t+4 of lane (g, t) are columns 8t+2j and 8t+2j+1, so
// each lane reads its 8 columns of a row with two 16-byte shared loads (row stride 36 words: the 8
// lanes of each load phase hit 32 distinct banks).
#define STAGE_K 32
#define STAGES 4
#define DOWN_STRIDE 36

__device__ __forceinline__ float4 lds4f(const float* p) { return *reinterpret_cast<const float4*>(p); }
// The 8 values (a, b) as tensor-core operands, after the dropout factors of elements idx0..idx0+7
// when p > 0.
__device__ __forceinline__ void frag8(float4 a, float4 b, uint32_t (&o)[8], uint64_t seed, float p, int64_t idx0) {
    if (p > 0.f) a = drop4(a, seed, p, idx0), b = drop4(b, seed, p, idx0 + 4);
    o[0] = tf32(a.x), o[1] = tf32(a.y), o[2] = tf32(a.z), o[3] = tf32(a.w);
    o[4] = tf32(b.x), o[5] = tf32(b.y), o[6] = tf32(b.z), o[7] = tf32(b.w);
}

// The cp.async pipeline of both split kernels: stages 0..STAGES−2 requested up front; then, for each
// stage s, wait until it has landed for every thread, request stage s+STAGES−1 into the buffer that
// stage s−1 used (every warp finished reading it before this barrier), and run compute(s) on it.
template <typename Issue, typename Compute>
__device__ __forceinline__ void pipeline(int stages, Issue issue, Compute compute) {
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < stages) issue(s);
        cp_async_commit();
    }
    for (int s = 0; s < stages; s++) {
        cp_async_wait<STAGES - 2>();  // stage s has landed for this thread's copies ...
        __syncthreads();              // ... and for every thread's
        if (s + STAGES - 1 < stages) issue(s + STAGES - 1);
        cp_async_commit();
        compute(s);
    }
}

// The split kernels' branches: up to SPLIT_BRANCHES LoRA branches that read the same big operand
// (x: the projections of q/k/v, or gate/up) in one launch, each with its own small operand (A for
// `down`, du for `outer`), its partials (or output) and its dropout. Block x index = tile · count +
// branch, so the branches of one tile run side by side and x comes from DRAM once for all of them
// (ncu, H200, 7B: each branch's launch of its own read x at ~35% of DRAM bandwidth, three times). A
// single branch is a table of one. Laid out as src/backend/cuda/lora.rs `SplitBranches`.
#define SPLIT_BRANCHES 3
struct SplitBranches {
    const float* own[SPLIT_BRANCHES];
    float* part[SPLIT_BRANCHES];
    uint64_t seed[SPLIT_BRANCHES];
    float p[SPLIT_BRANCHES];
    int count;
};

// ROWS rows of x per block (64, or 128 with twice the warps: each stage's W tile then serves twice
// the rows, so a block reads W from L2 once per 128 rows instead of per 64; ncu had the 64-row kernel
// at 57% of L2 throughput, W's tile as large as x's).
template <int NT, int ROWS>
__device__ void lora_down(const float* x, const float* w, float* part, int m, int K, int r, int k_split, uint64_t seed, float p, int tile) {
    constexpr int THREADS = 2 * ROWS, CR = THREADS / 8;  // threads; rows a round of copies covers
    extern __shared__ __align__(16) float smem[];  // STAGES × [x (ROWS, 36) | W (8·NT, 36)]
    constexpr int XW = ROWS * DOWN_STRIDE, SW = XW + 8 * NT * DOWN_STRIDE;
    constexpr int XV = ROWS * STAGE_K / 4 / THREADS;              // x 16-byte copies per thread: 4
    constexpr int WV = (8 * NT * STAGE_K / 4 + THREADS - 1) / THREADS;  // W copies: 64·NT/THREADS
    const int row0 = tile * ROWS;
    const int k_begin = blockIdx.y * k_split, k_end = min(K, k_begin + k_split);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, t = lane % 4;
    const int stages = (k_end - k_begin + STAGE_K - 1) / STAGE_K;
    // Copies of stage s into buffer s % STAGES (zeros past the edges). Copy q of a thread is row
    // tr + CR·q of the stage's x tile (q < XV) or of W's (n = tr + CR·q < 8·NT), columns tc..tc+3:
    // the same rows and columns every stage but for the offset s·STAGE_K, so the source rows are
    // worked out once here (SASS: the per-stage address arithmetic was ~150 of the loop's 488
    // instructions).
    const int tr = threadIdx.x / 8, tc = 4 * (threadIdx.x % 8), kc = k_begin + tc;
    const float* xq[XV];  // copy q's source in stage 0 (nullptr: past the rows)
    const float* wq[WV];
#pragma unroll
    for (int q = 0; q < XV; q++) xq[q] = row0 + tr + CR * q < m ? x + (int64_t)(row0 + tr + CR * q) * K + kc : nullptr;
#pragma unroll
    for (int q = 0; q < WV; q++) wq[q] = tr + CR * q < r ? w + (int64_t)(tr + CR * q) * K + kc : nullptr;
    static_assert(XV * THREADS == ROWS * STAGE_K / 4, "the x copies cover its ROWS-row tile exactly");
    static_assert(WV * THREADS == 8 * NT * STAGE_K / 4, "the W copies cover its 8·NT-row tile exactly");
    auto issue = [&](int s) {
        const int off = s * STAGE_K;
        const bool kok = kc + off < k_end;
        float* xs = smem + (s % STAGES) * SW + tr * DOWN_STRIDE + tc;
#pragma unroll
        for (int q = 0; q < XV; q++) {
            const bool ok = kok && xq[q];
            cp_async16(smem_addr(xs + CR * q * DOWN_STRIDE), ok ? xq[q] + off : x, ok);
        }
#pragma unroll
        for (int q = 0; q < WV; q++) {
            const bool ok = kok && wq[q];
            cp_async16(smem_addr(xs + XW + CR * q * DOWN_STRIDE), ok ? wq[q] + off : w, ok);
        }
    };
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const int ra = row0 + warp * 16 + g;  // this lane's two rows of x: ra and ra + 8
    pipeline(stages, issue, [&](int s) {
        const float* xs = smem + (s % STAGES) * SW;
        const int kc = k_begin + s * STAGE_K + 8 * t;  // first of this lane's 8 columns
        const float* xa = xs + (warp * 16 + g) * DOWN_STRIDE + 8 * t;
        uint32_t ag[8], ah[8];  // rows ra and ra + 8, columns kc..kc+7
        frag8(lds4f(xa), lds4f(xa + 4), ag, seed, p, (int64_t)ra * K + kc);
        frag8(lds4f(xa + 8 * DOWN_STRIDE), lds4f(xa + 8 * DOWN_STRIDE + 4), ah, seed, p, (int64_t)(ra + 8) * K + kc);
#pragma unroll
        for (int n = 0; n < NT; n++) {
            const float* wb = xs + XW + (n * 8 + g) * DOWN_STRIDE + 8 * t;
            uint32_t b[8];
            frag8(lds4f(wb), lds4f(wb + 4), b, 0, 0.f, 0);
#pragma unroll
            for (int j = 0; j < 4; j++) mma_tf32(acc[n], ag[2 * j], ah[2 * j], ag[2 * j + 1], ah[2 * j + 1], b[2 * j], b[2 * j + 1]);
        }
    });
    float* out = part + (int64_t)blockIdx.y * m * r;
    const int rb = ra + 8;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const int c = n * 8 + 2 * t;  // r is a multiple of 4, so c < r implies c + 1 < r
        if (c >= r) continue;
        if (ra < m) *reinterpret_cast<float2*>(out + (int64_t)ra * r + c) = make_float2(acc[n][0], acc[n][1]);
        if (rb < m) *reinterpret_cast<float2*>(out + (int64_t)rb * r + c) = make_float2(acc[n][2], acc[n][3]);
    }
}
#define LORA_DOWN(name, NT, ROWS, BLOCKS) \
    extern "C" __global__ void __launch_bounds__(2 * ROWS, BLOCKS) name(const float* x, SplitBranches br, int m, int K, int r, int k_split) { \
        grid_dependency_wait(); \
        const int b = blockIdx.x % br.count; \
        lora_down<NT, ROWS>(x, br.own[b], br.part[b], m, K, r, k_split, br.seed[b], br.p[b], blockIdx.x / br.count); \
    }
LORA_DOWN(lora_down_r16, 2, 64, 3)
LORA_DOWN(lora_down_r32, 4, 64, 3)
LORA_DOWN(lora_down_r64, 8, 64, 3)
LORA_DOWN(lora_down128_r32, 4, 128, 2)
LORA_DOWN(lora_down128_r64, 8, 128, 2)

// ---- du: part[split] (m, r) = alpha · dy (m, K) · B (K, r) over the split's range of K, and dy16 ----
// The backward's du = scale·dy·B, reading dy (f32) once and writing it rounded to 16 bits on the way
// (dy16, unless null: the input gradient's GEMM operand, bit for bit what f32_to_bf16 / f32_to_f16
// give, which was a pass of its own over dy). The pipeline of `down`, with 128 rows of dy per block (8
// warps) so that each stage's B tile serves twice the rows; B arrives as it is stored, (K, r), and
// goes into shared memory as (k, n), so its fragments are scalar loads in the natural k order: b0
// (k = t, n = g) at t·BS + g, conflict-free for BS ≡ 8 (mod 32) and for BS = 24 (r ≤ 16); dy's at
// (row g, k = t) with stride 36. Each thread stores the 16-bit copies of the pieces it copied itself.
#define DU_ROWS 128
#define DU_THREADS 256

template <int NT, typename Out16>
__device__ void lora_du(const float* dy, const float* b, float* part, Out16* dy16, int m, int K, int r, int k_split, float alpha) {
    extern __shared__ __align__(16) float smem[];  // STAGES × [dy (128, 36) | B (32, 8·NT + 8)]
    constexpr int BS = 8 * NT + 8, XW = DU_ROWS * DOWN_STRIDE, SW = XW + STAGE_K * BS;
    constexpr int XV = DU_ROWS * STAGE_K / 4 / DU_THREADS;                       // dy copies per thread: 4
    constexpr int BP = STAGE_K * 2 * NT;                                         // B pieces per stage
    constexpr int BV = (BP + DU_THREADS - 1) / DU_THREADS;                       // per thread: 1 or 2
    const int row0 = blockIdx.x * DU_ROWS;
    const int k_begin = blockIdx.y * k_split, k_end = min(K, k_begin + k_split);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, t = lane % 4;
    const int stages = (k_end - k_begin + STAGE_K - 1) / STAGE_K;
    // Copy q of dy: row tr + 32q of the tile, columns tc..tc+3 of the stage; copy q of B: piece
    // e = thread + 256q, its row kb[q] of the stage and columns cb[q]..+3 (zeros past r). Sources and
    // dy16's destinations at stage 0 (nullptr: past m, or no such piece), offset per stage.
    const int tr = threadIdx.x / 8, tc = 4 * (threadIdx.x % 8), kc = k_begin + tc;
    const float* xq[XV];
    Out16* oq[XV];
#pragma unroll
    for (int q = 0; q < XV; q++) {
        const bool ok = row0 + tr + 32 * q < m;
        xq[q] = ok ? dy + (int64_t)(row0 + tr + 32 * q) * K + kc : nullptr;
        oq[q] = ok && dy16 ? dy16 + (int64_t)(row0 + tr + 32 * q) * K + kc : nullptr;
    }
    const float* bq[BV];
    int kb[BV], cb[BV];
#pragma unroll
    for (int q = 0; q < BV; q++) {
        const int e = threadIdx.x + DU_THREADS * q;
        kb[q] = e / (2 * NT), cb[q] = 4 * (e % (2 * NT));
        bq[q] = e < BP && cb[q] < r ? b + (int64_t)(k_begin + kb[q]) * r + cb[q] : nullptr;
    }
    auto issue = [&](int s) {
        const int off = s * STAGE_K;
        float* xs = smem + (s % STAGES) * SW;
        const bool kok = kc + off < k_end;
#pragma unroll
        for (int q = 0; q < XV; q++) {
            const bool ok = kok && xq[q];
            cp_async16(smem_addr(xs + (tr + 32 * q) * DOWN_STRIDE + tc), ok ? xq[q] + off : dy, ok);
        }
#pragma unroll
        for (int q = 0; q < BV; q++) {
            if (threadIdx.x + DU_THREADS * q >= BP) continue;
            const bool ok = bq[q] && k_begin + kb[q] + off < k_end;
            cp_async16(smem_addr(xs + XW + kb[q] * BS + cb[q]), ok ? bq[q] + (int64_t)off * r : b, ok);
        }
    };
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    pipeline(stages, issue, [&](int s) {
        const float* xs = smem + (s % STAGES) * SW;
        const int off = s * STAGE_K;
        if (kc + off < k_end) {
#pragma unroll
            for (int q = 0; q < XV; q++)
                if (oq[q]) store4(oq[q] + off, lds4f(xs + (tr + 32 * q) * DOWN_STRIDE + tc));
        }
        const float* xa = xs + (warp * 16 + g) * DOWN_STRIDE + t;
        const float* bb = xs + XW + t * BS + g;
#pragma unroll
        for (int j = 0; j < STAGE_K / 8; j++) {
            const uint32_t a0 = tf32(xa[8 * j]), a1 = tf32(xa[8 * j + 8 * DOWN_STRIDE]);
            const uint32_t a2 = tf32(xa[8 * j + 4]), a3 = tf32(xa[8 * j + 4 + 8 * DOWN_STRIDE]);
#pragma unroll
            for (int n = 0; n < NT; n++)
                mma_tf32(acc[n], a0, a1, a2, a3, tf32(bb[8 * j * BS + 8 * n]), tf32(bb[(8 * j + 4) * BS + 8 * n]));
        }
    });
    float* out = part + (int64_t)blockIdx.y * m * r;
    const int ra = row0 + warp * 16 + g, rb = ra + 8;
#pragma unroll
    for (int n = 0; n < NT; n++) {
        const int c = n * 8 + 2 * t;  // r is a multiple of 4, so c < r implies c + 1 < r
        if (c >= r) continue;
        if (ra < m) *reinterpret_cast<float2*>(out + (int64_t)ra * r + c) = make_float2(alpha * acc[n][0], alpha * acc[n][1]);
        if (rb < m) *reinterpret_cast<float2*>(out + (int64_t)rb * r + c) = make_float2(alpha * acc[n][2], alpha * acc[n][3]);
    }
}
#define LORA_DU(name, NT, T) \
    extern "C" __global__ void __launch_bounds__(DU_THREADS, 2) name(const float* dy, const float* b, float* part, T* dy16, int m, int K, int r, int k_split, float alpha) { \
        grid_dependency_wait(); \
        lora_du<NT, T>(dy, b, part, dy16, m, K, r, k_split, alpha); \
    }
LORA_DU(lora_du_r16_bf16, 2, __nv_bfloat16)
LORA_DU(lora_du_r32_bf16, 4, __nv_bfloat16)
LORA_DU(lora_du_r64_bf16, 8, __nv_bfloat16)
LORA_DU(lora_du_r16_f16, 2, __half)
LORA_DU(lora_du_r32_f16, 4, __half)
LORA_DU(lora_du_r64_f16, 8, __half)

// ---- the sum of split partials: out (n) = [out +] Σ_s part[s] (n), n a multiple of 4 --------------
// For branch blockIdx.y of the table: its partials are part + blockIdx.y · splits · n (one scratch
// for the launch's branches), its output the table's part pointer.
extern "C" __global__ void lora_sum_splits(const float* part, SplitBranches outs, int splits, int64_t n, int accumulate) {
    grid_dependency_wait();
    part += (int64_t)blockIdx.y * splits * n;
    float* out = outs.part[blockIdx.y];
    FOR_EACH(i, n / 4) {
        float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int k = 0; k < splits; k++) {
            const float4 v = __ldg(reinterpret_cast<const float4*>(part + k * n) + i);
            s.x += v.x, s.y += v.y, s.z += v.z, s.w += v.w;
        }
        float4* o = reinterpret_cast<float4*>(out) + i;
        const float4 old = accumulate ? *o : make_float4(0.f, 0.f, 0.f, 0.f);
        *o = make_float4(old.x + s.x, old.y + s.y, old.z + s.z, old.w + s.w);
    }
}

// ---- up: out (m, N) += alpha · [drop] (U (m, r) · W'ᵀ) ------------------------------------------
// W' (N, r) is given either as W (N, r) (forward: B) or transposed as W (r, N) (backward: A, for
// dx += drop'(du·A), whose mask applies to the product before it is added). K = r ≤ 64 is small, so
// a block copies its whole U tile (64 rows) and W' tile (64 columns of out) into shared memory once
// (cp.async) and each warp computes 16 rows × 64 columns; out is read and written once, which is
// the cost. So the block requests its share of out (16-byte row-contiguous loads) together with the
// tiles, and the products come back through shared memory to be added in that same layout (ncu,
// H200: reading out in the fragments' layout at the end gave 15% of DRAM bandwidth).
// Fragments read shared memory one word at a time in the natural k order; the strides keep each
// load's 32 lanes on 32 banks: U and W (N, r) tiles as (row, k) with stride 68, W (r, N) as (k, n)
// with stride 72; the product tile (row, n) with stride 72 (conflict-free 8-byte fragment stores).
#define UP_ROWS 64
#define UP_COLS 64
#define UP_THREADS 128
#define UP_STRIDE 68
#define UP_KN_STRIDE 72
#define UP_V (64 * 64 / 4 / UP_THREADS)  // 16-byte pieces per thread of a 64 × 64 tile: 8

// Where out's old value comes from: out itself (`float`: plain `lora_up`), or a frozen product's 16-bit
// output being widened into out (`lora_up_from_bf16/f16`: the LoRA B product lands in the same pass
// as the widening, instead of a widening pass and then a read and write of out; out's value is the
// same bit for bit: out [+ widen(base)] + the branch, added in that order). In two steps: every load
// of a thread's pieces is issued (`up_load`) before any is used (`up_old`); combining each piece as
// it came had each piece's loads wait for the one before when accumulating (ncu, H200, 7B: 54.7 µs
// against 40.6 without accumulating; SASS: each LDG's result used by the next FADD).
struct UpRaw {
    float4 out;  // out's piece (plain, or accumulating)
    uint2 base;  // the 16-bit product's piece, as loaded
};
// Piece i of out (and of base). Where `ok` is false (rows past m, columns past N) the address is
// clamped to piece 0 and the values are never stored (lora_up_tile skips such pieces), so nothing
// here waits for a load: a select on each loaded value had made every load wait for the one before.
template <typename Base>
__device__ __forceinline__ UpRaw up_load(const float* out, const Base* base, int64_t i, bool ok, int accumulate) {
    const int64_t at = ok ? i : 0;
    UpRaw r;
    r.out = make_float4(0.f, 0.f, 0.f, 0.f);
    r.base = make_uint2(0u, 0u);
    if constexpr (std::is_same_v<Base, float>) {
        r.out = *reinterpret_cast<const float4*>(out + at);
    } else {
        r.base = *reinterpret_cast<const uint2*>(base + at);
        if (accumulate) r.out = *reinterpret_cast<const float4*>(out + at);
    }
    return r;
}
__device__ __forceinline__ float4 unpack16x4(uint2 u, const __nv_bfloat16*) { return unpack_bf16x4(u); }
__device__ __forceinline__ float4 unpack16x4(uint2 u, const __half*) { return unpack_f16x4(u); }
template <typename Base>
__device__ __forceinline__ float4 up_old(const UpRaw& r, int accumulate) {
    if constexpr (std::is_same_v<Base, float>) {
        return r.out;
    } else {
        const float4 v = unpack16x4(r.base, static_cast<const Base*>(nullptr));
        return accumulate ? add4(r.out, v) : v;
    }
}

// The output column of a block's tile column j (0..63). Plain: 64 consecutive columns. For attention's
// saved inputs with RoPE (`lora_up_acts_*`, heads of rope_hd columns, rope_hd % 64 = 0): 32 columns of
// one head's first half and the 32 they rotate with in its second half, so every rotated pair is in
// one block (for head_dim 64 that is again 64 consecutive columns).
__device__ __forceinline__ int up_col(int bx, int j, int rope_hd) {
    if (rope_hd == 0) return bx * UP_COLS + j;
    const int groups = rope_hd / 64;  // 32-column groups per half head
    return (bx / groups) * rope_hd + (j / 32) * (rope_hd / 2) + 32 * (bx % groups) + j % 32;
}

// The block's 64 × 64 tile of out: ACTS false writes f32 `out`; ACTS true writes `out16` in bf16 (a
// projection's output straight into attention's saved inputs, Cuda::qkv_attn_acts), rotated by the
// tables cos, sin (rows, rope_hd/2) when rope_hd > 0 (rope_pairs on the same f32 values, so bit for bit
// lora_up_from_* and then rope_bf16).
// A block's shared memory, declared by each entry point (a `__shared__` array inside this template
// would be allocated once per instantiation, and an entry point instantiating two would hold both).
struct UpSmem {
    __align__(16) float us[UP_ROWS * UP_STRIDE];
    __align__(16) float wsh[64 * UP_KN_STRIDE];  // W' tile as (64 n, 68) or (64 k, 72); then the product (64, 72)
};
// Where a block's thread stands: piece q of the block's 64 × 64 tile is row i0 + 8q, columns j..j+3
// of the tile (i0 = thread / 16, j = 4·(thread % 16)), column c of out; a thread's pieces share their
// columns and step by 8 rows, so each address is worked out once and stepped (ncu, H200: 60
// instructions per output value before, the kernel issue-bound). at0: piece 0's index in out.
struct UpPlace {
    int row0, bx, i0, j, c;
    int64_t at0, step;
    __device__ __forceinline__ UpPlace(int N, int rope_hd) {
        row0 = blockIdx.y * UP_ROWS, bx = blockIdx.x;
        i0 = threadIdx.x / 16, j = 4 * (threadIdx.x % 16), c = up_col(bx, j, rope_hd);
        at0 = (int64_t)(row0 + i0) * N + c, step = 8 * (int64_t)N;
    }
};

// The block's U tile (its 64 rows, k < r) and W' tile (its 64 columns of out) into shared memory by
// cp.async (committed, not waited for). Sources stepped by 8 rows; a copy that is off reads nothing
// (cp_async16), so its address may lie past the tensor.
template <bool W_RN>
__device__ __forceinline__ void up_copy_tiles(UpSmem& sm, const UpPlace& pl, const float* u, const float* w, int m, int N, int r, int rope_hd) {
    const float* usrc = u + (int64_t)(pl.row0 + pl.i0) * r + pl.j;
    const float* wsrc = w + (int64_t)pl.i0 * N + pl.c;  // W (r, N)
#pragma unroll
    for (int q = 0; q < UP_V; q++, usrc += 8 * (int64_t)r, wsrc += pl.step) {
        const int i = pl.i0 + 8 * q, j = pl.j;
        cp_async16(smem_addr(sm.us + i * UP_STRIDE + j), usrc, pl.row0 + i < m && j < r);
        if constexpr (W_RN) {
            cp_async16(smem_addr(sm.wsh + i * UP_KN_STRIDE + j), wsrc, i < r && pl.c < N);
        } else {
            const int cw = up_col(pl.bx, i, rope_hd);
            const bool ok = cw < N && j < r;
            cp_async16(smem_addr(sm.wsh + i * UP_STRIDE + j), ok ? w + (int64_t)cw * r + j : w, ok);
        }
    }
    cp_async_commit();
}

// The dropout decisions of a thread's 32 elements of out (bit 4q + e: piece q's element e is kept);
// all set when p = 0.
__device__ __forceinline__ uint32_t up_keep(const UpPlace& pl, uint64_t seed, float p) {
    uint32_t keep = ~0u;
    if (p > 0.f) {
        keep = 0;
#pragma unroll
        for (int q = 0; q < UP_V; q++) keep |= keep_bits4(seed, p, pl.at0 + q * pl.step) << (4 * q);
    }
    return keep;
}

// Once up_copy_tiles' copies have landed: the block's product tile U·W'ᵀ into sm.wsh as (row, n),
// stride UP_KN_STRIDE (the W' tile's space, free once every warp is done with it), visible to all.
template <bool W_RN>
__device__ __forceinline__ void up_product(UpSmem& sm, int r) {
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, t = lane % 4;
    cp_async_wait<0>();
    __syncthreads();
    float acc[8][4];
#pragma unroll
    for (int n = 0; n < 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const float* ua = &sm.us[(warp * 16 + g) * UP_STRIDE + t];
    const int r8 = (r + 7) / 8 * 8;  // k past r is zero in both tiles
    for (int k0 = 0; k0 < r8; k0 += 8) {
        const uint32_t a0 = tf32(ua[k0]), a1 = tf32(ua[k0 + 8 * UP_STRIDE]), a2 = tf32(ua[k0 + 4]), a3 = tf32(ua[k0 + 8 * UP_STRIDE + 4]);
#pragma unroll
        for (int n = 0; n < 8; n++) {
            const float* b = W_RN ? &sm.wsh[(k0 + t) * UP_KN_STRIDE + n * 8 + g] : &sm.wsh[(n * 8 + g) * UP_STRIDE + k0 + t];
            const int next = W_RN ? 4 * UP_KN_STRIDE : 4;  // k + 4
            mma_tf32(acc[n], a0, a1, a2, a3, tf32(b[0]), tf32(b[next]));
        }
    }
    __syncthreads();  // every warp is done with the W' tile: its space takes the product
#pragma unroll
    for (int n = 0; n < 8; n++) {
        float* c = &sm.wsh[(warp * 16 + g) * UP_KN_STRIDE + n * 8 + 2 * t];
        *reinterpret_cast<float2*>(c) = make_float2(acc[n][0], acc[n][1]);
        *reinterpret_cast<float2*>(c + 8 * UP_KN_STRIDE) = make_float2(acc[n][2], acc[n][3]);
    }
    __syncthreads();
}

// Piece q of the product tile times its elements' factors: s where kept, 0 where dropped.
__device__ __forceinline__ float4 up_scaled(const UpSmem& sm, const UpPlace& pl, int q, uint32_t keep, float s) {
    float4 v = *reinterpret_cast<const float4*>(&sm.wsh[(pl.i0 + 8 * q) * UP_KN_STRIDE + pl.j]);
    v.x *= keep >> (4 * q) & 1 ? s : 0.f, v.y *= keep >> (4 * q + 1) & 1 ? s : 0.f;
    v.z *= keep >> (4 * q + 2) & 1 ? s : 0.f, v.w *= keep >> (4 * q + 3) & 1 ? s : 0.f;
    return v;
}

template <typename Base, bool ACTS, bool W_RN>
__device__ __forceinline__ void lora_up_tile(UpSmem& sm, const float* u, const float* w, const Base* base, float* out, int m, int N, int r, float alpha, uint64_t seed, float p, int accumulate,
                                             __nv_bfloat16* out16 = nullptr, const float* cos_t = nullptr, const float* sin_t = nullptr, int rope_hd = 0) {
    const UpPlace pl(N, rope_hd);
    const int c = pl.c;
    up_copy_tiles<W_RN>(sm, pl, u, w, m, N, r, rope_hd);
    UpRaw loaded[UP_V];  // this thread's pieces of out (N % 4 == 0: a piece is in or out whole)
#pragma unroll
    for (int q = 0; q < UP_V; q++) loaded[q] = up_load<Base>(out, base, pl.at0 + q * pl.step, pl.row0 + pl.i0 + 8 * q < m && c < N, accumulate);
    // The dropout decisions, hashed while the loads are in flight (at the end, with nothing left to
    // overlap, they cost as much as the rest of the kernel).
    const uint32_t keep = up_keep(pl, seed, p);
    float4 old[UP_V];
#pragma unroll
    for (int q = 0; q < UP_V; q++) old[q] = up_old<Base>(loaded[q], accumulate);
    up_product<W_RN>(sm, r);
    const float s = p > 0.f ? alpha / (1.f - p) : alpha;  // the kept elements' factor
#pragma unroll
    for (int q = 0; q < UP_V; q++) {
        const int row = pl.row0 + pl.i0 + 8 * q, j = pl.j;
        const float4 v = up_scaled(sm, pl, q, keep, s);
        float4 y = make_float4(old[q].x + v.x, old[q].y + v.y, old[q].z + v.z, old[q].w + v.w);
        if (ACTS && rope_hd > 0) {
            // Tile columns j and j + 32 rotate together; lane bit 3 picks the half (16 pieces per
            // row, the first 8 in the first half), so the partner is lane ^ 8 of the same warp.
            // Every lane shuffles (rows past m included) and both rotate; each stores its own half.
            float4 o;
            o.x = __shfl_xor_sync(0xffffffffu, y.x, 8), o.y = __shfl_xor_sync(0xffffffffu, y.y, 8);
            o.z = __shfl_xor_sync(0xffffffffu, y.z, 8), o.w = __shfl_xor_sync(0xffffffffu, y.w, 8);
            const bool second = j >= 32;
            float4 lo = second ? o : y, hi = second ? y : o;
            const int half = rope_hd / 2, jh = (c % rope_hd) - (second ? half : 0);
            const int64_t tr = (int64_t)min(row, m - 1) * half + jh;
            rope_pairs(lo, hi, load4(cos_t + tr), load4(sin_t + tr));
            y = second ? hi : lo;
        }
        if (row >= m || c >= N) continue;
        if (ACTS)
            store4(out16 + pl.at0 + q * pl.step, y);
        else
            *reinterpret_cast<float4*>(out + pl.at0 + q * pl.step) = y;
    }
}

extern "C" __global__ void __launch_bounds__(UP_THREADS, 4) lora_up(const float* u, const float* w, float* out, int m, int N, int r, int w_is_rn, float alpha, uint64_t seed, float p) {
    grid_dependency_wait();
    __shared__ UpSmem sm;
    if (w_is_rn)
        lora_up_tile<float, false, true>(sm, u, w, nullptr, out, m, N, r, alpha, seed, p, 1);
    else
        lora_up_tile<float, false, false>(sm, u, w, nullptr, out, m, N, r, alpha, seed, p, 1);
}
#define LORA_UP_FROM(name, T)                                                                                                   \
    extern "C" __global__ void __launch_bounds__(UP_THREADS, 4)                                                                  \
        name(const float* u, const float* w, const T* base, float* out, int m, int N, int r, int w_is_rn, float alpha, uint64_t seed, float p, int accumulate) { \
        grid_dependency_wait();                                                                                                   \
        __shared__ UpSmem sm;                                                                                                     \
        if (w_is_rn)                                                                                                              \
            lora_up_tile<T, false, true>(sm, u, w, base, out, m, N, r, alpha, seed, p, accumulate);                                   \
        else                                                                                                                      \
            lora_up_tile<T, false, false>(sm, u, w, base, out, m, N, r, alpha, seed, p, accumulate);                                  \
    }
LORA_UP_FROM(lora_up_from_bf16, __nv_bfloat16)
LORA_UP_FROM(lora_up_from_f16, __half)

// ---- up, many parts: the input gradients of projections sharing x (q/k/v, gate/up) in one pass ----
// out (m, N) = [out +] Σ_t (widen(base_t) [+ drop_t'(u_t · A_t)]) over up to UP_PARTS parts in order,
// each added as lora_up_from_* adds its part (the sum so far + widen(base_t), then the branch's term),
// so the values are bit for bit those of one lora_up_from_* (or widening) per part into the same out:
// out is read (when accumulating) and written once instead of once per part. A part without a branch
// has u_t null. A_t is given as (r, N) (W_RN). Launcher: Cuda::linears_backward_input.
#define UP_PARTS 3
struct UpParts {
    const void* base[UP_PARTS];  // the parts' 16-bit products (m, N)
    const float* u[UP_PARTS];    // du (m, r), or null: no branch
    const float* a[UP_PARTS];    // A (r, N)
    uint64_t seed[UP_PARTS];
    float p[UP_PARTS];
};
template <typename T>
__device__ __forceinline__ void lora_up_many_tile(UpSmem& sm, const UpParts& parts, int n_parts, float* out, int m, int N, int r, int accumulate) {
    const UpPlace pl(N, 0);
    const bool col_ok = pl.c < N;
    float4 y[UP_V];  // the sum so far of this thread's pieces
    if (accumulate) {
        UpRaw loaded[UP_V];
#pragma unroll
        for (int q = 0; q < UP_V; q++) loaded[q] = up_load<float>(out, nullptr, pl.at0 + q * pl.step, pl.row0 + pl.i0 + 8 * q < m && col_ok, 1);
#pragma unroll
        for (int q = 0; q < UP_V; q++) y[q] = loaded[q].out;
    }
    // Unrolled, so that the parts' arguments are read where the launch put them (indexed at run
    // time, the struct would be copied to local memory first).
#pragma unroll
    for (int t = 0; t < UP_PARTS; t++) {
        if (t >= n_parts) break;
        const T* base = static_cast<const T*>(parts.base[t]);
        const bool branch = parts.u[t] != nullptr;
        if (branch) up_copy_tiles<true>(sm, pl, parts.u[t], parts.a[t], m, N, r, 0);
        UpRaw loaded[UP_V];
#pragma unroll
        for (int q = 0; q < UP_V; q++) loaded[q] = up_load<T>(nullptr, base, pl.at0 + q * pl.step, pl.row0 + pl.i0 + 8 * q < m && col_ok, 0);
        const uint32_t keep = branch ? up_keep(pl, parts.seed[t], parts.p[t]) : ~0u;
        const bool first = t == 0 && !accumulate;
#pragma unroll
        for (int q = 0; q < UP_V; q++) {
            const float4 v = up_old<T>(loaded[q], 0);  // widen(base)
            y[q] = first ? v : add4(y[q], v);
        }
        if (!branch) continue;
        up_product<true>(sm, r);
        const float p = parts.p[t], s = p > 0.f ? 1.f / (1.f - p) : 1.f;
#pragma unroll
        for (int q = 0; q < UP_V; q++) y[q] = add4(y[q], up_scaled(sm, pl, q, keep, s));
        __syncthreads();  // every thread has read the product before the next part's copies land there
    }
#pragma unroll
    for (int q = 0; q < UP_V; q++) {
        if (pl.row0 + pl.i0 + 8 * q >= m || !col_ok) continue;
        *reinterpret_cast<float4*>(out + pl.at0 + q * pl.step) = y[q];
    }
}
#define LORA_UP_MANY(name, T)                                                                                                        \
    extern "C" __global__ void __launch_bounds__(UP_THREADS, 4) name(UpParts parts, int n_parts, float* out, int m, int N, int r, int accumulate) { \
        grid_dependency_wait();                                                                                                       \
        __shared__ UpSmem sm;                                                                                                         \
        lora_up_many_tile<T>(sm, parts, n_parts, out, m, N, r, accumulate);                                                           \
    }
LORA_UP_MANY(lora_up_many_bf16, __nv_bfloat16)
LORA_UP_MANY(lora_up_many_f16, __half)
// A q, k or v projection's LoRA B product (forward: B (N, r), no dropout on it) added to its 16-bit
// frozen product `base` and written in bf16 into attention's saved inputs `out16`, rotated when
// rope_hd > 0 (Cuda::qkv_attn_acts): lora_up_from_* and then rope_bf16 (or f32_to_bf16) in one pass.
#define LORA_UP_ACTS(name, T)                                                                                                    \
    extern "C" __global__ void __launch_bounds__(UP_THREADS, 4)                                                                  \
        name(const float* u, const float* w, const T* base, __nv_bfloat16* out16, const float* cos_t, const float* sin_t, int m, int N, int r, float alpha, int rope_hd) { \
        grid_dependency_wait();                                                                                                   \
        __shared__ UpSmem sm;                                                                                                     \
        lora_up_tile<T, true, false>(sm, u, w, base, nullptr, m, N, r, alpha, 0, 0.f, 0, out16, cos_t, sin_t, rope_hd);              \
    }
LORA_UP_ACTS(lora_up_acts_bf16, __nv_bfloat16)
LORA_UP_ACTS(lora_up_acts_f16, __half)

// ---- outer: part[split] (r, N) = S (m, r)ᵀ · [drop] (T (m, N)) over the split's range of m --------
// dA = duᵀ·drop(x) (S = du, T = x, masked). (dB = dyᵀ·u has no dropout to fuse and stays a cuBLAS
// GEMM, which ran it in 21 µs against this kernel's 32 at 7B shapes.) Computed transposed, as
// partᵀ (N, r) = drop(T)ᵀ · S: T's columns are the products' A rows, so that a lane's A fragment
// holds neighbouring columns of one row of T and one hash decides both (dropout_pair_keep), and each
// S fragment serves 16 columns of T. Block: 4 (8) warps, 64 (128) columns of T (16 per warp: A row i is column
// 2i of the warp's 16 for i < 8 and column 2(i−8)+1 after) × all 8·NT ≥ r values of r; m in stages
// of 32 rows copied raw by cp.async, STAGES deep, as in `down`; dropout as the fragments are read
// (each T value by exactly one lane). Shared memory: T as (k, n) with stride 72 (136) (a lane's two
// columns are one 8-byte load; each half-warp's 16 loads cover 32 banks), S as (k, r) with stride 8·NT + 8
// (its fragments' 32 lanes on 32 banks).

// COLS columns of T per block (64, or 128 with twice the warps: each stage's S tile then serves twice
// the columns, as in `down`); T's shared-memory stride COLS + 8.
template <int NT, int COLS>
__device__ void lora_outer(const float* S, const float* T, float* part, int m, int N, int r, int m_split, uint64_t seed, float p, int tile) {
    constexpr int THREADS = 2 * COLS, TS = COLS + 8;
    constexpr int R = 8 * NT, SS = R + 8, SW = STAGE_K * SS + STAGE_K * TS;  // words per stage
    extern __shared__ __align__(16) float smem[];  // STAGES × [S (32, SS) | T (32, TS)]
    constexpr int SV = (STAGE_K * R / 4 + THREADS - 1) / THREADS;  // S copies per thread
    constexpr int TV = STAGE_K * COLS / 4 / THREADS;                // T copies: 4
    const int col0 = tile * COLS;
    const int m_begin = blockIdx.y * m_split, m_end = min(m, m_begin + m_split);
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, g = lane / 4, t = lane % 4;
    const int stages = (m_end - m_begin + STAGE_K - 1) / STAGE_K;
    // Copy q of a thread: S row sk + q·(THREADS/SQ), columns si..si+3; T row tk + 8q, columns
    // tj..tj+3 of the block's COLS (SQ = R/4 copies per S row divides THREADS, so a thread's columns
    // are the same for every q and stage); the source rows worked out once, a stage adding s·STAGE_K
    // rows.
    constexpr int SQ = R / 4, SROWS = THREADS / SQ;
    const int sk = threadIdx.x / SQ, si = 4 * (threadIdx.x % SQ), tk = threadIdx.x / (COLS / 4), tj = 4 * (threadIdx.x % (COLS / 4));
    const float* sq[SV];  // copy q's source in stage 0 (nullptr: past r or N)
    const float* tq[TV];
#pragma unroll
    for (int q = 0; q < SV; q++) sq[q] = si < r ? S + (int64_t)(m_begin + sk + q * SROWS) * r + si : nullptr;
#pragma unroll
    for (int q = 0; q < TV; q++) tq[q] = col0 + tj < N ? T + (int64_t)(m_begin + tk + 8 * q) * N + col0 + tj : nullptr;
    static_assert(SV * THREADS == STAGE_K * R / 4, "the S copies cover the stage's 32 rows exactly");
    static_assert(TV * THREADS == STAGE_K * COLS / 4 && THREADS / (COLS / 4) == 8, "T's copies: 8 rows a round");
    auto issue = [&](int s) {
        const int k0 = m_begin + s * STAGE_K;
        const int64_t soff = (int64_t)s * STAGE_K * r, toff = (int64_t)s * STAGE_K * N;
        float* ss = smem + (s % STAGES) * SW;
#pragma unroll
        for (int q = 0; q < SV; q++) {
            const int k = sk + q * SROWS;
            const bool ok = sq[q] && k0 + k < m_end;
            cp_async16(smem_addr(ss + k * SS + si), ok ? sq[q] + soff : S, ok);
        }
#pragma unroll
        for (int q = 0; q < TV; q++) {
            const int k = tk + 8 * q;
            const bool ok = tq[q] && k0 + k < m_end;
            cp_async16(smem_addr(ss + STAGE_K * SS + k * TS + tj), ok ? tq[q] + toff : T, ok);
        }
    };
    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    const int c = col0 + warp * 16 + 2 * g;  // this lane's columns of T: c (A row g) and c + 1 (row g + 8)
    pipeline(stages, issue, [&](int s) {
        const float* ss = smem + (s % STAGES) * SW;
        const float* ts = ss + STAGE_K * SS + warp * 16 + 2 * g;
        const int k0 = m_begin + s * STAGE_K;
        // This lane's values of T in the stage are columns c, c + 1 of rows k0 + 4h + t (h < 8); their
        // dropout decisions first, one hash per row, all 8 side by side (past the edges the values
        // are zeros, so the decision does not matter). c is even, so (row, c) starts a pair.
        uint32_t keep = ~0u;
        if (p > 0.f) {
            keep = 0;
#pragma unroll
            for (int h = 0; h < 8; h++) keep |= dropout_pair_keep(seed, ((int64_t)(k0 + 4 * h + t) * N + c) >> 1, p) << (2 * h);
        }
        const float kept = p > 0.f ? 1.f / (1.f - p) : 1.f;
#pragma unroll
        for (int kk = 0; kk < STAGE_K; kk += 8) {
            // Rows kk + t (h = kk/4) and kk + t + 4 (h + 1): a0, a1 and a2, a3.
            const float2 lo = *reinterpret_cast<const float2*>(ts + (kk + t) * TS);
            const float2 hi = *reinterpret_cast<const float2*>(ts + (kk + t + 4) * TS);
            const uint32_t kb = keep >> (2 * (kk / 4));
            const uint32_t a0 = tf32(kb & 1 ? lo.x * kept : 0.f), a1 = tf32(kb & 2 ? lo.y * kept : 0.f);
            const uint32_t a2 = tf32(kb & 4 ? hi.x * kept : 0.f), a3 = tf32(kb & 8 ? hi.y * kept : 0.f);
#pragma unroll
            for (int n = 0; n < NT; n++) {
                const float* sb = ss + (kk + t) * SS + n * 8 + g;
                mma_tf32(acc[n], a0, a1, a2, a3, tf32(sb[0]), tf32(sb[4 * SS]));
            }
        }
    });
    // acc[n]: (A row g, r 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1) = columns c, c, c+1, c+1 of part rows
    // n·8 + 2t and n·8 + 2t + 1.
    float* out = part + (int64_t)blockIdx.y * r * N;
    if (c >= N) return;  // N is a multiple of 4: c < N implies c + 1 < N
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = n * 8 + 2 * t + h;
            if (row >= r) continue;
            *reinterpret_cast<float2*>(out + (int64_t)row * N + c) = make_float2(acc[n][h], acc[n][2 + h]);
        }
}
#define LORA_OUTER(name, NT, COLS, BLOCKS) \
    extern "C" __global__ void __launch_bounds__(2 * COLS, BLOCKS) name(const float* T, SplitBranches br, int m, int N, int r, int m_split) { \
        grid_dependency_wait(); \
        const int b = blockIdx.x % br.count; \
        lora_outer<NT, COLS>(br.own[b], T, br.part[b], m, N, r, m_split, br.seed[b], br.p[b], blockIdx.x / br.count); \
    }
LORA_OUTER(lora_outer_r16, 2, 64, 3)
LORA_OUTER(lora_outer_r32, 4, 64, 3)
LORA_OUTER(lora_outer_r64, 8, 64, 3)
LORA_OUTER(lora_outer128_r32, 4, 128, 2)
LORA_OUTER(lora_outer128_r64, 8, 128, 2)
