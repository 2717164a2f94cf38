// Causal attention with GQA and a segment mask (packing / padding), forward and backward, for the
// shapes the tensor-core kernels of flash.cu do not take (decoding, a few queries, other head sizes).
// Forward: one block per query row whose warps split the keys (so decoding one token uses the whole
// block, not one warp), each with an online softmax, merged at the end. Backward: one warp per query
// row (dq) or per key row (dk, dv). Each lane holds head_dim/32 values; the T×T matrix never exists.
// CPU reference: Cpu::attention / Cpu::attention_backward (src/backend/cpu.rs).
#include "common.cuh"

#define MAX_PER_LANE 8 // head_dim ≤ 256

struct Geom {
    int batch, q_len, kv_len, kv_cap, heads, kv_heads, head_dim, q_offset;
};

// Is key s visible to query t of batch row b?
__device__ __forceinline__ bool visible(const Geom& g, const uint32_t* seg, int b, int t, int s) {
    const int pos = g.q_offset + t;
    if (s > pos || s >= g.kv_len) return false;
    if (!seg) return true;
    const uint32_t qs = seg[(int64_t)b * g.kv_cap + pos];
    return qs != 0 && seg[(int64_t)b * g.kv_cap + s] == qs;
}

// r: a lane's N values of a row of d (N·32 ≥ d), zeros past d.
template <int N>
__device__ __forceinline__ void load_row(float (&r)[N], const float* src, int d) {
    const int lane = threadIdx.x % WARP;
#pragma unroll
    for (int i = 0; i < N; i++) {
        const int j = lane + i * WARP;
        r[i] = j < d ? src[j] : 0.f;
    }
}
__device__ __forceinline__ float dot_row(const float* r, const float* src, int d) {
    const int lane = threadIdx.x % WARP;
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        const int j = lane + i * WARP;
        if (j < d) s += r[i] * src[j];
    }
    return warp_sum(s);
}

#define GEOM_ARGS int batch, int q_len, int kv_len, int kv_cap, int heads, int kv_heads, int head_dim, int q_offset
#define MAKE_GEOM Geom g{batch, q_len, kv_len, kv_cap, heads, kv_heads, head_dim, q_offset}

#define SPLIT_WARPS 8

// The warps' states for the merge, declared once by the entry point (a `__shared__` array inside the
// template would be allocated once per instantiation: 4 × 8 KB of static shared memory per block).
struct SplitSmem {
    float m[SPLIT_WARPS], l[SPLIT_WARPS];
    float acc[SPLIT_WARPS][MAX_PER_LANE * WARP];
};

// One query row (b, h, t) = blockIdx.x. PL = d/32 rounded up to a power of two (values per lane);
// each warp loads KG = 32/PL keys' K and V rows before using any (64 registers of them; 8 keys at
// head dim 128, so a decoding context of up to 64 keys is one load round), then forms their KG scores
// before folding any into its softmax (with both, decoding +1.6% against 4 keys a round one at a time,
// session 35). 157 registers, so one block per SM (decoding launches one block per head). Nothing is
// requested before the grid wait (session 34: early requests slow the previous kernel's last blocks
// more than they hide).
// Warp w takes keys w, w + SPLIT_WARPS, … and folds them into its online softmax in that order one
// at a time whatever KG is, so the values do not depend on KG, bit for bit.
template <int PL>
__device__ __forceinline__ void attention_fwd_row(SplitSmem& sm, const float* q, const float* k, const float* v, const uint32_t* seg, float* out, float* lse, const Geom g) {
    constexpr int KG = 32 / PL;
    const int64_t row = blockIdx.x;
    const int t = row % g.q_len, h = (row / g.q_len) % g.heads, b = row / ((int64_t)g.q_len * g.heads);
    const int grp = h / (g.heads / g.kv_heads), d = g.head_dim, lane = threadIdx.x % WARP, wid = threadIdx.x / WARP;
    const float scale = rsqrtf((float)d);
    float qr[PL], acc[PL];
    load_row(qr, q + (((int64_t)b * g.q_len + t) * g.heads + h) * d, d);
#pragma unroll
    for (int i = 0; i < PL; i++) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;
    const int last = min(g.q_offset + t, g.kv_len - 1);
    for (int s0 = wid; s0 <= last; s0 += SPLIT_WARPS * KG) {
        float kr[KG][PL], vr[KG][PL];  // key s0 + u·SPLIT_WARPS's rows (zeros for a key not taken)
        bool ok[KG];
#pragma unroll
        for (int u = 0; u < KG; u++) {
            const int s = s0 + u * SPLIT_WARPS;
            ok[u] = s <= last && visible(g, seg, b, t, s);
            const int64_t ki = (((int64_t)b * g.kv_cap + (ok[u] ? s : 0)) * g.kv_heads + grp) * d;
#pragma unroll
            for (int i = 0; i < PL; i++) {
                const int j = lane + i * WARP;
                kr[u][i] = ok[u] && j < d ? k[ki + j] : 0.f;
                vr[u][i] = ok[u] && j < d ? v[ki + j] : 0.f;
            }
        }
        // The KG scores first, their warp sums independent of each other (one key's shuffle chain
        // after another's was each warp's critical path), then the softmax updates in key order.
        float sc[KG];
#pragma unroll
        for (int u = 0; u < KG; u++) {
            float dot = 0.f;
#pragma unroll
            for (int i = 0; i < PL; i++)
                if (lane + i * WARP < d) dot += qr[i] * kr[u][i];
            sc[u] = warp_sum(dot) * scale;
        }
#pragma unroll
        for (int u = 0; u < KG; u++) {
            if (!ok[u]) continue;
            const float mn = fmaxf(m, sc[u]), corr = expf(m - mn), p = expf(sc[u] - mn);
            l = l * corr + p;
#pragma unroll
            for (int i = 0; i < PL; i++) {
                const int j = lane + i * WARP;
                acc[i] = acc[i] * corr + (j < d ? p * vr[u][i] : 0.f);
            }
            m = mn;
        }
    }
    // Merge the warps' states: M = max m_w, L = Σ l_w e^(m_w − M), out = Σ acc_w e^(m_w − M) / L.
    if (lane == 0) sm.m[wid] = m, sm.l[wid] = l;
#pragma unroll
    for (int i = 0; i < PL; i++) sm.acc[wid][lane + i * WARP] = acc[i];
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < SPLIT_WARPS; w++) M = fmaxf(M, sm.m[w]);
    float L = 0.f;
    for (int w = 0; w < SPLIT_WARPS; w++) L += sm.l[w] > 0.f ? sm.l[w] * expf(sm.m[w] - M) : 0.f;
    float* o = out + (((int64_t)b * g.q_len + t) * g.heads + h) * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float sum = 0.f;
        for (int w = 0; w < SPLIT_WARPS; w++)
            if (sm.l[w] > 0.f) sum += sm.acc[w][j] * expf(sm.m[w] - M);
        o[j] = L > 0.f ? sum / L : 0.f;
    }
    if (threadIdx.x == 0) lse[((int64_t)b * g.heads + h) * g.q_len + t] = L > 0.f ? M + logf(L) : -INFINITY;
}

// q, out (batch, q_len, heads, d); k, v (batch, kv_cap, kv_heads, d); lse (batch, heads, q_len).
// One block of SPLIT_WARPS warps per (b, h, t), warp w taking keys w, w + SPLIT_WARPS, … . With `pos`
// (decoding a recorded step) the geometry's q_offset is pos[0] and kv_len is pos[0] + q_len, read on
// the device, so the same launch serves every position.
extern "C" __global__ void __launch_bounds__(SPLIT_WARPS * WARP, 1) attention_fwd_f32(const float* q, const float* k, const float* v, const uint32_t* seg, const float* pos, float* out, float* lse, GEOM_ARGS) {
    // pos changes only between steps (the host's upload, or advance_position_f32 as the previous
    // step's last kernel, in its own graph launch), never inside one, so it is read before the wait:
    // its load then overlaps the previous kernel's tail instead of preceding every K/V request.
    if (pos) {
        q_offset = (int)pos[0];
        kv_len = q_offset + q_len;
    }
    grid_dependency_wait();
    allow_dependent_launch();
    MAKE_GEOM;
    __shared__ SplitSmem sm;
    if (head_dim <= 32) attention_fwd_row<1>(sm, q, k, v, seg, out, lse, g);
    else if (head_dim <= 64) attention_fwd_row<2>(sm, q, k, v, seg, out, lse, g);
    else if (head_dim <= 128) attention_fwd_row<4>(sm, q, k, v, seg, out, lse, g);
    else attention_fwd_row<8>(sm, q, k, v, seg, out, lse, g);
}

// dq, and delta = rowsum(dout ⊙ out) for the dk/dv kernel. One warp per query row.
extern "C" __global__ void attention_bwd_dq_f32(const float* q, const float* k, const float* v, const float* out, const float* lse, const float* dout, const uint32_t* seg, float* dq, float* delta, GEOM_ARGS) {
    grid_dependency_wait();
    MAKE_GEOM;
    const int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (w >= (int64_t)batch * heads * q_len) return;
    const int t = w % q_len, h = (w / q_len) % heads, b = w / ((int64_t)q_len * heads);
    const int grp = h / (heads / kv_heads), d = head_dim, lane = threadIdx.x % WARP;
    const float scale = rsqrtf((float)d);
    const int64_t qi = (((int64_t)b * q_len + t) * heads + h) * d;
    const int64_t li = ((int64_t)b * heads + h) * q_len + t;
    float qr[MAX_PER_LANE], dor[MAX_PER_LANE], acc[MAX_PER_LANE];
    load_row(qr, q + qi, d);
    load_row(dor, dout + qi, d);
    const float dl = dot_row(dor, out + qi, d);
    if (lane == 0) delta[li] = dl;
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) acc[i] = 0.f;
    const float L = lse[li];
    const int last = min(q_offset + t, kv_len - 1);
    for (int s = 0; s <= last; s++) {
        if (!visible(g, seg, b, t, s)) continue;
        const int64_t ki = (((int64_t)b * kv_cap + s) * kv_heads + grp) * d;
        const float p = expf(dot_row(qr, k + ki, d) * scale - L);
        const float ds = p * (dot_row(dor, v + ki, d) - dl) * scale;
#pragma unroll
        for (int i = 0; i < MAX_PER_LANE; i++) {
            const int j = lane + i * WARP;
            if (j < d) acc[i] += ds * k[ki + j];
        }
    }
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        const int j = lane + i * WARP;
        if (j < d) dq[qi + j] = acc[i];
    }
}

// dk, dv: one warp per key row (b, kv head, s), looping over the group's query heads and the
// queries that see this key. Needs `delta` from attention_bwd_dq_f32.
extern "C" __global__ void attention_bwd_dkdv_f32(const float* q, const float* k, const float* v, const float* lse, const float* delta, const float* dout, const uint32_t* seg, float* dk, float* dv, GEOM_ARGS) {
    grid_dependency_wait();
    MAKE_GEOM;
    const int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / WARP;
    if (w >= (int64_t)batch * kv_heads * kv_len) return;
    const int s = w % kv_len, grp = (w / kv_len) % kv_heads, b = w / ((int64_t)kv_len * kv_heads);
    const int d = head_dim, lane = threadIdx.x % WARP, rep = heads / kv_heads;
    const float scale = rsqrtf((float)d);
    const int64_t ki = (((int64_t)b * kv_cap + s) * kv_heads + grp) * d;
    float kr[MAX_PER_LANE], vr[MAX_PER_LANE], dkr[MAX_PER_LANE], dvr[MAX_PER_LANE];
    load_row(kr, k + ki, d);
    load_row(vr, v + ki, d);
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) dkr[i] = dvr[i] = 0.f;
    const int t0 = max(0, s - q_offset);
    for (int r = 0; r < rep; r++) {
        const int h = grp * rep + r;
        for (int t = t0; t < q_len; t++) {
            if (!visible(g, seg, b, t, s)) continue;
            const int64_t qi = (((int64_t)b * q_len + t) * heads + h) * d;
            const int64_t li = ((int64_t)b * heads + h) * q_len + t;
            const float p = expf(dot_row(kr, q + qi, d) * scale - lse[li]);
            const float ds = p * (dot_row(vr, dout + qi, d) - delta[li]) * scale;
#pragma unroll
            for (int i = 0; i < MAX_PER_LANE; i++) {
                const int j = lane + i * WARP;
                if (j < d) {
                    dvr[i] += p * dout[qi + j];
                    dkr[i] += ds * q[qi + j];
                }
            }
        }
    }
#pragma unroll
    for (int i = 0; i < MAX_PER_LANE; i++) {
        const int j = lane + i * WARP;
        if (j < d) {
            dk[ki + j] = dkr[i];
            dv[ki + j] = dvr[i];
        }
    }
}
