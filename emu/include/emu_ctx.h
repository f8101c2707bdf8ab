// The per-CUDA-thread context, shared by the kernel-side shim (emu_cuda.h) and the runtime.
#pragma once

struct uint3 {
    unsigned x, y, z;
};

struct EmuThreadCtx {
    uint3 threadIdx, blockIdx, blockDim, gridDim;
};
