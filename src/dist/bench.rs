//! `bench allreduce`: the time to sum InceptionV4's fp32 gradient buffer over the ranks, per
//! bucket size, on MPI on the host (this file) or NCCL on the GPUs ([`super::nccl_bench`]).

use super::Comm;
use crate::params::ParamLayout;
use crate::plan::{self, PlanConfig};
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

/// One bucket size's figures.
#[derive(Clone, Debug, Serialize)]
pub struct AllreduceRow {
    /// Bucket size in MiB; None: the whole buffer in one call.
    pub bucket_mib: Option<usize>,
    pub median_ms: f64,
    pub min_ms: f64,
    /// Bus bandwidth as NCCL counts it: bytes * 2 (world - 1) / world per second.
    pub bus_gb_per_s: f64,
}

/// Gradients of the v4 plan with `classes` classes (42,679,816 for 1000).
pub fn v4_gradient_len(classes: usize) -> Result<usize> {
    let config = PlanConfig {
        batch: 1,
        image_size: 299,
        num_classes: classes,
        ..Default::default()
    };
    Ok(ParamLayout::new(&plan::build("v4", config)?).param_len)
}

/// Times `iters` all-reduces of `elems` f32 per bucket size (after one untimed warm-up each).
/// Every rank must call it with the same arguments.
pub fn run(
    comm: &dyn Comm,
    elems: usize,
    buckets_mib: &[Option<usize>],
    iters: usize,
) -> Result<Vec<AllreduceRow>> {
    let mut buf: Vec<f32> = (0..elems).map(|i| (i % 97) as f32 * 1e-3).collect();
    let bytes = elems as f64 * 4.0;
    let mut rows = Vec::new();
    for &mib in buckets_mib {
        comm.set_bucket_elems(mib.map_or(elems, |m| (m << 20) / 4));
        comm.all_reduce_sum(&mut buf)?;
        rows.push(time_bucket(comm, mib, bytes, iters, || {
            comm.all_reduce_sum(&mut buf)
        })?);
    }
    comm.set_bucket_elems(super::DEFAULT_BUCKET_ELEMS);
    Ok(rows)
}

/// Times `iters` calls of `reduce` (all-reducing `bytes` in buckets of `mib`), each started
/// together on every rank, into one row. Every rank reports the slowest rank's times: a step
/// waits for it.
pub(super) fn time_bucket(
    comm: &dyn Comm,
    mib: Option<usize>,
    bytes: f64,
    iters: usize,
    mut reduce: impl FnMut() -> Result<()>,
) -> Result<AllreduceRow> {
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let mut sync = [0.0f64];
        comm.all_reduce_sum_f64(&mut sync)?;
        let t = Instant::now();
        reduce()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    max_over_ranks(comm, &mut times)?;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let world = comm.world() as f64;
    Ok(AllreduceRow {
        bucket_mib: mib,
        median_ms: median,
        min_ms: times[0],
        bus_gb_per_s: bytes * 2.0 * (world - 1.0) / world / (median * 1e-3) / 1e9,
    })
}

/// Elementwise maximum over the ranks, from sums: each rank fills its own column.
pub(super) fn max_over_ranks(comm: &dyn Comm, values: &mut [f64]) -> Result<()> {
    let (world, rank, n) = (comm.world(), comm.rank(), values.len());
    let mut table = vec![0.0; world * n];
    table[rank * n..(rank + 1) * n].copy_from_slice(values);
    comm.all_reduce_sum_f64(&mut table)?;
    for (i, v) in values.iter_mut().enumerate() {
        *v = (0..world)
            .map(|r| table[r * n + i])
            .fold(f64::MIN, f64::max);
    }
    Ok(())
}

/// The fraction of a step's gradient communication hidden behind its backward pass: one minus
/// the time the step gains from communicating over the time the communication takes alone,
/// clamped to [0, 1]. None when there is no communication time to hide.
pub fn hidden_fraction(step_alone_ms: f64, step_with_ms: f64, comm_alone_ms: f64) -> Option<f64> {
    if comm_alone_ms.is_nan() || comm_alone_ms <= 0.0 {
        return None;
    }
    let exposed = (step_with_ms - step_alone_ms).max(0.0);
    Some((1.0 - exposed / comm_alone_ms).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::hidden_fraction;

    #[test]
    fn hidden_fraction_from_the_three_times() {
        assert_eq!(hidden_fraction(100.0, 100.0, 20.0), Some(1.0));
        assert_eq!(hidden_fraction(100.0, 110.0, 20.0), Some(0.5));
        assert_eq!(hidden_fraction(100.0, 120.0, 20.0), Some(0.0));
        // Noise either way stays in [0, 1].
        assert_eq!(hidden_fraction(100.0, 95.0, 20.0), Some(1.0));
        assert_eq!(hidden_fraction(100.0, 150.0, 20.0), Some(0.0));
        assert_eq!(hidden_fraction(100.0, 120.0, 0.0), None);
    }

    #[test]
    fn v4_has_the_published_parameter_count() {
        assert_eq!(super::v4_gradient_len(1000).unwrap(), 42_679_816);
    }
}
