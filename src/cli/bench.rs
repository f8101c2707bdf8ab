//! `inception-engine bench`: time full training steps (`bench train`) or kernels (`bench kernels`).

use crate::backend::cuda::cost::Rates;
use crate::backend::cuda::CudaTrainer;
use crate::backend::{cpu::CpuTrainer, resolve_device, Amp, Backend, Device, Images, InputFormat};
use crate::bench::overlap;
pub use crate::bench::KernelArgs;
use crate::data::Normalization;
use crate::gpu::KernelPaths;
use crate::optim::{LossScaler, RmsProp, RmsPropConfig};
use crate::params::ModelState;
use crate::plan::{self, PlanConfig};
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::time::Instant;

/// `println!` on rank 0 only: under mpirun every rank times its step and one reports (the
/// others print only errors, as in training).
macro_rules! say {
    ($($t:tt)*) => {
        if crate::dist::is_primary() {
            println!($($t)*);
        }
    };
}

/// `eprintln!` (progress) on rank 0 only.
macro_rules! say_err {
    ($($t:tt)*) => {
        if crate::dist::is_primary() {
            eprintln!($($t)*);
        }
    };
}

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
    /// All-reduce of InceptionV4's fp32 gradient buffer per bucket size, under mpirun (needs a
    /// build with `--features mpi` for more than one rank), over MPI on the host or NCCL.
    Allreduce(super::bench_allreduce::AllreduceArgs),
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
    /// Batches to time (after one untimed batch); epochs repeat when the data set has fewer.
    #[arg(long, default_value_t = 50)]
    pub batches: usize,
    /// JPEG decoder: auto (libjpeg-turbo when installed), zune or turbo.
    #[arg(long, value_enum, default_value = "auto")]
    pub jpeg: crate::data::JpegBackend,
    /// Decode every JPEG at full scale (no DCT scaling for large crops).
    #[arg(long)]
    pub no_scaled_decode: bool,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[arg(long, default_value = crate::plan::models::DEFAULT, value_parser = crate::plan::models::plan_values())]
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
    /// Mixed precision level; default O2 on CUDA, O0 (the only level) on the CPU.
    #[arg(long, value_enum)]
    pub amp: Option<Amp>,
    /// Loss scale: "auto" (none in O0, dynamic in O2/O3, as `train`), "none", "dynamic" or a
    /// number.
    #[arg(long, default_value = "auto")]
    pub loss_scale: String,
    /// Print the time per op kind (CPU).
    #[arg(long)]
    pub profile: bool,
    /// CUDA: kernel paths to time, each a spec as `INCEPTION_KERNELS` takes it (`lean`,
    /// `baseline`, `lean,-graph`); repeat to time several in one run. Default: `INCEPTION_KERNELS`,
    /// else lean.
    #[arg(long = "kernels")]
    pub kernels: Vec<String>,
    /// CUDA: the matrix rate (TFLOP/s) the step's limit is computed at; measured with cuBLAS on
    /// the card when not given.
    #[arg(long)]
    pub matrix_tflops: Option<f64>,
    /// CUDA: the copy bandwidth (read + write GB/s) the step's limit is computed at; measured on
    /// the card when not given.
    #[arg(long)]
    pub copy_gbps: Option<f64>,
    /// CUDA under mpirun: MiB per NCCL bucket of the data-parallel step whose hidden
    /// communication is measured.
    #[arg(long, default_value_t = crate::backend::cuda::buckets::DEFAULT_BUCKET_MIB as f64)]
    pub bucket_mib: f64,
    /// Print a JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Train(a) => bench_train(a),
        What::Loader(a) => bench_loader(a),
        What::Kernels(a) => crate::bench::run_kernels(&a),
        What::Allreduce(a) => super::bench_allreduce::run(a),
    }
}

fn bench_train(a: TrainArgs) -> Result<()> {
    let device = resolve_device(a.device)?;
    let amp = crate::backend::resolve_amp(device, a.amp)?;
    let scaler = super::train::parse_loss_scale(&a.loss_scale)?.unwrap_or(LossScaler::for_amp(amp));
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
    let pixels: Vec<u8> = (0..images.len()).map(|_| rng.random()).collect();
    let batch = Batch {
        images: &images,
        pixels: &pixels,
        labels: &labels,
    };
    match device {
        Device::Cuda => {
            let comm = crate::dist::init(crate::dist::DEFAULT_TIMEOUT)?;
            let runs = cuda_runs(
                &a,
                &plan,
                &model,
                &optim,
                amp,
                scaler,
                &batch,
                comm.as_ref(),
            )?;
            if a.json && comm.rank() == 0 {
                // The last run's object, with every run under "runs" when there are several.
                let mut last = runs.last().cloned().unwrap_or_default();
                if let (true, Some(o)) = (runs.len() > 1, last.as_object_mut()) {
                    o.insert("runs".into(), json!(runs));
                }
                println!("{last}");
            }
        }
        Device::Cpu | Device::Auto => {
            let mut trainer = CpuTrainer::new(plan, model, optim)?;
            let profile = a.profile;
            let times = time_steps(
                &a,
                &mut trainer,
                &batch,
                scaler,
                |t: &mut CpuTrainer| {
                    if profile {
                        t.executor_mut().enable_profile();
                    }
                },
                |_| Ok(()),
            )?;
            if let Some(p) = trainer.executor_mut().profile() {
                print_profile(p, a.steps, mean(&times));
            }
            let rss = peak_rss_bytes();
            let extra = json!({"device": "cpu", "threads": rayon::current_num_threads(), "peak_rss_bytes": rss});
            let memory = format!("peak resident memory {:.0} MiB", rss as f64 / 1048576.0);
            let mut out = report(&a, &times, &memory);
            if let (Some(o), serde_json::Value::Object(e)) = (out.as_object_mut(), extra) {
                o.extend(e);
            }
            if a.json {
                println!("{out}");
            }
        }
    }
    Ok(())
}

/// `bench train` on CUDA: one timed run per kernel-path spec, each with its step's limit at the
/// card's rates (and, under mpirun, the communication its backward pass hides); returns each
/// run's JSON object.
#[allow(clippy::too_many_arguments)]
fn cuda_runs(
    a: &TrainArgs,
    plan: &plan::Plan,
    model: &ModelState,
    optim: &RmsProp,
    amp: Amp,
    scaler: LossScaler,
    batch: &Batch,
    comm: &dyn crate::dist::Comm,
) -> Result<Vec<serde_json::Value>> {
    let specs: Vec<KernelPaths> = match a.kernels.is_empty() {
        true => vec![KernelPaths::from_env()?],
        false => a
            .kernels
            .iter()
            .map(|s| KernelPaths::parse(s).map_err(|e| e.context("--kernels")))
            .collect::<Result<_>>()?,
    };
    let mut rates = None;
    let mut runs = Vec::new();
    for paths in specs {
        let (p, m, o) = (plan.clone(), model.clone(), optim.clone());
        let mut trainer = CudaTrainer::with_paths_on(comm.local_rank(), paths, p, m, o, amp)?;
        let emulated = trainer.name().contains("emulated");
        let rates = *rates.get_or_insert_with(|| card_rates(a, emulated));
        let times = time_steps(a, &mut trainer, batch, scaler, |_| {}, |t| t.synchronize())?;
        // Everything is allocated up front, so memory in use after the timed steps is the peak
        // (it includes the CUDA context, and any other process on the card).
        let used = trainer.device_used_bytes()?;
        let step_ms = mean(&times);
        let (cost, limit_ms) = trainer.step_limit(rates).unwrap_or_default();
        let launches = trainer.launches_per_step();
        let spec = paths.spec();
        let note = format!(
            "device memory {:.0} MiB in use ({:.0} MiB allocated by the step), kernels {spec}",
            used as f64 / 1048576.0,
            trainer.memory().total() as f64 / 1048576.0
        );
        let mut out = report(a, &times, &note);
        let figures = trainer.step_figures();
        if let Some(f) = &figures {
            say!("  {}", f.describe());
        }
        let of_limit = limit_ms.map(|l| l / step_ms);
        say!(
            "  limit at {}: {} per step ({:.1} GFLOP and {:.1} MB of useful work){}; {} kernel launches per step{}",
            describe_rates(rates),
            limit_ms.map_or("unknown".into(), |ms| format!("{ms:.3} ms")),
            cost.flop / 1e9,
            cost.bytes / 1e6,
            of_limit.map_or(String::new(), |f| format!(": the step runs at {:.1}% of it", 100.0 * f)),
            launches.map_or("?".into(), |n| n.to_string()),
            if paths.graph { " from one CUDA graph" } else { "" },
        );
        let extra = json!({"device": "cuda", "amp": amp, "kernels": spec,
            "allocated_device_bytes": trainer.memory().total(), "peak_device_bytes": used,
            "kernel_launches_per_step": launches, "limit_ms": limit_ms, "useful_flop": cost.flop,
            "useful_bytes": cost.bytes, "rates": rates, "of_limit": of_limit,
            "conv_work": conv_work_line(&trainer), "step_figures": figures});
        if let (Some(o), serde_json::Value::Object(e)) = (out.as_object_mut(), extra) {
            o.extend(e);
        }
        if comm.world() > 1 && !nccl_on_every_rank(comm)? {
            say!("  communication: not measured (NCCL cannot be loaded on every rank)");
        } else if comm.world() > 1 {
            let time = |t: &mut CudaTrainer| -> Result<f64> {
                Ok(mean(&time_steps(
                    a,
                    t,
                    batch,
                    scaler,
                    |_| {},
                    |t| t.synchronize(),
                )?))
            };
            let overlap = overlap::measure(trainer, comm, a.bucket_mib, step_ms, time)?;
            say!("  communication: {}", overlap.describe());
            if let Some(o) = out.as_object_mut() {
                o.insert("overlap".into(), json!(overlap));
            }
        }
        runs.push(out);
    }
    Ok(runs)
}

/// Whether every rank can load NCCL (the overlap figure needs it, and every rank must take the
/// same path: its collectives would otherwise never meet).
fn nccl_on_every_rank(comm: &dyn crate::dist::Comm) -> Result<bool> {
    let mut found = [crate::gpu::nccl::ensure_nccl().is_ok() as u8 as f64];
    comm.all_reduce_sum_f64(&mut found)?;
    Ok(found[0] as usize == comm.world())
}

/// The rates the step's limit is computed at: the options', else measured on the card (not on
/// the emulated GPU, whose rates mean nothing).
fn card_rates(a: &TrainArgs, emulated: bool) -> Rates {
    let given = Rates {
        matrix_tflops: a.matrix_tflops,
        copy_gbps: a.copy_gbps,
    };
    if emulated || (given.matrix_tflops.is_some() && given.copy_gbps.is_some()) {
        return given;
    }
    match crate::bench::gpu::measure_rates(5) {
        Ok(r) => Rates {
            matrix_tflops: given.matrix_tflops.or(r.matrix_tflops),
            copy_gbps: given.copy_gbps.or(r.copy_gbps),
        },
        Err(e) => {
            eprintln!("bench train: the card's rates could not be measured: {e:#}");
            given
        }
    }
}

/// "790 TFLOP/s and 4300 GB/s", with "?" for a rate not known.
fn describe_rates(r: Rates) -> String {
    let f =
        |x: Option<f64>, unit: &str| x.map_or(format!("? {unit}"), |x| format!("{x:.0} {unit}"));
    format!(
        "{} and {}",
        f(r.matrix_tflops, "TFLOP/s"),
        f(r.copy_gbps, "GB/s")
    )
}

/// Prints what the step's convolutions issue under the paths it ran (host counts from the tile
/// choices, not timings); returns them for the JSON line.
fn conv_work_line(trainer: &CudaTrainer) -> serde_json::Value {
    let Some(w) = trainer.conv_work(trainer.kernel_paths()) else {
        return serde_json::Value::Null;
    };
    say!(
        "  conv work per step: {:.3e} tensor-core MMAs, {:.3e} plain FMAs, {:.1}% of the issued \
         multiply-adds useful",
        w.mmas as f64,
        w.plain_macs as f64,
        100.0 * w.useful_fraction()
    );
    json!(w)
}

/// One synthetic batch, reused by every step.
struct Batch<'a> {
    images: &'a [f32],
    /// The same batch as u8 pixels, for a backend that takes them (`InputFormat::U8`).
    pixels: &'a [u8],
    labels: &'a [u32],
}

impl Batch<'_> {
    fn input(&self, backend: &dyn Backend) -> Images<'_> {
        match backend.input_format() {
            InputFormat::U8 => Images::U8 {
                pixels: self.pixels,
                norm: Normalization::IMAGENET.factors(),
            },
            InputFormat::F32 => Images::F32(self.images),
        }
    }
}

/// Runs the warm-up steps, calls `before_timed`, then times the steps (milliseconds each).
/// `finish` waits for work still queued (CUDA returns from a step before its backward ends); its
/// time counts to the last step, so the mean is the true time per step.
fn time_steps<B: Backend>(
    a: &TrainArgs,
    backend: &mut B,
    batch: &Batch,
    scaler: LossScaler,
    before_timed: impl FnOnce(&mut B),
    finish: impl FnOnce(&mut B) -> Result<()>,
) -> Result<Vec<f64>> {
    say_err!(
        "bench train: {} on {}, loss scale {:?}, batch {}, {}x{}, {} warm-up + {} timed steps",
        a.plan,
        backend.name(),
        scaler,
        a.batch_size,
        a.image_size,
        a.image_size,
        a.warmup,
        a.steps
    );
    let mut scaler = scaler;
    for s in 0..a.warmup {
        backend.train_step(
            batch.input(backend),
            batch.labels,
            s as u64,
            1e-4,
            &mut scaler,
        )?;
    }
    before_timed(backend);
    let mut times = Vec::with_capacity(a.steps);
    for s in 0..a.steps {
        let t = Instant::now();
        let step = (a.warmup + s) as u64;
        let input = batch.input(backend);
        let settled = backend.train_step(input, batch.labels, step, 1e-4, &mut scaler)?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        let loss = settled
            .last()
            .map_or(String::new(), |o| format!(", loss {:.4}", o.loss));
        say_err!("  step {}: {:.1} ms{loss}", s + 1, times[s]);
    }
    let t = Instant::now();
    backend.settle(&mut scaler)?;
    finish(backend)?;
    if let Some(last) = times.last_mut() {
        *last += t.elapsed().as_secs_f64() * 1000.0;
    }
    Ok(times)
}

fn mean(times: &[f64]) -> f64 {
    times.iter().sum::<f64>() / times.len().max(1) as f64
}

/// Prints the throughput line and returns the run's JSON object.
fn report(a: &TrainArgs, times: &[f64], memory: &str) -> serde_json::Value {
    let step_ms = mean(times);
    let best_ms = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let ips = a.batch_size as f64 / (step_ms / 1000.0);
    say!("{ips:.1} images/s, {step_ms:.1} ms per step (best {best_ms:.1} ms), {memory}");
    json!({"plan": a.plan, "image_size": a.image_size, "batch_size": a.batch_size, "steps": a.steps, "step_ms": step_ms, "best_step_ms": best_ms, "images_per_sec": ips})
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
/// Epochs follow one another until `--batches` batches are timed, so a data set smaller than
/// that is read several times; the per-stage split covers the timed batches only.
fn bench_loader(a: LoaderArgs) -> Result<()> {
    let set = std::sync::Arc::new(crate::data::Dataset::open(&a.data)?);
    let cfg = crate::data::LoaderConfig {
        workers: a.workers,
        jpeg: a.jpeg,
        scaled_decode: !a.no_scaled_decode,
        ..crate::data::LoaderConfig::train(a.batch_size, a.image_size, 1)
    };
    let loader = crate::data::Loader::new(set, cfg)?;
    let threads = if a.workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        a.workers
    };
    let turbo = crate::data::Decoder::new(a.jpeg)?.uses_turbo();
    // Batches in epoch order, one epoch after another, for as long as the caller takes them.
    let mut epoch_no = 0;
    let mut epoch = loader.epoch(epoch_no);
    let mut next_batch = || -> Result<crate::data::Batch> {
        loop {
            if let Some(b) = epoch.next() {
                return Ok(b);
            }
            epoch_no += 1;
            epoch = loader.epoch(epoch_no);
            if epoch_no > 1_000_000 {
                bail!("the loader produces no batches");
            }
        }
    };
    let first = next_batch()?;
    loader.recycle(first);
    let before = loader.stage_times();
    let start = Instant::now();
    let mut images = 0;
    for _ in 0..a.batches {
        let batch = next_batch()?;
        images += batch.len;
        loader.recycle(batch);
    }
    let secs = start.elapsed().as_secs_f64();
    let after = loader.stage_times();
    let ips = images as f64 / secs;
    // Worker stages per image the workers finished, packing per image packed.
    let loaded = (after.loaded - before.loaded).max(1) as f64;
    let packed = (after.images - before.images).max(1) as f64;
    let ms = |x: f64, y: f64, n: f64| (x - y) / n * 1e3;
    let stages = [
        ("read", ms(after.read, before.read, loaded)),
        ("decode", ms(after.decode, before.decode, loaded)),
        ("transform", ms(after.transform, before.transform, loaded)),
        ("pack", ms(after.pack, before.pack, packed)),
    ];
    let total: f64 = stages.iter().map(|s| s.1).sum();
    println!(
        "loader: {ips:.0} images/s at {0}x{0} with {threads} threads, batch {1}, JPEG decoder {2}{3} ({images} images in {secs:.2} s)",
        a.image_size,
        a.batch_size,
        if turbo { "libjpeg-turbo" } else { "zune-jpeg" },
        if turbo && !a.no_scaled_decode { " with scaled decoding" } else { "" },
    );
    let split: Vec<String> = stages
        .iter()
        .map(|(name, ms)| format!("{name} {ms:.3} ms ({:.0}%)", 100.0 * ms / total.max(1e-12)))
        .collect();
    println!("per image (thread time): {}", split.join(", "));
    if a.json {
        let stage_ms: serde_json::Map<String, serde_json::Value> = stages
            .iter()
            .map(|(n, ms)| (n.to_string(), json!(ms)))
            .collect();
        println!(
            "{}",
            json!({"images_per_sec": ips, "images": images, "seconds": secs, "threads": threads,
                   "image_size": a.image_size, "batch_size": a.batch_size,
                   "jpeg": if turbo { "turbo" } else { "zune" },
                   "scaled_decode": turbo && !a.no_scaled_decode, "stage_ms_per_image": stage_ms})
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
