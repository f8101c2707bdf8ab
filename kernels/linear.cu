// Fully connected layer support. The matrix products themselves run on the convolution kernels:
// y = x W^T with x [n][in] and W [out][in] is exactly a 1x1 convolution over an n x 1 x 1 NHWC
// image (fprop), dx = dy W is its dgrad and dW = dy^T x its wgrad. Reusing our own tensor-core
// implicit GEMM keeps one tested GEMM in the engine instead of adding cuBLAS for a layer that is
// 0.01% of the FLOPs. This file adds the bias.
#include "common.cuh"

// Templates over the activation type A: the unsuffixed entry points take fp16 y/dy (O2/O3), `_o0`
// fp32 ones (the O0 GEMMs run on the plain conv kernels' `_o0` variants). The bias and its
// gradient are fp32 at every level.

// y[r][o] += bias[o] for r < n (in place, after the GEMM).
template <class A>
__device__ __forceinline__ void bias_add_impl(A* y, const float* bias, int n, int out) {
    GRID_STRIDE(i, (u32)n * out) y[i] = from_f32<A>(to_f32(y[i]) + bias[i % out]);
}

// dbias[o] (+)= sum_r dy[r][o]; one thread per output feature, reads coalesced across o.
template <class A>
__device__ __forceinline__ void bias_grad_impl(const A* dy, int n, int out, float* dbias, int accumulate) {
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= out) return;
    float s = 0.0f;
    for (int r = 0; r < n; ++r) s += to_f32(dy[(u64)r * out + o]);
    dbias[o] = accumulate ? dbias[o] + s : s;
}

extern "C" __global__ void bias_add(__half* y, const float* bias, int n, int out) { bias_add_impl(y, bias, n, out); }
extern "C" __global__ void bias_add_o0(float* y, const float* bias, int n, int out) { bias_add_impl(y, bias, n, out); }
extern "C" __global__ void bias_grad(const __half* dy, int n, int out, float* dbias, int accumulate) {
    bias_grad_impl(dy, n, out, dbias, accumulate);
}
extern "C" __global__ void bias_grad_o0(const float* dy, int n, int out, float* dbias, int accumulate) {
    bias_grad_impl(dy, n, out, dbias, accumulate);
}
