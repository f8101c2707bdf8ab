// Convolution as implicit GEMM on tensor cores (mma.sync m16n8k16, fp16 in, fp32 accumulate),
// NHWC activations, weights [cout][kh][kw][cin]. One template serves the three GEMMs:
//
//   fprop  M = n*oh*ow   N = cout  K = kh*kw*cin    A = im2col(x) [M][K]     B = w [N][K]
//   dgrad  M = n*h*w     N = cin   K = kh*kw*cout   A = col2im(dy) [M][K]    B = w as [K][N]
//   wgrad  M = cout      N = kh*kw*cin  K = n*oh*ow A = dy as [K][M]         B = im2col(x) [K][N]
//
// A strided data gradient can instead run split by stride phase (MODE_DGRAD_PHASE, one phase per
// blockIdx.z): the whole dgrad GEMM runs every tap for every input pixel and zero-fills the taps
// that fall between output pixels (three quarters of them at stride 2, 3x3), a phase runs only the
// taps that reach its pixels (see Phase below).
//
// Operands are gathered straight from global memory in 16-byte chunks (8 channels) with cp.async,
// so the fast path needs the gathered channel count to be a multiple of 8 (the launcher checks it;
// the 3-channel stem runs on the plain kernel unless the caller pads it to 8 channels with the
// pad_channels launcher: input and weights for the forward, the input for the weight gradient,
// whose padded channels conv_wgrad_reduce_drop_f32 drops). Shared tiles are stored in the layout the operand has in
// memory ("MK"/"NK": k contiguous, read with ldmatrix; "KM"/"KN": m or n contiguous, read with
// ldmatrix.trans), padded by 8 halves per row so ldmatrix rows fall in distinct banks.
// A STAGES-deep cp.async pipeline overlaps the gathers of tile k+STAGES-1 with the MMAs of tile k.
#include "common.cuh"

#define MODE_FPROP 0
#define MODE_DGRAD 1
#define MODE_WGRAD 2
#define MODE_DGRAD_PHASE 3

template <int MODE, int BM_, int BN_, int WM, int WN, int STAGES>
struct TcConv {
    static constexpr int BM = BM_;
    static constexpr int BN = BN_;
    static constexpr int BK = 32;
    static constexpr int PAD = 8;
    static constexpr int THREADS = WM * WN * 32;
    static constexpr int WTM = BM / WM;  // warp tile rows
    static constexpr int WTN = BN / WN;  // warp tile cols
    static constexpr int MI = WTM / 16;
    static constexpr int NI = WTN / 8;
    static constexpr bool A_KM = MODE == MODE_WGRAD;  // A stored [BK][BM]
    static constexpr bool B_KN = MODE != MODE_FPROP;  // B stored [BK][BN]
    static constexpr int A_LD = A_KM ? BM + PAD : BK + PAD;
    static constexpr int B_LD = B_KN ? BN + PAD : BK + PAD;
    static constexpr int A_STAGE = A_KM ? BK * A_LD : BM * A_LD;
    static constexpr int B_STAGE = B_KN ? BK * B_LD : BN * B_LD;
    static constexpr int SMEM_BYTES = STAGES * (A_STAGE + B_STAGE) * 2;
};

struct Gemm {
    int M, N, K;
};

__device__ __forceinline__ Gemm gemm_shape(const ConvParams& p, int mode) {
    Gemm g;
    if (mode == MODE_FPROP) {
        g.M = p.n * p.oh * p.ow; g.N = p.cout; g.K = p.kh * p.kw * p.cin;
    } else if (mode == MODE_DGRAD) {
        g.M = p.n * p.h * p.w_; g.N = p.cin; g.K = p.kh * p.kw * p.cout;
    } else {
        g.M = p.cout; g.N = p.kh * p.kw * p.cin; g.K = p.n * p.oh * p.ow;
    }
    return g;
}

// One stride phase (ph, pw) of a data gradient: the input pixels (h, w) with
// (h + pad_top) % stride == ph and (w + pad_left) % stride == pw. Only the taps r = ph + i*stride,
// s = pw + j*stride reach them, through output pixel ((h + pad_top - r) / stride, ...), so the phase
// is a stride-1 GEMM over its sub-grid and its own th x tw taps: sub-grid pixel (y, x) is input
// pixel (h0 + y*stride, w0 + x*stride), and its tap (i, j) reads output pixel (qh + y - i, qw + x - j).
// The host mirror is src/ops/conv/phase.rs.
struct Phase {
    int ph, pw;  // tap offsets of the phase
    int h0, w0;  // first input row and column of the phase
    int hp, wp;  // rows and columns of its sub-grid
    int th, tw;  // its taps in each direction (0 when the kernel is narrower than the stride)
    int qh, qw;  // output row and column that tap 0 of sub-grid pixel (0, 0) reads
};

// First of the coordinates c >= 0 with (c + pad) % stride == phase.
__device__ __forceinline__ int phase_first(int phase, int pad, int stride) {
    return ((phase - pad) % stride + stride) % stride;
}

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ Phase phase_of(const ConvParams& p, int z) {
    Phase f;
    int st = p.stride;
    f.ph = z / st;
    f.pw = z % st;
    f.h0 = phase_first(f.ph, p.pad_top, st);
    f.w0 = phase_first(f.pw, p.pad_left, st);
    f.hp = f.h0 < p.h ? ceil_div(p.h - f.h0, st) : 0;
    f.wp = f.w0 < p.w_ ? ceil_div(p.w_ - f.w0, st) : 0;
    f.th = f.ph < p.kh ? ceil_div(p.kh - f.ph, st) : 0;
    f.tw = f.pw < p.kw ? ceil_div(p.kw - f.pw, st) : 0;
    f.qh = (f.h0 + p.pad_top - f.ph) / st;
    f.qw = (f.w0 + p.pad_left - f.pw) / st;
    return f;
}

__device__ __forceinline__ Gemm phase_gemm(const ConvParams& p, const Phase& f) {
    Gemm g;
    g.M = p.n * f.hp * f.wp; g.N = p.cin; g.K = f.th * f.tw * p.cout;
    return g;
}

// Input pixel (row of dx) of GEMM row m: m itself, or for a phase its sub-grid pixel's.
template <int MODE>
__device__ __forceinline__ long long out_pixel(const ConvParams& p, const Phase& f, int m) {
    if constexpr (MODE != MODE_DGRAD_PHASE) {
        return m;
    } else {
        int x = m % f.wp, t = m / f.wp, y = t % f.hp, img = t / f.hp;
        return ((long long)img * p.h + f.h0 + y * p.stride) * p.w_ + f.w0 + x * p.stride;
    }
}

// Thread-private state of the A gather of fprop (im2col of x) and dgrad (dy seen through the
// transposed convolution; for a phase, through its own taps). The rows a thread loads stay the same
// for the whole K loop, so their pixel decode happens once; the K position (channel, tap) advances
// by BK per stage with carries instead of divisions. Integer work per stage would otherwise rival
// the MMA work.
template <int MODE, class T>
struct GatherA {
    static constexpr bool PHASE = MODE == MODE_DGRAD_PHASE;
    static constexpr int CPR = T::BK / 8;                 // 16-byte chunks per row
    static constexpr int ROW_STEP = T::THREADS / CPR;     // rows between one thread's chunks
    static constexpr int ROWS = T::BM / ROW_STEP;         // chunks per thread
    int img[ROWS], py[ROWS], px[ROWS];  // image (-1: row past M) and tap-(0,0) coordinates
    int k, ch, r, s;                    // K position of this thread's chunk and its decode
    int taps_w;                         // phase: its taps per row (at least 1, so K decodes)

    __device__ __forceinline__ int channels(const ConvParams& p) const {
        return MODE == MODE_FPROP ? p.cin : p.cout;
    }

    __device__ __forceinline__ int kw(const ConvParams& p) const { return PHASE ? taps_w : p.kw; }

    __device__ __forceinline__ void init(const ConvParams& p, const Gemm& g, const Phase& f, int m0, int k0) {
        taps_w = PHASE ? max(f.tw, 1) : p.kw;
        k = k0 + (threadIdx.x % CPR) * 8;
        int cc = channels(p), rs = k / cc;
        ch = k % cc;
        s = rs % kw(p);
        r = rs / kw(p);
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            int m = m0 + threadIdx.x / CPR + i * ROW_STEP;
            int wd = MODE == MODE_FPROP ? p.ow : p.w_, ht = MODE == MODE_FPROP ? p.oh : p.h;
            if constexpr (PHASE) {
                wd = f.wp;
                ht = f.hp;
            }
            int x = m % wd, t = m / wd, y = t % ht;
            img[i] = m < g.M ? t / ht : -1;
            // fprop: input coordinate of tap (0,0); dgrad: the padded input coordinate; phase: the
            // output coordinate tap (0,0) reads.
            py[i] = MODE == MODE_FPROP ? y * p.stride - p.pad_top : y + p.pad_top;
            px[i] = MODE == MODE_FPROP ? x * p.stride - p.pad_left : x + p.pad_left;
            if constexpr (PHASE) {
                py[i] = y + f.qh;
                px[i] = x + f.qw;
            }
        }
    }

    // Source of chunk i at the current K position, or nullptr for zeros (padding, stride hole,
    // past M or K).
    __device__ __forceinline__ const __half* src(const ConvParams& p, const Gemm& g, int i) const {
        if (img[i] < 0 || k >= g.K) return nullptr;
        if constexpr (MODE == MODE_FPROP) {
            int ih = py[i] + r, iw = px[i] + s;
            if (ih < 0 || ih >= p.h || iw < 0 || iw >= p.w_) return nullptr;
            return conv_x<__half>(p) + (((long long)img[i] * p.h + ih) * p.w_ + iw) * p.cin + ch;
        } else if constexpr (PHASE) {
            int oh = py[i] - r, ow = px[i] - s;  // every tap of a phase lands on an output pixel
            if (oh < 0 || ow < 0 || oh >= p.oh || ow >= p.ow) return nullptr;
            return conv_dy<__half>(p) + (((long long)img[i] * p.oh + oh) * p.ow + ow) * p.cout + ch;
        } else {
            int ohs = py[i] - r, ows = px[i] - s;
            if (ohs < 0 || ows < 0 || ohs % p.stride || ows % p.stride) return nullptr;
            int oh = ohs / p.stride, ow = ows / p.stride;
            if (oh >= p.oh || ow >= p.ow) return nullptr;
            return conv_dy<__half>(p) + (((long long)img[i] * p.oh + oh) * p.ow + ow) * p.cout + ch;
        }
    }

    // Issues this thread's chunks of the next K tile into sA, then steps K by BK.
    __device__ __forceinline__ void load(const ConvParams& p, const Gemm& g, __half* sA) {
        int row0 = threadIdx.x / CPR, col = (threadIdx.x % CPR) * 8;
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const __half* src_i = src(p, g, i);
            cp_async16(sA + (row0 + i * ROW_STEP) * T::A_LD + col, src_i ? src_i : conv_w<__half>(p),
                       src_i != nullptr);
        }
        k += T::BK;
        ch += T::BK;
        int cc = channels(p);
        if (ch >= cc) {
            int q = ch / cc;
            ch -= q * cc;
            s += q;
            if (s >= kw(p)) {
                q = s / kw(p);
                s -= q * kw(p);
                r += q;
            }
        }
    }
};

// Thread-private state of the wgrad B gather: B[k = output pixel][n = (r, s, ci)] = x at that tap.
// A thread's column (tap and channel) is fixed, so it is decoded once; its rows are output pixels
// that advance by BK per stage, carried through (ow, oh, image) without divisions in the common case.
template <class T>
struct GatherBWgrad {
    static constexpr int CPR = T::BN / 8;
    static constexpr int ROW_STEP = T::THREADS / CPR;
    static constexpr int ROWS = T::BK / ROW_STEP;
    int img[ROWS], oy[ROWS], ox[ROWS];  // output pixel of each row
    int k;                              // output pixel index of row 0
    int r, s, ci;                       // tap and channel of this thread's column (r = -1: past N)

    __device__ __forceinline__ void init(const ConvParams& p, const Gemm& g, int n0, int k0) {
        int n = n0 + (threadIdx.x % CPR) * 8, rs = n / p.cin;
        ci = n % p.cin;
        s = rs % p.kw;
        r = n < g.N ? rs / p.kw : -1;
        k = k0 + threadIdx.x / CPR;
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            int pix = k + i * ROW_STEP, t = pix / p.ow;
            ox[i] = pix % p.ow;
            oy[i] = t % p.oh;
            img[i] = t / p.oh;
        }
    }

    __device__ __forceinline__ const __half* src(const ConvParams& p, const Gemm& g, int i) const {
        if (r < 0 || k + i * ROW_STEP >= g.K) return nullptr;
        int ih = oy[i] * p.stride - p.pad_top + r, iw = ox[i] * p.stride - p.pad_left + s;
        if (ih < 0 || ih >= p.h || iw < 0 || iw >= p.w_) return nullptr;
        return conv_x<__half>(p) + (((long long)img[i] * p.h + ih) * p.w_ + iw) * p.cin + ci;
    }

    __device__ __forceinline__ void load(const ConvParams& p, const Gemm& g, __half* sB) {
        int row0 = threadIdx.x / CPR, col = (threadIdx.x % CPR) * 8;
#pragma unroll
        for (int i = 0; i < ROWS; ++i) {
            const __half* src_i = src(p, g, i);
            cp_async16(sB + (row0 + i * ROW_STEP) * T::B_LD + col, src_i ? src_i : conv_dy<__half>(p),
                       src_i != nullptr);
            ox[i] += T::BK;
            if (ox[i] >= p.ow) {
                int q = ox[i] / p.ow;
                ox[i] -= q * p.ow;
                oy[i] += q;
                if (oy[i] >= p.oh) {
                    q = oy[i] / p.oh;
                    oy[i] -= q * p.oh;
                    img[i] += q;
                }
            }
        }
        k += T::BK;
    }
};

// wgrad A tile: A[m = co][k = pixel] = dy[pixel][co], co contiguous (no index decode needed).
template <class T>
__device__ __forceinline__ void load_a_wgrad(const ConvParams& p, const Gemm& g, __half* sA, int m0, int k0) {
    constexpr int CPR = T::BM / 8;
    for (int c = threadIdx.x; c < T::BK * CPR; c += T::THREADS) {
        int row = c / CPR, col = (c % CPR) * 8;
        int k = k0 + row, m = m0 + col;
        bool ok = k < g.K && m < g.M;
        const __half* dy = conv_dy<__half>(p);
        cp_async16(sA + row * T::A_LD + col, ok ? dy + (long long)k * p.cout + m : dy, ok);
    }
}

// fprop B tile: B[n = co][k] = w[co][k], k contiguous.
template <class T>
__device__ __forceinline__ void load_b_fprop(const ConvParams& p, const Gemm& g, __half* sB, int n0, int k0) {
    for (int c = threadIdx.x; c < T::BN * (T::BK / 8); c += T::THREADS) {
        int row = c >> 2, col = (c & 3) * 8;
        int n = n0 + row, k = k0 + col;
        bool ok = n < g.N && k < g.K;
        const __half* w = conv_w<__half>(p);
        cp_async16(sB + row * T::B_LD + col, ok ? w + (long long)n * g.K + k : w, ok);
    }
}

// dgrad B tile: B[k = (r, s, co)][n = ci] = w[co][r][s][ci], ci contiguous; for a phase k runs over
// its own taps (i, j), tap (ph + i*stride, pw + j*stride) of the kernel. The weights are small and
// reused by every block, so the per-chunk decode here is not worth carrying state for.
template <int MODE, class T>
__device__ __forceinline__ void load_b_dgrad(const ConvParams& p, const Gemm& g, const Phase& f, __half* sB,
                                             int n0, int k0) {
    constexpr int CPR = T::BN / 8;
    for (int c = threadIdx.x; c < T::BK * CPR; c += T::THREADS) {
        int row = c / CPR, col = (c % CPR) * 8;
        int k = k0 + row, n = n0 + col;
        bool ok = k < g.K && n < g.N;
        const __half* src = conv_w<__half>(p);
        if (ok) {
            int co = k % p.cout, rs = k / p.cout;
            if constexpr (MODE == MODE_DGRAD_PHASE) {
                int i = rs / f.tw, j = rs % f.tw;
                rs = (f.ph + i * p.stride) * p.kw + f.pw + j * p.stride;
            }
            src = conv_w<__half>(p) + ((long long)co * (p.kh * p.kw) + rs) * p.cin + n;
        }
        cp_async16(sB + row * T::B_LD + col, src, ok);
    }
}

// MMAs over one BK-deep stage for this warp's WTM x WTN tile.
template <class T>
__device__ __forceinline__ void mma_stage(const __half* sA, const __half* sB, float acc[T::MI][T::NI][4],
                                          int wm, int wn) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int kk = 0; kk < T::BK; kk += 16) {
        u32 a[T::MI][4], b[T::NI][2];
#pragma unroll
        for (int i = 0; i < T::MI; ++i) {
            int mb = wm * T::WTM + i * 16;
            if constexpr (T::A_KM) {
                int k = kk + (lane & 7) + ((lane >> 4) << 3), m = mb + (((lane >> 3) & 1) << 3);
                ldmatrix_x4_trans(a[i], sA + k * T::A_LD + m);
            } else {
                ldmatrix_x4(a[i], sA + (mb + (lane & 15)) * T::A_LD + kk + ((lane >> 4) << 3));
            }
        }
#pragma unroll
        for (int j = 0; j < T::NI; j += 2) {
            int nb = wn * T::WTN + j * 8;
            u32 r[4];
            if constexpr (T::B_KN) {
                int k = kk + (lane & 7) + (((lane >> 3) & 1) << 3), n = nb + ((lane >> 4) << 3);
                ldmatrix_x4_trans(r, sB + k * T::B_LD + n);
            } else {
                int n = nb + (lane & 7) + ((lane >> 4) << 3), k = kk + (((lane >> 3) & 1) << 3);
                ldmatrix_x4(r, sB + n * T::B_LD + k);
            }
            b[j][0] = r[0]; b[j][1] = r[1]; b[j + 1][0] = r[2]; b[j + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < T::MI; ++i)
#pragma unroll
            for (int j = 0; j < T::NI; ++j) mma_16816(acc[i][j], a[i], b[j]);
    }
}

// Writes the accumulators: fp16 into out (fprop/dgrad, with ldc/c_offset/accumulate) or fp32
// split-K partials into ws (wgrad). N is even on this path, so pairs are stored together.
template <int MODE, class T>
__device__ __forceinline__ void epilogue(const ConvParams& p, const Gemm& g, const Phase& f,
                                         float acc[T::MI][T::NI][4], int m0, int n0, int wm, int wn) {
    int lane = threadIdx.x & 31, gr = lane >> 2, tc = (lane & 3) * 2;
#pragma unroll
    for (int i = 0; i < T::MI; ++i)
#pragma unroll
        for (int j = 0; j < T::NI; ++j)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                int m = m0 + wm * T::WTM + i * 16 + gr + h * 8;
                int n = n0 + wn * T::WTN + j * 8 + tc;
                if (m >= g.M || n >= g.N) continue;
                float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];
                if constexpr (MODE == MODE_WGRAD) {
                    float2* dst = (float2*)(p.ws + ((long long)blockIdx.z * g.M + m) * g.N + n);
                    *dst = make_float2(v0, v1);
                } else {
                    long long row = out_pixel<MODE>(p, f, m);
                    __half2* dst = (__half2*)(conv_out<__half>(p) + row * p.ldc + p.c_offset + n);
                    if (p.accumulate) {
                        float2 old = __half22float2(*dst);
                        v0 += old.x; v1 += old.y;
                    }
                    *dst = __floats2half2_rn(v0, v1);
                }
            }
}

template <int MODE, int BM, int BN, int WM, int WN, int STAGES>
__device__ __forceinline__ void tc_conv(const ConvParams& p) {
    typedef TcConv<MODE, BM, BN, WM, WN, STAGES> T;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    __half* sA = (__half*)smem_raw;
    __half* sB = sA + STAGES * T::A_STAGE;
    constexpr bool PHASE = MODE == MODE_DGRAD_PHASE;
    Phase f = {};
    if constexpr (PHASE) f = phase_of(p, blockIdx.z);
    Gemm g = PHASE ? phase_gemm(p, f) : gemm_shape(p, MODE);
    int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    // The grid covers the largest phase; the blocks past a smaller one have nothing to do.
    if (PHASE && m0 >= g.M) return;
    int warp = threadIdx.x >> 5, wm = warp / WN, wn = warp % WN;
    int k_tiles = (g.K + T::BK - 1) / T::BK;
    int kt0 = 0, kt1 = k_tiles;
    if constexpr (MODE == MODE_WGRAD) {
        kt0 = blockIdx.z * p.k_tiles_per_split;
        kt1 = min(k_tiles, kt0 + p.k_tiles_per_split);
    }
    float acc[T::MI][T::NI][4];
#pragma unroll
    for (int i = 0; i < T::MI; ++i)
#pragma unroll
        for (int j = 0; j < T::NI; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // Gather states (only those of this mode are used; the rest compile away).
    GatherA<MODE, T> ga;
    GatherBWgrad<T> gb;
    if constexpr (MODE != MODE_WGRAD) ga.init(p, g, f, m0, kt0 * T::BK);
    if constexpr (MODE == MODE_WGRAD) gb.init(p, g, n0, kt0 * T::BK);
    // Loads K tile kt into stage st. Tiles are loaded strictly in order, which the gather states
    // rely on (each load steps them by one tile).
    auto load_tile = [&](int st, int kt) {
        __half* a = sA + st * T::A_STAGE;
        __half* b = sB + st * T::B_STAGE;
        if constexpr (MODE == MODE_FPROP) {
            ga.load(p, g, a);
            load_b_fprop<T>(p, g, b, n0, kt * T::BK);
        } else if constexpr (MODE == MODE_DGRAD || PHASE) {
            ga.load(p, g, a);
            load_b_dgrad<MODE, T>(p, g, f, b, n0, kt * T::BK);
        } else {
            load_a_wgrad<T>(p, g, a, m0, kt * T::BK);
            gb.load(p, g, b);
        }
    };

    // Prologue: fill STAGES-1 stages (empty commit groups keep the wait arithmetic uniform).
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (kt0 + s < kt1) load_tile(s, kt0 + s);
        cp_async_commit();
    }
    for (int kt = kt0; kt < kt1; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt landed for everyone; stage (kt-1) is no longer being read
        int next = kt + STAGES - 1;
        if (next < kt1) load_tile((next - kt0) % STAGES, next);
        cp_async_commit();
        int cur = (kt - kt0) % STAGES;
        mma_stage<T>(sA + cur * T::A_STAGE, sB + cur * T::B_STAGE, acc, wm, wn);
    }
    cp_async_wait<0>();
    epilogue<MODE, T>(p, g, f, acc, m0, n0, wm, wn);
}

// Entry points. Name: conv_{mode}_tc_{BM}x{BN} (mode dgrad_phase for the phase-split data
// gradient); the launcher computes the dynamic shared memory as STAGES * ((A tile) + (B tile)) * 2
// bytes, matching TcConv::SMEM_BYTES. The narrow tiles serve GEMMs with a small side: 128x32 a
// 32-wide N (fprop cout, dgrad cin), 32x64 a 32-high M (wgrad cout); each warp keeps a 32x32 or
// 16x32 tile, so no warp idles on columns past N.
#define TC_ENTRY(NAME, MODE, BM, BN, WM, WN)                                                 \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32) NAME(const ConvParams p) { \
        tc_conv<MODE, BM, BN, WM, WN, 3>(p);                                             \
    }

TC_ENTRY(conv_fprop_tc_128x128, MODE_FPROP, 128, 128, 2, 4)
TC_ENTRY(conv_fprop_tc_128x64, MODE_FPROP, 128, 64, 2, 2)
TC_ENTRY(conv_fprop_tc_64x64, MODE_FPROP, 64, 64, 2, 2)
TC_ENTRY(conv_fprop_tc_128x32, MODE_FPROP, 128, 32, 4, 1)
TC_ENTRY(conv_dgrad_tc_128x128, MODE_DGRAD, 128, 128, 2, 4)
TC_ENTRY(conv_dgrad_tc_128x64, MODE_DGRAD, 128, 64, 2, 2)
TC_ENTRY(conv_dgrad_tc_64x64, MODE_DGRAD, 64, 64, 2, 2)
TC_ENTRY(conv_dgrad_tc_128x32, MODE_DGRAD, 128, 32, 4, 1)
TC_ENTRY(conv_dgrad_phase_tc_128x128, MODE_DGRAD_PHASE, 128, 128, 2, 4)
TC_ENTRY(conv_dgrad_phase_tc_128x64, MODE_DGRAD_PHASE, 128, 64, 2, 2)
TC_ENTRY(conv_dgrad_phase_tc_64x64, MODE_DGRAD_PHASE, 64, 64, 2, 2)
TC_ENTRY(conv_dgrad_phase_tc_128x32, MODE_DGRAD_PHASE, 128, 32, 4, 1)
TC_ENTRY(conv_wgrad_tc_128x128, MODE_WGRAD, 128, 128, 2, 4)
TC_ENTRY(conv_wgrad_tc_128x64, MODE_WGRAD, 128, 64, 2, 2)
TC_ENTRY(conv_wgrad_tc_64x64, MODE_WGRAD, 64, 64, 2, 2)
TC_ENTRY(conv_wgrad_tc_32x64, MODE_WGRAD, 32, 64, 2, 2)

// Sums the split-K partials of a weight gradient: dw[i] (+)= sum_z ws[z][i], in split order so the
// result is deterministic. fp32 output (the flat gradient buffer) or fp16.
extern "C" __global__ void conv_wgrad_reduce_f32(const float* ws, int splits, u64 count, float* dw, int accumulate) {
    GRID_STRIDE(i, count) {
        float s = accumulate ? dw[i] : 0.0f;
        for (int z = 0; z < splits; ++z) s += ws[(u64)z * count + i];
        dw[i] = s;
    }
}
extern "C" __global__ void conv_wgrad_reduce_f16(const float* ws, int splits, u64 count, __half* dw, int accumulate) {
    GRID_STRIDE(i, count) {
        float s = 0.0f;
        for (int z = 0; z < splits; ++z) s += ws[(u64)z * count + i];
        store_half(dw + i, s, accumulate);
    }
}

// The weight gradient of a convolution computed over its input padded to `cin_pad` channels (the
// 3-channel stem over its 8-channel copy, on the tensor cores): sums the split-K partials
// ws[z][cout*kh*kw][cin_pad] into dw[cout*kh*kw][cin], dropping the padded channels.
extern "C" __global__ void conv_wgrad_reduce_drop_f32(const float* ws, int splits, u64 count, int cin, int cin_pad,
                                                      float* dw, int accumulate) {
    u64 per_split = count / cin * cin_pad;
    GRID_STRIDE(i, count) {
        u64 j = (u64)(i / cin) * cin_pad + i % cin;
        float s = accumulate ? dw[i] : 0.0f;
        for (int z = 0; z < splits; ++z) s += ws[(u64)z * per_split + j];
        dw[i] = s;
    }
}
