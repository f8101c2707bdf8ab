// Force-included (g++ -include) before every kernels/*.cu when the kernels are compiled for the
// emulated GPU: the CUDA language built-ins that NVRTC provides implicitly, mapped onto the
// emulator runtime (emu/runtime, exported by the emulated driver library).
//
// - every CUDA thread is a fiber; the threads of a block run on one OS thread, so `__shared__`
//   variables are `thread_local` (a block-scope thread_local is static: one copy per OS thread,
//   i.e. per block in flight), and dynamic shared memory is the thread_local `smem_raw` defined
//   in emu/runtime/kernels_tls.cpp;
// - threadIdx and friends read the current fiber's context; barriers and warp collectives switch
//   fibers inside the runtime, which also checks them (divergence, deadlock, mixed collectives);
// - the five inline-PTX wrappers of kernels/common.cuh call emu_* functions instead (its one
//   `#ifdef INCEPTION_EMULATED_GPU` branch).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define INCEPTION_EMULATED_GPU 1

#include "emu_ctx.h"
typedef uint3 dim3;

// The context of the running CUDA thread; the runtime points emu_ctx at it on every switch.
extern thread_local EmuThreadCtx* emu_ctx;

extern "C" {
void emu_syncthreads(const char* file, int line);
uint64_t emu_shfl_xor(uint32_t mask, uint64_t bits, int lane_mask, const char* file, int line);
void emu_cp_async16(void* smem, const void* gmem, int valid);
void emu_cp_async_commit();
void emu_cp_async_wait(int n);
void emu_ldmatrix_x4(uint32_t r[4], const void* smem, int trans);
void emu_mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]);
}

#ifndef INCEPTION_EMU_SCAN
#define __global__
#define __launch_bounds__(...)
#else
// The registry scan (emu/src/builder.rs) preprocesses each source with these left as markers.
#define __global__ __emu_kernel__
#define __launch_bounds__(...) __emu_launch_bounds__(__VA_ARGS__)
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))

#define threadIdx (emu_ctx->threadIdx)
#define blockIdx (emu_ctx->blockIdx)
#define blockDim (emu_ctx->blockDim)
#define gridDim (emu_ctx->gridDim)

#define __syncthreads() emu_syncthreads(__FILE__, __LINE__)

template <class T>
inline T emu_shfl_xor_typed(uint32_t mask, T v, int lane_mask, const char* file, int line) {
    static_assert(sizeof(T) <= 8, "shuffle of at most 64 bits");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    bits = emu_shfl_xor(mask, bits, lane_mask, file, line);
    T out;
    std::memcpy(&out, &bits, sizeof(T));
    return out;
}
#define __shfl_xor_sync(mask, v, lane_mask) emu_shfl_xor_typed(mask, v, lane_mask, __FILE__, __LINE__)

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __expf(float x) { return std::exp(x); }
// Separately rounded multiply and add (a host compiler must not fuse them either: volatile).
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::isfinite;
using std::sqrt;
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
