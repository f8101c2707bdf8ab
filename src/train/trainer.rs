//! The training loop: epochs of steps over the loader, the schedule, loss scaling, logs,
//! evaluation and checkpoints. It drives any [`Backend`].

use super::eval::{evaluate_sharded, EvalResult};
use super::log::{Progress, RunLog};
use super::Schedule;
use crate::backend::{self, resolve_device, Amp, Backend, Device, StepOutcome};
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
    let device = match cfg.device {
        // The CUDA backend cannot reduce gradients yet: `auto` must not pick it.
        Device::Auto if distributed => Device::Cpu,
        d => resolve_device(d)?,
    };
    let train_set = Arc::new(Dataset::open(&cfg.data)?);
    let classes = train_set.classes().to_vec();
    let eval_set = cfg
        .eval_data
        .as_deref()
        .map(|p| open_eval_set(p, &classes).map(Arc::new))
        .transpose()?;
    let plan = plan::build(&cfg.plan, plan_config(cfg, classes.len()))?;
    let loader = Loader::new(train_set, loader_config(cfg, comm.as_ref()))?;
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
    let mut backend = rank_backend(device, amp, &plan, model, optim, &comm)?;
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

/// Test hook (see [`dist::dump`]): this rank's final weights, BN statistics and optimizer state.
fn dump_rank_state(
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
fn rank_backend(
    device: Device,
    amp: Amp,
    plan: &Plan,
    model: ModelState,
    optim: RmsProp,
    comm: &Rc<dyn Comm>,
) -> Result<Box<dyn Backend>> {
    let mut rank_plan = plan.clone();
    dist::mix_dropout_seeds(&mut rank_plan, comm.rank());
    let reducer: Rc<dyn dist::GradReducer> = match dist::dump::dir() {
        Some(dir) => Rc::new(dist::dump::DumpFirst::new(comm.clone(), dir)),
        None => comm.clone(),
    };
    backend::build_distributed(device, amp, rank_plan, model, optim, reducer)
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

/// `--workers`, or (0) this rank's share of the node's cores.
fn worker_share(workers: usize, comm: &dyn Comm) -> usize {
    match workers {
        0 => dist::thread_share(comm.local_size()),
        n => n,
    }
}

/// The rank's share of the node's cores for rayon (the CPU backend's threads), unless
/// RAYON_NUM_THREADS says otherwise. Ranks that each took every core would thrash.
fn share_cpu_threads(local_size: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Fails only when the pool already exists (a second run in one process): keep it.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(dist::thread_share(local_size))
            .build_global();
    }
}

/// What every rank of a run needs: the configuration, the job, the checkpoint metadata.
struct RunCtx<'a> {
    cfg: &'a TrainConfig,
    comm: &'a dyn Comm,
    meta: &'a CheckpointMeta,
}

/// Where a run starts: a state to train from, or a run that is already complete.
enum Start {
    Done(PathBuf, u64),
    Run(ModelState, RmsProp, Box<RunState>),
}

/// Rank 0's start: the resumed or fresh state (only rank 0 reads checkpoints).
fn primary_start(
    cfg: &TrainConfig,
    plan: &Plan,
    scaler: LossScaler,
    steps_per_epoch: usize,
    world: usize,
) -> Result<(Start, Vec<EpochPosition>)> {
    let resume = resume_checkpoint(cfg, plan)?;
    if let Some((path, ckpt)) = &resume {
        if ckpt.meta.epoch as usize >= cfg.epochs && is_auto(cfg) {
            eprintln!(
                "{} is already at epoch {} of {}: the run is complete, nothing to do",
                path.display(),
                ckpt.meta.epoch,
                cfg.epochs
            );
            return Ok((Start::Done(path.clone(), ckpt.meta.step), Vec::new()));
        }
    }
    let (model, optim, run, positions) =
        initial_state(cfg, plan, scaler, resume, steps_per_epoch, world)?;
    Ok((Start::Run(model, optim, Box::new(run)), positions))
}

/// The part of the start that is not a buffer, as rank 0 sends it.
#[derive(Serialize, Deserialize)]
struct StartHeader {
    done: Option<(PathBuf, u64)>,
    step: u64,
    epoch: usize,
    scaler: LossScaler,
    /// Every rank's epoch position (empty at an epoch boundary).
    positions: Vec<EpochPosition>,
    tally: TallyState,
}

/// Rank 0's start on every rank: the header, then weights, BN statistics and optimizer state,
/// broadcast before the first step so every rank trains the same model.
fn share_start(
    comm: &dyn Comm,
    cfg: &TrainConfig,
    plan: &Plan,
    start: Option<(Start, Vec<EpochPosition>)>,
) -> Result<Start> {
    if comm.world() == 1 {
        return Ok(start.expect("rank 0 has a start").0);
    }
    let mut header = Vec::new();
    let mut state = None;
    if let Some((start, positions)) = start {
        let h = match &start {
            Start::Done(path, step) => StartHeader {
                done: Some((path.clone(), *step)),
                step: *step,
                epoch: 0,
                scaler: LossScaler::None,
                positions,
                tally: TallyState::from(&Tally::default()),
            },
            Start::Run(_, _, run) => StartHeader {
                done: None,
                step: run.step,
                epoch: run.epoch,
                scaler: run.scaler,
                positions,
                tally: TallyState::from(&run.tally),
            },
        };
        header = serde_json::to_vec(&h)?;
        state = Some(start);
    }
    comm.broadcast_bytes(&mut header)?;
    let h: StartHeader = serde_json::from_slice(&header).context("the start sent by rank 0")?;
    if let Some((path, step)) = h.done {
        return Ok(Start::Done(path, step));
    }
    let (mut model, mut optim) = match state {
        Some(Start::Run(model, optim, _)) => (model, optim),
        _ => {
            let model = ModelState::zeros(plan);
            let optim = RmsProp::new(cfg.rmsprop, &model.layout);
            (model, optim)
        }
    };
    for buf in [
        &mut model.params,
        &mut model.states,
        &mut optim.ms,
        &mut optim.mom,
    ] {
        comm.broadcast_f32(buf)?;
    }
    let run = RunState {
        step: h.step,
        epoch: h.epoch,
        scaler: h.scaler,
        position: h.positions.get(comm.rank()).copied().unwrap_or_default(),
        tally: h.tally.into(),
    };
    Ok(Start::Run(model, optim, Box::new(run)))
}

/// Every rank's epoch position, by rank (through a sum: each rank fills its own row).
fn gather_positions(comm: &dyn Comm, mine: EpochPosition) -> Result<Vec<EpochPosition>> {
    let world = comm.world();
    let mut table = vec![0.0f64; world * 4];
    let row = [
        mine.batches,
        mine.position,
        mine.skipped,
        mine.good_since_wrap,
    ];
    for (t, v) in table[comm.rank() * 4..].iter_mut().zip(row) {
        *t = v as f64;
    }
    comm.all_reduce_sum_f64(&mut table)?;
    Ok(table
        .chunks(4)
        .map(|r| EpochPosition {
            batches: r[0] as usize,
            position: r[1] as usize,
            skipped: r[2] as usize,
            good_since_wrap: r[3] as usize,
        })
        .collect())
}

/// The ranks' BN running statistics replaced by their mean, before each evaluation and
/// checkpoint (as timm's `distribute_bn`): each rank's statistics saw only its shard, and the
/// checkpoint and the evaluation should describe the whole data. Averaging the running variances
/// (rather than recomputing the variance of the union) is what timm and Horovod do.
fn average_bn_statistics(backend: &mut dyn Backend, comm: &dyn Comm) -> Result<()> {
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
fn mean_losses(comm: &dyn Comm, outcomes: &mut [StepOutcome]) -> Result<()> {
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

fn is_auto(cfg: &TrainConfig) -> bool {
    cfg.resume.as_deref() == Some(Path::new(RESUME_AUTO))
}

/// The checkpoint `--resume` names, loaded; for `auto`, the newest one in `--out` that loads
/// (a truncated or corrupt one is skipped with a warning), or None when there is none.
fn resume_checkpoint(cfg: &TrainConfig, plan: &Plan) -> Result<Option<(PathBuf, Checkpoint)>> {
    let Some(path) = &cfg.resume else {
        return Ok(None);
    };
    if !is_auto(cfg) {
        return Ok(Some((path.clone(), Checkpoint::load(path)?)));
    }
    let found = if cfg.out.is_dir() {
        checkpoint::list(&cfg.out, CHECKPOINT_PREFIX)?
    } else {
        Vec::new()
    };
    for (_, _, path) in found.into_iter().rev() {
        match Checkpoint::load(&path) {
            Ok(ckpt) => {
                ckpt.check_compatible(plan)
                    .with_context(|| format!("cannot resume from {}", path.display()))?;
                return Ok(Some((path, ckpt)));
            }
            Err(e) => eprintln!("warning: --resume auto skips {}: {e:#}", path.display()),
        }
    }
    eprintln!(
        "--resume auto: no usable checkpoint in {}, starting a new run",
        cfg.out.display()
    );
    Ok(None)
}

/// Fresh weights, or everything a checkpoint holds when resuming.
fn initial_state(
    cfg: &TrainConfig,
    plan: &Plan,
    scaler: LossScaler,
    resume: Option<(PathBuf, Checkpoint)>,
    steps_per_epoch: usize,
    world: usize,
) -> Result<(ModelState, RmsProp, RunState, Vec<EpochPosition>)> {
    let mut model = ModelState::init(plan, cfg.seed);
    let mut optim = RmsProp::new(cfg.rmsprop, &ParamLayout::new(plan));
    let Some((path, ckpt)) = resume else {
        return Ok((model, optim, RunState::fresh(scaler), Vec::new()));
    };
    ckpt.check_compatible(plan)
        .with_context(|| format!("cannot resume from {}", path.display()))?;
    if !ckpt.has_optimizer() {
        bail!("{} holds no optimizer state, so training cannot resume from it bit-exactly; start a new run from it with fine-tuning instead", path.display());
    }
    ckpt.apply_to(&mut model, Some(&mut optim))?;
    let m = &ckpt.meta;
    if m.epoch as usize >= cfg.epochs {
        bail!(
            "{} is already at epoch {}: ask for more --epochs to continue",
            path.display(),
            m.epoch
        );
    }
    let (positions, tally) = mid_epoch_state(&ckpt, &path, world)?;
    let position = positions.first().copied().unwrap_or_default();
    if position.batches > 0 {
        let expected = m.epoch * steps_per_epoch as u64 + position.batches as u64;
        if position.batches >= steps_per_epoch || m.step != expected {
            bail!(
                "{} was saved after {} batches of epoch {} (step {}), which does not fit {} steps per epoch: resume mid-epoch with the same data and batch size",
                path.display(),
                position.batches,
                m.epoch + 1,
                m.step,
                steps_per_epoch
            );
        }
        if m.rng.seed != cfg.seed {
            bail!(
                "{} was saved mid-epoch by a run with --seed {}; resuming it needs the same seed (not {}) to continue the same shuffle",
                path.display(),
                m.rng.seed,
                cfg.seed
            );
        }
        say!(
            "resuming from {} in epoch {} after batch {} (step {})",
            path.display(),
            m.epoch + 1,
            position.batches,
            m.step
        );
    } else {
        say!(
            "resuming from {} at epoch {} step {}",
            path.display(),
            m.epoch,
            m.step
        );
    }
    Ok((
        model,
        optim,
        RunState {
            step: m.step,
            epoch: m.epoch as usize,
            scaler: m.loss_scaler,
            position,
            tally,
        },
        positions,
    ))
}

/// The epoch positions (by rank; empty at an epoch boundary) and loss tally a mid-epoch
/// checkpoint records for a run of `world` ranks.
fn mid_epoch_state(
    ckpt: &Checkpoint,
    path: &Path,
    world: usize,
) -> Result<(Vec<EpochPosition>, Tally)> {
    let extra = &ckpt.meta.rng.extra;
    let parse = |key: &str| -> Result<Option<serde_json::Value>> {
        extra
            .get(key)
            .map(|v| serde_json::from_str(v))
            .transpose()
            .with_context(|| format!("{}: the entry rng.{key} is invalid", path.display()))
    };
    let positions: Vec<EpochPosition> =
        match (parse(EXTRA_EPOCH_POSITIONS)?, parse(EXTRA_EPOCH_POSITION)?) {
            (Some(all), _) => serde_json::from_value(all)?,
            (None, Some(one)) => vec![serde_json::from_value(one)?],
            (None, None) => Vec::new(),
        };
    if !positions.is_empty() && positions.len() != world {
        bail!(
            "{} was saved mid-epoch by a run of {} process(es); resuming it mid-epoch needs the same number (not {world}), or resume from an epoch-end checkpoint",
            path.display(),
            positions.len()
        );
    }
    let tally = match parse(EXTRA_EPOCH_TALLY)? {
        Some(v) => serde_json::from_value::<TallyState>(v)?.into(),
        None => Tally::default(),
    };
    Ok((positions, tally))
}

/// A [`Tally`] as a checkpoint stores it (JSON has no NaN).
#[derive(Serialize, Deserialize)]
struct TallyState {
    sum: f64,
    count: usize,
    last_loss: Option<f32>,
}

impl From<&Tally> for TallyState {
    fn from(t: &Tally) -> Self {
        TallyState {
            sum: t.sum,
            count: t.count,
            last_loss: t.last_loss.is_finite().then_some(t.last_loss),
        }
    }
}

impl From<TallyState> for Tally {
    fn from(t: TallyState) -> Self {
        Tally {
            sum: t.sum,
            count: t.count,
            last_loss: t.last_loss.unwrap_or(f32::NAN),
            ..Tally::default()
        }
    }
}

/// The losses of an epoch's settled steps, with the checks each outcome gets.
#[derive(Clone)]
struct Tally {
    sum: f64,
    count: usize,
    last_loss: f32,
    /// Losses since the last metrics line (not kept in a checkpoint: the next line after a
    /// resume covers the steps since the resume).
    interval_sum: f64,
    interval_count: usize,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            sum: 0.0,
            count: 0,
            last_loss: f32::NAN,
            interval_sum: 0.0,
            interval_count: 0,
        }
    }
}

impl Tally {
    /// Logs a scale change, stops on a non-finite loss that was not skipped, and counts the loss
    /// of every applied step.
    fn record(
        &mut self,
        out: StepOutcome,
        log: &mut RunLog,
        epoch: usize,
        last_ckpt: Option<&Path>,
    ) -> Result<()> {
        let step = out.step + 1;
        if let Some((old, new)) = out.scale_changed {
            say!("step {step}: loss scale {old} -> {new}");
            log.metrics(json!({"event": "loss_scale", "step": step, "from": old, "to": new}))?;
        }
        if !out.loss.is_finite() && !out.skipped {
            let kept = last_ckpt
                .map(|p| format!("; the last good checkpoint is {}", p.display()))
                .unwrap_or_default();
            bail!(
                "the loss became {} at step {step} (epoch {epoch}): stopping{kept}",
                out.loss
            );
        }
        if !out.skipped {
            self.sum += out.loss as f64;
            self.count += 1;
            self.last_loss = out.loss;
            self.interval_sum += out.loss as f64;
            self.interval_count += 1;
        }
        Ok(())
    }

    /// The mean loss of the steps settled since the last call (None if there were none).
    fn take_interval(&mut self) -> Option<f64> {
        let mean =
            (self.interval_count > 0).then(|| self.interval_sum / self.interval_count as f64);
        self.interval_sum = 0.0;
        self.interval_count = 0;
        mean
    }
}

/// Where an epoch's interval records go: every `log_every`-th step counted from the epoch's first
/// step.
struct Intervals<'a> {
    log_every: usize,
    schedule: &'a Schedule,
    epoch: usize,
    first_step: u64,
}

impl Intervals<'_> {
    /// Takes in settled outcomes: the tally's checks, then, for every `log_every`-th step, its
    /// "step" record with its own step number, loss and learning rate and the mean loss of the
    /// interval's settled steps. The record is written when the outcome settles: on CUDA a step's
    /// outcome arrives during the next step, so the loop's current values would be one step off
    /// (and the first step's loss missing).
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        outcomes: Vec<StepOutcome>,
        tally: &mut Tally,
        log: &mut RunLog,
        scale: f32,
        last_ckpt: Option<&Path>,
        ips: f64,
    ) -> Result<()> {
        for out in outcomes {
            tally.record(out, log, self.epoch, last_ckpt)?;
            if !(out.step - self.first_step + 1).is_multiple_of(self.log_every as u64) {
                continue;
            }
            let mean = tally.take_interval();
            log.metrics(json!({"event": "step", "epoch": self.epoch, "step": out.step + 1, "loss": out.loss, "skipped": out.skipped, "mean_loss": mean, "lr": self.schedule.lr(out.step), "loss_scale": scale, "images_per_sec": ips}))?;
        }
        Ok(())
    }
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
            backend.train_step(&batch.images, &batch.labels, run.step, lr, &mut run.scaler)?;
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
