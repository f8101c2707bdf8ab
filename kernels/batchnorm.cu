// Batch normalisation over NHWC activations viewed as [M = n*h*w][C], per-channel statistics.
//
// The baseline path (KernelPaths::bn_vec off; batchnorm_vec.cu is the vectorised one).
// Training forward = bn_stats_partial + bn_stats_finalize + bn_apply. Statistics are sums of
// (x - shift) and (x - shift)^2 with shift = x[0][c]: shifting by a sample of the channel keeps
// the one-pass variance from cancelling when |mean| >> std; partials are merged in double.
// Backward = bn_bwd_partial + bn_bwd_finalize + bn_bwd_dx. Outputs (and, in backward, y and dy)
// have a row stride `ldy` and channel offset `yoff`, so a branch's last BN can write straight into
// its slice of a concatenated tensor.
//
// Precision variants (templates over the activation type A and the type S of gamma/beta and of
// the saved batch mean / inverse std; all arithmetic is fp32, cross-split merges double):
//   unsuffixed (O2)  A = __half, S = float
//   `_o0`            A = float,  S = float
//   `_o3`            A = __half, S = __half
// In every variant the running statistics stay fp32: they are state nudged by momentum * batch
// statistic each step, and at fp16 precision (11-bit mantissa) an update of 0.1 * (batch - running)
// smaller than half an ulp of the running value would round away, freezing the statistics. dgamma
// and dbeta stay fp32 too: they land in the fp32 gradient buffer. The workspace is always fp32.
#include "batchnorm.cuh"

// Block shape of the partial reductions: 32 channels x 8 row groups; blockIdx.y splits the rows.
#define BN_TX 32
#define BN_TY 8

// Reduces two per-thread partial sums over the BN_TY row groups and writes them for this split.
__device__ __forceinline__ void bn_write_partials(float a, float b, int c, int C, float* ws) {
    __shared__ float sa[BN_TY][BN_TX], sb[BN_TY][BN_TX];
    sa[threadIdx.y][threadIdx.x] = a;
    sb[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        for (int t = 1; t < BN_TY; ++t) {
            a += sa[t][threadIdx.x];
            b += sb[t][threadIdx.x];
        }
        ws[((u64)blockIdx.y * C + c) * 2] = a;
        ws[((u64)blockIdx.y * C + c) * 2 + 1] = b;
    }
}

// ws[split][c] = (sum (x - shift), sum (x - shift)^2) over this split's rows.
template <class A>
__device__ __forceinline__ void bn_stats_partial_impl(const A* x, u64 M, int C, float* ws) {
    int c = blockIdx.x * BN_TX + threadIdx.x;
    float s1 = 0.0f, s2 = 0.0f;
    if (c < C) {
        float shift = to_f32(x[c]);
        for (u64 r = (u64)blockIdx.y * BN_TY + threadIdx.y; r < M; r += (u64)gridDim.y * BN_TY) {
            float d = to_f32(x[r * C + c]) - shift;
            s1 += d;
            s2 += d * d;
        }
    }
    bn_write_partials(s1, s2, c, C, ws);
}

// Per channel, from the split partials: see bn_channel_stats.
template <class A, class S>
__device__ __forceinline__ void bn_stats_finalize_impl(const float* ws, int splits, const A* x, u64 M, int C,
                                                       float eps, float momentum, S* save_mean, S* save_inv_std,
                                                       float* running_mean, float* running_var) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s1 = 0.0, s2 = 0.0;
    for (int z = 0; z < splits; ++z) {
        s1 += ws[((u64)z * C + c) * 2];
        s2 += ws[((u64)z * C + c) * 2 + 1];
    }
    bn_channel_stats(s1, s2, to_f32(x[c]), M, c, eps, momentum, save_mean, save_inv_std, running_mean, running_var);
}

// y = gamma * (x - mean) * inv_std + beta, then ReLU if relu != 0. Used for training (batch
// statistics).
template <class A, class S>
__device__ __forceinline__ void bn_apply_impl(const A* x, const S* mean, const S* inv_std, const S* gamma,
                                              const S* beta, u64 M, int C, int relu, A* y, int ldy, int yoff) {
    GRID_STRIDE(i, M * C) {
        int c = (int)(i % C);
        u64 r = i / C;
        float v = (to_f32(x[i]) - to_f32(mean[c])) * to_f32(inv_std[c]) * to_f32(gamma[c]) + to_f32(beta[c]);
        if (relu) v = fmaxf(v, 0.0f);
        y[r * ldy + yoff + c] = from_f32<A>(v);
    }
}

// Inference: normalise with the (always fp32) running statistics.
template <class A, class S>
__device__ __forceinline__ void bn_infer_impl(const A* x, const float* running_mean, const float* running_var,
                                              const S* gamma, const S* beta, float eps, u64 M, int C, int relu,
                                              A* y, int ldy, int yoff) {
    GRID_STRIDE(i, M * C) {
        int c = (int)(i % C);
        u64 r = i / C;
        float v = (to_f32(x[i]) - running_mean[c]) * rsqrtf(running_var[c] + eps) * to_f32(gamma[c]) +
                  to_f32(beta[c]);
        if (relu) v = fmaxf(v, 0.0f);
        y[r * ldy + yoff + c] = from_f32<A>(v);
    }
}

// The gradient reaching the BN output: dy, zeroed where a fused ReLU clipped (y == 0).
template <class A>
__device__ __forceinline__ float bn_dy_eff(const A* y, const A* dy, u64 j, int relu) {
    float g = to_f32(dy[j]);
    if (relu && !(to_f32(y[j]) > 0.0f)) g = 0.0f;
    return g;
}

// ws[split][c] = (sum dy_eff, sum dy_eff * xhat).
template <class A, class S>
__device__ __forceinline__ void bn_bwd_partial_impl(const A* x, const A* y, const A* dy, const S* mean,
                                                    const S* inv_std, u64 M, int C, int relu, int ldy, int yoff,
                                                    float* ws) {
    int c = blockIdx.x * BN_TX + threadIdx.x;
    float s1 = 0.0f, s2 = 0.0f;
    if (c < C) {
        float mu = to_f32(mean[c]), is = to_f32(inv_std[c]);
        for (u64 r = (u64)blockIdx.y * BN_TY + threadIdx.y; r < M; r += (u64)gridDim.y * BN_TY) {
            float g = bn_dy_eff(y, dy, r * ldy + yoff + c, relu);
            s1 += g;
            s2 += g * (to_f32(x[r * C + c]) - mu) * is;
        }
    }
    bn_write_partials(s1, s2, c, C, ws);
}

// dx = gamma * inv_std * (dy_eff - dbeta / M - xhat * dgamma / M); accumulate adds into dx.
template <class A, class S>
__device__ __forceinline__ void bn_bwd_dx_impl(const A* x, const A* y, const A* dy, const S* mean, const S* inv_std,
                                               const S* gamma, const float* dgamma, const float* dbeta, u64 M, int C,
                                               int relu, int ldy, int yoff, A* dx, int accumulate) {
    float inv_m = 1.0f / (float)M;
    GRID_STRIDE(i, M * C) {
        int c = (int)(i % C);
        u64 r = i / C;
        float g = bn_dy_eff(y, dy, r * ldy + yoff + c, relu);
        float is = to_f32(inv_std[c]);
        float xhat = (to_f32(x[i]) - to_f32(mean[c])) * is;
        float v = to_f32(gamma[c]) * is * (g - dbeta[c] * inv_m - xhat * dgamma[c] * inv_m);
        store_acc(dx + i, v, accumulate);
    }
}

// ---- Entry points: statistics ----

extern "C" __global__ void bn_stats_partial(const __half* x, u64 M, int C, float* ws) {
    bn_stats_partial_impl(x, M, C, ws);
}
// O3 uses bn_stats_partial: the input is fp16 and the partials fp32, as in O2.
extern "C" __global__ void bn_stats_partial_o0(const float* x, u64 M, int C, float* ws) {
    bn_stats_partial_impl(x, M, C, ws);
}

extern "C" __global__ void bn_stats_finalize(const float* ws, int splits, const __half* x, u64 M, int C, float eps,
                                             float momentum, float* save_mean, float* save_inv_std,
                                             float* running_mean, float* running_var) {
    bn_stats_finalize_impl(ws, splits, x, M, C, eps, momentum, save_mean, save_inv_std, running_mean, running_var);
}
extern "C" __global__ void bn_stats_finalize_o0(const float* ws, int splits, const float* x, u64 M, int C, float eps,
                                                float momentum, float* save_mean, float* save_inv_std,
                                                float* running_mean, float* running_var) {
    bn_stats_finalize_impl(ws, splits, x, M, C, eps, momentum, save_mean, save_inv_std, running_mean, running_var);
}
extern "C" __global__ void bn_stats_finalize_o3(const float* ws, int splits, const __half* x, u64 M, int C,
                                                float eps, float momentum, __half* save_mean, __half* save_inv_std,
                                                float* running_mean, float* running_var) {
    bn_stats_finalize_impl(ws, splits, x, M, C, eps, momentum, save_mean, save_inv_std, running_mean, running_var);
}

// ---- Entry points: normalisation ----

extern "C" __global__ void bn_apply(const __half* x, const float* mean, const float* inv_std, const float* gamma,
                                    const float* beta, u64 M, int C, int relu, __half* y, int ldy, int yoff) {
    bn_apply_impl(x, mean, inv_std, gamma, beta, M, C, relu, y, ldy, yoff);
}
extern "C" __global__ void bn_apply_o0(const float* x, const float* mean, const float* inv_std, const float* gamma,
                                       const float* beta, u64 M, int C, int relu, float* y, int ldy, int yoff) {
    bn_apply_impl(x, mean, inv_std, gamma, beta, M, C, relu, y, ldy, yoff);
}
extern "C" __global__ void bn_apply_o3(const __half* x, const __half* mean, const __half* inv_std,
                                       const __half* gamma, const __half* beta, u64 M, int C, int relu, __half* y,
                                       int ldy, int yoff) {
    bn_apply_impl(x, mean, inv_std, gamma, beta, M, C, relu, y, ldy, yoff);
}

extern "C" __global__ void bn_infer(const __half* x, const float* running_mean, const float* running_var,
                                    const float* gamma, const float* beta, float eps, u64 M, int C, int relu,
                                    __half* y, int ldy, int yoff) {
    bn_infer_impl(x, running_mean, running_var, gamma, beta, eps, M, C, relu, y, ldy, yoff);
}
extern "C" __global__ void bn_infer_o0(const float* x, const float* running_mean, const float* running_var,
                                       const float* gamma, const float* beta, float eps, u64 M, int C, int relu,
                                       float* y, int ldy, int yoff) {
    bn_infer_impl(x, running_mean, running_var, gamma, beta, eps, M, C, relu, y, ldy, yoff);
}
extern "C" __global__ void bn_infer_o3(const __half* x, const float* running_mean, const float* running_var,
                                       const __half* gamma, const __half* beta, float eps, u64 M, int C, int relu,
                                       __half* y, int ldy, int yoff) {
    bn_infer_impl(x, running_mean, running_var, gamma, beta, eps, M, C, relu, y, ldy, yoff);
}

// ---- Entry points: backward ----

extern "C" __global__ void bn_bwd_partial(const __half* x, const __half* y, const __half* dy, const float* mean,
                                          const float* inv_std, u64 M, int C, int relu, int ldy, int yoff,
                                          float* ws) {
    bn_bwd_partial_impl(x, y, dy, mean, inv_std, M, C, relu, ldy, yoff, ws);
}
extern "C" __global__ void bn_bwd_partial_o0(const float* x, const float* y, const float* dy, const float* mean,
                                             const float* inv_std, u64 M, int C, int relu, int ldy, int yoff,
                                             float* ws) {
    bn_bwd_partial_impl(x, y, dy, mean, inv_std, M, C, relu, ldy, yoff, ws);
}
extern "C" __global__ void bn_bwd_partial_o3(const __half* x, const __half* y, const __half* dy, const __half* mean,
                                             const __half* inv_std, u64 M, int C, int relu, int ldy, int yoff,
                                             float* ws) {
    bn_bwd_partial_impl(x, y, dy, mean, inv_std, M, C, relu, ldy, yoff, ws);
}

// dbeta = sum dy_eff, dgamma = sum dy_eff * xhat, into the fp32 gradient buffer. Precision-free
// (fp32 workspace in, fp32 gradients out), so one entry point serves every level.
extern "C" __global__ void bn_bwd_finalize(const float* ws, int splits, int C, float* dgamma, float* dbeta) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s1 = 0.0, s2 = 0.0;
    for (int z = 0; z < splits; ++z) {
        s1 += ws[((u64)z * C + c) * 2];
        s2 += ws[((u64)z * C + c) * 2 + 1];
    }
    dbeta[c] = (float)s1;
    dgamma[c] = (float)s2;
}

extern "C" __global__ void bn_bwd_dx(const __half* x, const __half* y, const __half* dy, const float* mean,
                                     const float* inv_std, const float* gamma, const float* dgamma,
                                     const float* dbeta, u64 M, int C, int relu, int ldy, int yoff, __half* dx,
                                     int accumulate) {
    bn_bwd_dx_impl(x, y, dy, mean, inv_std, gamma, dgamma, dbeta, M, C, relu, ldy, yoff, dx, accumulate);
}
extern "C" __global__ void bn_bwd_dx_o0(const float* x, const float* y, const float* dy, const float* mean,
                                        const float* inv_std, const float* gamma, const float* dgamma,
                                        const float* dbeta, u64 M, int C, int relu, int ldy, int yoff, float* dx,
                                        int accumulate) {
    bn_bwd_dx_impl(x, y, dy, mean, inv_std, gamma, dgamma, dbeta, M, C, relu, ldy, yoff, dx, accumulate);
}
extern "C" __global__ void bn_bwd_dx_o3(const __half* x, const __half* y, const __half* dy, const __half* mean,
                                        const __half* inv_std, const __half* gamma, const float* dgamma,
                                        const float* dbeta, u64 M, int C, int relu, int ldy, int yoff, __half* dx,
                                        int accumulate) {
    bn_bwd_dx_impl(x, y, dy, mean, inv_std, gamma, dgamma, dbeta, M, C, relu, ldy, yoff, dx, accumulate);
}

