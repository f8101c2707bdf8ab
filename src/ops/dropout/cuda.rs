//! Dropout launchers (kernels/dropout.cu): the mask is a counter-based hash of (seed, step,
//! element index), so forward and backward agree without storing it. The step is a launch
//! argument, or read from device memory (`step_dev`) by a step replayed as a CUDA graph.

use anyhow::{Context, Result};

use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};

/// y = x * mask / (1 - p) over `count` activations (p = 0 copies).
#[derive(Clone, Copy, Debug)]
pub struct DropoutForward {
    pub count: usize,
    pub p: f32,
    pub seed: u64,
    pub step: u64,
    /// Device address of the step (a u64), read instead of `step` when not 0.
    pub step_dev: DevPtr,
    pub x: DevPtr,
    pub y: DevPtr,
}

impl Launch for DropoutForward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (p, seed, step, x, y) = (self.p, self.seed, self.step, self.x, self.y);
        let (n, step_dev) = (self.count as u64, self.step_dev);
        let name = dev.amp_kernel(["dropout_fwd_o0", "dropout_fwd", "dropout_fwd"]);
        cuda_launch!(dev, name, dev.grid_1d(n)?, x, n, p, seed, step, y, step_dev)
    }
}

/// dx (+)= dy * mask / (1 - p) with the forward's mask.
#[derive(Clone, Copy, Debug)]
pub struct DropoutBackward {
    pub count: usize,
    pub p: f32,
    pub seed: u64,
    pub step: u64,
    /// As [`DropoutForward::step_dev`].
    pub step_dev: DevPtr,
    pub dy: DevPtr,
    pub dx: DevPtr,
    pub accumulate: bool,
}

impl Launch for DropoutBackward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (p, seed, step, dy, dx) = (self.p, self.seed, self.step, self.dy, self.dx);
        let (n, acc, step_dev) = (self.count as u64, self.accumulate as i32, self.step_dev);
        let name = dev.amp_kernel(["dropout_bwd_o0", "dropout_bwd", "dropout_bwd"]);
        cuda_launch!(
            dev,
            name,
            dev.grid_1d(n)?,
            dy,
            n,
            p,
            seed,
            step,
            dx,
            acc,
            step_dev
        )
    }
}
