// The entry points the host-compiled kernels call (emu_cuda.h, kernels/common.cuh's emulated
// branch): __syncthreads, the warp collectives, cp.async, ldmatrix and mma, each blocking the
// calling fiber in the executor (exec.cpp) where the CUDA semantics need it; and the
// ThreadSanitizer hooks through which the racecheck kernels library reports its loads and stores.
#include <cstring>

#include "exec_internal.h"

// ---- The kernel-side entry points (emu_cuda.h, kernels/common.cuh's emulated branch) ----

using namespace emu::detail;

extern "C" void emu_syncthreads(const char* file, int line) {
    Worker* w = tl_worker;
    Thread* th = w->cur;
    if (w->bar_arrived == 0) {
        w->bar_file = file;
        w->bar_line = line;
    } else if (w->bar_line != line || strcmp(w->bar_file, file) != 0) {
        fail(w, "__syncthreads at %s:%d while %d threads wait at %s:%d (barrier divergence)", file, line,
             w->bar_arrived, w->bar_file, w->bar_line);
        yield(w, th);
    }
    th->st = St::AtBarrier;
    if (++w->bar_arrived == w->live) release_barrier(w);
    yield(w, th);
}

extern "C" uint64_t emu_shfl_xor(uint32_t mask, uint64_t bits, int lane_mask, const char* file, int line) {
    Worker* w = tl_worker;
    Thread* th = w->cur;
    if (mask != 0xffffffffu) fail(w, "__shfl_xor_sync with mask 0x%08x at %s:%d: only full warps are emulated", mask, file, line);
    th->in = bits;
    th->lane_mask = lane_mask;
    th->file = file;
    th->line = line;
    warp_arrive(w, K_SHFL, __builtin_return_address(0), [](Worker* w2, Thread* lanes) {
        for (int l = 0; l < 32; ++l) {
            if (lanes[l].lane_mask != lanes[0].lane_mask) {
                fail(w2, "__shfl_xor_sync lanes disagree on the lane mask (%d vs %d)", lanes[l].lane_mask, lanes[0].lane_mask);
                return;
            }
            lanes[l].out = lanes[(l ^ lanes[l].lane_mask) & 31].in;
        }
    });
    return th->out;
}

extern "C" void emu_cp_async16(void* smem, const void* gmem, int valid) {
    Worker* w = tl_worker;
    Thread* th = w->cur;
    if ((reinterpret_cast<uintptr_t>(smem) & 15) || (valid && (reinterpret_cast<uintptr_t>(gmem) & 15))) {
        fail(w, "cp.async with a misaligned address (shared %p, global %p)", smem, gmem);
        return;
    }
    if (!check_shared(w, smem, 16, "cp.async destination")) return;
    if (g_options.racecheck) race_write(w, shared_off(w, smem), 16, "cp.async", true);
    memset(smem, 0xff, 16);
    th->copies.push_back(Copy{static_cast<unsigned char*>(smem), static_cast<const unsigned char*>(gmem), th->committed,
                              valid != 0});
}

extern "C" void emu_cp_async_commit() { ++tl_worker->cur->committed; }

extern "C" void emu_cp_async_wait(int n) {
    Worker* w = tl_worker;
    Thread* th = w->cur;
    // Groups older than the n most recent committed ones must have landed.
    uint32_t c = th->committed;
    perform_copies(w, th, c >= (uint32_t)n ? c - (uint32_t)n : 0);
}

extern "C" void emu_ldmatrix_x4(uint32_t r[4], const void* smem, int trans) {
    Worker* w = tl_worker;
    Thread* th = w->cur;
    if (reinterpret_cast<uintptr_t>(smem) & 15) fail(w, "ldmatrix row address %p is not 16-byte aligned", smem);
    check_shared(w, smem, 16, "ldmatrix row");
    th->addr = smem;
    th->regs = r;
    if (trans)
        warp_arrive(w, K_LDMATRIX_T, __builtin_return_address(0), [](Worker* w2, Thread* l) { compute_ldmatrix(w2, l, true); });
    else
        warp_arrive(w, K_LDMATRIX, __builtin_return_address(0), [](Worker* w2, Thread* l) { compute_ldmatrix(w2, l, false); });
}

extern "C" void emu_mma_16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
    Worker* w = tl_worker;
    Thread* th = w->cur;
    th->c = c;
    th->a = a;
    th->b = b;
    warp_arrive(w, K_MMA, __builtin_return_address(0), compute_mma);
}

// ---- ThreadSanitizer instrumentation hooks (racecheck kernels library only) ----
// The kernels built with -fsanitize=thread call these for every load and store; only accesses to
// this OS thread's shared memory are checked, everything else passes.

namespace {
inline void tsan_access(const void* a, size_t n, bool write) {
    Worker* w = tl_worker;
    if (!w || !w->cur || !g_options.racecheck || !in_shared(w, a, 1)) return;
    if (!check_shared(w, a, n, write ? "store" : "load")) return;
    if (write)
        race_write(w, shared_off(w, a), n, "store", false);
    else
        race_read(w, shared_off(w, a), n, "load");
}
}  // namespace

extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
#define EMU_TSAN_RW(N)                                                                 \
    void __tsan_read##N(void* a) { tsan_access(a, N, false); }                         \
    void __tsan_write##N(void* a) { tsan_access(a, N, true); }                         \
    void __tsan_unaligned_read##N(void* a) { tsan_access(a, N, false); }               \
    void __tsan_unaligned_write##N(void* a) { tsan_access(a, N, true); }               \
    void __tsan_volatile_read##N(void* a) { tsan_access(a, N, false); }                \
    void __tsan_volatile_write##N(void* a) { tsan_access(a, N, true); }
EMU_TSAN_RW(1)
EMU_TSAN_RW(2)
EMU_TSAN_RW(4)
EMU_TSAN_RW(8)
EMU_TSAN_RW(16)
void __tsan_read_range(void* a, unsigned long n) { tsan_access(a, n, false); }
void __tsan_write_range(void* a, unsigned long n) { tsan_access(a, n, true); }
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
#define EMU_TSAN_ATOMIC(N, T)                                                                                   \
    T __tsan_atomic##N##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); }        \
    void __tsan_atomic##N##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); }        \
    T __tsan_atomic##N##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) { return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) { return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST); } \
    T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }   \
    T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) { return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST); } \
    int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) {                         \
        return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                  \
    }                                                                                                           \
    int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) {                           \
        return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                   \
    }                                                                                                           \
    T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {                               \
        __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
        return c;                                                                                               \
    }
EMU_TSAN_ATOMIC(8, uint8_t)
EMU_TSAN_ATOMIC(16, uint16_t)
EMU_TSAN_ATOMIC(32, uint32_t)
EMU_TSAN_ATOMIC(64, uint64_t)
}
