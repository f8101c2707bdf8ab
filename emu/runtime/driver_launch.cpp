// The emulated driver's streams and events, modules, functions and launches (with their checks),
// and CUDA graphs (stream capture and replay); see driver.cpp for the semantics kept from a GPU.
#include "driver_internal.h"

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
