// Flash attention forward on Hopper's warpgroup products (wgmma), head_dim 128, from bf16 q, k and v
// (the training step's saved attention inputs: q and k already rotated). Same contract and values
// as flash.cu's flash_fwd_hd128 (causal, GQA, segment masks, q_offset, lse saved for the backward),
// which serves the other calls (f32 q, head_dim 64, devices without wgmma).
// CPU reference: Cpu::attention (src/backend/cpu.rs). Launcher: Cuda::flash_forward_launch
// (src/backend/cuda/attention.rs).
//
// Why: the mma.sync kernel issues a shared load (ldmatrix) for every two 16×8×16 products and keeps
// each warp's 16 query rows against 32 keys per step (ncu: latency-bound on that chain). Here one
// warpgroup (4 warps) owns 64 query rows and takes 64 keys per step in two asynchronous products
// that read their operands from shared memory themselves: S = Q·Kᵀ (m64n64, Q and K K-major) and
// O += P·V (m64n128, P from registers, V MN-major through the descriptor's transpose), with no
// fragment loads at all.
//
// Shared memory (dynamic, rounded up to 1024 bytes for the swizzle): Q, then two stages of K and V,
// each 64 rows × 128 bf16 stored as two 64-column halves ("atoms", 8 KB) in the 128-byte swizzle
// (wgmma.cuh), then the two stages' key segment ids. Stage kb & 1 is filled by cp.async while the
// warpgroup works on the other.
#include "flash_common.cuh"
#include "wgmma.cuh"

#define WQ 64      // queries per block: one warpgroup, 16 rows per warp
#define WK 64      // keys per step
#define WHD 128    // head_dim
#define ATOM 8192  // one 64-row × 64-column bf16 half of a tile
#define WQ_OFF 0
#define WKV_OFF (2 * ATOM)
#define WSTAGE (4 * ATOM)  // K's two halves, then V's
#define WSEG_OFF (WKV_OFF + 2 * WSTAGE)
// Bytes of dynamic shared memory a launch asks for (Cuda::flash_forward_launch: FLASH_WGMMA_SMEM):
// the tiles, the segment ids, and up to 1023 bytes to reach 1024-byte alignment.
#define WSMEM (WSEG_OFF + 2 * WK * 4 + 1024)

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

// Rows [row0, row0 + 64) of one head (row r at src + r·stride, 128 bf16) into the two swizzled
// halves at shared address dst, zeros from row `valid` on; 16-byte copies, 8 per thread. A thread's
// column chunk and row within each 8-row group are fixed, so its swizzled column is too.
__device__ __forceinline__ void copy_tile64(uint32_t dst, const __nv_bfloat16* src, int64_t stride, int row0, int valid) {
    const int cc = threadIdx.x & 15, r = threadIdx.x >> 4;  // chunk of the 16 per row; row mod 8
    const uint32_t d0 = dst + (cc >> 3) * ATOM + r * 128 + (((cc & 7) ^ r) << 4);
#pragma unroll
    for (int i = 0; i < 8; i++) {
        const int row = row0 + r + 8 * i;
        const bool ok = row < valid;
        cp_async16(d0 + i * 1024, src + (int64_t)(ok ? row : 0) * stride + cc * 8, ok);
    }
}
#endif

// q (batch, q_len, heads, 128) bf16, rotated; k, v (batch, kv_cap, kv_heads, 128) bf16, rows from
// kv_len on never read; out (batch, q_len, heads, 128) f32; lse (batch, heads, q_len), natural log of
// Σ exp(score). Grid (heads, batch, query blocks of 64, heaviest first), 128 threads, WSMEM bytes.
extern "C" __global__ void __launch_bounds__(128, 2) flash_fwd_wgmma_hd128(const __nv_bfloat16* q, const __nv_bfloat16* k, const __nv_bfloat16* v, const uint32_t* seg, float* out, float* lse, FGEOM_ARGS) {
    grid_dependency_wait();
#ifdef HAVE_WGMMA
    MAKE_FGEOM;
    extern __shared__ __align__(16) uint8_t dyn[];
    const uint32_t raw = smem_addr(dyn), base = (raw + 1023) & ~1023u;
    uint32_t* kseg = reinterpret_cast<uint32_t*>(dyn + (base - raw) + WSEG_OFF);  // [2][WK]
    // Causal: query block qb sees qb + 1 key blocks; with the query blocks on z, last first, every
    // head's heaviest block starts before any lighter one (as flash.cu's forward).
    const int qb = gridDim.z - 1 - blockIdx.z, h = blockIdx.x, b = blockIdx.y;
    const int warp = threadIdx.x / WARP, lane = threadIdx.x % WARP, gr = lane >> 2, t4 = lane & 3;
    const int grp = h / (g.heads / g.kv_heads);
    const float sl2 = rsqrtf((float)WHD) * LOG2E;  // scores in log2 units
    const int r0 = qb * WQ + warp * 16 + gr, r1 = r0 + 8;
    const uint32_t qs0 = r0 < g.q_len ? seg_of(seg, g, b, g.q_offset + r0) : 0u;
    const uint32_t qs1 = r1 < g.q_len ? seg_of(seg, g, b, g.q_offset + r1) : 0u;
    const int q_hi = min(g.q_len, (qb + 1) * WQ);
    const int kv_end = min(g.kv_len, g.q_offset + q_hi);  // keys any query of this block can see
    const int64_t kbase = ((int64_t)b * g.kv_cap * g.kv_heads + grp) * WHD, kstride = (int64_t)g.kv_heads * WHD;

    copy_tile64(base + WQ_OFF, q + ((int64_t)b * g.q_len * g.heads + h) * WHD, (int64_t)g.heads * WHD, qb * WQ, g.q_len);
    // Key block kb into stage kb & 1, and its segment ids by plain stores that the next barrier publishes.
    auto issue = [&](int kb) {
        const uint32_t st = base + WKV_OFF + (kb & 1) * WSTAGE;
        copy_tile64(st, k + kbase, kstride, kb * WK, g.kv_len);
        copy_tile64(st + 2 * ATOM, v + kbase, kstride, kb * WK, g.kv_len);
        if (threadIdx.x < WK) {
            const int s = kb * WK + threadIdx.x;
            kseg[(kb & 1) * WK + threadIdx.x] = s < g.kv_len ? seg_of(seg, g, b, s) : 0u;
        }
    };
    if (kv_end > 0) issue(0);
    cp_async_commit();  // Q with the first key block

    // O: accumulator value 4j + e is row r0 (e < 2) or r1, column 8j + 2·t4 + e % 2 (wgmma's m64nN
    // layout: each warp's 16 rows as mma.m16n8k16's C tiles side by side); S likewise over 64 keys.
    float o[WHD / 2];
#pragma unroll
    for (int i = 0; i < WHD / 2; i++) o[i] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    for (int kb = 0; kb * WK < kv_end; kb++) {
        const int buf = kb & 1;
        cp_async_wait<0>();  // this thread's copies of block kb (and Q) have landed ...
        fence_proxy_async(); // ... visible to wgmma's reads ...
        __syncthreads();     // ... everyone's too, and every warp is done with block kb − 1's stage
        if ((kb + 1) * WK < kv_end) issue(kb + 1);
        cp_async_commit();
        const uint32_t st = base + WKV_OFF + buf * WSTAGE;

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

        // Mask, scale, and the running max of each of this thread's two rows. A tile wholly below the
        // diagonal, inside both lengths and without segments needs no mask.
        const bool full = !seg && (qb + 1) * WQ <= g.q_len && (kb + 1) * WK <= g.kv_len &&
                          (kb + 1) * WK - 1 <= g.q_offset + qb * WQ;
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < WK / 8; j++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const int sl = j * 8 + 2 * t4 + (e & 1), s = kb * WK + sl;
                const uint32_t ks = kseg[buf * WK + sl];
                const bool vis = full || (e < 2 ? sees(g, r0, qs0, s, ks) : sees(g, r1, qs1, s, ks));
                sc[4 * j + e] = vis ? sc[4 * j + e] * sl2 : -INFINITY;
            }
            mx0 = fmaxf(mx0, fmaxf(sc[4 * j], sc[4 * j + 1]));
            mx1 = fmaxf(mx1, fmaxf(sc[4 * j + 2], sc[4 * j + 3]));
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
        for (int j = 0; j < WK / 8; j++) {
            sc[4 * j] = exp2_ftz(sc[4 * j] - b0);
            sc[4 * j + 1] = exp2_ftz(sc[4 * j + 1] - b0);
            sc[4 * j + 2] = exp2_ftz(sc[4 * j + 2] - b1);
            sc[4 * j + 3] = exp2_ftz(sc[4 * j + 3] - b1);
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
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < WK / 16; kk++) wgmma_rs_n128_tb(o, pa[kk], desc_sw128_mn(st + 2 * ATOM + kk * 2048, ATOM), 1);
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < WHD / 2; i++) pin(o[i]);
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = l0 > 0.f ? 1.f / l0 : 0.f, i1 = l1 > 0.f ? 1.f / l1 : 0.f;
    if (r0 < g.q_len) {
        float* po = out + (((int64_t)b * g.q_len + r0) * g.heads + h) * WHD;
#pragma unroll
        for (int j = 0; j < WHD / 8; j++) *reinterpret_cast<float2*>(po + j * 8 + 2 * t4) = make_float2(o[4 * j] * i0, o[4 * j + 1] * i0);
        if (t4 == 0) lse[((int64_t)b * g.heads + h) * g.q_len + r0] = l0 > 0.f ? m0 * LN2 + logf(l0) : -INFINITY;
    }
    if (r1 < g.q_len) {
        float* po = out + (((int64_t)b * g.q_len + r1) * g.heads + h) * WHD;
#pragma unroll
        for (int j = 0; j < WHD / 8; j++) *reinterpret_cast<float2*>(po + j * 8 + 2 * t4) = make_float2(o[4 * j + 2] * i1, o[4 * j + 3] * i1);
        if (t4 == 0) lse[((int64_t)b * g.heads + h) * g.q_len + r1] = l1 > 0.f ? m1 * LN2 + logf(l1) : -INFINITY;
    }
#else
    __trap();  // built for an arch without wgmma; the host never launches it there
#endif
}
