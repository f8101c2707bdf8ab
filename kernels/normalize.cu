// The u8 RGB batch (NHWC, channel fastest) into f32: x * mul[c] + add[c], the CPU reference's
// two constants per channel (src/ops/normalize). The multiply and add are rounded separately
// (no contraction into an FMA) so the result equals the CPU's bit for bit.
#include "common.cuh"

extern "C" __global__ void normalize_u8_f32(const unsigned char* src, u64 count, float m0, float m1,
                                            float m2, float a0, float a1, float a2, float* dst) {
    GRID_STRIDE(i, count) {
        unsigned c = (unsigned)(i % 3);
        float m = c == 0 ? m0 : (c == 1 ? m1 : m2);
        float a = c == 0 ? a0 : (c == 1 ? a1 : a2);
        dst[i] = __fadd_rn(__fmul_rn((float)src[i], m), a);
    }
}
