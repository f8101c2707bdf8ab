//! Max and average pool launchers (kernels/pool.cu). The output may be a channel slice of a
//! concat (`ldy`, `yoff`).

use anyhow::{Context, Result};
use cudarc::driver::DeviceRepr;

use super::PoolShape;
use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};

/// Mirrors `struct PoolParams` in kernels/pool.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolParams {
    pub x: u64,
    pub dy: u64,
    pub y: u64,
    pub dx: u64,
    pub n: i32,
    pub h: i32,
    pub w: i32,
    pub c: i32,
    pub oh: i32,
    pub ow: i32,
    pub k: i32,
    pub stride: i32,
    pub pad: i32,
    pub ldy: i32,
    pub yoff: i32,
    pub accumulate: i32,
}
// SAFETY: plain repr(C) data laid out like the CUDA struct.
unsafe impl DeviceRepr for PoolParams {}
const _: () = assert!(std::mem::size_of::<PoolParams>() == 80);

impl PoolParams {
    fn new(s: &PoolShape, ldy: usize, yoff: usize) -> Self {
        PoolParams {
            n: s.n as i32,
            h: s.h as i32,
            w: s.w as i32,
            c: s.c as i32,
            oh: s.oh() as i32,
            ow: s.ow() as i32,
            k: s.pool.k as i32,
            stride: s.pool.stride as i32,
            pad: s.pool.pad as i32,
            ldy: ldy as i32,
            yoff: yoff as i32,
            ..Default::default()
        }
    }
}

/// Max (`max = true`) or average pool forward into y (row stride `ldy`, channel offset `yoff`).
#[derive(Clone, Copy, Debug)]
pub struct PoolForward {
    pub s: PoolShape,
    pub max: bool,
    pub x: DevPtr,
    pub y: DevPtr,
    pub ldy: usize,
    pub yoff: usize,
}

impl Launch for PoolForward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let s = &self.s;
        let p = PoolParams {
            x: self.x,
            y: self.y,
            ..PoolParams::new(s, self.ldy, self.yoff)
        };
        let name = if self.max {
            dev.amp_kernel(["maxpool_fwd_o0", "maxpool_fwd", "maxpool_fwd"])
        } else {
            dev.amp_kernel(["avgpool_fwd_o0", "avgpool_fwd", "avgpool_fwd"])
        };
        let cfg = dev.grid_1d((s.n * s.oh() * s.ow() * s.c) as u64)?;
        cuda_launch!(dev, name, cfg, p)
    }
}

/// Pool backward: dx (+)= gradient; max pool needs the forward input x to find each window's
/// first maximum. `ldy`/`yoff` describe the output gradient's layout.
#[derive(Clone, Copy, Debug)]
pub struct PoolBackward {
    pub s: PoolShape,
    pub max: bool,
    pub x: DevPtr,
    pub dy: DevPtr,
    pub ldy: usize,
    pub yoff: usize,
    pub dx: DevPtr,
    pub accumulate: bool,
}

impl Launch for PoolBackward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let s = &self.s;
        let p = PoolParams {
            x: self.x,
            dy: self.dy,
            dx: self.dx,
            accumulate: self.accumulate as i32,
            ..PoolParams::new(s, self.ldy, self.yoff)
        };
        let name = if self.max {
            dev.amp_kernel(["maxpool_bwd_o0", "maxpool_bwd", "maxpool_bwd"])
        } else {
            dev.amp_kernel(["avgpool_bwd_o0", "avgpool_bwd", "avgpool_bwd"])
        };
        cuda_launch!(dev, name, dev.grid_1d((s.n * s.h * s.w * s.c) as u64)?, p)
    }
}
