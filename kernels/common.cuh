// Shared helpers for every kernel file: types, fp16/fp32 conversion helpers, the convolution
// parameter block, PTX wrappers for the tensor-core path (cp.async, ldmatrix, mma.sync) and the
// dropout RNG.
//
// Precision variants. A kernel that exists at several AMP levels is one template instantiated by
// several extern "C" entry points: the unsuffixed name is O2 (fp16 activations, fp32 BN parameters
// and statistics), `_o0` takes fp32 activations and gradients, `_o3` (BN only) fp16 gamma/beta and
// saved statistics. Templates are over the activation type A and, for BN, the parameter/statistic
// type S; arithmetic is fp32 in every variant. The launchers pick the entry point from
// `CudaBackend::amp`.
//
// Compiled by NVRTC at run time (see src/gpu/nvrtc.rs); only cuda_fp16.h is included, so
// the sources need no CUDA toolkit beyond the pinned NVRTC wheels.
#pragma once
#include <cuda_fp16.h>

typedef unsigned long long u64;
typedef unsigned int u32;

// NVRTC has no <math.h>; the bit pattern of +inf in fp32.
#define INF_F32 __int_as_float(0x7f800000)

// One parameter block for every convolution kernel (fprop, dgrad, wgrad; tensor-core and plain).
// Mirrored field for field by `ConvParams` in src/ops/conv/cuda.rs: keep the two in sync.
// Tensors are NHWC; weights [cout][kh][kw][cin]. The tensor pointers are untyped because the same
// block carries fp16 tensors (tensor-core kernels, plain O2) and fp32 ones (plain `_o0` variants);
// kernels read them through conv_x/conv_w/conv_dy/conv_out with their element type.
struct ConvParams {
    const void* x;     // input activations [n][h][w][cin]
    const void* w;     // weights [cout][kh][kw][cin]
    const void* dy;    // output gradient [n][oh][ow][cout]
    void* out;         // fprop: y, dgrad: dx (row stride ldc, channel offset c_offset)
    float* ws;         // wgrad: fp32 split-K partials [splits][cout][kh*kw*cin]
    int n, h, w_, cin, cout, kh, kw, stride, pad_top, pad_left, oh, ow;
    int ldc;           // elements between rows (pixels) of `out`: lets a branch write a concat slice
    int c_offset;      // first channel of `out` this conv writes
    int accumulate;    // 1: out += result (a tensor feeding several branches sums its gradients)
    int k_tiles_per_split;  // wgrad: K tiles handled by one blockIdx.z (tensor-core path)
};

template <class A>
__device__ __forceinline__ const A* conv_x(const ConvParams& p) { return (const A*)p.x; }
template <class A>
__device__ __forceinline__ const A* conv_w(const ConvParams& p) { return (const A*)p.w; }
template <class A>
__device__ __forceinline__ const A* conv_dy(const ConvParams& p) { return (const A*)p.dy; }
template <class A>
__device__ __forceinline__ A* conv_out(const ConvParams& p) { return (A*)p.out; }

// Element <-> fp32 conversions for the templated kernels (A or S is float or __half).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
template <class T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }

// Stores a result, adding the old value when accumulating (fp32 sum, one rounding to T).
template <class T>
__device__ __forceinline__ void store_acc(T* p, float v, int accumulate) {
    if (accumulate) v += to_f32(*p);
    *p = from_f32<T>(v);
}
__device__ __forceinline__ void store_half(__half* p, float v, int accumulate) { store_acc(p, v, accumulate); }

#ifdef INCEPTION_EMULATED_GPU
// The emulated GPU (emu/, host-compiled kernels): the same six operations, performed by the
// emulator runtime with the PTX ISA's semantics (zero-fill, commit groups, fragment layouts).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) { emu_cp_async16(smem, gmem, valid); }
__device__ __forceinline__ void cp_async_commit() { emu_cp_async_commit(); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { emu_cp_async_wait(N); }
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void* smem) { emu_ldmatrix_x4(r, smem, 0); }
__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], const void* smem) { emu_ldmatrix_x4(r, smem, 1); }
__device__ __forceinline__ void mma_16816(float c[4], const u32 a[4], const u32 b[2]) { emu_mma_16816(c, a, b); }
#else
// 16-byte asynchronous global->shared copy; zero-fills the destination when !valid (src-size 0),
// which is how padding and out-of-range rows of the implicit GEMM become zeros for free.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    u32 s = (u32)__cvta_generic_to_shared(smem);
    int bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void* smem) {
    u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], const void* smem) {
    u32 s = (u32)__cvta_generic_to_shared(smem);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s));
}

// D = A(16x16, row) * B(16x8, col) + D with fp16 inputs and fp32 accumulation.
__device__ __forceinline__ void mma_16816(float c[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// Block-wide sum of one float per thread; every thread gets the total. `scratch` holds 32 floats.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nwarps ? scratch[lane] : -INF_F32;
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    return t;
}

// Counter-based dropout RNG, bit-identical to the CPU reference:
// h = splitmix64_finalize(seed * 0x9E3779B97F4A7C15 ^ step * 0xD1B54A32D192ED03 ^ index),
// u = (h >> 40) / 2^24, keep iff u >= p.
__device__ __forceinline__ u64 splitmix64_finalize(u64 z) {
    z ^= z >> 30;
    z *= 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    z *= 0x94D049BB133111EBull;
    z ^= z >> 31;
    return z;
}
__device__ __forceinline__ bool dropout_keep(u64 seed, u64 step, u64 index, float p) {
    u64 h = splitmix64_finalize((seed * 0x9E3779B97F4A7C15ull) ^ (step * 0xD1B54A32D192ED03ull) ^ index);
    float u = (float)(h >> 40) * (1.0f / 16777216.0f);
    return u >= p;
}

// Grid-stride loop over [0, n) with 32-bit indices. The launchers refuse n > 2^31 (InceptionV4's
// largest tensor at batch 128 has 177M elements), so i never wraps; 32-bit indices keep the
// per-element channel division/modulo several times cheaper than 64-bit. Address offsets that can
// exceed 2^32 are still formed in 64 bits.
#define GRID_STRIDE(i, n) \
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < (u32)(n); i += gridDim.x * blockDim.x)
