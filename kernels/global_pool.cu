// Global average pooling, NHWC [n, h*w, c] -> [n, c], and its backward. Templates over the
// activation type A: the unsuffixed entry points take fp16 tensors (O2/O3), `_o0` fp32 ones.
#include "common.cuh"

// y[n][c] = mean over h*w of x[n][.][.][c]; consecutive threads take consecutive channels so the
// reads of one pixel row are coalesced.
template <class A>
__device__ __forceinline__ void global_avgpool_fwd_impl(const A* x, int n, int hw, int c, A* y) {
    GRID_STRIDE(i, (u32)n * c) {
        int ch = (int)(i % c);
        u32 img = i / c;
        const A* xp = x + (u64)img * hw * c + ch;
        float s = 0.0f;
        for (int q = 0; q < hw; ++q) s += to_f32(xp[(u64)q * c]);
        y[i] = from_f32<A>(s / (float)hw);
    }
}

template <class A>
__device__ __forceinline__ void global_avgpool_bwd_impl(const A* dy, int n, int hw, int c, A* dx, int accumulate) {
    float inv = 1.0f / (float)hw;
    GRID_STRIDE(i, (u32)n * hw * c) {
        int ch = (int)(i % c);
        u32 img = i / (u32)(hw * c);
        store_acc(dx + i, to_f32(dy[(u64)img * c + ch]) * inv, accumulate);
    }
}

extern "C" __global__ void global_avgpool_fwd(const __half* x, int n, int hw, int c, __half* y) {
    global_avgpool_fwd_impl(x, n, hw, c, y);
}
extern "C" __global__ void global_avgpool_fwd_o0(const float* x, int n, int hw, int c, float* y) {
    global_avgpool_fwd_impl(x, n, hw, c, y);
}
extern "C" __global__ void global_avgpool_bwd(const __half* dy, int n, int hw, int c, __half* dx, int accumulate) {
    global_avgpool_bwd_impl(dy, n, hw, c, dx, accumulate);
}
extern "C" __global__ void global_avgpool_bwd_o0(const float* dy, int n, int hw, int c, float* dx, int accumulate) {
    global_avgpool_bwd_impl(dy, n, hw, c, dx, accumulate);
}
