// Batchnorm helpers shared by batchnorm.cu (the baseline kernels) and batchnorm_vec.cu (the
// vectorised path): the per-channel statistics both finalise with.
#pragma once
#include "common.cuh"

// Channel c's batch mean and inverse std (biased variance, as used for normalising) from the sums
// of (x - shift) and (x - shift)^2, saved for backward; running stats updated with PyTorch's
// convention and the unbiased variance, from the unrounded fp32 mean even when the saved copy is
// fp16.
template <class S>
__device__ __forceinline__ void bn_channel_stats(double s1, double s2, float shift, u64 M, int c, float eps,
                                                 float momentum, S* save_mean, S* save_inv_std, float* running_mean,
                                                 float* running_var) {
    double md = s1 / (double)M;
    double var = s2 / (double)M - md * md;
    if (var < 0.0) var = 0.0;
    float mean = (float)(md + (double)shift);
    save_mean[c] = from_f32<S>(mean);
    // With eps >= 1e-5 the inverse std is at most ~316, well inside fp16's range for O3.
    save_inv_std[c] = from_f32<S>((float)(1.0 / sqrt(var + (double)eps)));
    if (running_mean) {
        double unbiased = M > 1 ? var * (double)M / (double)(M - 1) : var;
        running_mean[c] = (1.0f - momentum) * running_mean[c] + momentum * mean;
        running_var[c] = (1.0f - momentum) * running_var[c] + momentum * (float)unbiased;
    }
}
