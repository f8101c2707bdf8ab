// The executor's internals shared by its two halves: exec.cpp (fibers, the shared-memory race
// shadow, barriers, warp collectives, blocks, the worker pool) and exec_entry.cpp (the entry
// points the host-compiled kernels call, and the ThreadSanitizer hooks).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "emu_ctx.h"
#include "exec.h"

#pragma GCC visibility push(hidden)
namespace emu {
namespace detail {

constexpr size_t STACK_BYTES = 128 * 1024;
constexpr size_t GUARD_BYTES = 4096;
constexpr uint16_t MULTI = 0xffff;

enum class St : uint8_t { NotStarted, Runnable, AtBarrier, AtWarp, Exited };
enum Kind { K_SHFL = 1, K_LDMATRIX, K_LDMATRIX_T, K_MMA };
inline const char* kind_name(int k) {
    switch (k) {
        case K_SHFL: return "__shfl_xor_sync";
        case K_LDMATRIX: return "ldmatrix.x4";
        case K_LDMATRIX_T: return "ldmatrix.x4.trans";
        case K_MMA: return "mma.sync.m16n8k16";
    }
    return "?";
}

struct Copy {
    unsigned char* dst;
    const unsigned char* src;
    uint32_t group;
    bool valid;
};

struct Thread {
    EmuThreadCtx ctx;
    St st = St::NotStarted;
    int tid = 0, lane = 0, warp = 0;
    void* sp = nullptr;
    void* stack = nullptr;
    std::vector<Copy> copies;  // cp.async in flight
    uint32_t committed = 0;    // commit groups closed
    // The warp-collective slot: this lane's operands and where its results go.
    uint64_t in = 0, out = 0;
    int lane_mask = 0;
    const void* addr = nullptr;
    uint32_t* regs = nullptr;
    float* c = nullptr;
    const uint32_t* a = nullptr;
    const uint32_t* b = nullptr;
    const char* file = nullptr;
    int line = 0;
};

struct Warp {
    int kind = 0;
    const void* site = nullptr;
    uint32_t arrived = 0;
    uint32_t exited = 0;
    int nlanes = 0;
};

struct Shadow {
    uint32_t w_stamp, r_stamp;
    uint16_t w_tid, r_tid;
    uint8_t flight;
};

// The state of one OS worker thread: the block it runs and the block's threads.
struct Worker {
    void* sched_sp = nullptr;
    Thread* cur = nullptr;
    const EmuLaunch* L = nullptr;
    EmuDim bid{0, 0, 0};
    std::vector<Thread> threads;
    std::vector<Warp> warps;
    int live = 0;
    int bar_arrived = 0;
    const char* bar_file = nullptr;
    int bar_line = 0;
    std::string error;
    std::vector<void*> free_stacks;
    // This OS thread's shared memory: the kernels library's thread-local block, smem_raw in it.
    unsigned char* tls_lo = nullptr;
    size_t tls_size = 0;
    unsigned char* smem = nullptr;
    size_t smem_cap = 0;
    // Race checking.
    std::vector<Shadow> shadow;
    uint32_t stamp = 0, block_stamp = 0;
};

extern thread_local Worker* tl_worker;
extern Options g_options;

// Records the block's first error, prefixed with where it happened. The block is abandoned.
void fail(Worker* w, const char* fmt, ...);
void yield(Worker* w, Thread* th);
bool in_shared(Worker* w, const void* p, size_t n);
// Offsets into smem_raw beyond the launch's dynamic shared memory are not the block's.
bool check_shared(Worker* w, const void* p, size_t n, const char* what);
void race_read(Worker* w, size_t off, size_t n, const char* what);
void race_write(Worker* w, size_t off, size_t n, const char* what, bool async);
size_t shared_off(Worker* w, const void* p);
void release_barrier(Worker* w);
void perform_copies(Worker* w, Thread* th, uint32_t older_than);
using Compute = void (*)(Worker*, Thread* lanes);
void warp_arrive(Worker* w, int kind, const void* site, Compute compute);
void compute_ldmatrix(Worker* w, Thread* lanes, bool trans);
void compute_mma(Worker*, Thread* lanes);

}  // namespace detail
}  // namespace emu
#pragma GCC visibility pop
