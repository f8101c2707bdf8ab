//! The distributed side of a run: each rank's backend (its dropout seeds, the gradient
//! reducer), its share of the node's loader and CPU threads, and the collectives over the BN
//! statistics and the step losses.

// The trainer's types and imports (this is part of its module).
use super::*;

/// Test hook (see [`dist::dump`]): this rank's final weights, BN statistics and optimizer state.
pub(super) fn dump_rank_state(
    backend: &mut dyn Backend,
    meta: &CheckpointMeta,
    dir: &Path,
    rank: usize,
) -> Result<()> {
    let (model, optim) = backend.state()?;
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("rank{rank}.safetensors"));
    Checkpoint::from_state(&model, Some(&optim), meta.clone()).save(path)
}

/// This rank's training backend: its own dropout masks (rank 0 keeps the plan's, the
/// checkpoint's, seeds) and the gradients summed over the job.
pub(super) fn rank_backend(
    device: Device,
    amp: Amp,
    plan: &Plan,
    model: ModelState,
    optim: RmsProp,
    comm: &Rc<dyn Comm>,
    cfg: &TrainConfig,
) -> Result<Box<dyn Backend>> {
    let mut rank_plan = plan.clone();
    dist::mix_dropout_seeds(&mut rank_plan, comm.rank());
    let reducer: Rc<dyn dist::GradReducer> = match dist::dump::dir() {
        Some(dir) => Rc::new(dist::dump::DumpFirst::new(comm.clone(), dir)),
        None => comm.clone(),
    };
    let mut nccl = None;
    if comm.world() > 1 {
        // Every rank must take the same path (NCCL's init and MPI's all-reduce do not meet): NCCL
        // only when every rank can load it.
        let mine = match device {
            Device::Cuda => crate::gpu::nccl::ensure_nccl(),
            _ => Err(anyhow::anyhow!("the CPU backend sums over MPI")),
        };
        let mut found = [mine.is_ok() as u8 as f64];
        comm.all_reduce_sum_f64(&mut found)?;
        let everywhere = found[0] as usize == comm.world();
        let find = || match (mine, everywhere) {
            (Ok(from), true) => Ok(from),
            (Err(e), _) => Err(e),
            (Ok(_), false) => Err(anyhow::anyhow!("NCCL cannot be loaded on every rank")),
        };
        let (choice, line) = backend::choose_grad_sync(cfg.grad_sync, device, find)?;
        say!("distributed: {line}");
        if choice == backend::SyncChoice::Nccl {
            let elems = bucket_elems(cfg.bucket_mib)?;
            nccl = Some((comm.as_ref(), elems));
        }
    }
    let ordinal = comm.local_rank();
    backend::build_distributed(device, amp, ordinal, rank_plan, model, optim, reducer, nccl)
}

/// `--bucket-mib` in fp32 elements.
fn bucket_elems(mib: f64) -> Result<usize> {
    if !(mib > 0.0 && mib.is_finite()) {
        anyhow::bail!("--bucket-mib must be a positive number of MiB, not {mib}");
    }
    Ok(crate::backend::cuda::buckets::bucket_elems(mib))
}

/// `--workers`, or (0) this rank's share of the node's cores.
pub(super) fn worker_share(workers: usize, comm: &dyn Comm) -> usize {
    match workers {
        0 => dist::thread_share(comm.local_size()),
        n => n,
    }
}

/// The rank's share of the node's cores for rayon (the CPU backend's threads), unless
/// RAYON_NUM_THREADS says otherwise. Ranks that each took every core would thrash.
pub(super) fn share_cpu_threads(local_size: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Fails only when the pool already exists (a second run in one process): keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(dist::thread_share(local_size))
            .build_global();
    }
}

/// The ranks' BN running statistics replaced by their mean, before each evaluation and
/// checkpoint (as timm's `distribute_bn`): each rank's statistics saw only its shard, and the
/// checkpoint and the evaluation should describe the whole data. Averaging the running variances
/// (rather than recomputing the variance of the union) is what timm and Horovod do.
pub(super) fn average_bn_statistics(backend: &mut dyn Backend, comm: &dyn Comm) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let mut states = backend.bn_states()?;
    comm.all_reduce_sum(&mut states)?;
    let inv = 1.0 / comm.world() as f32;
    states.iter_mut().for_each(|s| *s *= inv);
    backend.set_bn_states(&states)
}

/// The step outcomes' losses replaced by their mean over the ranks, so the logs and the
/// divergence check see the global batch's loss (and every rank stops together on a NaN).
pub(super) fn mean_losses(comm: &dyn Comm, outcomes: &mut [StepOutcome]) -> Result<()> {
    if comm.world() == 1 || outcomes.is_empty() {
        return Ok(());
    }
    let mut sums: Vec<f64> = outcomes.iter().map(|o| o.loss as f64).collect();
    comm.all_reduce_sum_f64(&mut sums)?;
    for (o, s) in outcomes.iter_mut().zip(sums) {
        o.loss = (s / comm.world() as f64) as f32;
    }
    Ok(())
}
