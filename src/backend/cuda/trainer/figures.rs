//! Host-side figures of the trainer's step, once a step has resolved its calls: the limit at a
//! card's rates, launches, what the convolutions issue, the bytes BN and the pools move. Counted
//! from the calls, not measured.

use super::super::cost::{step_limit, Cost, Rates};
use super::super::figures::StepFigures;
use super::CudaTrainer;
use crate::gpu::KernelPaths;
use crate::ops::conv::count::ConvWork;
use crate::ops::conv::cuda::ConvTarget;

impl CudaTrainer {
    /// The step's useful work and its limit at `rates` (see [`super::cost`]), once a step has
    /// resolved its calls.
    pub fn step_limit(&self, rates: Rates) -> Option<(Cost, Option<f64>)> {
        let (_, calls) = self.train_calls.as_ref()?;
        Some(step_limit(calls, self.step.amp, rates))
    }

    /// Kernel launches one training step runs, once a step has resolved its calls (a step
    /// replayed from a CUDA graph adds the launch that writes its step values; the host then
    /// queues that launch and the graph, not each kernel).
    pub fn launches_per_step(&self) -> Option<usize> {
        let (_, calls) = self.train_calls.as_ref()?;
        let kernels: usize = calls.iter().map(|(_, c)| c.kernel_launches()).sum();
        Some(kernels + self.dev.paths.graph as usize)
    }

    /// What one training step's convolutions issue with kernel paths `paths` on this device (its
    /// level and SMs, every shape taken as verified), once a step has resolved its calls: a host
    /// count from the tile choices (work.rs), not a measurement.
    pub fn conv_work(&self, paths: KernelPaths) -> Option<ConvWork> {
        let (_, calls) = self.train_calls.as_ref()?;
        let target = ConvTarget {
            paths,
            ..ConvTarget::of(&self.dev)
        };
        Some(self.step.conv_work(calls, &target))
    }

    /// Host-side figures of one training step (launches, bytes BN and the pools move by the
    /// launchers' model), once a step has resolved its calls.
    pub fn step_figures(&self) -> Option<StepFigures> {
        let (_, calls) = self.train_calls.as_ref()?;
        Some(StepFigures::of(calls, self.step.amp))
    }
}
