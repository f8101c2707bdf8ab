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
#include "driver_internal.h"

namespace emu_driver {

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

}  // namespace emu_driver

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
