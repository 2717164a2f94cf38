// Rotary embedding, rotate-half layout, per-row tables; inverse = the backward pass. CPU: Cpu::rope.
#include "common.cuh"

// x, out (m, heads, head_dim); cos, sin (m, head_dim/2). One element of a (j, j + half) pair per
// thread and step, or four consecutive pairs (16-byte accesses, one index decomposition) when half is a
// multiple of 4: the one-pair loop, three 64-bit divisions per pair, took 35 µs for the 7B q at 2048
// rows (ncu on the H200), twice its traffic at copy rate.
// One pair rotated by (c, s); both paths below use it, so they round alike.
__device__ __forceinline__ float2 rotate(float x1, float x2, float c, float s) { return make_float2(x1 * c - x2 * s, x2 * c + x1 * s); }
extern "C" __global__ void rope_f32(const float* x, const float* cos_t, const float* sin_t, float* out, int m, int heads, int head_dim, int inverse) {
    const int half = head_dim / 2;
    const int64_t row_pairs = (int64_t)heads * half;
    // Pair i: token t, head h, index j within the half.
    auto locate = [&](int64_t i, int64_t& t, int64_t& base, int& j) {
        t = i / row_pairs;
        const int r = (int)(i - t * row_pairs), h = r / half;
        j = r - h * half;
        base = (t * heads + h) * head_dim;
    };
    const bool vector = half % 4 == 0 && aligned_to(x, 16) && aligned_to(out, 16) && aligned_to(cos_t, 16) && aligned_to(sin_t, 16);
    for_each4(
        (int64_t)m * row_pairs, vector,
        [&](int64_t q) {
            int64_t t, base;
            int j;
            locate(4 * q, t, base, j);
            const float4 c = *reinterpret_cast<const float4*>(cos_t + t * half + j);
            float4 s = *reinterpret_cast<const float4*>(sin_t + t * half + j);
            if (inverse) s = make_float4(-s.x, -s.y, -s.z, -s.w);
            const float4 x1 = *reinterpret_cast<const float4*>(x + base + j), x2 = *reinterpret_cast<const float4*>(x + base + half + j);
            const float2 a = rotate(x1.x, x2.x, c.x, s.x), b = rotate(x1.y, x2.y, c.y, s.y), d = rotate(x1.z, x2.z, c.z, s.z), e = rotate(x1.w, x2.w, c.w, s.w);
            *reinterpret_cast<float4*>(out + base + j) = make_float4(a.x, b.x, d.x, e.x);
            *reinterpret_cast<float4*>(out + base + half + j) = make_float4(a.y, b.y, d.y, e.y);
        },
        [&](int64_t i) {
            int64_t t, base;
            int j;
            locate(i, t, base, j);
            const float c = cos_t[t * half + j], s = inverse ? -sin_t[t * half + j] : sin_t[t * half + j];
            const float2 r = rotate(x[base + j], x[base + half + j], c, s);
            out[base + j] = r.x;
            out[base + half + j] = r.y;
        });
}
