//! Convolution launchers: forward, data gradient and weight gradient, on the tensor-core implicit
//! GEMM kernels (kernels/conv_tc.cu) for shapes they support and have passed the self-test on, and
//! on the plain kernels (kernels/conv_plain.cu) otherwise. At O0 (`CudaDevice::amp`) every
//! convolution runs on the plain kernels' fp32 `_o0` entry points: the tensor-core kernels are fp16
//! mma only. Which tensor-core variant runs follows the device's kernel paths ([`super::choice`]).
//! Each launch is a value ([`ConvFprop`], [`ConvDgrad`], [`ConvWgrad`], [`WgradReduce`],
//! [`WgradReduceDrop`]) holding every operand; the CUDA step is a list of such values.

use anyhow::{bail, Context, Result};
use cudarc::driver::LaunchConfig;

pub use super::choice::{candidates, choose_on, choose_with, ConvTarget};
use super::count::{work, ConvWork};
use super::phase::max_phase_rows;
use super::tiles::{check_tc_alignment, plain_wgrad_splits, tc_wgrad_split};
pub use super::tiles::{
    needs_pad8, pad8, preferred_tile, tc_smem_table, tc_supported, wgrad_workspace_elems, ConvImpl,
    ConvMode, ConvOut, ConvParams, Tile, PAD_CHANNELS, TILES,
};
use super::ConvShape;
use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};
use crate::precision::Amp;

/// The implementation a launch will use when the caller does not force one: always the plain
/// kernel at O0 (fp32 operands), the tensor cores only for shapes the self-test has verified.
pub fn choose(dev: &CudaDevice, s: &ConvShape, mode: ConvMode, out: Option<&ConvOut>) -> ConvImpl {
    choose_on(dev, s, mode, out, false)
}

/// What the self-test and the benchmarks assume after the start-up check: every variant verified.
fn all_verified(_: &str) -> bool {
    true
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

    /// What the launch issues on `t` once its shape is verified.
    pub fn work(&self, t: &ConvTarget) -> ConvWork {
        let mode = ConvMode::Fprop;
        let pick = choose_with(t, &self.s, mode, Some(&self.out), false, all_verified);
        work(&self.s, mode, self.imp.unwrap_or(pick))
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

    /// What the launch issues on `t` once its shape is verified.
    pub fn work(&self, t: &ConvTarget) -> ConvWork {
        let mode = ConvMode::Dgrad;
        let pick = choose_with(t, &self.s, mode, Some(&self.out), false, all_verified);
        work(&self.s, mode, self.imp.unwrap_or(pick))
    }
}

/// dw (+)= the weight gradient into the fp32 gradient buffer, through split-K partials in `ws`
/// (`ws_elems` fp32 elements, at least [`wgrad_workspace_elems`]). `x_padded` is the input padded
/// to 8 channels when the caller holds one (the stem's copy): with `stem_wgrad_tc` a 3-channel
/// input's gradient then runs on the tensor cores over it ([`ConvImpl::TcPad8`]).
#[derive(Clone, Copy, Debug)]
pub struct ConvWgrad {
    pub s: ConvShape,
    pub x: DevPtr,
    pub x_padded: Option<DevPtr>,
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
        let padded = self.x_padded.is_some();
        let imp = self
            .imp
            .unwrap_or_else(|| choose_on(dev, s, ConvMode::Wgrad, None, padded));
        // The GEMM actually run: over the padded input for TcPad8.
        let (gs, x) = match imp {
            ConvImpl::TcPad8(_) => {
                let xp = self
                    .x_padded
                    .context("TcPad8 needs the input padded to 8 channels")?;
                if !needs_pad8(s) {
                    bail!(
                        "TcPad8 is for inputs of fewer than 8 channels: {}",
                        s.label()
                    );
                }
                (pad8(s), xp)
            }
            _ => (*s, self.x),
        };
        let (m, n, _) = gs.gemm(ConvMode::Wgrad);
        let mut p = ConvParams {
            x,
            dy: self.dy,
            ws: self.ws,
            ..ConvParams::new(&gs)
        };
        let splits = match imp {
            ConvImpl::Tc(t) | ConvImpl::TcPad8(t) => {
                let (per, splits) = tc_wgrad_split(&gs, t, dev.num_sms);
                p.k_tiles_per_split = per as i32;
                splits
            }
            ConvImpl::Plain => plain_wgrad_splits(s, dev.num_sms),
            ConvImpl::TcPhase(_) => bail!("a weight gradient has no stride phases"),
        };
        if self.ws_elems < splits * m * n {
            bail!(
                "conv wgrad workspace too small: {} < {}",
                self.ws_elems,
                splits * m * n
            );
        }
        launch_conv_split(dev, &gs, imp, p, splits)?;
        if let ConvImpl::TcPad8(_) = imp {
            let c = s.conv;
            WgradReduceDrop {
                ws: self.ws,
                splits,
                count: (c.cout * c.kh * c.kw * c.cin) as u64,
                cin: c.cin,
                cin_pad: PAD_CHANNELS,
                dw: self.dw,
                accumulate: self.accumulate,
            }
            .launch(dev)?;
            return Ok(imp);
        }
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

    /// What the launch issues on `t` once its shape is verified.
    pub fn work(&self, t: &ConvTarget) -> ConvWork {
        let mode = ConvMode::Wgrad;
        let padded = self.x_padded.is_some();
        let pick = choose_with(t, &self.s, mode, None, padded, all_verified);
        work(&self.s, mode, self.imp.unwrap_or(pick))
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

/// dw[cout*kh*kw][cin] (+)= the sum of `splits` partials computed over `cin_pad` input channels,
/// the padded channels dropped (the stem's weight gradient on the tensor cores).
#[derive(Clone, Copy, Debug)]
pub struct WgradReduceDrop {
    pub ws: DevPtr,
    pub splits: usize,
    /// Elements of dw.
    pub count: u64,
    pub cin: usize,
    pub cin_pad: usize,
    pub dw: DevPtr,
    pub accumulate: bool,
}

impl Launch for WgradReduceDrop {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (ws, count, dw) = (self.ws, self.count, self.dw);
        let (splits, acc) = (self.splits as i32, self.accumulate as i32);
        let (cin, cin_pad) = (self.cin as i32, self.cin_pad as i32);
        let name = "conv_wgrad_reduce_drop_f32";
        let cfg = dev.grid_1d(count)?;
        cuda_launch!(dev, name, cfg, ws, splits, count, cin, cin_pad, dw, acc)
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
    if imp.tile().is_some_and(|t| !t.serves(mode)) {
        bail!("conv_tc.cu has no {mode:?} kernel of {}", s.key(mode, imp));
    }
    if !tc_supported(s, mode, None) {
        bail!("tensor-core conv does not support {}", s.key(mode, imp));
    }
    check_tc_alignment(p)
}

/// Grid of a tensor-core launch: one block per output tile, `splits` deep.
fn tc_config(s: &ConvShape, mode: ConvMode, t: Tile, splits: usize) -> LaunchConfig {
    let (m, n, _) = s.gemm(mode);
    tile_grid(t, mode, m, n, splits)
}

fn tile_grid(t: Tile, mode: ConvMode, m: usize, n: usize, z: usize) -> LaunchConfig {
    let (bm, bn) = t.dims();
    LaunchConfig {
        grid_dim: (m.div_ceil(bm) as u32, n.div_ceil(bn) as u32, z as u32),
        block_dim: (t.threads(), 1, 1),
        shared_mem_bytes: t.smem_bytes(mode) as u32,
    }
}

/// Grid of a phase-split data gradient: the largest phase's blocks, one z slice per phase.
fn phase_config(s: &ConvShape, t: Tile) -> LaunchConfig {
    let st = s.conv.stride;
    tile_grid(t, ConvMode::Dgrad, max_phase_rows(s), s.conv.cin, st * st)
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
        ConvImpl::TcPhase(t) => {
            if mode != ConvMode::Dgrad {
                bail!(
                    "only a data gradient runs by stride phase: {}",
                    s.key(mode, imp)
                );
            }
            check_tc(dev, s, mode, imp, &p)?;
            dev.opt_in_smem(&t.phase_kernel(), t.smem_bytes(mode))?;
            cuda_launch!(dev, &t.phase_kernel(), phase_config(s, t), p)
        }
        ConvImpl::TcPad8(_) => bail!("TcPad8 is a weight-gradient variant: {}", s.key(mode, imp)),
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
        ConvImpl::Tc(t) | ConvImpl::TcPad8(t) => {
            check_tc(dev, s, mode, imp, &p)?;
            dev.opt_in_smem(&t.kernel(mode), t.smem_bytes(mode))?;
            cuda_launch!(dev, &t.kernel(mode), tc_config(s, mode, t, splits), p)
        }
        ConvImpl::TcPhase(_) => bail!("a weight gradient has no stride phases"),
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
