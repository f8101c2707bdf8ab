//! Convolution launchers: forward, data gradient and weight gradient, on the tensor-core implicit
//! GEMM kernels (kernels/conv_tc.cu) for shapes they support and have passed the self-test on, and
//! on the plain kernels (kernels/conv_plain.cu) otherwise. At O0 (`CudaDevice::amp`) every
//! convolution runs on the plain kernels' fp32 `_o0` entry points: the tensor-core kernels are fp16
//! mma only. Each launch is a value ([`ConvFprop`], [`ConvDgrad`], [`ConvWgrad`], [`WgradReduce`])
//! holding every operand; the CUDA step is a list of such values.

use anyhow::{bail, Context, Result};
use cudarc::driver::LaunchConfig;

use super::tiles::{check_tc_alignment, plain_wgrad_splits, tc_wgrad_split};
pub use super::tiles::{
    preferred_tile, tc_smem_table, tc_supported, wgrad_workspace_elems, ConvImpl, ConvMode,
    ConvOut, ConvParams, Tile, TILES,
};
use super::ConvShape;
use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};
use crate::precision::Amp;

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
