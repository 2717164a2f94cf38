// Rotary embedding, rotate-half layout, per-row tables; inverse = the backward pass. CPU: Cpu::rope.
#include "common.cuh"

// x, out (m, heads, head_dim); cos, sin (m, head_dim/2)
extern "C" __global__ void rope_f32(const float* x, const float* cos_t, const float* sin_t, float* out, int m, int heads, int head_dim, int inverse) {
    const int half = head_dim / 2;
    FOR_EACH(i, (int64_t)m * heads * half) {
        const int64_t t = i / ((int64_t)heads * half);
        const int h = (i / half) % heads, j = i % half;
        const float c = cos_t[t * half + j], s = inverse ? -sin_t[t * half + j] : sin_t[t * half + j];
        const int64_t base = (t * heads + h) * head_dim;
        const float x1 = x[base + j], x2 = x[base + half + j];
        out[base + j] = x1 * c - x2 * s;
        out[base + half + j] = x2 * c + x1 * s;
    }
}
