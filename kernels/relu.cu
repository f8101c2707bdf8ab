// Standalone ReLU, for plans that do not fuse it into the batchnorm before it (the fused path is in
// batchnorm.cu). The backward reads the forward output: y > 0 exactly where x > 0.
#include "common.cuh"

template <class A>
__device__ __forceinline__ void relu_fwd_impl(const A* x, u64 count, A* y) {
    GRID_STRIDE(i, count) y[i] = from_f32<A>(fmaxf(to_f32(x[i]), 0.0f));
}
template <class A>
__device__ __forceinline__ void relu_bwd_impl(const A* y, const A* dy, u64 count, A* dx, int accumulate) {
    GRID_STRIDE(i, count) store_acc(dx + i, to_f32(y[i]) > 0.0f ? to_f32(dy[i]) : 0.0f, accumulate);
}
extern "C" __global__ void relu_fwd(const __half* x, u64 count, __half* y) { relu_fwd_impl(x, count, y); }
extern "C" __global__ void relu_fwd_o0(const float* x, u64 count, float* y) { relu_fwd_impl(x, count, y); }
extern "C" __global__ void relu_bwd(const __half* y, const __half* dy, u64 count, __half* dx, int accumulate) {
    relu_bwd_impl(y, dy, count, dx, accumulate);
}
extern "C" __global__ void relu_bwd_o0(const float* y, const float* dy, u64 count, float* dx, int accumulate) {
    relu_bwd_impl(y, dy, count, dx, accumulate);
}
