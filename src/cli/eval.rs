//! `inception-engine eval`: loss, top-1 and top-5 of a checkpoint over every image of a dataset.

use crate::backend::Device;
use crate::checkpoint::Checkpoint;
use crate::data::{Dataset, Loader, LoaderConfig};
use crate::train::eval::{evaluate, inference_backend};
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
    #[arg(long, value_enum, default_value = "auto")]
    pub device: Device,
    /// Loader threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Print a JSON object as the last line.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
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
    let (plan, mut backend) = inference_backend(&ckpt, args.batch_size, args.device)?;
    let size = ckpt.meta.preprocessing.image_size;
    let loader = Loader::new(
        set.clone(),
        LoaderConfig {
            workers: args.workers,
            normalization: ckpt.meta.preprocessing.normalization(),
            ..LoaderConfig::eval(args.batch_size, size)
        },
    )?;
    eprintln!(
        "evaluating {} on {} images at {size}x{size} with {}",
        args.checkpoint.display(),
        set.len(),
        backend.name()
    );
    let (total, tty) = (set.len(), std::io::stderr().is_terminal());
    let r = evaluate(backend.as_mut(), &loader, plan.config.num_classes, |done| {
        if tty {
            eprint!("\r  {done}/{total} images");
        }
    })?;
    if tty {
        eprintln!();
    }
    if r.skipped > 0 {
        eprintln!("{} unreadable files skipped", r.skipped);
    }
    println!("{}", r.seed_line());
    if args.json {
        println!(
            "{}",
            json!({"loss": r.loss, "top1": r.top1, "top5": r.top5, "images": r.images, "skipped": r.skipped})
        );
    }
    Ok(())
}
