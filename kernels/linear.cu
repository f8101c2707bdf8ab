// Fully connected layer support. The matrix products themselves run on the convolution kernels:
// y = x W^T with x [n][in] and W [out][in] is exactly a 1x1 convolution over an n x 1 x 1 NHWC
// image (fprop), dx = dy W is its dgrad and dW = dy^T x its wgrad. Reusing our own tensor-core
// implicit GEMM keeps one tested GEMM in the engine instead of adding cuBLAS for a layer that is
// 0.01% of the FLOPs. This file adds the bias.
#include "common.cuh"

// y[r][o] += bias[o] for r < n (in place, after the GEMM).
extern "C" __global__ void bias_add(__half* y, const float* bias, int n, int out) {
    GRID_STRIDE(i, (u32)n * out) y[i] = __float2half_rn(__half2float(y[i]) + bias[i % out]);
}

// dbias[o] (+)= sum_r dy[r][o]; one thread per output feature, reads coalesced across o.
extern "C" __global__ void bias_grad(const __half* dy, int n, int out, float* dbias, int accumulate) {
    int o = blockIdx.x * blockDim.x + threadIdx.x;
    if (o >= out) return;
    float s = 0.0f;
    for (int r = 0; r < n; ++r) s += __half2float(dy[(u64)r * out + o]);
    dbias[o] = accumulate ? dbias[o] + s : s;
}
