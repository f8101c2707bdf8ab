//! `inception-engine bench allreduce`: the all-reduce of v4's gradient buffer per bucket size,
//! over MPI on the host or NCCL on the GPUs (the figures come from `dist::bench` and
//! `dist::nccl_bench`).

use anyhow::{bail, Result};
use serde_json::json;

#[derive(clap::Args, Debug)]
pub struct AllreduceArgs {
    /// Bucket sizes in MiB; `whole` is the entire buffer in one call.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,whole")]
    pub buckets: Vec<String>,
    /// Timed all-reduces per bucket size (after one untimed).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Gradients to reduce (default: v4's with 1000 classes, 42,679,816).
    #[arg(long)]
    pub elems: Option<usize>,
    /// mpi: host buffers over MPI; nccl: a buffer on each rank's GPU over NCCL (the first sum is
    /// checked, so one rank is a smoke test of NCCL).
    #[arg(long, value_enum, default_value_t = Transport::Mpi)]
    pub transport: Transport,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Transport {
    Mpi,
    Nccl,
}

pub fn run(a: AllreduceArgs) -> Result<()> {
    let buckets = a
        .buckets
        .iter()
        .map(|b| match b.as_str() {
            "whole" => Ok(None),
            n => match n.parse::<usize>() {
                Ok(m) if m > 0 => Ok(Some(m)),
                _ => bail!("--buckets takes sizes in MiB or 'whole', not '{n}'"),
            },
        })
        .collect::<Result<Vec<_>>>()?;
    // Before MPI starts: a missing library is a plain error on every rank.
    let nccl = match a.transport {
        Transport::Nccl => Some(crate::gpu::nccl::ensure_nccl()?),
        Transport::Mpi => None,
    };
    let comm = crate::dist::init(crate::dist::DEFAULT_TIMEOUT)?;
    let elems = match a.elems {
        Some(n) => n,
        None => crate::dist::bench::v4_gradient_len(1000)?,
    };
    let (rows, transport) = match &nccl {
        Some(from) => (
            crate::dist::nccl_bench::run(comm.as_ref(), elems, &buckets, a.iters)?,
            format!("NCCL {} ({from})", nccl_version()?),
        ),
        None => (
            crate::dist::bench::run(comm.as_ref(), elems, &buckets, a.iters)?,
            comm.transport(),
        ),
    };
    if comm.rank() != 0 {
        return Ok(());
    }
    println!(
        "all-reduce (sum) of {elems} fp32 ({:.1} MiB) over {} ranks, {transport}; slowest rank's time",
        elems as f64 * 4.0 / 1048576.0,
        comm.world(),
    );
    for r in &rows {
        let bucket = r
            .bucket_mib
            .map_or("whole".to_string(), |m| format!("{m} MiB"));
        println!(
            "  bucket {bucket:>8}: median {:8.2} ms, min {:8.2} ms, bus {:6.2} GB/s",
            r.median_ms, r.min_ms, r.bus_gb_per_s
        );
    }
    if a.json {
        println!(
            "{}",
            json!({"elems": elems, "world": comm.world(), "transport": transport, "rows": rows})
        );
    }
    Ok(())
}

/// NCCL's version as `2.27.3`.
fn nccl_version() -> Result<String> {
    let v = crate::gpu::nccl::version()?;
    Ok(format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100))
}
