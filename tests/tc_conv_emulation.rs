//! A thread-by-thread CPU emulation of the tensor-core implicit-GEMM convolution in
//! kernels/conv_tc.cu, checked against a direct convolution. It mirrors the kernel's index math
//! line for line: the per-thread gather states (pixel decode once, K carries per stage), the tile
//! loaders with zero-fill (src-size 0) predication, the shared-memory layouts and stage ring, the
//! per-lane ldmatrix(.trans) addresses, the mma.sync m16n8k16 fragment layouts of the PTX ISA, and
//! the epilogue (ldc / c_offset / accumulate, split-K partials). Integer-valued operands keep fp32
//! exact, so any index slip shows as a mismatch. It cannot see races (it runs the pipeline in
//! order); those were reviewed by hand.
//!
//! Keep in sync with conv_tc.cu: a change there needs the same change here.

// Index loops mirror the kernel's `for (int i = 0; i < MI; ++i)` on purpose.
#![allow(clippy::needless_range_loop)]

const BK: i64 = 32;
const PAD: i64 = 8;
const STAGES: i64 = 3;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Fprop,
    Dgrad,
    Wgrad,
}

#[derive(Clone, Copy, Debug)]
struct P {
    n: i64,
    h: i64,
    w: i64,
    cin: i64,
    cout: i64,
    kh: i64,
    kw: i64,
    stride: i64,
    pad_top: i64,
    pad_left: i64,
    oh: i64,
    ow: i64,
    ldc: i64,
    c_offset: i64,
    accumulate: bool,
    k_tiles_per_split: i64,
}

#[derive(Clone, Copy, Debug)]
struct Cfg {
    mode: Mode,
    bm: i64,
    bn: i64,
    wm: i64,
    wn: i64,
}

impl Cfg {
    fn threads(&self) -> i64 {
        self.wm * self.wn * 32
    }
    fn a_km(&self) -> bool {
        self.mode == Mode::Wgrad
    }
    fn b_kn(&self) -> bool {
        self.mode != Mode::Fprop
    }
    fn a_ld(&self) -> i64 {
        if self.a_km() {
            self.bm + PAD
        } else {
            BK + PAD
        }
    }
    fn b_ld(&self) -> i64 {
        if self.b_kn() {
            self.bn + PAD
        } else {
            BK + PAD
        }
    }
    fn a_stage(&self) -> i64 {
        if self.a_km() {
            BK * self.a_ld()
        } else {
            self.bm * self.a_ld()
        }
    }
    fn b_stage(&self) -> i64 {
        if self.b_kn() {
            BK * self.b_ld()
        } else {
            self.bn * self.b_ld()
        }
    }
}

fn gemm(p: &P, mode: Mode) -> (i64, i64, i64) {
    match mode {
        Mode::Fprop => (p.n * p.oh * p.ow, p.cout, p.kh * p.kw * p.cin),
        Mode::Dgrad => (p.n * p.h * p.w, p.cin, p.kh * p.kw * p.cout),
        Mode::Wgrad => (p.cout, p.kh * p.kw * p.cin, p.n * p.oh * p.ow),
    }
}

/// cp.async 16 bytes: 8 halves from `src[at..]`, or zeros (src-size 0). Checks the 16-byte
/// alignment the kernel relies on (operand bases are 16-byte aligned).
fn cp16(dst: &mut [f32], d: i64, src: &[f32], at: Option<i64>) {
    assert_eq!(d % 8, 0, "shared destination not 16-byte aligned");
    for e in 0..8 {
        dst[(d + e) as usize] = match at {
            Some(a) => {
                assert_eq!(a % 8, 0, "global source not 16-byte aligned");
                src[(a + e) as usize]
            }
            None => 0.0,
        };
    }
}

/// GatherA (fprop im2col of x, dgrad transposed view of dy) of one thread.
struct GatherA {
    img: Vec<i64>,
    py: Vec<i64>,
    px: Vec<i64>,
    k: i64,
    ch: i64,
    r: i64,
    s: i64,
}

impl GatherA {
    const CPR: i64 = BK / 8;
    fn row_step(c: &Cfg) -> i64 {
        c.threads() / Self::CPR
    }
    fn channels(c: &Cfg, p: &P) -> i64 {
        if c.mode == Mode::Fprop {
            p.cin
        } else {
            p.cout
        }
    }
    fn init(c: &Cfg, p: &P, t: i64, m0: i64, k0: i64) -> Self {
        let (gm, _, _) = gemm(p, c.mode);
        let k = k0 + (t % Self::CPR) * 8;
        let cc = Self::channels(c, p);
        let rs = k / cc;
        let rows = c.bm / Self::row_step(c);
        let mut g = GatherA {
            img: vec![0; rows as usize],
            py: vec![0; rows as usize],
            px: vec![0; rows as usize],
            k,
            ch: k % cc,
            r: rs / p.kw,
            s: rs % p.kw,
        };
        for i in 0..rows as usize {
            let m = m0 + t / Self::CPR + i as i64 * Self::row_step(c);
            let (wd, ht) = if c.mode == Mode::Fprop {
                (p.ow, p.oh)
            } else {
                (p.w, p.h)
            };
            let (x, tt) = (m % wd, m / wd);
            let y = tt % ht;
            g.img[i] = if m < gm { tt / ht } else { -1 };
            if c.mode == Mode::Fprop {
                g.py[i] = y * p.stride - p.pad_top;
                g.px[i] = x * p.stride - p.pad_left;
            } else {
                g.py[i] = y + p.pad_top;
                g.px[i] = x + p.pad_left;
            }
        }
        g
    }
    fn src(&self, c: &Cfg, p: &P, i: usize) -> Option<i64> {
        let (_, _, gk) = gemm(p, c.mode);
        if self.img[i] < 0 || self.k >= gk {
            return None;
        }
        if c.mode == Mode::Fprop {
            let (ih, iw) = (self.py[i] + self.r, self.px[i] + self.s);
            if ih < 0 || ih >= p.h || iw < 0 || iw >= p.w {
                return None;
            }
            Some(((self.img[i] * p.h + ih) * p.w + iw) * p.cin + self.ch)
        } else {
            let (ohs, ows) = (self.py[i] - self.r, self.px[i] - self.s);
            if ohs < 0 || ows < 0 || ohs % p.stride != 0 || ows % p.stride != 0 {
                return None;
            }
            let (oh, ow) = (ohs / p.stride, ows / p.stride);
            if oh >= p.oh || ow >= p.ow {
                return None;
            }
            Some(((self.img[i] * p.oh + oh) * p.ow + ow) * p.cout + self.ch)
        }
    }
    fn load(&mut self, c: &Cfg, p: &P, t: i64, sa: &mut [f32], src: &[f32]) {
        let (row0, col) = (t / Self::CPR, (t % Self::CPR) * 8);
        for i in 0..self.img.len() {
            let at = self.src(c, p, i);
            cp16(
                sa,
                (row0 + i as i64 * Self::row_step(c)) * c.a_ld() + col,
                src,
                at,
            );
        }
        self.k += BK;
        self.ch += BK;
        let cc = Self::channels(c, p);
        if self.ch >= cc {
            let q = self.ch / cc;
            self.ch -= q * cc;
            self.s += q;
            if self.s >= p.kw {
                let q = self.s / p.kw;
                self.s -= q * p.kw;
                self.r += q;
            }
        }
    }
}

/// GatherBWgrad of one thread.
struct GatherB {
    img: Vec<i64>,
    oy: Vec<i64>,
    ox: Vec<i64>,
    k: i64,
    r: i64,
    s: i64,
    ci: i64,
}

impl GatherB {
    fn cpr(c: &Cfg) -> i64 {
        c.bn / 8
    }
    fn row_step(c: &Cfg) -> i64 {
        c.threads() / Self::cpr(c)
    }
    fn init(c: &Cfg, p: &P, t: i64, n0: i64, k0: i64) -> Self {
        let (_, gn, _) = gemm(p, c.mode);
        let n = n0 + (t % Self::cpr(c)) * 8;
        let rs = n / p.cin;
        let rows = (BK / Self::row_step(c)) as usize;
        let mut g = GatherB {
            img: vec![0; rows],
            oy: vec![0; rows],
            ox: vec![0; rows],
            k: k0 + t / Self::cpr(c),
            r: if n < gn { rs / p.kw } else { -1 },
            s: rs % p.kw,
            ci: n % p.cin,
        };
        for i in 0..rows {
            let pix = g.k + i as i64 * Self::row_step(c);
            let tt = pix / p.ow;
            g.ox[i] = pix % p.ow;
            g.oy[i] = tt % p.oh;
            g.img[i] = tt / p.oh;
        }
        g
    }
    fn src(&self, c: &Cfg, p: &P, i: usize) -> Option<i64> {
        let (_, _, gk) = gemm(p, c.mode);
        if self.r < 0 || self.k + i as i64 * Self::row_step(c) >= gk {
            return None;
        }
        let ih = self.oy[i] * p.stride - p.pad_top + self.r;
        let iw = self.ox[i] * p.stride - p.pad_left + self.s;
        if ih < 0 || ih >= p.h || iw < 0 || iw >= p.w {
            return None;
        }
        Some(((self.img[i] * p.h + ih) * p.w + iw) * p.cin + self.ci)
    }
    fn load(&mut self, c: &Cfg, p: &P, t: i64, sb: &mut [f32], x: &[f32]) {
        let (row0, col) = (t / Self::cpr(c), (t % Self::cpr(c)) * 8);
        for i in 0..self.img.len() {
            let at = self.src(c, p, i);
            cp16(
                sb,
                (row0 + i as i64 * Self::row_step(c)) * c.b_ld() + col,
                x,
                at,
            );
            self.ox[i] += BK;
            if self.ox[i] >= p.ow {
                let q = self.ox[i] / p.ow;
                self.ox[i] -= q * p.ow;
                self.oy[i] += q;
                if self.oy[i] >= p.oh {
                    let q = self.oy[i] / p.oh;
                    self.oy[i] -= q * p.oh;
                    self.img[i] += q;
                }
            }
        }
        self.k += BK;
    }
}

struct Ops<'a> {
    x: &'a [f32],
    w: &'a [f32],
    dy: &'a [f32],
}

fn load_a_wgrad(c: &Cfg, p: &P, t: i64, sa: &mut [f32], m0: i64, k0: i64, dy: &[f32]) {
    let (gm, _, gk) = gemm(p, c.mode);
    let cpr = c.bm / 8;
    let mut i = t;
    while i < BK * cpr {
        let (row, col) = (i / cpr, (i % cpr) * 8);
        let (k, m) = (k0 + row, m0 + col);
        let ok = k < gk && m < gm;
        cp16(sa, row * c.a_ld() + col, dy, ok.then_some(k * p.cout + m));
        i += c.threads();
    }
}

fn load_b_fprop(c: &Cfg, p: &P, t: i64, sb: &mut [f32], n0: i64, k0: i64, w: &[f32]) {
    let (_, gn, gk) = gemm(p, c.mode);
    let mut i = t;
    while i < c.bn * (BK / 8) {
        let (row, col) = (i >> 2, (i & 3) * 8);
        let (n, k) = (n0 + row, k0 + col);
        let ok = n < gn && k < gk;
        cp16(sb, row * c.b_ld() + col, w, ok.then_some(n * gk + k));
        i += c.threads();
    }
}

fn load_b_dgrad(c: &Cfg, p: &P, t: i64, sb: &mut [f32], n0: i64, k0: i64, w: &[f32]) {
    let (_, gn, gk) = gemm(p, c.mode);
    let cpr = c.bn / 8;
    let mut i = t;
    while i < BK * cpr {
        let (row, col) = (i / cpr, (i % cpr) * 8);
        let (k, n) = (k0 + row, n0 + col);
        let ok = k < gk && n < gn;
        let at = ok.then(|| {
            let (co, rs) = (k % p.cout, k / p.cout);
            (co * (p.kh * p.kw) + rs) * p.cin + n
        });
        cp16(sb, row * c.b_ld() + col, w, at);
        i += c.threads();
    }
}

/// ldmatrix.x4 (optionally .trans): lane l supplies the row address of row l%8 of matrix l/8;
/// register i of lane l holds two halves of matrix i (PTX ISA, "Warp-level matrix load").
fn ldmatrix(smem: &[f32], addr: &[i64; 32], trans: bool) -> [[[f32; 2]; 4]; 32] {
    let mut out = [[[0.0; 2]; 4]; 32];
    for (l, regs) in out.iter_mut().enumerate() {
        for (i, reg) in regs.iter_mut().enumerate() {
            for (h, v) in reg.iter_mut().enumerate() {
                let (row, col) = if trans {
                    (2 * (l % 4) + h, l / 4)
                } else {
                    (l / 4, 2 * (l % 4) + h)
                };
                let a = addr[8 * i + row];
                assert_eq!(a % 8, 0, "ldmatrix row address not 16-byte aligned");
                *v = smem[(a + col as i64) as usize];
            }
        }
    }
    out
}

/// mma.sync.m16n8k16.row.col f32.f16.f16.f32 with the PTX ISA fragment layouts:
/// A reg r half h of lane l = A[l/4 + 8*(r%2)][2*(l%4) + h + 8*(r/2)],
/// B reg r half h = B[k = 2*(l%4) + h + 8*r][n = l/4], C elem e = C[l/4 + 8*(e/2)][2*(l%4) + e%2].
fn mma(a: &[[[f32; 2]; 4]; 32], b: &[[[f32; 2]; 2]; 32], c: &mut [[f32; 4]; 32]) {
    let mut am = [[0.0f32; 16]; 16];
    let mut bm = [[0.0f32; 8]; 16];
    for l in 0..32 {
        for r in 0..4 {
            for h in 0..2 {
                am[l / 4 + 8 * (r % 2)][2 * (l % 4) + h + 8 * (r / 2)] = a[l][r][h];
            }
        }
        for r in 0..2 {
            for h in 0..2 {
                bm[2 * (l % 4) + h + 8 * r][l / 4] = b[l][r][h];
            }
        }
    }
    for (l, cl) in c.iter_mut().enumerate() {
        for (e, v) in cl.iter_mut().enumerate() {
            let (row, col) = (l / 4 + 8 * (e / 2), 2 * (l % 4) + e % 2);
            *v += (0..16).map(|k| am[row][k] * bm[k][col]).sum::<f32>();
        }
    }
}

/// acc[warp][i][j] = per-lane C fragments.
type Acc = Vec<Vec<Vec<[[f32; 4]; 32]>>>;

fn mma_stage(c: &Cfg, sa: &[f32], sb: &[f32], acc: &mut Acc) {
    let (wtm, wtn) = (c.bm / c.wm, c.bn / c.wn);
    let (mi, ni) = ((wtm / 16) as usize, (wtn / 8) as usize);
    for (warp, acc_w) in acc.iter_mut().enumerate() {
        let (wm, wn) = (warp as i64 / c.wn, warp as i64 % c.wn);
        for kk in (0..BK).step_by(16) {
            let mut a = Vec::new();
            for i in 0..mi as i64 {
                let mb = wm * wtm + i * 16;
                let mut addr = [0i64; 32];
                for (lane, ad) in addr.iter_mut().enumerate() {
                    let lane = lane as i64;
                    *ad = if c.a_km() {
                        let k = kk + (lane & 7) + ((lane >> 4) << 3);
                        let m = mb + (((lane >> 3) & 1) << 3);
                        k * c.a_ld() + m
                    } else {
                        (mb + (lane & 15)) * c.a_ld() + kk + ((lane >> 4) << 3)
                    };
                }
                a.push(ldmatrix(sa, &addr, c.a_km()));
            }
            let mut b = vec![[[[0.0f32; 2]; 2]; 32]; ni];
            for j in (0..ni).step_by(2) {
                let nb = wn * wtn + j as i64 * 8;
                let mut addr = [0i64; 32];
                for (lane, ad) in addr.iter_mut().enumerate() {
                    let lane = lane as i64;
                    *ad = if c.b_kn() {
                        let k = kk + (lane & 7) + (((lane >> 3) & 1) << 3);
                        let n = nb + ((lane >> 4) << 3);
                        k * c.b_ld() + n
                    } else {
                        let n = nb + (lane & 7) + ((lane >> 4) << 3);
                        let k = kk + (((lane >> 3) & 1) << 3);
                        n * c.b_ld() + k
                    };
                }
                let r = ldmatrix(sb, &addr, c.b_kn());
                for l in 0..32 {
                    b[j][l] = [r[l][0], r[l][1]];
                    b[j + 1][l] = [r[l][2], r[l][3]];
                }
            }
            for i in 0..mi {
                for j in 0..ni {
                    mma(&a[i], &b[j], &mut acc_w[i][j]);
                }
            }
        }
    }
}

/// Runs one launch: every block of the grid, every thread of every block.
fn run(c: &Cfg, p: &P, ops: &Ops, out: &mut [f32], ws: &mut [f32]) {
    let (gm, gn, gk) = gemm(p, c.mode);
    let k_tiles = (gk + BK - 1) / BK;
    let splits = if c.mode == Mode::Wgrad {
        (k_tiles + p.k_tiles_per_split - 1) / p.k_tiles_per_split
    } else {
        1
    };
    let threads = c.threads();
    let (wtm, wtn) = (c.bm / c.wm, c.bn / c.wn);
    let (mi, ni) = ((wtm / 16) as usize, (wtn / 8) as usize);
    for bz in 0..splits {
        for by in 0..(gn + c.bn - 1) / c.bn {
            for bx in 0..(gm + c.bm - 1) / c.bm {
                let (m0, n0) = (bx * c.bm, by * c.bn);
                let (mut kt0, mut kt1) = (0, k_tiles);
                if c.mode == Mode::Wgrad {
                    kt0 = bz * p.k_tiles_per_split;
                    kt1 = k_tiles.min(kt0 + p.k_tiles_per_split);
                }
                let mut sa = vec![f32::NAN; (STAGES * c.a_stage()) as usize];
                let mut sb = vec![f32::NAN; (STAGES * c.b_stage()) as usize];
                let mut ga: Vec<GatherA> = Vec::new();
                let mut gb: Vec<GatherB> = Vec::new();
                for t in 0..threads {
                    if c.mode != Mode::Wgrad {
                        ga.push(GatherA::init(c, p, t, m0, kt0 * BK));
                    } else {
                        gb.push(GatherB::init(c, p, t, n0, kt0 * BK));
                    }
                }
                let mut load_tile = |st: i64, kt: i64, sa: &mut [f32], sb: &mut [f32]| {
                    let a = &mut sa[(st * c.a_stage()) as usize..((st + 1) * c.a_stage()) as usize];
                    let b = &mut sb[(st * c.b_stage()) as usize..((st + 1) * c.b_stage()) as usize];
                    for t in 0..threads {
                        match c.mode {
                            Mode::Fprop => {
                                ga[t as usize].load(c, p, t, a, ops.x);
                                load_b_fprop(c, p, t, b, n0, kt * BK, ops.w);
                            }
                            Mode::Dgrad => {
                                ga[t as usize].load(c, p, t, a, ops.dy);
                                load_b_dgrad(c, p, t, b, n0, kt * BK, ops.w);
                            }
                            Mode::Wgrad => {
                                load_a_wgrad(c, p, t, a, m0, kt * BK, ops.dy);
                                gb[t as usize].load(c, p, t, b, ops.x);
                            }
                        }
                    }
                };
                let nwarps = (c.wm * c.wn) as usize;
                let mut acc: Acc = vec![vec![vec![[[0.0; 4]; 32]; ni]; mi]; nwarps];
                for s in 0..STAGES - 1 {
                    if kt0 + s < kt1 {
                        load_tile(s, kt0 + s, &mut sa, &mut sb);
                    }
                }
                for kt in kt0..kt1 {
                    let next = kt + STAGES - 1;
                    // Sequential emulation: the stage being filled must not be the one read now.
                    if next < kt1 {
                        assert_ne!((next - kt0) % STAGES, (kt - kt0) % STAGES);
                        load_tile((next - kt0) % STAGES, next, &mut sa, &mut sb);
                    }
                    let cur = (kt - kt0) % STAGES;
                    mma_stage(
                        c,
                        &sa[(cur * c.a_stage()) as usize..((cur + 1) * c.a_stage()) as usize],
                        &sb[(cur * c.b_stage()) as usize..((cur + 1) * c.b_stage()) as usize],
                        &mut acc,
                    );
                }
                // Epilogue.
                for (warp, acc_w) in acc.iter().enumerate() {
                    let (wm, wn) = (warp as i64 / c.wn, warp as i64 % c.wn);
                    for lane in 0..32i64 {
                        let (gr, tc) = (lane >> 2, (lane & 3) * 2);
                        for i in 0..mi {
                            for j in 0..ni {
                                for h in 0..2 {
                                    let m = m0 + wm * wtm + i as i64 * 16 + gr + h * 8;
                                    let n = n0 + wn * wtn + j as i64 * 8 + tc;
                                    if m >= gm || n >= gn {
                                        continue;
                                    }
                                    let v = acc_w[i][j][lane as usize];
                                    let (v0, v1) = (v[2 * h as usize], v[2 * h as usize + 1]);
                                    if c.mode == Mode::Wgrad {
                                        let d = ((bz * gm + m) * gn + n) as usize;
                                        assert_eq!(d % 2, 0, "float2 store misaligned");
                                        ws[d] = v0;
                                        ws[d + 1] = v1;
                                    } else {
                                        let d = (m * p.ldc + p.c_offset + n) as usize;
                                        assert_eq!(d % 2, 0, "half2 store misaligned");
                                        let (o0, o1) = if p.accumulate {
                                            (out[d], out[d + 1])
                                        } else {
                                            (0.0, 0.0)
                                        };
                                        out[d] = o0 + v0;
                                        out[d + 1] = o1 + v1;
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Direct convolution (the spec of src/ops/conv.rs): fprop y, dgrad dx, wgrad dw.
fn reference(mode: Mode, p: &P, ops: &Ops) -> Vec<f32> {
    let (gm, gn, _) = gemm(p, mode);
    let mut r = vec![0.0f32; (gm * gn) as usize];
    for n in 0..p.n {
        for oy in 0..p.oh {
            for ox in 0..p.ow {
                for ky in 0..p.kh {
                    for kx in 0..p.kw {
                        let (iy, ix) = (
                            oy * p.stride - p.pad_top + ky,
                            ox * p.stride - p.pad_left + kx,
                        );
                        if iy < 0 || iy >= p.h || ix < 0 || ix >= p.w {
                            continue;
                        }
                        for co in 0..p.cout {
                            for ci in 0..p.cin {
                                let xi = (((n * p.h + iy) * p.w + ix) * p.cin + ci) as usize;
                                let wi = (((co * p.kh + ky) * p.kw + kx) * p.cin + ci) as usize;
                                let di = (((n * p.oh + oy) * p.ow + ox) * p.cout + co) as usize;
                                let idx = match mode {
                                    Mode::Fprop => {
                                        r[di] += ops.x[xi] * ops.w[wi];
                                        continue;
                                    }
                                    Mode::Dgrad => xi,
                                    Mode::Wgrad => wi,
                                };
                                let v = match mode {
                                    Mode::Dgrad => ops.dy[di] * ops.w[wi],
                                    _ => ops.dy[di] * ops.x[xi],
                                };
                                r[idx] += v;
                            }
                        }
                    }
                }
            }
        }
    }
    r
}

fn ints(len: i64, seed: &mut u64) -> Vec<f32> {
    (0..len)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((*seed >> 33) % 7) as f32 - 3.0
        })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn shape(
    n: i64,
    hw: (i64, i64),
    cin: i64,
    cout: i64,
    k: (i64, i64),
    stride: i64,
    pads: (i64, i64, i64, i64),
) -> P {
    let (pt, pb, pl, pr) = pads;
    P {
        n,
        h: hw.0,
        w: hw.1,
        cin,
        cout,
        kh: k.0,
        kw: k.1,
        stride,
        pad_top: pt,
        pad_left: pl,
        oh: (hw.0 + pt + pb - k.0) / stride + 1,
        ow: (hw.1 + pl + pr - k.1) / stride + 1,
        ldc: 0,
        c_offset: 0,
        accumulate: false,
        k_tiles_per_split: 1,
    }
}

fn check(mode: Mode, base: P, tiles: &[(i64, i64, i64, i64)]) {
    let mut seed = 12345u64;
    let x = ints(base.n * base.h * base.w * base.cin, &mut seed);
    let w = ints(base.cout * base.kh * base.kw * base.cin, &mut seed);
    let dy = ints(base.n * base.oh * base.ow * base.cout, &mut seed);
    let ops = Ops {
        x: &x,
        w: &w,
        dy: &dy,
    };
    let want = reference(mode, &base, &ops);
    let (gm, gn, gk) = gemm(&base, mode);
    for &(bm, bn, wm, wn) in tiles {
        let c = Cfg {
            mode,
            bm,
            bn,
            wm,
            wn,
        };
        if mode == Mode::Wgrad {
            let k_tiles = (gk + BK - 1) / BK;
            for per in [1, 2, k_tiles] {
                let p = P {
                    k_tiles_per_split: per,
                    ..base
                };
                let splits = (k_tiles + per - 1) / per;
                let mut ws = vec![f32::NAN; (splits * gm * gn) as usize];
                run(&c, &p, &ops, &mut [], &mut ws);
                // conv_wgrad_reduce: sum the splits in order.
                let got: Vec<f32> = (0..(gm * gn) as usize)
                    .map(|i| {
                        (0..splits as usize)
                            .map(|z| ws[z * (gm * gn) as usize + i])
                            .sum()
                    })
                    .collect();
                assert_eq!(got, want, "{mode:?} {c:?} per={per} {base:?}");
            }
        } else {
            for accumulate in [false, true] {
                // Write into a concat slice: row stride gn + 6, channel offset 2, prefilled.
                let p = P {
                    ldc: gn + 6,
                    c_offset: 2,
                    accumulate,
                    ..base
                };
                let prefill = ints(gm * p.ldc, &mut seed);
                let mut out = prefill.clone();
                run(&c, &p, &ops, &mut out, &mut []);
                for m in 0..gm {
                    for col in 0..p.ldc {
                        let i = (m * p.ldc + col) as usize;
                        let inside = col >= p.c_offset && col < p.c_offset + gn;
                        let expect = if inside {
                            let r = want[(m * gn + col - p.c_offset) as usize];
                            if accumulate {
                                prefill[i] + r
                            } else {
                                r
                            }
                        } else {
                            prefill[i]
                        };
                        assert_eq!(
                            out[i], expect,
                            "{mode:?} {c:?} acc={accumulate} m={m} col={col} {base:?}"
                        );
                    }
                }
            }
        }
    }
}

const ALL_TILES: [(i64, i64, i64, i64); 3] = [(128, 128, 2, 4), (128, 64, 2, 2), (64, 64, 2, 2)];

#[test]
fn fprop_matches_direct_convolution() {
    // 3x3 stride 2 with asymmetric padding, cin 8 (< BK: several taps per K tile, K tail), N tail.
    check(
        Mode::Fprop,
        shape(2, (9, 7), 8, 24, (3, 3), 2, (1, 0, 0, 1)),
        &ALL_TILES,
    );
    // 1x7 with (0, 3) padding, cin 48 (channel runs straddle K tiles), M tail.
    check(
        Mode::Fprop,
        shape(1, (5, 6), 48, 66, (1, 7), 1, (0, 0, 3, 3)),
        &ALL_TILES[1..],
    );
}

#[test]
fn dgrad_matches_direct_convolution() {
    check(
        Mode::Dgrad,
        shape(2, (9, 7), 16, 8, (3, 3), 2, (1, 0, 0, 1)),
        &ALL_TILES,
    );
    check(
        Mode::Dgrad,
        shape(1, (6, 5), 24, 40, (7, 1), 1, (3, 3, 0, 0)),
        &ALL_TILES[1..],
    );
    // Stride 2 without padding (the reduction blocks): input pixels no window covers get zeros.
    check(
        Mode::Dgrad,
        shape(1, (8, 8), 8, 16, (3, 3), 2, (0, 0, 0, 0)),
        &ALL_TILES[2..],
    );
}

#[test]
fn wgrad_matches_direct_convolution() {
    check(
        Mode::Wgrad,
        shape(4, (9, 7), 8, 24, (3, 3), 2, (1, 0, 0, 1)),
        &ALL_TILES,
    );
    check(
        Mode::Wgrad,
        shape(3, (5, 6), 16, 16, (1, 7), 1, (0, 0, 3, 3)),
        &ALL_TILES[1..],
    );
}
