//! `inception-engine predict`: class names and probabilities for individual images.

use crate::backend::Device;
use crate::checkpoint::Checkpoint;
use crate::cli::eval::describe;
use crate::data::decode_image;
use crate::data::transform::{check_crop_pct, eval_transform_crop};
use crate::train::eval::inference_backend;
use anyhow::{Context, Result};
use serde_json::json;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Checkpoint written by train (or import).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Image files (JPEG or PNG).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Square input size (default: the checkpoint's).
    #[arg(long)]
    pub image_size: Option<usize>,
    /// The centre crop's share of the resized image (timm's crop_pct; see `eval --help`).
    #[arg(long, default_value_t = 1.0)]
    pub crop_pct: f64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: Device,
    /// One JSON object per image (file, top classes, full logits).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> Result<()> {
    check_crop_pct(args.crop_pct)?;
    let ckpt = Checkpoint::load(&args.checkpoint)?;
    let trained = ckpt.meta.preprocessing.image_size;
    let size = args.image_size.unwrap_or(trained);
    let norm = ckpt.meta.preprocessing.normalization();
    let mut inputs = Vec::with_capacity(args.images.len() * size * size * 3);
    for path in &args.images {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let img = decode_image(&bytes)
            .with_context(|| format!("{} is not a readable image", path.display()))?;
        inputs.extend(eval_transform_crop(&img, size, args.crop_pct, &norm));
    }
    let (plan, mut backend) =
        inference_backend(&ckpt, args.images.len(), Some(size), args.device, 0)?;
    if !args.json {
        println!("{}", describe(size, args.crop_pct, trained));
    }
    let logits = backend.infer(&inputs)?;
    let k = plan.config.num_classes;
    for (path, row) in args.images.iter().zip(logits.chunks(k)) {
        let probs = softmax(row);
        let mut order: Vec<usize> = (0..k).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let top: Vec<_> = order
            .iter()
            .take(args.top.min(k))
            .map(|&c| {
                (
                    c,
                    ckpt.meta
                        .class_names
                        .get(c)
                        .cloned()
                        .unwrap_or_else(|| format!("class_{c}")),
                    probs[c],
                )
            })
            .collect();
        if args.json {
            let top_json: Vec<_> = top
                .iter()
                .map(|(i, name, p)| json!({"index": i, "class": name, "probability": p}))
                .collect();
            println!(
                "{}",
                json!({"file": path, "image_size": size, "crop_pct": args.crop_pct, "top": top_json, "logits": row})
            );
        } else {
            println!("{}", path.display());
            for (i, name, p) in top {
                println!("  {p:>7.2}%  {name} ({i})", p = p * 100.0);
            }
        }
    }
    Ok(())
}

fn softmax(row: &[f32]) -> Vec<f32> {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let e: Vec<f64> = row.iter().map(|&z| ((z - m) as f64).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| (v / s) as f32).collect()
}
