//! `bench train --device cuda` under mpirun: how much of a step's gradient communication the
//! backward pass hides. Three times, each the mean over the same timed steps: the step with no
//! communication (each rank on its own), the step with the NCCL buckets, and the buckets'
//! all-reduces alone; the hidden fraction is [`hidden_fraction`] of them.

use anyhow::{bail, Result};
use serde::Serialize;

use crate::backend::cuda::buckets::bucket_elems;
use crate::backend::cuda::grad_sync::GradSync;
use crate::backend::cuda::CudaTrainer;
use crate::dist::bench::hidden_fraction;
use crate::dist::Comm;

/// The figures of one kernel-path run.
#[derive(Clone, Debug, Serialize)]
pub struct Overlap {
    pub world: usize,
    pub bucket_mib: f64,
    pub buckets: usize,
    pub step_alone_ms: f64,
    pub step_with_comm_ms: f64,
    pub comm_alone_ms: f64,
    /// None when the communication took no measurable time.
    pub hidden_fraction: Option<f64>,
}

impl Overlap {
    pub fn describe(&self) -> String {
        format!(
            "{} ranks, {} buckets of {} MiB: step {:.2} ms alone, {:.2} ms with NCCL; all-reduces \
             alone {:.2} ms; hidden behind backward: {}",
            self.world,
            self.buckets,
            self.bucket_mib,
            self.step_alone_ms,
            self.step_with_comm_ms,
            self.comm_alone_ms,
            self.hidden_fraction
                .map_or("unknown".into(), |f| format!("{:.0}%", 100.0 * f))
        )
    }
}

/// Turns `trainer` (already timed alone: `step_alone_ms`) into a data-parallel one over NCCL,
/// times its steps with `time` (mean ms) and its buckets alone. Every rank must call it.
pub fn measure(
    trainer: CudaTrainer,
    comm: &dyn Comm,
    bucket_mib: f64,
    step_alone_ms: f64,
    time: impl FnOnce(&mut CudaTrainer) -> Result<f64>,
) -> Result<Overlap> {
    crate::gpu::nccl::ensure_nccl()?;
    let mut trainer = trainer.with_nccl(comm, bucket_elems(bucket_mib))?;
    let step_with_comm_ms = time(&mut trainer)?;
    let Some(comm_alone_ms) = trainer.grad_sync_alone_ms(5)? else {
        bail!("the trainer does not sum its gradients over NCCL");
    };
    let buckets = match trainer.grad_sync() {
        GradSync::Nccl(s) => s.buckets().map_or(0, |p| p.buckets.len()),
        _ => 0,
    };
    Ok(Overlap {
        world: comm.world(),
        bucket_mib,
        buckets,
        step_alone_ms,
        step_with_comm_ms,
        comm_alone_ms,
        hidden_fraction: hidden_fraction(step_alone_ms, step_with_comm_ms, comm_alone_ms),
    })
}
