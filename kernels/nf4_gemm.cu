// Fused 4-bit dequant-matmul on the Hopper tensor cores (wgmma), for the training shapes (M > 8):
//   forward      out (M, N) = round16(x (M, K) · dequant(W)ᵀ)           W (N, K) in 4 bits
//   input grad   dx (M, K) (+)= round16(dy (M, N) · dequant(W))
// The same numbers as the second path it replaces (dequantize W to the 16-bit compute dtype, convert
// the f32 activations to it, cuBLAS with f32 accumulation, output rounded to the compute dtype and
// widened): x and W are rounded to 16 bits exactly as there, products are summed in f32, and the sum
// is rounded once. CPU reference: Cpu::linear / Cpu::linear_backward_input with a 4-bit weight.
//
// Why fused: the second path writes and rereads a 16-bit copy of W, a 16-bit copy of the activations
// and a 16-bit output (about 30% on top of the GEMM at 7B shapes, docs/PERF.md); here W travels as
// 0.5 byte per value and the activations and output are read and written once, in f32.
//
// Shape of the work: a block of 256 threads (two warpgroups) owns a TM × TN output tile and walks the
// reduction TK = 64 values at a time. Each step, both operand tiles are staged in shared memory as
// 16-bit values, 128 bytes per row with the 128-byte swizzle (16-byte chunk c of row r at chunk
// c ^ (r % 8)), the layout wgmma reads through its matrix descriptors; warpgroup g multiplies rows
// 64g..64g+63 by all TN columns (wgmma m64n128k16, four per step). Two stages: while the tensor cores
// work on step s (wgmma is asynchronous), the same threads write step s+1, already in registers, into
// the other stage and start the global loads of step s+2.
// Sizes: the reduction and W's columns are multiples of 64, the absmax block a multiple of 32 (one
// scale per 16-byte code chunk); M and the output columns are free (tiles are clipped).
// Built for sm_90a only (wgmma); the host picks this path only there (build.rs sets `wgmma_kernels`).
#include "quant4.cuh"

#define TM 128
#define TN 128
#define TK 64
#define GEMM_THREADS 256
#define TILE_A_BYTES (TM * TK * 2)
#define STAGE_BYTES ((TM + TN) * TK * 2)  // 32 KiB; the host reserves 2 stages + 1 KiB for alignment

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HAVE_WGMMA 1
#endif

// Byte offset of 16-byte chunk `c` of row `r` in a 128-byte-swizzled tile.
__device__ __forceinline__ uint32_t swz(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

#ifdef HAVE_WGMMA
// Matrix descriptor of a K-major operand at shared address `addr` (1024-aligned tile + 32·k16 step):
// 128-byte swizzle (bits 62-63 = 1), 8-row groups 1024 bytes apart (stride offset), leading offset
// unused by this layout (1).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

template <int C> __device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t da, uint64_t db);
template <> __device__ __forceinline__ void wgmma_m64n128k16<1>(float (&d)[64], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db));
}
template <> __device__ __forceinline__ void wgmma_m64n128k16<2>(float (&d)[64], uint64_t da, uint64_t db) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Generic-proxy writes to shared memory made visible to the tensor cores' (async proxy) reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Keeps the compiler from moving accesses to an accumulator across the asynchronous wgmma.
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Four 8×8 16-bit matrices stored transposed: lane l gives the address of row l%8 of matrix l/8.
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
}
#endif

// ---- operand A: f32 activations (rows × ld), rounded to 16 bits ----------------------------------
// The TM × TK tile at (r0, c0) is 1024 16-byte chunks: 4 per thread (8 consecutive floats each,
// 8 threads per row, so each row is read as 256 contiguous bytes). Rows past `rows` are zeros.
struct ATile {
    float4 v[8];
};
__device__ __forceinline__ void load_a(ATile& a, const float* src, int64_t ld, int r0, int rows, int c0) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int id = i * GEMM_THREADS + threadIdx.x, r = id >> 3, c = id & 7;
        if (r0 + r < rows) {
            const float4* p = reinterpret_cast<const float4*>(src + (int64_t)(r0 + r) * ld + c0 + c * 8);
            a.v[2 * i] = __ldg(p), a.v[2 * i + 1] = __ldg(p + 1);
        } else {
            a.v[2 * i] = a.v[2 * i + 1] = make_float4(0.f, 0.f, 0.f, 0.f);
        }
    }
}
template <int C> __device__ __forceinline__ void store_a(const ATile& a, uint8_t* tile) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int id = i * GEMM_THREADS + threadIdx.x, r = id >> 3, c = id & 7;
        const float4 p = a.v[2 * i], q = a.v[2 * i + 1];
        *reinterpret_cast<uint4*>(tile + swz(r, c)) = make_uint4(pack16<C>(p.x, p.y), pack16<C>(p.z, p.w), pack16<C>(q.x, q.y), pack16<C>(q.z, q.w));
    }
}

// ---- operand B: 4-bit W, dequantized --------------------------------------------------------------
// One 16-byte code chunk (32 values of one W row, one absmax) per thread.
struct BChunk {
    uint4 codes;
    float scale;
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
// Chunk of W row `row` starting at column `col` (zeros when the row or column is past the edge).
__device__ __forceinline__ void load_chunk(BChunk& b, const Quant4Args& q, int64_t cols, int row, int rows, int col) {
    b.codes = make_uint4(0, 0, 0, 0);
    b.scale = 0.f;
    if (row < rows && col < cols) {
        const int64_t e = (int64_t)row * cols + col;
        b.codes = __ldg(reinterpret_cast<const uint4*>(q.packed + e / 2));
        b.scale = block_absmax(q.absmax, q.absmax_q, q.absmax2, q.code256, q.offset, e / q.blocksize);
    }
}
// Byte j of a code word as a dequantized pair (high nibble first), through the byte-indexed table.
template <int C> __device__ __forceinline__ uint32_t pair(const float2* lut2, uint32_t word, int j, float s) {
    const float2 v = lut2[(word >> (8 * j)) & 255];
    return pack16<C>(v.x * s, v.y * s);
}

// Forward: the B tile is TN rows of W (n0..) × TK columns (k0..), K-major as W is: thread t takes row
// t/2, half t%2 (32 values = 4 chunks of the tile row).
__device__ __forceinline__ void load_b_fwd(BChunk& b, const Quant4Args& q, int rows, int cols, int n0, int k0) {
    load_chunk(b, q, cols, n0 + (threadIdx.x >> 1), rows, k0 + 32 * (threadIdx.x & 1));
}
template <int C> __device__ __forceinline__ void store_b_fwd(const BChunk& b, const float2* lut2, uint8_t* tile) {
    const int r = threadIdx.x >> 1, h = threadIdx.x & 1;
    const uint32_t w[4] = {b.codes.x, b.codes.y, b.codes.z, b.codes.w};
#pragma unroll
    for (int i = 0; i < 4; i++)
        *reinterpret_cast<uint4*>(tile + swz(r, 4 * h + i)) =
            make_uint4(pair<C>(lut2, w[i], 0, b.scale), pair<C>(lut2, w[i], 1, b.scale), pair<C>(lut2, w[i], 2, b.scale), pair<C>(lut2, w[i], 3, b.scale));
}

// Input grad: the reduction runs over W's rows, so the B tile must hold W transposed: TN tile rows
// = W columns (k0..), each holding TK = 64 W rows (n0..). Warp w dequantizes W rows n0+8w+g (g =
// lane/4) at columns k0+32t..+31 (t = lane%4) and writes them with stmatrix.trans, which turns the
// 8 rows × 2 columns a lane-quad holds into 16-byte rows of 8 W rows: exactly the chunk w of tile rows
// k. Lane (g, t) feeds matrix j with its code byte (j + t) % 16 (the chunk rotated by t bytes), so
// that the 8 tile rows one matrix writes have 8 different row%8 and land in 8 different bank groups.
#ifdef HAVE_WGMMA
__device__ __forceinline__ void load_b_dgrad(BChunk& b, const Quant4Args& q, int rows, int cols, int n0, int k0) {
    const int lane = threadIdx.x & 31;
    load_chunk(b, q, cols, n0 + 8 * (threadIdx.x >> 5) + (lane >> 2), rows, k0 + 32 * (lane & 3));
}
template <int C> __device__ __forceinline__ void store_b_dgrad(const BChunk& b, const float2* lut2, uint32_t tile) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
    // Rotate the 16 code bytes down by t: byte j of rot is byte (j + t) % 16 of the chunk.
    const uint32_t w[4] = {b.codes.x, b.codes.y, b.codes.z, b.codes.w};
    uint32_t rot[4];
#pragma unroll
    for (int i = 0; i < 4; i++) rot[i] = __funnelshift_r(w[i], w[(i + 1) & 3], 8 * t);
    // The address this lane gives: row c = lane%8 of matrix i = lane/8 (of each x4 group s).
    const int i = lane >> 3, c = lane & 7, tc = c >> 1, e = c & 1;
#pragma unroll
    for (int s = 0; s < 4; s++) {
        const int j = 4 * s + i, k = 32 * tc + 2 * ((j + tc) & 15) + e;
        stmatrix_x4_trans(tile + swz(k, warp), pair<C>(lut2, rot[s], 0, b.scale), pair<C>(lut2, rot[s], 1, b.scale),
                          pair<C>(lut2, rot[s], 2, b.scale), pair<C>(lut2, rot[s], 3, b.scale));
    }
}
#endif

// DGRAD false: out (M, rows) = x · Wᵀ, reduction over cols.  DGRAD true: out (M, cols) (+)= dy · W,
// reduction over rows. `a` is x (M, cols) or dy (M, rows).
template <int C, bool DGRAD>
__device__ void gemm_4bit(const Quant4Args q, const float* code16, const float* a, float* out, int m, int rows, int cols, int accumulate) {
#ifdef HAVE_WGMMA
    __shared__ float2 lut2[256];
    extern __shared__ uint8_t dyn[];
    const uint32_t dyn_addr = (uint32_t)__cvta_generic_to_shared(dyn);
    const uint32_t pad = ((dyn_addr + 1023) & ~1023u) - dyn_addr;  // tiles start 1024-aligned
    auto stage = [&](int s) { return dyn + pad + (s & 1) * STAGE_BYTES; };
    const int n_out = DGRAD ? cols : rows, red = DGRAD ? rows : cols;
    const int n0 = blockIdx.x * TN, m0 = blockIdx.y * TM, steps = red / TK;
    const int wg = threadIdx.x >> 7, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    lut2[threadIdx.x] = make_float2(code16[threadIdx.x >> 4], code16[threadIdx.x & 15]);

    ATile ra;
    BChunk rb;
    auto load = [&](int s) {
        load_a(ra, a, red, m0, m, s * TK);
        if (DGRAD) load_b_dgrad(rb, q, rows, cols, s * TK, n0);
        else load_b_fwd(rb, q, rows, cols, n0, s * TK);
    };
    auto store = [&](uint8_t* st) {
        store_a<C>(ra, st);
        if (DGRAD) store_b_dgrad<C>(rb, lut2, (uint32_t)__cvta_generic_to_shared(st + TILE_A_BYTES));
        else store_b_fwd<C>(rb, lut2, st + TILE_A_BYTES);
    };
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; i++) acc[i] = 0.f;
    load(0);
    __syncthreads();  // lut2
    store(stage(0));
    if (steps > 1) load(1);
    fence_proxy_async();
    __syncthreads();
    for (int s = 0; s < steps; s++) {
        const uint32_t sa = (uint32_t)__cvta_generic_to_shared(stage(s));
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < TK / 16; kk++)
            wgmma_m64n128k16<C>(acc, desc_sw128(sa + wg * (TILE_A_BYTES / 2) + 32 * kk), desc_sw128(sa + TILE_A_BYTES + 32 * kk));
        wgmma_commit();
        if (s + 1 < steps) store(stage(s + 1));
        if (s + 2 < steps) load(s + 2);
        wgmma_wait_all();
#pragma unroll
        for (int i = 0; i < 64; i++) pin(acc[i]);
        fence_proxy_async();
        __syncthreads();
    }
    // Accumulator fragment of m64n128: value 4j + h (h = 0..3) is row g + 8·(h/2) of this warp's 16,
    // column 8j + 2t + h%2.
    const int row_a = m0 + 64 * wg + 16 * warp + g;
#pragma unroll
    for (int j = 0; j < 16; j++) {
        const int col = n0 + 8 * j + 2 * t;
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = row_a + 8 * h;
            if (row >= m) continue;
            float* o = out + (int64_t)row * n_out + col;
            const float v0 = round_to(acc[4 * j + 2 * h], C), v1 = round_to(acc[4 * j + 2 * h + 1], C);
            if (col < n_out) o[0] = accumulate ? o[0] + v0 : v0;
            if (col + 1 < n_out) o[1] = accumulate ? o[1] + v1 : v1;
        }
    }
#else
    __trap();  // built for an arch without wgmma; the host never launches it there
#endif
}

// MINB: blocks per SM the registers must allow (2 caps them at 128 and spills a few bytes).
#define GEMM_4BIT_KERNEL(name, C, DGRAD, MINB) \
    extern "C" __global__ void __launch_bounds__(GEMM_THREADS, MINB) name(const uint8_t* packed, const float* absmax, const uint8_t* absmax_q, const float* absmax2, const float* code256, float offset, const float* code16, int blocksize, const float* a, float* out, int m, int rows, int cols, int accumulate) { \
        gemm_4bit<C, DGRAD>(Quant4Args{packed, absmax, absmax_q, absmax2, code256, offset, blocksize}, code16, a, out, m, rows, cols, accumulate); \
    }
GEMM_4BIT_KERNEL(gemm_4bit_fwd_f16, 1, false, 1)
GEMM_4BIT_KERNEL(gemm_4bit_fwd_bf16, 2, false, 1)
GEMM_4BIT_KERNEL(gemm_4bit_dgrad_f16, 1, true, 1)
GEMM_4BIT_KERNEL(gemm_4bit_dgrad_bf16, 2, true, 1)
GEMM_4BIT_KERNEL(gemm_4bit_fwd_f16_mb2, 1, false, 2)
GEMM_4BIT_KERNEL(gemm_4bit_fwd_bf16_mb2, 2, false, 2)
GEMM_4BIT_KERNEL(gemm_4bit_dgrad_f16_mb2, 1, true, 2)
GEMM_4BIT_KERNEL(gemm_4bit_dgrad_bf16_mb2, 2, true, 2)
