// Softmax cross-entropy with label smoothing, forward and backward in one kernel; one block per
// sample. With q = (1 - eps) * onehot(label) + eps / K:
//   loss_i = logsumexp(z_i) - sum_k q_k z_ik,   dz_ik = (softmax(z_i)_k - q_k) / N * grad_scale
// grad_scale is the loss scale of mixed precision (1 otherwise); when scale_dev is not null the
// scale is read from there instead (the device-resident dynamic scaler). The batch mean is taken by the
// last block to finish (a ticket counter), summing per-sample losses in index order, so the loss
// is deterministic and the whole step is still one launch. `counter` must start at 0; the last
// block resets it.
// Logits and dlogits have the activation type A: fp16 in the unsuffixed entry points (O2/O3),
// fp32 in `_o0`; the losses are fp32 in both.
#include "common.cuh"

template <class A, class L>
__device__ __forceinline__ void softmax_ce(const A* logits, const L* labels, int n, int k, float eps,
                                           float grad_scale, const float* scale_dev, float* row_loss,
                                           float* loss, u32* counter, A* dlogits) {
    if (scale_dev) grad_scale = *scale_dev;
    __shared__ float scratch[32];
    __shared__ bool last;
    int row = blockIdx.x;
    const A* z = logits + (u64)row * k;
    int label = (int)labels[row];
    float mx = -INF_F32, zsum = 0.0f;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        float v = to_f32(z[j]);
        mx = fmaxf(mx, v);
        zsum += v;
    }
    mx = block_max(mx, scratch);
    zsum = block_sum(zsum, scratch);
    float se = 0.0f;
    for (int j = threadIdx.x; j < k; j += blockDim.x) se += __expf(to_f32(z[j]) - mx);
    se = block_sum(se, scratch);
    float lse = mx + logf(se), off = eps / (float)k, inv = 1.0f / se;
    float scale = grad_scale / (float)n;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        float q = off + (j == label ? 1.0f - eps : 0.0f);
        float sm = __expf(to_f32(z[j]) - mx) * inv;
        dlogits[(u64)row * k + j] = from_f32<A>((sm - q) * scale);
    }
    if (threadIdx.x == 0) {
        float zl = (label >= 0 && label < k) ? to_f32(z[label]) : 0.0f;
        row_loss[row] = lse - (1.0f - eps) * zl - off * zsum;
        __threadfence();
        last = atomicAdd(counter, 1u) == (u32)n - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    float s = 0.0f;
    if (threadIdx.x == 0) {
        for (int i = 0; i < n; ++i) s += ((volatile float*)row_loss)[i];
        *loss = s / (float)n;
        *counter = 0u;
    }
}

extern "C" __global__ void softmax_ce_i32(const __half* logits, const int* labels, int n, int k, float eps,
        float grad_scale, const float* scale_dev, float* row_loss, float* loss, u32* counter,
        __half* dlogits) {
    softmax_ce(logits, labels, n, k, eps, grad_scale, scale_dev, row_loss, loss, counter, dlogits);
}
// Labels stored as f32 (the plan keeps every tensor f32 on the host side).
extern "C" __global__ void softmax_ce_f32(const __half* logits, const float* labels, int n, int k, float eps,
        float grad_scale, const float* scale_dev, float* row_loss, float* loss, u32* counter,
        __half* dlogits) {
    softmax_ce(logits, labels, n, k, eps, grad_scale, scale_dev, row_loss, loss, counter, dlogits);
}
extern "C" __global__ void softmax_ce_i32_o0(const float* logits, const int* labels, int n, int k, float eps,
        float grad_scale, const float* scale_dev, float* row_loss, float* loss, u32* counter,
        float* dlogits) {
    softmax_ce(logits, labels, n, k, eps, grad_scale, scale_dev, row_loss, loss, counter, dlogits);
}
extern "C" __global__ void softmax_ce_f32_o0(const float* logits, const float* labels, int n, int k, float eps,
        float grad_scale, const float* scale_dev, float* row_loss, float* loss, u32* counter,
        float* dlogits) {
    softmax_ce(logits, labels, n, k, eps, grad_scale, scale_dev, row_loss, loss, counter, dlogits);
}
