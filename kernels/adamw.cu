// 32-bit AdamW with bitsandbytes' update rule (bias corrections folded into the step size, then
// decoupled weight decay), gradients pre-multiplied by the clipping coefficient. CPU: Cpu::adamw.
#include "common.cuh"

extern "C" __global__ void adamw_f32(float* p, const float* g, float* m, float* v, float lr, float beta1, float beta2, float eps, float weight_decay, float step_size, float c2, float grad_scale, int64_t n) {
    FOR_EACH(i, n) {
        const float gi = g[i] * grad_scale;
        const float mi = m[i] * beta1 + (1.f - beta1) * gi;
        const float vi = v[i] * beta2 + (1.f - beta2) * gi * gi;
        float pi = p[i] + step_size * (mi / (sqrtf(vi) + eps * c2));
        if (weight_decay > 0.f) pi *= 1.f - lr * weight_decay;
        m[i] = mi;
        v[i] = vi;
        p[i] = pi;
    }
}
