//! Executors of a plan: the CPU reference backend and the CUDA backend, behind one trait that the
//! training loop, evaluation and prediction drive.

pub mod cpu;
pub mod cpu_trainer;
pub mod cuda;

use crate::params::ModelState;
use crate::train::{LossScaler, RmsProp};
use anyhow::Result;

/// What one training step did.
#[derive(Clone, Copy, Debug)]
pub struct StepOutcome {
    /// Mean loss of the batch (unscaled).
    pub loss: f32,
    /// The step was skipped because the gradients overflowed.
    pub skipped: bool,
    /// The dynamic loss scale changed: (old, new).
    pub scale_changed: Option<(f32, f32)>,
}

/// A backend that can train and run a fixed-shape plan.
pub trait Backend {
    /// Short name for logs, e.g. "cpu".
    fn name(&self) -> String;
    /// Forward, backward, loss-scale check and optimizer update on one batch.
    fn train_step(
        &mut self,
        images: &[f32],
        labels: &[u32],
        step: u64,
        lr: f32,
        scaler: &mut LossScaler,
    ) -> Result<StepOutcome>;
    /// Inference forward on one batch: the logits `[batch, classes]`.
    fn infer(&mut self, images: &[f32]) -> Result<Vec<f32>>;
    /// The current weights, BN statistics and optimizer state, copied to the host.
    fn state(&mut self) -> Result<(ModelState, RmsProp)>;
}

/// Which device a command asked for.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Resolve `auto` and refuse what this build cannot run yet, with a clear message.
pub fn resolve_device(device: Device) -> Result<Device> {
    match device {
        Device::Cpu => Ok(Device::Cpu),
        Device::Auto => Ok(Device::Cpu),
        Device::Cuda => {
            anyhow::bail!("the CUDA training backend is not built yet: use --device cpu (or auto)")
        }
    }
}
