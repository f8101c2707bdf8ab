// The emulated GPU's CUDA driver: the part of the driver API that cudarc calls, over host memory
// and the executor in exec.cpp. Built as a shared library whose SONAME is libcuda.so; the engine
// opens it by full path (INCEPTION_CUDA_DRIVER) before cudarc looks for a driver, so cudarc's
// dlopen("libcuda.so") finds it already loaded.
//
// Semantics kept from a real GPU:
// - work queued on streams runs later, not at the call: queued operations execute in issue order
//   (a valid schedule of any set of streams) only when the host waits for them (stream, event or
//   context synchronisation, a copy into pageable memory, a synchronous free). A host reading
//   pinned memory without waiting therefore sees stale data, as it might on a GPU;
// - copies from pageable host memory take their source at the call (cudarc frees temporaries
//   right after it); copies into pageable memory wait for the stream; pinned memory is read and
//   written when the queued copy runs;
// - a launch is checked at the call (block and grid limits of sm_90, dynamic shared memory against
//   the 48 KiB default or the opted-in size, __launch_bounds__, registers per block from the
//   CUBIN); a kernel that fails (a barrier divergence, a deadlock, a race under the race checker)
//   makes the context fail with CUDA_ERROR_LAUNCH_FAILED from then on, like a real fault;
// - device memory comes from the host heap, poisoned with 0xFF bytes (NaN in fp16 and fp32) so a
//   read of memory never written shows; cuMemGetInfo reports an emulated total
//   (INCEPTION_EMU_MEMORY_MB, default 16384) and allocations past it fail with out-of-memory.
// The kernels themselves come from the kernels library built from the same kernels/*.cu
// (emu/src/builder.rs); modules loaded from NVRTC's CUBINs map each kernel name to its
// host-compiled entry point.
#include <dlfcn.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "cubin.h"
#include "exec.h"

typedef int CUresult;
typedef int CUdevice;
typedef uint64_t CUdeviceptr;

enum : int {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED = 900,
    CUDA_ERROR_STREAM_CAPTURE_INVALIDATED = 901,
    CUDA_ERROR_UNKNOWN = 999,
};

namespace {

constexpr const char* DEVICE_NAME = "NVIDIA H200 (emulated on CPU)";
constexpr int SMEM_DEFAULT = 48 * 1024;
constexpr int SMEM_OPTIN = 232448;  // 227 KiB per block on sm_90
constexpr int REGS_PER_BLOCK = 65536;

struct Func {
    const EmuKernel* kernel;
    std::string name;
    int max_dyn_smem = SMEM_DEFAULT;
    int static_smem = 0;
    int registers = 0;
};

struct Module {
    std::vector<std::unique_ptr<Func>> funcs;
};

struct Event {
    uint64_t record_seq = 0;  // sequence number of the latest queued record
    bool recorded = false;
    bool timing = true;
    double time_ms = 0;
};

enum class OpKind { Kernel, Copy, Memset, Record, Free, HostFn };

struct Op {
    OpKind kind;
    uint64_t seq;
    std::shared_ptr<const EmuLaunch> launch;  // shared by the replays of a graph
    void* dst = nullptr;
    const void* src = nullptr;
    size_t bytes = 0;
    std::vector<unsigned char> staged;  // the source of a copy from pageable memory
    unsigned char value = 0;
    Event* event = nullptr;
    void (*fn)(void*) = nullptr;
    void* user = nullptr;
};

struct State {
    std::recursive_mutex m;
    bool initialized = false;
    CUresult sticky = CUDA_SUCCESS;  // a failed kernel poisons the context, as on a GPU
    std::string last_error;
    std::map<uintptr_t, size_t> device, pinned;
    size_t allocated = 0, total = 0;
    std::deque<Op> queue;
    uint64_t issued = 0, executed = 0;
    std::unordered_map<std::string, const EmuKernel*> kernels;
    void* kernels_lib = nullptr;
    int primary_refs = 0;
    // Stream capture (one at a time): what the capturing stream queues goes into `captured`.
    void* capture_stream = nullptr;
    bool capturing = false, capture_invalid = false;
    std::vector<Op> captured;
    int ctx_token = 0;  // the primary context's handle points here
    const char* flavour = "plain";
};

State& S() {
    static State* s = new State();
    return *s;
}

void* ctx_handle() { return &S().ctx_token; }

double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// Finds the allocation of `map` holding [p, p + n).
bool in_map(const std::map<uintptr_t, size_t>& map, const void* p, size_t n) {
    auto a = reinterpret_cast<uintptr_t>(p);
    auto it = map.upper_bound(a);
    if (it == map.begin()) return false;
    --it;
    return a >= it->first && a + n <= it->first + it->second;
}

void kernel_failed(const std::string& msg) {
    State& s = S();
    s.last_error = "emulated GPU: " + msg;
    fprintf(stderr, "%s\n", s.last_error.c_str());
    s.sticky = CUDA_ERROR_LAUNCH_FAILED;
}

void execute(Op& op) {
    State& s = S();
    switch (op.kind) {
        case OpKind::Kernel: {
            if (s.sticky) break;
            std::string err = emu::run_grid(*op.launch);
            if (!err.empty()) kernel_failed(err);
            break;
        }
        case OpKind::Copy:
            memcpy(op.dst, op.staged.empty() ? op.src : op.staged.data(), op.bytes);
            break;
        case OpKind::Memset:
            memset(op.dst, op.value, op.bytes);
            break;
        case OpKind::Record:
            op.event->time_ms = now_ms();
            break;
        case OpKind::Free: {
            auto it = s.device.find(reinterpret_cast<uintptr_t>(op.dst));
            if (it != s.device.end()) {
                s.allocated -= it->second;
                s.device.erase(it);
                free(op.dst);
            }
            break;
        }
        case OpKind::HostFn:
            op.fn(op.user);
            break;
    }
}

// Runs queued work up to and including sequence number `seq`.
CUresult flush(uint64_t seq) {
    State& s = S();
    while (!s.queue.empty() && s.queue.front().seq <= seq) {
        Op op = std::move(s.queue.front());
        s.queue.pop_front();
        execute(op);
        s.executed = op.seq;
    }
    return s.sticky;
}

CUresult flush_all() { return flush(S().issued); }

// A host wait while a stream captures: the capture is invalidated, as with the global capture mode.
CUresult capture_wait_refused() {
    State& s = S();
    if (!s.capturing) return CUDA_SUCCESS;
    s.capture_invalid = true;
    fprintf(stderr, "emulated GPU: a host synchronisation during stream capture invalidates the capture\n");
    return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;
}

bool capturing(void* stream) {
    State& s = S();
    return s.capturing && stream == s.capture_stream;
}

// Queues `op` on `stream`, or records it into the graph being captured there. Returns its
// sequence number (0 when captured).
uint64_t enqueue(Op op, void* stream) {
    State& s = S();
    if (capturing(stream)) {
        s.captured.push_back(std::move(op));
        return 0;
    }
    op.seq = ++s.issued;
    s.queue.push_back(std::move(op));
    // Bound the queue (and the staged copies it holds) on long runs without a synchronisation.
    if (s.queue.size() > 100000) flush(s.queue.front().seq + 50000);
    return s.issued;
}

bool load_kernels(State& s) {
    if (s.kernels_lib) return true;
    std::string path;
    if (const char* p = getenv("INCEPTION_EMU_KERNELS")) {
        path = p;
    } else {
        Dl_info info{};
        dladdr(reinterpret_cast<void*>(&load_kernels), &info);
        std::string self = info.dli_fname ? info.dli_fname : "";
        std::string dir = self.substr(0, self.rfind('/') + 1);
        const char* race = getenv("INCEPTION_EMU_RACECHECK");
        path = dir + (race && !strcmp(race, "1") ? "libinception-emu-kernels-race.so" : "libinception-emu-kernels.so");
    }
    s.kernels_lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!s.kernels_lib) {
        fprintf(stderr, "emulated GPU: cannot load the host-compiled kernels %s: %s\n", path.c_str(), dlerror());
        return false;
    }
    auto table = reinterpret_cast<const EmuKernel* const* (*)(int*)>(dlsym(s.kernels_lib, "emu_kernel_table"));
    auto flavour = reinterpret_cast<const char* (*)()>(dlsym(s.kernels_lib, "emu_kernels_flavour"));
    if (!table || !flavour) {
        fprintf(stderr, "emulated GPU: %s is not an emulator kernels library\n", path.c_str());
        return false;
    }
    int n = 0;
    const EmuKernel* const* t = table(&n);
    for (int i = 0; i < n; ++i) s.kernels[t[i]->name] = t[i];
    s.flavour = flavour();
    emu::set_kernels_library(s.kernels_lib);
    return true;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default")))
#define LOCK                                      \
    State& s = S();                               \
    std::lock_guard<std::recursive_mutex> g(s.m); \
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
#define STICKY \
    if (s.sticky) return s.sticky;

API CUresult cuInit(unsigned) {
    State& s = S();
    std::lock_guard<std::recursive_mutex> g(s.m);
    if (s.initialized) return CUDA_SUCCESS;
    if (!load_kernels(s)) return CUDA_ERROR_NOT_INITIALIZED;
    const char* mb = getenv("INCEPTION_EMU_MEMORY_MB");
    s.total = (size_t)(mb ? atoll(mb) : 16384) << 20;
    s.initialized = true;
    emu::options();
    return CUDA_SUCCESS;
}

API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorString(CUresult e, const char** str) {
    State& s = S();
    switch (e) {
        case CUDA_SUCCESS: *str = "no error"; break;
        case CUDA_ERROR_INVALID_VALUE: *str = "invalid argument"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *str = "out of memory (emulated device memory)"; break;
        case CUDA_ERROR_NOT_INITIALIZED: *str = "initialization error (emulated GPU)"; break;
        case CUDA_ERROR_INVALID_DEVICE: *str = "invalid device ordinal"; break;
        case CUDA_ERROR_INVALID_IMAGE: *str = "device kernel image is invalid"; break;
        case CUDA_ERROR_INVALID_HANDLE: *str = "invalid resource handle"; break;
        case CUDA_ERROR_NOT_FOUND: *str = "named symbol not found"; break;
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *str = "too many resources requested for launch"; break;
        case CUDA_ERROR_LAUNCH_FAILED:
            *str = s.last_error.empty() ? "unspecified launch failure" : s.last_error.c_str();
            break;
        case CUDA_ERROR_NOT_SUPPORTED: *str = "operation not supported (emulated GPU)"; break;
        default: *str = "unknown error"; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorName(CUresult e, const char** str) {
    switch (e) {
        case CUDA_SUCCESS: *str = "CUDA_SUCCESS"; break;
        case CUDA_ERROR_INVALID_VALUE: *str = "CUDA_ERROR_INVALID_VALUE"; break;
        case CUDA_ERROR_OUT_OF_MEMORY: *str = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case CUDA_ERROR_NOT_INITIALIZED: *str = "CUDA_ERROR_NOT_INITIALIZED"; break;
        case CUDA_ERROR_INVALID_DEVICE: *str = "CUDA_ERROR_INVALID_DEVICE"; break;
        case CUDA_ERROR_INVALID_IMAGE: *str = "CUDA_ERROR_INVALID_IMAGE"; break;
        case CUDA_ERROR_INVALID_HANDLE: *str = "CUDA_ERROR_INVALID_HANDLE"; break;
        case CUDA_ERROR_NOT_FOUND: *str = "CUDA_ERROR_NOT_FOUND"; break;
        case CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: *str = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; break;
        case CUDA_ERROR_LAUNCH_FAILED: *str = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CUDA_ERROR_NOT_SUPPORTED: *str = "CUDA_ERROR_NOT_SUPPORTED"; break;
        default: *str = "CUDA_ERROR_UNKNOWN"; return CUDA_ERROR_INVALID_VALUE;
    }
    return CUDA_SUCCESS;
}

// ---- Device and context ----

API CUresult cuDeviceGetCount(int* n) {
    LOCK;
    *n = 1;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    LOCK;
    if (ordinal != 0) return CUDA_ERROR_INVALID_DEVICE;
    *d = 0;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    LOCK;
    snprintf(name, (size_t)len, "%s", DEVICE_NAME);
    return CUDA_SUCCESS;
}

API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    LOCK;
    *bytes = s.total;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    LOCK;
    const char* sms = getenv("INCEPTION_EMU_SMS");
    switch (attr) {
        case 1: *v = 1024; break;                      // max threads per block
        case 2: case 3: *v = 1024; break;              // max block dim x, y
        case 4: *v = 64; break;                        // max block dim z
        case 5: *v = 2147483647; break;                // max grid dim x
        case 6: case 7: *v = 65535; break;             // max grid dim y, z
        case 8: *v = SMEM_DEFAULT; break;              // shared memory per block
        case 9: *v = 65536; break;                     // constant memory
        case 10: *v = 32; break;                       // warp size
        case 12: *v = REGS_PER_BLOCK; break;           // registers per block
        case 13: *v = 1980000; break;                  // clock rate (kHz)
        case 16: *v = sms ? atoi(sms) : 132; break;    // multiprocessors (an H200's)
        case 39: *v = 2048; break;                     // max threads per multiprocessor
        case 75: *v = 9; break;                        // compute capability major
        case 76: *v = 0; break;                        // compute capability minor
        case 81: *v = 233472; break;                   // shared memory per multiprocessor
        case 82: *v = 65536; break;                    // registers per multiprocessor
        case 97: *v = SMEM_OPTIN; break;               // opt-in shared memory per block
        case 115: *v = 1; break;                       // memory pools: cuMemAllocAsync is used
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
    LOCK;
    ++s.primary_refs;
    *ctx = ctx_handle();
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) {
    LOCK;
    if (s.primary_refs > 0) --s.primary_refs;
    return CUDA_SUCCESS;
}

namespace {
thread_local void* tl_current = nullptr;
}

API CUresult cuCtxSetCurrent(void* ctx) {
    LOCK;
    if (ctx && ctx != ctx_handle()) return CUDA_ERROR_INVALID_CONTEXT;
    tl_current = ctx;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetCurrent(void** ctx) {
    LOCK;
    *ctx = tl_current;
    return CUDA_SUCCESS;
}

API CUresult cuCtxPushCurrent_v2(void* ctx) { return cuCtxSetCurrent(ctx); }
API CUresult cuCtxPopCurrent_v2(void** ctx) {
    LOCK;
    if (ctx) *ctx = tl_current;
    tl_current = nullptr;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetDevice(CUdevice* d) {
    LOCK;
    *d = 0;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSynchronize() {
    LOCK;
    if (CUresult r = capture_wait_refused()) return r;
    return flush_all();
}

// ---- Memory ----

API CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    LOCK;
    STICKY;
    *total = s.total;
    *free_b = s.total > s.allocated ? s.total - s.allocated : 0;
    return CUDA_SUCCESS;
}

static CUresult device_alloc(CUdeviceptr* p, size_t bytes) {
    State& s = S();
    if (s.sticky) return s.sticky;
    if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;
    if (s.allocated + bytes > s.total) return CUDA_ERROR_OUT_OF_MEMORY;
    size_t rounded = (bytes + 255) / 256 * 256;
    void* m = aligned_alloc(256, rounded);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    memset(m, 0xff, rounded);  // NaN everywhere until written
    s.device[reinterpret_cast<uintptr_t>(m)] = bytes;
    s.allocated += bytes;
    *p = reinterpret_cast<CUdeviceptr>(m);
    return CUDA_SUCCESS;
}

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    LOCK;
    return device_alloc(p, bytes);
}

API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void* stream) {
    LOCK;
    if (capturing(stream)) return CUDA_ERROR_NOT_SUPPORTED;  // no memory nodes in graphs here
    return device_alloc(p, bytes);
}

API CUresult cuMemFree_v2(CUdeviceptr p) {
    LOCK;
    if (!s.device.count(p)) return CUDA_ERROR_INVALID_VALUE;
    flush_all();  // a synchronous free waits for the device
    Op op{OpKind::Free, 0, nullptr};
    op.dst = reinterpret_cast<void*>(p);
    execute(op);
    return CUDA_SUCCESS;
}

API CUresult cuMemFreeAsync(CUdeviceptr p, void* stream) {
    LOCK;
    if (!s.device.count(p)) return CUDA_ERROR_INVALID_VALUE;
    if (capturing(stream)) return CUDA_ERROR_NOT_SUPPORTED;
    Op op{OpKind::Free, 0, nullptr};
    op.dst = reinterpret_cast<void*>(p);
    enqueue(std::move(op), stream);
    return CUDA_SUCCESS;
}

API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    LOCK;
    STICKY;
    size_t rounded = (bytes + 4095) / 4096 * 4096;
    void* m = aligned_alloc(4096, rounded ? rounded : 4096);
    if (!m) return CUDA_ERROR_OUT_OF_MEMORY;
    memset(m, 0xff, rounded);
    s.pinned[reinterpret_cast<uintptr_t>(m)] = bytes;
    *p = m;
    return CUDA_SUCCESS;
}

API CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }

API CUresult cuMemFreeHost(void* p) {
    LOCK;
    auto it = s.pinned.find(reinterpret_cast<uintptr_t>(p));
    if (it == s.pinned.end()) return CUDA_ERROR_INVALID_VALUE;
    flush_all();
    s.pinned.erase(it);
    free(p);
    return CUDA_SUCCESS;
}

static CUresult queue_copy(void* dst, const void* src, size_t bytes, bool stage_src, void* stream) {
    Op op{OpKind::Copy, 0, nullptr};
    op.dst = dst;
    op.src = src;
    op.bytes = bytes;
    // A captured copy reads its source when the graph runs, as a graph's memcpy node does.
    if (stage_src && !capturing(stream))
        op.staged.assign(static_cast<const unsigned char*>(src), static_cast<const unsigned char*>(src) + bytes);
    enqueue(std::move(op), stream);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t bytes, void* stream) {
    LOCK;
    STICKY;
    if (!in_map(s.device, reinterpret_cast<void*>(dst), bytes)) return CUDA_ERROR_INVALID_VALUE;
    return queue_copy(reinterpret_cast<void*>(dst), src, bytes, !in_map(s.pinned, src, bytes), stream);
}

API CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t bytes, void* stream) {
    LOCK;
    STICKY;
    if (!in_map(s.device, reinterpret_cast<void*>(src), bytes)) return CUDA_ERROR_INVALID_VALUE;
    if (in_map(s.pinned, dst, bytes) || capturing(stream))
        return queue_copy(dst, reinterpret_cast<void*>(src), bytes, false, stream);
    // Into pageable memory the copy is synchronous.
    if (CUresult r = capture_wait_refused()) return r;
    CUresult r = flush_all();
    if (r) return r;
    memcpy(dst, reinterpret_cast<void*>(src), bytes);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes, void* stream) {
    LOCK;
    STICKY;
    if (!in_map(s.device, reinterpret_cast<void*>(dst), bytes) || !in_map(s.device, reinterpret_cast<void*>(src), bytes))
        return CUDA_ERROR_INVALID_VALUE;
    return queue_copy(reinterpret_cast<void*>(dst), reinterpret_cast<void*>(src), bytes, false, stream);
}

API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
    CUresult r = cuMemcpyHtoDAsync_v2(dst, src, bytes, nullptr);
    if (r) return r;
    LOCK;
    return flush_all();
}

API CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
    LOCK;
    STICKY;
    if (!in_map(s.device, reinterpret_cast<void*>(src), bytes)) return CUDA_ERROR_INVALID_VALUE;
    CUresult r = flush_all();
    if (r) return r;
    memcpy(dst, reinterpret_cast<void*>(src), bytes);
    return CUDA_SUCCESS;
}

API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, void* stream) {
    LOCK;
    STICKY;
    if (!in_map(s.device, reinterpret_cast<void*>(dst), n)) return CUDA_ERROR_INVALID_VALUE;
    Op op{OpKind::Memset, 0, nullptr};
    op.dst = reinterpret_cast<void*>(dst);
    op.bytes = n;
    op.value = v;
    enqueue(std::move(op), stream);
    return CUDA_SUCCESS;
}

API CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    CUresult r = cuMemsetD8Async(dst, v, n, nullptr);
    if (r) return r;
    LOCK;
    return flush_all();
}

// ---- Streams and events ----

namespace {
int g_stream_tokens[1];
}

API CUresult cuStreamCreate(void** stream, unsigned) {
    LOCK;
    *stream = new int(0);
    return CUDA_SUCCESS;
}

API CUresult cuStreamCreateWithPriority(void** stream, unsigned flags, int) { return cuStreamCreate(stream, flags); }

API CUresult cuStreamDestroy_v2(void* stream) {
    LOCK;
    if (stream && stream != g_stream_tokens) delete static_cast<int*>(stream);
    return CUDA_SUCCESS;
}

API CUresult cuStreamSynchronize(void*) {
    LOCK;
    if (CUresult r = capture_wait_refused()) return r;
    return flush_all();
}

API CUresult cuStreamQuery(void*) {
    LOCK;
    if (CUresult r = capture_wait_refused()) return r;
    return flush_all();
}

// Issue order already runs every earlier operation of every stream first.
API CUresult cuStreamWaitEvent(void*, void* ev, unsigned) {
    LOCK;
    STICKY;
    return ev ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuLaunchHostFunc(void* stream, void (*fn)(void*), void* user) {
    LOCK;
    STICKY;
    Op op{OpKind::HostFn, 0, nullptr};
    op.fn = fn;
    op.user = user;
    enqueue(std::move(op), stream);
    return CUDA_SUCCESS;
}

API CUresult cuEventCreate(void** ev, unsigned flags) {
    LOCK;
    auto* e = new Event();
    e->timing = !(flags & 2);  // CU_EVENT_DISABLE_TIMING
    *ev = e;
    return CUDA_SUCCESS;
}

API CUresult cuEventDestroy_v2(void* ev) {
    LOCK;
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    // A record still queued refers to the event: run it first.
    flush(static_cast<Event*>(ev)->record_seq);
    delete static_cast<Event*>(ev);
    return CUDA_SUCCESS;
}

API CUresult cuEventRecord(void* ev, void* stream) {
    LOCK;
    STICKY;
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    auto* e = static_cast<Event*>(ev);
    Op op{OpKind::Record, 0, nullptr};
    op.event = e;
    uint64_t seq = enqueue(std::move(op), stream);
    if (seq) {  // a captured record takes effect when the graph runs
        e->record_seq = seq;
        e->recorded = true;
    }
    return CUDA_SUCCESS;
}

API CUresult cuEventRecordWithFlags(void* ev, void* stream, unsigned) { return cuEventRecord(ev, stream); }

API CUresult cuEventSynchronize(void* ev) {
    LOCK;
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    if (CUresult r = capture_wait_refused()) return r;
    return flush(static_cast<Event*>(ev)->record_seq);
}

API CUresult cuEventQuery(void* ev) {
    LOCK;
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    return flush(static_cast<Event*>(ev)->record_seq);
}

API CUresult cuEventElapsedTime_v2(float* ms, void* start, void* end) {
    LOCK;
    STICKY;
    auto *a = static_cast<Event*>(start), *b = static_cast<Event*>(end);
    if (!a || !b || !a->timing || !b->timing || !a->recorded || !b->recorded) return CUDA_ERROR_INVALID_HANDLE;
    flush(std::max(a->record_seq, b->record_seq));
    *ms = (float)(b->time_ms - a->time_ms);
    return CUDA_SUCCESS;
}

API CUresult cuEventElapsedTime(float* ms, void* start, void* end) { return cuEventElapsedTime_v2(ms, start, end); }

// ---- Modules, functions, launches ----

API CUresult cuModuleLoadData(void** module, const void* image) {
    LOCK;
    STICKY;
    std::vector<CubinKernel> found;
    std::string err;
    if (!parse_cubin(image, &found, &err)) {
        fprintf(stderr, "emulated GPU: cuModuleLoadData: %s\n", err.c_str());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    auto* m = new Module();
    for (const CubinKernel& k : found) {
        auto f = std::make_unique<Func>();
        f->name = k.name;
        f->static_smem = k.static_smem;
        f->registers = k.registers;
        auto it = s.kernels.find(k.name);
        f->kernel = it == s.kernels.end() ? nullptr : it->second;
        m->funcs.push_back(std::move(f));
    }
    *module = m;
    return CUDA_SUCCESS;
}

API CUresult cuModuleUnload(void* module) {
    LOCK;
    flush_all();
    delete static_cast<Module*>(module);
    return CUDA_SUCCESS;
}

API CUresult cuModuleGetFunction(void** fn, void* module, const char* name) {
    LOCK;
    auto* m = static_cast<Module*>(module);
    for (auto& f : m->funcs)
        if (f->name == name) {
            if (!f->kernel) {
                fprintf(stderr,
                        "emulated GPU: kernel %s is in the CUBIN but not among the host-compiled kernels "
                        "(%s library built from other sources?)\n",
                        name, s.flavour);
                return CUDA_ERROR_NOT_FOUND;
            }
            *fn = f.get();
            return CUDA_SUCCESS;
        }
    return CUDA_ERROR_NOT_FOUND;
}

API CUresult cuFuncSetAttribute(void* fn, int attr, int value) {
    LOCK;
    auto* f = static_cast<Func*>(fn);
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    if (attr == 8) {  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        if (value < 0 || value + f->static_smem > SMEM_OPTIN) return CUDA_ERROR_INVALID_VALUE;
        f->max_dyn_smem = value;
    }
    return CUDA_SUCCESS;
}

API CUresult cuFuncGetAttribute(int* v, int attr, void* fn) {
    LOCK;
    auto* f = static_cast<Func*>(fn);
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    switch (attr) {
        case 0: *v = f->kernel->launch_bounds ? f->kernel->launch_bounds : 1024; break;
        case 1: *v = f->static_smem; break;
        case 4: *v = f->registers; break;
        case 8: *v = f->max_dyn_smem; break;
        default: *v = 0; break;
    }
    return CUDA_SUCCESS;
}

// INCEPTION_EMU_STATS=1: the launches per kernel, printed to stderr at exit (for counting the
// launches of a training step: run one and two steps and take the difference).
static void count_launch(const std::string& name) {
    static const bool on = getenv("INCEPTION_EMU_STATS") && !strcmp(getenv("INCEPTION_EMU_STATS"), "1");
    if (!on) return;
    static std::map<std::string, uint64_t>* counts = [] {
        auto* m = new std::map<std::string, uint64_t>();
        atexit([] {
            uint64_t total = 0;
            for (auto& [k, n] : *counts) total += n;
            fprintf(stderr, "emulated GPU: %llu kernel launches\n", (unsigned long long)total);
            for (auto& [k, n] : *counts) fprintf(stderr, "  %-28s %llu\n", k.c_str(), (unsigned long long)n);
        });
        return m;
    }();
    ++(*counts)[name];
}

// A test switch that puts a launcher bug back: INCEPTION_EMU_SWAP_ARGS=KERNEL:I:J exchanges
// arguments I and J (of equal size) of every launch of KERNEL, as a launcher passing them in the
// wrong order would (tests/emu_gpu.rs checks that the self-test catches it).
static void swap_args_if_asked(EmuLaunch& L) {
    static const char* spec = getenv("INCEPTION_EMU_SWAP_ARGS");
    if (!spec) return;
    std::string s = spec;
    size_t a = s.find(':'), b = s.rfind(':');
    if (a == std::string::npos || a == b || s.substr(0, a) != L.name) return;
    int i = atoi(s.c_str() + a + 1), j = atoi(s.c_str() + b + 1);
    int n = L.kernel->nparams;
    if (i < 0 || j < 0 || i >= n || j >= n || L.kernel->param_size[i] != L.kernel->param_size[j]) return;
    std::vector<unsigned char> tmp(L.kernel->param_size[i]);
    memcpy(tmp.data(), L.args[i], tmp.size());
    memcpy(L.args[i], L.args[j], tmp.size());
    memcpy(L.args[j], tmp.data(), tmp.size());
}

static CUresult launch_error(CUresult code, const char* fmt, const char* name, long long a, long long b) {
    fprintf(stderr, "emulated GPU: launch of %s refused: ", name);
    fprintf(stderr, fmt, a, b);
    fprintf(stderr, "\n");
    return code;
}

API CUresult cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                            unsigned smem, void* stream, void** params, void** extra) {
    LOCK;
    STICKY;
    auto* f = static_cast<Func*>(fn);
    if (!f || !f->kernel) return CUDA_ERROR_INVALID_HANDLE;
    const char* name = f->name.c_str();
    long long threads = (long long)bx * by * bz;
    if (extra) return launch_error(CUDA_ERROR_NOT_SUPPORTED, "the extra argument form (%lld, %lld)", name, 0, 0);
    if (!gx || !gy || !gz || !bx || !by || !bz)
        return launch_error(CUDA_ERROR_INVALID_VALUE, "a zero grid or block dimension (%lld threads, %lld)", name, threads, 0);
    if (threads > 1024 || bx > 1024 || by > 1024 || bz > 64)
        return launch_error(CUDA_ERROR_INVALID_VALUE, "block of %lld threads (z %lld) exceeds sm_90's limits", name,
                            threads, bz);
    if (gy > 65535 || gz > 65535 || gx > 2147483647u)
        return launch_error(CUDA_ERROR_INVALID_VALUE, "grid y %lld / z %lld exceeds 65535", name, gy, gz);
    if (f->kernel->launch_bounds && threads > f->kernel->launch_bounds)
        return launch_error(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "%lld threads exceed __launch_bounds__(%lld)", name,
                            threads, f->kernel->launch_bounds);
    // Without the opt-in, static and dynamic shared memory share the default 48 KiB.
    long long dyn_limit = f->max_dyn_smem > SMEM_DEFAULT ? f->max_dyn_smem : SMEM_DEFAULT - f->static_smem;
    if ((long long)smem > dyn_limit)
        return launch_error(CUDA_ERROR_INVALID_VALUE,
                            "%lld bytes of dynamic shared memory exceed the function's limit of %lld "
                            "(raise CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)",
                            name, smem, dyn_limit);
    if (f->registers && (long long)f->registers * threads > REGS_PER_BLOCK)
        return launch_error(CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES, "%lld registers per thread x %lld threads exceed 65536",
                            name, f->registers, threads);
    auto L = std::make_unique<EmuLaunch>();
    L->kernel = f->kernel;
    L->name = f->name;
    L->grid = {gx, gy, gz};
    L->block = {bx, by, bz};
    L->dyn_smem = smem;
    // Copy every argument now: the caller's storage is gone once we return.
    size_t slots = 0;
    for (int i = 0; i < f->kernel->nparams; ++i) slots += (f->kernel->param_size[i] + 15) / 16 * 2;
    L->storage.assign(slots, 0);
    size_t at = 0;
    for (int i = 0; i < f->kernel->nparams; ++i) {
        size_t n = f->kernel->param_size[i];
        memcpy(&L->storage[at], params[i], n);
        L->args.push_back(&L->storage[at]);
        at += (n + 15) / 16 * 2;
    }
    count_launch(f->name);
    swap_args_if_asked(*L);
    Op op{OpKind::Kernel, 0, std::move(L)};
    enqueue(std::move(op), stream);
    return CUDA_SUCCESS;
}

// ---- Graphs: stream capture and replay ----
// A captured graph is the list of operations the capturing stream queued; launching it queues
// them again, in order (the kernels' arguments as captured, so a replay reads the same buffers).

namespace {
struct Graph {
    std::vector<Op> ops;
};
}  // namespace

API CUresult cuStreamBeginCapture_v2(void* stream, int) {
    LOCK;
    STICKY;
    if (!stream) return CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED;  // the legacy stream cannot capture
    if (s.capturing) return CUDA_ERROR_NOT_SUPPORTED;           // one capture at a time here
    s.capturing = true;
    s.capture_invalid = false;
    s.capture_stream = stream;
    s.captured.clear();
    return CUDA_SUCCESS;
}

API CUresult cuStreamEndCapture(void* stream, void** graph) {
    LOCK;
    if (!s.capturing || stream != s.capture_stream) return CUDA_ERROR_INVALID_VALUE;
    s.capturing = false;
    s.capture_stream = nullptr;
    if (s.capture_invalid) {
        s.captured.clear();
        return CUDA_ERROR_STREAM_CAPTURE_INVALIDATED;
    }
    auto* captured = new Graph();
    captured->ops = std::move(s.captured);
    s.captured.clear();
    *graph = captured;
    return CUDA_SUCCESS;
}

API CUresult cuStreamIsCapturing(void* stream, int* status) {
    LOCK;
    *status = capturing(stream) ? (s.capture_invalid ? 2 : 1) : 0;
    return CUDA_SUCCESS;
}

API CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    LOCK;
    if (!graph) return CUDA_ERROR_INVALID_VALUE;
    *exec = new Graph(*static_cast<Graph*>(graph));
    return CUDA_SUCCESS;
}

API CUresult cuGraphLaunch(void* exec, void* stream) {
    LOCK;
    STICKY;
    if (!exec) return CUDA_ERROR_INVALID_HANDLE;
    for (const Op& op : static_cast<Graph*>(exec)->ops) {
        uint64_t seq = enqueue(Op(op), stream);
        if (op.kind == OpKind::Record && seq) {
            op.event->record_seq = seq;
            op.event->recorded = true;
        }
    }
    return CUDA_SUCCESS;
}

API CUresult cuGraphUpload(void* exec, void*) {
    LOCK;
    return exec ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

API CUresult cuGraphExecDestroy(void* exec) {
    LOCK;
    delete static_cast<Graph*>(exec);
    return CUDA_SUCCESS;
}

API CUresult cuGraphDestroy(void* graph) {
    LOCK;
    delete static_cast<Graph*>(graph);
    return CUDA_SUCCESS;
}
