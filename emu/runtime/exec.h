// Grid execution on the CPU: the interface between the driver API (driver.cpp, driver_launch.cpp)
// and the executor (exec.cpp, exec_entry.cpp: fibers, barriers, warp collectives, cp.async,
// shared-memory race checking).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "registry.h"

struct EmuDim {
    unsigned x, y, z;
};

// One kernel launch with its parameters copied (the caller's argument storage dies at return).
struct EmuLaunch {
    const EmuKernel* kernel;
    std::string name;
    EmuDim grid, block;
    unsigned dyn_smem;
    std::vector<uint64_t> storage;  // 16-byte aligned slots, one or more per parameter
    std::vector<void*> args;        // pointers into storage, one per parameter
};

namespace emu {

// How the threads of a block are interleaved (INCEPTION_EMU_SCHEDULE): each pass resumes every
// runnable thread once, in index order, in reverse, or in a seeded random order.
enum class Schedule { RoundRobin, Reverse, Random };

struct Options {
    Schedule schedule = Schedule::RoundRobin;
    uint64_t seed = 1;
    bool racecheck = false;
    int threads = 0;  // OS worker threads; 0 = one per core
};

const Options& options();

// Runs every block of the launch to completion. Returns "" on success, else the first error
// (barrier divergence, deadlock, a bad collective, a shared-memory race, ...).
std::string run_grid(const EmuLaunch& launch);

// The kernels library's handles, set up by the driver at cuInit.
void set_kernels_library(void* handle);

}  // namespace emu
