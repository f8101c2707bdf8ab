// Channel copies: the copies of a concat whose inputs are not slices of its output, their
// backward, and the stem's zero padding to 8 channels.
#include "common.cuh"

// Copies rows of `c` channels between two row-strided tensors:
// dst[r*dst_ld + dst_off + j] (+)= src[r*src_ld + src_off + j] for j < c, and when zero_to > c also
// zeroes dst channels [c, zero_to). Covers padding the stem to 8 channels (input and weights: both
// are rows of cin), writing a concat slice, and splitting a concat gradient back to its branches.
// Element type A: fp16 in `copy_channels` (O2/O3), fp32 in `copy_channels_o0`.
template <class A>
__device__ __forceinline__ void copy_channels_impl(const A* src, int src_ld, int src_off, A* dst, int dst_ld,
                                                   int dst_off, u64 rows, int c, int zero_to, int accumulate) {
    int width = max(c, zero_to);
    GRID_STRIDE(i, rows * width) {
        int j = (int)(i % width);
        u64 r = i / width;
        A* d = dst + r * dst_ld + dst_off + j;
        if (j < c) {
            store_acc(d, to_f32(src[r * src_ld + src_off + j]), accumulate);
        } else {
            *d = from_f32<A>(0.0f);
        }
    }
}

extern "C" __global__ void copy_channels(const __half* src, int src_ld, int src_off, __half* dst, int dst_ld,
                                         int dst_off, u64 rows, int c, int zero_to, int accumulate) {
    copy_channels_impl(src, src_ld, src_off, dst, dst_ld, dst_off, rows, c, zero_to, accumulate);
}
extern "C" __global__ void copy_channels_o0(const float* src, int src_ld, int src_off, float* dst, int dst_ld,
                                            int dst_off, u64 rows, int c, int zero_to, int accumulate) {
    copy_channels_impl(src, src_ld, src_off, dst, dst_ld, dst_off, rows, c, zero_to, accumulate);
}
