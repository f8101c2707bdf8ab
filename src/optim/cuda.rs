//! The optimizer's launchers (kernels/optimizer.cu): the fused RMSProp update over the flat
//! parameter buffers, the gradient overflow check and the device loss scaler's update, all
//! reading the loss scale and overflow flag in device memory so the host never waits on them,
//! and the step's own values written to device memory for a step replayed from a CUDA graph.

use anyhow::{Context, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig};

use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch};

/// Mirrors `struct RmspropParams` in kernels/optimizer.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct RmspropParams {
    pub w: u64,
    pub w16: u64,
    pub ms: u64,
    pub mom: u64,
    pub grad: u64,
    pub decay: u64,
    pub lr_dev: u64,
    pub overflow: u64,
    pub count: u64,
    pub lr: f32,
    pub rho: f32,
    pub momentum: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub inv_loss_scale: f32,
    /// Device address of the loss scale (0: `inv_loss_scale` alone; otherwise the kernel
    /// multiplies `inv_loss_scale` by its inverse).
    pub loss_scale: u64,
}
// SAFETY: plain repr(C) data laid out like the CUDA struct.
unsafe impl DeviceRepr for RmspropParams {}
const _: () = assert!(std::mem::size_of::<RmspropParams>() == 104);

/// One fused RMSProp step over the flat parameter buffer; `grad_f16` picks the gradient type.
#[derive(Clone, Copy, Debug)]
pub struct Rmsprop {
    pub params: RmspropParams,
    pub grad_f16: bool,
}

impl Launch for Rmsprop {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let p = self.params;
        let name = if self.grad_f16 {
            "rmsprop_f16"
        } else {
            "rmsprop_f32"
        };
        cuda_launch!(dev, name, dev.grid_1d(p.count)?, p)
    }
}

/// *flag = 1 when any of `count` gradients is inf/NaN (the caller zeroes the flag first).
#[derive(Clone, Copy, Debug)]
pub struct OverflowCheck {
    pub grads: DevPtr,
    pub count: usize,
    pub f16: bool,
    pub flag: DevPtr,
}

impl Launch for OverflowCheck {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let (grads, flag, n) = (self.grads, self.flag, self.count as u64);
        let name = if self.f16 {
            "overflow_check_f16"
        } else {
            "overflow_check_f32"
        };
        cuda_launch!(dev, name, dev.grid_1d(n)?, grads, n, flag)
    }
}

/// The device loss scaler's step (see `loss_scale_update` in kernels/optimizer.cu): reads the
/// overflow flag, updates the fp32 scale and the u32 clean-step count in place.
#[derive(Clone, Copy, Debug)]
pub struct LossScaleUpdate {
    pub flag: DevPtr,
    pub scale: DevPtr,
    pub clean: DevPtr,
    pub growth_interval: u32,
}

impl Launch for LossScaleUpdate {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        let (flag, scale, clean) = (self.flag, self.scale, self.clean);
        let growth_interval = self.growth_interval;
        cuda_launch!(
            dev,
            "loss_scale_update",
            cfg,
            flag,
            scale,
            clean,
            growth_interval
        )
    }
}

/// Writes the learning rate (f32) to `lr_dst` and the step number (u64) to `step_dst`: the values
/// a step replayed from a CUDA graph reads from device memory (see `step_args_set` in
/// kernels/optimizer.cu). Queued before each replay.
#[derive(Clone, Copy, Debug)]
pub struct SetStepArgs {
    pub lr: f32,
    pub step: u64,
    pub lr_dst: DevPtr,
    pub step_dst: DevPtr,
}

impl Launch for SetStepArgs {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        let (lr, step, lr_dst, step_dst) = (self.lr, self.step, self.lr_dst, self.step_dst);
        cuda_launch!(dev, "step_args_set", cfg, lr, step, lr_dst, step_dst)
    }
}
