// What one launch that only reads its bytes reaches, for the decoding GEMVs to be set against (issue
// 6: the GEMVs read 9-50 MB per launch at 1.3-1.8 TB/s, as fast as torch's own reads of those sizes,
// which left open whether a read-only launch of our own can go faster). Each thread keeps UNROLL
// 16-byte loads in flight, streamed past L1 as the GEMV streams its codes, and folds them into one
// word, stored only if it equals a value the inputs never give, so no load is dropped. Used by
// benches/gpu_kernels.rs (`read floor`) only; no op calls it. Launcher: Cuda::read_floor. H200,
// session 38, cold: 2.10 TB/s on 9.4 MB and 3.20 TB/s on 25.4 MB, against the GEMV's 1.28 and ~1.6
// (docs/PERF.md): the GEMV's loop, not one launch's read rate, is what bounds it.
#include "common.cuh"

template <int UNROLL>
__device__ void read_floor(const uint4* p, int64_t n, uint32_t* sink) {
    grid_dependency_wait();
    uint32_t acc = 0;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x * UNROLL, span = (int64_t)(UNROLL - 1) * blockDim.x;
    int64_t base = (int64_t)blockIdx.x * blockDim.x * UNROLL + threadIdx.x;
    // Whole rounds without bounds checks, so every load of a round is issued before the first is used.
    for (; base + span < n; base += stride) {
        uint4 v[UNROLL];
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) v[k] = load_stream(p + base + (int64_t)k * blockDim.x);
#pragma unroll
        for (int k = 0; k < UNROLL; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
    }
    for (int k = 0; k < UNROLL && base + (int64_t)k * blockDim.x < n; ++k) {
        const uint4 v = load_stream(p + base + (int64_t)k * blockDim.x);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) sink[0] = acc;
}

// n: 16-byte words of p. Without launch bounds ptxas keeps ~4 loads in flight at 32 registers
// whatever UNROLL is (it folds each value before issuing the next loads); with at most 2 blocks of
// 256 asked for it issues all UNROLL loads of a round before the first fold (sm_90a SASS: 48 and 80
// registers for 8 and 16, all of a round issued first).
extern "C" __global__ void __launch_bounds__(256, 2) read_floor_u2(const uint4* p, int64_t n, uint32_t* sink) { read_floor<2>(p, n, sink); }
extern "C" __global__ void __launch_bounds__(256, 2) read_floor_u4(const uint4* p, int64_t n, uint32_t* sink) { read_floor<4>(p, n, sink); }
extern "C" __global__ void __launch_bounds__(256, 2) read_floor_u8(const uint4* p, int64_t n, uint32_t* sink) { read_floor<8>(p, n, sink); }
extern "C" __global__ void __launch_bounds__(256, 2) read_floor_u16(const uint4* p, int64_t n, uint32_t* sink) { read_floor<16>(p, n, sink); }
