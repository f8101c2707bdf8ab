//! The training loop: epochs of steps over the loader, the schedule, loss scaling, logs,
//! evaluation and checkpoints. It drives any [`Backend`].

use super::eval::{evaluate_sharded, EvalResult};
use super::log::{Progress, RunLog};
use super::Schedule;
use crate::backend::{self, resolve_device, Amp, Backend, Device, InputFormat, StepOutcome};
use crate::checkpoint::{self, Checkpoint, CheckpointMeta, RngState};
use crate::data::{AugmentConfig, Dataset, EpochPosition, Loader, LoaderConfig, Normalization};
use crate::dist::{self, Comm, Single};
use crate::export::engine_preprocessing;
use crate::optim::{LossScaler, RmsProp, RmsPropConfig};
use crate::params::{ModelState, ParamLayout};
use crate::plan::{self, Plan, PlanConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Informational lines: rank 0 only, so a distributed run prints one copy (the other ranks
/// print only errors).
macro_rules! say {
    ($($arg:tt)*) => {
        if dist::is_primary() {
            eprintln!($($arg)*);
        }
    };
}

mod ranks;
mod start;
mod tally;

use ranks::*;
use start::*;
use tally::*;

/// Prefix of checkpoint file names: `<prefix>-e<epoch>-s<step>.safetensors`.
pub const CHECKPOINT_PREFIX: &str = "inception";

/// Everything a training run needs; stored in every checkpoint it writes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub plan: String,
    pub data: PathBuf,
    pub eval_data: Option<PathBuf>,
    pub out: PathBuf,
    pub epochs: usize,
    pub batch_size: usize,
    pub image_size: usize,
    pub device: Device,
    /// Mixed precision; None: the device's default (O2 on CUDA, O0 on the CPU).
    pub amp: Option<Amp>,
    pub seed: u64,
    pub workers: usize,
    pub lr_init: f32,
    pub lr_max: f32,
    pub lr_end: f32,
    pub warmup_epochs: usize,
    pub rmsprop: RmsPropConfig,
    pub label_smoothing: f32,
    pub dropout: f32,
    /// None: the default for the precision ([`LossScaler::for_amp`]).
    pub loss_scaler: Option<LossScaler>,
    pub augment: AugmentConfig,
    pub save_every_epochs: usize,
    /// Also save every this many global steps, mid-epoch included (0: never).
    #[serde(default)]
    pub save_every_steps: usize,
    pub keep_max: usize,
    pub eval_every_epochs: usize,
    pub log_every: usize,
    /// A checkpoint to continue from, or `auto` ([`RESUME_AUTO`]): the newest valid checkpoint in
    /// `out`, or a fresh start when there is none.
    pub resume: Option<PathBuf>,
    /// Distributed CUDA runs: how the gradients are summed (`--grad-sync`).
    #[serde(default)]
    pub grad_sync: dist::GradSyncMode,
    /// Distributed CUDA runs on NCCL: MiB of fp32 gradients per all-reduce bucket.
    #[serde(default = "default_bucket_mib")]
    pub bucket_mib: f64,
}

fn default_bucket_mib() -> f64 {
    crate::backend::cuda::buckets::DEFAULT_BUCKET_MIB as f64
}

/// The `--resume` value that picks the newest valid checkpoint in `--out` (a file of that name
/// is given as `./auto`).
pub const RESUME_AUTO: &str = "auto";

/// rng.extra keys of a mid-epoch checkpoint: where the epoch's batch stream stands and the loss
/// tally of its steps so far.
const EXTRA_EPOCH_POSITION: &str = "epoch_position";
const EXTRA_EPOCH_TALLY: &str = "epoch_tally";
/// rng.extra key of a distributed mid-epoch checkpoint: every rank's epoch position, by rank.
const EXTRA_EPOCH_POSITIONS: &str = "epoch_positions";

/// What a finished run reports.
#[derive(Debug)]
pub struct TrainSummary {
    pub epoch_losses: Vec<f64>,
    pub last_checkpoint: Option<PathBuf>,
    pub eval: Option<EvalResult>,
    pub steps: u64,
}

/// Mutable run state that a checkpoint captures.
struct RunState {
    step: u64,
    /// Completed epochs.
    epoch: usize,
    scaler: LossScaler,
    /// How far the current epoch has come (all zero at an epoch boundary).
    position: EpochPosition,
    /// The current epoch's loss tally so far.
    tally: Tally,
}

impl RunState {
    fn fresh(scaler: LossScaler) -> Self {
        RunState {
            step: 0,
            epoch: 0,
            scaler,
            position: EpochPosition::default(),
            tally: Tally::default(),
        }
    }
}

pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    train_with(cfg, Rc::new(Single))
}

/// [`train`] as one rank of a data-parallel job (`comm`): rank 0 builds or loads the state and
/// sends it to the others, every rank trains on its shard of each epoch's shuffle with the
/// gradients summed over the ranks, and only rank 0 prints progress and writes the run's files.
pub fn train_with(cfg: &TrainConfig, comm: Rc<dyn Comm>) -> Result<TrainSummary> {
    let distributed = comm.world() > 1;
    if distributed {
        share_cpu_threads(comm.local_size());
    }
    let device = resolve_device(cfg.device)?;
    let train_set = Arc::new(Dataset::open(&cfg.data)?);
    let classes = train_set.classes().to_vec();
    let eval_set = cfg
        .eval_data
        .as_deref()
        .map(|p| open_eval_set(p, &classes).map(Arc::new))
        .transpose()?;
    let plan = plan::build(&cfg.plan, plan_config(cfg, classes.len()))?;
    let mut loader = Loader::new(train_set, loader_config(cfg, comm.as_ref()))?;
    let steps_per_epoch = loader.batches_per_epoch();
    let schedule = Schedule {
        lr_init: cfg.lr_init,
        lr_max: cfg.lr_max,
        lr_end: cfg.lr_end,
        warmup_epochs: cfg.warmup_epochs,
        steps_per_epoch,
        epochs: cfg.epochs,
    };
    let amp = backend::resolve_amp(device, cfg.amp)?;
    let scaler = cfg.loss_scaler.unwrap_or(LossScaler::for_amp(amp));
    let start = match comm.rank() {
        0 => Some(primary_start(
            cfg,
            &plan,
            scaler,
            steps_per_epoch,
            comm.world(),
        )?),
        _ => None,
    };
    let (model, optim, mut run) = match share_start(comm.as_ref(), cfg, &plan, start)? {
        Start::Done(path, steps) => {
            return Ok(TrainSummary {
                epoch_losses: Vec::new(),
                last_checkpoint: Some(path),
                eval: None,
                steps,
            })
        }
        Start::Run(model, optim, run) => (model, optim, *run),
    };
    let meta = CheckpointMeta::new(
        &plan,
        classes.clone(),
        engine_preprocessing(cfg.image_size, Normalization::IMAGENET),
    );
    let mut backend = rank_backend(device, amp, &plan, model, optim, &comm, cfg)?;
    loader.set_u8_batches(backend.input_format() == InputFormat::U8);
    let mut log = match dist::is_primary() {
        true => RunLog::open(&cfg.out)?,
        false => RunLog::discard(),
    };
    if distributed {
        say!(
            "distributed: {} ranks ({} on this node), global batch {}, collectives over {}",
            comm.world(),
            comm.local_size(),
            cfg.batch_size * comm.world(),
            comm.transport()
        );
    }
    say!(
        "training {} on {} ({} images, {} classes) with {}: {} epochs of {} steps, batch {}, {}x{}, lr_max {:.3e}, loss scale {}",
        plan.name,
        cfg.data.display(),
        loader.dataset().len(),
        classes.len(),
        backend.name(),
        cfg.epochs,
        steps_per_epoch,
        cfg.batch_size,
        cfg.image_size,
        cfg.image_size,
        cfg.lr_max,
        scaler_name(&run.scaler)
    );
    log.metrics(json!({"event": "start", "plan": plan.name, "device": backend.name(), "steps_per_epoch": steps_per_epoch, "batch_size": cfg.batch_size, "image_size": cfg.image_size, "epochs": cfg.epochs, "step": run.step, "world_size": comm.world()}))?;
    let ctx = RunCtx {
        cfg,
        comm: comm.as_ref(),
        meta: &meta,
    };
    let mut summary = TrainSummary {
        epoch_losses: Vec::new(),
        last_checkpoint: None,
        eval: None,
        steps: run.step,
    };
    while run.epoch < cfg.epochs {
        let epoch = run.epoch + 1;
        let mean_loss = run_epoch(
            &ctx,
            backend.as_mut(),
            &loader,
            &schedule,
            &mut run,
            &mut log,
            epoch,
            &mut summary.last_checkpoint,
        )?;
        run.epoch = epoch;
        run.position = EpochPosition::default();
        run.tally = Tally::default();
        summary.epoch_losses.push(mean_loss);
        let last = epoch == cfg.epochs;
        let eval_due = eval_set.is_some()
            && (last || (cfg.eval_every_epochs > 0 && epoch % cfg.eval_every_epochs == 0));
        let step_due =
            cfg.save_every_steps > 0 && run.step.is_multiple_of(cfg.save_every_steps as u64);
        let save_due =
            last || step_due || (cfg.save_every_epochs > 0 && epoch % cfg.save_every_epochs == 0);
        if eval_due || save_due {
            average_bn_statistics(backend.as_mut(), comm.as_ref())?;
        }
        if let (Some(set), true) = (&eval_set, eval_due) {
            summary.eval = Some(run_eval(
                backend.as_mut(),
                set,
                &ctx,
                &plan,
                (epoch, run.step),
                &mut log,
            )?);
        }
        if save_due {
            summary.last_checkpoint = Some(save_checkpoint(backend.as_mut(), &ctx, &run)?);
        }
        if dist::is_primary() {
            if let Err(e) = crate::report::refresh(&cfg.out) {
                eprintln!("warning: could not draw the training curves: {e:#}");
            }
        }
    }
    summary.steps = run.step;
    if let Some(dir) = dist::dump::dir() {
        dump_rank_state(backend.as_mut(), &meta, &dir, comm.rank())?;
    }
    Ok(summary)
}

fn plan_config(cfg: &TrainConfig, classes: usize) -> PlanConfig {
    PlanConfig {
        batch: cfg.batch_size,
        image_size: cfg.image_size,
        num_classes: classes,
        dropout: cfg.dropout,
        label_smoothing: cfg.label_smoothing,
        ..Default::default()
    }
}

/// This rank's loader: its shard of each epoch's shuffle (the same shuffle on every rank, from the
/// seed), with the node's cores divided among its ranks unless `--workers` says otherwise.
fn loader_config(cfg: &TrainConfig, comm: &dyn Comm) -> LoaderConfig {
    LoaderConfig {
        workers: worker_share(cfg.workers, comm),
        rank: comm.rank(),
        world_size: comm.world(),
        augment: cfg.augment.clone(),
        ..LoaderConfig::train(cfg.batch_size, cfg.image_size, cfg.seed)
    }
}

/// What every rank of a run needs: the configuration, the job, the checkpoint metadata.
struct RunCtx<'a> {
    cfg: &'a TrainConfig,
    comm: &'a dyn Comm,
    meta: &'a CheckpointMeta,
}

fn open_eval_set(path: &Path, classes: &[String]) -> Result<Dataset> {
    let set = Dataset::open(path)?;
    if set.classes() != classes {
        bail!(
            "the evaluation data {} has classes {:?}, but the training data has {:?}",
            path.display(),
            set.classes(),
            classes
        );
    }
    Ok(set)
}

#[allow(clippy::too_many_arguments)]
fn run_epoch(
    ctx: &RunCtx,
    backend: &mut dyn Backend,
    loader: &Loader,
    schedule: &Schedule,
    run: &mut RunState,
    log: &mut RunLog,
    epoch: usize,
    last_ckpt: &mut Option<PathBuf>,
) -> Result<f64> {
    let (cfg, comm) = (ctx.cfg, ctx.comm);
    // Images per second count every rank's images.
    let global_batch = cfg.batch_size * comm.world();
    let steps = loader.batches_per_epoch();
    let done_before = run.position.batches;
    let progress = Progress::new(
        steps as u64,
        done_before as u64,
        format!("epoch {epoch}/{}", cfg.epochs),
        cfg.log_every as u64,
    );
    let start = Instant::now();
    let mut tally = std::mem::take(&mut run.tally);
    let mut batches = loader.epoch_from(epoch - 1, run.position);
    let mut lr = schedule.lr(run.step);
    let mut i = done_before;
    let intervals = Intervals {
        log_every: cfg.log_every,
        schedule,
        epoch,
        first_step: run.step - done_before as u64,
    };
    while let Some(batch) = batches.next() {
        lr = schedule.lr(run.step);
        dist::set_step(run.step + 1);
        dist::fault_point(run.step + 1);
        let mut outcomes =
            backend.train_step(batch.input(), &batch.labels, run.step, lr, &mut run.scaler)?;
        mean_losses(comm, &mut outcomes)?;
        loader.recycle(batch);
        run.step += 1;
        i += 1;
        let ips = ((i - done_before) * global_batch) as f64 / start.elapsed().as_secs_f64();
        let scale = run.scaler.scale();
        intervals.settle(outcomes, &mut tally, log, scale, last_ckpt.as_deref(), ips)?;
        // Before the first outcome settles (dynamic scaling on CUDA) there is no loss to show.
        let loss = match tally.count {
            0 => "-".to_string(),
            _ => format!("{:.4}", tally.last_loss),
        };
        progress.update(i as u64, format!("loss {loss} lr {lr:.3e} {ips:.1} img/s"));
        // A save at the epoch's last step is the epoch-end save (after the evaluation).
        let save_due =
            cfg.save_every_steps > 0 && run.step.is_multiple_of(cfg.save_every_steps as u64);
        if save_due && i < steps {
            let mut settled = backend.settle(&mut run.scaler)?;
            mean_losses(comm, &mut settled)?;
            let scale = run.scaler.scale();
            intervals.settle(settled, &mut tally, log, scale, last_ckpt.as_deref(), ips)?;
            run.position = batches.position();
            run.tally = tally.clone();
            average_bn_statistics(backend, comm)?;
            *last_ckpt = Some(save_checkpoint(backend, ctx, run)?);
        }
    }
    if comm.world() > 1 && i < steps {
        // The other ranks are waiting in the next step's all-reduce: stop the job, not just
        // this rank's epoch.
        bail!("this rank's shard ran out of readable images after {i} of {steps} steps of epoch {epoch}, so the ranks' step counts would diverge");
    }
    // The last step's outcome may still be on the device (dynamic scaling on CUDA); the scaler
    // must be settled before the checkpoint saves it.
    let ips = ((i - done_before) * global_batch) as f64 / start.elapsed().as_secs_f64();
    let mut settled = backend.settle(&mut run.scaler)?;
    mean_losses(comm, &mut settled)?;
    let scale = run.scaler.scale();
    intervals.settle(settled, &mut tally, log, scale, last_ckpt.as_deref(), ips)?;
    progress.finish();
    let elapsed = start.elapsed().as_secs_f64() * 1000.0;
    let ran = (i - done_before).max(1);
    let (sum, count, last_loss) = (tally.sum, tally.count, tally.last_loss);
    let mean = sum / count.max(1) as f64;
    log.line(&format!(
        "epoch: {epoch} step: {}, loss is {last_loss:.4}",
        steps
    ))?;
    log.line(&format!(
        "Epoch time: {elapsed:.3} ms, per step time: {:.3} ms",
        elapsed / ran as f64
    ))?;
    let ips = (ran * global_batch) as f64 / (elapsed / 1000.0);
    log.metrics(json!({"event": "epoch", "epoch": epoch, "step": run.step, "mean_loss": mean, "last_loss": last_loss, "lr": lr, "epoch_ms": elapsed, "images_per_sec": ips, "skipped_files": batches.skipped()}))?;
    say!("epoch {epoch}: mean loss {mean:.4}, last {last_loss:.4}, {:.1} s, {ips:.1} img/s, {} unreadable files skipped", elapsed / 1000.0, batches.skipped());
    Ok(mean)
}

/// Evaluation sharded over the ranks (every image counted once) and summed.
fn run_eval(
    backend: &mut dyn Backend,
    set: &Arc<Dataset>,
    ctx: &RunCtx,
    plan: &Plan,
    (epoch, step): (usize, u64),
    log: &mut RunLog,
) -> Result<EvalResult> {
    let (cfg, comm) = (ctx.cfg, ctx.comm);
    let loader = Loader::new(
        set.clone(),
        LoaderConfig {
            workers: worker_share(cfg.workers, comm),
            rank: comm.rank(),
            world_size: comm.world(),
            ..LoaderConfig::eval(cfg.batch_size, cfg.image_size)
        },
    )?;
    let r = evaluate_sharded(backend, &loader, plan.config.num_classes, comm, |_| {})?;
    say!(
        "epoch {epoch} eval on {} images: {}",
        r.images,
        r.seed_line()
    );
    log.line(&r.seed_line())?;
    log.metrics(json!({"event": "eval", "epoch": epoch, "step": step, "loss": r.loss, "top1": r.top1, "top5": r.top5, "images": r.images}))?;
    Ok(r)
}

/// Rank 0 writes the checkpoint (atomically); every rank returns its path. The other ranks only
/// take part in gathering the epoch positions of a mid-epoch save.
fn save_checkpoint(backend: &mut dyn Backend, ctx: &RunCtx, run: &RunState) -> Result<PathBuf> {
    let (cfg, comm) = (ctx.cfg, ctx.comm);
    let positions = match (comm.world(), run.position.batches) {
        (1, _) | (_, 0) => Vec::new(),
        _ => gather_positions(comm, run.position)?,
    };
    let path = cfg.out.join(checkpoint::file_name(
        CHECKPOINT_PREFIX,
        run.epoch as u64,
        run.step,
    ));
    if !dist::is_primary() {
        return Ok(path);
    }
    let (model, optim) = backend.state()?;
    let mut meta = ctx.meta.clone();
    meta.step = run.step;
    meta.epoch = run.epoch as u64;
    meta.loss_scaler = run.scaler;
    meta.rng = RngState {
        seed: cfg.seed,
        epoch: run.epoch as u64,
        step: run.step,
        ..Default::default()
    };
    if run.position.batches > 0 {
        meta.rng.extra.insert(
            EXTRA_EPOCH_POSITION.into(),
            serde_json::to_string(&run.position)?,
        );
        meta.rng.extra.insert(
            EXTRA_EPOCH_TALLY.into(),
            serde_json::to_string(&TallyState::from(&run.tally))?,
        );
    }
    if !positions.is_empty() {
        meta.rng.extra.insert(
            EXTRA_EPOCH_POSITIONS.into(),
            serde_json::to_string(&positions)?,
        );
    }
    meta.extra
        .insert("world_size".into(), comm.world().to_string());
    meta.extra
        .insert("train_config".into(), serde_json::to_string(cfg)?);
    Checkpoint::from_state(&model, Some(&optim), meta).save(&path)?;
    for old in checkpoint::rotate(&cfg.out, CHECKPOINT_PREFIX, cfg.keep_max)? {
        eprintln!("removed old checkpoint {}", old.display());
    }
    eprintln!("saved {}", path.display());
    Ok(path)
}

fn scaler_name(s: &LossScaler) -> String {
    match s {
        LossScaler::None => "none".into(),
        LossScaler::Fixed(v) => format!("fixed {v}"),
        LossScaler::Dynamic { scale, .. } => format!("dynamic from {scale}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(step: u64, loss: f32, skipped: bool) -> StepOutcome {
        StepOutcome {
            step,
            loss,
            skipped,
            scale_changed: skipped.then_some((65536.0, 32768.0)),
        }
    }

    #[test]
    fn tally_counts_applied_steps_and_logs_scale_changes_with_their_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RunLog::open(dir.path()).unwrap();
        let mut t = Tally::default();
        // A skipped overflow (its loss may be inf) is neither counted nor fatal.
        for o in [
            outcome(0, 2.0, false),
            outcome(1, f32::INFINITY, true),
            outcome(2, 1.0, false),
        ] {
            t.record(o, &mut log, 1, None).unwrap();
        }
        assert_eq!((t.sum, t.count, t.last_loss), (3.0, 2, 1.0));
        let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
        assert!(metrics.contains(r#""event":"loss_scale""#), "{metrics}");
        assert!(
            metrics.contains(r#""step":2"#),
            "1-based step of the skipped one: {metrics}"
        );
    }

    #[test]
    fn interval_records_carry_the_settled_steps_own_loss_and_step() {
        // Outcomes arriving one step late, as on CUDA: step k's during step k+1's call, the last
        // one at the epoch's end. Epoch 2 starts at global step 4, logging every 2nd step.
        let dir = tempfile::tempdir().unwrap();
        let mut log = RunLog::open(dir.path()).unwrap();
        let schedule = Schedule::for_batch(64, 4, 3);
        let at = Intervals {
            log_every: 2,
            schedule: &schedule,
            epoch: 2,
            first_step: 4,
        };
        let mut t = Tally::default();
        let losses = [2.0, 1.5, 1.25, 1.0];
        for call in 0..=4u64 {
            let settled: Vec<StepOutcome> = call
                .checked_sub(1)
                .map(|k| outcome(4 + k, losses[k as usize], false))
                .into_iter()
                .collect();
            at.settle(settled, &mut t, &mut log, 1024.0, None, 10.0)
                .unwrap();
        }
        let records: Vec<serde_json::Value> =
            std::fs::read_to_string(dir.path().join("metrics.jsonl"))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .filter(|v: &serde_json::Value| v["event"] == "step")
                .collect();
        assert_eq!(records.len(), 2);
        for (r, (step, loss, mean)) in records.iter().zip([(6, 1.5, 1.75), (8, 1.0, 1.125)]) {
            assert_eq!(r["step"], step);
            assert_eq!(r["loss"], loss);
            assert_eq!(r["mean_loss"], mean);
            assert_eq!(r["lr"], schedule.lr(step - 1) as f64);
        }
    }

    #[test]
    fn tally_stops_on_a_non_finite_loss_that_was_applied_naming_step_and_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = RunLog::open(dir.path()).unwrap();
        let mut t = Tally::default();
        let ckpt = Path::new("run/ckpt_1.safetensors");
        let err = t
            .record(outcome(41, f32::NAN, false), &mut log, 3, Some(ckpt))
            .unwrap_err()
            .to_string();
        assert!(err.contains("step 42") && err.contains("epoch 3"), "{err}");
        assert!(err.contains("ckpt_1.safetensors"), "{err}");
    }
}
