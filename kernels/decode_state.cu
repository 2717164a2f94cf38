// Greedy decoding's state held on the device, so that the host can queue a step before it has read
// the token the step before chose (model/llama.rs, decode_step_greedy_launch): the choice
// (argmax_f32), the next step's inputs at the device-held token and position (decode_inputs_at_*),
// and the position moved on by the step itself (advance_position_f32). Launchers:
// src/backend/cuda/decode_state.rs; CPU references: the Backend trait's defaults (src/backend/mod.rs).
#include "common.cuh"

// out[0] = the index of x's largest value, as a float (exact below 2^24), the first of equal ones, as
// generate::argmax picks it scanning in order: a NaN never replaces the best so far, and x[0] stays
// the answer when it is NaN. One block of 1,024 threads (greedy decoding's logits: one row of the
// vocab). CPU reference: the default Backend::argmax_into (generate::argmax of the values).
extern "C" __global__ void __launch_bounds__(1024) argmax_f32(const float* x, int64_t n, float* out) {
    grid_dependency_wait();
    allow_dependent_launch();
    __shared__ float sv[WARP];
    __shared__ int64_t si[WARP];
    // Each thread's best of its elements i ≡ thread (mod 1,024), in order: NaN read as −∞ (it loses
    // every comparison in the scan; the tie rule below then keeps the smaller index).
    float bv = -INFINITY;
    int64_t bi = n;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = isnan(x[i]) ? -INFINITY : x[i];
        if (bi == n || v > bv) bv = v, bi = i;
    }
    // Larger value wins, then the smaller index (the first of equal values, as the scan keeps it).
    auto better = [](float v, int64_t i, float bv, int64_t bi) { return bi == -1 || v > bv || (v == bv && i < bi); };
    const int lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    if (bi == n) bi = -1;  // no element: loses to any
    for (int o = WARP / 2; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (oi != -1 && better(ov, oi, bv, bi)) bv = ov, bi = oi;
    }
    if (lane == 0) sv[wid] = bv, si[wid] = bi;
    __syncthreads();
    if (wid == 0) {
        bv = lane < (int)(blockDim.x / WARP) ? sv[lane] : -INFINITY;
        bi = lane < (int)(blockDim.x / WARP) ? si[lane] : -1;
        for (int o = WARP / 2; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int64_t oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi != -1 && better(ov, oi, bv, bi)) bv = ov, bi = oi;
        }
        if (lane == 0) out[0] = n > 0 && isnan(x[0]) ? 0.0f : (float)max(bi, (int64_t)0);
    }
}

// h (dim) = row token[0] of the embedding table (vocab, dim); cos, sin (half) = rows pos[0] of the
// RoPE tables (positions, half). token and pos hold integers as floats. One launch replaces the
// host's embedding call and its two table uploads per token.
template <typename T>
__device__ void decode_inputs_at(const T* table, const float* token, const float* pos, const float* cos_table,
                                 const float* sin_table, float* h, float* cos, float* sin, int dim, int half) {
    grid_dependency_wait();
    allow_dependent_launch();
    const int64_t id = (int64_t)token[0], p = (int64_t)pos[0];
    FOR_EACH(i, dim + 2 * half) {
        if (i < dim) {
            h[i] = load1(&table[id * dim + i]);
        } else if (i < dim + half) {
            cos[i - dim] = cos_table[p * half + (i - dim)];
        } else {
            sin[i - dim - half] = sin_table[p * half + (i - dim - half)];
        }
    }
}
extern "C" __global__ void decode_inputs_at_bf16(const __nv_bfloat16* table, const float* token, const float* pos,
                                                 const float* cos_table, const float* sin_table, float* h,
                                                 float* cos, float* sin, int dim, int half) {
    decode_inputs_at(table, token, pos, cos_table, sin_table, h, cos, sin, dim, half);
}
extern "C" __global__ void decode_inputs_at_f16(const __half* table, const float* token, const float* pos,
                                                const float* cos_table, const float* sin_table, float* h,
                                                float* cos, float* sin, int dim, int half) {
    decode_inputs_at(table, token, pos, cos_table, sin_table, h, cos, sin, dim, half);
}

// pos[0] += 1, after every other kernel of the step: its wait is for the step's last kernel, which
// waited for the one before, so every reader of pos in this step has completed. (RoPE into the cache
// and the attention read pos before their waits: the next step, a separate graph launch, starts only
// once this one is complete.)
extern "C" __global__ void advance_position_f32(float* pos) {
    grid_dependency_wait();
    if (blockIdx.x == 0 && threadIdx.x == 0) pos[0] += 1.0f;
}
