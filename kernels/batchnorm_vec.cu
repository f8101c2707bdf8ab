// Batch normalisation, the vectorised path (KernelPaths::bn_vec): the layer of batchnorm.cu in two
// launches forward and two backward, with the same entry-point variants (unsuffixed O2, `_o0`,
// `_o3`) and the same results within the fp32 summation order.
//
// Each thread owns 8 consecutive channels (one 16-byte load of fp16, two of fp32) and walks rows,
// so per-channel values are loaded once per thread and no element needs a `% C`. A block is
// (C/8 channel vectors) x (256/(C/8) row groups); blockIdx.y splits the rows. The reductions
// (statistics forward, dbeta/dgamma backward) write one partial per split, laid out as bn_write_partials, and
// the last block to finish (a ticket counter, which that block resets) merges them in a fixed
// order in double: deterministic, with no finalise launch. The backward recomputes the fused
// ReLU's mask from x instead of reading y: the forward's expression (bnv_affine, explicit
// fmaf) rounded to A has y's sign exactly. The normalisation is (x - mean) * (gamma * inv_std) +
// beta, the CPU reference's scale and shift.
// The launchers use it only for C % 8 == 0, C <= 2048, row stride and channel offset multiples of
// 8 and 16-byte aligned tensors (src/ops/batchnorm/cuda.rs), and fall back to batchnorm.cu.
#include "batchnorm.cuh"

#define BNV_C 8          // channels per thread
#define BNV_THREADS 256  // threads per block, at most

struct __align__(16) Pack16 {
    u32 w[4];
};

// 8 consecutive elements of A as whole 16-byte words: one for fp16, two for fp32.
template <class A>
union Pack8 {
    Pack16 q[sizeof(A) / 2];
    A e[BNV_C];
};

template <class A>
__device__ __forceinline__ void bnv_load(const A* p, float v[BNV_C]) {
    Pack8<A> k;
    for (int i = 0; i < (int)(sizeof(A) / 2); ++i) k.q[i] = ((const Pack16*)p)[i];
    for (int i = 0; i < BNV_C; ++i) v[i] = to_f32(k.e[i]);
}

template <class A>
__device__ __forceinline__ void bnv_store(A* p, const float v[BNV_C]) {
    Pack8<A> k;
    for (int i = 0; i < BNV_C; ++i) k.e[i] = from_f32<A>(v[i]);
    for (int i = 0; i < (int)(sizeof(A) / 2); ++i) ((Pack16*)p)[i] = k.q[i];
}

// This thread's 8 values of a per-channel array (gamma, saved statistics: loaded once).
template <class S>
__device__ __forceinline__ void bnv_channels(const S* p, int c0, float v[BNV_C]) {
    for (int i = 0; i < BNV_C; ++i) v[i] = to_f32(p[c0 + i]);
}

// The normalised value before the ReLU; the forward and the backward's mask share it.
__device__ __forceinline__ float bnv_affine(float x, float mean, float scale, float beta) {
    return fmaf(x - mean, scale, beta);
}

// Whether the fused ReLU let the value through: y > 0 as stored (rounded to A).
template <class A>
__device__ __forceinline__ bool bnv_passes(float x, float mean, float scale, float beta) {
    return to_f32(from_f32<A>(bnv_affine(x, mean, scale, beta))) > 0.0f;
}

// The rows of this block's split: r = blockIdx.y * row groups + threadIdx.y, then strided.
#define BNV_ROWS(r, M) \
    for (u64 r = (u64)blockIdx.y * blockDim.y + threadIdx.y; r < (M); r += (u64)gridDim.y * blockDim.y)

// Sums a and b over the block's row groups (threadIdx.y) by a fixed tree: afterwards row group 0
// holds the block's totals for its channels. Every thread of the block must call it.
__device__ __forceinline__ void bnv_sum_rows(double a[BNV_C], double b[BNV_C]) {
    __shared__ double sa[BNV_THREADS][BNV_C], sb[BNV_THREADS][BNV_C];
    int t = threadIdx.y * blockDim.x + threadIdx.x;
    for (int i = 0; i < BNV_C; ++i) {
        sa[t][i] = a[i];
        sb[t][i] = b[i];
    }
    __syncthreads();
    int top = 1;
    while (top < (int)blockDim.y) top <<= 1;
    for (int s = top >> 1; s > 0; s >>= 1) {
        if ((int)threadIdx.y < s && (int)threadIdx.y + s < (int)blockDim.y) {
            int u = t + s * blockDim.x;
            for (int i = 0; i < BNV_C; ++i) {
                sa[t][i] += sa[u][i];
                sb[t][i] += sb[u][i];
            }
        }
        __syncthreads();
    }
    for (int i = 0; i < BNV_C; ++i) {
        a[i] = sa[t][i];
        b[i] = sb[t][i];
    }
}

// Reduces a thread's per-row sums over the whole grid into row group 0 of the last block to
// finish: each block writes its split's partials to ws (fenced, so they are visible device-wide
// before its ticket), and the block drawing the last ticket merges every split's. Returns false
// in every other block. The last block resets the counter for the next launch.
__device__ __forceinline__ bool bnv_reduce_grid(const float s1[BNV_C], const float s2[BNV_C], int c0, int C,
                                                float* ws, u32* counter, double a[BNV_C], double b[BNV_C]) {
    __shared__ bool last;
    for (int i = 0; i < BNV_C; ++i) {
        a[i] = s1[i];
        b[i] = s2[i];
    }
    bnv_sum_rows(a, b);
    if (threadIdx.y == 0) {
        for (int i = 0; i < BNV_C; ++i) {
            ws[((u64)blockIdx.y * C + c0 + i) * 2] = (float)a[i];
            ws[((u64)blockIdx.y * C + c0 + i) * 2 + 1] = (float)b[i];
        }
        __threadfence();
    }
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) last = atomicAdd(counter, 1u) == gridDim.y - 1;
    __syncthreads();
    if (!last) return false;
    __threadfence();
    // Volatile: the other blocks' partials, never a stale cached copy.
    const volatile float* w = ws;
    for (int i = 0; i < BNV_C; ++i) a[i] = b[i] = 0.0;
    for (u32 z = threadIdx.y; z < gridDim.y; z += blockDim.y) {
        for (int i = 0; i < BNV_C; ++i) {
            a[i] += w[((u64)z * C + c0 + i) * 2];
            b[i] += w[((u64)z * C + c0 + i) * 2 + 1];
        }
    }
    bnv_sum_rows(a, b);
    if (threadIdx.x == 0 && threadIdx.y == 0) *counter = 0u;
    return true;
}

// Statistics and their finalise: sums of (x - shift) and (x - shift)^2 with shift = x[0][c] (as
// bn_stats_partial), merged by the last block, which writes the saved and running statistics.
template <class A, class S>
__device__ __forceinline__ void bn_vec_stats_impl(const A* x, u64 M, int C, float eps, float momentum, S* save_mean,
                                                  S* save_inv_std, float* running_mean, float* running_var,
                                                  float* ws, u32* counter) {
    int c0 = threadIdx.x * BNV_C;
    float shift[BNV_C], s1[BNV_C] = {}, s2[BNV_C] = {}, v[BNV_C];
    bnv_load(x + c0, shift);
    BNV_ROWS(r, M) {
        bnv_load(x + r * C + c0, v);
        for (int i = 0; i < BNV_C; ++i) {
            float d = v[i] - shift[i];
            s1[i] += d;
            s2[i] += d * d;
        }
    }
    double a[BNV_C], b[BNV_C];
    if (!bnv_reduce_grid(s1, s2, c0, C, ws, counter, a, b) || threadIdx.y != 0) return;
    for (int i = 0; i < BNV_C; ++i)
        bn_channel_stats(a[i], b[i], shift[i], M, c0 + i, eps, momentum, save_mean, save_inv_std, running_mean,
                         running_var);
}

// y = (x - mean) * (gamma * inv_std) + beta, then ReLU if relu != 0; `stat` are the batch
// statistics (training) or, for inference, running mean and 1 / sqrt(running var + eps).
template <class A>
__device__ __forceinline__ void bnv_normalise(const A* x, const float mean[BNV_C], const float scale[BNV_C],
                                              const float beta[BNV_C], u64 M, int C, int relu, A* y, int ldy,
                                              int yoff) {
    int c0 = threadIdx.x * BNV_C;
    float v[BNV_C];
    BNV_ROWS(r, M) {
        bnv_load(x + r * C + c0, v);
        for (int i = 0; i < BNV_C; ++i) {
            v[i] = bnv_affine(v[i], mean[i], scale[i], beta[i]);
            if (relu) v[i] = fmaxf(v[i], 0.0f);
        }
        bnv_store(y + r * ldy + yoff + c0, v);
    }
}

// This thread's channels' mean, inverse std, scale (gamma * inverse std) and beta.
template <class S>
__device__ __forceinline__ void bnv_affine_params(const S* mean, const S* inv_std, const S* gamma, const S* beta,
                                                  float mu[BNV_C], float is[BNV_C], float sc[BNV_C],
                                                  float be[BNV_C]) {
    int c0 = threadIdx.x * BNV_C;
    bnv_channels(mean, c0, mu);
    bnv_channels(inv_std, c0, is);
    bnv_channels(gamma, c0, sc);
    bnv_channels(beta, c0, be);
    for (int i = 0; i < BNV_C; ++i) sc[i] *= is[i];
}

template <class A, class S>
__device__ __forceinline__ void bn_vec_apply_impl(const A* x, const S* mean, const S* inv_std, const S* gamma,
                                                  const S* beta, u64 M, int C, int relu, A* y, int ldy, int yoff) {
    float mu[BNV_C], is[BNV_C], sc[BNV_C], be[BNV_C];
    bnv_affine_params(mean, inv_std, gamma, beta, mu, is, sc, be);
    bnv_normalise(x, mu, sc, be, M, C, relu, y, ldy, yoff);
}

template <class A, class S>
__device__ __forceinline__ void bn_vec_infer_impl(const A* x, const float* running_mean, const float* running_var,
                                                  const S* gamma, const S* beta, float eps, u64 M, int C, int relu,
                                                  A* y, int ldy, int yoff) {
    int c0 = threadIdx.x * BNV_C;
    float mu[BNV_C], sc[BNV_C], be[BNV_C];
    for (int i = 0; i < BNV_C; ++i) {
        mu[i] = running_mean[c0 + i];
        sc[i] = to_f32(gamma[c0 + i]) * rsqrtf(running_var[c0 + i] + eps);
        be[i] = to_f32(beta[c0 + i]);
    }
    bnv_normalise(x, mu, sc, be, M, C, relu, y, ldy, yoff);
}

// dbeta = sum dy_eff, dgamma = sum dy_eff * xhat (as bn_bwd_partial + bn_bwd_finalize), merged by
// the last block straight into the fp32 gradient buffer.
template <class A, class S>
__device__ __forceinline__ void bn_vec_bwd_reduce_impl(const A* x, const A* dy, const S* mean, const S* inv_std,
                                                       const S* gamma, const S* beta, u64 M, int C, int relu,
                                                       int ldy, int yoff, float* dgamma, float* dbeta, float* ws,
                                                       u32* counter) {
    int c0 = threadIdx.x * BNV_C;
    float mu[BNV_C], is[BNV_C], sc[BNV_C], be[BNV_C], xv[BNV_C], g[BNV_C];
    bnv_affine_params(mean, inv_std, gamma, beta, mu, is, sc, be);
    float s1[BNV_C] = {}, s2[BNV_C] = {};
    BNV_ROWS(r, M) {
        bnv_load(x + r * C + c0, xv);
        bnv_load(dy + r * ldy + yoff + c0, g);
        for (int i = 0; i < BNV_C; ++i) {
            if (relu && !bnv_passes<A>(xv[i], mu[i], sc[i], be[i])) g[i] = 0.0f;
            s1[i] += g[i];
            s2[i] += g[i] * (xv[i] - mu[i]) * is[i];
        }
    }
    double a[BNV_C], b[BNV_C];
    if (!bnv_reduce_grid(s1, s2, c0, C, ws, counter, a, b) || threadIdx.y != 0) return;
    for (int i = 0; i < BNV_C; ++i) {
        dbeta[c0 + i] = (float)a[i];
        dgamma[c0 + i] = (float)b[i];
    }
}

// dx = gamma * inv_std * (dy_eff - dbeta / M - xhat * dgamma / M), as bn_bwd_dx (so a channel
// over one row gets exactly 0); accumulate adds into dx.
template <class A, class S>
__device__ __forceinline__ void bn_vec_bwd_dx_impl(const A* x, const A* dy, const S* mean, const S* inv_std,
                                                   const S* gamma, const S* beta, const float* dgamma,
                                                   const float* dbeta, u64 M, int C, int relu, int ldy, int yoff,
                                                   A* dx, int accumulate) {
    int c0 = threadIdx.x * BNV_C;
    float mu[BNV_C], is[BNV_C], sc[BNV_C], be[BNV_C], dg[BNV_C], db[BNV_C], xv[BNV_C], g[BNV_C], old[BNV_C];
    bnv_affine_params(mean, inv_std, gamma, beta, mu, is, sc, be);
    bnv_channels(dgamma, c0, dg);
    bnv_channels(dbeta, c0, db);
    float inv_m = 1.0f / (float)M;
    BNV_ROWS(r, M) {
        bnv_load(x + r * C + c0, xv);
        bnv_load(dy + r * ldy + yoff + c0, g);
        if (accumulate) bnv_load(dx + r * C + c0, old);
        for (int i = 0; i < BNV_C; ++i) {
            if (relu && !bnv_passes<A>(xv[i], mu[i], sc[i], be[i])) g[i] = 0.0f;
            float xhat = (xv[i] - mu[i]) * is[i];
            g[i] = sc[i] * (g[i] - db[i] * inv_m - xhat * dg[i] * inv_m);
            if (accumulate) g[i] += old[i];
        }
        bnv_store(dx + r * C + c0, g);
    }
}

// ---- Entry points of the vectorised path ----

extern "C" __global__ void bn_vec_stats(const __half* x, u64 M, int C, float eps, float momentum, float* save_mean,
                                        float* save_inv_std, float* running_mean, float* running_var, float* ws,
                                        u32* counter) {
    bn_vec_stats_impl(x, M, C, eps, momentum, save_mean, save_inv_std, running_mean, running_var, ws, counter);
}
extern "C" __global__ void bn_vec_stats_o0(const float* x, u64 M, int C, float eps, float momentum,
                                           float* save_mean, float* save_inv_std, float* running_mean,
                                           float* running_var, float* ws, u32* counter) {
    bn_vec_stats_impl(x, M, C, eps, momentum, save_mean, save_inv_std, running_mean, running_var, ws, counter);
}
extern "C" __global__ void bn_vec_stats_o3(const __half* x, u64 M, int C, float eps, float momentum,
                                           __half* save_mean, __half* save_inv_std, float* running_mean,
                                           float* running_var, float* ws, u32* counter) {
    bn_vec_stats_impl(x, M, C, eps, momentum, save_mean, save_inv_std, running_mean, running_var, ws, counter);
}

extern "C" __global__ void bn_vec_apply(const __half* x, const float* mean, const float* inv_std,
                                        const float* gamma, const float* beta, u64 M, int C, int relu, __half* y,
                                        int ldy, int yoff) {
    bn_vec_apply_impl(x, mean, inv_std, gamma, beta, M, C, relu, y, ldy, yoff);
}
extern "C" __global__ void bn_vec_apply_o0(const float* x, const float* mean, const float* inv_std,
                                           const float* gamma, const float* beta, u64 M, int C, int relu, float* y,
                                           int ldy, int yoff) {
    bn_vec_apply_impl(x, mean, inv_std, gamma, beta, M, C, relu, y, ldy, yoff);
}
extern "C" __global__ void bn_vec_apply_o3(const __half* x, const __half* mean, const __half* inv_std,
                                           const __half* gamma, const __half* beta, u64 M, int C, int relu,
                                           __half* y, int ldy, int yoff) {
    bn_vec_apply_impl(x, mean, inv_std, gamma, beta, M, C, relu, y, ldy, yoff);
}

extern "C" __global__ void bn_vec_infer(const __half* x, const float* running_mean, const float* running_var,
                                        const float* gamma, const float* beta, float eps, u64 M, int C, int relu,
                                        __half* y, int ldy, int yoff) {
    bn_vec_infer_impl(x, running_mean, running_var, gamma, beta, eps, M, C, relu, y, ldy, yoff);
}
extern "C" __global__ void bn_vec_infer_o0(const float* x, const float* running_mean, const float* running_var,
                                           const float* gamma, const float* beta, float eps, u64 M, int C,
                                           int relu, float* y, int ldy, int yoff) {
    bn_vec_infer_impl(x, running_mean, running_var, gamma, beta, eps, M, C, relu, y, ldy, yoff);
}
extern "C" __global__ void bn_vec_infer_o3(const __half* x, const float* running_mean, const float* running_var,
                                           const __half* gamma, const __half* beta, float eps, u64 M, int C,
                                           int relu, __half* y, int ldy, int yoff) {
    bn_vec_infer_impl(x, running_mean, running_var, gamma, beta, eps, M, C, relu, y, ldy, yoff);
}

extern "C" __global__ void bn_vec_bwd_reduce(const __half* x, const __half* dy, const float* mean,
                                             const float* inv_std, const float* gamma, const float* beta, u64 M,
                                             int C, int relu, int ldy, int yoff, float* dgamma, float* dbeta,
                                             float* ws, u32* counter) {
    bn_vec_bwd_reduce_impl(x, dy, mean, inv_std, gamma, beta, M, C, relu, ldy, yoff, dgamma, dbeta, ws, counter);
}
extern "C" __global__ void bn_vec_bwd_reduce_o0(const float* x, const float* dy, const float* mean,
                                                const float* inv_std, const float* gamma, const float* beta, u64 M,
                                                int C, int relu, int ldy, int yoff, float* dgamma, float* dbeta,
                                                float* ws, u32* counter) {
    bn_vec_bwd_reduce_impl(x, dy, mean, inv_std, gamma, beta, M, C, relu, ldy, yoff, dgamma, dbeta, ws, counter);
}
extern "C" __global__ void bn_vec_bwd_reduce_o3(const __half* x, const __half* dy, const __half* mean,
                                                const __half* inv_std, const __half* gamma, const __half* beta,
                                                u64 M, int C, int relu, int ldy, int yoff, float* dgamma,
                                                float* dbeta, float* ws, u32* counter) {
    bn_vec_bwd_reduce_impl(x, dy, mean, inv_std, gamma, beta, M, C, relu, ldy, yoff, dgamma, dbeta, ws, counter);
}

extern "C" __global__ void bn_vec_bwd_dx(const __half* x, const __half* dy, const float* mean, const float* inv_std,
                                         const float* gamma, const float* beta, const float* dgamma,
                                         const float* dbeta, u64 M, int C, int relu, int ldy, int yoff, __half* dx,
                                         int accumulate) {
    bn_vec_bwd_dx_impl(x, dy, mean, inv_std, gamma, beta, dgamma, dbeta, M, C, relu, ldy, yoff, dx, accumulate);
}
extern "C" __global__ void bn_vec_bwd_dx_o0(const float* x, const float* dy, const float* mean,
                                            const float* inv_std, const float* gamma, const float* beta,
                                            const float* dgamma, const float* dbeta, u64 M, int C, int relu,
                                            int ldy, int yoff, float* dx, int accumulate) {
    bn_vec_bwd_dx_impl(x, dy, mean, inv_std, gamma, beta, dgamma, dbeta, M, C, relu, ldy, yoff, dx, accumulate);
}
extern "C" __global__ void bn_vec_bwd_dx_o3(const __half* x, const __half* dy, const __half* mean,
                                            const __half* inv_std, const __half* gamma, const __half* beta,
                                            const float* dgamma, const float* dbeta, u64 M, int C, int relu,
                                            int ldy, int yoff, __half* dx, int accumulate) {
    bn_vec_bwd_dx_impl(x, dy, mean, inv_std, gamma, beta, dgamma, dbeta, M, C, relu, ldy, yoff, dx, accumulate);
}
