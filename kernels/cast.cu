// fp32 <-> fp16 casts (round to nearest even): the staged batch into the fp16 input tensor, and
// device tensors read back.
#include "common.cuh"

extern "C" __global__ void cast_f32_to_f16(const float* src, u64 count, __half* dst) {
    GRID_STRIDE(i, count) dst[i] = __float2half_rn(src[i]);
}
extern "C" __global__ void cast_f16_to_f32(const __half* src, u64 count, float* dst) {
    GRID_STRIDE(i, count) dst[i] = __half2float(src[i]);
}
