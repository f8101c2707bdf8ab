//! Convolution launchers: forward, data gradient and weight gradient, on the tensor-core implicit
//! GEMM kernels (kernels/conv_tc.cu) for shapes they support and have passed the self-test on, and
//! on the plain kernels (kernels/conv_plain.cu) otherwise. At O0 (`CudaDevice::amp`) every
//! convolution runs on the plain kernels' fp32 `_o0` entry points: the tensor-core kernels are fp16
//! mma only. Each launch is a value ([`ConvFprop`], [`ConvDgrad`], [`ConvWgrad`], [`WgradReduce`])
//! holding every operand; the CUDA step is a list of such values.

use anyhow::{bail, Context, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig};
use serde::Serialize;

use super::ConvShape;
use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};
use crate::precision::Amp;

/// Which of the three convolution GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ConvMode {
    Fprop,
    Dgrad,
    Wgrad,
}

impl ConvMode {
    fn name(self) -> &'static str {
        match self {
            ConvMode::Fprop => "fprop",
            ConvMode::Dgrad => "dgrad",
            ConvMode::Wgrad => "wgrad",
        }
    }
}

/// Tensor-core tile shapes (block M x N); all use BK = 32 and a 3-stage pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Tile {
    T128x128,
    T128x64,
    T64x64,
}

pub const TILES: [Tile; 3] = [Tile::T128x128, Tile::T128x64, Tile::T64x64];

impl Tile {
    fn dims(self) -> (usize, usize) {
        match self {
            Tile::T128x128 => (128, 128),
            Tile::T128x64 => (128, 64),
            Tile::T64x64 => (64, 64),
        }
    }
    fn threads(self) -> u32 {
        match self {
            Tile::T128x128 => 256,
            _ => 128,
        }
    }
    /// Dynamic shared memory, mirroring TcConv::SMEM_BYTES in conv_tc.cu.
    pub fn smem_bytes(self, mode: ConvMode) -> usize {
        let (bm, bn) = self.dims();
        let (bk, pad, stages) = (32, 8, 3);
        let a = if mode == ConvMode::Wgrad {
            bk * (bm + pad)
        } else {
            bm * (bk + pad)
        };
        let b = if mode == ConvMode::Fprop {
            bn * (bk + pad)
        } else {
            bk * (bn + pad)
        };
        stages * (a + b) * 2
    }
    pub fn kernel(self, mode: ConvMode) -> String {
        let (bm, bn) = self.dims();
        format!("conv_{}_tc_{bm}x{bn}", mode.name())
    }
}

/// Every tensor-core kernel with its dynamic shared memory (each opts in at its first launch).
pub fn tc_smem_table() -> Vec<(String, usize)> {
    let modes = [ConvMode::Fprop, ConvMode::Dgrad, ConvMode::Wgrad];
    modes
        .iter()
        .flat_map(|&m| TILES.iter().map(move |&t| (t.kernel(m), t.smem_bytes(m))))
        .collect()
}

/// How a convolution runs: a tensor-core tile, or the plain FMA kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ConvImpl {
    Tc(Tile),
    Plain,
}

impl ConvShape {
    /// (M, N, K) of the implicit GEMM for `mode`.
    pub fn gemm(&self, mode: ConvMode) -> (usize, usize, usize) {
        let c = &self.conv;
        let taps = c.kh * c.kw;
        match mode {
            ConvMode::Fprop => (self.n * self.oh() * self.ow(), c.cout, taps * c.cin),
            ConvMode::Dgrad => (self.n * self.h * self.w, c.cin, taps * c.cout),
            ConvMode::Wgrad => (c.cout, taps * c.cin, self.n * self.oh() * self.ow()),
        }
    }
    /// Registry key of the fast kernel `imp` for this shape and mode. The batch size is left out
    /// on purpose: it only changes M, whose tail the kernels handle generically, so a check at a
    /// small batch covers the training batch.
    pub fn key(&self, mode: ConvMode, imp: ConvImpl) -> String {
        let c = &self.conv;
        format!(
            "{}:{imp:?}:h{}w{}:{}x{}x{}x{}/s{}p{},{},{},{}",
            mode.name(),
            self.h,
            self.w,
            c.cout,
            c.kh,
            c.kw,
            c.cin,
            c.stride,
            c.pad_top,
            c.pad_bottom,
            c.pad_left,
            c.pad_right
        )
    }
}

/// Where fprop/dgrad write: row stride `ldc` (elements between pixels) and first channel
/// `c_offset`, so a branch can fill its slice of a concat output; `accumulate` adds to it.
#[derive(Clone, Copy, Debug)]
pub struct ConvOut {
    pub ptr: DevPtr,
    pub ldc: usize,
    pub c_offset: usize,
    pub accumulate: bool,
}

impl ConvOut {
    /// A dense output tensor of `channels` channels, overwritten.
    pub fn dense(ptr: DevPtr, channels: usize) -> Self {
        Self {
            ptr,
            ldc: channels,
            c_offset: 0,
            accumulate: false,
        }
    }
}

/// Kernel parameter block; mirrors `struct ConvParams` in kernels/common.cuh field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvParams {
    pub x: u64,
    pub w: u64,
    pub dy: u64,
    pub out: u64,
    pub ws: u64,
    pub n: i32,
    pub h: i32,
    pub w_: i32,
    pub cin: i32,
    pub cout: i32,
    pub kh: i32,
    pub kw: i32,
    pub stride: i32,
    pub pad_top: i32,
    pub pad_left: i32,
    pub oh: i32,
    pub ow: i32,
    pub ldc: i32,
    pub c_offset: i32,
    pub accumulate: i32,
    pub k_tiles_per_split: i32,
}

// SAFETY: plain repr(C) data, laid out like the CUDA struct (5 pointers, 16 ints, 104 bytes).
unsafe impl DeviceRepr for ConvParams {}
const _: () = assert!(std::mem::size_of::<ConvParams>() == 104);

impl ConvParams {
    fn new(s: &ConvShape) -> Self {
        let c = &s.conv;
        Self {
            n: s.n as i32,
            h: s.h as i32,
            w_: s.w as i32,
            cin: c.cin as i32,
            cout: c.cout as i32,
            kh: c.kh as i32,
            kw: c.kw as i32,
            stride: c.stride as i32,
            pad_top: c.pad_top as i32,
            pad_left: c.pad_left as i32,
            oh: s.oh() as i32,
            ow: s.ow() as i32,
            ..Default::default()
        }
    }
    fn with_out(mut self, out: &ConvOut) -> Self {
        self.out = out.ptr;
        self.ldc = out.ldc as i32;
        self.c_offset = out.c_offset as i32;
        self.accumulate = out.accumulate as i32;
        self
    }
}

/// Whether the tensor-core path can run `mode` on this shape: the gathered channel counts must be
/// multiples of 8 (16-byte cp.async chunks) and outputs are written as half pairs.
pub fn tc_supported(s: &ConvShape, mode: ConvMode, out: Option<&ConvOut>) -> bool {
    let c = &s.conv;
    let even_out = out.is_none_or(|o| o.ldc.is_multiple_of(2) && o.c_offset.is_multiple_of(2));
    match mode {
        ConvMode::Fprop => c.cin.is_multiple_of(8) && c.cout.is_multiple_of(2) && even_out,
        ConvMode::Dgrad | ConvMode::Wgrad => {
            c.cin.is_multiple_of(8) && c.cout.is_multiple_of(8) && even_out
        }
    }
}

/// The tile the launcher prefers for a shape: narrow GEMMs (N <= 64) take 128x64; GEMMs too small
/// to give every SM a 128x128 block take 64x64.
pub fn preferred_tile(s: &ConvShape, mode: ConvMode, num_sms: u32) -> Tile {
    let (m, n, _) = s.gemm(mode);
    if n <= 64 {
        return Tile::T128x64;
    }
    let blocks = m.div_ceil(128) * n.div_ceil(128);
    if blocks < num_sms as usize {
        Tile::T64x64
    } else {
        Tile::T128x128
    }
}

/// K tiles per split and split count of a tensor-core weight gradient: enough splits to give the
/// GPU about two waves of blocks, each split at least 8 K tiles deep.
fn tc_wgrad_split(s: &ConvShape, tile: Tile, num_sms: u32) -> (usize, usize) {
    let (m, n, k) = s.gemm(ConvMode::Wgrad);
    let (bm, bn) = tile.dims();
    let k_tiles = k.div_ceil(32).max(1);
    let blocks = m.div_ceil(bm) * n.div_ceil(bn);
    let want = (2 * num_sms as usize)
        .div_ceil(blocks)
        .clamp(1, (k_tiles / 8).max(1));
    let per = k_tiles.div_ceil(want);
    (per, k_tiles.div_ceil(per))
}

/// Split count of the plain weight gradient (over output pixels).
fn plain_wgrad_splits(s: &ConvShape, num_sms: u32) -> usize {
    let (m, n, k) = s.gemm(ConvMode::Wgrad);
    (num_sms as usize * 2048)
        .div_ceil(m * n)
        .clamp(1, 256)
        .min(k.max(1))
}

/// The tensor-core kernels read operands with 16-byte cp.async and write pairs of halves: a
/// misaligned tensor would fault (and poison the CUDA context), so it is refused up front. Arena
/// tensors must therefore start on 16-byte boundaries.
/// The epilogue stores `__half2` at `out + m * ldc + c_offset + n` (n even), so `ldc` and
/// `c_offset` must be even as well: `tc_supported(.., None)` in the launchers does not see them,
/// and a caller forcing `ConvImpl::Tc` onto an odd concat slice would otherwise fault.
fn check_tc_alignment(p: &ConvParams) -> Result<()> {
    let misaligned = [p.x, p.w, p.dy, p.ws]
        .iter()
        .any(|&a| !a.is_multiple_of(16))
        || !p.out.is_multiple_of(4)
        || p.ldc % 2 != 0
        || p.c_offset % 2 != 0;
    if misaligned {
        bail!(
            "tensor-core conv needs 16-byte aligned operands and an even output stride/offset \
             (x {:#x}, w {:#x}, dy {:#x}, out {:#x}, ldc {}, c_offset {})",
            p.x,
            p.w,
            p.dy,
            p.out,
            p.ldc,
            p.c_offset
        );
    }
    Ok(())
}

/// fp32 elements of split-K workspace for a weight gradient on a GPU with `num_sms` SMs: the
/// largest need of any implementation, so the arena can be sized before choosing one.
pub fn wgrad_workspace_elems(s: &ConvShape, num_sms: u32) -> usize {
    let (m, n, _) = s.gemm(ConvMode::Wgrad);
    let tc = TILES
        .iter()
        .map(|&t| tc_wgrad_split(s, t, num_sms).1)
        .max()
        .unwrap_or(1);
    m * n * tc.max(plain_wgrad_splits(s, num_sms))
}

/// The implementation a launch will use when the caller does not force one: always the plain
/// kernel at O0 (fp32 operands), the tensor cores only for shapes the self-test has verified.
pub fn choose(dev: &CudaDevice, s: &ConvShape, mode: ConvMode, out: Option<&ConvOut>) -> ConvImpl {
    if dev.amp == Amp::O0 || !tc_supported(s, mode, out) {
        return ConvImpl::Plain;
    }
    let tc = ConvImpl::Tc(preferred_tile(s, mode, dev.num_sms));
    if dev.is_verified(&s.key(mode, tc)) {
        tc
    } else {
        ConvImpl::Plain
    }
}

/// y = conv(x, w), NHWC fp16 (fp32 at O0). `imp` forces an implementation (the self-test does).
#[derive(Clone, Copy, Debug)]
pub struct ConvFprop {
    pub s: ConvShape,
    pub x: DevPtr,
    pub w: DevPtr,
    pub out: ConvOut,
    pub imp: Option<ConvImpl>,
}

impl ConvFprop {
    /// Queues the launch and returns the implementation it used.
    pub fn run(&self, dev: &CudaDevice) -> Result<ConvImpl> {
        let s = &self.s;
        let imp = self
            .imp
            .unwrap_or_else(|| choose(dev, s, ConvMode::Fprop, Some(&self.out)));
        let p = ConvParams {
            x: self.x,
            w: self.w,
            ..ConvParams::new(s)
        }
        .with_out(&self.out);
        launch_conv(dev, s, ConvMode::Fprop, imp, p)?;
        Ok(imp)
    }
}

/// dx (+)= conv_transpose(dy, w): the data gradient.
#[derive(Clone, Copy, Debug)]
pub struct ConvDgrad {
    pub s: ConvShape,
    pub dy: DevPtr,
    pub w: DevPtr,
    pub out: ConvOut,
    pub imp: Option<ConvImpl>,
}

impl ConvDgrad {
    pub fn run(&self, dev: &CudaDevice) -> Result<ConvImpl> {
        let s = &self.s;
        let imp = self
            .imp
            .unwrap_or_else(|| choose(dev, s, ConvMode::Dgrad, Some(&self.out)));
        let p = ConvParams {
            dy: self.dy,
            w: self.w,
            ..ConvParams::new(s)
        }
        .with_out(&self.out);
        launch_conv(dev, s, ConvMode::Dgrad, imp, p)?;
        Ok(imp)
    }
}

/// dw (+)= the weight gradient into the fp32 gradient buffer, through split-K partials in `ws`
/// (`ws_elems` fp32 elements, at least [`wgrad_workspace_elems`]).
#[derive(Clone, Copy, Debug)]
pub struct ConvWgrad {
    pub s: ConvShape,
    pub x: DevPtr,
    pub dy: DevPtr,
    pub dw: DevPtr,
    pub accumulate: bool,
    pub ws: DevPtr,
    pub ws_elems: usize,
    pub imp: Option<ConvImpl>,
}

impl ConvWgrad {
    pub fn run(&self, dev: &CudaDevice) -> Result<ConvImpl> {
        let s = &self.s;
        let imp = self
            .imp
            .unwrap_or_else(|| choose(dev, s, ConvMode::Wgrad, None));
        let (m, n, _) = s.gemm(ConvMode::Wgrad);
        let mut p = ConvParams {
            x: self.x,
            dy: self.dy,
            ws: self.ws,
            ..ConvParams::new(s)
        };
        let splits = match imp {
            ConvImpl::Tc(t) => {
                let (per, splits) = tc_wgrad_split(s, t, dev.num_sms);
                p.k_tiles_per_split = per as i32;
                splits
            }
            ConvImpl::Plain => plain_wgrad_splits(s, dev.num_sms),
        };
        if self.ws_elems < splits * m * n {
            bail!(
                "conv wgrad workspace too small: {} < {}",
                self.ws_elems,
                splits * m * n
            );
        }
        launch_conv_split(dev, s, imp, p, splits)?;
        let reduce = WgradReduce {
            ws: self.ws,
            splits,
            count: (m * n) as u64,
            dw: self.dw,
            accumulate: self.accumulate,
            f32_out: true,
        };
        reduce.launch(dev)?;
        Ok(imp)
    }
}

/// dw (+)= sum of `splits` partials; `f32_out` picks the fp32 or fp16 output kernel (the
/// caller's choice at every precision level: it follows dw's type, not the device's level).
#[derive(Clone, Copy, Debug)]
pub struct WgradReduce {
    pub ws: DevPtr,
    pub splits: usize,
    pub count: u64,
    pub dw: DevPtr,
    pub accumulate: bool,
    pub f32_out: bool,
}

impl Launch for WgradReduce {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let name = if self.f32_out {
            "conv_wgrad_reduce_f32"
        } else {
            "conv_wgrad_reduce_f16"
        };
        let (ws, count, dw) = (self.ws, self.count, self.dw);
        let (splits, acc) = (self.splits as i32, self.accumulate as i32);
        cuda_launch!(dev, name, dev.grid_1d(count)?, ws, splits, count, dw, acc)
    }
}

impl Launch for ConvFprop {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        self.run(dev).map(|_| ())
    }
}

impl Launch for ConvDgrad {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        self.run(dev).map(|_| ())
    }
}

impl Launch for ConvWgrad {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        self.run(dev).map(|_| ())
    }
}

/// Refuses a forced tensor-core launch at O0: it would read fp32 tensors as fp16.
fn check_tc_precision(
    dev: &CudaDevice,
    s: &ConvShape,
    mode: ConvMode,
    imp: ConvImpl,
) -> Result<()> {
    if dev.amp == Amp::O0 {
        bail!(
            "tensor-core conv {} takes fp16 operands; at O0 convolutions run on the plain kernels",
            s.key(mode, imp)
        );
    }
    Ok(())
}

/// The tensor-core checks every fast launch passes: precision, shape support, alignment.
fn check_tc(
    dev: &CudaDevice,
    s: &ConvShape,
    mode: ConvMode,
    imp: ConvImpl,
    p: &ConvParams,
) -> Result<()> {
    check_tc_precision(dev, s, mode, imp)?;
    if !tc_supported(s, mode, None) {
        bail!("tensor-core conv does not support {}", s.key(mode, imp));
    }
    check_tc_alignment(p)
}

/// Grid of a tensor-core launch: one block per output tile, `splits` deep.
fn tc_config(s: &ConvShape, mode: ConvMode, t: Tile, splits: usize) -> LaunchConfig {
    let (m, n, _) = s.gemm(mode);
    let (bm, bn) = t.dims();
    LaunchConfig {
        grid_dim: (m.div_ceil(bm) as u32, n.div_ceil(bn) as u32, splits as u32),
        block_dim: (t.threads(), 1, 1),
        shared_mem_bytes: t.smem_bytes(mode) as u32,
    }
}

fn launch_conv(
    dev: &CudaDevice,
    s: &ConvShape,
    mode: ConvMode,
    imp: ConvImpl,
    p: ConvParams,
) -> Result<()> {
    match imp {
        ConvImpl::Tc(t) => {
            check_tc(dev, s, mode, imp, &p)?;
            dev.opt_in_smem(&t.kernel(mode), t.smem_bytes(mode))?;
            cuda_launch!(dev, &t.kernel(mode), tc_config(s, mode, t, 1), p)
        }
        ConvImpl::Plain => {
            let (m, n, _) = s.gemm(mode);
            let name = if mode == ConvMode::Fprop {
                dev.amp_kernel([
                    "conv_fprop_plain_o0",
                    "conv_fprop_plain",
                    "conv_fprop_plain",
                ])
            } else {
                dev.amp_kernel([
                    "conv_dgrad_plain_o0",
                    "conv_dgrad_plain",
                    "conv_dgrad_plain",
                ])
            };
            cuda_launch!(dev, name, dev.grid_1d((m * n) as u64)?, p)
        }
    }
}

fn launch_conv_split(
    dev: &CudaDevice,
    s: &ConvShape,
    imp: ConvImpl,
    p: ConvParams,
    splits: usize,
) -> Result<()> {
    let mode = ConvMode::Wgrad;
    match imp {
        ConvImpl::Tc(t) => {
            check_tc(dev, s, mode, imp, &p)?;
            dev.opt_in_smem(&t.kernel(mode), t.smem_bytes(mode))?;
            cuda_launch!(dev, &t.kernel(mode), tc_config(s, mode, t, splits), p)
        }
        ConvImpl::Plain => {
            let (m, n, _) = s.gemm(mode);
            let mut cfg = dev.grid_1d((m * n) as u64)?;
            cfg.grid_dim.1 = splits as u32;
            let name = dev.amp_kernel([
                "conv_wgrad_plain_o0",
                "conv_wgrad_plain",
                "conv_wgrad_plain",
            ]);
            cuda_launch!(dev, name, cfg, p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Conv2d;

    fn shape(
        cin: usize,
        cout: usize,
        k: (usize, usize),
        stride: usize,
        pad: (usize, usize),
        hw: usize,
    ) -> ConvShape {
        let conv = Conv2d {
            cin,
            cout,
            kh: k.0,
            kw: k.1,
            stride,
            pad_top: pad.0,
            pad_bottom: pad.0,
            pad_left: pad.1,
            pad_right: pad.1,
        };
        ConvShape {
            conv,
            n: 128,
            h: hw,
            w: hw,
        }
    }

    #[test]
    fn gemm_views() {
        let s = shape(3, 32, (3, 3), 2, (0, 0), 299);
        assert_eq!((s.oh(), s.ow()), (149, 149));
        assert_eq!(s.gemm(ConvMode::Fprop), (128 * 149 * 149, 32, 27));
        assert_eq!(s.gemm(ConvMode::Dgrad), (128 * 299 * 299, 3, 9 * 32));
        assert_eq!(s.gemm(ConvMode::Wgrad), (32, 27, 128 * 149 * 149));
        let s = shape(192, 224, (1, 7), 1, (0, 3), 17);
        assert_eq!((s.oh(), s.ow()), (17, 17));
    }

    #[test]
    fn stem_takes_the_plain_path_and_padded_stem_the_fast_one() {
        let s = shape(3, 32, (3, 3), 2, (0, 0), 299);
        assert!(!tc_supported(&s, ConvMode::Fprop, None));
        let p = ConvShape {
            conv: Conv2d { cin: 8, ..s.conv },
            ..s
        };
        assert!(tc_supported(&p, ConvMode::Fprop, None));
        let odd = ConvOut {
            ptr: 0,
            ldc: 1536,
            c_offset: 3,
            accumulate: false,
        };
        assert!(!tc_supported(&p, ConvMode::Fprop, Some(&odd)));
    }

    #[test]
    fn wgrad_splits_cover_k_and_fit_the_workspace() {
        for s in [
            shape(32, 32, (3, 3), 1, (0, 0), 149),
            shape(1536, 256, (1, 1), 1, (0, 0), 8),
            shape(448, 512, (1, 3), 1, (0, 1), 8),
        ] {
            let (m, n, k) = s.gemm(ConvMode::Wgrad);
            let k_tiles = k.div_ceil(32);
            assert!(plain_wgrad_splits(&s, 132) * m * n <= wgrad_workspace_elems(&s, 132));
            for t in TILES {
                let (per, splits) = tc_wgrad_split(&s, t, 132);
                assert!(
                    per * splits >= k_tiles && (splits - 1) * per < k_tiles,
                    "{s:?} {t:?}"
                );
                assert!(splits * m * n <= wgrad_workspace_elems(&s, 132));
            }
        }
    }

    #[test]
    fn smem_of_tiles() {
        assert_eq!(
            Tile::T128x128.smem_bytes(ConvMode::Fprop),
            3 * (128 * 40 + 128 * 40) * 2
        );
        assert_eq!(
            Tile::T128x64.smem_bytes(ConvMode::Wgrad),
            3 * (32 * 136 + 32 * 72) * 2
        );
        assert!(tc_smem_table().iter().all(|(_, b)| *b <= 227 * 1024));
    }
}
