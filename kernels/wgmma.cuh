// What the Hopper tensor-core kernels (nf4_gemm.cu: the fused 4-bit matmul; flash_wgmma.cu: the
// attention kernels) share: whether this compilation has wgmma (sm_90a only), the 128-byte-swizzled
// shared-memory tile layout and its matrix descriptors, wgmma's fences and waits, and bulk stores.
#pragma once
#include "common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HAVE_WGMMA 1
#endif

// A tensor map (CUtensorMap: 128 opaque bytes, 64-byte aligned), passed by value as a
// `const __grid_constant__` kernel parameter so that its address may be handed to the copy engine.
struct alignas(64) TmaMap {
    unsigned long long opaque[16];
};

#ifdef HAVE_WGMMA
// Byte offset of 16-byte chunk `c` of row `r` in a 128-byte-swizzled tile: rows of 128 bytes (64
// 16-bit values), chunk c stored at c ^ (r % 8), the tile 1024-aligned.
__device__ __forceinline__ uint32_t swz(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// Matrix descriptor of a K-major operand at shared address `addr` (1024-aligned tile + 32·k16 step):
// 128-byte swizzle (bits 62-63 = 1), 8-row groups 1024 bytes apart (stride offset), leading offset
// unused by this layout (1).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
// Matrix descriptor of an MN-major B operand (the N values contiguous; wgmma's transpose flag set) at
// `addr` (1024-aligned tile + 2048·k16 step) in the same swizzled layout: each 128-byte row holds 64
// N values of one k, 8 k rows form a 1024-byte group (stride offset), and the next 64 N values are
// `atom_bytes` further on (leading offset).
__device__ __forceinline__ uint64_t desc_sw128_mn(uint32_t addr, uint32_t atom_bytes) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(atom_bytes >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }
// Completed cp.async writes to shared memory made visible to wgmma's reads.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Stores by the copy engine: `bulk_store` adds a copy of `bytes` (a multiple of 16; both addresses
// 16-byte aligned) from shared to global memory to this thread's open bulk group, `bulk_commit` closes
// the group, and `bulk_wait_read` waits until this thread's groups have read their shared memory (the
// writes land on their own; the shared memory may be reused or freed after it).
__device__ __forceinline__ void bulk_store(void* dst, uint32_t src, uint32_t bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;\n" ::"l"(dst), "r"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// Loads by the copy engine into shared memory, counted by an mbarrier: `mbar_init` (one thread, then
// `mbar_init_fence` and a block barrier before any other thread or copy names it), `mbar_expect` (one
// arrival that also adds `bytes` to the phase's awaited transfer count), `tma_load_4d` (one box of a tensor map, whose bytes count against the barrier as they
// land) and `mbar_wait` (until the phase of the given parity has completed: its arrival and its bytes).
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(arrivals) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_expect(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    while (!done)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
}
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const TmaMap& map, uint32_t bar, int c0, int c1, int c2, int c3) {
    asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
                 "l"(reinterpret_cast<uint64_t>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
                 : "memory");
}
// Keeps the compiler from moving accesses to an accumulator across the asynchronous wgmma.
__device__ __forceinline__ void pin(float& r) { asm volatile("" : "+f"(r)::"memory"); }
#endif
