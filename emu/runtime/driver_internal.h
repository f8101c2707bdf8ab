// The emulated driver's shared state: the driver API's types and error codes, the queue of
// operations and the helpers both halves of the driver use (driver.cpp: initialisation, device,
// context, memory and copies; driver_launch.cpp: streams, events, modules, launches, graphs).
#pragma once
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

namespace emu_driver {

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

State& S();
void* ctx_handle();
double now_ms();
// Finds the allocation of `map` holding [p, p + n).
bool in_map(const std::map<uintptr_t, size_t>& map, const void* p, size_t n);
void kernel_failed(const std::string& msg);
void execute(Op& op);
// Runs queued work up to and including sequence number `seq`.
CUresult flush(uint64_t seq);
CUresult flush_all();
// A host wait while a stream captures: the capture is invalidated, as with the global capture mode.
CUresult capture_wait_refused();
bool capturing(void* stream);
// Queues `op` on `stream`, or records it into the graph being captured there. Returns its
// sequence number (0 when captured).
uint64_t enqueue(Op op, void* stream);
bool load_kernels(State& s);

}  // namespace emu_driver

using namespace emu_driver;

#define API extern "C" __attribute__((visibility("default")))
#define LOCK                                      \
    State& s = S();                               \
    std::lock_guard<std::recursive_mutex> g(s.m); \
    if (!s.initialized) return CUDA_ERROR_NOT_INITIALIZED;
#define STICKY \
    if (s.sticky) return s.sticky;
