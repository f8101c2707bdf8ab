// The emulated GPU's cuda_fp16.h: __half and __half2 for host-compiled kernels, on the x86 F16C
// conversions (vcvtps2ph / vcvtph2ps, built with -march=x86-64-v3). Only what kernels/ uses is
// here; arithmetic on __half goes through float, as the kernels already do.
#pragma once
#include <immintrin.h>
#include <cstdint>

struct __half {
    uint16_t bits;
    __half() = default;
    // The value conversion CUDA's __half has; kernels write (float)h.
    operator float() const { return _cvtsh_ss(bits); }
};

struct __half2 {
    __half x, y;
};

struct float2 {
    float x, y;
};

inline float2 make_float2(float x, float y) { return float2{x, y}; }

inline __half __float2half_rn(float f) {
    __half h;
    h.bits = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return h;
}
inline float __half2float(__half h) { return _cvtsh_ss(h.bits); }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline float2 __half22float2(__half2 h) { return float2{__half2float(h.x), __half2float(h.y)}; }
