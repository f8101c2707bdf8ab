// Max and average pooling (square window, symmetric padding), NHWC.
// Backward passes are gathers (one thread per input value visits the windows covering it), so
// overlapping windows need no atomics and results are deterministic.
// Max pool has two paths (KernelPaths::pool_argmax): the baseline backward recomputes every
// covering window's maximum from x (k*k loads per window); with the argmax the forward also writes
// each output's window position of its first maximum (one byte: r * k + s, so k <= 16) and the
// backward compares that byte instead. Both send the gradient to the same element, summed in the
// same order, so their results are identical.
// Output/dy tensors of the windowed pools take a row stride and channel offset (ldy, yoff) so a
// pooling branch can write straight into its concat slice.
// Every kernel is a template over the activation type A: the unsuffixed entry points take fp16
// tensors (O2/O3), `_o0` fp32 ones; sums are fp32 in both.
#include "common.cuh"

// Mirrored by `PoolParams` in src/ops/pool/cuda.rs. The tensors are untyped so one block serves
// the fp16 and fp32 entry points; each kernel casts them to its A.
struct PoolParams {
    const void* x;
    const void* dy;
    void* y;
    void* dx;
    unsigned char* argmax;  // [n][oh][ow][c] window positions (pool_argmax path), else null
    int n, h, w, c, oh, ow, k, stride, pad;
    int ldy, yoff, accumulate;
};

// Window position (r * k + s) of the first maximum of window (oh, ow) in scan order (kh-major,
// then kw), ignoring padded positions, and its value: where max-pool backward sends the gradient.
template <class A>
__device__ __forceinline__ int max_window_pos(const PoolParams& p, const A* xn, int oh, int ow, int c, float* best) {
    int arg = -1;
    float m = -INF_F32;
    for (int r = 0; r < p.k; ++r) {
        int ih = oh * p.stride - p.pad + r;
        if (ih < 0 || ih >= p.h) continue;
        for (int s = 0; s < p.k; ++s) {
            int iw = ow * p.stride - p.pad + s;
            if (iw < 0 || iw >= p.w) continue;
            float v = to_f32(xn[((long long)ih * p.w + iw) * p.c + c]);
            if (arg < 0 || v > m) {
                m = v;
                arg = r * p.k + s;
            }
        }
    }
    *best = m;
    return arg;
}

// Number of non-padded positions in window (oh, ow): the average pool divisor.
__device__ __forceinline__ int window_count(const PoolParams& p, int oh, int ow) {
    int h0 = max(oh * p.stride - p.pad, 0), h1 = min(oh * p.stride - p.pad + p.k, p.h);
    int w0 = max(ow * p.stride - p.pad, 0), w1 = min(ow * p.stride - p.pad + p.k, p.w);
    return max(h1 - h0, 0) * max(w1 - w0, 0);
}

// SAVE_ARGMAX (the pool_argmax path) also writes each output's window position of its maximum
// (dense, one byte per output).
template <class A, bool SAVE_ARGMAX>
__device__ __forceinline__ void maxpool_fwd_impl(const PoolParams& p) {
    const A* x = (const A*)p.x;
    GRID_STRIDE(i, (u32)p.n * p.oh * p.ow * p.c) {
        int c = (int)(i % p.c);
        u32 pix = i / p.c;
        int ow = (int)(pix % p.ow), oh = (int)(pix / p.ow % p.oh), n = (int)(pix / (u32)(p.ow * p.oh));
        float m;
        int pos = max_window_pos(p, x + (long long)n * p.h * p.w * p.c, oh, ow, c, &m);
        if (SAVE_ARGMAX) p.argmax[i] = (unsigned char)pos;
        ((A*)p.y)[(u64)pix * p.ldy + p.yoff + c] = from_f32<A>(m);
    }
}

template <class A>
__device__ __forceinline__ void avgpool_fwd_impl(const PoolParams& p) {
    const A* x = (const A*)p.x;
    GRID_STRIDE(i, (u32)p.n * p.oh * p.ow * p.c) {
        int c = (int)(i % p.c);
        u32 pix = i / p.c;
        int ow = (int)(pix % p.ow), oh = (int)(pix / p.ow % p.oh), n = (int)(pix / (u32)(p.ow * p.oh));
        float s = 0.0f;
        for (int r = 0; r < p.k; ++r) {
            int ih = oh * p.stride - p.pad + r;
            if (ih < 0 || ih >= p.h) continue;
            for (int q = 0; q < p.k; ++q) {
                int iw = ow * p.stride - p.pad + q;
                if (iw < 0 || iw >= p.w) continue;
                s += to_f32(x[(((long long)n * p.h + ih) * p.w + iw) * p.c + c]);
            }
        }
        ((A*)p.y)[(u64)pix * p.ldy + p.yoff + c] = from_f32<A>(s / (float)window_count(p, oh, ow));
    }
}

// Output windows covering input row/col `i`: o in [lo, hi].
__device__ __forceinline__ void covering(int i, int k, int stride, int pad, int out, int* lo, int* hi) {
    int t = i + pad - k + 1;
    *lo = t <= 0 ? 0 : (t + stride - 1) / stride;
    *hi = min((i + pad) / stride, out - 1);
}

template <class A>
__device__ __forceinline__ void maxpool_bwd_impl(const PoolParams& p) {
    const A* dy = (const A*)p.dy;
    GRID_STRIDE(i, (u32)p.n * p.h * p.w * p.c) {
        int c = (int)(i % p.c);
        u32 pix = i / p.c;
        int w = (int)(pix % p.w), h = (int)(pix / p.w % p.h), n = (int)(pix / (u32)(p.w * p.h));
        int oh0, oh1, ow0, ow1;
        covering(h, p.k, p.stride, p.pad, p.oh, &oh0, &oh1);
        covering(w, p.k, p.stride, p.pad, p.ow, &ow0, &ow1);
        const A* xn = (const A*)p.x + (long long)n * p.h * p.w * p.c;
        float g = 0.0f, m;
        for (int oh = oh0; oh <= oh1; ++oh)
            for (int ow = ow0; ow <= ow1; ++ow) {
                int pos = (h - oh * p.stride + p.pad) * p.k + (w - ow * p.stride + p.pad);  // (h, w) in the window
                if (max_window_pos(p, xn, oh, ow, c, &m) == pos)
                    g += to_f32(dy[(((u64)n * p.oh + oh) * p.ow + ow) * p.ldy + p.yoff + c]);
            }
        store_acc((A*)p.dx + i, g, p.accumulate);
    }
}

// maxpool_bwd through the saved argmax: a covering window contributes when its first maximum is
// this input's position in it. No x is read.
template <class A>
__device__ __forceinline__ void maxpool_bwd_argmax_impl(const PoolParams& p) {
    const A* dy = (const A*)p.dy;
    GRID_STRIDE(i, (u32)p.n * p.h * p.w * p.c) {
        int c = (int)(i % p.c);
        u32 pix = i / p.c;
        int w = (int)(pix % p.w), h = (int)(pix / p.w % p.h), n = (int)(pix / (u32)(p.w * p.h));
        int oh0, oh1, ow0, ow1;
        covering(h, p.k, p.stride, p.pad, p.oh, &oh0, &oh1);
        covering(w, p.k, p.stride, p.pad, p.ow, &ow0, &ow1);
        float g = 0.0f;
        for (int oh = oh0; oh <= oh1; ++oh) {
            int r = h - (oh * p.stride - p.pad);
            for (int ow = ow0; ow <= ow1; ++ow) {
                u64 o = ((u64)n * p.oh + oh) * p.ow + ow;
                if (p.argmax[o * p.c + c] == r * p.k + (w - (ow * p.stride - p.pad)))
                    g += to_f32(dy[o * p.ldy + p.yoff + c]);
            }
        }
        store_acc((A*)p.dx + i, g, p.accumulate);
    }
}

template <class A>
__device__ __forceinline__ void avgpool_bwd_impl(const PoolParams& p) {
    const A* dy = (const A*)p.dy;
    GRID_STRIDE(i, (u32)p.n * p.h * p.w * p.c) {
        int c = (int)(i % p.c);
        u32 pix = i / p.c;
        int w = (int)(pix % p.w), h = (int)(pix / p.w % p.h), n = (int)(pix / (u32)(p.w * p.h));
        int oh0, oh1, ow0, ow1;
        covering(h, p.k, p.stride, p.pad, p.oh, &oh0, &oh1);
        covering(w, p.k, p.stride, p.pad, p.ow, &ow0, &ow1);
        float g = 0.0f;
        for (int oh = oh0; oh <= oh1; ++oh)
            for (int ow = ow0; ow <= ow1; ++ow)
                g += to_f32(dy[(((u64)n * p.oh + oh) * p.ow + ow) * p.ldy + p.yoff + c]) /
                     (float)window_count(p, oh, ow);
        store_acc((A*)p.dx + i, g, p.accumulate);
    }
}

extern "C" __global__ void maxpool_fwd(const PoolParams p) { maxpool_fwd_impl<__half, false>(p); }
extern "C" __global__ void maxpool_fwd_o0(const PoolParams p) { maxpool_fwd_impl<float, false>(p); }
extern "C" __global__ void avgpool_fwd(const PoolParams p) { avgpool_fwd_impl<__half>(p); }
extern "C" __global__ void avgpool_fwd_o0(const PoolParams p) { avgpool_fwd_impl<float>(p); }
extern "C" __global__ void maxpool_bwd(const PoolParams p) { maxpool_bwd_impl<__half>(p); }
extern "C" __global__ void maxpool_bwd_o0(const PoolParams p) { maxpool_bwd_impl<float>(p); }
extern "C" __global__ void maxpool_fwd_argmax(const PoolParams p) { maxpool_fwd_impl<__half, true>(p); }
extern "C" __global__ void maxpool_fwd_argmax_o0(const PoolParams p) { maxpool_fwd_impl<float, true>(p); }
extern "C" __global__ void maxpool_bwd_argmax(const PoolParams p) { maxpool_bwd_argmax_impl<__half>(p); }
extern "C" __global__ void maxpool_bwd_argmax_o0(const PoolParams p) { maxpool_bwd_argmax_impl<float>(p); }
extern "C" __global__ void avgpool_bwd(const PoolParams p) { avgpool_bwd_impl<__half>(p); }
extern "C" __global__ void avgpool_bwd_o0(const PoolParams p) { avgpool_bwd_impl<float>(p); }
