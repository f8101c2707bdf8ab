//! Launcher of kernels/normalize.cu: the u8 batch into the f32 staging image on the device.

use anyhow::{Context, Result};

use super::Factors;
use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};

/// dst = src * mul[c] + add[c] over `count` u8 values of an RGB (channel-fastest) batch.
#[derive(Clone, Copy, Debug)]
pub struct NormalizeU8 {
    pub src: DevPtr,
    pub count: usize,
    pub factors: Factors,
    pub dst: DevPtr,
}

impl Launch for NormalizeU8 {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (src, dst, n) = (self.src, self.dst, self.count as u64);
        // Typed tuples rather than array patterns: tests/kernel_signatures.rs reads the types.
        let (m0, m1, m2): (f32, f32, f32) = self.factors.mul.into();
        let (a0, a1, a2): (f32, f32, f32) = self.factors.add.into();
        cuda_launch!(
            dev,
            "normalize_u8_f32",
            dev.grid_1d(n)?,
            src,
            n,
            m0,
            m1,
            m2,
            a0,
            a1,
            a2,
            dst
        )
    }
}
