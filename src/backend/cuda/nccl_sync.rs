//! The NCCL gradient sync of a data-parallel CUDA step: the buckets of [`super::buckets`]
//! all-reduced on a communication stream while the backward pass goes on.
//!
//! Queueing a step with it: after the call that completes a bucket (its trigger), an event is
//! recorded on the compute stream, the communication stream waits on it and queues the bucket's
//! `ncclAllReduce` (fp32 sum, in place); before the first call that reads the gradients (the
//! overflow check, else the update) an event recorded on the communication stream after the last
//! bucket is waited on by the compute stream. The same sequence runs under stream capture: the
//! events fork the communication stream into the capture and join it back, so the whole step is
//! one CUDA graph, NCCL calls included.

use anyhow::{Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaStream};
use std::sync::Arc;

use super::buckets::{plan_buckets, BucketPlan};
use super::calls::Calls;
use crate::dist::Comm;
use crate::gpu::nccl::{unique_id, NcclComm};
use crate::gpu::{CudaDevice, DevPtr, Launch};

pub struct NcclSync {
    comm: NcclComm,
    stream: Arc<CudaStream>,
    /// Elements per bucket asked for (`--bucket-mib`).
    target: usize,
    /// The buckets of the calls last resolved, with one "written" event each.
    plan: Option<(BucketPlan, Vec<CudaEvent>)>,
    /// Recorded on the communication stream after the last bucket.
    reduced: CudaEvent,
}

impl NcclSync {
    /// Joins the job's NCCL communicator on `dev`'s GPU: rank 0 makes the unique id, MPI
    /// broadcasts it (`comm`), every rank then initialises its communicator (which blocks until
    /// all have). `target`: elements per bucket.
    pub fn new(dev: &CudaDevice, comm: &dyn Comm, target: usize) -> Result<Self> {
        let mut id = match comm.rank() {
            0 => unique_id()?,
            _ => Vec::new(),
        };
        comm.broadcast_bytes(&mut id)
            .context("broadcasting the NCCL unique id")?;
        dev.ctx.bind_to_thread()?;
        let nccl = NcclComm::init(&id, comm.rank(), comm.world())?;
        Ok(NcclSync {
            comm: nccl,
            stream: dev.ctx.new_stream()?,
            target,
            plan: None,
            reduced: event(dev)?,
        })
    }

    pub fn world(&self) -> usize {
        self.comm.world()
    }

    /// Cuts the gradient buffer (`len` elements at `grads`) into buckets for `calls` (after
    /// every resolution of the training calls) and proves the schedule on the host.
    pub fn plan(
        &mut self,
        dev: &CudaDevice,
        calls: &Calls,
        grads: DevPtr,
        len: usize,
    ) -> Result<()> {
        let plan = plan_buckets(calls, grads, len, self.target)?;
        let events = (0..plan.buckets.len())
            .map(|_| event(dev))
            .collect::<Result<Vec<_>>>()?;
        self.plan = Some((plan, events));
        Ok(())
    }

    /// The current bucket schedule (after [`Self::plan`]).
    pub fn buckets(&self) -> Option<&BucketPlan> {
        self.plan.as_ref().map(|(p, _)| p)
    }

    /// Queues `calls` on the compute stream with each bucket's all-reduce on the communication
    /// stream after its trigger, and the wait for the last before the gradients are read.
    pub fn queue_step(
        &self,
        dev: &CudaDevice,
        calls: &Calls,
        grads: DevPtr,
        name: &str,
    ) -> Result<()> {
        let (plan, written) = self
            .plan
            .as_ref()
            .context("the NCCL buckets are not planned")?;
        let mut next = 0;
        for (i, (stage, call)) in calls.iter().enumerate() {
            if i == plan.wait_before {
                self.reduced.record(&self.stream)?;
                dev.stream.wait(&self.reduced)?;
            }
            call.launch(dev)
                .with_context(|| format!("{stage:?} of plan '{name}'"))?;
            while next < plan.buckets.len() && plan.buckets[next].after == i {
                let b = plan.buckets[next];
                written[next].record(&dev.stream)?;
                self.stream.wait(&written[next])?;
                let ptr = grads + 4 * b.start as DevPtr;
                self.comm
                    .all_reduce_sum_f32(ptr, b.len, &self.stream)
                    .with_context(|| format!("bucket {next} (elements {:?})", b.range()))?;
                next += 1;
            }
        }
        Ok(())
    }
}

impl NcclSync {
    /// Queues every bucket's all-reduce on the communication stream with nothing else running
    /// and waits for them: a step's communication time when nothing hides it (a benchmark; the
    /// gradients are summed in place, so only between steps).
    pub fn reduce_alone(&self, grads: DevPtr) -> Result<()> {
        let (plan, _) = self
            .plan
            .as_ref()
            .context("the NCCL buckets are not planned")?;
        for b in &plan.buckets {
            let ptr = grads + 4 * b.start as DevPtr;
            self.comm.all_reduce_sum_f32(ptr, b.len, &self.stream)?;
        }
        self.stream.synchronize()?;
        Ok(())
    }
}

fn event(dev: &CudaDevice) -> Result<CudaEvent> {
    Ok(dev
        .ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))?)
}
