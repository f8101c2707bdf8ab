//! Interoperability: ONNX export and timm (PyTorch) state dicts in and out.
//!
//! - [`onnx`] turns a checkpoint into an ONNX inference model (NCHW input, logits output).
//! - [`timm`] maps the engine's tensors onto timm's `inception_v4` state dict and back. The v4 plan
//!   already uses timm's module names, so the mapping is one to one; only the convolution weight
//!   layout (`[cout, kh, kw, cin]` here, OIHW there) and timm's `num_batches_tracked` buffers differ.

pub mod onnx;
pub mod onnx_proto;
pub mod timm;

use crate::checkpoint::{Checkpoint, CheckpointMeta, Preprocessing};
use crate::data::Normalization;
use crate::params::ModelState;
use crate::plan::{self, Plan, PlanConfig};
use anyhow::{Context, Result};

/// Rebuild the plan a checkpoint was made for, at `batch` images. `PlanConfig` is stored as JSON;
/// a field that is absent keeps its default so older checkpoints still load.
pub fn plan_for(meta: &CheckpointMeta, batch: usize) -> Result<Plan> {
    let defaults = PlanConfig::default();
    let c = &meta.plan_config;
    let int = |key: &str, d: usize| {
        c.get(key)
            .and_then(|v| v.as_u64())
            .map_or(d, |v| v as usize)
    };
    let float = |key: &str, d: f32| c.get(key).and_then(|v| v.as_f64()).map_or(d, |v| v as f32);
    let config = PlanConfig {
        batch,
        image_size: int("image_size", defaults.image_size),
        num_classes: int("num_classes", defaults.num_classes),
        dropout: float("dropout", defaults.dropout),
        label_smoothing: float("label_smoothing", defaults.label_smoothing),
        bn_eps: float("bn_eps", defaults.bn_eps),
        bn_momentum: float("bn_momentum", defaults.bn_momentum),
    };
    plan::build(&meta.plan_name, config)
        .with_context(|| format!("cannot rebuild plan '{}'", meta.plan_name))
}

/// The plan (at `batch` images) and the weights of a checkpoint, checked against each other.
pub fn model_from_checkpoint(ckpt: &Checkpoint, batch: usize) -> Result<(Plan, ModelState)> {
    let plan = plan_for(&ckpt.meta, batch)?;
    ckpt.check_compatible(&plan)?;
    let mut model = ModelState::zeros(&plan);
    ckpt.apply_to(&mut model, None)?;
    Ok((plan, model))
}

/// `[cout, kh, kw, cin]` (the engine's conv layout) to `[cout, cin, kh, kw]` (PyTorch's and
/// ONNX's OIHW).
pub fn ohwi_to_oihw(data: &[f32], shape: &[usize]) -> Vec<f32> {
    let [o, h, w, i] = [shape[0], shape[1], shape[2], shape[3]];
    let mut out = vec![0.0; data.len()];
    for oc in 0..o {
        for y in 0..h {
            for x in 0..w {
                for ic in 0..i {
                    out[((oc * i + ic) * h + y) * w + x] = data[((oc * h + y) * w + x) * i + ic];
                }
            }
        }
    }
    out
}

/// `[cout, cin, kh, kw]` to `[cout, kh, kw, cin]`; `shape` is the engine's (OHWI) shape.
pub fn oihw_to_ohwi(data: &[f32], shape: &[usize]) -> Vec<f32> {
    let [o, h, w, i] = [shape[0], shape[1], shape[2], shape[3]];
    let mut out = vec![0.0; data.len()];
    for oc in 0..o {
        for ic in 0..i {
            for y in 0..h {
                for x in 0..w {
                    out[((oc * h + y) * w + x) * i + ic] = data[((oc * i + ic) * h + y) * w + x];
                }
            }
        }
    }
    out
}

/// How the engine's evaluation transform ([`crate::data::transform::eval_transform`]) prepares an
/// image, in words for checkpoint and ONNX metadata.
pub const EVAL_RESIZE: &str = "resize the shorter side to image_size (antialiased bilinear), \
centre crop image_size x image_size";

/// The preprocessing the engine's evaluation pipeline applies at `image_size` with `norm`.
pub fn engine_preprocessing(image_size: usize, norm: Normalization) -> Preprocessing {
    Preprocessing {
        image_size,
        mean: norm.mean,
        std: norm.std,
        resize: EVAL_RESIZE.into(),
    }
}
