//! A training step replayed from captured CUDA graphs ([`KernelPaths::graph`]): the step's
//! calls are queued once under stream capture and each later step is one graph launch instead of
//! about 1,500 kernel launches. The calls must then stay valid from step to step, so they are
//! resolved with [`StepArgs::on_device`]: dropout reads the step number and RMSProp the learning
//! rate from the device words that [`SetStepArgs`] writes before each replay. Everything else a
//! call holds (addresses, shapes, the loss scale's address or fixed value) is fixed once the
//! arena is allocated; a change of the loss scaling resolves and captures again.
//!
//! [`KernelPaths::graph`]: crate::gpu::KernelPaths
//! [`StepArgs::on_device`]: super::layout::StepArgs

use anyhow::{Context, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::CudaGraph;

use super::calls::Call;
use super::layout::{StepArgs, StepLayout, ARG_LR, ARG_STEP};
use super::program::Stage;
use crate::gpu::{CudaDevice, Launch};
use crate::optim::cuda::SetStepArgs;

/// The captured segments of a training step, in order. One segment is the whole step (NCCL
/// buckets included); a data-parallel step reduced through host memory has two (up to the end
/// of the backward pass, and the rest), since the host reduction between them cannot be
/// captured.
pub struct StepGraphs {
    segments: Vec<CudaGraph>,
}

impl StepGraphs {
    /// Captures `calls` split before each index in `cuts` (ascending). Nothing runs: the
    /// launches are only recorded.
    pub fn capture(
        dev: &CudaDevice,
        calls: &[(Stage, Call)],
        cuts: &[usize],
        plan: &str,
    ) -> Result<Self> {
        let mut segments = Vec::new();
        let mut start = 0;
        for &end in cuts.iter().chain([&calls.len()]) {
            let segment = &calls[start..end];
            segments.push(capture(dev, || run_calls(dev, segment, plan))?);
            start = end;
        }
        Ok(StepGraphs { segments })
    }

    /// One segment of whatever `queue` queues on the device's stream (and on streams it forks
    /// from it by events and joins back: the NCCL buckets' communication stream).
    pub fn capture_with(dev: &CudaDevice, queue: impl FnOnce() -> Result<()>) -> Result<Self> {
        Ok(StepGraphs {
            segments: vec![capture(dev, queue)?],
        })
    }

    /// Queues segment `i`.
    pub fn launch(&self, i: usize) -> Result<()> {
        self.segments[i]
            .launch()
            .with_context(|| format!("launching segment {i} of the step's CUDA graph"))
    }
}

/// Queues `calls` in order, naming the stage of a call that fails to launch.
pub fn run_calls(dev: &CudaDevice, calls: &[(Stage, Call)], plan: &str) -> Result<()> {
    for (stage, call) in calls {
        call.launch(dev)
            .with_context(|| format!("{stage:?} of plan '{plan}'"))?;
    }
    Ok(())
}

/// One graph of what `queue` queues. The capture is ended even when a launch fails, so the
/// stream is never left capturing.
fn capture(dev: &CudaDevice, queue: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    dev.stream
        .begin_capture(mode)
        .context("starting the capture of the step's CUDA graph")?;
    let queued = queue();
    let graph = dev
        .stream
        .end_capture(CUgraphInstantiate_flags(0))
        .context("capturing the step's CUDA graph");
    queued?;
    graph?.context("the captured CUDA graph of the step is empty")
}

impl StepLayout {
    /// The launch that writes step `a`'s learning rate and number where the replayed graph's
    /// kernels read them.
    pub fn step_args(&self, a: StepArgs) -> SetStepArgs {
        SetStepArgs {
            lr: a.lr,
            step: a.step,
            lr_dst: self.report_word(ARG_LR),
            step_dst: self.report_word(ARG_STEP),
        }
    }
}
