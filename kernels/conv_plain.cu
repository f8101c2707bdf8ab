// Plain convolution kernels: one thread per output value, a direct FMA loop, nothing clever.
// They are the fallback for shapes the tensor-core path does not take (channels not a multiple of
// 8, odd widths) or has not passed its self-test on, a second oracle next to the CPU reference, and
// the only convolution path at O0 (the tensor cores here are fp16 mma only).
// Same ConvParams block and semantics as conv_tc.cu. Each kernel is a template over the element
// type A of x, w, dy and out: the unsuffixed entry points take fp16 (O2/O3), `_o0` fp32. The wgrad
// partials in ws are fp32 in both.
#include "common.cuh"

template <class A>
__device__ __forceinline__ void conv_fprop_plain_impl(const ConvParams& p) {
    const A *x = conv_x<A>(p), *wt = conv_w<A>(p);
    u32 total = (u32)p.n * p.oh * p.ow * p.cout;
    GRID_STRIDE(i, total) {
        int co = (int)(i % p.cout);
        u32 pix = i / p.cout;
        int ow = (int)(pix % p.ow), oh = (int)(pix / p.ow % p.oh), n = (int)(pix / (u32)(p.ow * p.oh));
        float acc = 0.0f;
        for (int r = 0; r < p.kh; ++r) {
            int ih = oh * p.stride - p.pad_top + r;
            if (ih < 0 || ih >= p.h) continue;
            for (int s = 0; s < p.kw; ++s) {
                int iw = ow * p.stride - p.pad_left + s;
                if (iw < 0 || iw >= p.w_) continue;
                const A* xp = x + (((long long)n * p.h + ih) * p.w_ + iw) * p.cin;
                const A* wp = wt + (((long long)co * p.kh + r) * p.kw + s) * p.cin;
                for (int c = 0; c < p.cin; ++c) acc += to_f32(xp[c]) * to_f32(wp[c]);
            }
        }
        store_acc(conv_out<A>(p) + (u64)pix * p.ldc + p.c_offset + co, acc, p.accumulate);
    }
}

template <class A>
__device__ __forceinline__ void conv_dgrad_plain_impl(const ConvParams& p) {
    const A *dy = conv_dy<A>(p), *wt = conv_w<A>(p);
    u32 total = (u32)p.n * p.h * p.w_ * p.cin;
    GRID_STRIDE(i, total) {
        int ci = (int)(i % p.cin);
        u32 pix = i / p.cin;
        int w = (int)(pix % p.w_), h = (int)(pix / p.w_ % p.h), n = (int)(pix / (u32)(p.w_ * p.h));
        float acc = 0.0f;
        for (int r = 0; r < p.kh; ++r) {
            int ohs = h + p.pad_top - r;
            if (ohs < 0 || ohs % p.stride || ohs / p.stride >= p.oh) continue;
            for (int s = 0; s < p.kw; ++s) {
                int ows = w + p.pad_left - s;
                if (ows < 0 || ows % p.stride || ows / p.stride >= p.ow) continue;
                const A* dyp = dy + (((long long)n * p.oh + ohs / p.stride) * p.ow + ows / p.stride) * p.cout;
                const A* wp = wt + ((long long)r * p.kw + s) * p.cin + ci;
                long long wstride = (long long)p.kh * p.kw * p.cin;
                for (int co = 0; co < p.cout; ++co) acc += to_f32(dyp[co]) * to_f32(wp[co * wstride]);
            }
        }
        store_acc(conv_out<A>(p) + (u64)pix * p.ldc + p.c_offset + ci, acc, p.accumulate);
    }
}

// Weight gradient, split over output pixels by blockIdx.y so small filters still fill the GPU;
// each split writes fp32 partials to ws[split][cout][kh*kw*cin], summed by conv_wgrad_reduce_*.
template <class A>
__device__ __forceinline__ void conv_wgrad_plain_impl(const ConvParams& p) {
    const A *x = conv_x<A>(p), *dy = conv_dy<A>(p);
    u32 count = (u32)(p.cout * p.kh * p.kw * p.cin);
    u32 pixels = (u32)(p.n * p.oh * p.ow);
    u32 per = (pixels + gridDim.y - 1) / gridDim.y;
    u32 pbeg = per * blockIdx.y, pend = min(pixels, pbeg + per);
    GRID_STRIDE(i, count) {
        int ci = (int)(i % p.cin);
        u32 t = i / p.cin;
        int s = (int)(t % p.kw), r = (int)(t / p.kw % p.kh), co = (int)(t / (u32)(p.kw * p.kh));
        float acc = 0.0f;
        for (u32 pix = pbeg; pix < pend; ++pix) {
            int ow = (int)(pix % p.ow), oh = (int)(pix / p.ow % p.oh), n = (int)(pix / (u32)(p.ow * p.oh));
            int ih = oh * p.stride - p.pad_top + r, iw = ow * p.stride - p.pad_left + s;
            if (ih < 0 || ih >= p.h || iw < 0 || iw >= p.w_) continue;
            float xv = to_f32(x[(((long long)n * p.h + ih) * p.w_ + iw) * p.cin + ci]);
            acc += xv * to_f32(dy[(u64)pix * p.cout + co]);
        }
        p.ws[(u64)blockIdx.y * count + i] = acc;
    }
}

extern "C" __global__ void conv_fprop_plain(const ConvParams p) { conv_fprop_plain_impl<__half>(p); }
extern "C" __global__ void conv_fprop_plain_o0(const ConvParams p) { conv_fprop_plain_impl<float>(p); }
extern "C" __global__ void conv_dgrad_plain(const ConvParams p) { conv_dgrad_plain_impl<__half>(p); }
extern "C" __global__ void conv_dgrad_plain_o0(const ConvParams p) { conv_dgrad_plain_impl<float>(p); }
extern "C" __global__ void conv_wgrad_plain(const ConvParams p) { conv_wgrad_plain_impl<__half>(p); }
extern "C" __global__ void conv_wgrad_plain_o0(const ConvParams p) { conv_wgrad_plain_impl<float>(p); }
