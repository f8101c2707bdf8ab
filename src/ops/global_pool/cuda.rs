//! Global average pool launchers (kernels/global_pool.cu): [n, h*w, c] -> [n, c] and back.

use anyhow::{Context, Result};

use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};

/// y[n][c] = mean of x[n] over h*w.
#[derive(Clone, Copy, Debug)]
pub struct GlobalAvgPoolForward {
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub x: DevPtr,
    pub y: DevPtr,
}

impl Launch for GlobalAvgPoolForward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (x, y) = (self.x, self.y);
        let (ni, hwi, ci) = (self.n as i32, self.hw as i32, self.c as i32);
        let name = dev.amp_kernel([
            "global_avgpool_fwd_o0",
            "global_avgpool_fwd",
            "global_avgpool_fwd",
        ]);
        let cfg = dev.grid_1d((self.n * self.c) as u64)?;
        cuda_launch!(dev, name, cfg, x, ni, hwi, ci, y)
    }
}

/// dx (+)= dy / (h*w), broadcast over the pixels.
#[derive(Clone, Copy, Debug)]
pub struct GlobalAvgPoolBackward {
    pub n: usize,
    pub hw: usize,
    pub c: usize,
    pub dy: DevPtr,
    pub dx: DevPtr,
    pub accumulate: bool,
}

impl Launch for GlobalAvgPoolBackward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (dy, dx) = (self.dy, self.dx);
        let (ni, hwi, ci) = (self.n as i32, self.hw as i32, self.c as i32);
        let acc = self.accumulate as i32;
        let name = dev.amp_kernel([
            "global_avgpool_bwd_o0",
            "global_avgpool_bwd",
            "global_avgpool_bwd",
        ]);
        let cfg = dev.grid_1d((self.n * self.hw * self.c) as u64)?;
        cuda_launch!(dev, name, cfg, dy, ni, hwi, ci, dx, acc)
    }
}
