// Softmax cross-entropy with label smoothing, forward and backward in one kernel; one block per
// sample. With q = (1 - eps) * onehot(label) + eps / K:
//   loss_i = logsumexp(z_i) - sum_k q_k z_ik,   dz_ik = (softmax(z_i)_k - q_k) / N * grad_scale
// grad_scale is the loss scale of mixed precision (1 otherwise); when scale_dev is not null the
// scale is read from there instead (the device-resident dynamic scaler). The batch mean is taken by the
// last block to finish (a ticket counter), summing per-sample losses in index order, so the loss
// is deterministic and the whole step is still one launch. `counter` must start at 0; the last
// block resets it.
#include "common.cuh"

template <class L>
__device__ __forceinline__ void softmax_ce(const __half* logits, const L* labels, int n, int k, float eps,
                                           float grad_scale, const float* scale_dev, float* row_loss,
                                           float* loss, u32* counter, __half* dlogits) {
    if (scale_dev) grad_scale = *scale_dev;
    __shared__ float scratch[32];
    __shared__ bool last;
    int row = blockIdx.x;
    const __half* z = logits + (u64)row * k;
    int label = (int)labels[row];
    float mx = -INF_F32, zsum = 0.0f;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        float v = __half2float(z[j]);
        mx = fmaxf(mx, v);
        zsum += v;
    }
    mx = block_max(mx, scratch);
    zsum = block_sum(zsum, scratch);
    float se = 0.0f;
    for (int j = threadIdx.x; j < k; j += blockDim.x) se += __expf(__half2float(z[j]) - mx);
    se = block_sum(se, scratch);
    float lse = mx + logf(se), off = eps / (float)k, inv = 1.0f / se;
    float scale = grad_scale / (float)n;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        float q = off + (j == label ? 1.0f - eps : 0.0f);
        float sm = __expf(__half2float(z[j]) - mx) * inv;
        dlogits[(u64)row * k + j] = __float2half_rn((sm - q) * scale);
    }
    if (threadIdx.x == 0) {
        float zl = (label >= 0 && label < k) ? __half2float(z[label]) : 0.0f;
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
                                          float grad_scale, const float* scale_dev, float* row_loss,
                                          float* loss, u32* counter, __half* dlogits) {
    softmax_ce<int>(logits, labels, n, k, eps, grad_scale, scale_dev, row_loss, loss, counter, dlogits);
}

// Labels stored as f32 (the plan keeps every tensor f32 on the host side).
extern "C" __global__ void softmax_ce_f32(const __half* logits, const float* labels, int n, int k, float eps,
                                          float grad_scale, const float* scale_dev, float* row_loss,
                                          float* loss, u32* counter, __half* dlogits) {
    softmax_ce<float>(logits, labels, n, k, eps, grad_scale, scale_dev, row_loss, loss, counter, dlogits);
}
