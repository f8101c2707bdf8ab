//! fp32 <-> fp16 cast launchers (kernels/cast.cu): the staged batch into the fp16 input tensor,
//! and device tensors read back for checks.

use anyhow::{Context, Result};

use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};

/// dst = src rounded to fp16 (round to nearest even), `count` elements.
#[derive(Clone, Copy, Debug)]
pub struct CastF32ToF16 {
    pub src: DevPtr,
    pub count: usize,
    pub dst: DevPtr,
}

impl Launch for CastF32ToF16 {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (src, dst, n) = (self.src, self.dst, self.count as u64);
        cuda_launch!(dev, "cast_f32_to_f16", dev.grid_1d(n)?, src, n, dst)
    }
}

/// dst = src widened to fp32, `count` elements.
#[derive(Clone, Copy, Debug)]
pub struct CastF16ToF32 {
    pub src: DevPtr,
    pub count: usize,
    pub dst: DevPtr,
}

impl Launch for CastF16ToF32 {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (src, dst, n) = (self.src, self.dst, self.count as u64);
        cuda_launch!(dev, "cast_f16_to_f32", dev.grid_1d(n)?, src, n, dst)
    }
}
