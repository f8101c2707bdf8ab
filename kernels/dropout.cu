// Dropout with a counter-based mask: the keep decision of element `i` is a pure function of
// (seed, step, i) (see dropout_keep in common.cuh), so backward recomputes it and no mask tensor
// exists. Kept values are scaled by 1/(1-p).
#include "common.cuh"

extern "C" __global__ void dropout_fwd(const __half* x, u64 count, float p, u64 seed, u64 step, __half* y) {
    float scale = 1.0f / (1.0f - p);
    GRID_STRIDE(i, count) {
        float v = dropout_keep(seed, step, i, p) ? __half2float(x[i]) * scale : 0.0f;
        y[i] = __float2half_rn(v);
    }
}

extern "C" __global__ void dropout_bwd(const __half* dy, u64 count, float p, u64 seed, u64 step, __half* dx,
                                       int accumulate) {
    float scale = 1.0f / (1.0f - p);
    GRID_STRIDE(i, count) {
        float v = dropout_keep(seed, step, i, p) ? __half2float(dy[i]) * scale : 0.0f;
        store_half(dx + i, v, accumulate);
    }
}
