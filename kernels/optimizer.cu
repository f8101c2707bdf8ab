// The optimizer: overflow check, RMSProp over the flat parameter buffer, the device loss
// scaler, and the per-step values a step replayed from a CUDA graph reads from device memory.
#include "common.cuh"

// Sets *flag = 1 if any gradient is inf or NaN. The caller zeroes the flag before the step; many
// threads may store 1 concurrently, which is harmless.
template <class G>
__device__ __forceinline__ void overflow_check(const G* g, u64 count, int* flag) {
    GRID_STRIDE(i, count) {
        float v = (float)g[i];
        if (!isfinite(v)) *flag = 1;
    }
}
extern "C" __global__ void overflow_check_f32(const float* g, u64 count, int* flag) { overflow_check(g, count, flag); }
extern "C" __global__ void overflow_check_f16(const __half* g, u64 count, int* flag) {
    GRID_STRIDE(i, count) {
        if (!isfinite(__half2float(g[i]))) *flag = 1;
    }
}

// Mirrored by `RmspropParams` in src/optim/cuda.rs.
struct RmspropParams {
    float* w;             // fp32 master weights
    __half* w16;          // fp16 working copy (may be null)
    float* ms;            // mean square state
    float* mom;           // momentum state
    const void* grad;     // gradients, fp32 or fp16 (entry point decides)
    const unsigned char* decay;  // per-element weight-decay mask (1 = decay); null: decay all
    const float* lr_dev;  // learning rate in device memory (null: use lr), so graphs can replay
    const int* overflow;  // skip the whole update when *overflow != 0 (null: never skip)
    u64 count;
    float lr, rho, momentum, eps, weight_decay, inv_loss_scale;
    const float* loss_scale;  // device-resident loss scale (null: inv_loss_scale alone)
};

// MindSpore/TF RMSProp with coupled L2:
//   g = grad / loss_scale + wd * w (where decayed)
//   ms = rho * ms + (1 - rho) * g^2;  mom = momentum * mom + lr * g / sqrt(ms + eps);  w -= mom
template <class G>
__device__ __forceinline__ void rmsprop(const RmspropParams& p) {
    if (p.overflow && *p.overflow) return;
    float lr = p.lr_dev ? *p.lr_dev : p.lr;
    // With a device-resident scale, inv_loss_scale is what remains of the unscale factor (1 / world
    // in a data-parallel run, whose gradients are sums over the ranks).
    float inv_scale = p.loss_scale ? p.inv_loss_scale / *p.loss_scale : p.inv_loss_scale;
    const G* grad = (const G*)p.grad;
    GRID_STRIDE(i, p.count) {
        float w = p.w[i];
        float g = (float)grad[i] * inv_scale;
        if (!p.decay || p.decay[i]) g += p.weight_decay * w;
        float ms = p.rho * p.ms[i] + (1.0f - p.rho) * g * g;
        float mom = p.momentum * p.mom[i] + lr * g * rsqrtf(ms + p.eps);
        w -= mom;
        p.ms[i] = ms;
        p.mom[i] = mom;
        p.w[i] = w;
        if (p.w16) p.w16[i] = __float2half_rn(w);
    }
}
extern "C" __global__ void rmsprop_f32(const RmspropParams p) { rmsprop<float>(p); }
extern "C" __global__ void rmsprop_f16(const RmspropParams p) { rmsprop<__half>(p); }

// The dynamic loss scaler, kept on the device so no step waits for the host; mirrors
// LossScaler::update (src/optim/loss_scale.rs) operation for operation, so the host copy that
// replays the overflow flags a step later stays bit-identical. On overflow: halve the scale (not
// below 1) and restart the clean count; else count the clean step and double the scale after
// `growth_interval` of them, if the doubled scale is finite. One thread.
extern "C" __global__ void loss_scale_update(const int* overflow, float* scale, u32* clean, u32 growth_interval) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    float s = *scale;
    if (*overflow) {
        *scale = fmaxf(s * 0.5f, 1.0f);
        *clean = 0;
        return;
    }
    u32 c = *clean + 1;
    if (c >= growth_interval) {
        c = 0;
        float grown = s * 2.0f;
        if (isfinite(grown)) *scale = grown;
    }
    *clean = c;
}

// Writes a step's own values where its kernels read them when the step is replayed from a
// captured CUDA graph (whose launch arguments are frozen): the learning rate RMSProp reads
// through `lr_dev` and the step number dropout reads through `step_dev`. One thread, queued
// before the replay.
extern "C" __global__ void step_args_set(float lr, u64 step, float* lr_dst, u64* step_dst) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    *lr_dst = lr;
    *step_dst = step;
}
