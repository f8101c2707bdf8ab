//! timm state dicts (safetensors) in and out, for the models whose row in [`models::MODELS`] has a
//! `timm_name`.
//!
//! Such a plan names every tensor as timm names it, so the mapping is by name. Differences:
//! convolution weights are OIHW in PyTorch and `[cout, kh, kw, cin]` here (transposed both ways,
//! which is exact), and every timm BatchNorm has a `num_batches_tracked` int64 buffer that the
//! engine has no use for: ignored on import, written on export so `load_state_dict(strict=True)`
//! accepts the file.

use super::{ohwi_to_oihw, oihw_to_ohwi};
use crate::params::{ModelState, ParamEntry};
use crate::plan::{models, Op, Plan, PlanConfig};
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

const BATCHES_TRACKED: &str = "num_batches_tracked";
const CLASSIFIER: &str = "last_linear.";
const CLASSIFIER_WEIGHT: &str = "last_linear.weight";

/// How to turn a timm state dict into an engine model.
#[derive(Clone, Debug)]
pub struct ImportOptions {
    /// The engine model (a row of [`models::MODELS`] with a timm counterpart).
    pub plan: String,
    /// Classes of the engine model; `None` takes the file's.
    pub num_classes: Option<usize>,
    /// With a class count different from the file's: keep the backbone, initialise a new
    /// classifier (from `seed`). Without it such a mismatch is an error.
    pub reset_classifier: bool,
    /// The image size the plan is built for (the weights do not depend on it).
    pub image_size: usize,
    pub seed: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            plan: models::DEFAULT.to_string(),
            num_classes: None,
            reset_classifier: false,
            image_size: 299,
            seed: 0,
        }
    }
}

/// Read a timm state dict into the plan of `opts.plan` (batch 1) and its weights. Every missing,
/// mis-shaped, unreadable or unexpected tensor is reported in one error.
pub fn import(bytes: &[u8], opts: &ImportOptions) -> Result<(Plan, ModelState)> {
    let row = models::find(&opts.plan)?;
    // Checked before reading the file: without a timm model no file can fit.
    let timm_name = row.timm()?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| anyhow!("not a safetensors file: {e}"))?;
    let file_classes = st.tensor(CLASSIFIER_WEIGHT).ok().map(|v| v.shape()[0]);
    let classes = choose_classes(file_classes, opts)?;
    let config = PlanConfig {
        image_size: opts.image_size,
        num_classes: classes,
        ..PlanConfig::default()
    };
    let plan = (row.build)(config)?;
    // Initialised rather than zeroed: a reset classifier keeps its fresh initialisation.
    let mut model = ModelState::init(&plan, opts.seed);
    let reset = opts.reset_classifier && file_classes != Some(classes);
    let skip = |name: &str| reset && name.starts_with(CLASSIFIER);
    let mut problems = Vec::new();
    let mut copies = Vec::new();
    let layout = model.layout.clone();
    for (is_param, e) in tagged(&layout) {
        if skip(&e.name) {
            continue;
        }
        match read_tensor(&st, e, timm_name) {
            Ok(data) => copies.push((is_param, e.range(), data)),
            Err(p) => problems.push(p),
        }
    }
    problems.extend(unexpected(&st, &layout, &skip));
    if !problems.is_empty() {
        bail!(
            "the state dict does not fit timm's {timm_name} ({} problems):\n  - {}",
            problems.len(),
            problems.join("\n  - ")
        );
    }
    for (is_param, range, data) in copies {
        let dst = if is_param {
            &mut model.params
        } else {
            &mut model.states
        };
        dst[range].copy_from_slice(&data);
    }
    Ok((plan, model))
}

/// The engine's class count, or an error when it differs from the file's without a reset.
fn choose_classes(file: Option<usize>, opts: &ImportOptions) -> Result<usize> {
    match (file, opts.num_classes) {
        (Some(f), Some(k)) if f != k && !opts.reset_classifier => bail!(
            "the state dict's classifier has {f} classes but --num-classes is {k}: pass \
             --reset-classifier to keep the backbone and initialise a new {k}-class classifier"
        ),
        (_, Some(k)) => Ok(k),
        (Some(f), None) => Ok(f),
        // The missing classifier is reported with every other problem.
        (None, None) => Ok(PlanConfig::default().num_classes),
    }
}

/// Parameters then states, each tagged with whether it is a parameter.
fn tagged(layout: &crate::params::ParamLayout) -> impl Iterator<Item = (bool, &ParamEntry)> {
    let params = layout.params.iter().map(|e| (true, e));
    params.chain(layout.states.iter().map(|e| (false, e)))
}

/// timm's shape of an engine tensor: OIHW for convolution weights, the same otherwise.
fn timm_shape(engine: &[usize]) -> Vec<usize> {
    match engine {
        [o, h, w, i] => vec![*o, *i, *h, *w],
        other => other.to_vec(),
    }
}

/// One tensor of the file as f32 in the engine's layout, or the problem with it.
fn read_tensor(
    st: &SafeTensors,
    e: &ParamEntry,
    timm_name: &str,
) -> std::result::Result<Vec<f32>, String> {
    let view = st
        .tensor(&e.name)
        .map_err(|_| format!("missing tensor {}", e.name))?;
    let want = timm_shape(&e.shape);
    if view.shape() != want {
        return Err(format!(
            "{}: shape {:?} in the file, timm's {timm_name} has {want:?}",
            e.name,
            view.shape()
        ));
    }
    let data = to_f32(view.dtype(), view.data()).map_err(|d| format!("{}: {d}", e.name))?;
    Ok(if e.shape.len() == 4 {
        oihw_to_ohwi(&data, &e.shape)
    } else {
        data
    })
}

/// Little-endian floating-point bytes to f32; half and bfloat16 widen exactly.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    let conv: fn(&[u8]) -> f32 = match dtype {
        Dtype::F32 => |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        Dtype::F16 => |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::BF16 => |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        Dtype::F64 => |b| f64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f32,
        other => return Err(format!("dtype {other:?}; expected F32, F16, BF16 or F64")),
    };
    Ok(bytes.chunks_exact(dtype.bitsize() / 8).map(conv).collect())
}

/// Names in the file that the model does not have (BN batch counters and a classifier being
/// reset are expected).
fn unexpected(
    st: &SafeTensors,
    layout: &crate::params::ParamLayout,
    skip: &dyn Fn(&str) -> bool,
) -> Vec<String> {
    let known: BTreeSet<&str> = tagged(layout).map(|(_, e)| e.name.as_str()).collect();
    let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    names.sort();
    names
        .into_iter()
        .filter(|n| !known.contains(n.as_str()) && !n.ends_with(BATCHES_TRACKED) && !skip(n))
        .map(|n| format!("unexpected tensor {n}"))
        .collect()
}

/// Write the model as a timm state dict. `batches_tracked` fills every BN's
/// `num_batches_tracked` (timm counts training batches there; the engine's step count).
pub fn export(plan: &Plan, model: &ModelState, batches_tracked: i64, path: &Path) -> Result<()> {
    // Only a model named after timm's modules has names that mean something to timm.
    models::find(&plan.name)?.timm()?;
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (is_param, e) in tagged(&model.layout) {
        let buf = if is_param {
            &model.params
        } else {
            &model.states
        };
        let data = &buf[e.range()];
        let data = if e.shape.len() == 4 {
            ohwi_to_oihw(data, &e.shape)
        } else {
            data.to_vec()
        };
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        owned.push((e.name.clone(), Dtype::F32, timm_shape(&e.shape), bytes));
    }
    for prefix in bn_prefixes(plan) {
        let name = format!("{prefix}.{BATCHES_TRACKED}");
        // A 0-dimensional int64 tensor, as PyTorch stores the counter.
        owned.push((
            name,
            Dtype::I64,
            vec![],
            batches_tracked.to_le_bytes().to_vec(),
        ));
    }
    let views = owned
        .iter()
        .map(|(n, d, s, b)| Ok((n.as_str(), TensorView::new(*d, s.clone(), b)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("cannot lay out the state dict: {e}"))?;
    // safetensors' PyTorch helpers mark their files this way.
    let info = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(info), path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The module name of every BatchNorm (its gamma's name without `.weight`).
fn bn_prefixes(plan: &Plan) -> Vec<String> {
    plan.nodes
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNorm { .. }))
        .map(|n| {
            let gamma = &plan.tensor(n.params[0]).name;
            gamma.strip_suffix(".weight").unwrap_or(gamma).to_string()
        })
        .collect()
}
