// Fused 4-bit dequant-matmul on the Hopper tensor cores (wgmma), for products of more than 8 rows:
//   forward      out (M, N) = round16(a (M, K) · dequant(W)ᵀ)           W (N, K) in 4 bits
//   input grad   out (M, K) (+)= round16(a (M, N) · dequant(W))
// `a` arrives already rounded to the 16-bit compute dtype (the host converts the f32 activations in
// one pass). The same numbers as the second path (dequantize W, cuBLAS with f32 accumulation, output
// rounded to the compute dtype and widened): the 16-bit operands are identical, products are summed
// in f32, the sum is rounded once. CPU reference: Cpu::linear / Cpu::linear_backward_input with a
// 4-bit weight.
//
// Why fused: the second path writes and rereads a 16-bit copy of all of W whatever M is, and a 16-bit
// output; here W travels as 0.5 byte per value and the output is written once, in f32.
//
// Shape of the work: the product is computed transposed, outᵀ = W · aᵀ (forward) or Wᵀ · aᵀ (input
// grad), so that the dequantized weights are wgmma's A operand, which may come from registers: each
// thread dequantizes exactly the values of its own fragment straight from the 4-bit codes, and no
// dequantized tile is ever written to shared memory or waited for by another warp. A block of 256
// threads (two warpgroups) owns 128 W rows (forward; W columns for the input grad), 64 per warpgroup,
// times BT tokens (the wgmma N: 256 for training shapes, 128 for few rows), and walks the reduction
// 64 values at a time. The token tile sits in shared memory as 16-bit values, 128 bytes per row with
// the 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r % 8)), read by wgmma through its
// matrix descriptor; next to it each stage holds the raw codes and the words the scales come from.
// Pipeline: NS stages of cp.async copies, NS-2 steps ahead; each step waits for its copies and one
// barrier, dequantizes its fragments while the previous step's products still run (two fragment
// sets), issues four wgmma m64nBTk16 and waits for the previous step's.
// Fragment order (the A layout of mma.m16n8k16 per warp: pairs 0, 2 on row lg = lane/4, pairs 1, 3 on
// row lg + 8; pair 0/1 at reduction 2t, 2t+1 and pair 2/3 at 2t+8, 2t+9 of the k16 slice, t = lane%4):
// forward: rows are W rows; the 8 code bytes a thread needs per W row and step are byte t of each of
// the row's eight 32-bit code words. Input grad: the reduction runs over W rows, so a pair holds the
// same W column of two W rows; the 64 fragment rows of a warpgroup are reordered so that rows lg and
// lg+8 are the high and low nibble of one code byte (W columns 2c, 2c+1), and the output columns are
// put back in order when written.
// Split-K: when the output tiles are too few to fill the GPU (small M), blockIdx.z takes a share of
// the reduction steps and writes raw f32 partial sums; gemm_4bit_reduce adds them and rounds.
// Sizes: the reduction and W's columns are multiples of 64, the absmax block a power of two ≥ 32, W
// under 2³¹ values; M and W's rows are free (tiles are clipped).
// Progression and measurements: docs/PERF.md. Built for sm_90a only (wgmma); the host picks this path
// only there (build.rs sets `wgmma_kernels`).
#include "quant4.cuh"
#include "wgmma.cuh"

#define GEMM_THREADS 256
#define BM 128                 // W rows (forward) or W columns (input grad) per block, 64 per warpgroup
#define TK 64                  // reduction values per step
#define FWD_CODE_LD 48         // bytes per W row in the forward code tile (32 used; 48 spreads 8 rows over all banks)
#define DG_CODE_LD 80          // bytes per W row in the input-grad code tile (64 used; 80: no bank conflicts)
#define CODE_TILE 6144         // max(128 × 48, 64 × 80)
#define SCALE_TILE 2048        // forward: 128 W rows × 2 words; input grad: 64 W rows × 8 words

// Per token-tile width BT: stages, their size (token tile + codes + scale words, a multiple of 1024 so
// every token tile stays 1024-aligned for the swizzle), blocks per SM.
template <int BT> struct Cfg {
    static constexpr int NS = BT == 256 ? 5 : 4;
    static constexpr int LOOK = NS - 2;  // steps whose copies are in flight ahead of the one multiplied
    static constexpr int X_TILE = BT * TK * 2;
    static constexpr int STAGE = X_TILE + CODE_TILE + SCALE_TILE;
    static constexpr int X_CHUNKS = BT * 8 / GEMM_THREADS;  // 16-byte token-tile chunks per thread per step
    static_assert(STAGE % 1024 == 0, "stage alignment");
};

struct Quant4Args {
    const uint8_t* packed;
    const float* absmax;
    const uint8_t* absmax_q;
    const float* absmax2;
    const float* code256;
    float offset;
    int blocksize;
};

#ifdef HAVE_WGMMA
// d (m64 × nN over the warpgroup) (+)= A · B: A from registers (this thread's four 16-bit pairs of the
// 64 × 16 slice), B (N tokens × 16) from shared memory through its descriptor, f32 accumulation;
// acc_in 0 ignores d's old contents (the first product, so d needs no zeroing). TY is the 16-bit type
// of compute dtype C.
template <int C, int N> __device__ __forceinline__ void wgmma_ra(float* d, const uint32_t* a, uint64_t db, int acc_in);
#define WGMMA_RA_N128(C, TY) \
    template <> __device__ __forceinline__ void wgmma_ra<C, 128>(float* d, const uint32_t* a, uint64_t db, int acc_in) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
                     "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc_in)); \
    }
WGMMA_RA_N128(1, "f16")
WGMMA_RA_N128(2, "bf16")
#define WGMMA_RA_N256(C, TY) \
    template <> __device__ __forceinline__ void wgmma_ra<C, 256>(float* d, const uint32_t* a, uint64_t db, int acc_in) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n" \
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n" \
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127]) \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(acc_in)); \
    }
WGMMA_RA_N256(1, "f16")
WGMMA_RA_N256(2, "bf16")

// One thread's share of each step's copies, with what does not change along the reduction worked
// out once: the 16-bit token tile (a = x forward, dy input grad), the W codes, and the words the
// scales come from.
template <bool DGRAD, int BT> struct Copies {
    const uint16_t* x;    // chunk 0's source at reduction 0; chunk i is 32·i token rows further
    int64_t x_rows32;     // 32 token rows, in elements
    uint32_t x_dst;       // chunk 0's offset in the stage (chunk i: + 32·128·i)
    uint32_t x_ok;        // bit i: chunk i's token row is inside m
    const uint8_t* code;  // forward: this W row's codes at reduction 0; input grad: code row r of step 0
    uint32_t code_dst, s_dst;
    bool code_ok, s_ok;
    int64_t sbase;  // forward: row·cols; input grad: r·cols + w0 + 32c (reduction row k0 adds k0·cols)
    int c;          // forward: half of the row and scale word; input grad: 32-column group

    __device__ __forceinline__ void init(const uint16_t* a, const Quant4Args& q, int m, int rows, int cols, int red, int t0, int w0) {
        const int tid = threadIdx.x, xr = tid >> 3, xc = tid & 7;
        x = a + (int64_t)min(t0 + xr, m - 1) * red + 8 * xc;
        x_rows32 = (int64_t)32 * red;
        x_dst = swz(xr, xc);
        x_ok = 0;
#pragma unroll
        for (int i = 0; i < Cfg<BT>::X_CHUNKS; i++) x_ok |= (uint32_t)(t0 + xr + 32 * i < m) << i;
        const int cx = Cfg<BT>::X_TILE;
        if (!DGRAD) {  // 128 W rows × 32 bytes: thread i copies half i%2 of row i/2, then scale word i%2
            const int r = tid >> 1, row = w0 + r;
            c = tid & 1;
            code_ok = s_ok = row < rows;
            sbase = (int64_t)min(row, rows - 1) * cols;
            code = q.packed + sbase / 2 + 16 * c;
            code_dst = cx + r * FWD_CODE_LD + 16 * c;
            s_dst = cx + CODE_TILE + 8 * r + 4 * c;
        } else {  // 64 W rows × 64 bytes (W columns w0..w0+127): chunk c = i%4 of row i/4 (32 columns), then
                  // the scale words of those 32 columns (one block: blocks are powers of two ≥ 32)
            const int r = tid >> 2, col = w0 + 32 * (tid & 3);
            c = tid & 3;
            code_ok = s_ok = col < cols;
            code = q.packed + ((int64_t)r * cols + (code_ok ? col : 0)) / 2;
            code_dst = cx + r * DG_CODE_LD + 16 * c;
            sbase = (int64_t)r * cols + (code_ok ? col : 0);
            s_dst = cx + CODE_TILE + 32 * r + 4 * c;
        }
    }

    // The copies of the step at reduction k0 into the stage at shared address st.
    __device__ __forceinline__ void issue(uint32_t st, const Quant4Args& q, int rows, int cols, int bs_log2, int k0) const {
#pragma unroll
        for (int i = 0; i < Cfg<BT>::X_CHUNKS; i++) cp_async16(st + x_dst + 32 * 128 * i, x + k0 + x_rows32 * i, (x_ok >> i) & 1);
        if (!DGRAD) {
            cp_async16(st + code_dst, code + k0 / 2, code_ok);
            const int64_t blk = (sbase + k0) >> bs_log2;
            if (q.absmax_q) {  // word 0: the 4 codes around blk (blk and blk+1 share it); word 1: its scale
                if (c == 0) cp_async4(st + s_dst, q.absmax_q + (blk & ~(int64_t)3), s_ok);
                else cp_async4(st + s_dst, q.absmax2 + blk / 256, s_ok);
            } else {  // word 0: blk's absmax; word 1: the next block's when blocks are 32 wide
                cp_async4(st + s_dst, q.absmax + blk + c, s_ok && (c == 0 || bs_log2 == 5));
            }
        } else {
            const int64_t kc = (int64_t)k0 * cols;
            cp_async16(st + code_dst, code + kc / 2, code_ok);
            const int64_t blk = (sbase + kc) >> bs_log2;
            if (q.absmax_q) {  // word c: the 4 codes around the group's block; word 4 + c: its scale
                cp_async4(st + s_dst, q.absmax_q + (blk & ~(int64_t)3), s_ok);
                cp_async4(st + s_dst + 16, q.absmax2 + blk / 256, s_ok);
            } else {  // word c: the group's absmax
                cp_async4(st + s_dst, q.absmax + blk, s_ok);
            }
        }
    }
};

// A code byte as a dequantized pair: high nibble (the even reduction index) in the low half.
template <int C> __device__ __forceinline__ uint32_t deq_pair(const float* lut, uint32_t byte, float s) {
    return pack16<C>(lut[(byte >> 4) & 15] * s, lut[byte & 15] * s);
}

// This thread's 16 A fragment registers of one step (4 per k16 slice) from the stage's codes and
// scale words (see the fragment order at the top).
template <int C, bool DGRAD, int BT>
__device__ __forceinline__ void fragments(uint32_t (&f)[16], const uint8_t* stage, const float* lut, const float* c256, const Quant4Args& q, int cols, int w0, int bs_log2, int k0) {
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, lg = lane >> 2, t = lane & 3;
    const uint8_t* codes = stage + Cfg<BT>::X_TILE;
    const uint32_t* sw = reinterpret_cast<const uint32_t*>(codes + CODE_TILE);
    if (!DGRAD) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = 64 * wg + 16 * warp + lg + 8 * h;
            const uint4 u0 = *reinterpret_cast<const uint4*>(codes + r * FWD_CODE_LD), u1 = *reinterpret_cast<const uint4*>(codes + r * FWD_CODE_LD + 16);
            const uint32_t w[8] = {u0.x, u0.y, u0.z, u0.w, u1.x, u1.y, u1.z, u1.w};
            const uint2 sv = *reinterpret_cast<const uint2*>(sw + 2 * r);
            float s0, s1;  // scales of reduction values 0..31 and 32..63 of the step
            if (q.absmax_q) {
                const uint32_t blk = (uint32_t)(((int64_t)(w0 + r) * cols + k0) >> bs_log2);
                const float a2 = __uint_as_float(sv.y);
                s0 = c256[(sv.x >> (8 * (blk & 3))) & 255] * a2 + q.offset;
                s1 = c256[(sv.x >> (8 * ((blk + 1) & 3))) & 255] * a2 + q.offset;
            } else {
                s0 = __uint_as_float(sv.x), s1 = __uint_as_float(sv.y);
            }
            if (bs_log2 != 5) s1 = s0;
#pragma unroll
            for (int j = 0; j < 8; j++) f[4 * (j >> 1) + 2 * (j & 1) + h] = deq_pair<C>(lut, w[j] >> (8 * t), j < 4 ? s0 : s1);
        }
    } else {
        const int cb = 32 * wg + 8 * warp + lg;  // this thread's code byte column: W columns w0 + 2cb, +1
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {  // W rows n, n+1 (pairs 0, 1 of the slice); then n+8, n+9 (2, 3)
                float hi[2], lo[2];
#pragma unroll
                for (int d = 0; d < 2; d++) {
                    const int n = 16 * kk + 2 * t + 8 * e + d;
                    const uint32_t byte = codes[n * DG_CODE_LD + cb];
                    const uint32_t* rw = sw + 8 * n + (cb >> 4);  // the words of this column's 32-column group
                    float s;
                    if (q.absmax_q) {
                        // 32-bit block arithmetic: the host takes this path for W of fewer than 2³¹ values.
                        const uint32_t blk = ((uint32_t)(k0 + n) * (uint32_t)cols + (uint32_t)(w0 + 2 * cb)) >> bs_log2;
                        s = c256[(rw[0] >> (8 * (blk & 3))) & 255] * __uint_as_float(rw[4]) + q.offset;
                    } else {
                        s = __uint_as_float(rw[0]);
                    }
                    hi[d] = lut[byte >> 4] * s, lo[d] = lut[byte & 15] * s;
                }
                f[4 * kk + 2 * e] = pack16<C>(hi[0], hi[1]);
                f[4 * kk + 2 * e + 1] = pack16<C>(lo[0], lo[1]);
            }
        }
    }
}
#endif

// DGRAD false: out (m, rows) = a (m, cols) · Wᵀ.  DGRAD true: out (m, cols) (+)= a (m, rows) · W.
// With `partial` (split-K), block z adds steps [z·steps/splits, (z+1)·steps/splits) and writes its raw
// f32 sums to partial[z] (m × n_out) instead.
template <int C, bool DGRAD, int BT>
__device__ void gemm_4bit(const Quant4Args q, const float* code16, const uint16_t* a, float* out, float* partial, int m, int rows, int cols, int accumulate) {
#ifdef HAVE_WGMMA
    using K = Cfg<BT>;
    __shared__ float lut[16];
    __shared__ float c256[256];
    extern __shared__ uint8_t dyn[];
    const uint32_t dyn_addr = (uint32_t)__cvta_generic_to_shared(dyn);
    uint8_t* smem = dyn + (((dyn_addr + 1023) & ~1023u) - dyn_addr);  // stages start 1024-aligned
    const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(smem);
    const int red = DGRAD ? rows : cols, n_out = DGRAD ? cols : rows;
    const int w0 = blockIdx.x * BM, t0 = blockIdx.y * BT, bs_log2 = __ffs(q.blocksize) - 1;
    const int all_steps = red / TK;
    const int first = (int)((int64_t)all_steps * blockIdx.z / gridDim.z), last = (int)((int64_t)all_steps * (blockIdx.z + 1) / gridDim.z);
    const int steps = last - first;
    load_lut(lut, code16);
    if (q.absmax_q) c256[threadIdx.x] = q.code256[threadIdx.x];
    Copies<DGRAD, BT> cp;
    cp.init(a, q, m, rows, cols, red, t0, w0);

    // Step s of this block is reduction step first + s; its stage is s % NS.
    auto copies = [&](int s) {
        if (s < steps) cp.issue(sbase + (s % K::NS) * K::STAGE, q, rows, cols, bs_log2, (first + s) * TK);
        cp_async_commit();  // one group per step, empty past the end, so wait counts stay uniform
    };
    float acc[BT / 2];  // the first product overwrites it (acc_in 0)
    for (int s = 0; s < K::LOOK; s++) copies(s);
    uint32_t fa[16], fb[16];
    // Step s: wait for its copies; start those of step s + LOOK (its stage was last read by step s-2,
    // whose products every warpgroup waited for before this barrier); dequantize its fragments while
    // step s-1's products run; issue its products and wait for step s-1's (freeing s-1's fragments).
    auto step = [&](int s, uint32_t(&f)[16]) {
        cp_async_wait<K::LOOK - 1>();
        fence_proxy_async();
        __syncthreads();
        copies(s + K::LOOK);
        const uint32_t st = sbase + (s % K::NS) * K::STAGE;
        fragments<C, DGRAD, BT>(f, smem + (s % K::NS) * K::STAGE, lut, c256, q, cols, w0, bs_log2, (first + s) * TK);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < TK / 16; kk++) wgmma_ra<C, BT>(acc, f + 4 * kk, desc_sw128(st + 32 * kk), s > 0 || kk > 0);
        wgmma_commit();
        wgmma_wait<1>();
    };
    for (int s = 0; s < steps; s += 2) {  // two steps per turn: the fragment sets are named registers
        step(s, fa);
        if (s + 1 < steps) step(s + 1, fb);
    }
    wgmma_wait<0>();
#pragma unroll
    for (int i = 0; i < BT / 2; i++) {
        pin(acc[i]);
        if (steps == 0) acc[i] = 0.f;
    }

    // Accumulator value 4j + h: fragment row lg + 8·(h/2) of this warp's 16, token 8j + 2t + h%2.
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, lg = lane >> 2, t = lane & 3;
    float* dst = partial ? partial + (int64_t)blockIdx.z * m * n_out : out;
    auto put = [&](float* o, float v) {
        if (!partial) {
            v = round_to(v, C);
            if (accumulate) v += *o;
        }
        *o = v;
    };
#pragma unroll
    for (int j = 0; j < BT / 8; j++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
            const int tok = t0 + 8 * j + 2 * t + e;
            if (tok >= m) continue;
            float* o = dst + (int64_t)tok * n_out;
            if (!DGRAD) {  // fragment rows are W rows n and n+8
                const int n = w0 + 64 * wg + 16 * warp + lg;
                if (n < n_out) put(o + n, acc[4 * j + e]);
                if (n + 8 < n_out) put(o + n + 8, acc[4 * j + 2 + e]);
            } else {  // fragment rows are W columns k (high nibble) and k+1 (low nibble)
                const int k = w0 + 2 * (32 * wg + 8 * warp + lg);
                if (k < n_out) {
                    put(o + k, acc[4 * j + e]);
                    put(o + k + 1, acc[4 * j + 2 + e]);
                }
            }
        }
    }
#else
    __trap();  // built for an arch without wgmma; the host never launches it there
#endif
}

#define GEMM_4BIT_KERNEL(name, C, DGRAD, BT) \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, BT == 256 ? 1 : 2) name(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, const uint16_t* a, float* out, float* partial, int m, int rows, int cols, int accumulate) { \
        grid_dependency_wait(); \
        gemm_4bit<C, DGRAD, BT>(Quant4Args{packed, absmax, absmax_q, absmax2, code256, offset, blocksize}, code16, a, out, partial, m, rows, cols, accumulate); \
    }
GEMM_4BIT_KERNEL(gemm_4bit_fwd_f16_t128, 1, false, 128)
GEMM_4BIT_KERNEL(gemm_4bit_fwd_bf16_t128, 2, false, 128)
GEMM_4BIT_KERNEL(gemm_4bit_dgrad_f16_t128, 1, true, 128)
GEMM_4BIT_KERNEL(gemm_4bit_dgrad_bf16_t128, 2, true, 128)
GEMM_4BIT_KERNEL(gemm_4bit_fwd_f16_t256, 1, false, 256)
GEMM_4BIT_KERNEL(gemm_4bit_fwd_bf16_t256, 2, false, 256)
GEMM_4BIT_KERNEL(gemm_4bit_dgrad_f16_t256, 1, true, 256)
GEMM_4BIT_KERNEL(gemm_4bit_dgrad_bf16_t256, 2, true, 256)

// Split-K epilogue: out (=|+=) round(Σ_z partial[z]) over n = m·n_out values, compute dtype C.
extern "C" __global__ void gemm_4bit_reduce(const float* partial, float* out, int64_t n, int splits, int compute, int accumulate) {
    grid_dependency_wait();
    FOR_EACH(i, n) {
        float s = 0.f;
        for (int z = 0; z < splits; z++) s += partial[z * n + i];
        s = round_to(s, compute);
        out[i] = accumulate ? out[i] + s : s;
    }
}
