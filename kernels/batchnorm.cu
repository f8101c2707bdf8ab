// Batch normalisation over NHWC activations viewed as [M = n*h*w][C], per-channel fp32 statistics.
//
// Training forward = bn_stats_partial + bn_stats_finalize + bn_apply. Statistics are sums of
// (x - shift) and (x - shift)^2 with shift = x[0][c]: shifting by a sample of the channel keeps
// the one-pass variance from cancelling when |mean| >> std; partials are merged in double.
// Backward = bn_bwd_partial + bn_bwd_finalize + bn_bwd_dx. Outputs (and, in backward, y and dy)
// have a row stride `ldy` and channel offset `yoff`, so a branch's last BN can write straight into
// its slice of a concatenated tensor.
#include "common.cuh"

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
extern "C" __global__ void bn_stats_partial(const __half* x, u64 M, int C, float* ws) {
    int c = blockIdx.x * BN_TX + threadIdx.x;
    float s1 = 0.0f, s2 = 0.0f;
    if (c < C) {
        float shift = __half2float(x[c]);
        for (u64 r = (u64)blockIdx.y * BN_TY + threadIdx.y; r < M; r += (u64)gridDim.y * BN_TY) {
            float d = __half2float(x[r * C + c]) - shift;
            s1 += d;
            s2 += d * d;
        }
    }
    bn_write_partials(s1, s2, c, C, ws);
}

// Per channel: batch mean and inverse std (biased variance, as used for normalising) saved for
// backward; running stats updated with PyTorch's convention and the unbiased variance.
extern "C" __global__ void bn_stats_finalize(const float* ws, int splits, const __half* x, u64 M, int C, float eps,
                                             float momentum, float* save_mean, float* save_inv_std,
                                             float* running_mean, float* running_var) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s1 = 0.0, s2 = 0.0;
    for (int z = 0; z < splits; ++z) {
        s1 += ws[((u64)z * C + c) * 2];
        s2 += ws[((u64)z * C + c) * 2 + 1];
    }
    double md = s1 / (double)M;
    double var = s2 / (double)M - md * md;
    if (var < 0.0) var = 0.0;
    float mean = (float)(md + (double)__half2float(x[c]));
    save_mean[c] = mean;
    save_inv_std[c] = (float)(1.0 / sqrt(var + (double)eps));
    if (running_mean) {
        double unbiased = M > 1 ? var * (double)M / (double)(M - 1) : var;
        running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mean;
        running_var[c] = (1.0f - momentum) * running_var[c] + momentum * (float)unbiased;
    }
}

// y = gamma * (x - mean) * inv_std + beta, then ReLU if relu != 0. Used for training (batch
// statistics) and, through bn_infer, inference (running statistics).
extern "C" __global__ void bn_apply(const __half* x, const float* mean, const float* inv_std, const float* gamma,
                                    const float* beta, u64 M, int C, int relu, __half* y, int ldy, int yoff) {
    GRID_STRIDE(i, M * C) {
        int c = (int)(i % C);
        u64 r = i / C;
        float v = (__half2float(x[i]) - mean[c]) * inv_std[c] * gamma[c] + beta[c];
        if (relu) v = fmaxf(v, 0.0f);
        y[r * ldy + yoff + c] = __float2half_rn(v);
    }
}

// Inference: normalise with the running statistics.
extern "C" __global__ void bn_infer(const __half* x, const float* running_mean, const float* running_var,
                                    const float* gamma, const float* beta, float eps, u64 M, int C, int relu,
                                    __half* y, int ldy, int yoff) {
    GRID_STRIDE(i, M * C) {
        int c = (int)(i % C);
        u64 r = i / C;
        float v = (__half2float(x[i]) - running_mean[c]) * rsqrtf(running_var[c] + eps) * gamma[c] + beta[c];
        if (relu) v = fmaxf(v, 0.0f);
        y[r * ldy + yoff + c] = __float2half_rn(v);
    }
}

// The gradient reaching the BN output: dy, zeroed where a fused ReLU clipped (y == 0).
__device__ __forceinline__ float bn_dy_eff(const __half* y, const __half* dy, u64 j, int relu) {
    float g = __half2float(dy[j]);
    if (relu && !(__half2float(y[j]) > 0.0f)) g = 0.0f;
    return g;
}

// ws[split][c] = (sum dy_eff, sum dy_eff * xhat).
extern "C" __global__ void bn_bwd_partial(const __half* x, const __half* y, const __half* dy, const float* mean,
                                          const float* inv_std, u64 M, int C, int relu, int ldy, int yoff,
                                          float* ws) {
    int c = blockIdx.x * BN_TX + threadIdx.x;
    float s1 = 0.0f, s2 = 0.0f;
    if (c < C) {
        float mu = mean[c], is = inv_std[c];
        for (u64 r = (u64)blockIdx.y * BN_TY + threadIdx.y; r < M; r += (u64)gridDim.y * BN_TY) {
            float g = bn_dy_eff(y, dy, r * ldy + yoff + c, relu);
            s1 += g;
            s2 += g * (__half2float(x[r * C + c]) - mu) * is;
        }
    }
    bn_write_partials(s1, s2, c, C, ws);
}

// dbeta = sum dy_eff, dgamma = sum dy_eff * xhat, into the fp32 gradient buffer.
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

// dx = gamma * inv_std * (dy_eff - dbeta / M - xhat * dgamma / M); accumulate adds into dx.
extern "C" __global__ void bn_bwd_dx(const __half* x, const __half* y, const __half* dy, const float* mean,
                                     const float* inv_std, const float* gamma, const float* dgamma,
                                     const float* dbeta, u64 M, int C, int relu, int ldy, int yoff, __half* dx,
                                     int accumulate) {
    float inv_m = 1.0f / (float)M;
    GRID_STRIDE(i, M * C) {
        int c = (int)(i % C);
        u64 r = i / C;
        float g = bn_dy_eff(y, dy, r * ldy + yoff + c, relu);
        float xhat = (__half2float(x[i]) - mean[c]) * inv_std[c];
        float v = gamma[c] * inv_std[c] * (g - dbeta[c] * inv_m - xhat * dgamma[c] * inv_m);
        store_half(dx + i, v, accumulate);
    }
}

// Standalone ReLU (the plan fuses it into BN; kept for plans that do not).
extern "C" __global__ void relu_fwd(const __half* x, u64 count, __half* y) {
    GRID_STRIDE(i, count) y[i] = __float2half_rn(fmaxf(__half2float(x[i]), 0.0f));
}
extern "C" __global__ void relu_bwd(const __half* y, const __half* dy, u64 count, __half* dx, int accumulate) {
    GRID_STRIDE(i, count) store_half(dx + i, __half2float(y[i]) > 0.0f ? __half2float(dy[i]) : 0.0f, accumulate);
}
