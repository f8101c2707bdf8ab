// Part of the kernels library (not the driver): the registry table and the dynamic shared memory.
// This library's thread-local block holds exactly the kernels' shared memory (`smem_raw` below
// and every static `__shared__` variable, which emu_cuda.h makes thread_local), so the runtime can
// poison it per block and the race checker can tell shared accesses from the rest.
#include <vector>

#include "registry.h"

// sm_90's largest shared memory per block (227 KiB, with the opt-in attribute).
static constexpr size_t SMEM_MAX = 232448;

__attribute__((aligned(128))) thread_local unsigned char smem_raw[SMEM_MAX];

static std::vector<const EmuKernel*>& table() {
    static std::vector<const EmuKernel*> t;
    return t;
}

void emu_reg::add(const EmuKernel* k) { table().push_back(k); }

extern "C" const EmuKernel* const* emu_kernel_table(int* count) {
    *count = (int)table().size();
    return table().data();
}

extern "C" void* emu_smem_raw() { return smem_raw; }
extern "C" size_t emu_smem_raw_size() { return SMEM_MAX; }

extern "C" const char* emu_kernels_flavour() {
#ifdef INCEPTION_EMU_RACECHECK
    return "racecheck";
#else
    return "plain";
#endif
}
