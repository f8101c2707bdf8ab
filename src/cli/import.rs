//! `inception-engine import`: read foreign weights (a timm state dict) into an engine checkpoint.

use crate::checkpoint::{Checkpoint, CheckpointMeta};
use crate::data::{Dataset, Normalization};
use crate::export::{engine_preprocessing, timm};
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A timm state dict saved as safetensors (f32, f16, bf16 or f64), of the timm model that
    /// `--plan` corresponds to (`inspect --list-models` shows them).
    Timm,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where the weights come from.
    #[arg(long = "from", value_enum)]
    pub from: Source,
    /// The state dict file.
    pub file: PathBuf,
    /// The engine model to import into; it needs a timm counterpart.
    #[arg(long, default_value = crate::plan::models::DEFAULT, value_parser = crate::plan::models::plan_values())]
    pub plan: String,
    /// The checkpoint to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Classes of the new model (default: the file's classifier size).
    #[arg(long)]
    pub num_classes: Option<usize>,
    /// With a class count different from the file's: keep the backbone, new classifier.
    #[arg(long)]
    pub reset_classifier: bool,
    /// Image size recorded in the checkpoint (the weights work at any size >= 75).
    #[arg(long, default_value_t = 299)]
    pub image_size: usize,
    /// Seed of a reset classifier's initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Take the class names from this dataset (ImageFolder or packed file) instead of class_<i>.
    #[arg(long)]
    pub classes_from: Option<PathBuf>,
    /// The input normalisation the weights were trained with, recorded in the checkpoint for
    /// eval, predict and export: `imagenet` (the engine's, and weights it exported) or
    /// `inception` (mean = std = 0.5, what timm's pretrained inception_v4 expects).
    #[arg(long, value_enum, default_value = "imagenet")]
    pub normalization: NormalizationArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormalizationArg {
    Imagenet,
    Inception,
}

impl NormalizationArg {
    fn values(self) -> Normalization {
        match self {
            NormalizationArg::Imagenet => Normalization::IMAGENET,
            NormalizationArg::Inception => Normalization::INCEPTION,
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let Source::Timm = args.from;
    let bytes = std::fs::read(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let opts = timm::ImportOptions {
        plan: args.plan.clone(),
        num_classes: args.num_classes,
        reset_classifier: args.reset_classifier,
        image_size: args.image_size,
        seed: args.seed,
    };
    let (plan, model) = timm::import(&bytes, &opts)
        .with_context(|| format!("cannot import {}", args.file.display()))?;
    let classes = plan.config.num_classes;
    let names = class_names(args.classes_from.as_ref(), classes)?;
    let norm = args.normalization.values();
    let mut meta = CheckpointMeta::new(&plan, names, engine_preprocessing(args.image_size, norm));
    meta.extra
        .insert("imported_from".into(), args.file.display().to_string());
    Checkpoint::from_state(&model, None, meta).save(&args.out)?;
    println!(
        "wrote {} ({classes} classes{})",
        args.out.display(),
        if args.reset_classifier {
            ", classifier re-initialised"
        } else {
            ""
        }
    );
    if args.normalization == NormalizationArg::Imagenet {
        eprintln!(
            "input normalisation recorded: ImageNet mean/std. Weights from timm's pretrained \
             inception_v4 expect mean = std = 0.5: import those with --normalization inception"
        );
    }
    Ok(())
}

/// The dataset's class names, or `class_0..class_{k-1}`.
fn class_names(dataset: Option<&PathBuf>, k: usize) -> Result<Vec<String>> {
    let Some(path) = dataset else {
        return Ok((0..k).map(|i| format!("class_{i}")).collect());
    };
    let names = Dataset::open(path)?.classes().to_vec();
    anyhow::ensure!(
        names.len() == k,
        "{} has {} classes, the model {k}",
        path.display(),
        names.len()
    );
    Ok(names)
}
