// Flash attention on the tensor cores (mma.sync m16n8k16, bf16 operands, f32 accumulation) for
// head_dim 64 and 128: causal, GQA, segment masks (packing/padding), online softmax with the
// log-sum-exp saved for the backward pass, no T×T matrix in memory. Activations are f32 in memory and
// every operand is rounded to bf16 (as torch's bf16 SDPA sees them): the launchers (Cuda::attention,
// Cuda::attention_backward and their RoPE forms) convert K and V once per call (the backward's Q and
// dO come from flash_bwd_prep, with delta), and the forward rounds Q as it loads it.
// With RoPE tables (cos, sin: (token rows, HD/2); training and evaluation, where query row t and key
// row t are the same token) q and k arrive before the rotation: the conversions rotate K (and Q for
// the backward), the forward rotates Q in registers as it loads it, and the backward rotates its dQ
// and dK back before adding or writing them, so the gradients are with respect to the un-rotated q
// and k and no separate RoPE pass runs either way.
// The f32 kernels in attention.cu serve other head sizes, decoding and the GPU's precise mode.
// CPU reference: Cpu::attention / Cpu::attention_backward (src/backend/cpu.rs), with Cpu::rope around
// them for the RoPE forms (backend::rope_attention_composed).
#include "flash_common.cuh"

// Fragment layouts of mma.m16n8k16 (lane = 4·g + t): A (16×16, row-major) a0 = (g, 2t..2t+1),
// a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..); B (16×8, "col") b0 = (k 2t..2t+1, n g),
// b1 = (k 2t+8.., n g); C (16×8) c0,c1 = (g, 2t..2t+1), c2,c3 = (g+8, 2t..2t+1). A C tile pair of
// 16×16 re-packed to bf16 is exactly an A fragment, which is how P and dS feed the next product.
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#define PAD 8 // bf16 of padding per shared row: rows 16 bytes apart in bank terms, no conflicts

// ---- forward ------------------------------------------------------------------------------------
// Block: 4 warps, 64 queries of one (batch, head); each warp owns 16 query rows and walks the key
// blocks of 32 this query block can see. Registers bound the occupancy (the output accumulators and
// the query fragments stay in registers): with key blocks of 64 the kernel took 175 registers, two
// blocks (8 warps) per SM and ~11 cycles between a warp's instructions (ncu, H200); key blocks of 32
// and a bound of four blocks per SM give 128 registers and twice the warps. K and V arrive in bf16
// (the launcher converts them once per call), so each key block is copied by cp.async into one of two
// buffers while the warps work on the other, with no conversion or transposition on the way; P·V
// takes its V fragments with ldmatrix.trans from the row-major tile. q, out (batch, q_len, heads,
// HD); k, v (batch, kv_cap, kv_heads, HD), rows from kv_len on never read; lse (batch, heads, q_len),
// natural log of Σ exp(score).
#define FBQ 64
#define FBK 32
// Four 8×8 bf16 matrices, transposed: lane l gives the address of row l % 8 of matrix l / 8 and
// receives, of each matrix, rows 2t and 2t+1 of column g (an mma B fragment when rows are k).
__device__ __forceinline__ void ldsm_x4_trans(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
// Four 8×8 bf16 matrices: lane l gives the address of row l % 8 of matrix l / 8 and receives, of each
// matrix, row g, columns 2t and 2t+1 (an mma B fragment when rows are n and columns k).
__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
// Rows [row0, row0 + ROWS) of one head of two tensors of the same layout (K and V, or Q and dO: bf16,
// row stride `stride`) into dst_a and dst_b (row-major, HD + PAD per row) by 16-byte cp.async copies
// from a block of NT threads, zeros from row `valid` on. A thread's column and first row are fixed,
// so its offset only steps by RSTEP rows per round and serves both tensors: a loop over
// i = tid + j·blockDim instead took a division, a modulo and a 64-bit row product per copy (~28
// instructions each, ~30% of the backward's step by its SASS).
template <int HD, int ROWS, int NT = 128>
__device__ __forceinline__ void copy_rows2(const __nv_bfloat16* a, const __nv_bfloat16* b, int64_t base, int64_t stride, int row0, int valid, __nv_bfloat16 (*dst_a)[HD + PAD], __nv_bfloat16 (*dst_b)[HD + PAD]) {
    constexpr int CPR = HD / 8, RSTEP = NT / CPR;  // 16-byte chunks per row, rows per round
    static_assert(NT % CPR == 0 && ROWS % RSTEP == 0, "whole rounds of whole rows");
    const int r = threadIdx.x / CPR, c = (threadIdx.x % CPR) * 8;
    const int64_t row_zero = base + c;  // row 0: a readable source for the rows past `valid` (not read)
    const uint32_t da = smem_addr(&dst_a[r][c]), db = smem_addr(&dst_b[r][c]);
#pragma unroll
    for (int j = 0; j < ROWS / RSTEP; j++) {
        const int row = row0 + r + j * RSTEP;
        const bool ok = row < valid;
        const int64_t off = ok ? row_zero + (int64_t)row * stride : row_zero;
        cp_async16(da + j * RSTEP * (HD + PAD) * 2, a + off, ok);
        cp_async16(db + j * RSTEP * (HD + PAD) * 2, b + off, ok);
    }
}
template <int HD>
__device__ void flash_fwd(const float* q, const __nv_bfloat16* q16, const __nv_bfloat16* k, const __nv_bfloat16* v, const uint32_t* seg, const float* cos_t, const float* sin_t, float* out, float* lse, const FGeom g) {
    __shared__ __align__(16) __nv_bfloat16 Ks[2][FBK][HD + PAD];
    __shared__ __align__(16) __nv_bfloat16 Vs[2][FBK][HD + PAD];
    __shared__ uint32_t kseg[2][FBK];
    // Causal: query block qb sees qb + 1 blocks of keys. Blocks start in order of their linear index
    // (x fastest), so with the query blocks on z, last first, every head's heaviest block starts
    // before any lighter one and the light ones fill the last wave's gaps (the grid is ~2 waves at
    // 4×512 tokens). With them on x (heaviest first only within each head), a list-scheduling model
    // of 528 slots gave a makespan of 14 block-steps against 9 this way.
    const int qb = gridDim.z - 1 - blockIdx.z, h = blockIdx.x, b = blockIdx.y;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, gr = lane >> 2, t4 = lane & 3;
    const int grp = h / (g.heads / g.kv_heads);
    const float sl2 = rsqrtf((float)HD) * LOG2E; // scores in log2 units
    const int r0 = qb * FBQ + warp * 16 + gr, r1 = r0 + 8;
    const uint32_t qs0 = r0 < g.q_len ? seg_of(seg, g, b, g.q_offset + r0) : 0u;
    const uint32_t qs1 = r1 < g.q_len ? seg_of(seg, g, b, g.q_offset + r1) : 0u;

    // This warp's 16 query rows as A fragments, straight from global memory: from q16 (bf16, already
    // rotated: saved attention inputs) as they are, or from the f32 q. There, column j < HD/2 and its
    // RoPE partner j + HD/2 are the same lane's, in fragments kk and kk + HD/32, so with tables each
    // pair is rotated in registers before it is rounded.
    uint32_t qa[HD / 16][4];
    if (q16) {
        const __nv_bfloat16* p0 = r0 < g.q_len ? q16 + (((int64_t)b * g.q_len + r0) * g.heads + h) * HD : nullptr;
        const __nv_bfloat16* p1 = r1 < g.q_len ? q16 + (((int64_t)b * g.q_len + r1) * g.heads + h) * HD : nullptr;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            const int c = kk * 16 + 2 * t4;
            qa[kk][0] = p0 ? *reinterpret_cast<const uint32_t*>(p0 + c) : 0u;
            qa[kk][1] = p1 ? *reinterpret_cast<const uint32_t*>(p1 + c) : 0u;
            qa[kk][2] = p0 ? *reinterpret_cast<const uint32_t*>(p0 + c + 8) : 0u;
            qa[kk][3] = p1 ? *reinterpret_cast<const uint32_t*>(p1 + c + 8) : 0u;
        }
    } else {
        const float* p0 = r0 < g.q_len ? q + (((int64_t)b * g.q_len + r0) * g.heads + h) * HD : nullptr;
        const float* p1 = r1 < g.q_len ? q + (((int64_t)b * g.q_len + r1) * g.heads + h) * HD : nullptr;
        // Values (row r0 | r1) × (column c | c + 8) of fragment kk.
        auto load = [&](int kk, float2 (&x)[4]) {
            const int c = kk * 16 + 2 * t4;
            const float2 z = make_float2(0.f, 0.f);
            x[0] = p0 ? *reinterpret_cast<const float2*>(p0 + c) : z;
            x[1] = p1 ? *reinterpret_cast<const float2*>(p1 + c) : z;
            x[2] = p0 ? *reinterpret_cast<const float2*>(p0 + c + 8) : z;
            x[3] = p1 ? *reinterpret_cast<const float2*>(p1 + c + 8) : z;
        };
        auto pack = [&](int kk, const float2 (&x)[4]) {
#pragma unroll
            for (int e = 0; e < 4; e++) qa[kk][e] = pack_bf16(x[e].x, x[e].y);
        };
#pragma unroll
        for (int kk = 0; kk < HD / 32; kk++) {
            float2 lo[4], hi[4];
            load(kk, lo);
            load(kk + HD / 32, hi);
            if (cos_t) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int r = e & 1 ? r1 : r0;
                    if (r >= g.q_len) continue;
                    const int64_t ti = ((int64_t)b * g.q_len + r) * (HD / 2) + kk * 16 + 2 * t4 + (e >> 1) * 8;
                    rope_pairs(lo[e], hi[e], *reinterpret_cast<const float2*>(cos_t + ti), *reinterpret_cast<const float2*>(sin_t + ti));
                }
            }
            pack(kk, lo);
            pack(kk + HD / 32, hi);
        }
    }
    float o[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

    const int q_hi = min(g.q_len, (qb + 1) * FBQ);
    const int kv_end = min(g.kv_len, g.q_offset + q_hi); // keys any query of this block can see
    const int64_t kbase = ((int64_t)b * g.kv_cap * g.kv_heads + grp) * HD, kstride = (int64_t)g.kv_heads * HD;
    // Key block kb into buffer kb & 1: 16-byte copies (8 bf16), zeros from kv_len on; and its
    // segment ids, by plain stores that the next barrier publishes.
    auto issue = [&](int kb) {
        const int buf = kb & 1;
        for (int i = threadIdx.x; i < FBK * (HD / 8); i += blockDim.x) {
            const int r = i / (HD / 8), c = (i % (HD / 8)) * 8, s = kb * FBK + r;
            const bool ok = s < g.kv_len;
            const int64_t off = kbase + (int64_t)(ok ? s : 0) * kstride + c;
            cp_async16(smem_addr(&Ks[buf][r][c]), k + off, ok);
            cp_async16(smem_addr(&Vs[buf][r][c]), v + off, ok);
        }
        if (threadIdx.x < FBK) {
            const int s = kb * FBK + threadIdx.x;
            kseg[buf][threadIdx.x] = s < g.kv_len ? seg_of(seg, g, b, s) : 0u;
        }
    };
    if (kv_end > 0) issue(0);
    cp_async_commit();
    for (int kb = 0; kb * FBK < kv_end; kb++) {
        const int buf = kb & 1;
        cp_async_wait<0>();  // this thread's copies of block kb have landed ...
        __syncthreads();     // ... everyone's too, and every warp is done with block kb − 1's buffer
        if ((kb + 1) * FBK < kv_end) issue(kb + 1);
        cp_async_commit();

        // S = Q·Kᵀ; K's B fragments of two k steps (matrices at d = 16kk, +8, +16, +24) per ldmatrix.
        // The k steps outside and the key tiles inside, so that the four tiles' accumulation chains
        // are independent neighbours the scheduler can interleave (nested the other way, they ran
        // about two at a time: ~2 × 8 dependent mma latencies per key block).
        float sc[FBK / 8][4];
#pragma unroll
        for (int nt = 0; nt < FBK / 8; nt++) sc[nt][0] = sc[nt][1] = sc[nt][2] = sc[nt][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk += 2) {
#pragma unroll
            for (int nt = 0; nt < FBK / 8; nt++) {
                uint32_t b0, b1, b2, b3;
                ldsm_x4(smem_addr(&Ks[buf][nt * 8 + lane % 8][kk * 16 + (lane / 8) * 8]), b0, b1, b2, b3);
                mma16816(sc[nt], qa[kk], b0, b1);
                mma16816(sc[nt], qa[kk + 1], b2, b3);
            }
        }
        // Mask, scale, and the running max of each of this thread's two rows. A tile wholly below the
        // diagonal, inside both lengths and without segments needs no mask (most tiles of a long row).
        const bool full = !seg && (qb + 1) * FBQ <= g.q_len && (kb + 1) * FBK <= g.kv_len &&
                          (kb + 1) * FBK - 1 <= g.q_offset + qb * FBQ;
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < FBK / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int sl = nt * 8 + 2 * t4 + (e & 1), s = kb * FBK + sl;
                const bool vis = full || (e < 2 ? sees(g, r0, qs0, s, kseg[buf][sl]) : sees(g, r1, qs1, s, kseg[buf][sl]));
                sc[nt][e] = vis ? sc[nt][e] * sl2 : -INFINITY;
            }
            mx0 = fmaxf(mx0, fmaxf(sc[nt][0], sc[nt][1]));
            mx1 = fmaxf(mx1, fmaxf(sc[nt][2], sc[nt][3]));
        }
        // The four lanes of a quad hold one row between them.
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        // Exponents relative to the new max, or to 0 for a row that has seen nothing yet (m = -inf):
        // masked scores (-inf) then give p = 0 and the old sums' factor is 0 or 1 with no NaN.
        const float b0 = n0 == -INFINITY ? 0.f : n0, b1 = n1 == -INFINITY ? 0.f : n1;
        const float c0 = exp2_ftz(m0 - b0), c1 = exp2_ftz(m1 - b1);
        m0 = n0;
        m1 = n1;
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < FBK / 8; nt++) {
            sc[nt][0] = exp2_ftz(sc[nt][0] - b0);
            sc[nt][1] = exp2_ftz(sc[nt][1] - b0);
            sc[nt][2] = exp2_ftz(sc[nt][2] - b1);
            sc[nt][3] = exp2_ftz(sc[nt][3] - b1);
            s0 += sc[nt][0] + sc[nt][1];
            s1 += sc[nt][2] + sc[nt][3];
        }
        l0 = l0 * c0 + s0;
        l1 = l1 * c1 + s1;
        // Past the first key blocks a row's max seldom moves: skip the rescale when no row of the warp's did.
        if (__any_sync(0xffffffffu, c0 != 1.f || c1 != 1.f)) {
#pragma unroll
            for (int i = 0; i < HD / 8; i++) {
                o[i][0] *= c0;
                o[i][1] *= c0;
                o[i][2] *= c1;
                o[i][3] *= c1;
            }
        }
        // O += P · V, P re-packed from the score tiles as A fragments.
#pragma unroll
        for (int kk = 0; kk < FBK / 16; kk++) {
            const uint32_t pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                                    pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]), pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
            // V fragments for two 8-wide d tiles at once: matrices (keys +0..7 | +8..15) × (d tile dn | dn+1).
            const int mi = lane / 8, key = kk * 16 + (mi & 1) * 8 + lane % 8;
#pragma unroll
            for (int dn = 0; dn < HD / 8; dn += 2) {
                uint32_t b0, b1, b2, b3;
                ldsm_x4_trans(smem_addr(&Vs[buf][key][(dn + (mi >> 1)) * 8]), b0, b1, b2, b3);
                mma16816(o[dn], pa, b0, b1);
                mma16816(o[dn + 1], pa, b2, b3);
            }
        }
    }
    flash_fwd_store<HD>([&](int j, int e) { return o[j][e]; }, m0, m1, l0, l1, g, b, h, r0, r1, t4, out, lse);
}

// q (f32) or q16 (bf16, already rotated): one of them, the other null. cos_t, sin_t: null, or the
// RoPE tables for the f32 q (k arrives rotated).
extern "C" __global__ void __launch_bounds__(128, 4) flash_fwd_hd64(const float* q, const __nv_bfloat16* q16, const __nv_bfloat16* k, const __nv_bfloat16* v, const uint32_t* seg, const float* cos_t, const float* sin_t, float* out, float* lse, FGEOM_ARGS) {
    grid_dependency_wait();
    MAKE_FGEOM;
    flash_fwd<64>(q, q16, k, v, seg, cos_t, sin_t, out, lse, g);
}
extern "C" __global__ void __launch_bounds__(128, 4) flash_fwd_hd128(const float* q, const __nv_bfloat16* q16, const __nv_bfloat16* k, const __nv_bfloat16* v, const uint32_t* seg, const float* cos_t, const float* sin_t, float* out, float* lse, FGEOM_ARGS) {
    grid_dependency_wait();
    MAKE_FGEOM;
    flash_fwd<128>(q, q16, k, v, seg, cos_t, sin_t, out, lse, g);
}

// ---- backward -----------------------------------------------------------------------------------
// What the backward kernel reads of the queries, in one pass over q, out and dout (batch, q_len,
// heads, HD), f32: delta (batch, heads, q_len) = rowsum(dout ⊙ out), dout in bf16, and q in bf16,
// rotated by RoPE when there are tables (cos, sin: (batch·q_len, HD/2)); q and qb null when the
// caller holds q in bf16 already (saved attention inputs); and dq zeroed (its layout is out's), which
// the backward kernel's reductions need, in this pass instead of a memset launch of its own. HD/8
// lanes per row, each with four columns j.. of each half (the RoPE pairs j, j + HD/2) of q, out, dout
// and dq.
template <int HD>
__device__ void flash_bwd_prep(const float* q, const float* out, const float* dout, const float* cos_t, const float* sin_t, __nv_bfloat16* qb, __nv_bfloat16* db, float* delta, float* dq, int batch, int q_len, int heads) {
    constexpr int LANES = HD / 8;
    const int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / LANES;
    const int sub = threadIdx.x % LANES, j = 4 * sub;
    const bool live = row < (int64_t)batch * q_len * heads;
    const int64_t r = live ? row : 0, base = r * HD;
    const float4 o1 = load4(out + base + j), o2 = load4(out + base + HD / 2 + j);
    const float4 d1 = load4(dout + base + j), d2 = load4(dout + base + HD / 2 + j);
    float s = o1.x * d1.x + o1.y * d1.y + o1.z * d1.z + o1.w * d1.w + o2.x * d2.x + o2.y * d2.y + o2.z * d2.z + o2.w * d2.w;
#pragma unroll
    for (int o = LANES / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (!live) return;
    const int h = r % heads;
    const int64_t t = r / heads;  // token row b·q_len + position
    if (q) {
        float4 q1 = load4(q + base + j), q2 = load4(q + base + HD / 2 + j);
        if (cos_t) rope_pairs(q1, q2, load4(cos_t + t * (HD / 2) + j), load4(sin_t + t * (HD / 2) + j));
        store4(qb + base + j, q1);
        store4(qb + base + HD / 2 + j, q2);
    }
    store4(db + base + j, d1);
    store4(db + base + HD / 2 + j, d2);
    store4(dq + base + j, make_float4(0.f, 0.f, 0.f, 0.f));
    store4(dq + base + HD / 2 + j, make_float4(0.f, 0.f, 0.f, 0.f));
    if (sub == 0) delta[((t / q_len) * heads + h) * q_len + t % q_len] = s;
}
#define FLASH_BWD_PREP(HD) \
    extern "C" __global__ void flash_bwd_prep_hd##HD(const float* q, const float* out, const float* dout, const float* cos_t, const float* sin_t, __nv_bfloat16* qb, __nv_bfloat16* db, float* delta, float* dq, int batch, int q_len, int heads) { \
        grid_dependency_wait(); \
        flash_bwd_prep<HD>(q, out, dout, cos_t, sin_t, qb, db, delta, dq, batch, q_len, heads); \
    }
FLASH_BWD_PREP(64)
FLASH_BWD_PREP(128)

// Block: 4 warps and 64 keys of one (batch, kv head); each warp owns 16 keys. For every query head
// of the group and every block of 32 queries that can see these keys, with P = exp(S − lse) and
// dS = P ⊙ (dP − delta)·scale: dV += Pᵀ·dO and dK += dSᵀ·Q stay in registers; dS goes through shared
// memory to give dQ += dS·K, added into dq by vector reductions (dq must be zero beforehand). Q, K, V
// and dO arrive in bf16 (converted once per call): the block's K and V tiles and each
// query block's Q and dO tiles are copied by cp.async, the next query block's into the second of two
// buffers while the warps work on the current one, and every operand that the products need
// transposed (dO and Q for dV and dK, K for dQ) comes by ldmatrix.trans from the row-major tile.
#define BBK 64
#define BBQ 32
template <int HD>
struct BwdSmem {
    __nv_bfloat16 Ks[BBK][HD + PAD], Vs[BBK][HD + PAD];
    __nv_bfloat16 Qs[2][BBQ][HD + PAD], Ds[2][BBQ][HD + PAD];
    __nv_bfloat16 dSq[BBQ][BBK + PAD];
    float lse[2][BBQ], delta[2][BBQ];
    uint32_t qseg[2][BBQ], kseg[BBK];
};
// With RoPE tables, each step's query rows of the tables, copied with its Q and dO tiles (the dQ
// epilogue reads them once per key block; from global memory that read sat on every step's critical
// path). After BwdSmem in dynamic shared memory, allocated only then (Cuda::flash_backward). Rows are
// HD/2 + 8 floats apart, so a half-warp's 8-byte reads of four rows hit distinct banks.
#define ROPE_STRIDE(HD) (HD / 2 + 8)
template <int HD>
struct RopeSmem {
    float cos[2][BBQ][ROPE_STRIDE(HD)], sin[2][BBQ][ROPE_STRIDE(HD)];
};
// The B fragments of two 8-wide column tiles (n0 and n0 + off; adjacent when off = 8) for 16 k rows
// from k0 of a row-major (k, n) tile: b[0], b[1] for tile n0, b[2], b[3] for tile n0 + off.
template <int LD>
__device__ __forceinline__ void b_frags_trans(const __nv_bfloat16 (*tile)[LD], int k0, int n0, uint32_t (&b)[4], int off = 8) {
    const int lane = threadIdx.x % WARP, mi = lane / 8;
    ldsm_x4_trans(smem_addr(&tile[k0 + (mi & 1) * 8 + lane % 8][n0 + (mi >> 1) * off]), b[0], b[1], b[2], b[3]);
}
template <int HD>
__device__ void flash_bwd(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* delta, const __nv_bfloat16* dout, const uint32_t* seg, const float* cos_t, const float* sin_t, float* dq, float* dk, float* dv, const FGeom g) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    BwdSmem<HD>& sm = *reinterpret_cast<BwdSmem<HD>*>(smem_raw);
    RopeSmem<HD>& rs = *reinterpret_cast<RopeSmem<HD>*>(smem_raw + sizeof(BwdSmem<HD>));  // only with tables
    // Key block kb is seen by the queries from kb·BBK on, so the low ones carry the most steps; with
    // the key blocks on z they start first for every head (as the forward's query blocks): a
    // list-scheduling model of the 7B grid (1,024 blocks of 16 − 2·kb steps on 264 slots) gave a
    // makespan of 46 steps with them on x against 36 this way (the average is 34.9).
    const int kb = blockIdx.z, grp = blockIdx.x, b = blockIdx.y;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, gr = lane >> 2, t4 = lane & 3;
    const int rep = g.heads / g.kv_heads;
    const float scale = rsqrtf((float)HD), sl2 = scale * LOG2E;
    const int64_t kbase = ((int64_t)b * g.kv_cap * g.kv_heads + grp) * HD, kstride = (int64_t)g.kv_heads * HD;
    const int64_t qstride = (int64_t)g.heads * HD;
    // The first query that can see key kb·BBK is at position kb·BBK, i.e. query index kb·BBK − q_offset.
    const int qb0 = max(0, kb * BBK - g.q_offset) / BBQ;
    const int nq = max(0, (g.q_len + BBQ - 1) / BBQ - qb0), steps = rep * nq;  // (head, query block) pairs
    // Step it: flash_common.cuh flash_bwd_step.
    auto step_of = [&](int it) { return flash_bwd_step<HD>(g, b, grp, rep, qb0, nq, it); };
    // Step it's Q and dO tiles, lse and delta into buffer it & 1, all by cp.async (a plain load here
    // would hold warp 0 up for a memory latency every step), and its query segment ids (only with
    // segments does that read memory) by plain stores that the next barrier publishes. The RoPE rows
    // are HD/2 floats, HD/8 16-byte chunks like a bf16 row of HD, so they go in rounds of the same
    // rows as Q's.
    auto issue = [&](int it) {
        const FlashBwdStep st = step_of(it);
        const int buf = it & 1, qb = st.qb, h = st.h;
        copy_rows2<HD, BBQ>(q, dout, st.qbase, qstride, qb * BBQ, g.q_len, sm.Qs[buf], sm.Ds[buf]);
        if (cos_t) {
            constexpr int CPR = HD / 8, RSTEP = 128 / CPR;
            const int r = threadIdx.x / CPR, c = (threadIdx.x % CPR) * 4;
            const int64_t first = (int64_t)b * g.q_len * (HD / 2) + c;  // table row 0 of this batch row
#pragma unroll
            for (int j = 0; j < BBQ / RSTEP; j++) {
                const int t = qb * BBQ + r + j * RSTEP;
                const bool ok = t < g.q_len;
                const int64_t off = first + (ok ? (int64_t)t * (HD / 2) : 0);
                cp_async16(smem_addr(&rs.cos[buf][r + j * RSTEP][c]), cos_t + off, ok);
                cp_async16(smem_addr(&rs.sin[buf][r + j * RSTEP][c]), sin_t + off, ok);
            }
        }
        if (threadIdx.x < BBQ) {
            const int t = qb * BBQ + threadIdx.x;
            const bool ok = t < g.q_len;
            const int64_t li = ((int64_t)b * g.heads + h) * g.q_len + t;
            cp_async4(smem_addr(&sm.lse[buf][threadIdx.x]), lse + (ok ? li : 0), ok);
            cp_async4(smem_addr(&sm.delta[buf][threadIdx.x]), delta + (ok ? li : 0), ok);
            sm.qseg[buf][threadIdx.x] = ok ? seg_of(seg, g, b, g.q_offset + t) : 0u;
        }
    };
    copy_rows2<HD, BBK>(k, v, kbase, kstride, kb * BBK, g.kv_len, sm.Ks, sm.Vs);
    if (threadIdx.x < BBK) {
        const int s = kb * BBK + threadIdx.x;
        sm.kseg[threadIdx.x] = s < g.kv_len ? seg_of(seg, g, b, s) : 0u;
    }
    if (steps > 0) issue(0);
    cp_async_commit();
    float dka[HD / 8][4], dva[HD / 8][4];
#pragma unroll
    for (int i = 0; i < HD / 8; i++) dka[i][0] = dka[i][1] = dka[i][2] = dka[i][3] = dva[i][0] = dva[i][1] = dva[i][2] = dva[i][3] = 0.f;
    const int k0 = warp * 16 + gr, k1 = k0 + 8; // this thread's key rows within the block
    for (int it = 0; it < steps; it++) {
        cp_async_wait<0>();  // this thread's copies of step it (and, first, of K and V) have landed ...
        __syncthreads();     // ... everyone's too; step it − 1's buffers and dSq are no longer read
        if (it + 1 < steps) issue(it + 1);
        cp_async_commit();
        const FlashBwdStep cur = step_of(it);
        const int buf = it & 1, qb = cur.qb;
        const int64_t qbase = cur.qbase;
        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16 keys × 32 queries.
        float st[BBQ / 8][4], dpt[BBQ / 8][4];
#pragma unroll
        for (int nt = 0; nt < BBQ / 8; nt++) {
            st[nt][0] = st[nt][1] = st[nt][2] = st[nt][3] = 0.f;
            dpt[nt][0] = dpt[nt][1] = dpt[nt][2] = dpt[nt][3] = 0.f;
        }
        // Every fragment by ldmatrix (lane l addresses row l % 8 of matrix l / 8): K's and V's A
        // fragments as matrices (keys +0..7 | +8..15) × (d +0..7 | +8..15), Q's and dO's B fragments of
        // two query tiles as (tile nt | nt + 1) × (d +0..7 | +8..15); the values of 32-bit shared
        // loads one pair at a time, in a quarter of the instructions.
        const int mi = lane / 8;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            uint32_t ka[4], va[4];
            const int arow = warp * 16 + (mi & 1) * 8 + lane % 8, acol = kk * 16 + (mi >> 1) * 8;
            ldsm_x4(smem_addr(&sm.Ks[arow][acol]), ka[0], ka[1], ka[2], ka[3]);
            ldsm_x4(smem_addr(&sm.Vs[arow][acol]), va[0], va[1], va[2], va[3]);
#pragma unroll
            for (int nt = 0; nt < BBQ / 8; nt += 2) {
                const int brow = (nt + (mi >> 1)) * 8 + lane % 8, bcol = kk * 16 + (mi & 1) * 8;
                uint32_t bq[4], bd[4];
                ldsm_x4(smem_addr(&sm.Qs[buf][brow][bcol]), bq[0], bq[1], bq[2], bq[3]);
                ldsm_x4(smem_addr(&sm.Ds[buf][brow][bcol]), bd[0], bd[1], bd[2], bd[3]);
                mma16816(st[nt], ka, bq[0], bq[1]);
                mma16816(st[nt + 1], ka, bq[2], bq[3]);
                mma16816(dpt[nt], va, bd[0], bd[1]);
                mma16816(dpt[nt + 1], va, bd[2], bd[3]);
            }
        }
        // P and dS in place of Sᵀ and dPᵀ (rows: keys k0/k1, columns: queries); no mask for a tile
        // wholly below the diagonal, inside both lengths and without segments.
        const bool full = !seg && (qb + 1) * BBQ <= g.q_len && (kb + 1) * BBK <= g.kv_len &&
                          (kb + 1) * BBK - 1 <= g.q_offset + qb * BBQ;
#pragma unroll
        for (int nt = 0; nt < BBQ / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int ql = nt * 8 + 2 * t4 + (e & 1), kl = e < 2 ? k0 : k1;
                const bool vis = full || sees(g, qb * BBQ + ql, sm.qseg[buf][ql], kb * BBK + kl, sm.kseg[kl]);
                const float p = vis ? exp2_ftz(st[nt][e] * sl2 - sm.lse[buf][ql] * LOG2E) : 0.f;
                st[nt][e] = p;
                dpt[nt][e] = p * (dpt[nt][e] - sm.delta[buf][ql]) * scale;
            }
        }
        // dV += Pᵀ·dO and dK += dSᵀ·Q: A from the tiles above, B (query, d) by ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < BBQ / 16; kk++) {
            const uint32_t pa[4] = {pack_bf16(st[2 * kk][0], st[2 * kk][1]), pack_bf16(st[2 * kk][2], st[2 * kk][3]),
                                    pack_bf16(st[2 * kk + 1][0], st[2 * kk + 1][1]), pack_bf16(st[2 * kk + 1][2], st[2 * kk + 1][3])};
            const uint32_t da[4] = {pack_bf16(dpt[2 * kk][0], dpt[2 * kk][1]), pack_bf16(dpt[2 * kk][2], dpt[2 * kk][3]),
                                    pack_bf16(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]), pack_bf16(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
            for (int dn = 0; dn < HD / 8; dn += 2) {
                uint32_t bd[4], bq[4];
                b_frags_trans<HD + PAD>(sm.Ds[buf], kk * 16, dn * 8, bd);
                b_frags_trans<HD + PAD>(sm.Qs[buf], kk * 16, dn * 8, bq);
                mma16816(dva[dn], pa, bd[0], bd[1]);
                mma16816(dva[dn + 1], pa, bd[2], bd[3]);
                mma16816(dka[dn], da, bq[0], bq[1]);
                mma16816(dka[dn + 1], da, bq[2], bq[3]);
            }
        }
        // dS to shared memory as (query, key) for dQ.
#pragma unroll
        for (int nt = 0; nt < BBQ / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) sm.dSq[nt * 8 + 2 * t4 + (e & 1)][e < 2 ? k0 : k1] = __float2bfloat16_rn(dpt[nt][e]);
        }
        __syncthreads();
        // dQ (32 queries × HD) += dS (32 × 64 keys) · K: of each half of the columns, warp w takes the
        // 8-wide tiles [w·TPW, (w+1)·TPW), so column j and its RoPE partner j + HD/2 are the same
        // thread's (acc[dn], acc[dn + TPW]) and can be rotated back before the atomics; K's (key, d)
        // B fragments by ldmatrix.trans.
        constexpr int TPW = HD / 64;
        auto dq_col = [&](int dn) { return (dn >= TPW ? HD / 2 : 0) + (warp * TPW + dn % TPW) * 8; };
        float* const dq_row = dq + qbase + (int64_t)(qb * BBQ + gr) * qstride + dq_col(0) + 2 * t4;
#pragma unroll
        for (int mt = 0; mt < BBQ / 16; mt++) {
            float acc[2 * TPW][4];
#pragma unroll
            for (int i = 0; i < 2 * TPW; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BBK / 16; kk++) {
                // dS's A fragment: matrices (queries +0..7 | +8..15) × (keys +0..7 | +8..15).
                uint32_t a[4];
                ldsm_x4(smem_addr(&sm.dSq[mt * 16 + (mi & 1) * 8 + lane % 8][kk * 16 + (mi >> 1) * 8]), a[0], a[1], a[2], a[3]);
#pragma unroll
                for (int dn = 0; dn < 2 * TPW; dn += 2) {
                    uint32_t bk[4];
                    b_frags_trans<HD + PAD>(sm.Ks, kk * 16, dq_col(dn), bk, dq_col(dn + 1) - dq_col(dn));
                    mma16816(acc[dn], a, bk[0], bk[1]);
                    mma16816(acc[dn + 1], a, bk[2], bk[3]);
                }
            }
#pragma unroll
            for (int e2 = 0; e2 < 2; e2++) {
                const int t = qb * BBQ + mt * 16 + gr + 8 * e2;
                if (t >= g.q_len) continue;
                float2 v2[2 * TPW];
#pragma unroll
                for (int dn = 0; dn < 2 * TPW; dn++) v2[dn] = make_float2(acc[dn][2 * e2], acc[dn][2 * e2 + 1]);
                if (cos_t) {
                    const int ql = mt * 16 + gr + 8 * e2;
#pragma unroll
                    for (int dn = 0; dn < TPW; dn++) {
                        const int j = dq_col(dn) + 2 * t4;
                        unrotate_by(*reinterpret_cast<const float2*>(&rs.cos[buf][ql][j]), *reinterpret_cast<const float2*>(&rs.sin[buf][ql][j]), v2[dn], v2[dn + TPW]);
                    }
                }
                // One row pointer at this thread's first column: the four reductions then differ by
                // constant offsets (a 64-bit address computed per reduction was ~7 instructions each).
                float* p = dq_row + (int64_t)(mt * 16 + 8 * e2) * qstride;
#pragma unroll
                for (int dn = 0; dn < 2 * TPW; dn++) red_add2(p + (dn >= TPW ? HD / 2 : 0) + (dn % TPW) * 8, v2[dn]);
            }
        }
    }
    // dK, dV rows of this block: only this block writes them (dK rotated back with tables: column j's
    // partner j + HD/2 is fragment dn + HD/16 of the same thread).
#pragma unroll
    for (int e2 = 0; e2 < 2; e2++) {
        const int s = kb * BBK + (e2 ? k1 : k0);
        if (s >= g.kv_len) continue;
        float* pk = dk + kbase + (int64_t)s * kstride;
        float* pv = dv + kbase + (int64_t)s * kstride;
#pragma unroll
        for (int dn = 0; dn < HD / 16; dn++) {
            const int d = dn * 8 + 2 * t4;
            float2 lo = make_float2(dka[dn][2 * e2], dka[dn][2 * e2 + 1]);
            float2 hi = make_float2(dka[dn + HD / 16][2 * e2], dka[dn + HD / 16][2 * e2 + 1]);
            unrotate<HD>(cos_t, sin_t, (int64_t)b * g.kv_cap + s, d, lo, hi);
            *reinterpret_cast<float2*>(pk + d) = lo;
            *reinterpret_cast<float2*>(pk + d + HD / 2) = hi;
        }
#pragma unroll
        for (int dn = 0; dn < HD / 8; dn++) {
            const int d = dn * 8 + 2 * t4;
            *reinterpret_cast<float2*>(pv + d) = make_float2(dva[dn][2 * e2], dva[dn][2 * e2 + 1]);
        }
    }
}

// cos_t, sin_t: null, or the RoPE tables that rotated q and k (dq, dk come out un-rotated).
extern "C" __global__ void __launch_bounds__(128) flash_bwd_hd64(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* delta, const __nv_bfloat16* dout, const uint32_t* seg, const float* cos_t, const float* sin_t, float* dq, float* dk, float* dv, FGEOM_ARGS) {
    grid_dependency_wait();
    MAKE_FGEOM;
    flash_bwd<64>(q, k, v, lse, delta, dout, seg, cos_t, sin_t, dq, dk, dv, g);
}
extern "C" __global__ void __launch_bounds__(128) flash_bwd_hd128(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* delta, const __nv_bfloat16* dout, const uint32_t* seg, const float* cos_t, const float* sin_t, float* dq, float* dk, float* dv, FGEOM_ARGS) {
    grid_dependency_wait();
    MAKE_FGEOM;
    flash_bwd<128>(q, k, v, lse, delta, dout, seg, cos_t, sin_t, dq, dk, dv, g);
}
