//! The training loop: epochs of steps over the loader, the schedule, loss scaling, logs,
//! evaluation and checkpoints. It drives any [`Backend`].

use super::eval::{evaluate, EvalResult};
use super::log::{Progress, RunLog};
use super::{LossScaler, RmsProp, RmsPropConfig, Schedule};
use crate::backend::{self, resolve_device, Amp, Backend, Device, StepOutcome};
use crate::checkpoint::{self, Checkpoint, CheckpointMeta, RngState};
use crate::data::{AugmentConfig, Dataset, Loader, LoaderConfig, Normalization};
use crate::export::engine_preprocessing;
use crate::params::{ModelState, ParamLayout};
use crate::plan::{self, Plan, PlanConfig};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

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
    pub keep_max: usize,
    pub eval_every_epochs: usize,
    pub log_every: usize,
    pub resume: Option<PathBuf>,
}

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
    epoch: usize,
    scaler: LossScaler,
}

pub fn train(cfg: &TrainConfig) -> Result<TrainSummary> {
    let device = resolve_device(cfg.device)?;
    let train_set = Arc::new(Dataset::open(&cfg.data)?);
    let classes = train_set.classes().to_vec();
    let eval_set = cfg
        .eval_data
        .as_deref()
        .map(|p| open_eval_set(p, &classes).map(Arc::new))
        .transpose()?;
    let plan = plan::build(&cfg.plan, plan_config(cfg, classes.len()))?;
    let loader = Loader::new(train_set, loader_config(cfg))?;
    let steps_per_epoch = loader.batches_per_epoch();
    let schedule = Schedule {
        lr_init: cfg.lr_init,
        lr_max: cfg.lr_max,
        lr_end: cfg.lr_end,
        warmup_epochs: cfg.warmup_epochs,
        steps_per_epoch,
        epochs: cfg.epochs,
    };
    let amp = cfg.amp.unwrap_or(Amp::default_for(device));
    let scaler = cfg.loss_scaler.unwrap_or(LossScaler::for_amp(amp));
    let (model, optim, mut run) = initial_state(cfg, &plan, scaler)?;
    let meta = CheckpointMeta::new(
        &plan,
        classes.clone(),
        engine_preprocessing(cfg.image_size, Normalization::IMAGENET),
    );
    let mut backend = backend::build(device, cfg.amp, plan.clone(), model, optim)?;
    let mut log = RunLog::open(&cfg.out)?;
    eprintln!(
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
    let mut summary = TrainSummary {
        epoch_losses: Vec::new(),
        last_checkpoint: None,
        eval: None,
        steps: run.step,
    };
    while run.epoch < cfg.epochs {
        let epoch = run.epoch + 1;
        let mean_loss = run_epoch(
            cfg,
            backend.as_mut(),
            &loader,
            &schedule,
            &mut run,
            &mut log,
            epoch,
            summary.last_checkpoint.as_deref(),
        )?;
        run.epoch = epoch;
        summary.epoch_losses.push(mean_loss);
        let last = epoch == cfg.epochs;
        if let Some(set) = &eval_set {
            if last || (cfg.eval_every_epochs > 0 && epoch % cfg.eval_every_epochs == 0) {
                summary.eval = Some(run_eval(
                    backend.as_mut(),
                    set,
                    cfg,
                    &plan,
                    epoch,
                    &mut log,
                )?);
            }
        }
        if last || (cfg.save_every_epochs > 0 && epoch % cfg.save_every_epochs == 0) {
            summary.last_checkpoint = Some(save_checkpoint(backend.as_mut(), cfg, &meta, &run)?);
        }
    }
    summary.steps = run.step;
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

fn loader_config(cfg: &TrainConfig) -> LoaderConfig {
    LoaderConfig {
        workers: cfg.workers,
        augment: cfg.augment.clone(),
        ..LoaderConfig::train(cfg.batch_size, cfg.image_size, cfg.seed)
    }
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

/// Fresh weights, or everything a checkpoint holds when resuming.
fn initial_state(
    cfg: &TrainConfig,
    plan: &Plan,
    scaler: LossScaler,
) -> Result<(ModelState, RmsProp, RunState)> {
    let mut model = ModelState::init(plan, cfg.seed);
    let mut optim = RmsProp::new(cfg.rmsprop, &ParamLayout::new(plan));
    let Some(path) = &cfg.resume else {
        return Ok((
            model,
            optim,
            RunState {
                step: 0,
                epoch: 0,
                scaler,
            },
        ));
    };
    let ckpt = Checkpoint::load(path)?;
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
    eprintln!(
        "resuming from {} at epoch {} step {}",
        path.display(),
        m.epoch,
        m.step
    );
    Ok((
        model,
        optim,
        RunState {
            step: m.step,
            epoch: m.epoch as usize,
            scaler: m.loss_scaler,
        },
    ))
}

/// The losses of an epoch's settled steps, with the checks each outcome gets.
struct Tally {
    sum: f64,
    count: usize,
    last_loss: f32,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            sum: 0.0,
            count: 0,
            last_loss: f32::NAN,
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
            eprintln!("step {step}: loss scale {old} -> {new}");
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
        }
        Ok(())
    }
}

/// The "step" record of every `log_every`-th step of an epoch, written when that step's outcome
/// settles, with its own step number, loss and learning rate: on CUDA a step's outcome arrives
/// during the next step, so the loop's current values would be one step off (and the first step's
/// loss missing).
#[allow(clippy::too_many_arguments)]
fn log_interval(
    cfg: &TrainConfig,
    log: &mut RunLog,
    schedule: &Schedule,
    run: &RunState,
    epoch: usize,
    first_step: u64,
    out: &StepOutcome,
    ips: f64,
) -> Result<()> {
    if !(out.step - first_step + 1).is_multiple_of(cfg.log_every as u64) {
        return Ok(());
    }
    log.metrics(json!({"event": "step", "epoch": epoch, "step": out.step + 1, "loss": out.loss, "skipped": out.skipped, "lr": schedule.lr(out.step), "loss_scale": run.scaler.scale(), "images_per_sec": ips}))
}

#[allow(clippy::too_many_arguments)]
fn run_epoch(
    cfg: &TrainConfig,
    backend: &mut dyn Backend,
    loader: &Loader,
    schedule: &Schedule,
    run: &mut RunState,
    log: &mut RunLog,
    epoch: usize,
    last_ckpt: Option<&Path>,
) -> Result<f64> {
    let steps = loader.batches_per_epoch();
    let progress = Progress::new(
        steps as u64,
        format!("epoch {epoch}/{}", cfg.epochs),
        cfg.log_every as u64,
    );
    let start = Instant::now();
    let mut tally = Tally::default();
    let mut batches = loader.epoch(epoch - 1);
    let first_step = run.step;
    for (i, batch) in (&mut batches).enumerate() {
        let lr = schedule.lr(run.step);
        let outcomes =
            backend.train_step(&batch.images, &batch.labels, run.step, lr, &mut run.scaler)?;
        run.step += 1;
        let ips = ((i + 1) * cfg.batch_size) as f64 / start.elapsed().as_secs_f64();
        for out in outcomes {
            log_interval(cfg, log, schedule, run, epoch, first_step, &out, ips)?;
            tally.record(out, log, epoch, last_ckpt)?;
        }
        // Before the first outcome settles (dynamic scaling on CUDA) there is no loss to show.
        let loss = match tally.count {
            0 => "-".to_string(),
            _ => format!("{:.4}", tally.last_loss),
        };
        progress.update(
            i as u64 + 1,
            format!("loss {loss} lr {lr:.3e} {ips:.1} img/s"),
        );
    }
    // The last step's outcome may still be on the device (dynamic scaling on CUDA); the scaler
    // must be settled before the checkpoint saves it.
    let ips = (steps * cfg.batch_size) as f64 / start.elapsed().as_secs_f64();
    for out in backend.settle(&mut run.scaler)? {
        log_interval(cfg, log, schedule, run, epoch, first_step, &out, ips)?;
        tally.record(out, log, epoch, last_ckpt)?;
    }
    progress.finish();
    let elapsed = start.elapsed().as_secs_f64() * 1000.0;
    let (sum, count, last_loss) = (tally.sum, tally.count, tally.last_loss);
    let mean = sum / count.max(1) as f64;
    log.line(&format!(
        "epoch: {epoch} step: {}, loss is {last_loss:.4}",
        steps
    ))?;
    log.line(&format!(
        "Epoch time: {elapsed:.3} ms, per step time: {:.3} ms",
        elapsed / steps.max(1) as f64
    ))?;
    let ips = (steps * cfg.batch_size) as f64 / (elapsed / 1000.0);
    log.metrics(json!({"event": "epoch", "epoch": epoch, "step": run.step, "mean_loss": mean, "last_loss": last_loss, "epoch_ms": elapsed, "images_per_sec": ips, "skipped_files": batches.skipped()}))?;
    eprintln!("epoch {epoch}: mean loss {mean:.4}, last {last_loss:.4}, {:.1} s, {ips:.1} img/s, {} unreadable files skipped", elapsed / 1000.0, batches.skipped());
    Ok(mean)
}

fn run_eval(
    backend: &mut dyn Backend,
    set: &Arc<Dataset>,
    cfg: &TrainConfig,
    plan: &Plan,
    epoch: usize,
    log: &mut RunLog,
) -> Result<EvalResult> {
    let loader = Loader::new(
        set.clone(),
        LoaderConfig {
            workers: cfg.workers,
            ..LoaderConfig::eval(cfg.batch_size, cfg.image_size)
        },
    )?;
    let r = evaluate(backend, &loader, plan.config.num_classes, |_| {})?;
    eprintln!(
        "epoch {epoch} eval on {} images: {}",
        r.images,
        r.seed_line()
    );
    log.line(&r.seed_line())?;
    log.metrics(json!({"event": "eval", "epoch": epoch, "loss": r.loss, "top1": r.top1, "top5": r.top5, "images": r.images}))?;
    Ok(r)
}

fn save_checkpoint(
    backend: &mut dyn Backend,
    cfg: &TrainConfig,
    meta: &CheckpointMeta,
    run: &RunState,
) -> Result<PathBuf> {
    let (model, optim) = backend.state()?;
    let mut meta = meta.clone();
    meta.step = run.step;
    meta.epoch = run.epoch as u64;
    meta.loss_scaler = run.scaler;
    meta.rng = RngState {
        seed: cfg.seed,
        epoch: run.epoch as u64,
        step: run.step,
        ..Default::default()
    };
    meta.extra
        .insert("train_config".into(), serde_json::to_string(cfg)?);
    let path = cfg.out.join(checkpoint::file_name(
        CHECKPOINT_PREFIX,
        run.epoch as u64,
        run.step,
    ));
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
