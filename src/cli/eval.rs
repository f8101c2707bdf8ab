//! `inception-engine eval`: loss, top-1 and top-5 of a checkpoint over every image of a dataset.

use crate::backend::Device;
use crate::checkpoint::Checkpoint;
use crate::data::transform::{check_crop_pct, eval_resize};
use crate::data::{Dataset, Loader, LoaderConfig};
use crate::dist::Comm;
use crate::train::eval::{evaluate_sharded, inference_backend};
use anyhow::{bail, Result};
use serde_json::json;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Images to evaluate: an ImageFolder or a packed file with the checkpoint's classes.
    #[arg(long)]
    pub data: PathBuf,
    /// Checkpoint written by train (or import).
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Square input size (default: the checkpoint's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// The centre crop's share of the resized image, as timm's crop_pct: the shorter side is
    /// resized to floor(image_size / crop_pct), then the centre image_size x image_size is cut
    /// out. 1 resizes the shorter side to image_size itself.
    #[arg(long, default_value_t = 1.0)]
    pub crop_pct: f64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: Device,
    /// Loader threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Print a JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// Under mpirun: seconds a rank may wait for the others' tallies before aborting the job.
    #[arg(long, default_value_t = crate::dist::DEFAULT_TIMEOUT.as_secs_f64())]
    pub collective_timeout: f64,
}

/// Under mpirun each rank evaluates its shard (every image exactly once over the ranks) and rank
/// 0 prints the summed result.
pub fn run(args: Args) -> Result<()> {
    let comm = crate::dist::init(super::train::collective_timeout(args.collective_timeout)?)?;
    match run_on(args, comm.as_ref()) {
        Err(e) if comm.world() > 1 => super::train::stop_job(e),
        r => r,
    }
}

fn run_on(args: Args, comm: &dyn Comm) -> Result<()> {
    check_crop_pct(args.crop_pct)?;
    let primary = comm.rank() == 0;
    let ckpt = Checkpoint::load(&args.checkpoint)?;
    let set = Arc::new(Dataset::open(&args.data)?);
    if set.classes() != ckpt.meta.class_names.as_slice() {
        bail!(
            "{} has classes {:?}, but the checkpoint was trained on {:?}",
            args.data.display(),
            set.classes(),
            ckpt.meta.class_names
        );
    }
    let trained = ckpt.meta.preprocessing.image_size;
    let size = args.image_size.unwrap_or(trained);
    let (plan, mut backend) = inference_backend(
        &ckpt,
        args.batch_size,
        Some(size),
        args.device,
        comm.local_rank(),
    )?;
    let loader = Loader::new(
        set.clone(),
        LoaderConfig {
            workers: match args.workers {
                0 => crate::dist::thread_share(comm.local_size()),
                n => n,
            },
            rank: comm.rank(),
            world_size: comm.world(),
            normalization: ckpt.meta.preprocessing.normalization(),
            crop_pct: args.crop_pct,
            ..LoaderConfig::eval(args.batch_size, size)
        },
    )?;
    let preprocessing = describe(size, args.crop_pct, trained);
    if primary {
        eprintln!(
            "evaluating {} on {} images with {} ({} ranks): {preprocessing}",
            args.checkpoint.display(),
            set.len(),
            backend.name(),
            comm.world()
        );
    }
    // Rank 0's shard (the loader's split): its progress stands for the job's.
    let total = set.len() / comm.world();
    let tty = primary && std::io::stderr().is_terminal();
    let classes = plan.config.num_classes;
    let r = evaluate_sharded(backend.as_mut(), &loader, classes, comm, |done| {
        if tty {
            eprint!("\r  {done}/{total} images");
        }
    })?;
    if tty {
        eprintln!();
    }
    if !primary {
        return Ok(());
    }
    if r.skipped > 0 {
        eprintln!("{} unreadable files skipped", r.skipped);
    }
    println!("{}", r.seed_line());
    println!("{preprocessing}");
    if args.json {
        println!(
            "{}",
            json!({"loss": r.loss, "top1": r.top1, "top5": r.top5, "images": r.images, "skipped": r.skipped, "image_size": size, "crop_pct": args.crop_pct})
        );
    }
    Ok(())
}

/// The evaluation preprocessing in words, e.g. `image size 96, crop_pct 0.875 (shorter side
/// resized to 109, centre crop 96x96; trained at 75)`.
pub fn describe(size: usize, crop_pct: f64, trained: usize) -> String {
    let at = if trained == size {
        String::new()
    } else {
        format!("; trained at {trained}")
    };
    format!(
        "image size {size}, crop_pct {crop_pct} (shorter side resized to {}, centre crop {size}x{size}{at})",
        eval_resize(size, crop_pct)
    )
}
