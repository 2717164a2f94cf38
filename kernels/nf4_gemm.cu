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
// Where it wins (H200, docs/PERF.md): up to ~128 rows (prompts, batched decoding: 1.47× at 16 rows,
// 1.15× at 128 on 4096×4096), so the host takes it there (Fused4bit::Auto). At training shapes each
// 64-wide step takes ~2 µs against ~0.5 µs of tensor-core work (0.65× the second path at 2048 rows),
// whatever the tile; docs/PERF.md lists what was tried and what to try next.
//
// Shape of the work: a block of 256 threads (two warpgroups) owns a TM × TN output tile and walks the
// reduction TK = 64 values at a time. Operand tiles sit in shared memory as 16-bit values, 128 bytes
// per row with the 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r % 8)), the layout wgmma
// reads through its matrix descriptors; warpgroup g multiplies rows 64g..64g+63 of the A tile by all
// TN columns (wgmma m64nTNk16, four per step). TN = 128 keeps the accumulators at 64 registers, so two
// blocks share an SM and one hides the other's dequantize and barrier latency (ncu on TN = 256, one
// block per SM: 2 warps per scheduler, 5.8 cycles per issued instruction, tensor cores mostly idle).
// Split-K: when the output tiles are too few to fill the GPU (small M), blockIdx.z takes a share of
// the reduction steps and writes raw f32 partial sums; gemm_4bit_reduce adds them and rounds.
// Pipeline: the A tiles and the raw 4-bit code chunks of the next NS-1 steps are in flight as
// cp.async copies (no registers held); each step, while the tensor cores work on step s (wgmma is
// asynchronous), the threads dequantize the codes of step s+1 into the other of two B tiles and start
// the copies of step s+NS-1.
// Sizes: the reduction and W's columns are multiples of 64, the absmax block a multiple of 32 (one
// scale per 16-byte code chunk); M and the output columns are free (tiles are clipped).
// Built for sm_90a only (wgmma); the host picks this path only there (build.rs sets `wgmma_kernels`).
#include "quant4.cuh"

#define TM 128
#define TN 128
#define TK 64
#define NS 3  // stages of A tiles and code chunks
#define CHUNKS (TN / 128)  // 16-byte code chunks each thread dequantizes per step
#define ACC (TN / 2)       // accumulator registers per thread (m64nTN over a warpgroup)
#define GEMM_THREADS 256
#define A_TILE (TM * TK * 2)    // 16 KiB
#define B_TILE (TN * TK * 2)    // 16 KiB
#define CODE_TILE (TN * TK / 2) // 4 KiB
// Shared memory: NS A tiles, 2 B tiles, NS code tiles (92 KiB; the host adds 1 KiB for alignment).
#define OFF_B (NS * A_TILE)
#define OFF_CODES (OFF_B + 2 * B_TILE)
#define GEMM_SMEM (OFF_CODES + NS * CODE_TILE)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HAVE_WGMMA 1
#endif

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
// Byte offset of 16-byte chunk `c` of row `r` in a 128-byte-swizzled tile.
__device__ __forceinline__ uint32_t swz(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// Matrix descriptor of a K-major operand at shared address `addr` (1024-aligned tile + 32·k16 step):
// 128-byte swizzle (bits 62-63 = 1), 8-row groups 1024 bytes apart (stride offset), leading offset
// unused by this layout (1).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

// d (m64 × n128 over the warpgroup) += A · B, both read from shared memory through their
// descriptors, f32 accumulation; TY is the 16-bit type of compute dtype C.
static_assert(TN == 128, "wgmma_tile is the m64n128k16 instruction");
template <int C> __device__ __forceinline__ void wgmma_tile(float (&d)[ACC], uint64_t da, uint64_t db);
#define WGMMA_TILE(C, TY) \
    template <> __device__ __forceinline__ void wgmma_tile<C>(float (&d)[ACC], uint64_t da, uint64_t db) { \
        asm volatile( \
            "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n" \
            "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " \
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
            : "l"(da), "l"(db)); \
    }
WGMMA_TILE(1, "f16")
WGMMA_TILE(2, "bf16")

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Generic-proxy writes to shared memory (stores, completed cp.async) made visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accesses to an accumulator across the asynchronous wgmma.
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Four 8×8 16-bit matrices stored transposed: lane l gives the address of row l%8 of matrix l/8.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}

// Byte j of a code word as a dequantized pair (high nibble first). The 16-entry table sits in 16
// banks, so lookups never conflict (a 256-entry table of pairs halves the loads but conflicts).
template <int C> __device__ __forceinline__ uint32_t pair(const float* lut, uint32_t word, int j, float s) {
    return pack16<C>(lut[(word >> (8 * j + 4)) & 15] * s, lut[(word >> (8 * j)) & 15] * s);
}

// The CHUNKS code chunks (16 bytes = 32 values of one W row each) a thread dequantizes per step, as
// (W row, W column). Forward: the B tile is TN rows of W (n0..) × TK columns (k0..), K-major as W is;
// chunk id = CHUNKS·thread + h is tile row id/2, half id%2. Input grad: the reduction runs over W's
// rows, so the tile holds W transposed (TN tile rows = W columns n0.., each TK = 64 W rows k0..);
// warp w takes W rows k0+8w+g (g = lane/4) at columns n0+32(t+4h) (t = lane%4).
template <bool DGRAD> __device__ __forceinline__ void chunk_of(int h, int n0, int k0, int& row, int& col) {
    if (DGRAD) {
        const int lane = threadIdx.x & 31;
        row = k0 + 8 * (threadIdx.x >> 5) + (lane >> 2), col = n0 + 32 * ((lane & 3) + 4 * h);
    } else {
        const int id = CHUNKS * threadIdx.x + h;
        row = n0 + (id >> 1), col = k0 + 32 * (id & 1);
    }
}
// Where that chunk's 16 bytes sit in the code tile: rows of 32 bytes (forward) or TN/2 bytes (grad).
template <bool DGRAD> __device__ __forceinline__ int code_offset(int h) {
    if (DGRAD) {
        const int lane = threadIdx.x & 31;
        return (8 * (threadIdx.x >> 5) + (lane >> 2)) * (TN / 2) + 16 * ((lane & 3) + 4 * h);
    }
    return 16 * (CHUNKS * threadIdx.x + h);
}

// Step s's copies: the A tile (TM rows × TK 16-bit values, 4 chunks per thread, swizzled as they land)
// and the code tile (CHUNKS chunks per thread, in the layout code_offset reads).
template <bool DGRAD>
__device__ __forceinline__ void issue_copies(uint32_t a_tile, uint32_t code_tile, const uint16_t* a, const Quant4Args& q, int m, int rows, int cols, int red, int m0, int n0, int k0) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int id = i * GEMM_THREADS + threadIdx.x, r = id >> 3, c = id & 7;
        const bool ok = m0 + r < m;
        cp_async16(a_tile + swz(r, c), a + (int64_t)(ok ? m0 + r : 0) * red + k0 + 8 * c, ok);
    }
    // The code tile: 2·TN chunks, stored where code_offset reads them.
#pragma unroll
    for (int i = 0; i < CHUNKS; i++) {
        const int id = i * GEMM_THREADS + threadIdx.x;
        if (DGRAD) {
            const int r = id / (TN / 32), c = id % (TN / 32), row = k0 + r, col = n0 + 32 * c;
            const bool ok = col < cols;
            cp_async16(code_tile + r * (TN / 2) + 16 * c, q.packed + ((int64_t)row * cols + (ok ? col : 0)) / 2, ok);
        } else {
            const int row = n0 + (id >> 1);
            const bool ok = row < rows;
            cp_async16(code_tile + 16 * id, q.packed + ((int64_t)(ok ? row : 0) * cols + k0 + 32 * (id & 1)) / 2, ok);
        }
    }
}

// The absmax of this thread's chunks of the step at k0 (zero past the edge).
template <bool DGRAD> __device__ __forceinline__ void load_scales(float (&sc)[CHUNKS], const Quant4Args& q, int rows, int cols, int n0, int k0) {
#pragma unroll
    for (int h = 0; h < CHUNKS; h++) {
        int row, col;
        chunk_of<DGRAD>(h, n0, k0, row, col);
        sc[h] = row < rows && col < cols ? block_absmax(q.absmax, q.absmax_q, q.absmax2, q.code256, q.offset, ((int64_t)row * cols + col) / q.blocksize) : 0.f;
    }
}

// The code tile → the 16-bit B tile. Forward: each chunk is 4 swizzled 16-byte chunks of its tile row.
// Input grad: stmatrix.trans turns the 8 W rows × 2 columns a lane-quad holds into 16-byte tile rows
// of 8 W rows (chunk w of tile rows k); lane (g, t) feeds matrix j with code byte (j + t) % 16 (the
// chunk rotated by t bytes), so the 8 tile rows one matrix writes have 8 different row % 8 and land
// in 8 different bank groups.
template <int C, bool DGRAD>
__device__ __forceinline__ void dequant_tile(const uint8_t* codes, uint8_t* b_tile, const float* lut, const float (&sc)[CHUNKS]) {
#pragma unroll
    for (int h = 0; h < CHUNKS; h++) {
        const uint4 u = *reinterpret_cast<const uint4*>(codes + code_offset<DGRAD>(h));
        const uint32_t w[4] = {u.x, u.y, u.z, u.w};
        const float s = sc[h];
        if (DGRAD) {
            const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
            uint32_t rot[4];
#pragma unroll
            for (int i = 0; i < 4; i++) rot[i] = __funnelshift_r(w[i], w[(i + 1) & 3], 8 * t);
            const int i = lane >> 3, c = lane & 7, tc = c >> 1, e = c & 1;
            const uint32_t base = (uint32_t)__cvta_generic_to_shared(b_tile);
#pragma unroll
            for (int q = 0; q < 4; q++) {
                const int j = 4 * q + i, k = 32 * (tc + 4 * h) + 2 * ((j + tc) & 15) + e;
                stmatrix_x4_trans(base + swz(k, warp), pair<C>(lut, rot[q], 0, s), pair<C>(lut, rot[q], 1, s), pair<C>(lut, rot[q], 2, s), pair<C>(lut, rot[q], 3, s));
            }
        } else {
            const int id = CHUNKS * threadIdx.x + h, r = id >> 1, half = id & 1;
#pragma unroll
            for (int i = 0; i < 4; i++)
                *reinterpret_cast<uint4*>(b_tile + swz(r, 4 * half + i)) = make_uint4(pair<C>(lut, w[i], 0, s), pair<C>(lut, w[i], 1, s), pair<C>(lut, w[i], 2, s), pair<C>(lut, w[i], 3, s));
        }
    }
}
#endif

// DGRAD false: out (m, rows) = a (m, cols) · Wᵀ.  DGRAD true: out (m, cols) (+)= a (m, rows) · W.
// With `partial` (split-K), block z adds steps [z·steps/splits, (z+1)·steps/splits) and writes its raw
// f32 sums to partial[z] (m × n_out) instead.
template <int C, bool DGRAD>
__device__ void gemm_4bit(const Quant4Args q, const float* code16, const uint16_t* a, float* out, float* partial, int m, int rows, int cols, int accumulate) {
#ifdef HAVE_WGMMA
    __shared__ float lut[16];
    extern __shared__ uint8_t dyn[];
    const uint32_t dyn_addr = (uint32_t)__cvta_generic_to_shared(dyn);
    uint8_t* smem = dyn + (((dyn_addr + 1023) & ~1023u) - dyn_addr);  // tiles start 1024-aligned
    const uint32_t sbase = (uint32_t)__cvta_generic_to_shared(smem);
    const int n_out = DGRAD ? cols : rows, red = DGRAD ? rows : cols;
    const int n0 = blockIdx.x * TN, m0 = blockIdx.y * TM, all_steps = red / TK;
    const int first = (int)((int64_t)all_steps * blockIdx.z / gridDim.z), last = (int)((int64_t)all_steps * (blockIdx.z + 1) / gridDim.z);
    const int steps = last - first;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    load_lut(lut, code16);

    // Step s of this block is reduction step first + s; its stage is s % NS.
    auto copies = [&](int s) {
        if (s < steps) issue_copies<DGRAD>(sbase + (s % NS) * A_TILE, sbase + OFF_CODES + (s % NS) * CODE_TILE, a, q, m, rows, cols, red, m0, n0, (first + s) * TK);
        cp_async_commit();  // one group per step, empty past the end, so wait counts stay uniform
    };
    float sc[CHUNKS];
    auto dequant = [&](int s) {  // step s's codes (landed) → B tile s % 2; then the next step's scales
        dequant_tile<C, DGRAD>(smem + OFF_CODES + (s % NS) * CODE_TILE, smem + OFF_B + (s & 1) * B_TILE, lut, sc);
        if (s + 1 < steps) load_scales<DGRAD>(sc, q, rows, cols, n0, (first + s + 1) * TK);
    };
    float acc[ACC];
#pragma unroll
    for (int i = 0; i < ACC; i++) acc[i] = 0.f;
    for (int s = 0; s < NS - 1; s++) copies(s);
    if (steps > 0) load_scales<DGRAD>(sc, q, rows, cols, n0, first * TK);
    cp_async_wait<NS - 2>();
    __syncthreads();  // step 0 landed for every thread; lut written
    if (steps > 0) dequant(0);
    fence_proxy_async();
    __syncthreads();
    for (int s = 0; s < steps; s++) {
        const uint32_t at = sbase + (s % NS) * A_TILE + wg * (A_TILE / 2), bt = sbase + OFF_B + (s & 1) * B_TILE;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < TK / 16; kk++) wgmma_tile<C>(acc, desc_sw128(at + 32 * kk), desc_sw128(bt + 32 * kk));
        wgmma_commit();
        copies(s + NS - 1);  // into the stage step s-1 used, whose wgmma has completed
        if (s + 1 < steps) {
            cp_async_wait<NS - 2>();
            __syncthreads();  // step s+1 landed for every thread
            dequant(s + 1);   // into the B tile step s-1 used
        }
        wgmma_wait_all();
#pragma unroll
        for (int i = 0; i < ACC; i++) pin(acc[i]);
        fence_proxy_async();
        __syncthreads();
    }
    // Accumulator fragment of m64nTN: value 4j + h (h = 0..3) is row g + 8·(h/2) of this warp's 16,
    // column 8j + 2t + h%2.
    const int row_a = m0 + 64 * wg + 16 * warp + g;
    float* dst = partial ? partial + (int64_t)blockIdx.z * m * n_out : out;
#pragma unroll
    for (int j = 0; j < TN / 8; j++) {
        const int col = n0 + 8 * j + 2 * t;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = row_a + 8 * h;
            if (row >= m) continue;
            float* o = dst + (int64_t)row * n_out + col;
            float v0 = acc[4 * j + 2 * h], v1 = acc[4 * j + 2 * h + 1];
            if (!partial) {
                v0 = round_to(v0, C), v1 = round_to(v1, C);
                if (accumulate) {
                    if (col < n_out) v0 += o[0];
                    if (col + 1 < n_out) v1 += o[1];
                }
            }
            if (col < n_out) o[0] = v0;
            if (col + 1 < n_out) o[1] = v1;
        }
    }
#else
    __trap();  // built for an arch without wgmma; the host never launches it there
#endif
}

#define GEMM_4BIT_KERNEL(name, C, DGRAD) \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, 2) name(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, const uint16_t* a, float* out, float* partial, int m, int rows, int cols, int accumulate) { \
        gemm_4bit<C, DGRAD>(Quant4Args{packed, absmax, absmax_q, absmax2, code256, offset, blocksize}, code16, a, out, partial, m, rows, cols, accumulate); \
    }
GEMM_4BIT_KERNEL(gemm_4bit_fwd_f16, 1, false)
GEMM_4BIT_KERNEL(gemm_4bit_fwd_bf16, 2, false)
GEMM_4BIT_KERNEL(gemm_4bit_dgrad_f16, 1, true)
GEMM_4BIT_KERNEL(gemm_4bit_dgrad_bf16, 2, true)

// Split-K epilogue: out (=|+=) round(Σ_z partial[z]) over n = m·n_out values, compute dtype C.
extern "C" __global__ void gemm_4bit_reduce(const float* partial, float* out, int64_t n, int splits, int compute, int accumulate) {
    FOR_EACH(i, n) {
        float s = 0.f;
        for (int z = 0; z < splits; z++) s += partial[z * n + i];
        s = round_to(s, compute);
        out[i] = accumulate ? out[i] + s : s;
    }
}
