//! How a CUDA training step's calls are queued around the gradient sum of a data-parallel run:
//! not at all (one process), through host memory (MPI), or in NCCL buckets that overlap the
//! backward pass ([`NcclSync`]). Either way the step may be replayed from CUDA graphs.

use anyhow::Result;
use cudarc::driver::CudaSlice;
use std::rc::Rc;

use super::calls::Calls;
use super::graph::{run_calls, StepGraphs};
use super::nccl_sync::NcclSync;
use super::program::Stage;
use crate::dist::GradReducer;
use crate::gpu::CudaDevice;

/// The gradient sum of a step.
pub enum GradSync {
    /// One process: nothing to sum.
    Local,
    /// The slow, portable path: wait for the backward pass, copy the gradients to the host, sum
    /// them over MPI, copy them back. A graph is captured in two segments around it.
    Host(Rc<dyn GradReducer>),
    /// NCCL buckets on a communication stream; one graph holds the whole step.
    Nccl(NcclSync),
}

impl GradSync {
    /// Ranks the sum runs over (the update divides by it).
    pub fn world(&self) -> usize {
        match self {
            GradSync::Local => 1,
            GradSync::Host(r) => r.world(),
            GradSync::Nccl(s) => s.world(),
        }
    }

    /// What the log calls it.
    pub fn describe(&self) -> &'static str {
        match self {
            GradSync::Local => "none (one rank)",
            GradSync::Host(_) => "host-staged MPI all-reduce (a device sync per step)",
            GradSync::Nccl(_) => "NCCL all-reduce in buckets overlapping the backward pass",
        }
    }
}

/// Where a step's sum happens: the training calls, the device and the gradient buffer.
pub struct StepQueue<'a> {
    pub dev: &'a CudaDevice,
    pub calls: &'a Calls,
    pub grads: &'a mut CudaSlice<f32>,
    pub grads_ptr: u64,
    pub plan: &'a str,
}

impl StepQueue<'_> {
    /// The first call after the backward pass: the host-staged sum runs before it.
    fn update(&self) -> usize {
        self.calls
            .iter()
            .position(|(stage, _)| matches!(stage, Stage::OverflowCheck | Stage::Update))
            .unwrap_or(self.calls.len())
    }

    /// Queues the step's calls one by one with the sum in its place.
    pub fn run(self, sync: &GradSync) -> Result<()> {
        let update = self.update();
        match sync {
            GradSync::Local => run_calls(self.dev, self.calls, self.plan),
            GradSync::Host(reducer) => {
                run_calls(self.dev, &self.calls[..update], self.plan)?;
                reduce_through_host(self.dev, self.grads, reducer.as_ref())?;
                run_calls(self.dev, &self.calls[update..], self.plan)
            }
            GradSync::Nccl(s) => s.queue_step(self.dev, self.calls, self.grads_ptr, self.plan),
        }
    }

    /// Replays the step from `graphs`, capturing them first when there are none.
    pub fn replay(self, sync: &GradSync, graphs: &mut Option<StepGraphs>) -> Result<()> {
        if graphs.is_none() {
            *graphs = Some(match sync {
                GradSync::Local => StepGraphs::capture(self.dev, self.calls, &[], self.plan)?,
                GradSync::Host(_) => {
                    StepGraphs::capture(self.dev, self.calls, &[self.update()], self.plan)?
                }
                GradSync::Nccl(s) => StepGraphs::capture_with(self.dev, || {
                    s.queue_step(self.dev, self.calls, self.grads_ptr, self.plan)
                })?,
            });
        }
        let graphs = graphs.as_ref().expect("captured above");
        graphs.launch(0)?;
        if let GradSync::Host(reducer) = sync {
            reduce_through_host(self.dev, self.grads, reducer.as_ref())?;
            graphs.launch(1)?;
        }
        Ok(())
    }
}

/// Sums the gradient buffer over the ranks through host memory: waits for the backward pass,
/// copies the buffer out, reduces it, and copies the sum back before the update runs.
fn reduce_through_host(
    dev: &CudaDevice,
    grads: &mut CudaSlice<f32>,
    reducer: &dyn GradReducer,
) -> Result<()> {
    let mut host = dev.stream.clone_dtoh(grads)?;
    reducer.all_reduce_sum(&mut host)?;
    dev.stream.memcpy_htod(&host, grads)?;
    Ok(())
}
