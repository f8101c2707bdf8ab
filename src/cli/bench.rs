//! `inception-engine bench`: time full training steps (`bench train`) or kernels (`bench kernels`).

use crate::backend::{cpu_trainer::CpuTrainer, resolve_device, Backend, Device};
pub use crate::bench::KernelArgs;
use crate::params::ModelState;
use crate::plan::{self, PlanConfig};
use crate::train::{LossScaler, RmsProp, RmsPropConfig};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// Full training steps (forward, backward, optimizer) on synthetic data, after a warm-up.
    Train(TrainArgs),
    /// Kernel microbenchmarks against cuDNN/cuBLAS and the copy bandwidth (needs an NVIDIA GPU).
    Kernels(KernelArgs),
    /// The data loader alone: decoded, augmented images per second.
    Loader(LoaderArgs),
}

#[derive(clap::Args, Debug)]
pub struct LoaderArgs {
    /// An ImageFolder or packed file.
    #[arg(long)]
    pub data: std::path::PathBuf,
    #[arg(long, default_value_t = 299)]
    pub image_size: usize,
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Loader threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Batches to time (after one untimed batch).
    #[arg(long, default_value_t = 50)]
    pub batches: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[arg(long, default_value = "v4")]
    pub plan: String,
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    #[arg(long, default_value_t = 299)]
    pub image_size: usize,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 1000)]
    pub num_classes: usize,
    /// Mixed precision level (O0 on the CPU).
    #[arg(long, default_value = "O0")]
    pub amp: String,
    /// Print the time per op kind (CPU).
    #[arg(long)]
    pub profile: bool,
    /// Print a JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Train(a) => bench_train(a),
        What::Loader(a) => bench_loader(a),
        What::Kernels(a) => crate::bench::run_kernels(&a),
    }
}

fn bench_train(a: TrainArgs) -> Result<()> {
    if a.amp != "O0" {
        bail!(
            "--amp {} needs the CUDA backend; the CPU runs fp32 (O0)",
            a.amp
        );
    }
    let device = resolve_device(a.device)?;
    let cfg = PlanConfig {
        batch: a.batch_size,
        image_size: a.image_size,
        num_classes: a.num_classes,
        ..Default::default()
    };
    let plan = plan::build(&a.plan, cfg)?;
    let model = ModelState::init(&plan, 1);
    let optim = RmsProp::new(RmsPropConfig::default(), &model.layout);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let images: Vec<f32> = (0..plan.tensor(plan.input).numel())
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let labels: Vec<u32> = (0..a.batch_size)
        .map(|_| rng.random_range(0..a.num_classes as u32))
        .collect();
    let mut trainer = CpuTrainer::new(plan, model, optim)?;
    let backend: &mut dyn Backend = &mut trainer;
    eprintln!(
        "bench train: {} on {} ({device:?}), batch {}, {}x{}, {} warm-up + {} timed steps",
        a.plan,
        backend.name(),
        a.batch_size,
        a.image_size,
        a.image_size,
        a.warmup,
        a.steps
    );
    let mut scaler = LossScaler::None;
    for s in 0..a.warmup {
        backend.train_step(&images, &labels, s as u64, 1e-4, &mut scaler)?;
    }
    if a.profile {
        trainer.executor_mut().enable_profile();
    }
    let backend: &mut dyn Backend = &mut trainer;
    let mut times = Vec::with_capacity(a.steps);
    for s in 0..a.steps {
        let t = Instant::now();
        let out = backend.train_step(&images, &labels, (a.warmup + s) as u64, 1e-4, &mut scaler)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        eprintln!("  step {}: {:.1} ms, loss {:.4}", s + 1, times[s], out.loss);
    }
    let step_ms = times.iter().sum::<f64>() / times.len().max(1) as f64;
    if let Some(p) = trainer.executor_mut().profile() {
        print_profile(p, a.steps, step_ms);
    }
    let best_ms = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let ips = a.batch_size as f64 / (step_ms / 1000.0);
    println!("{:.1} images/s, {step_ms:.1} ms per step (best {best_ms:.1} ms), peak resident memory {:.0} MiB", ips, peak_rss_bytes() as f64 / 1048576.0);
    if a.json {
        let out = json!({"plan": a.plan, "device": "cpu", "threads": rayon::current_num_threads(), "image_size": a.image_size, "batch_size": a.batch_size, "steps": a.steps, "step_ms": step_ms, "best_step_ms": best_ms, "images_per_sec": ips, "peak_rss_bytes": peak_rss_bytes()});
        println!("{out}");
    }
    Ok(())
}

/// Milliseconds per step by op kind and direction, largest first.
fn print_profile(
    p: &std::collections::HashMap<(&'static str, &'static str), f64>,
    steps: usize,
    step_ms: f64,
) {
    let mut rows: Vec<_> = p
        .iter()
        .map(|(&(op, dir), &s)| (s * 1000.0 / steps.max(1) as f64, op, dir))
        .collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let ops: f64 = rows.iter().map(|r| r.0).sum();
    for (ms, op, dir) in rows {
        eprintln!("  {op:>15} {dir:<8} {ms:>8.1} ms/step");
    }
    eprintln!(
        "  {:>15} {:<8} {:>8.1} ms/step",
        "optimizer+rest",
        "",
        step_ms - ops
    );
}

/// Training-mode batches (random crops, flips, jitter) as fast as the loader threads make them.
fn bench_loader(a: LoaderArgs) -> Result<()> {
    let set = std::sync::Arc::new(crate::data::Dataset::open(&a.data)?);
    let cfg = crate::data::LoaderConfig {
        workers: a.workers,
        ..crate::data::LoaderConfig::train(a.batch_size, a.image_size, 1)
    };
    let loader = crate::data::Loader::new(set, cfg)?;
    let threads = if a.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.workers
    };
    let mut epoch = loader.epoch(0);
    epoch
        .next()
        .ok_or_else(|| anyhow::anyhow!("the dataset has fewer images than one batch"))?;
    let start = Instant::now();
    let mut images = 0;
    for batch in epoch.take(a.batches) {
        images += batch.len;
    }
    let secs = start.elapsed().as_secs_f64();
    let ips = images as f64 / secs;
    println!("loader: {ips:.0} images/s at {0}x{0} with {threads} threads ({images} images in {secs:.2} s)", a.image_size);
    if a.json {
        println!(
            "{}",
            json!({"images_per_sec": ips, "images": images, "seconds": secs, "threads": threads, "image_size": a.image_size, "batch_size": a.batch_size})
        );
    }
    Ok(())
}

/// Peak resident memory of this process (Linux), or 0 where unknown.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
