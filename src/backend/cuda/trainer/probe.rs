//! What a CUDA trainer shows besides training: tensors and gradients read back, the step's
//! figures (launches, useful work, bytes) and the gradient sync's communication time alone.

use anyhow::{bail, Context, Result};
use half::f16;
use std::time::Instant;

use super::super::arena;
use super::super::cost::{step_limit, Cost, Rates};
use super::super::figures::StepFigures;
use super::super::fusion;
use super::super::grad_sync::GradSync;
use super::super::layout::StepArgs;
use super::super::program::Stage;
use super::CudaTrainer;
use crate::backend::Images;
use crate::gpu::{KernelPaths, Launch};
use crate::ops::conv::count::ConvWork;
use crate::ops::conv::cuda::ConvTarget;
use crate::plan::TensorId;

impl CudaTrainer {
    /// The last step's parameter gradients (still scaled by the loss scale), flat host order.
    pub fn grads(&self) -> Result<Vec<f32>> {
        self.check_training()?;
        // Explicit, rather than relying on a pageable copy blocking: the last step may still be
        // running (its report is read a step later), and an async kernel error surfaces here.
        self.dev.synchronize()?;
        Ok(self
            .step
            .params
            .gather(&self.dev.stream.clone_dtoh(&self.bufs.grads)?))
    }

    /// Runs only the forward launches of a training step (a diagnostic: the tensors the backward
    /// will read are then intact in the arena, see [`Self::read_tensor`]).
    pub fn forward_train(&mut self, images: Images<'_>, labels: &[u32], step: u64) -> Result<()> {
        self.check_training()?;
        self.stage_input(images, Some(labels))?;
        let args = StepArgs {
            train: true,
            step,
            ..StepArgs::infer()
        };
        let forward = self
            .step
            .program
            .train
            .iter()
            .take_while(|l| !matches!(l, Stage::Backward { .. }));
        for &stage in forward {
            for call in self.step.calls(stage, args)? {
                call.launch(&self.dev)?;
            }
        }
        self.dev.synchronize()
    }

    /// The step's useful work and its limit at `rates` (see [`super::super::cost`]), once a step has
    /// resolved its calls.
    pub fn step_limit(&self, rates: Rates) -> Option<(Cost, Option<f64>)> {
        let (_, calls) = self.train_calls.as_ref()?;
        Some(step_limit(calls, self.step.amp, rates))
    }

    /// Kernel launches one training step runs, once a step has resolved its calls (a step
    /// replayed from a CUDA graph adds the launch that writes its step values; the host then
    /// queues that launch and the graph, not each kernel; a u8 batch adds its normalisation,
    /// queued outside the graph).
    pub fn launches_per_step(&self) -> Option<usize> {
        let (_, calls) = self.train_calls.as_ref()?;
        let kernels: usize = calls.iter().map(|(_, c)| c.kernel_launches()).sum();
        Some(kernels + self.dev.paths.graph as usize + self.u8_staging.is_some() as usize)
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
        Some(StepFigures::of(calls, &self.step))
    }

    /// Whether the device keeps tensor `id` at all (the fusion elides a BN output its ReLU
    /// absorbs, and that output's gradient).
    pub fn stores(&self, id: TensorId) -> bool {
        id < self.step.offsets.len() && !self.step.fusion.elided[id]
    }

    /// An arena tensor copied back as f32 (valid only while the planner keeps it alive). A slice
    /// is gathered from its root's rows.
    pub fn read_tensor(&self, id: TensorId) -> Result<Vec<f32>> {
        if id >= self.step.offsets.len() {
            bail!(
                "tensor {id} is not a tensor of plan '{}'",
                self.step.plan.name
            );
        }
        if self.step.fusion.elided[id] {
            bail!("tensor {id} is fused away on the device (a BN output its ReLU absorbs)");
        }
        let off = self.step.offsets[id].context("tensor has an arena placement")?;
        let elem = arena::elem_bytes(&self.step.plan, self.step.amp, id);
        let (c, ld) = (
            fusion::channels(&self.step.plan, &self.step.bwd, id),
            self.step.ld(id),
        );
        let count = if id < self.step.bwd.first_grad {
            self.step.plan.tensor(id).numel()
        } else {
            self.step.bwd.grad_tensor(id).numel()
        };
        let rows = count / c;
        // The span from the first element of the first row to the last of the last row.
        let span = elem * ((rows - 1) * ld + c);
        let bytes = self
            .dev
            .stream
            .clone_dtoh(&self.bufs.arena.slice(off..off + span))?;
        let value = |i: usize| -> f32 {
            let b = &bytes[i * elem..(i + 1) * elem];
            match elem {
                2 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            }
        };
        Ok((0..count).map(|i| value(i / c * ld + i % c)).collect())
    }

    /// The median time (ms) of `iters` rounds of one step's NCCL bucket all-reduces run alone,
    /// nothing else on the GPU; None without NCCL. A collective: every rank must call it.
    pub fn grad_sync_alone_ms(&self, iters: usize) -> Result<Option<f64>> {
        let GradSync::Nccl(sync) = &self.sync else {
            return Ok(None);
        };
        self.dev.synchronize()?;
        let mut times = Vec::with_capacity(iters.max(1));
        for _ in 0..iters.max(1) {
            let t = Instant::now();
            sync.reduce_alone(self.step.ptr.grads)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        Ok(Some(times[times.len() / 2]))
    }
}
