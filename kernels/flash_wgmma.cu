// Flash attention on Hopper's warpgroup products (wgmma), head_dim 128: the forward from bf16 q, k
// and v (the training step's saved attention inputs: q and k already rotated) and the backward from
// bf16 Q, K, V and dO. Same contracts and values as flash.cu's flash_fwd_hd128 and flash_bwd_hd128
// (causal, GQA, segment masks, q_offset; lse saved by the forward; dq, dk rotated back by RoPE tables
// in the backward), which serve the other calls (f32 q, head_dim 64, devices without wgmma).
// CPU reference: Cpu::attention, Cpu::attention_backward (src/backend/cpu.rs). Launchers:
// Cuda::flash_forward_launch, Cuda::flash_backward_launch (src/backend/cuda/attention.rs).
//
// Why: the mma.sync kernels issue a shared load (ldmatrix) for every two 16×8×16 products on tiles of
// 16 rows per warp (ncu: latency-bound on that chain). Here each warpgroup (4 warps) owns 64 rows and
// its products read their operands from shared memory themselves, through matrix descriptors over
// tiles in the 128-byte swizzle (wgmma.cuh): K-major where the reduction runs along the head
// dimension, MN-major (the transpose flag) where it runs along keys or queries of a row-major tile.
// A tile of 64 or 128 rows × 128 bf16 is stored as two 64-column halves ("atoms"), rows 128 bytes
// apart, the second half rows·128 bytes after the first. Accumulators and register A operands use
// each warp's 16 rows as mma.m16n8k16's C and A fragments (value 4j + e: row gr + 8·(e / 2), column
// 8j + 2·t4 + e % 2), so P and dS re-pack into A operands as in flash.cu.
#include "flash_common.cuh"
#include "wgmma.cuh"
#include <type_traits>

#define WHD 128  // head_dim

#ifdef HAVE_WGMMA
// S (m64 × n64 over the warpgroup, 32 values per thread) (+)= A · B, both from shared memory through
// K-major descriptors; acc_in 0 ignores d's old contents.
__device__ __forceinline__ void wgmma_ss_n64(float* d, uint64_t da, uint64_t db, int acc_in) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(da), "l"(db), "r"(acc_in));
}
// O (m64 × n128, 64 values per thread) (+)= A · B: A from registers (this thread's four bf16 pairs of
// the 64 × 16 slice, mma.m16n8k16's A layout per warp), B through an MN-major descriptor (transpose
// flag 1).
__device__ __forceinline__ void wgmma_rs_n128_tb(float* d, const uint32_t* a, uint64_t db, int acc_in) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc_in));
}

// Rows [row0, row0 + ROWS) of one head (row r at src + r·stride, 128 bf16) into the two swizzled
// halves at shared address dst (the second ROWS·128 bytes after the first), zeros from row `valid` on;
// 16-byte copies by a block of NT threads. A thread's column chunk and its row within each 8-row group
// are fixed, so its swizzled column is too.
template <int ROWS, int NT>
__device__ __forceinline__ void copy_tile(uint32_t dst, const __nv_bfloat16* src, int64_t stride, int row0, int valid) {
    constexpr int RSTEP = NT / 16;  // rows per round (a multiple of 8)
    const int cc = threadIdx.x & 15, r = threadIdx.x >> 4;  // chunk of the 16 per row; first row
    const uint32_t d0 = dst + (cc >> 3) * (ROWS * 128) + r * 128 + (((cc & 7) ^ (r & 7)) << 4);
    if (row0 + ROWS <= valid) {
        // Every row valid (all but a tile at the end of a sequence): one pointer stepped RSTEP rows a
        // round, ~3 instructions a copy where the clamped row's 64-bit address took ~10 (the forward's
        // copies were ~13% of its warp samples, session 45's ncu).
        const __nv_bfloat16* p = src + (int64_t)(row0 + r) * stride + cc * 8;
        const int64_t step = RSTEP * stride;
#pragma unroll
        for (int i = 0; i < ROWS / RSTEP; i++, p += step) cp_async16(d0 + i * RSTEP * 128, p, true);
        return;
    }
#pragma unroll
    for (int i = 0; i < ROWS / RSTEP; i++) {
        const int row = row0 + r + RSTEP * i;
        const bool ok = row < valid;
        cp_async16(d0 + i * RSTEP * 128, src + (int64_t)(ok ? row : 0) * stride + cc * 8, ok);
    }
}
// D (m64 × n64) (+)= A · B with both from shared memory through MN-major descriptors (transpose flags
// 1, 1): the backward's dQ = dS · K from dSᵀ and K as they are stored.
__device__ __forceinline__ void wgmma_ss_n64_tt(float* d, uint64_t da, uint64_t db, int acc_in) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 1, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "l"(da), "l"(db), "r"(acc_in));
}
#endif

// ---- forward ------------------------------------------------------------------------------------
// Block: one warpgroup on 64 query rows (16 per warp), 64 keys per step in two products: S = Q·Kᵀ
// (m64n64, Q and K K-major) and O += P·V (m64n128, P from registers, V MN-major), with the online
// softmax between them as in flash.cu. Three blocks per SM: the blocks are short (4.5 key blocks on
// average at 512 tokens) and waiting for their copies was the largest stall with two blocks per SM
// (ncu: ~10% of warp samples at the step's copy wait; 11.6% on the first block's copies alone in a
// variant whose steps overlapped), so shared memory holds Q, two stages of K and one of V (64 KB)
// instead of two of each: key block j + 1's K is copied while block j is worked on, and block j's V
// while its S and softmax run.
#define WQ 64      // queries per block: one warpgroup, 16 rows per warp
#define WK 64      // keys per step
#define ATOM 8192  // one 64-row × 64-column bf16 half of a tile
#define WQ_OFF 0
#define WK_OFF (2 * ATOM)          // K of stage 0, then of stage 1 (two halves each)
#define WV_OFF (WK_OFF + 4 * ATOM) // V (two halves)
#define WSEG_OFF (WV_OFF + 2 * ATOM)
#define WBAR_OFF (WSEG_OFF + 2 * WK * 4)  // mbarriers: Q, K of stage 0 and 1, V (the copy engine's loads)
// Bytes of dynamic shared memory a launch asks for (Cuda::flash_forward_launch: FLASH_WGMMA_SMEM):
// the tiles, the segment ids, the mbarriers, and up to 1023 bytes to reach 1024-byte alignment.
#define WSMEM (WBAR_OFF + 4 * 8 + 1024)
static_assert(3 * (WSMEM + 1024) <= 228 * 1024, "three forward blocks per SM");


// q (batch, q_len, heads, 128) bf16, rotated; k, v (batch, kv_cap, kv_heads, 128) bf16, rows from
// kv_len on never read; out (batch, q_len, heads, 128) f32; lse (batch, heads, q_len), natural log of
// Σ exp(score); tm_q, tm_k, tm_v: tensor maps over q, k and v (tma::head_rows), through which the
// tiles are read (the pointers are not read: the launcher, shared with flash.cu, passes the buffers
// themselves, which is also how cudarc tracks the launch's reads). Grid (heads, query blocks of 64 heaviest first, batch), 128 threads, WSMEM bytes.
extern "C" __global__ void __launch_bounds__(128, 3) flash_fwd_wgmma_hd128(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const uint32_t* seg, float* out, float* lse, FGEOM_ARGS,
                                                                               const __grid_constant__ TmaMap tm_q, const __grid_constant__ TmaMap tm_k, const __grid_constant__ TmaMap tm_v) {
    grid_dependency_wait();
#ifdef HAVE_WGMMA
    MAKE_FGEOM;
    extern __shared__ __align__(16) uint8_t dyn[];
    const uint32_t raw = smem_addr(dyn), base = (raw + 1023) & ~1023u;
    uint32_t* kseg = reinterpret_cast<uint32_t*>(dyn + (base - raw) + WSEG_OFF);  // [2][WK]
    // Causal: query block qb sees qb + 1 key blocks; with the query blocks on y, last first, every
    // head's heaviest block of a batch row starts before any lighter one, and the batch rows (z)
    // follow one another, so the blocks in flight share one row's K and V in L2.
    const int qb = gridDim.y - 1 - blockIdx.y, h = blockIdx.x, b = blockIdx.z;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, gr = lane >> 2, t4 = lane & 3;
    const int grp = h / (g.heads / g.kv_heads);
    const float sl2 = rsqrtf((float)WHD) * LOG2E;  // scores in log2 units
    const int r0 = qb * WQ + warp * 16 + gr, r1 = r0 + 8;
    const uint32_t qs0 = r0 < g.q_len ? seg_of(seg, g, b, g.q_offset + r0) : 0u;
    const uint32_t qs1 = r1 < g.q_len ? seg_of(seg, g, b, g.q_offset + r1) : 0u;
    const int q_hi = min(g.q_len, (qb + 1) * WQ);
    const int kv_end = min(g.kv_len, g.q_offset + q_hi);  // keys any query of this block can see

    // Q, K and V tiles by the copy engine (Rust: `tma::head_rows`; rows past q_len or kv_len zero),
    // two 64-column boxes each, counted by an mbarrier per buffer and issued by one thread, where
    // each of 128 threads issued 8 16-byte copies per tile with their addresses.
    const uint32_t bar_q = base + WBAR_OFF, bar_k = bar_q + 8, bar_v = bar_q + 24;  // K stage i's at bar_k + 8i
    if (threadIdx.x == 0) {
        for (int i = 0; i < 4; i++) mbar_init(bar_q + 8 * i, 1);
        mbar_init_fence();
    }
    __syncthreads();  // the barriers initialized before anyone names them
    auto load = [&](uint32_t dst, const TmaMap& map, uint32_t bar, int head, int row) {
        mbar_expect(bar, 2 * ATOM);
        tma_load_4d(dst, map, bar, 0, head, row, b);
        tma_load_4d(dst + ATOM, map, bar, 64, head, row, b);
    };
    if (threadIdx.x == 0 && kv_end > 0) load(base + WQ_OFF, tm_q, bar_q, h, qb * WQ);  // (waited for in the loop)
    // Key block kb's K into stage kb & 1, and its segment ids by plain stores that the next barrier
    // publishes; its V into the one V buffer (in the loop).
    auto issue_k = [&](int kb) {
        if (threadIdx.x == 0) load(base + WK_OFF + (kb & 1) * 2 * ATOM, tm_k, bar_k + 8 * (kb & 1), grp, kb * WK);
        if (threadIdx.x < WK) {
            const int s = kb * WK + threadIdx.x;
            kseg[(kb & 1) * WK + threadIdx.x] = s < g.kv_len ? seg_of(seg, g, b, s) : 0u;
        }
    };
    if (kv_end > 0) issue_k(0);

    // O: accumulator value 4j + e is row r0 (e < 2) or r1, column 8j + 2·t4 + e % 2 (wgmma's m64nN
    // layout: each warp's 16 rows as mma.m16n8k16's C tiles side by side); S likewise over 64 keys.
    float o[WHD / 2];
#pragma unroll
    for (int i = 0; i < WHD / 2; i++) o[i] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    for (int kb = 0; kb * WK < kv_end; kb++) {
        const int buf = kb & 1;
        if (kb == 0) mbar_wait(bar_q, 0);     // Q has landed ...
        mbar_wait(bar_k + 8 * buf, (kb >> 1) & 1);  // ... and K_kb ...
        __syncthreads();  // ... and the segment ids; every warp is done with S_{kb−1} and P·V_{kb−1}
        if (threadIdx.x == 0) load(base + WV_OFF, tm_v, bar_v, grp, kb * WK);
        if ((kb + 1) * WK < kv_end) issue_k(kb + 1);
        const uint32_t st = base + WK_OFF + buf * 2 * ATOM;

        // S = Q·Kᵀ over the head's 128 columns: 8 k16 steps, 32 bytes apart within each half.
        float sc[WK / 2];
#pragma unroll
        for (int i = 0; i < WK / 2; i++) sc[i] = 0.f;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < WHD / 16; kk++) {
            const uint32_t off = (kk >> 2) * ATOM + (kk & 3) * 32;
            wgmma_ss_n64(sc, desc_sw128(base + WQ_OFF + off), desc_sw128(st + off), kk > 0);
        }
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < WK / 2; i++) pin(sc[i]);

        // Mask and the running max of each of this thread's two rows, on the unscaled scores (the scale
        // goes into the exponent's FFMA below). A tile wholly below the diagonal, inside both lengths
        // and without segments takes no mask (uniform over the warpgroup, no per-value test).
        const bool full = !seg && (qb + 1) * WQ <= g.q_len && (kb + 1) * WK <= g.kv_len &&
                          (kb + 1) * WK - 1 <= g.q_offset + qb * WQ;
        if (!full) {
#pragma unroll
            for (int j = 0; j < WK / 8; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int sl = j * 8 + 2 * t4 + (e & 1), s = kb * WK + sl;
                    const uint32_t ks = kseg[buf * WK + sl];
                    const bool vis = e < 2 ? sees(g, r0, qs0, s, ks) : sees(g, r1, qs1, s, ks);
                    sc[4 * j + e] = vis ? sc[4 * j + e] : -INFINITY;
                }
            }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < WK / 8; j++) {
            mx0 = fmaxf(mx0, fmaxf(sc[4 * j], sc[4 * j + 1]));
            mx1 = fmaxf(mx1, fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
        }
        // The four lanes of a quad hold one row between them.
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        const float n0 = fmaxf(m0, mx0 * sl2), n1 = fmaxf(m1, mx1 * sl2);  // in log2 units
        // Exponents relative to the new max, or to 0 for a row that has seen nothing yet (m = -inf):
        // masked scores (-inf) then give p = 0 and the old sums' factor is 0 or 1 with no NaN.
        const float b0 = n0 == -INFINITY ? 0.f : n0, b1 = n1 == -INFINITY ? 0.f : n1;
        const float c0 = exp2_ftz(m0 - b0), c1 = exp2_ftz(m1 - b1);
        m0 = n0;
        m1 = n1;
        float s0 = 0.f, s1 = 0.f;
#pragma unroll
        for (int j = 0; j < WK / 8; j++) {
            sc[4 * j] = exp2_ftz(fmaf(sc[4 * j], sl2, -b0));
            sc[4 * j + 1] = exp2_ftz(fmaf(sc[4 * j + 1], sl2, -b0));
            sc[4 * j + 2] = exp2_ftz(fmaf(sc[4 * j + 2], sl2, -b1));
            sc[4 * j + 3] = exp2_ftz(fmaf(sc[4 * j + 3], sl2, -b1));
            s0 += sc[4 * j] + sc[4 * j + 1];
            s1 += sc[4 * j + 2] + sc[4 * j + 3];
        }
        l0 = l0 * c0 + s0;
        l1 = l1 * c1 + s1;
        if (__any_sync(0xffffffffu, c0 != 1.f || c1 != 1.f)) {
#pragma unroll
            for (int j = 0; j < WHD / 8; j++) {
                o[4 * j] *= c0;
                o[4 * j + 1] *= c0;
                o[4 * j + 2] *= c1;
                o[4 * j + 3] *= c1;
            }
        }
        // O += P·V: P's k16 slice kk is score tiles 2kk and 2kk + 1 re-packed (an A fragment); V's rows
        // 16kk.. of both halves through one MN-major descriptor (halves ATOM apart).
        // All of P packed before the fence: registers written between two products of one batch
        // make the compiler add a fence before each.
        uint32_t pa[WK / 16][4];
#pragma unroll
        for (int kk = 0; kk < WK / 16; kk++) {
            pa[kk][0] = pack_bf16(sc[8 * kk], sc[8 * kk + 1]);
            pa[kk][1] = pack_bf16(sc[8 * kk + 2], sc[8 * kk + 3]);
            pa[kk][2] = pack_bf16(sc[8 * kk + 4], sc[8 * kk + 5]);
            pa[kk][3] = pack_bf16(sc[8 * kk + 6], sc[8 * kk + 7]);
        }
        mbar_wait(bar_v, kb & 1);  // V_kb has landed (K_{kb+1} may fly)
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < WK / 16; kk++) wgmma_rs_n128_tb(o, pa[kk], desc_sw128_mn(base + WV_OFF + kk * 2048, ATOM), 1);
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < WHD / 2; i++) pin(o[i]);
    }
    flash_fwd_store<WHD>([&](int j, int e) { return o[4 * j + e]; }, m0, m1, l0, l1, g, b, h, r0, r1, t4, out, lse);
#else
    __trap();  // built for an arch without wgmma; the host never launches it there
#endif
}

// ---- backward -----------------------------------------------------------------------------------
// Block: two warpgroups on 128 keys of one (batch, kv head), warpgroup w on keys 64w.. of them; they
// walk the (head of the GQA group, block of 64 queries) steps that can see these keys together,
// sharing each step's Q and dO tiles (and lse, delta, segment ids, RoPE rows). Per step and
// warpgroup, with P = exp(S − lse) and dS = P ⊙ (dP − delta)·scale:
//   Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ   (m64n64, K/V rows as A and Q/dO as B, all K-major),
//   dV += Pᵀ·dO and dK += dSᵀ·Q (m64n128, P and dS from registers, dO and Q MN-major),
//   dQ  = dS·K over the block's 128 keys, warpgroup w taking column half w (m64n64; both
//         warpgroups' dSᵀ through shared memory as one MN-major A, K MN-major),
// dV and dK stay in registers to the end (then leave through shared memory, a bulk copy per row).
// dQ leaves the two warpgroups through shared memory: each stores its half of the step's 64 × 128
// tile, and a third warpgroup (the dQ writer, 40 registers a thread against the others' 232 by
// setmaxnreg) rotates it back with the tables and adds it into dq by 16-byte reductions (dq must be
// zero beforehand), while the two go on to the next step; one tile, handed over by named barriers
// (the writer needs well under a step for it), beside the writer's copy of the step's table rows.
// Before, the two did the rotation and reductions themselves with the tensor pipe idle (ncu, session
// 43: ~16% of the samples); with the writer the backward is 5.6% faster (session 44).
// Warpgroup 1 skips the products of a step whose queries all precede its keys (they would be 0) and
// then reduces dQ over warpgroup 0's keys only; the block skips a step none of its keys is seen in.
// Every tile keeps the head's columns in their order: the writer pairs each dQ column with its RoPE
// partner from the whole tile, and dK's partners (columns j, j + 64) are one thread's values jt, jt + 8
// (before the writer, K and Q were stored with partners side by side for the warpgroups' halves).
#define BK2 128    // keys per block
#define BQ2 64     // queries per step
#define ROPE_LD 72 // floats per staged RoPE table row of the epilogue (64 used): a quad's float2 reads of 8 rows hit 2 wavefronts
#define DQ_LD 136  // floats per dQ tile row (128 used): a half-warp's float2 stores to 4 rows hit distinct banks
#define TAB_LD 64  // floats per staged table row of the writer
// Shared memory (bytes from the 1024-aligned base).
#define B_K 0                        // K: two 16 KB halves of 128 rows
#define B_V (B_K + 2 * 16384)        // V: likewise
#define B_Q (B_V + 2 * 16384)        // Q of two steps: two 8 KB halves of 64 rows each
#define B_DO (B_Q + 2 * 16384)       // dO of two steps: likewise
#define B_DS (B_DO + 2 * 16384)      // dSᵀ of each warpgroup: 64 keys × 64 queries (one 8 KB half)
#define B_SMALL (B_DS + 2 * 8192)    // lse[2][64], delta[2][64] (f32), query segments [2][64], key segments [128]
#define B_DQ (B_SMALL + 4 * (3 * 2 * BQ2 + BK2))  // dQ tile [64][DQ_LD], then the writer's cos and sin [64][TAB_LD] (f32); the epilogue's key tables
#define DQ_TILES (BQ2 * DQ_LD * 4 + 2 * BQ2 * TAB_LD * 4)
#define KEY_TABLES (2 * BK2 * ROPE_LD * 4)  // cos[128][ROPE_LD], then sin
// Bytes of dynamic shared memory a launch asks for (attention.rs: flash_wgmma_bwd_smem), with and
// without RoPE tables, 1,024 bytes of alignment slack included.
#define BWD2_SMEM (B_DQ + DQ_TILES + 1024)
#define BWD2_SMEM_ROPE (B_DQ + (KEY_TABLES > DQ_TILES ? KEY_TABLES : DQ_TILES) + 1024)
// Named barriers (0 is __syncthreads'): the two MMA warpgroups among themselves, and the dQ tile's
// full (stored by them, for the writer) and empty (read by the writer, for them).
#define BAR_MMA 1
#define BAR_DQ_FULL 2
#define BAR_DQ_EMPTY 3
#define MMA_THREADS 256
#define BWD2_THREADS 384
// The epilogue stages dV and dK rows of OUT_LD floats where K, V, Q, dO and dSᵀ were (128 used; 8
// more so that a quad's float2 stores to 8 rows take 2 wavefronts) and the key rows' tables where
// the dQ tile and the writer's tables were.
#define OUT_LD 136
static_assert(2 * BK2 * OUT_LD * 4 <= B_SMALL - B_K, "dV and dK staging overflows the tiles' space");
static_assert(BWD2_SMEM_ROPE <= 227 * 1024, "the backward's shared memory exceeds an SM's");

// Named barrier `id` among `threads` threads (a multiple of 32): sync waits for all of them, arrive
// only counts this thread in (a producer handing data to the threads that sync).
__device__ __forceinline__ void named_sync(int id, int threads) { asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory"); }
__device__ __forceinline__ void named_arrive(int id, int threads) { asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory"); }
// A warpgroup's registers per thread lowered or raised (all its warps execute it; the raise waits
// for registers the lowering released).
template <int N> __device__ __forceinline__ void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N)); }
template <int N> __device__ __forceinline__ void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N)); }

// q, dout (batch, q_len, heads, 128) bf16 (q rotated); k, v (batch, kv_cap, kv_heads, 128) bf16 (k
// rotated); lse, delta (batch, heads, q_len); cos_t, sin_t: null, or the RoPE tables (batch·q_len,
// 64) that rotated q and k (dq, dk come out un-rotated); dq (f32, zeroed) += ; dk, dv (f32) rows below
// kv_len written. Grid (kv heads, key blocks of 128 heaviest first, batch), 384 threads: warpgroups
// 0 and 1 the products, 2 the dQ writer.
extern "C" __global__ void __launch_bounds__(BWD2_THREADS, 1) flash_bwd_wgmma_hd128(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const float* lse, const float* delta, const __nv_bfloat16* dout, const uint32_t* seg, const float* cos_t, const float* sin_t, float* dq, float* dk, float* dv, FGEOM_ARGS) {
    grid_dependency_wait();
#ifdef HAVE_WGMMA
    MAKE_FGEOM;
    extern __shared__ __align__(16) uint8_t dyn[];
    const uint32_t raw = smem_addr(dyn), base = (raw + 1023) & ~1023u;
    uint8_t* const sp = dyn + (base - raw);
    float* const s_lse = reinterpret_cast<float*>(sp + B_SMALL);  // [2][BQ2]
    float* const s_delta = s_lse + 2 * BQ2;                         // [2][BQ2]
    uint32_t* const s_qseg = reinterpret_cast<uint32_t*>(s_delta + 2 * BQ2);  // [2][BQ2]
    uint32_t* const s_kseg = s_qseg + 2 * BQ2;                                // [BK2]
    float* const dq_tile = reinterpret_cast<float*>(sp + B_DQ);  // [BQ2][DQ_LD]
    // Key block kb is seen by the queries from kb·BK2 on, so the low ones carry the most steps; on y
    // they start first for every head of a batch row, and the batch rows (z) follow one another, so the
    // blocks in flight share one row's Q, dO and dq in L2 (with the batch on y and the key blocks on z,
    // every head's first key blocks ran together and re-read Q, dO and dq from DRAM in later waves).
    const int kb = blockIdx.y, grp = blockIdx.x, b = blockIdx.z;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, gr = lane >> 2, t4 = lane & 3;
    const int rep = g.heads / g.kv_heads;
    const float scale = rsqrtf((float)WHD), sl2 = scale * LOG2E;
    const int64_t kbase = ((int64_t)b * g.kv_cap * g.kv_heads + grp) * WHD, kstride = (int64_t)g.kv_heads * WHD;
    const int64_t qstride = (int64_t)g.heads * WHD;
    const int key0 = kb * BK2 + 64 * wg;  // this warpgroup's first key
    // The first query that can see key kb·BK2 is at position kb·BK2, i.e. query index kb·BK2 − q_offset.
    const int qb0 = max(0, kb * BK2 - g.q_offset) / BQ2;
    const int nq = max(0, (g.q_len + BQ2 - 1) / BQ2 - qb0), steps = rep * nq;  // (head, query block) pairs
    // Step it: flash_common.cuh flash_bwd_step.
    auto step_of = [&](int it) { return flash_bwd_step<WHD>(g, b, grp, rep, qb0, nq, it); };
    // Whether step it has work (some key of the block is seen by its queries): both roles skip the
    // same steps, so their hand-overs pair up.
    auto works = [&](int it) {
        const int last_q = g.q_offset + step_of(it).qb * BQ2 + BQ2 - 1;  // position of the step's last query
        return !(kb * BK2 >= g.kv_len || kb * BK2 > last_q);
    };
    if (wg == 2) {
        // The dQ writer: each warp takes two rows per pass (half-warp r on row 8·pass + 2·warp + r),
        // lane l % 16 columns 4l.. and their RoPE partners 64 further, so one 16-byte reduction per lane
        // covers 256 contiguous bytes of each of two rows (with one row per lane, each reduction had
        // touched 32 rows). Each thread copies the table values it reads (so no barrier among the
        // writers) while the tile is being filled.
        setmaxnreg_dec<40>();
        const int w = threadIdx.x - MMA_THREADS, row0 = 2 * (w >> 5) + ((w >> 4) & 1), j = 4 * (w & 15);
        float* const cs_s = dq_tile + BQ2 * DQ_LD;  // [BQ2][TAB_LD]
        float* const sn_s = cs_s + BQ2 * TAB_LD;
        named_arrive(BAR_DQ_EMPTY, BWD2_THREADS);  // the tile starts empty
        for (int it = 0; it < steps; it++) {
            if (!works(it)) continue;
            const FlashBwdStep cur = step_of(it);
            const int t0 = cur.qb * BQ2;
            if (cos_t) {
#pragma unroll
                for (int pass = 0; pass < BQ2 / 8; pass++) {
                    const int row = row0 + 8 * pass, t = t0 + row;
                    const int64_t ti = ((int64_t)b * g.q_len + (t < g.q_len ? t : 0)) * (WHD / 2) + j;
                    cp_async16(smem_addr(cs_s + row * TAB_LD + j), cos_t + ti, t < g.q_len);
                    cp_async16(smem_addr(sn_s + row * TAB_LD + j), sin_t + ti, t < g.q_len);
                }
                cp_async_commit();
                cp_async_wait<0>();
            }
            named_sync(BAR_DQ_FULL, BWD2_THREADS);
#pragma unroll 2
            for (int pass = 0; pass < BQ2 / 8; pass++) {
                const int row = row0 + 8 * pass, t = t0 + row;
                const float* tr = dq_tile + row * DQ_LD + j;
                float4 lo = *reinterpret_cast<const float4*>(tr), hi = *reinterpret_cast<const float4*>(tr + WHD / 2);
                if (cos_t) {
                    const float4 cs = *reinterpret_cast<const float4*>(cs_s + row * TAB_LD + j);
                    const float4 sn = *reinterpret_cast<const float4*>(sn_s + row * TAB_LD + j);
                    rope_pairs(lo, hi, cs, make_float4(-sn.x, -sn.y, -sn.z, -sn.w));
                }
                if (t < g.q_len) {
                    float* p = dq + cur.qbase + (int64_t)t * qstride + j;
                    red_add4(p, lo);
                    red_add4(p + WHD / 2, hi);
                }
            }
            // The tile's loads have returned (the reductions read them), so it may be refilled.
            named_arrive(BAR_DQ_EMPTY, BWD2_THREADS);
        }
        return;
    }
    setmaxnreg_inc<232>();
    // Step it's Q and dO tiles, lse and delta into buffer it & 1 by cp.async, and its query segment
    // ids by plain stores that the next barrier publishes.
    auto issue = [&](int it) {
        const FlashBwdStep st = step_of(it);
        const int buf = it & 1, t0 = st.qb * BQ2;
        copy_tile<BQ2, 256>(base + B_Q + buf * 16384, q + st.qbase, qstride, t0, g.q_len);
        copy_tile<BQ2, 256>(base + B_DO + buf * 16384, dout + st.qbase, qstride, t0, g.q_len);
        if (threadIdx.x < BQ2) {
            const int t = t0 + threadIdx.x;
            const bool ok = t < g.q_len;
            const int64_t li = ((int64_t)b * g.heads + st.h) * g.q_len + t;
            cp_async4(smem_addr(s_lse + buf * BQ2 + threadIdx.x), lse + (ok ? li : 0), ok);
            cp_async4(smem_addr(s_delta + buf * BQ2 + threadIdx.x), delta + (ok ? li : 0), ok);
            s_qseg[buf * BQ2 + threadIdx.x] = ok ? seg_of(seg, g, b, g.q_offset + t) : 0u;
        }
    };
    copy_tile<BK2, 256>(base + B_K, k + kbase, kstride, kb * BK2, g.kv_len);
    copy_tile<BK2, 256>(base + B_V, v + kbase, kstride, kb * BK2, g.kv_len);
    if (threadIdx.x < BK2) {
        const int s = kb * BK2 + threadIdx.x;
        s_kseg[threadIdx.x] = s < g.kv_len ? seg_of(seg, g, b, s) : 0u;
    }
    if (steps > 0) issue(0);
    cp_async_commit();

    float dka[WHD / 2], dva[WHD / 2];  // rows: keys key0 + 16·warp + gr (+8); columns: the head's 128
#pragma unroll
    for (int i = 0; i < WHD / 2; i++) dka[i] = dva[i] = 0.f;
    // This warpgroup's rows of K and V (64 of each half's 128) and its dSᵀ tile.
    const uint32_t kw = base + B_K + wg * 64 * 128, vw = base + B_V + wg * 64 * 128;
    uint8_t* const ds_rows = sp + B_DS + wg * 8192;
    const int kl0 = 64 * wg + 16 * warp + gr, kl1 = kl0 + 8;  // this thread's key rows within the block
    for (int it = 0; it < steps; it++) {
        cp_async_wait<0>();   // this thread's copies of step it (and, first, of K and V) have landed ...
        fence_proxy_async();  // ... visible to wgmma's reads ...
        named_sync(BAR_MMA, MMA_THREADS);  // ... everyone's too; step it − 1's buffers are no longer read
        if (it + 1 < steps) issue(it + 1);
        cp_async_commit();
        const FlashBwdStep cur = step_of(it);
        const int buf = it & 1, qb = cur.qb;
        const int last_q = g.q_offset + qb * BQ2 + BQ2 - 1;  // position of the step's last query
        if (!works(it)) continue;  // no key of the block is seen (the writer skips the same steps)
        // Warpgroup 1's keys may all follow the step's queries: it then adds nothing to dV, dK, and dQ
        // reduces over warpgroup 0's keys only.
        const bool upper = kb * BK2 + 64 < g.kv_len && kb * BK2 + 64 <= last_q;
        const uint32_t qt = base + B_Q + buf * 16384, dot = base + B_DO + buf * 16384;
        if (wg == 0 || upper) {

            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ over the head's 128 columns: 8 k16 steps, 32 bytes apart within
            // each half (K/V halves 16 KB apart, Q/dO halves 8 KB), committed apart so that P is computed
            // while dPᵀ's products run, and dS while dV's run.
            float sc[BQ2 / 2], dp[BQ2 / 2];
#pragma unroll
            for (int i = 0; i < BQ2 / 2; i++) sc[i] = dp[i] = 0.f;
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < WHD / 16; kk++)
                wgmma_ss_n64(sc, desc_sw128(kw + (kk >> 2) * 16384 + (kk & 3) * 32), desc_sw128(qt + (kk >> 2) * 8192 + (kk & 3) * 32), kk > 0);
            wgmma_commit();
#pragma unroll
            for (int kk = 0; kk < WHD / 16; kk++)
                wgmma_ss_n64(dp, desc_sw128(vw + (kk >> 2) * 16384 + (kk & 3) * 32), desc_sw128(dot + (kk >> 2) * 8192 + (kk & 3) * 32), kk > 0);
            wgmma_commit();
            wgmma_wait<1>();  // Sᵀ
#pragma unroll
            for (int i = 0; i < BQ2 / 2; i++) pin(sc[i]);
            // P = exp(S − lse) in place of Sᵀ (rows: keys, columns: queries). Value 4j + e is column
            // 8j + 2·t4 + e % 2, so each j's lse (and delta) of the thread's two columns is one 8-byte
            // load. A tile wholly below the diagonal, inside both lengths and without segments takes no
            // mask (uniform over the warpgroup); otherwise a select per value, with no branch.
            const float2* lse2 = reinterpret_cast<const float2*>(s_lse + buf * BQ2) + t4;
            const float2* delta2 = reinterpret_cast<const float2*>(s_delta + buf * BQ2) + t4;
            const bool full = !seg && (qb + 1) * BQ2 <= g.q_len && key0 + 64 <= g.kv_len && key0 + 63 <= g.q_offset + qb * BQ2;
            if (full) {
#pragma unroll
                for (int j = 0; j < BQ2 / 8; j++) {
                    const float2 l = lse2[4 * j];
                    const float l0 = l.x * LOG2E, l1 = l.y * LOG2E;
                    sc[4 * j] = exp2_ftz(fmaf(sc[4 * j], sl2, -l0));
                    sc[4 * j + 1] = exp2_ftz(fmaf(sc[4 * j + 1], sl2, -l1));
                    sc[4 * j + 2] = exp2_ftz(fmaf(sc[4 * j + 2], sl2, -l0));
                    sc[4 * j + 3] = exp2_ftz(fmaf(sc[4 * j + 3], sl2, -l1));
                }
            } else {
                const int s0 = kb * BK2 + kl0;
                const uint32_t ks0 = s_kseg[kl0], ks1 = s_kseg[kl1];
                const uint2* qseg2 = reinterpret_cast<const uint2*>(s_qseg + buf * BQ2) + t4;
#pragma unroll
                for (int j = 0; j < BQ2 / 8; j++) {
                    const float2 l = lse2[4 * j];
                    const uint2 qs = qseg2[4 * j];
                    const int t = qb * BQ2 + 8 * j + 2 * t4;
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const bool vis = sees(g, t + (e & 1), e & 1 ? qs.y : qs.x, s0 + 8 * (e >> 1), e < 2 ? ks0 : ks1);
                        const float p = exp2_ftz(fmaf(sc[4 * j + e], sl2, -(e & 1 ? l.y : l.x) * LOG2E));
                        sc[4 * j + e] = vis ? p : 0.f;
                    }
                }
            }
            // dV += Pᵀ·dO: P as A operands (k16 slice kk: query tiles 2kk, 2kk + 1), dO's rows 16kk.. of
            // both halves (8 KB apart) per k16 step.
            uint32_t pa[BQ2 / 16][4];
#pragma unroll
            for (int kk = 0; kk < BQ2 / 16; kk++)
#pragma unroll
                for (int e = 0; e < 4; e++) pa[kk][e] = pack_bf16(sc[8 * kk + 2 * e], sc[8 * kk + 2 * e + 1]);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BQ2 / 16; kk++) wgmma_rs_n128_tb(dva, pa[kk], desc_sw128_mn(dot + kk * 2048, 8192), 1);
            wgmma_commit();
            wgmma_wait<1>();  // dPᵀ
#pragma unroll
            for (int i = 0; i < BQ2 / 2; i++) pin(dp[i]);
            // dS = P ⊙ (dP − delta)·scale in place of dPᵀ; as A operands, and dSᵀ into this warpgroup's
            // tile as dQ's MN-major A: row = key, 16-byte chunk j = queries 8j.., swizzled.
#pragma unroll
            for (int j = 0; j < BQ2 / 8; j++) {
                const float2 d = delta2[4 * j];
#pragma unroll
                for (int e = 0; e < 4; e++) dp[4 * j + e] = sc[4 * j + e] * (dp[4 * j + e] - (e & 1 ? d.y : d.x)) * scale;
            }
            uint32_t da[BQ2 / 16][4];
#pragma unroll
            for (int kk = 0; kk < BQ2 / 16; kk++)
#pragma unroll
                for (int e = 0; e < 4; e++) da[kk][e] = pack_bf16(dp[8 * kk + 2 * e], dp[8 * kk + 2 * e + 1]);
            {
                const int r0 = 16 * warp + gr;  // local key row (r0 + 8 has the same swizzle)
#pragma unroll
                for (int kk = 0; kk < BQ2 / 16; kk++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {  // e: (row r0 | r0 + 8) × (query tile 2kk | 2kk + 1)
                        const int row = r0 + 8 * (e & 1), j = 2 * kk + (e >> 1);
                        *reinterpret_cast<uint32_t*>(ds_rows + row * 128 + ((j ^ (r0 & 7)) << 4) + 4 * t4) = da[kk][e];
                    }
                }
            }
            // dK += dSᵀ·Q, Q's rows as dO's above.
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BQ2 / 16; kk++) wgmma_rs_n128_tb(dka, da[kk], desc_sw128_mn(qt + kk * 2048, 8192), 1);
            wgmma_commit();
        }
        // dQ (64 queries × 64 columns) = dS (64 × the block's 128 keys) · K: warpgroup w takes K's half
        // w (columns 64w.. in the head's order), the dSᵀ tiles of both warpgroups as one MN-major
        // A (warpgroup 1's 8 KB after warpgroup 0's: k16 steps 2048 bytes apart throughout), and hands
        // its columns to the writer: one reduction per value of the step, not one per warpgroup.
        fence_proxy_async();  // this thread's dSᵀ stores, visible to wgmma ...
        named_sync(BAR_MMA, MMA_THREADS);  // ... and both warpgroups'
        float dqa[WHD / 4];
#pragma unroll
        for (int i = 0; i < WHD / 4; i++) dqa[i] = 0.f;
        auto dq_products = [&](auto steps) {  // k16 steps: 8 over both warpgroups' keys, or 4
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < decltype(steps)::value; kk++)
                wgmma_ss_n64_tt(dqa, desc_sw128_mn(base + B_DS + kk * 2048, 8192), desc_sw128_mn(base + B_K + wg * 16384 + kk * 2048, 16384), kk > 0);
            wgmma_commit();
        };
        if (upper) dq_products(std::integral_constant<int, BK2 / 16>{});
        else dq_products(std::integral_constant<int, 4>{});
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < WHD / 4; i++) pin(dqa[i]);
        // dQ rows: queries 16·warp + gr (+8) of the step. Value 4jt + e is column 64w + 8jt + 2·t4 +
        // e % 2 (warpgroup w's half of K's columns). Into the tile once the writer has emptied it (the
        // step before), then handed over; the writer pairs each column with its RoPE partner.
        named_sync(BAR_DQ_EMPTY, BWD2_THREADS);
        float* const tile = dq_tile;
#pragma unroll
        for (int e2 = 0; e2 < 2; e2++) {
            float* const tr = tile + (16 * warp + gr + 8 * e2) * DQ_LD + 64 * wg + 2 * t4;
#pragma unroll
            for (int jt = 0; jt < 8; jt++)
                *reinterpret_cast<float2*>(tr + 8 * jt) = make_float2(dqa[4 * jt + 2 * e2], dqa[4 * jt + 2 * e2 + 1]);
        }
        // No fence: the arrive orders the tile's stores before the writer's sync returns.
        named_arrive(BAR_DQ_FULL, BWD2_THREADS);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < WHD / 2; i++) {
        pin(dka[i]);
        pin(dva[i]);
    }
    // dK, dV rows of this warpgroup: only this block writes them (dK rotated back with tables). Value
    // 4jt + e is column 8jt + 2·t4 + e % 2; jt and jt + 8 (jt in 0..7) are a column and its RoPE
    // partner.
    // Both go out through shared memory: each row staged whole, then one bulk copy per row (dV's
    // while dK is rotated), where 64 8-byte stores per thread had queued on the load/store unit and
    // the tables' rows, loaded beside each rotation, had waited a few at a time (ncu: ~20% of the
    // kernel's warp samples on the tables, ~5% on store throttling). The tables' rows of the block's
    // keys come by one round of copies into the dQ tile's place, flying while dV is staged.
    named_sync(BAR_MMA, MMA_THREADS);  // both warpgroups are done with every tile (K, V, Q, dO, dSᵀ)
    named_sync(BAR_DQ_EMPTY, BWD2_THREADS);  // the writer is done with the dQ tile and its tables
    float* const k_cos = reinterpret_cast<float*>(sp + B_DQ);  // [BK2][ROPE_LD], with tables
    float* const k_sin = k_cos + BK2 * ROPE_LD;
    if (cos_t) {
        const int c = (threadIdx.x & 15) * 4, r = threadIdx.x >> 4;  // 16 rows × 16 chunks per round
#pragma unroll
        for (int i = 0; i < BK2 / 16; i++) {
            const int row = r + 16 * i, s = kb * BK2 + row;
            const bool ok = s < g.kv_len;
            const int64_t off = ((int64_t)b * g.kv_cap + (ok ? s : 0)) * (WHD / 2) + c;
            cp_async16(smem_addr(k_cos + row * ROPE_LD + c), cos_t + off, ok);
            cp_async16(smem_addr(k_sin + row * ROPE_LD + c), sin_t + off, ok);
        }
        cp_async_commit();
    }
    float* const t_dv = reinterpret_cast<float*>(sp + B_K);  // [BK2][OUT_LD]
    float* const t_dk = t_dv + BK2 * OUT_LD;                 // [BK2][OUT_LD]
#pragma unroll
    for (int e2 = 0; e2 < 2; e2++) {
        float* const row = t_dv + (e2 ? kl1 : kl0) * OUT_LD + 2 * t4;
#pragma unroll
        for (int jt = 0; jt < WHD / 8; jt++)
            *reinterpret_cast<float2*>(row + 8 * jt) = make_float2(dva[4 * jt + 2 * e2], dva[4 * jt + 2 * e2 + 1]);
    }
    if (cos_t) cp_async_wait<0>();
    fence_proxy_async();  // the staged dV rows, visible to the bulk copies ...
    named_sync(BAR_MMA, MMA_THREADS);  // ... all of them; the tables' rows have landed
    // Row r of the block's keys: thread r copies its dV, thread BK2 + r (below) its dK.
    const int out_row = threadIdx.x & (BK2 - 1), out_key = kb * BK2 + out_row;
    const bool copies_out = out_key < g.kv_len;
    if (threadIdx.x < BK2 && copies_out) bulk_store(dv + kbase + (int64_t)out_key * kstride, smem_addr(t_dv + out_row * OUT_LD), WHD * 4);
#pragma unroll
    for (int e2 = 0; e2 < 2; e2++) {
        const int kl = e2 ? kl1 : kl0;
        float* const row = t_dk + kl * OUT_LD;
#pragma unroll
        for (int jt = 0; jt < 8; jt++) {
            const int d = 8 * jt + 2 * t4;
            float2 lo = make_float2(dka[4 * jt + 2 * e2], dka[4 * jt + 2 * e2 + 1]);
            float2 hi = make_float2(dka[4 * (jt + 8) + 2 * e2], dka[4 * (jt + 8) + 2 * e2 + 1]);
            if (cos_t)
                unrotate_by(*reinterpret_cast<const float2*>(k_cos + kl * ROPE_LD + d), *reinterpret_cast<const float2*>(k_sin + kl * ROPE_LD + d), lo, hi);
            *reinterpret_cast<float2*>(row + d) = lo;
            *reinterpret_cast<float2*>(row + d + WHD / 2) = hi;
        }
    }
    fence_proxy_async();
    named_sync(BAR_MMA, MMA_THREADS);
    if (threadIdx.x >= BK2 && copies_out) bulk_store(dk + kbase + (int64_t)out_key * kstride, smem_addr(t_dk + out_row * OUT_LD), WHD * 4);
    bulk_commit();
    bulk_wait_read();  // the block's shared memory must outlive the copies' reads
#else
    __trap();  // built for an arch without wgmma; the host never launches it there
#endif
}

// ---- probe of the forward's tensor maps (tests) -------------------------------------------------
// One 64-row tile of `map` (tma::head_rows) at (head, position t0, sequence b) by the copy engine, both
// column halves, its 16 KB of shared memory copied as they landed to out: the GPU test compares them
// byte for byte with copy_tile's layout. One block of 128 threads, 16 KB + 1 KB of dynamic shared memory.
extern "C" __global__ void tma_probe(const __grid_constant__ TmaMap map, int head, int t0, int b, uint4* out) {
    grid_dependency_wait();
#ifdef HAVE_WGMMA
    extern __shared__ __align__(16) uint8_t dyn[];
    __shared__ __align__(8) uint64_t bar_word;
    const uint32_t raw = smem_addr(dyn), base = (raw + 1023) & ~1023u, bar = smem_addr(&bar_word);
    if (threadIdx.x == 0) {
        mbar_init(bar, 1);
        mbar_init_fence();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        mbar_expect(bar, 2 * 8192);
        tma_load_4d(base, map, bar, 0, head, t0, b);
        tma_load_4d(base + 8192, map, bar, 64, head, t0, b);
    }
    mbar_wait(bar, 0);
    const uint4* tile = reinterpret_cast<const uint4*>(dyn + (base - raw));
    for (int i = threadIdx.x; i < 16384 / 16; i += blockDim.x) out[i] = tile[i];
#else
    __trap();
#endif
}
