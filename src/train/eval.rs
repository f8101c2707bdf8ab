//! Evaluation over every image of a dataset: loss, top-1 and top-5.

use crate::backend::{self, resolve_device, Backend, Device};
use crate::checkpoint::Checkpoint;
use crate::data::Loader;
use crate::dist::{Comm, Single};
use crate::ops::softmax_ce;
use crate::optim::{RmsProp, RmsPropConfig};
use crate::params::ModelState;
use crate::plan::{self, Plan, PlanConfig};
use crate::train::loss::topk_correct;
use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy without label smoothing.
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub images: usize,
    /// Unreadable files skipped.
    pub skipped: usize,
}

impl EvalResult {
    /// The seed's print format.
    pub fn seed_line(&self) -> String {
        format!(
            "metric: {{'Loss': {:.4}, 'Top1-Acc': {:.4}, 'Top5-Acc': {:.4}}}",
            self.loss, self.top1, self.top5
        )
    }
}

/// Evaluate every image once (the last batch may be short: only its real rows count).
pub fn evaluate(
    backend: &mut dyn Backend,
    loader: &Loader,
    classes: usize,
    progress: impl FnMut(usize),
) -> Result<EvalResult> {
    evaluate_sharded(backend, loader, classes, &Single, progress)
}

/// Evaluate this rank's shard (the loader's rank and world) and sum the tallies over the ranks:
/// the evaluation shards cover every image exactly once, so the result counts what one process
/// evaluating the whole set counts (the loss up to the order of its sum).
pub fn evaluate_sharded(
    backend: &mut dyn Backend,
    loader: &Loader,
    classes: usize,
    comm: &dyn Comm,
    progress: impl FnMut(usize),
) -> Result<EvalResult> {
    let mut t = shard_tally(backend, loader, classes, progress)?;
    comm.all_reduce_sum_f64(&mut t)?;
    let [loss, top1, top5, images, skipped] = t;
    let d = images.max(1.0);
    Ok(EvalResult {
        loss: loss / d,
        top1: top1 / d,
        top5: top5 / d,
        images: images as usize,
        skipped: skipped as usize,
    })
}

/// Summed loss, top-1 and top-5 hits, images and skipped files of the loader's images.
fn shard_tally(
    backend: &mut dyn Backend,
    loader: &Loader,
    classes: usize,
    mut progress: impl FnMut(usize),
) -> Result<[f64; 5]> {
    let (mut loss, mut top1, mut top5, mut images) = (0.0f64, 0, 0, 0);
    let mut epoch = loader.epoch(0);
    for batch in &mut epoch {
        let logits = backend.infer(&batch.images)?;
        let n = batch.len;
        let labels_f: Vec<f32> = batch.labels[..n].iter().map(|&l| l as f32).collect();
        loss += softmax_ce::forward(&logits, &labels_f, n, classes, 0.0) as f64 * n as f64;
        top1 += topk_correct(&logits[..n * classes], &batch.labels[..n], classes, 1);
        top5 += topk_correct(
            &logits[..n * classes],
            &batch.labels[..n],
            classes,
            5.min(classes),
        );
        images += n;
        progress(images);
    }
    Ok([
        loss,
        top1 as f64,
        top5 as f64,
        images as f64,
        epoch.skipped() as f64,
    ])
}

/// Build the checkpoint's plan for `batch` images of `image_size` (None: the size it was trained
/// or imported at) and a backend holding its weights, on GPU `ordinal` when it is CUDA (a
/// sharded evaluation's local rank).
pub fn inference_backend(
    ckpt: &Checkpoint,
    batch: usize,
    image_size: Option<usize>,
    device: Device,
    ordinal: usize,
) -> Result<(Plan, Box<dyn Backend>)> {
    let mut config: PlanConfig = serde_json::from_value(ckpt.meta.plan_config.clone())
        .context("the checkpoint's plan configuration is unreadable")?;
    config.batch = batch;
    config.image_size = image_size.unwrap_or(ckpt.meta.preprocessing.image_size);
    let plan = plan::build(&ckpt.meta.plan_name, config)?;
    ckpt.check_compatible(&plan)?;
    let mut model = ModelState::zeros(&plan);
    ckpt.apply_to(&mut model, None)?;
    let optim = RmsProp::new(RmsPropConfig::default(), &model.layout);
    let device = resolve_device(device)?;
    let amp = backend::resolve_amp(device, None)?;
    let backend = backend::build_inference(device, amp, ordinal, plan.clone(), model, optim)?;
    Ok((plan, backend))
}
