//! The fused softmax cross-entropy launcher (kernels/softmax_ce.cu): loss and logits gradient in
//! one kernel, the mean loss reduced by the last block to finish (`counter`).

use anyhow::{Context, Result};
use cudarc::driver::LaunchConfig;

use crate::cuda_launch;
use crate::gpu::{CudaDevice, DevPtr, Launch, BLOCK};

/// Labels of the softmax cross-entropy: int32 class indices or f32 (the plan's label tensor).
#[derive(Clone, Copy, Debug)]
pub enum Labels {
    I32(DevPtr),
    F32(DevPtr),
}

/// The loss scale a kernel applies: a value known when the launch is queued, or the address of
/// the device-resident dynamic scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ScaleArg {
    Value(f32),
    Device(DevPtr),
}

impl ScaleArg {
    /// (value, address) as the kernels take them: the address wins when it is not 0.
    pub fn split(self) -> (f32, DevPtr) {
        match self {
            ScaleArg::Value(v) => (v, 0),
            ScaleArg::Device(p) => (1.0, p),
        }
    }
}

/// Loss and gradient over logits [n][k]: per-sample losses in `row_loss` (n fp32), their mean in
/// `loss` (1 fp32), dlogits scaled by `grad_scale / n`. `counter` is one u32 of device memory that
/// starts at 0 (the kernel leaves it at 0).
#[derive(Clone, Copy, Debug)]
pub struct SoftmaxCe {
    pub n: usize,
    pub k: usize,
    pub smoothing: f32,
    pub grad_scale: ScaleArg,
    pub logits: DevPtr,
    pub labels: Labels,
    pub row_loss: DevPtr,
    pub loss: DevPtr,
    pub counter: DevPtr,
    pub dlogits: DevPtr,
}

impl Launch for SoftmaxCe {
    fn launch(&self, dev: &CudaDevice) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (self.n as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (logits, row_loss, loss) = (self.logits, self.row_loss, self.loss);
        let (counter, dlogits, smoothing) = (self.counter, self.dlogits, self.smoothing);
        let (ni, ki) = (self.n as i32, self.k as i32);
        let (grad_scale, scale_dev): (f32, DevPtr) = self.grad_scale.split();
        let (name, lab): (&str, DevPtr) = match self.labels {
            Labels::I32(p) => (
                dev.amp_kernel(["softmax_ce_i32_o0", "softmax_ce_i32", "softmax_ce_i32"]),
                p,
            ),
            Labels::F32(p) => (
                dev.amp_kernel(["softmax_ce_f32_o0", "softmax_ce_f32", "softmax_ce_f32"]),
                p,
            ),
        };
        cuda_launch!(
            dev, name, cfg, logits, lab, ni, ki, smoothing, grad_scale, scale_dev, row_loss, loss,
            counter, dlogits
        )
    }
}
