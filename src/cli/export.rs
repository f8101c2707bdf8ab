//! `inception-engine export`: export a checkpoint to ONNX or a timm state dict.

use crate::checkpoint::Checkpoint;
use crate::export::{model_from_checkpoint, onnx, timm};
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// ONNX inference model: normalised NCHW float32 images in, logits out.
    Onnx,
    /// timm state dict as safetensors (loads with `load_state_dict(strict=True)`), for a model
    /// with a timm counterpart (`inspect --list-models`).
    Timm,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The checkpoint to export.
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long, value_enum)]
    pub format: Format,
    /// Output file.
    #[arg(long)]
    pub out: PathBuf,
    /// ONNX only: fix the batch dimension (default: symbolic `N`).
    #[arg(long)]
    pub batch: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    let ckpt = Checkpoint::load(&args.checkpoint)?;
    let (plan, model) = model_from_checkpoint(&ckpt, 1)
        .with_context(|| format!("cannot export {}", args.checkpoint.display()))?;
    match args.format {
        Format::Onnx => {
            let proto = onnx::to_model(&plan, &model, &ckpt.meta, args.batch)?;
            onnx::write(&proto, &args.out)?;
        }
        Format::Timm => {
            anyhow::ensure!(args.batch.is_none(), "--batch applies to ONNX export only");
            timm::export(&plan, &model, ckpt.meta.step as i64, &args.out)?;
        }
    }
    println!("wrote {}", args.out.display());
    Ok(())
}
