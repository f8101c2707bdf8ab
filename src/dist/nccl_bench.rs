//! `bench allreduce --transport nccl`: the same figure as [`super::bench`] with the buffer on
//! the GPU of each rank's local rank and NCCL summing it, bucket by bucket on one stream, as the
//! trainer's buckets are. The first all-reduce is checked against the known sum, so a run with
//! one rank is also the smoke test of tools/gpu-check.sh (communicator, one all-reduce, result).

use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaContext, DevicePtr};

use super::bench::{time_bucket, AllreduceRow};
use super::Comm;
use crate::gpu::nccl::{unique_id, NcclComm};

/// Element `i` of rank `rank`'s buffer: small integers, so every sum is exact in fp32.
pub fn pattern(i: usize, rank: usize) -> f32 {
    ((i % 97) * (rank + 1)) as f32
}

/// The first index where `sum` differs from the sum of [`pattern`] over `world` ranks.
pub fn first_wrong(sum: &[f32], world: usize) -> Option<usize> {
    let ranks: usize = (1..=world).sum();
    (0..sum.len()).find(|&i| sum[i] != pattern(i, 0) * ranks as f32)
}

/// Times `iters` all-reduces of `elems` f32 per bucket size on NCCL (one untimed, checked,
/// first). Every rank must call it with the same arguments.
pub fn run(
    comm: &dyn Comm,
    elems: usize,
    buckets_mib: &[Option<usize>],
    iters: usize,
) -> Result<Vec<AllreduceRow>> {
    crate::gpu::libs::ensure_driver()?;
    let gpus = cudarc::driver::result::init()
        .and_then(|_| cudarc::driver::result::device::get_count())
        .map_err(|e| anyhow!("the CUDA driver reports no usable GPU: {e:?}"))?;
    if gpus < 1 {
        bail!("the CUDA driver reports no GPU");
    }
    let ctx = CudaContext::new(comm.local_rank() % gpus as usize)?;
    let stream = ctx.default_stream();
    let host: Vec<f32> = (0..elems).map(|i| pattern(i, comm.rank())).collect();
    let buf = stream.clone_htod(&host)?;
    let mut id = match comm.rank() {
        0 => unique_id()?,
        _ => Vec::new(),
    };
    comm.broadcast_bytes(&mut id)?;
    let nccl = NcclComm::init(&id, comm.rank(), comm.world())?;
    // NCCL writes through the raw address; everything runs on this one stream.
    let ptr = buf.device_ptr(&stream).0;
    let reduce = |bucket: usize| -> Result<()> {
        for start in (0..elems).step_by(bucket) {
            let n = bucket.min(elems - start);
            nccl.all_reduce_sum_f32(ptr + 4 * start as u64, n, &stream)?;
        }
        stream.synchronize()?;
        Ok(())
    };
    let bytes = elems as f64 * 4.0;
    let mut rows = Vec::new();
    for (k, &mib) in buckets_mib.iter().enumerate() {
        let bucket = mib.map_or(elems, |m| (m << 20) / 4).max(1);
        reduce(bucket)?;
        if k == 0 {
            check_first_sum(&stream.clone_dtoh(&buf)?, comm.world())?;
        }
        rows.push(time_bucket(comm, mib, bytes, iters, || reduce(bucket))?);
    }
    Ok(rows)
}

fn check_first_sum(sum: &[f32], world: usize) -> Result<()> {
    if let Some(i) = first_wrong(sum, world) {
        bail!(
            "NCCL all-reduce over {world} ranks gave {} at element {i}, expected {}",
            sum[i],
            pattern(i, 0) * (1..=world).sum::<usize>() as f32
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_expected_sum_is_exact_and_a_wrong_element_is_found() {
        let world = 8;
        let mut sum: Vec<f32> = (0..1000)
            .map(|i| (0..world).map(|r| pattern(i, r)).sum())
            .collect();
        assert_eq!(first_wrong(&sum, world), None);
        assert!(check_first_sum(&sum, world).is_ok());
        sum[500] += 1.0;
        assert_eq!(first_wrong(&sum, world), Some(500));
        let e = check_first_sum(&sum, world).unwrap_err().to_string();
        assert!(e.contains("element 500"), "{e}");
        // One rank: the sum is the buffer itself.
        let one: Vec<f32> = (0..100).map(|i| pattern(i, 0)).collect();
        assert_eq!(first_wrong(&one, 1), None);
    }
}
