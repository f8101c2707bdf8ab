//! `inception-engine train`: train a plan on an image folder or packed file.
//!
//! With no `--data` it trains on the bundled Fashion-MNIST sample with a demo preset and ends with
//! an evaluation. Flags can also come from a TOML file (`--config FILE`); flags on the command line
//! win over the file.

use crate::backend::{Amp, Device};
use crate::data::{bundled_dataset, AugmentConfig};
use crate::optim::{LossScaler, RmsPropConfig};
use crate::train::lr_max_for_batch;
use crate::train::trainer::{train_with, TrainConfig};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Plan to train.
    #[arg(long, default_value = crate::plan::models::DEFAULT, value_parser = crate::plan::models::plan_values())]
    pub plan: String,
    /// Training images: an ImageFolder (root/class/image) or a packed file. Without it, the bundled
    /// Fashion-MNIST sample with the demo preset.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Evaluation images (same classes), evaluated every --eval-every-epochs and at the end.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Output folder for checkpoints, log.txt and metrics.jsonl.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Batch size per device (per rank under mpirun: the global batch is this x ranks).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Square input size; v4 needs at least 75.
    #[arg(long)]
    pub image_size: Option<usize>,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: Device,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Loader threads (0: one per core, divided among the ranks on a node).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Peak learning rate; default 0.4 * global batch / 1024 (global batch: --batch-size x ranks).
    #[arg(long)]
    pub lr_max: Option<f32>,
    #[arg(long, default_value_t = 4e-5)]
    pub lr_init: f32,
    #[arg(long, default_value_t = 4e-6)]
    pub lr_end: f32,
    #[arg(long, default_value_t = 1)]
    pub warmup_epochs: usize,
    #[arg(long, default_value_t = 4e-5)]
    pub weight_decay: f32,
    /// Apply weight decay to BN parameters and biases too (as MindSpore effectively does).
    #[arg(long)]
    pub decay_all: bool,
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f32,
    #[arg(long, default_value_t = 0.2)]
    pub dropout: f32,
    /// Loss scale: "none", "dynamic", a fixed number, or "auto" (none in fp32 / O0, dynamic in
    /// O2 and O3).
    #[arg(long, default_value = "auto")]
    pub loss_scale: String,
    /// Mixed precision level: O0 (fp32, the only level on the CPU), O2 (fp16 activations and
    /// convolutions, fp32 BN and master weights; the CUDA default) or O3. Default: per device.
    #[arg(long, value_enum)]
    pub amp: Option<Amp>,
    /// Smallest crop area of the random resized crop (fraction of the image).
    #[arg(long)]
    pub crop_min: Option<f32>,
    /// Colour jitter strength (brightness, contrast, saturation); 0 disables it.
    #[arg(long, default_value_t = 0.4)]
    pub jitter: f32,
    /// Save a checkpoint every this many epochs (and after the last).
    #[arg(long, default_value_t = 1)]
    pub save_every_epochs: usize,
    /// Also save every this many global steps, mid-epoch included (0: never). A run resumed
    /// from a mid-epoch checkpoint continues at the same batch of the same epoch's shuffle.
    #[arg(long, default_value_t = 0)]
    pub save_every_steps: usize,
    /// Keep at most this many checkpoints in --out (0 keeps all).
    #[arg(long, default_value_t = 10)]
    pub keep_max: usize,
    #[arg(long, default_value_t = 1)]
    pub eval_every_epochs: usize,
    /// Write a metrics line every this many steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Continue a run from a checkpoint written by train (weights, optimizer, step, scaler,
    /// position in the epoch). `auto`: the newest valid checkpoint in --out (a truncated or
    /// corrupt one is skipped with a warning), or a fresh start when there is none, so a
    /// preempted job restarts with the same command line.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// TOML file of flags (keys are the long flag names, with - or _).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Distributed runs (mpirun): seconds a rank may wait in one collective (a gradient
    /// all-reduce, a broadcast) before it decides another rank died or hung and aborts the job.
    #[arg(long, default_value_t = crate::dist::DEFAULT_TIMEOUT.as_secs_f64())]
    pub collective_timeout: f64,
    /// Distributed CUDA runs: how gradients are summed over the ranks. auto: NCCL when the
    /// library is found (libnccl.so, or the pip wheel's libnccl.so.2), else through host memory
    /// over MPI; nccl: NCCL or an error; host: through host memory.
    #[arg(long, value_enum, default_value_t = crate::dist::GradSyncMode::Auto)]
    pub grad_sync: crate::dist::GradSyncMode,
    /// Distributed CUDA runs on NCCL: MiB of fp32 gradients per all-reduce bucket (buckets are
    /// reduced while the backward pass goes on).
    #[arg(long, default_value_t = crate::backend::cuda::buckets::DEFAULT_BUCKET_MIB as f64)]
    pub bucket_mib: f64,
}

pub fn run(args: Args) -> Result<()> {
    // Kept here until the end: dropping the last handle finalises MPI, which must not happen on
    // a failed rank before it has aborted the job.
    let comm = crate::dist::init(collective_timeout(args.collective_timeout)?)?;
    let world = comm.world();
    let summary =
        config_for(&args, world).and_then(|cfg| Ok((train_with(&cfg, comm.clone())?, cfg)));
    let (summary, cfg) = match summary {
        Ok(done) => done,
        Err(e) if world > 1 => stop_job(e),
        Err(e) => return Err(e),
    };
    if !crate::dist::is_primary() {
        return Ok(());
    }
    if let (Some(first), Some(last)) = (summary.epoch_losses.first(), summary.epoch_losses.last()) {
        eprintln!(
            "mean training loss: epoch 1 {first:.4} -> epoch {} {last:.4}",
            summary.epoch_losses.len()
        );
    }
    if let Some(r) = summary.eval {
        println!("{}", r.seed_line());
    }
    if let Some(p) = summary.last_checkpoint {
        println!("checkpoint: {}", p.display());
    }
    let curves = cfg.out.join(crate::report::CURVES_PNG);
    if curves.is_file() {
        println!(
            "curves: {} (and {}, {})",
            curves.display(),
            crate::report::CURVES_SVG,
            crate::report::SUMMARY_FILE
        );
    }
    Ok(())
}

/// Turn flags (and the demo preset when no data is given) into a run configuration.
/// `--collective-timeout` as a duration.
pub fn collective_timeout(secs: f64) -> Result<std::time::Duration> {
    if !(secs > 0.0 && secs.is_finite()) {
        bail!("--collective-timeout must be a positive number of seconds, not {secs}");
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// An error on one rank of a distributed run: the others are (or soon will be) waiting for it
/// in a collective, so the whole job is aborted with the rank and step in the message.
pub fn stop_job(e: anyhow::Error) -> ! {
    eprintln!(
        "error: {}: {e:#}; aborting the job",
        crate::dist::whereabouts()
    );
    crate::dist::abort_job(1)
}

pub fn config_from(a: &Args) -> Result<TrainConfig> {
    config_for(a, 1)
}

/// The run's configuration for a job of `world` ranks: `--batch-size` is per rank, and the
/// default `--lr-max` follows the global batch (0.4 x batch x world / 1024).
pub fn config_for(a: &Args, world: usize) -> Result<TrainConfig> {
    let demo = a.data.is_none();
    let (data, eval_data) = match &a.data {
        Some(d) => (d.clone(), a.eval_data.clone()),
        None => {
            let root = bundled_dataset().context(
                "no --data given and the bundled demo data (data/fashion-mnist-mini) was not found",
            )?;
            (
                root.join("train"),
                Some(a.eval_data.clone().unwrap_or(root.join("val"))),
            )
        }
    };
    let batch = a.batch_size.unwrap_or(if demo { 16 } else { 128 });
    // The demo preset follows facts.md section 7: milder crops and a quarter of the scaled rate
    // make the loss fall visibly within a few hundred images.
    let lr_max = a
        .lr_max
        .unwrap_or(lr_max_for_batch(batch * world.max(1)) / if demo { 4.0 } else { 1.0 });
    let crop_min = a.crop_min.unwrap_or(if demo { 0.5 } else { 0.08 });
    let cfg = TrainConfig {
        plan: a.plan.clone(),
        data,
        eval_data,
        out: a
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(if demo { "runs/demo" } else { "runs/train" })),
        epochs: a.epochs.unwrap_or(if demo { 8 } else { 250 }),
        batch_size: batch,
        image_size: a.image_size.unwrap_or(if demo { 75 } else { 299 }),
        device: a.device,
        amp: a.amp,
        seed: a.seed,
        workers: a.workers,
        lr_init: a.lr_init.min(lr_max),
        lr_max,
        lr_end: a.lr_end.min(lr_max),
        warmup_epochs: a.warmup_epochs,
        rmsprop: RmsPropConfig {
            weight_decay: a.weight_decay,
            decay_all: a.decay_all,
            ..Default::default()
        },
        label_smoothing: a.label_smoothing,
        dropout: a.dropout,
        loss_scaler: parse_loss_scale(&a.loss_scale)?,
        augment: AugmentConfig {
            scale: (crop_min, 1.0),
            jitter: a.jitter,
            ..Default::default()
        },
        save_every_epochs: a.save_every_epochs,
        save_every_steps: a.save_every_steps,
        keep_max: a.keep_max,
        eval_every_epochs: a.eval_every_epochs,
        log_every: a.log_every.max(1),
        resume: a.resume.clone(),
        grad_sync: a.grad_sync,
        bucket_mib: a.bucket_mib,
    };
    cfg.augment.validate()?;
    if demo && crate::dist::is_primary() {
        eprintln!(
            "No --data given: training on the bundled Fashion-MNIST sample ({}) with the demo preset: {} epochs, batch {}, {}x{}, lr_max {:.2e}, crop area {}-1.",
            cfg.data.display(),
            cfg.epochs,
            cfg.batch_size,
            cfg.image_size,
            cfg.image_size,
            cfg.lr_max,
            crop_min
        );
    }
    Ok(cfg)
}

/// `--loss-scale`: None for "auto" (decided by the precision level once the device is known).
pub fn parse_loss_scale(s: &str) -> Result<Option<LossScaler>> {
    match s {
        "auto" => Ok(None),
        "none" => Ok(Some(LossScaler::None)),
        "dynamic" => Ok(Some(LossScaler::dynamic())),
        v => match v.parse::<f32>() {
            Ok(x) if x >= 1.0 && x.is_finite() => Ok(Some(LossScaler::Fixed(x))),
            _ => bail!("--loss-scale must be auto, none, dynamic or a number >= 1, not '{v}'"),
        },
    }
}

/// Expand `--config FILE` of a `train` command line into flags; a flag also given on the command
/// line keeps the command line's value.
pub fn expand_config(argv: Vec<String>) -> Result<Vec<String>> {
    let Some(pos) = argv.iter().position(|a| a == "--config") else {
        return Ok(argv);
    };
    if argv.get(1).map(String::as_str) != Some("train") {
        return Ok(argv);
    }
    let path = argv.get(pos + 1).context("--config needs a file")?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {path}"))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{path} is not valid TOML"))?;
    let given: Vec<&str> = argv
        .iter()
        .filter_map(|a| a.strip_prefix("--"))
        .map(|a| a.split('=').next().unwrap_or(a))
        .collect();
    let mut flags = Vec::new();
    for (key, value) in table {
        let name = key.replace('_', "-");
        if given.contains(&name.as_str()) {
            continue;
        }
        let flag = format!("--{name}");
        match value {
            toml::Value::Boolean(true) => flags.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::String(s) => flags.extend([flag, s]),
            toml::Value::Integer(i) => flags.extend([flag, i.to_string()]),
            toml::Value::Float(f) => flags.extend([flag, f.to_string()]),
            other => bail!(
                "{path}: the value of '{key}' must be a string, number or boolean, not {other}"
            ),
        }
    }
    let mut out = argv[..2].to_vec();
    out.extend(flags);
    out.extend(argv[2..pos].iter().cloned());
    out.extend(argv[pos + 2..].iter().cloned());
    Ok(out)
}
