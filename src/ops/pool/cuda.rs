//! Max and average pool launchers (kernels/pool.cu). The output may be a channel slice of a
//! concat (`ldy`, `yoff`). A max pool given an argmax buffer (the `pool_argmax` path) saves each
//! output's window position of its first maximum in the forward and its backward gathers through
//! it instead of re-reading x; without one it runs the baseline kernels.

use anyhow::{Context, Result};
use cudarc::driver::DeviceRepr;

use super::PoolShape;
use crate::cuda_launch;
use crate::gpu::traffic::act_bytes;
use crate::gpu::{CudaDevice, DevPtr, Launch, Traffic};
use crate::precision::Amp;

/// Mirrors `struct PoolParams` in kernels/pool.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolParams {
    pub x: u64,
    pub dy: u64,
    pub y: u64,
    pub dx: u64,
    pub argmax: u64,
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
const _: () = assert!(std::mem::size_of::<PoolParams>() == 88);

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

/// The largest window whose positions fit the argmax's byte (r * k + s <= 255).
pub const ARGMAX_MAX_K: usize = 16;

/// Bytes of a max pool's saved argmax: one per output element.
pub fn argmax_bytes(s: &PoolShape) -> usize {
    s.n * s.oh() * s.ow() * s.c
}

/// Refuses an argmax the window's positions do not fit.
fn check_argmax(s: &PoolShape, max: bool, argmax: DevPtr) -> Result<()> {
    if argmax != 0 && (!max || s.pool.k > ARGMAX_MAX_K) {
        anyhow::bail!(
            "an argmax needs a max pool with k <= {ARGMAX_MAX_K} (k {}, max {max})",
            s.pool.k
        );
    }
    Ok(())
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
    /// Max pool only: where to save the argmax ([`argmax_bytes`]), or 0 for none.
    pub argmax: DevPtr,
}

impl Launch for PoolForward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let s = &self.s;
        check_argmax(s, self.max, self.argmax)?;
        let p = PoolParams {
            x: self.x,
            y: self.y,
            argmax: self.argmax,
            ..PoolParams::new(s, self.ldy, self.yoff)
        };
        let cfg = dev.grid_1d((s.n * s.oh() * s.ow() * s.c) as u64)?;
        if self.argmax != 0 {
            let name = dev.amp_kernel([
                "maxpool_fwd_argmax_o0",
                "maxpool_fwd_argmax",
                "maxpool_fwd_argmax",
            ]);
            return cuda_launch!(dev, name, cfg, p);
        }
        let name = if self.max {
            dev.amp_kernel(["maxpool_fwd_o0", "maxpool_fwd", "maxpool_fwd"])
        } else {
            dev.amp_kernel(["avgpool_fwd_o0", "avgpool_fwd", "avgpool_fwd"])
        };
        cuda_launch!(dev, name, cfg, p)
    }
}

/// Pool backward: dx (+)= gradient; max pool needs the forward input x to find each window's
/// first maximum, or the argmax its forward saved (then x is not read and may be 0).
/// `ldy`/`yoff` describe the output gradient's layout.
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
    /// Max pool only: the argmax the forward saved, or 0 to recompute it from x.
    pub argmax: DevPtr,
}

impl Launch for PoolBackward {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let s = &self.s;
        check_argmax(s, self.max, self.argmax)?;
        let p = PoolParams {
            x: self.x,
            dy: self.dy,
            dx: self.dx,
            argmax: self.argmax,
            accumulate: self.accumulate as i32,
            ..PoolParams::new(s, self.ldy, self.yoff)
        };
        let cfg = dev.grid_1d((s.n * s.h * s.w * s.c) as u64)?;
        if self.argmax != 0 {
            let name = dev.amp_kernel([
                "maxpool_bwd_argmax_o0",
                "maxpool_bwd_argmax",
                "maxpool_bwd_argmax",
            ]);
            return cuda_launch!(dev, name, cfg, p);
        }
        let name = if self.max {
            dev.amp_kernel(["maxpool_bwd_o0", "maxpool_bwd", "maxpool_bwd"])
        } else {
            dev.amp_kernel(["avgpool_bwd_o0", "avgpool_bwd", "avgpool_bwd"])
        };
        cuda_launch!(dev, name, cfg, p)
    }
}

/// Bytes of a pool's input and output at a level.
fn pool_bytes(s: &PoolShape, amp: Amp) -> (usize, usize) {
    let act = act_bytes(amp);
    (
        s.n * s.h * s.w * s.c * act,
        s.n * s.oh() * s.ow() * s.c * act,
    )
}

impl PoolForward {
    /// Bytes moved (see [`Traffic`]): x read, y written, and the argmax when saved.
    pub fn traffic(&self, amp: Amp) -> Traffic {
        let (x, y) = pool_bytes(&self.s, amp);
        let argmax = if self.argmax != 0 {
            argmax_bytes(&self.s)
        } else {
            0
        };
        Traffic::new(x, y + argmax)
    }
}

impl PoolBackward {
    /// Bytes moved: dy read and dx written (read too when accumulating); a max pool also reads
    /// x (baseline: each tensor once, though it re-reads every covering window's k * k inputs)
    /// or its saved argmax.
    pub fn traffic(&self, amp: Amp) -> Traffic {
        let (x, y) = pool_bytes(&self.s, amp);
        let find_max = match (self.max, self.argmax) {
            (false, _) => 0,
            (true, 0) => x,
            (true, _) => argmax_bytes(&self.s),
        };
        let old_dx = x * self.accumulate as usize;
        Traffic::new(y + find_max + old_dx, x)
    }
}
