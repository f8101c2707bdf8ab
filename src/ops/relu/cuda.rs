//! Standalone ReLU launchers (kernels/relu.cu), for plans that do not
//! fuse the ReLU into the batchnorm before it.

use anyhow::{Context, Result};

use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};

/// y = max(x, 0) over `count` activations.
#[derive(Clone, Copy, Debug)]
pub struct ReluForward {
    pub count: usize,
    pub x: DevPtr,
    pub y: DevPtr,
}

impl Launch for ReluForward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (n, x, y) = (self.count as u64, self.x, self.y);
        let name = dev.amp_kernel(["relu_fwd_o0", "relu_fwd", "relu_fwd"]);
        cuda_launch!(dev, name, dev.grid_1d(n)?, x, n, y)
    }
}

/// dx (+)= dy where the forward output y is positive.
#[derive(Clone, Copy, Debug)]
pub struct ReluBackward {
    pub count: usize,
    pub y: DevPtr,
    pub dy: DevPtr,
    pub dx: DevPtr,
    pub accumulate: bool,
}

impl Launch for ReluBackward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (y, dy, dx) = (self.y, self.dy, self.dx);
        let (n, acc) = (self.count as u64, self.accumulate as i32);
        let name = dev.amp_kernel(["relu_bwd_o0", "relu_bwd", "relu_bwd"]);
        cuda_launch!(dev, name, dev.grid_1d(n)?, y, dy, n, dx, acc)
    }
}
