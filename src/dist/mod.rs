//! Distributed data-parallel training: one process per rank, started by `mpirun`.
//!
//! This room sits below the backends: it knows plans, parameters and the optimizer, never a
//! backend, the training loop or the command line. It gives them
//!
//! - [`Comm`]: rank, world and node-local rank, and the few collectives a run needs (sum
//!   all-reduce, broadcast from rank 0). [`Single`] is the one-process world; with the cargo
//!   feature `mpi`, `MpiComm` runs them over MPI (rsmpi). Nothing here is a home-made transport.
//! - [`GradReducer`]: the one operation a backend needs, summing its flat gradient buffer over
//!   the ranks, so a backend can take it without knowing about MPI. [`GradSyncMode`] is the
//!   `--grad-sync` choice a CUDA run makes between that and NCCL.
//! - fault handling: a watchdog that aborts the job when a collective waits longer than
//!   `--collective-timeout`, and a panic hook that aborts it instead of leaving the others
//!   blocked, both naming the rank and the step ([`watchdog`]).
//! - [`init`]: reads the launcher's environment ([`launch`]), starts MPI when the job has more
//!   than one process, and refuses a launcher of another MPI or a binary built without MPI.

pub mod bench;
pub mod dump;
pub mod launch;
#[cfg(feature = "mpi")]
mod mpi;
pub mod nccl_bench;
pub mod watchdog;

use anyhow::{bail, Result};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// Sums a flat gradient buffer over the ranks. The training backends take one (optionally) and
/// call it after backward and before the overflow check and the optimizer, so every rank sees
/// the same gradients and skips the same steps.
pub trait GradReducer {
    /// Sums `buf` elementwise over all ranks, in place: afterwards every rank holds the same sum.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Number of ranks; the caller folds `1 / world` into its unscale factor to get the mean.
    fn world(&self) -> usize;
}

/// The collectives and identity of one rank in the job.
pub trait Comm: GradReducer {
    fn rank(&self) -> usize;
    /// Rank among the processes of this node (for devices and thread shares).
    fn local_rank(&self) -> usize;
    /// Processes of the job on this node.
    fn local_size(&self) -> usize;
    /// Sums `buf` over all ranks, in place (counters and metrics).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Overwrites `buf` on every rank with rank 0's.
    fn broadcast_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Overwrites `bytes` (any length) on every rank with rank 0's.
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) -> Result<()>;
    /// What carries the collectives, for logs and the benchmark.
    fn transport(&self) -> String;
    /// Elements per all-reduce bucket, for transports that reduce in buckets.
    fn set_bucket_elems(&self, _elems: usize) {}
}

/// The world of one process: every collective is the identity.
pub struct Single;

impl GradReducer for Single {
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn world(&self) -> usize {
        1
    }
}

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn local_size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _bytes: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn transport(&self) -> String {
        "none (one process)".into()
    }
}

/// `--grad-sync`: how a data-parallel CUDA run sums its gradients (the CPU backend always uses
/// MPI on the host).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum GradSyncMode {
    /// NCCL when the library is found and the device is CUDA, else the host-staged path.
    #[default]
    Auto,
    /// NCCL buckets overlapping the backward pass; an error when NCCL cannot be loaded.
    Nccl,
    /// Through host memory and MPI (a device sync per step).
    Host,
}

/// Elements per all-reduce bucket by default (16 MiB of f32): small enough that the scratch
/// buffer is cheap, large enough that per-call latency does not show.
pub const DEFAULT_BUCKET_ELEMS: usize = 4 << 20;

/// The default `--collective-timeout`: long enough for rank 0 to write a v4 checkpoint or draw
/// the curves while the others wait at the next collective.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// This process's rank and the global step it is at, for messages from places that have no
/// handle on the run (the panic hook, the watchdog, the loader).
static RANK: AtomicUsize = AtomicUsize::new(0);
static WORLD: AtomicUsize = AtomicUsize::new(1);
static STEP: AtomicU64 = AtomicU64::new(0);

pub fn rank() -> usize {
    RANK.load(Ordering::Relaxed)
}

/// Whether this process prints progress and writes the run's files (rank 0).
pub fn is_primary() -> bool {
    rank() == 0
}

/// Records the step the run is at; see [`current_step`].
pub fn set_step(step: u64) {
    STEP.store(step, Ordering::Relaxed);
}

/// The 1-based step this rank is working on (0 before training starts).
pub fn current_step() -> u64 {
    STEP.load(Ordering::Relaxed)
}

/// Where in the job this process is, for error messages: "rank 1 of 2 at step 7".
pub fn whereabouts() -> String {
    format!(
        "rank {} of {} at step {}",
        rank(),
        WORLD.load(Ordering::Relaxed),
        current_step()
    )
}

/// Joins the job the launcher started: MPI when the binary has it and a launcher started this
/// process, else the one-process world. Errors: a
/// launcher of another MPI, or a multi-process launch of a binary built without MPI.
pub fn init(timeout: Duration) -> Result<Rc<dyn Comm>> {
    let launcher = launch::launcher_size(|k| std::env::var(k).ok());
    let comm = start(launcher)?;
    if let Some(why) = launch::mismatch(launcher, MPI.then(|| comm.world())) {
        bail!("{why}");
    }
    RANK.store(comm.rank(), Ordering::Relaxed);
    WORLD.store(comm.world(), Ordering::Relaxed);
    if comm.world() > 1 {
        watchdog::start(timeout);
        watchdog::install_panic_hook();
    }
    Ok(comm)
}

/// Whether this binary was built with MPI.
pub const MPI: bool = cfg!(feature = "mpi");

#[cfg(feature = "mpi")]
fn start(launcher: Option<(&str, usize)>) -> Result<Rc<dyn Comm>> {
    match launcher {
        Some(_) => Ok(Rc::new(mpi::MpiComm::init()?)),
        None => Ok(Rc::new(Single)),
    }
}

#[cfg(not(feature = "mpi"))]
fn start(_launcher: Option<(&str, usize)>) -> Result<Rc<dyn Comm>> {
    Ok(Rc::new(Single))
}

/// Ends the whole job now with `code`: MPI_Abort under MPI (the launcher then stops every
/// rank), a plain exit otherwise. For errors that leave the other ranks waiting at a collective.
pub fn abort_job(code: i32) -> ! {
    #[cfg(feature = "mpi")]
    if WORLD.load(Ordering::Relaxed) > 1 {
        mpi::abort_world(code);
    }
    std::process::exit(code)
}

/// Threads for this rank: the node's cores divided among the job's processes on the node, at
/// least one.
pub fn thread_share(local_size: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / local_size.max(1)).max(1)
}

/// Gives every rank its own dropout masks: the masks hash (node seed, step, element), so ranks
/// with the same seeds would drop the same units of their different images. Rank 0 keeps the
/// plan's seeds, so a one-process run is unchanged.
pub fn mix_dropout_seeds(plan: &mut crate::plan::Plan, rank: usize) {
    if rank == 0 {
        return;
    }
    for node in &mut plan.nodes {
        if let crate::plan::Op::Dropout { seed, .. } = &mut node.op {
            *seed ^= (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
}

/// Test hook: `INCEPTION_DIST_FAULT=<rank>:<kind>:<step>` makes that rank fail at that global
/// step (1-based), so the tests can check that the job ends with a clear message instead of
/// hanging. Kinds: `panic`, `exit` (a non-zero exit without MPI's finalise), `kill` (SIGKILL to
/// itself), `hang` (sleeps forever).
pub fn fault_point(step: u64) {
    let Ok(spec) = std::env::var("INCEPTION_DIST_FAULT") else {
        return;
    };
    let parts: Vec<&str> = spec.split(':').collect();
    let [r, kind, s] = parts[..] else { return };
    if r.parse() != Ok(rank()) || s.parse() != Ok(step) {
        return;
    }
    eprintln!("rank {}: injected fault '{kind}' at step {step}", rank());
    match kind {
        "panic" => panic!("injected panic (INCEPTION_DIST_FAULT)"),
        "exit" => std::process::exit(3),
        "kill" => {
            let _ = std::process::Command::new("kill")
                .args(["-9", &std::process::id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(60));
        }
        "hang" => loop {
            std::thread::sleep(Duration::from_secs(60));
        },
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_seeds_differ_per_rank_and_rank_0_keeps_the_plan() {
        let config = crate::plan::PlanConfig {
            batch: 2,
            image_size: 32,
            num_classes: 4,
            dropout: 0.2,
            ..Default::default()
        };
        let plan = crate::plan::build("tiny", config).unwrap();
        let seeds = |p: &crate::plan::Plan| -> Vec<u64> {
            p.nodes
                .iter()
                .filter_map(|n| match n.op {
                    crate::plan::Op::Dropout { seed, .. } => Some(seed),
                    _ => None,
                })
                .collect()
        };
        let (mut r0, mut r1) = (plan.clone(), plan.clone());
        mix_dropout_seeds(&mut r0, 0);
        mix_dropout_seeds(&mut r1, 1);
        assert!(!seeds(&plan).is_empty());
        assert_eq!(seeds(&r0), seeds(&plan));
        assert_ne!(seeds(&r1), seeds(&plan));
    }

    #[test]
    fn thread_share_is_at_least_one() {
        assert!(thread_share(1) >= 1);
        assert_eq!(thread_share(10_000), 1);
    }
}
