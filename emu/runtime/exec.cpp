// The executor of the emulated GPU: runs a grid of host-compiled kernel blocks.
//
// - Every CUDA thread is a fiber with its own stack (a hand-written context switch: glibc's
//   ucontext saves the signal mask with a system call and is an order of magnitude slower).
//   The threads of a block run on one OS thread, one block after another; several OS threads
//   share a grid.
// - A thread runs until it blocks: at __syncthreads (arrival counting; exited threads count as
//   arrived; all threads must wait at the same call site) or at a warp collective (shfl,
//   ldmatrix, mma: computed when all 32 lanes have arrived, lanes must be at the same one).
//   A pass of the scheduler resumes every runnable thread once, in the order INCEPTION_EMU_SCHEDULE
//   asks for; a pass that resumes nobody while threads are alive is a deadlock.
// - cp.async copies are queued per thread and performed at the cp.async.wait_group that covers
//   them; the destination is poisoned (0xFF bytes: NaN in fp16 and fp32) at issue, so a read
//   before the wait shows. Shared memory is poisoned at each block start.
// - With INCEPTION_EMU_RACECHECK=1, every shared-memory access is checked against a shadow that
//   records, per byte, the last writer and reader in the current barrier epoch and whether a
//   cp.async is in flight to it: read-after-write, write-after-read and write-after-write between
//   different threads without a barrier in between are reported, as are reads of shared memory
//   never written in the block. The kernels' plain loads and stores reach the checker through
//   the compiler's ThreadSanitizer instrumentation hooks (__tsan_read4 & co., defined below: the
//   TSan runtime itself is not used); cp.async and ldmatrix report their accesses directly.
#include "exec.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "emu_ctx.h"
#include "exec_internal.h"

// Read by the kernels (emu_cuda.h: threadIdx, blockIdx, ...); points at the running fiber's context.
thread_local EmuThreadCtx* emu_ctx = nullptr;

extern "C" __attribute__((visibility("hidden"))) void emu_switch(void** save_sp, void* to_sp);
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save_sp,
// switches to to_sp and restores the registers saved there (System V x86-64).
asm(R"(
.text
.globl emu_switch
.hidden emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch,.-emu_switch
)");

namespace emu {
namespace detail {

thread_local Worker* tl_worker = nullptr;
void* g_kernels = nullptr;
Options g_options;

std::string vformat(const char* fmt, va_list ap) {
    char buf[1024];
    vsnprintf(buf, sizeof buf, fmt, ap);
    return buf;
}

// Records the block's first error, prefixed with where it happened. The block is abandoned.
void fail(Worker* w, const char* fmt, ...) {
    if (!w->error.empty()) return;
    va_list ap;
    va_start(ap, fmt);
    std::string msg = vformat(fmt, ap);
    va_end(ap);
    char where[256];
    if (w->cur) {
        const uint3& t = w->cur->ctx.threadIdx;
        snprintf(where, sizeof where, "%s block (%u,%u,%u) thread (%u,%u,%u): ", w->L->name.c_str(), w->bid.x,
                 w->bid.y, w->bid.z, t.x, t.y, t.z);
    } else {
        snprintf(where, sizeof where, "%s block (%u,%u,%u): ", w->L->name.c_str(), w->bid.x, w->bid.y, w->bid.z);
    }
    w->error = where + msg;
}

void* new_stack(Worker* w) {
    if (!w->free_stacks.empty()) {
        void* s = w->free_stacks.back();
        w->free_stacks.pop_back();
        return s;
    }
    void* m = mmap(nullptr, STACK_BYTES + GUARD_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
        fprintf(stderr, "emulated GPU: out of memory for fiber stacks\n");
        abort();
    }
    mprotect(m, GUARD_BYTES, PROT_NONE);  // a stack overflow faults instead of corrupting memory
    return m;
}

// ---- Fibers ----

void thread_exit(Worker* w, Thread* th);

void fiber_entry() {
    Worker* w = tl_worker;
    w->L->kernel->invoke(w->L->args.data());
    thread_exit(w, w->cur);
    __builtin_unreachable();
}

void yield(Worker* w, Thread* th) { emu_switch(&th->sp, w->sched_sp); }

void resume(Worker* w, Thread* th) {
    if (th->st == St::NotStarted) {
        th->stack = new_stack(w);
        auto* sp = reinterpret_cast<uint64_t*>(static_cast<unsigned char*>(th->stack) + GUARD_BYTES + STACK_BYTES);
        *--sp = 0;  // fiber_entry's (absent) return address keeps the ABI's stack alignment
        *--sp = reinterpret_cast<uint64_t>(&fiber_entry);
        for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp rbx r12-r15
        th->sp = sp;
        th->st = St::Runnable;
    }
    w->cur = th;
    emu_ctx = &th->ctx;
    emu_switch(&w->sched_sp, th->sp);
    w->cur = nullptr;
    if (th->st == St::Exited && th->stack) {
        w->free_stacks.push_back(th->stack);
        th->stack = nullptr;
    }
}

// ---- Shared memory and its race shadow ----

bool in_shared(Worker* w, const void* p, size_t n) {
    auto a = reinterpret_cast<const unsigned char*>(p);
    return a >= w->tls_lo && a + n <= w->tls_lo + w->tls_size;
}

// Offsets into smem_raw beyond the launch's dynamic shared memory are not the block's.
bool check_shared(Worker* w, const void* p, size_t n, const char* what) {
    auto a = reinterpret_cast<const unsigned char*>(p);
    if (!in_shared(w, p, n)) {
        fail(w, "%s address %p is not in shared memory", what, p);
        return false;
    }
    if (a >= w->smem && a < w->smem + w->smem_cap && a + n > w->smem + w->L->dyn_smem) {
        fail(w, "%s at dynamic shared offset %zu (+%zu bytes) is beyond the launch's %u bytes", what,
             (size_t)(a - w->smem), n, w->L->dyn_smem);
        return false;
    }
    return true;
}

std::string shared_name(Worker* w, size_t off) {
    char buf[96];
    auto a = w->tls_lo + off;
    if (a >= w->smem && a < w->smem + w->smem_cap)
        snprintf(buf, sizeof buf, "dynamic shared byte %zu", (size_t)(a - w->smem));
    else
        snprintf(buf, sizeof buf, "static __shared__ byte %zu", off);
    return buf;
}

void race_read(Worker* w, size_t off, size_t n, const char* what) {
    int t = w->cur->tid;
    for (size_t i = 0; i < n; ++i) {
        Shadow& s = w->shadow[off + i];
        if (s.flight) {
            fail(w, "%s reads %s while thread %d's cp.async to it is in flight (no covering cp.async.wait_group)",
                 what, shared_name(w, off + i).c_str(), s.w_tid);
            return;
        }
        if (s.w_stamp < w->block_stamp) {
            fail(w, "%s reads %s, never written in this block", what, shared_name(w, off + i).c_str());
            return;
        }
        if (s.w_stamp == w->stamp && s.w_tid != t) {
            fail(w, "race: %s reads %s written by thread %d since the last barrier (read after write)", what,
                 shared_name(w, off + i).c_str(), s.w_tid);
            return;
        }
        if (s.r_stamp == w->stamp) {
            if (s.r_tid != t) s.r_tid = MULTI;
        } else {
            s.r_stamp = w->stamp;
            s.r_tid = (uint16_t)t;
        }
    }
}

void race_write(Worker* w, size_t off, size_t n, const char* what, bool async) {
    int t = w->cur->tid;
    for (size_t i = 0; i < n; ++i) {
        Shadow& s = w->shadow[off + i];
        if (s.flight) {
            fail(w, "%s writes %s while thread %d's cp.async to it is in flight", what,
                 shared_name(w, off + i).c_str(), s.w_tid);
            return;
        }
        if (s.w_stamp == w->stamp && s.w_tid != t) {
            fail(w, "race: %s writes %s also written by thread %d since the last barrier (write after write)", what,
                 shared_name(w, off + i).c_str(), s.w_tid);
            return;
        }
        if (s.r_stamp == w->stamp && s.r_tid != t) {
            if (s.r_tid == MULTI)
                fail(w, "race: %s writes %s read by other threads since the last barrier (write after read)", what,
                     shared_name(w, off + i).c_str());
            else
                fail(w, "race: %s writes %s read by thread %d since the last barrier (write after read)", what,
                     shared_name(w, off + i).c_str(), s.r_tid);
            return;
        }
        s.w_stamp = w->stamp;
        s.w_tid = (uint16_t)t;
        s.flight = async;
    }
}

// The landing of a cp.async at its wait: written now, by the issuing thread.
void race_land(Worker* w, size_t off, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        Shadow& s = w->shadow[off + i];
        s.flight = 0;
        s.w_stamp = w->stamp;
        s.w_tid = (uint16_t)w->cur->tid;
    }
}

size_t shared_off(Worker* w, const void* p) { return (size_t)(reinterpret_cast<const unsigned char*>(p) - w->tls_lo); }

// ---- Barriers and collectives ----

void release_barrier(Worker* w) {
    for (Thread& t : w->threads)
        if (t.st == St::AtBarrier) t.st = St::Runnable;
    w->bar_arrived = 0;
    ++w->stamp;  // a new epoch for the race checker
}

void perform_copies(Worker* w, Thread* th, uint32_t older_than) {
    size_t keep = 0;
    for (size_t i = 0; i < th->copies.size(); ++i) {
        Copy& c = th->copies[i];
        if (c.group < older_than) {
            if (c.valid)
                memcpy(c.dst, c.src, 16);
            else
                memset(c.dst, 0, 16);
            if (g_options.racecheck) race_land(w, shared_off(w, c.dst), 16);
        } else {
            th->copies[keep++] = c;
        }
    }
    th->copies.resize(keep);
}

void thread_exit(Worker* w, Thread* th) {
    perform_copies(w, th, UINT32_MAX);
    th->st = St::Exited;
    --w->live;
    Warp& wp = w->warps[th->warp];
    wp.exited |= 1u << th->lane;
    if (wp.arrived)
        fail(w, "exits while lanes 0x%08x of its warp wait at %s", wp.arrived, kind_name(wp.kind));
    if (w->bar_arrived > 0 && w->bar_arrived == w->live) release_barrier(w);
    yield(w, th);
}


// One lane's arrival at a warp collective; the last of the 32 computes it for all.
void warp_arrive(Worker* w, int kind, const void* site, Compute compute) {
    Thread* th = w->cur;
    Warp& wp = w->warps[th->warp];
    if (wp.nlanes != 32) {
        fail(w, "%s in a warp of %d threads: the collective needs all 32 lanes", kind_name(kind), wp.nlanes);
    } else if (wp.exited) {
        fail(w, "%s while lanes 0x%08x of the warp have exited", kind_name(kind), wp.exited);
    } else if (wp.arrived && (wp.kind != kind || wp.site != site)) {
        fail(w, "lane %d reaches %s while lanes 0x%08x wait at %s%s (a warp must run the same collective)",
             th->lane, kind_name(kind), wp.arrived, kind_name(wp.kind), wp.kind == kind ? " of another call site" : "");
    } else {
        if (!wp.arrived) {
            wp.kind = kind;
            wp.site = site;
        }
        wp.arrived |= 1u << th->lane;
        th->st = St::AtWarp;
        if (wp.arrived == 0xffffffffu) {
            Thread* lanes = &w->threads[th->warp * 32];
            compute(w, lanes);
            for (int l = 0; l < 32; ++l) lanes[l].st = St::Runnable;
            wp.arrived = 0;
        }
    }
    yield(w, th);
}

uint16_t load_b16(const void* row, int col) {
    uint16_t v;
    memcpy(&v, static_cast<const unsigned char*>(row) + 2 * col, 2);
    return v;
}

void compute_ldmatrix(Worker* w, Thread* lanes, bool trans) {
    if (g_options.racecheck)
        for (int l = 0; l < 32; ++l) {
            w->cur = &lanes[l];
            race_read(w, shared_off(w, lanes[l].addr), 16, "ldmatrix");
        }
    for (int l = 0; l < 32; ++l) {
        int g = l / 4, t = l % 4;
        for (int j = 0; j < 4; ++j) {
            uint16_t lo, hi;
            if (!trans) {
                const void* row = lanes[8 * j + g].addr;
                lo = load_b16(row, 2 * t);
                hi = load_b16(row, 2 * t + 1);
            } else {
                lo = load_b16(lanes[8 * j + 2 * t].addr, g);
                hi = load_b16(lanes[8 * j + 2 * t + 1].addr, g);
            }
            lanes[l].regs[j] = (uint32_t)lo | ((uint32_t)hi << 16);
        }
    }
}

float half_to_float(uint32_t reg, int hi) {
    uint16_t h = (uint16_t)(hi ? reg >> 16 : reg & 0xffff);
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp == 0) {
        float f = (float)man * (1.0f / 16777216.0f);  // subnormal: man * 2^-24
        return sign ? -f : f;
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

// D = A * B + C for m16n8k16 with the PTX ISA's fragment layouts (g = lane / 4, t = lane % 4,
// element i = 2 * register + half): A[g + 8 * ((i / 2) % 2)][2t + i % 2 + 8 * (i / 4)],
// B[k = 2t + i % 2 + 8 * (i / 2)][n = g], C[g + 8 * (i / 2)][2t + i % 2]. Products of fp16 values
// are exact in fp32; the sum is accumulated in fp32 in k order.
void compute_mma(Worker*, Thread* lanes) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        int g = l / 4, t = l % 4;
        for (int i = 0; i < 8; ++i) A[g + 8 * ((i / 2) % 2)][2 * t + i % 2 + 8 * (i / 4)] = half_to_float(lanes[l].a[i / 2], i % 2);
        for (int i = 0; i < 4; ++i) B[2 * t + i % 2 + 8 * (i / 2)][g] = half_to_float(lanes[l].b[i / 2], i % 2);
        for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + i % 2] = lanes[l].c[i];
    }
    for (int m = 0; m < 16; ++m)
        for (int n = 0; n < 8; ++n) {
            float acc = C[m][n];
            for (int k = 0; k < 16; ++k) acc += A[m][k] * B[k][n];
            C[m][n] = acc;
        }
    for (int l = 0; l < 32; ++l) {
        int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) lanes[l].c[i] = C[g + 8 * (i / 2)][2 * t + i % 2];
    }
}

// ---- Blocks ----

uint64_t mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

std::string deadlock_report(Worker* w) {
    int at_bar = 0, at_warp = 0, exited = 0;
    for (Thread& t : w->threads) {
        at_bar += t.st == St::AtBarrier;
        at_warp += t.st == St::AtWarp;
        exited += t.st == St::Exited;
    }
    char buf[512];
    snprintf(buf, sizeof buf,
             "deadlock: %d threads wait at __syncthreads (%s:%d), %d at warp collectives, %d exited, of %zu", at_bar,
             w->bar_file ? w->bar_file : "-", w->bar_line, at_warp, exited, w->threads.size());
    return buf;
}

void setup_shared(Worker* w) {
    if (w->tls_lo) return;
    // The kernels library's accessors (it is loaded after this library, so looked up by name).
    auto smem_raw = reinterpret_cast<void* (*)()>(dlsym(g_kernels, "emu_smem_raw"));
    auto smem_size = reinterpret_cast<size_t (*)()>(dlsym(g_kernels, "emu_smem_raw_size"));
    void* raw = smem_raw();  // allocates this thread's TLS block of the kernels library
    size_t modid = 0;
    dlinfo(g_kernels, RTLD_DI_TLS_MODID, &modid);
    struct Find {
        size_t modid;
        unsigned char* lo;
        size_t size;
    } find{modid, nullptr, 0};
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* data) {
            auto* f = static_cast<Find*>(data);
            if (info->dlpi_tls_modid != f->modid) return 0;
            for (int i = 0; i < info->dlpi_phnum; ++i)
                if (info->dlpi_phdr[i].p_type == PT_TLS) f->size = info->dlpi_phdr[i].p_memsz;
            f->lo = static_cast<unsigned char*>(info->dlpi_tls_data);
            return 1;
        },
        &find);
    w->smem = static_cast<unsigned char*>(raw);
    w->smem_cap = smem_size();
    if (find.lo && find.size) {
        w->tls_lo = find.lo;
        w->tls_size = find.size;
    } else {  // fall back to smem_raw alone
        w->tls_lo = w->smem;
        w->tls_size = w->smem_cap;
    }
    if (g_options.racecheck) w->shadow.assign(w->tls_size, Shadow{0, 0, 0, 0, 0});
}

void run_block(Worker* w, const EmuLaunch& L, uint64_t linear) {
    setup_shared(w);
    w->L = &L;
    w->bid = {(unsigned)(linear % L.grid.x), (unsigned)(linear / L.grid.x % L.grid.y),
              (unsigned)(linear / ((uint64_t)L.grid.x * L.grid.y))};
    int n = (int)(L.block.x * L.block.y * L.block.z);
    w->threads.assign(n, Thread{});
    w->warps.assign((n + 31) / 32, Warp{});
    for (int i = 0; i < n; ++i) {
        Thread& t = w->threads[i];
        t.tid = i;
        t.lane = i % 32;
        t.warp = i / 32;
        t.ctx.threadIdx = {(unsigned)(i % L.block.x), (unsigned)(i / L.block.x % L.block.y),
                           (unsigned)(i / (L.block.x * L.block.y))};
        t.ctx.blockIdx = {w->bid.x, w->bid.y, w->bid.z};
        t.ctx.blockDim = {L.block.x, L.block.y, L.block.z};
        t.ctx.gridDim = {L.grid.x, L.grid.y, L.grid.z};
        w->warps[i / 32].nlanes++;
    }
    w->live = n;
    w->bar_arrived = 0;
    w->bar_file = nullptr;
    w->error.clear();
    // Fresh, poisoned shared memory: the static __shared__ variables and the launch's dynamic part.
    memset(w->tls_lo, 0xff, (size_t)(w->smem - w->tls_lo));
    memset(w->smem + w->smem_cap, 0xff, (size_t)(w->tls_lo + w->tls_size - (w->smem + w->smem_cap)));
    memset(w->smem, 0xff, L.dyn_smem);
    w->block_stamp = ++w->stamp;

    std::vector<int> order(n);
    for (uint64_t pass = 0; w->live > 0 && w->error.empty(); ++pass) {
        for (int i = 0; i < n; ++i) order[i] = g_options.schedule == Schedule::Reverse ? n - 1 - i : i;
        if (g_options.schedule == Schedule::Random) {
            uint64_t s = mix(g_options.seed ^ mix(linear) ^ mix(pass + 0x51));
            for (int i = n - 1; i > 0; --i) {
                s = mix(s);
                std::swap(order[i], order[s % (uint64_t)(i + 1)]);
            }
        }
        bool progress = false;
        for (int i = 0; i < n && w->error.empty(); ++i) {
            Thread& t = w->threads[order[i]];
            if (t.st == St::NotStarted || t.st == St::Runnable) {
                resume(w, &t);
                progress = true;
            }
        }
        if (!progress && w->error.empty()) fail(w, "%s", deadlock_report(w).c_str());
    }
    // Abandoned fibers (after an error) give their stacks back; nothing on them needs unwinding.
    for (Thread& t : w->threads)
        if (t.stack) {
            w->free_stacks.push_back(t.stack);
            t.stack = nullptr;
        }
}

// ---- The worker pool ----

struct Pool {
    std::mutex m;
    std::condition_variable start, done;
    const EmuLaunch* launch = nullptr;
    uint64_t generation = 0, blocks = 0;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> abort{false};
    int busy = 0;
    std::string error;
    std::vector<std::thread> threads;
};
Pool* g_pool = nullptr;

void worker_main(Pool* p) {
    tl_worker = new Worker();
    uint64_t seen = 0;
    for (;;) {
        std::unique_lock<std::mutex> lk(p->m);
        p->start.wait(lk, [&] { return p->generation != seen; });
        seen = p->generation;
        const EmuLaunch* L = p->launch;
        lk.unlock();
        for (uint64_t b; !p->abort && (b = p->next.fetch_add(1)) < p->blocks;) {
            run_block(tl_worker, *L, b);
            if (!tl_worker->error.empty()) {
                std::lock_guard<std::mutex> g(p->m);
                if (p->error.empty()) p->error = tl_worker->error;
                p->abort = true;
            }
        }
        lk.lock();
        if (--p->busy == 0) p->done.notify_all();
    }
}

Pool& pool() {
    if (!g_pool) {
        g_pool = new Pool();
        int n = g_options.threads > 0 ? g_options.threads : (int)std::max(1u, std::thread::hardware_concurrency());
        for (int i = 0; i < n; ++i) {
            g_pool->threads.emplace_back(worker_main, g_pool);
            g_pool->threads.back().detach();
        }
    }
    return *g_pool;
}

Options parse_options() {
    Options o;
    if (const char* s = getenv("INCEPTION_EMU_SCHEDULE")) {
        if (!strcmp(s, "reverse"))
            o.schedule = Schedule::Reverse;
        else if (!strncmp(s, "random", 6)) {
            o.schedule = Schedule::Random;
            if (s[6] == ':') o.seed = strtoull(s + 7, nullptr, 10);
        }
    }
    if (const char* s = getenv("INCEPTION_EMU_RACECHECK")) o.racecheck = !strcmp(s, "1");
    if (const char* s = getenv("INCEPTION_EMU_THREADS")) o.threads = atoi(s);
    return o;
}

}  // namespace detail

using namespace detail;

const Options& options() {
    static bool init = false;
    if (!init) {
        g_options = parse_options();
        init = true;
    }
    return g_options;
}

void set_kernels_library(void* handle) { g_kernels = handle; }

std::string run_grid(const EmuLaunch& launch) {
    options();
    Pool& p = pool();
    std::unique_lock<std::mutex> lk(p.m);
    p.launch = &launch;
    p.blocks = (uint64_t)launch.grid.x * launch.grid.y * launch.grid.z;
    p.next = 0;
    p.abort = false;
    p.error.clear();
    p.busy = (int)p.threads.size();
    ++p.generation;
    p.start.notify_all();
    p.done.wait(lk, [&] { return p.busy == 0; });
    return p.error;
}

}  // namespace emu
