// Dropout with a counter-based mask: the keep decision of element `i` is a pure function of
// (seed, step, i) (see dropout_keep in common.cuh), so backward recomputes it and no mask tensor
// exists. Kept values are scaled by 1/(1-p). `step_dev`, when not null, holds the step in device
// memory instead of `step`, so a captured CUDA graph replays with each step's own masks. Templates over the activation type A: the unsuffixed
// entry points take fp16 tensors (O2/O3), `_o0` fp32 ones.
#include "common.cuh"

template <class A>
__device__ __forceinline__ void dropout_fwd_impl(const A* x, u64 count, float p, u64 seed, u64 step, A* y,
                                                 const u64* step_dev) {
    if (step_dev) step = *step_dev;
    float scale = 1.0f / (1.0f - p);
    GRID_STRIDE(i, count) {
        float v = dropout_keep(seed, step, i, p) ? to_f32(x[i]) * scale : 0.0f;
        y[i] = from_f32<A>(v);
    }
}

template <class A>
__device__ __forceinline__ void dropout_bwd_impl(const A* dy, u64 count, float p, u64 seed, u64 step, A* dx,
                                                 int accumulate, const u64* step_dev) {
    if (step_dev) step = *step_dev;
    float scale = 1.0f / (1.0f - p);
    GRID_STRIDE(i, count) {
        float v = dropout_keep(seed, step, i, p) ? to_f32(dy[i]) * scale : 0.0f;
        store_acc(dx + i, v, accumulate);
    }
}

extern "C" __global__ void dropout_fwd(const __half* x, u64 count, float p, u64 seed, u64 step, __half* y,
                                       const u64* step_dev) {
    dropout_fwd_impl(x, count, p, seed, step, y, step_dev);
}
extern "C" __global__ void dropout_fwd_o0(const float* x, u64 count, float p, u64 seed, u64 step, float* y,
                                          const u64* step_dev) {
    dropout_fwd_impl(x, count, p, seed, step, y, step_dev);
}
extern "C" __global__ void dropout_bwd(const __half* dy, u64 count, float p, u64 seed, u64 step, __half* dx,
                                       int accumulate, const u64* step_dev) {
    dropout_bwd_impl(dy, count, p, seed, step, dx, accumulate, step_dev);
}
extern "C" __global__ void dropout_bwd_o0(const float* dy, u64 count, float p, u64 seed, u64 step, float* dx,
                                          int accumulate, const u64* step_dev) {
    dropout_bwd_impl(dy, count, p, seed, step, dx, accumulate, step_dev);
}
