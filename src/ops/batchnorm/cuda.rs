//! Batchnorm launchers (kernels/batchnorm.cu): training forward (statistics, then the apply),
//! inference forward, and backward, each with an optional fused ReLU. The statistics reduce in
//! two launches (per-block partials into `ws`, then a per-channel finalise).

use anyhow::{Context, Result};
use cudarc::driver::LaunchConfig;

use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};

/// Rows handled by one block of the BN partial reductions (8 row groups x 64 rows each).
const ROWS_PER_BLOCK: u64 = 512;
const MAX_SPLITS: u64 = 512;

fn splits(m: u64) -> u64 {
    m.div_ceil(ROWS_PER_BLOCK).clamp(1, MAX_SPLITS)
}

/// fp32 elements of workspace a BN forward or backward over [m, c] needs.
pub fn bn_workspace(m: usize, c: usize) -> usize {
    splits(m as u64) as usize * c * 2
}

/// The partial reductions' grid: 32 channels by `splits` row blocks.
fn partial_grid(m: usize, c: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (c.div_ceil(32) as u32, splits(m as u64) as u32, 1),
        block_dim: (32, 8, 1),
        shared_mem_bytes: 0,
    }
}

/// One BN layer over activations viewed as [m = n*h*w][c]. gamma/beta and the saved mean/inverse
/// std are fp32 at O0/O2 and fp16 at O3 (the fp16 working copy of the parameters, fp16 arena
/// tensors); the running statistics are fp32 at every level.
#[derive(Clone, Copy, Debug)]
pub struct BnArgs {
    pub m: usize,
    pub c: usize,
    pub eps: f32,
    pub momentum: f32,
    pub relu: bool,
    pub gamma: DevPtr,
    pub beta: DevPtr,
    pub save_mean: DevPtr,
    pub save_inv_std: DevPtr,
    pub running_mean: DevPtr,
    pub running_var: DevPtr,
    /// Output (and, in backward, output-gradient) row stride and channel offset: a concat slice.
    pub ldy: usize,
    pub yoff: usize,
}

/// Training forward: batch statistics (saved for backward, running stats updated), then
/// y = BN(x) with optional ReLU. `ws` holds [`bn_workspace`] fp32 elements.
#[derive(Clone, Copy, Debug)]
pub struct BnForwardTrain {
    pub a: BnArgs,
    pub x: DevPtr,
    pub y: DevPtr,
    pub ws: DevPtr,
}

impl Launch for BnForwardTrain {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (a, x, ws) = (self.a, self.x, self.ws);
        let (m, c) = (a.m as u64, a.c as i32);
        let splits = splits(m) as i32;
        // O3 reads fp16 x into fp32 partials exactly as O2 does.
        let name = dev.amp_kernel([
            "bn_stats_partial_o0",
            "bn_stats_partial",
            "bn_stats_partial",
        ]);
        cuda_launch!(dev, name, partial_grid(a.m, a.c), x, m, c, ws)?;
        let (eps, mom, sm, si, rm, rv) = (
            a.eps,
            a.momentum,
            a.save_mean,
            a.save_inv_std,
            a.running_mean,
            a.running_var,
        );
        let name = dev.amp_kernel([
            "bn_stats_finalize_o0",
            "bn_stats_finalize",
            "bn_stats_finalize_o3",
        ]);
        let cfg = dev.grid_channels(a.c);
        cuda_launch!(dev, name, cfg, ws, splits, x, m, c, eps, mom, sm, si, rm, rv)?;
        apply(dev, &a, x, a.save_mean, a.save_inv_std, self.y)
    }
}

/// y = gamma * (x - mean) * inv_std + beta with the batch statistics just computed.
fn apply(
    dev: &CudaDevice,
    a: &BnArgs,
    x: DevPtr,
    mean: DevPtr,
    inv_std: DevPtr,
    y: DevPtr,
) -> Result<()> {
    let (m, c, relu, ldy, yoff) = (
        a.m as u64,
        a.c as i32,
        a.relu as i32,
        a.ldy as i32,
        a.yoff as i32,
    );
    let (g, b) = (a.gamma, a.beta);
    let name = dev.amp_kernel(["bn_apply_o0", "bn_apply", "bn_apply_o3"]);
    let cfg = dev.grid_1d(m * a.c as u64)?;
    cuda_launch!(dev, name, cfg, x, mean, inv_std, g, b, m, c, relu, y, ldy, yoff)
}

/// Inference forward with the running statistics.
#[derive(Clone, Copy, Debug)]
pub struct BnForwardInfer {
    pub a: BnArgs,
    pub x: DevPtr,
    pub y: DevPtr,
}

impl Launch for BnForwardInfer {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (a, x, y) = (self.a, self.x, self.y);
        let (m, c, relu, ldy, yoff) = (
            a.m as u64,
            a.c as i32,
            a.relu as i32,
            a.ldy as i32,
            a.yoff as i32,
        );
        let (rm, rv, g, b, eps) = (a.running_mean, a.running_var, a.gamma, a.beta, a.eps);
        let cfg = dev.grid_1d(m * a.c as u64)?;
        let name = dev.amp_kernel(["bn_infer_o0", "bn_infer", "bn_infer_o3"]);
        cuda_launch!(dev, name, cfg, x, rm, rv, g, b, eps, m, c, relu, y, ldy, yoff)
    }
}

/// Backward: dgamma, dbeta (fp32, overwritten) and dx (+)= the input gradient. With `a.relu`,
/// `y` is the BN+ReLU output and the ReLU backward is fused.
#[derive(Clone, Copy, Debug)]
pub struct BnBackward {
    pub a: BnArgs,
    pub x: DevPtr,
    pub y: DevPtr,
    pub dy: DevPtr,
    pub dgamma: DevPtr,
    pub dbeta: DevPtr,
    pub dx: DevPtr,
    pub accumulate: bool,
    pub ws: DevPtr,
}

impl Launch for BnBackward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (a, x, y, dy, ws) = (self.a, self.x, self.y, self.dy, self.ws);
        let (dgamma, dbeta, dx) = (self.dgamma, self.dbeta, self.dx);
        let (m, c, relu, ldy, yoff) = (
            a.m as u64,
            a.c as i32,
            a.relu as i32,
            a.ldy as i32,
            a.yoff as i32,
        );
        let (mean, is, g) = (a.save_mean, a.save_inv_std, a.gamma);
        let splits = splits(m) as i32;
        let name = dev.amp_kernel(["bn_bwd_partial_o0", "bn_bwd_partial", "bn_bwd_partial_o3"]);
        let cfg = partial_grid(a.m, a.c);
        cuda_launch!(dev, name, cfg, x, y, dy, mean, is, m, c, relu, ldy, yoff, ws)?;
        let cfg = dev.grid_channels(a.c);
        cuda_launch!(dev, "bn_bwd_finalize", cfg, ws, splits, c, dgamma, dbeta)?;
        let acc = self.accumulate as i32;
        let cfg = dev.grid_1d(m * a.c as u64)?;
        let name = dev.amp_kernel(["bn_bwd_dx_o0", "bn_bwd_dx", "bn_bwd_dx_o3"]);
        cuda_launch!(
            dev, name, cfg, x, y, dy, mean, is, g, dgamma, dbeta, m, c, relu, ldy, yoff, dx, acc
        )
    }
}
