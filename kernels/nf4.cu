// 4-bit (NF4/FP4, bitsandbytes layout) dequantization to the matmul's compute dtype: element 2j in
// the high nibble, one absmax per block, optionally double-quantized (8-bit codes over the dynamic
// map, one f32 scale per 256 blocks, plus an offset). CPU reference: Quant4::dequantize (src/quant.rs).
#include "gemv_f32.cuh"
#include "quant4.cuh"

template <typename T> __device__ __forceinline__ T to_t(float x);
template <> __device__ __forceinline__ float to_t<float>(float x) { return x; }
template <> __device__ __forceinline__ __half to_t<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 to_t<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// out (n) = code16[nibble] * absmax[block]; each thread expands one byte (two values).
template <typename T>
__device__ void dequant(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, int64_t n, T* out) {
    FOR_EACH(i, (n + 1) / 2) {
        const uint8_t b = packed[i];
        const int64_t e = 2 * i;
        const float a0 = block_absmax(absmax, absmax_q, absmax2, code256, offset, e / blocksize);
        out[e] = to_t<T>(code16[b >> 4] * a0);
        if (e + 1 < n) {
            const float a1 = block_absmax(absmax, absmax_q, absmax2, code256, offset, (e + 1) / blocksize);
            out[e + 1] = to_t<T>(code16[b & 15] * a1);
        }
    }
}

// The expansion kernels' entry points: `impl` over dtype T (`bs`: the block size, or its log2 for
// dequant_seg).
#define DEQUANT_ENTRY(name, impl, T) \
    extern "C" __global__ void name(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int bs, int64_t n, T* out) { \
        grid_dependency_wait(); \
        impl<T>(packed, absmax, absmax_q, absmax2, code256, offset, code16, bs, n, out); \
    }
DEQUANT_ENTRY(dequant_4bit_f32, dequant, float)
DEQUANT_ENTRY(dequant_4bit_f16, dequant, __half)
DEQUANT_ENTRY(dequant_4bit_bf16, dequant, __nv_bfloat16)

extern "C" __global__ void f32_to_f16(const float* x, __half* out, int64_t n) {
    grid_dependency_wait();
    for_each4(
        n, aligned_to(x, 16) && aligned_to(out, 8),
        [&](int64_t q) { reinterpret_cast<uint2*>(out)[q] = pack_f16x4(reinterpret_cast<const float4*>(x)[q]); },
        [&](int64_t i) { out[i] = __float2half_rn(x[i]); });
}

// Small-M product for decoding: y (m, rows) = x (m, cols) · dequant(W)ᵀ with m ≤ 8, reading the 4-bit
// codes directly (0.5 byte per weight instead of expanding W first). x and the output are rounded to
// the compute dtype (0 f32, 1 f16, 2 bf16) and products accumulate in f32; this any-size kernel also
// rounds each weight as the dequantize + GEMM path does, the row-blocked ones below do not. CPU
// reference: Cpu::linear with a 4-bit weight. Two kernels: gemv_4bit_rows_* below for the usual sizes
// (cols a multiple of 32, blocksize a power of two ≥ 32), this one for any size: a warp per row.

#define GEMV_MAX_M 8

// Sums acc[r][j] over the warp and writes y[j][row0 + r] (rounded) for the rows and m that exist.
template <int R, int M>
__device__ __forceinline__ void store_rows(float (&acc)[R][M], float* y, int row0, int rows, int m, int compute) {
    const int lane = threadIdx.x % WARP;
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int j = 0; j < M; j++) {
            const float s = warp_sum(acc[r][j]);
            if (lane == 0 && j < m && row0 + r < rows) y[(int64_t)j * rows + row0 + r] = round_to(s, compute);
        }
}

extern "C" __global__ void gemv_4bit_f32(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, const float* x, float* y, int m, int rows, int cols, int compute) {
    grid_dependency_wait();
    __shared__ float lut[16];
    load_lut(lut, code16);
    __syncthreads();
    const int row = (blockIdx.x * blockDim.x + threadIdx.x) / WARP, lane = threadIdx.x % WARP;
    if (row >= rows) return;
    float acc[1][GEMV_MAX_M];
#pragma unroll
    for (int j = 0; j < GEMV_MAX_M; j++) acc[0][j] = 0.f;
    const int64_t base = (int64_t)row * cols;
    for (int c = lane; c < cols; c += WARP) {
        const int64_t e = base + c;
        const uint8_t b = packed[e >> 1];
        const int q = (e & 1) ? (b & 15) : (b >> 4);
        const float w = round_to(lut[q] * block_absmax(absmax, absmax_q, absmax2, code256, offset, e / blocksize), compute);
#pragma unroll
        for (int j = 0; j < GEMV_MAX_M; j++)
            if (j < m) acc[0][j] += round_to(x[(int64_t)j * cols + c], compute) * w;
    }
    store_rows<1, GEMV_MAX_M>(acc, y, row, rows, m, compute);
}

// ---- the decoding GEMV for the usual sizes (cols a multiple of 32, blocksize a power of two ≥ 32) -
// Floor: the codes (0.5 B/weight) and absmax stream from memory once, so the kernel must keep enough
// bytes in flight and spend few instructions and shared-memory accesses per weight (the 16-entry
// code table costs one shared load per weight already). Each warp owns GEMV_ROWS rows (4, or 2 for
// matrices of few rows, which would otherwise leave most of the GPU's warp slots empty); each lane
// takes 32 columns at a time (one 16-byte code load per row, one absmax for all 32), and the 32
// values of x it reads serve all GEMV_ROWS rows. The next column chunk's codes and absmax are loaded
// before the current one is used (two chunks in flight per lane), and code loads bypass L1. The
// first chunk is requested before x is staged (below) so that the two latencies overlap.
// x: with SX (one row of x) the block first stages x, rounded to the compute dtype, in shared memory
// with 16 bytes of padding per 32-column chunk (element c at c + 4·(c/32): chunks 144 bytes apart),
// so that each lane reads its own chunk's x as eight 16-byte loads and the eight lanes that share one
// such load's wavefront hit eight different groups of four banks (the padding used to be one float
// per 32, for 32 scalar loads per chunk; ncu, session 38: the shared-memory waits were the kernel's
// first stall, and the 16-byte loads gave +3.2% decoding); in a 16-bit compute dtype as scaled f16
// instead, four 16-byte loads per chunk (stage_x_half); without SX (up to 8 rows, rarer) x is
// read through L1. Template parameters: compute dtype C (0 f32, 1 f16, 2 bf16) and rows of x M.
#define GEMV_THREADS 256

// The 16-entry code table of the row-blocked GEMVs: aligned to 256 bytes in shared memory, so that
// an entry's shared address is the table's upper three address bytes with the entry's byte offset
// (nibble × 4) as the low byte, and one byte permute builds it from a word of offsets (SASS, session
// 39: with a base pointer, each lookup was a byte permute, an integer add and the load).
struct CodeTable {
    uint32_t base;  // shared address of entry 0; low byte 0
    __device__ __forceinline__ float at(uint32_t offsets4, int byte) const {
        float v;
        asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(__byte_perm(offsets4, base, 0x7650 + byte)));
        return v;
    }
};

__device__ __forceinline__ __half2 u32_as_half2(uint32_t v) { return *reinterpret_cast<__half2*>(&v); }

// One entry of the one-row GEMVs' f16 pair table (gemv_rows) at a shared address.
__device__ __forceinline__ __half2 half_pair(uint32_t addr) {
    uint32_t v;
    asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr));
    return u32_as_half2(v);
}

// The one-row 16-bit GEMVs' x (gemv_rows HALF): 32-column chunk k at byte 80k as its 32 values times
// 2^s_k in f16, then 2^-s_k as an f32 at byte 64 (16 bytes apart from the next chunk's: the eight
// lanes of a 16-byte load's wavefront read eight different groups of four banks). s_k puts the
// chunk's largest magnitude in [2^11, 2^12), so that a sum of eight products with codes in [-1, 1]
// stays below 2^15 (f16's largest finite value is 65504) whatever x's range (bf16's is f32's), and
// small chunks keep f16's precision; the scaling is exact, and a value rounded to f16 or bf16 is exact
// in f16 unless it is more than 2^25 below its chunk's largest. The 8 threads that stage one chunk
// (4 values each) are 8 consecutive lanes.
__device__ __forceinline__ void stage_x_half(float* xsh, int c, float4 r) {
    float m = fmaxf(fmaxf(fabsf(r.x), fabsf(r.y)), fmaxf(fabsf(r.z), fabsf(r.w)));
    const unsigned group = 0xffu << (threadIdx.x & 24);
    m = fmaxf(m, __shfl_xor_sync(group, m, 1));
    m = fmaxf(m, __shfl_xor_sync(group, m, 2));
    m = fmaxf(m, __shfl_xor_sync(group, m, 4));
    const int e = (int)((__float_as_uint(m) >> 23) & 0xff) - 127;  // m in [2^e, 2^(e+1)) (0: e = -127)
    // Both 2^k and 2^-k normal: k in [-126, 126], which covers every finite m (e <= 127: k >= -116).
    const int k = max(-126, min(126, 11 - e));
    const float scale = __uint_as_float((uint32_t)(127 + k) << 23), inv = __uint_as_float((uint32_t)(127 - k) << 23);
    char* chunk = reinterpret_cast<char*>(xsh) + 80 * (c >> 5);
    *reinterpret_cast<uint2*>(chunk + 2 * (c & 31)) = pack_f16x4(make_float4(r.x * scale, r.y * scale, r.z * scale, r.w * scale));
    if ((c & 31) == 0) *reinterpret_cast<float*>(chunk + 64) = inv;
}

// Σ over 32 columns of dequant(codes u, absmax a) · x, with x already rounded to the compute dtype,
// as a · Σ code · x: the 32 values share one absmax, so it multiplies once per chunk, and the weights
// are not rounded to the compute dtype (their products with x are exact in f32 up to the sum's
// rounding; the dequantize + GEMM path rounds each weight first). The instruction count per weight
// bounds this kernel (ncu, 2026-11-28: issue-bound at ~6 per weight with the per-weight multiply and
// rounding), now ~3: one byte permute for the entry's address, one shared load, one FMA.
__device__ __forceinline__ float dot32(const uint4 u, float a, CodeTable lut, const float (&xs)[32]) {
    const uint32_t w4[4] = {u.x, u.y, u.z, u.w};
    float s0 = 0.f, s1 = 0.f;  // two chains: shorter dependency on the adds
#pragma unroll
    for (int q4 = 0; q4 < 4; q4++) {
        // Each byte's high and low nibble × 4 (the table's byte offsets), in place.
        const uint32_t hi4 = (w4[q4] >> 2) & 0x3c3c3c3cu, lo4 = (w4[q4] << 2) & 0x3c3c3c3cu;
#pragma unroll
        for (int byte = 0; byte < 4; byte++) {
            s0 = fmaf(lut.at(hi4, byte), xs[q4 * 8 + 2 * byte], s0);
            s1 = fmaf(lut.at(lo4, byte), xs[q4 * 8 + 2 * byte + 1], s1);
        }
    }
    return (s0 + s1) * a;
}

// A 4-bit weight's codes and absmax (plain, or double-quantized codes + per-256 scales + offset; the
// unused side null), passed by value: the up projection of the fused SwiGLU GEMV, each weight of the
// several-weight one.
struct Codes4 {
    const uint8_t* packed;
    const float* absmax;
    const uint8_t* absmax_q;
    const float* absmax2;
    float offset;
};

// PAIR (the fused SwiGLU GEMV, M = 1): `rows` is the number of output pairs; a warp's first
// GEMV_ROWS/2 rows are rows of the first weight (gate), the others the same rows of `up`, and the warp
// writes y[i] = silu(gate_i) · up_i with both rounded to the compute dtype first, as the two GEMVs'
// outputs and swiglu_f32 would give them (each row's sum is the same computation either way).
// KSPLIT = 2 (one row of x, no PAIR): the block's warps in two halves over the same rows, half h
// taking the 32-chunk strides h, h + 2, …, so each row's chunks are split between two warps; half 1
// hands its lanes' sums to half 0 through shared memory, which adds them lane by lane before the warp
// sum (`warp` then numbers row groups: GEMV_THREADS / WARP / 2 per block).
template <int C, int M, bool SX, int GEMV_ROWS, bool PAIR = false, int KSPLIT = 1>
__device__ void gemv_rows(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, const float* x, float* y, int m, int rows, int cols, int warp, Codes4 up = {}) {
    __shared__ __align__(256) float lut[16];
    const CodeTable table{smem_addr(lut)};
    // HALF (a one-row GEMV in a 16-bit compute dtype): each code byte's two values as one f16 pair
    // (high nibble's in the low half), in 32 copies side by side (256 entries × 32 copies × 4 bytes =
    // 32 KB) so that lane l's copy l puts a warp's loads on the 32 banks once whatever the bytes: one
    // shared-memory wavefront per 64 weights where the f32 table takes two (ncu, session 39: the
    // shared-memory queue is the GEMVs' second stall, and halving the load instructions alone with an
    // f32 pair table did not pay; this table gave +8.5% decoding, session 40). The codes rounded to
    // f16 (2⁻¹² relative) are what bitsandbytes' GEMV multiplies by too; the f32 compute dtype keeps
    // the exact f32 table.
    constexpr bool HALF = SX && M == 1 && C != 0;
    __shared__ __align__(16) uint32_t half_pairs[HALF ? 256 * WARP : 1];
    const uint32_t pair_lane = smem_addr(half_pairs) + (threadIdx.x % WARP) * 4;
    extern __shared__ __align__(16) float xsh[];  // SX: (cols + cols/8) floats: 36 per 32-column chunk (HALF: 80 bytes, stage_x_half)
    const int lane = threadIdx.x % WARP;
    constexpr int OWN = PAIR ? GEMV_ROWS / 2 : GEMV_ROWS;  // output rows (or pairs) per warp
    const int row0 = warp * OWN;
    static_assert(KSPLIT == 1 || (KSPLIT == 2 && M == 1 && SX && !PAIR), "the column split takes one staged row of x");
    const int half = KSPLIT == 1 ? 0 : (int)(threadIdx.x / WARP) / (GEMV_THREADS / WARP / KSPLIT);
    const int first = lane + half * WARP;  // this lane's first chunk
    const int chunks = cols / 32;  // 16-byte code chunks per row
    // Chunk c's absmax block is c >> shift: blocksize is a power of two (the launcher checks), and a
    // runtime division per chunk and row cost ~12 instructions next to the ~100 of its dot product.
    const int shift = __ffs(blocksize / 32) - 1;
    // Row r's weight (a compile-time choice in the unrolled loops below).
    auto codes_of = [&](int r) { return PAIR && r >= OWN ? up.packed : packed; };
    auto absmax_of = [&](int r, uint32_t block) {
        return PAIR && r >= OWN ? block_absmax_u32(up.absmax, up.absmax_q, up.absmax2, code256, up.offset, block)
                                : block_absmax_u32(absmax, absmax_q, absmax2, code256, offset, block);
    };
    // A row past the end re-reads the last row (its sums are never stored). Chunk indices are 32-bit
    // (the launcher checks rows · cols / 32 < 2³¹): 64-bit ones cost ~1 address instruction per weight.
    uint32_t chunk0[GEMV_ROWS];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++) chunk0[r] = (uint32_t)min(row0 + r % OWN, rows - 1) * (uint32_t)chunks;
    // The first codes are requested before x is staged, so both latencies overlap.
    uint4 cur[GEMV_ROWS], nxt[GEMV_ROWS];
    float a_cur[GEMV_ROWS], a_nxt[GEMV_ROWS];  // each chunk's absmax, fetched with its codes
    if (row0 < rows && first < chunks)
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            cur[r] = load_stream(codes_of(r) + (uint64_t)(chunk0[r] + first) * 16);
            a_cur[r] = absmax_of(r, (chunk0[r] + first) >> shift);
        }
    load_lut(lut, code16);
    if constexpr (HALF) {
        // Four copies per 16-byte store, 8 stores per thread (GEMV_THREADS threads, as every launcher
        // takes): store j of thread t is entry b = t/8 + 32j, whose low nibble t/8 % 16 is the same
        // for all 8 and high nibble t/128 + 2j; the nine loads go out together.
        const float lo = code16[(threadIdx.x / 8) % 16];
        float hi[8];
#pragma unroll
        for (int j = 0; j < 8; j++) hi[j] = code16[threadIdx.x / 128 + 2 * j];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const uint32_t v = pack16<1>(hi[j], lo);
            reinterpret_cast<uint4*>(half_pairs)[threadIdx.x + j * GEMV_THREADS] = make_uint4(v, v, v, v);
        }
    }
    // Everything above reads only the weight and the code tables; x is the previous kernel's output.
    grid_dependency_wait();
    allow_dependent_launch();
    if (SX) {
        // Four independent 16-byte loads per thread in flight, then the rounded stores.
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (int i0 = threadIdx.x; i0 < cols / 4; i0 += 4 * blockDim.x) {
            float4 v[4];
#pragma unroll
            for (int u = 0; u < 4; u++)
                if (i0 + u * blockDim.x < cols / 4) v[u] = __ldg(x4 + i0 + u * blockDim.x);
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int c = 4 * (i0 + u * blockDim.x);
                if (c < cols) {
                    const float4 r = make_float4(round_to(v[u].x, C), round_to(v[u].y, C), round_to(v[u].z, C), round_to(v[u].w, C));
                    if constexpr (HALF)
                        stage_x_half(xsh, c, r);  // the 8 lanes of a chunk take this branch together
                    else
                        *reinterpret_cast<float4*>(xsh + c + 4 * (c >> 5)) = r;  // c..c+3 share one chunk
                }
            }
        }
    }
    __syncthreads();
    // A split block's warps past the last row stay for its barrier below (their loop reads the last
    // row again, their sums are never stored).
    if (KSPLIT == 1 && row0 >= rows) return;
    float acc[GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; r++)
#pragma unroll
        for (int j = 0; j < M; j++) acc[r][j] = 0.f;
    for (int c = first; c < chunks; c += KSPLIT * WARP) {
        if (c + KSPLIT * WARP < chunks)
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                nxt[r] = load_stream(codes_of(r) + (uint64_t)(chunk0[r] + c + KSPLIT * WARP) * 16);
                a_nxt[r] = absmax_of(r, (chunk0[r] + c + KSPLIT * WARP) >> shift);
            }
        if constexpr (HALF) {
            // Word by word over the chunk: a word's 8 x values (scaled f16, one 16-byte load) serve
            // every row; per row, each code byte's pair of values times its pair of x in one f16x2
            // multiply-add, eight bytes (two words) summed in f16 (below 2^15: stage_x_half), then widened into f32
            // sums: 2.5 instructions per weight where f32 products took 3.5 (byte permute, address,
            // load, and per weight a widening and an FMA). Products rounded to f16 are what
            // bitsandbytes' GEMV forms too (its products are in the compute dtype).
            const char* xc = reinterpret_cast<const char*>(xsh) + 80 * c;
            const float inv = *reinterpret_cast<const float*>(xc + 64);
            float s0[GEMV_ROWS], s1[GEMV_ROWS];
            __half2 h[GEMV_ROWS];  // a row's f16 sums over two words
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) s0[r] = 0.f, s1[r] = 0.f;
#pragma unroll
            for (int q4 = 0; q4 < 4; q4++) {
                const uint4 xq = *reinterpret_cast<const uint4*>(xc + 16 * q4);
                const __half2 xh[4] = {u32_as_half2(xq.x), u32_as_half2(xq.y), u32_as_half2(xq.z), u32_as_half2(xq.w)};
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++) {
                    const uint32_t w = q4 == 0 ? cur[r].x : q4 == 1 ? cur[r].y : q4 == 2 ? cur[r].z : cur[r].w;
                    auto pair = [&](int byte) { return half_pair(pair_lane + __byte_perm(w, 0, 0x4440 + byte) * (WARP * 4)); };
                    __half2 hr = q4 % 2 == 0 ? __hmul2(pair(0), xh[0]) : __hfma2(pair(0), xh[0], h[r]);
                    hr = __hfma2(pair(1), xh[1], hr);
                    hr = __hfma2(pair(2), xh[2], hr);
                    hr = __hfma2(pair(3), xh[3], hr);
                    if (q4 % 2 == 1) {
                        const float2 f = __half22float2(hr);
                        s0[r] += f.x, s1[r] += f.y;
                    } else {
                        h[r] = hr;
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) acc[r][0] += (s0[r] + s1[r]) * (a_cur[r] * inv);
        } else if (SX) {
            // Word by word over the chunk (8 weights of every row per word), so only the word's 8 x
            // values are live, read as two 16-byte loads; each row's sums run in dot32's order.
            const float4* xc = reinterpret_cast<const float4*>(xsh + 36 * c);
            float s0[GEMV_ROWS], s1[GEMV_ROWS];
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) s0[r] = 0.f, s1[r] = 0.f;
#pragma unroll
            for (int q4 = 0; q4 < 4; q4++) {
                const float4 xa = xc[2 * q4], xb = xc[2 * q4 + 1];
                const float x8[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++) {
                    const uint32_t w = q4 == 0 ? cur[r].x : q4 == 1 ? cur[r].y : q4 == 2 ? cur[r].z : cur[r].w;
                    const uint32_t hi4 = (w >> 2) & 0x3c3c3c3cu, lo4 = (w << 2) & 0x3c3c3c3cu;
#pragma unroll
                    for (int byte = 0; byte < 4; byte++) {
                        s0[r] = fmaf(table.at(hi4, byte), x8[2 * byte], s0[r]);
                        s1[r] = fmaf(table.at(lo4, byte), x8[2 * byte + 1], s1[r]);
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) acc[r][0] += (s0[r] + s1[r]) * a_cur[r];
        } else {
            // Up to 8 rows of x, each chunk's 32 values read through L1 and rounded here.
#pragma unroll
            for (int j = 0; j < M; j++) {
                if (j >= m) break;
                float xs[32];
                const float4* xp = reinterpret_cast<const float4*>(x + (int64_t)j * cols + c * 32);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const float4 v = __ldg(xp + i);
                    xs[4 * i] = round_to(v.x, C), xs[4 * i + 1] = round_to(v.y, C);
                    xs[4 * i + 2] = round_to(v.z, C), xs[4 * i + 3] = round_to(v.w, C);
                }
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++) acc[r][j] += dot32(cur[r], a_cur[r], table, xs);
            }
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) cur[r] = nxt[r], a_cur[r] = a_nxt[r];
    }
    if constexpr (PAIR) {
#pragma unroll
        for (int r = 0; r < OWN; r++) {
            const float g = round_to(warp_sum(acc[r][0]), C), u = round_to(warp_sum(acc[r + OWN][0]), C);
            if (lane == 0 && row0 + r < rows) y[row0 + r] = swiglu1(g, u);
        }
    } else {
        if constexpr (KSPLIT == 2) {
            __shared__ float part[GEMV_ROWS][GEMV_THREADS / 2];  // half 1's lane sums, row-major: no bank conflicts
            const int slot = threadIdx.x % (GEMV_THREADS / 2);
            if (half == 1)
#pragma unroll
                for (int r = 0; r < GEMV_ROWS; r++) part[r][slot] = acc[r][0];
            __syncthreads();
            if (half == 1) return;
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) acc[r][0] += part[r][slot];
        }
        store_rows<GEMV_ROWS, M>(acc, y, row0, rows, m, C);
    }
}

// MIN_BLOCKS: the one-row kernels fit in 80 registers without spilling, so three blocks (24 warps)
// share an SM and an 11008-row matrix takes one wave instead of 1.3 (measured by ncu at 127 registers).
// The `_two_per_sm` kernels take up to 128 registers (ptxas: 105, the same instructions scheduled
// with more loads ahead) for launches of at most two blocks per SM, where the third block's slot
// stays empty anyway (a 4096-row matrix at two rows per warp: 256 blocks on 132 SMs): +1.1% decoding
// on the H200 in three of three alternating rounds (session 33), the kernel alone within ±1%.
#define GEMV_ROWS_KERNEL(name, C, M, SX, R, MIN_BLOCKS) \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, MIN_BLOCKS) name(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, const float* x, float* y, int m, int rows, int cols) { \
        const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / WARP; \
        gemv_rows<C, M, SX, R>(packed, absmax, absmax_q, absmax2, code256, offset, code16, blocksize, x, y, m, rows, cols, warp); \
    }
GEMV_ROWS_KERNEL(gemv_4bit_rows_f32_m1, 0, 1, true, 4, 3)
GEMV_ROWS_KERNEL(gemv_4bit_rows_f16_m1, 1, 1, true, 4, 3)
GEMV_ROWS_KERNEL(gemv_4bit_rows_bf16_m1, 2, 1, true, 4, 3)
GEMV_ROWS_KERNEL(gemv_4bit_rows_f32_m1_r2, 0, 1, true, 2, 3)
GEMV_ROWS_KERNEL(gemv_4bit_rows_f16_m1_r2, 1, 1, true, 2, 3)
GEMV_ROWS_KERNEL(gemv_4bit_rows_bf16_m1_r2, 2, 1, true, 2, 3)
GEMV_ROWS_KERNEL(gemv_4bit_rows_f32_m1_r2_two_per_sm, 0, 1, true, 2, 2)
GEMV_ROWS_KERNEL(gemv_4bit_rows_f16_m1_r2_two_per_sm, 1, 1, true, 2, 2)
GEMV_ROWS_KERNEL(gemv_4bit_rows_bf16_m1_r2_two_per_sm, 2, 1, true, 2, 2)
GEMV_ROWS_KERNEL(gemv_4bit_rows_f32_m8, 0, 8, false, 4, 1)
GEMV_ROWS_KERNEL(gemv_4bit_rows_f16_m8, 1, 8, false, 4, 1)
GEMV_ROWS_KERNEL(gemv_4bit_rows_bf16_m8, 2, 8, false, 4, 1)

// Matrices of few rows (o and down of a 7B model: 4,096) at four rows per warp and each row's columns
// split between two warps (KSPLIT): 16 rows per block, 256 blocks of 8 warps for 4,096 rows, two per
// SM with up to 128 registers. Against the `_two_per_sm` kernels (two rows per warp, whole rows):
// the same blocks and warps, twice the code bytes in flight per warp, half the chunks per lane, and x
// read once per four rows instead of two (ncu census, session 40: those kernels read at 1.65 TB/s
// where the four-row ones reach 2.3–2.4).
#define GEMV_SPLIT_KERNEL(name, C) \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 2) name(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, const float* x, float* y, int m, int rows, int cols) { \
        const int warp = blockIdx.x * (GEMV_THREADS / WARP / 2) + (int)(threadIdx.x / WARP) % (GEMV_THREADS / WARP / 2); \
        gemv_rows<C, 1, true, 4, false, 2>(packed, absmax, absmax_q, absmax2, code256, offset, code16, blocksize, x, y, m, rows, cols, warp); \
    }
GEMV_SPLIT_KERNEL(gemv_4bit_rows_f32_m1_split, 0)
GEMV_SPLIT_KERNEL(gemv_4bit_rows_f16_m1_split, 1)
GEMV_SPLIT_KERNEL(gemv_4bit_rows_bf16_m1_split, 2)

// Decoding's MLP without LoRA on gate/up: y = silu(x·Gᵀ) · (x·Uᵀ) for one row of x in one launch
// (Backend::linear_swiglu) instead of two GEMVs and swiglu_f32; two pairs of rows per warp.
#define GEMV_SWIGLU_KERNEL(name, C) \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 3) name(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, const float* x, float* y, int m, int rows, int cols, const Codes4 up) { \
        const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / WARP; \
        gemv_rows<C, 1, true, 4, true>(packed, absmax, absmax_q, absmax2, code256, offset, code16, blocksize, x, y, m, rows, cols, warp, up); \
    }
GEMV_SWIGLU_KERNEL(gemv_4bit_swiglu_f32, 0)
GEMV_SWIGLU_KERNEL(gemv_4bit_swiglu_f16, 1)
GEMV_SWIGLU_KERNEL(gemv_4bit_swiglu_bf16, 2)

// Several weights that read the same one row of x (decoding's q/k/v: Backend::linear_many) in one
// launch: up to GEMV_MAX_TARGETS, each with its own codes, absmax and output, the same cols,
// blocksize, quant type and compute dtype. Each weight owns a run of whole blocks (`first_block`), so
// a block works on one weight, and the products are those of one gemv_4bit_rows_*_m1 launch per
// weight. Why: a 4096-row decoding GEMV is a third launch latency and tail (36% of copy bandwidth
// against 50% for 11008 rows, session 5); three in one launch fill the GPU like one large one. The
// launcher takes it only while all blocks fit one wave (Cuda::gemv_many_fits).
#define GEMV_MAX_TARGETS 3
struct GemvTarget {
    Codes4 w;
    float* y;  // (1, rows)
    int rows;
    int first_block;
};
struct GemvTargets {
    GemvTarget t[GEMV_MAX_TARGETS];
    int count;
};

// This block's share of a several-weight launch: rows of the weight that owns it.
template <int C, int R>
__device__ __forceinline__ void gemv_many_block(const GemvTargets& ts, const float* code256, const float* code16, int blocksize, const float* x, int cols) {
    const GemvTarget t = block_target(ts.t, ts.count);
    const int warp = (((int)blockIdx.x - t.first_block) * blockDim.x + threadIdx.x) / WARP;
    gemv_rows<C, 1, true, R>(t.w.packed, t.w.absmax, t.w.absmax_q, t.w.absmax2, code256, t.w.offset, code16, blocksize, x, t.y, 1, t.rows, cols, warp);
}
#define GEMV_MANY_KERNEL(name, C, R) \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 3) name(const GemvTargets ts, const float* code256, const float* code16, int blocksize, const float* x, int cols) { \
        gemv_many_block<C, R>(ts, code256, code16, blocksize, x, cols); \
    }
GEMV_MANY_KERNEL(gemv_4bit_many_f32, 0, 4)
GEMV_MANY_KERNEL(gemv_4bit_many_f16, 1, 4)
GEMV_MANY_KERNEL(gemv_4bit_many_bf16, 2, 4)
GEMV_MANY_KERNEL(gemv_4bit_many_f32_r2, 0, 2)
GEMV_MANY_KERNEL(gemv_4bit_many_f16_r2, 1, 2)
GEMV_MANY_KERNEL(gemv_4bit_many_bf16_r2, 2, 2)

// Decoding's q/k/v with LoRA on some of them: the launch above plus, in blocks after the weights' own
// (from downs.t[0].first_block on), the branches' A products u_i = x·A_iᵀ in f32, a block per row of
// every A_i, as lora.cu's gemv_f32_long_rows_many computes them (same values): they read the same x,
// and riding in this launch saves theirs (~5 µs a layer). Cuda::linear_many_lora launches it, then the
// B products.
#define GEMV_MANY_LORA_KERNEL(name, C, R) \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS, 3) name(const GemvTargets ts, const float* code256, const float* code16, int blocksize, const float* x, int cols, const GemvF32Targets downs) { \
        if ((int)blockIdx.x >= downs.t[0].first_block) { \
            grid_dependency_wait(); \
            const GemvF32Target d = block_target(downs.t, downs.count); \
            gemv_f32_long_row(d.w, d.x, d.y, 1, d.rows, cols, 1.f, 0, (int)blockIdx.x - d.first_block); \
            return; \
        } \
        gemv_many_block<C, R>(ts, code256, code16, blocksize, x, cols); \
    }
GEMV_MANY_LORA_KERNEL(gemv_4bit_many_lora_f32, 0, 4)
GEMV_MANY_LORA_KERNEL(gemv_4bit_many_lora_f16, 1, 4)
GEMV_MANY_LORA_KERNEL(gemv_4bit_many_lora_bf16, 2, 4)
GEMV_MANY_LORA_KERNEL(gemv_4bit_many_lora_f32_r2, 0, 2)
GEMV_MANY_LORA_KERNEL(gemv_4bit_many_lora_f16_r2, 1, 2)
GEMV_MANY_LORA_KERNEL(gemv_4bit_many_lora_bf16_r2, 2, 2)

// ---- vectorized dequantize (n and blocksize multiples of 32) ------------------------------------
// Each thread takes 16 bytes of codes = 32 values, which lie in one absmax block, so one absmax
// lookup and one 16-byte load serve 32 outputs. Same values as the scalar kernels above.
template <typename T> struct Vec8;
template <> struct Vec8<__nv_bfloat16> {
    static __device__ __forceinline__ void store(__nv_bfloat16* p, const float* v) {
        uint4 u;
        __nv_bfloat162 h[4] = {__floats2bfloat162_rn(v[0], v[1]), __floats2bfloat162_rn(v[2], v[3]), __floats2bfloat162_rn(v[4], v[5]), __floats2bfloat162_rn(v[6], v[7])};
        u = *reinterpret_cast<uint4*>(h);
        *reinterpret_cast<uint4*>(p) = u;
    }
};
template <> struct Vec8<__half> {
    static __device__ __forceinline__ void store(__half* p, const float* v) {
        __half2 h[4] = {__floats2half2_rn(v[0], v[1]), __floats2half2_rn(v[2], v[3]), __floats2half2_rn(v[4], v[5]), __floats2half2_rn(v[6], v[7])};
        *reinterpret_cast<uint4*>(p) = *reinterpret_cast<uint4*>(h);
    }
};
template <> struct Vec8<float> {
    static __device__ __forceinline__ void store(float* p, const float* v) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
};

// The 8 values of one 32-bit word of codes (bytes in memory order, each high nibble first), scaled by
// their block's absmax a: code · a in f32, as Quant4::dequantize computes them.
__device__ __forceinline__ void expand_word(uint32_t w, float a, const float* lut, float v[8]) {
#pragma unroll
    for (int byte = 0; byte < 4; byte++) {
        const uint32_t b = (w >> (8 * byte)) & 0xffu;
        v[2 * byte] = lut[b >> 4] * a;
        v[2 * byte + 1] = lut[b & 15] * a;
    }
}

template <typename T>
__device__ void dequant_vec(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, int64_t n, T* out) {
    __shared__ float lut[16];
    load_lut(lut, code16);
    __syncthreads();
    FOR_EACH(c, n / 32) {
        const uint4 u = reinterpret_cast<const uint4*>(packed)[c];
        const float a = block_absmax(absmax, absmax_q, absmax2, code256, offset, c * 32 / blocksize);
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float v[8];
            expand_word(w[j], a, lut, v);
            Vec8<T>::store(out + c * 32 + j * 8, v);
        }
    }
}
// out (n) as dequant_vec, a warp per segment of 1,024 values (512 bytes of codes): lane l loads code
// words j·32 + l (j = 0..3, four coalesced 128-byte loads issued before any use) and stores values
// [j·256 + 8l, +8), so each store instruction of a warp writes 512 contiguous bytes in a 16-bit dtype.
// dequant_vec's thread-per-32-values layout put a warp's 16-byte stores 64 bytes apart (every sector
// written in two halves by two instructions) and divided a 64-bit index by the block size per chunk.
// Needs n % 1024 == 0 and a power-of-two blocksize ≥ 8 (a lane's 8 values share one absmax).
// STRIDED: into a matrix whose rows are `ld` values apart (ld ≥ cols, cols a multiple of 1,024, so
// each segment lies in one row; dequant_4bit_seg_ld_*): the frozen part of a GEMM operand [W | B]
// (Cuda::qkv_attn_acts's concatenated path), the same values.
template <typename T, bool STRIDED = false>
__device__ void dequant_seg(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int log2_blocksize, int64_t n, T* out, int cols = 0, int64_t ld = 0) {
    __shared__ float lut[16];
    load_lut(lut, code16);
    __syncthreads();
    const int lane = threadIdx.x % WARP;
    const uint32_t* words = reinterpret_cast<const uint32_t*>(packed);
    const int64_t warps = (int64_t)gridDim.x * blockDim.x / WARP;
    for (int64_t seg = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) / WARP; seg < n / 1024; seg += warps) {
        // Where this segment's row moves in a strided output.
        const int64_t shift = STRIDED ? seg * 1024 / cols * (ld - cols) : 0;
        // The codes and all four absmax values requested before any store: the stores may alias the
        // absmax for all the compiler knows, so an absmax loaded inside the loop below waited for the
        // previous chunk's store (SASS: four absmax loads, each issued after a store, one memory round
        // trip apiece per segment).
        uint32_t w[4];
        float a[4];
#pragma unroll
        for (int j = 0; j < 4; j++) w[j] = __ldcs(words + seg * 128 + j * 32 + lane);  // read once: streaming
#pragma unroll
        for (int j = 0; j < 4; j++) a[j] = block_absmax(absmax, absmax_q, absmax2, code256, offset, (seg * 1024 + j * 256 + lane * 8) >> log2_blocksize);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int64_t e = seg * 1024 + j * 256 + lane * 8;  // this lane's first value
            float v[8];
            expand_word(w[j], a[j], lut, v);
            Vec8<T>::store(out + e + shift, v);
        }
    }
}
#define DEQUANT_LD_ENTRY(name, T) \
    extern "C" __global__ void name(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int bs, int64_t n, T* out, int cols, int64_t ld) { \
        grid_dependency_wait(); \
        dequant_seg<T, true>(packed, absmax, absmax_q, absmax2, code256, offset, code16, bs, n, out, cols, ld); \
    }
DEQUANT_LD_ENTRY(dequant_4bit_seg_ld_f16, __half)
DEQUANT_LD_ENTRY(dequant_4bit_seg_ld_bf16, __nv_bfloat16)
DEQUANT_ENTRY(dequant_4bit_seg_f32, dequant_seg, float)
DEQUANT_ENTRY(dequant_4bit_seg_f16, dequant_seg, __half)
DEQUANT_ENTRY(dequant_4bit_seg_bf16, dequant_seg, __nv_bfloat16)
DEQUANT_ENTRY(dequant_4bit_vec_f32, dequant_vec, float)
DEQUANT_ENTRY(dequant_4bit_vec_f16, dequant_vec, __half)
DEQUANT_ENTRY(dequant_4bit_vec_bf16, dequant_vec, __nv_bfloat16)
