//! Checkpoints as safetensors files, written atomically.
//!
//! A checkpoint holds the parameters and BN running statistics under the plan's tensor names,
//! the optimizer state as `optim.ms.<name>` and `optim.mom.<name>`, and everything else needed
//! to resume or to run inference in the safetensors `__metadata__` string map (see the `KEY_*`
//! constants). A sha256 over every tensor (name, shape, bytes) and every other metadata entry is
//! stored too, so a flipped byte anywhere is an error on load rather than silently wrong weights.

use crate::optim::{LossScaler, RmsProp};
use crate::params::{ModelState, ParamEntry};
use crate::plan::Plan;
use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::{SafeTensorError, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::ops::Range;
use std::path::Path;

mod files;

pub use files::{file_name, list, parse_file_name, rotate};
use files::{sync_dir, tmp_path};

/// The version of the layout below; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// Marks a safetensors file as one of ours.
pub const FORMAT_NAME: &str = "inception-engine-checkpoint";

pub const KEY_FORMAT: &str = "format";
pub const KEY_VERSION: &str = "format_version";
pub const KEY_PLAN: &str = "plan";
pub const KEY_PLAN_CONFIG: &str = "plan_config";
pub const KEY_CLASSES: &str = "classes";
pub const KEY_PREPROCESSING: &str = "preprocessing";
pub const KEY_STEP: &str = "step";
pub const KEY_EPOCH: &str = "epoch";
pub const KEY_LOSS_SCALER: &str = "loss_scaler";
pub const KEY_RNG: &str = "rng";
pub const KEY_EXTRA: &str = "extra";
pub const KEY_CHECKSUM: &str = "checksum";

const OPTIM_MS: &str = "optim.ms.";
const OPTIM_MOM: &str = "optim.mom.";

/// How images are turned into the network's input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    pub image_size: usize,
    /// Per-channel (RGB) mean subtracted from pixels scaled to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel (RGB) standard deviation pixels are divided by.
    pub std: [f32; 3],
    /// How evaluation resizes, in words the loader understands (e.g. "shorter-side 0.875 crop").
    pub resize: String,
}

impl Preprocessing {
    /// The pixel normalisation the recorded mean and std describe.
    pub fn normalization(&self) -> crate::data::Normalization {
        crate::data::Normalization {
            mean: self.mean,
            std: self.std,
        }
    }
}

/// What resuming bit-exactly needs besides the weights: all randomness in the engine derives
/// from the seed and the position (epoch, global step); `extra` holds anything a backend adds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub epoch: u64,
    pub step: u64,
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// Everything in a checkpoint that is not a tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointMeta {
    pub plan_name: String,
    /// The plan's `PlanConfig`, as JSON.
    pub plan_config: serde_json::Value,
    pub class_names: Vec<String>,
    pub preprocessing: Preprocessing,
    /// Global steps completed.
    pub step: u64,
    /// Epochs completed.
    pub epoch: u64,
    pub loss_scaler: LossScaler,
    pub rng: RngState,
    /// Free-form entries (e.g. the command line), stored as one JSON object.
    pub extra: BTreeMap<String, String>,
}

impl CheckpointMeta {
    /// Metadata for `plan` at step 0.
    pub fn new(plan: &Plan, class_names: Vec<String>, preprocessing: Preprocessing) -> Self {
        CheckpointMeta {
            plan_name: plan.name.clone(),
            plan_config: serde_json::to_value(&plan.config).expect("PlanConfig serialises"),
            class_names,
            preprocessing,
            step: 0,
            epoch: 0,
            loss_scaler: LossScaler::None,
            rng: RngState::default(),
            extra: BTreeMap::new(),
        }
    }

    /// The class count recorded in the plan config, if any.
    pub fn num_classes(&self) -> Option<usize> {
        self.plan_config
            .get("num_classes")?
            .as_u64()
            .map(|n| n as usize)
    }

    fn to_map(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert(KEY_FORMAT.into(), FORMAT_NAME.into());
        m.insert(KEY_VERSION.into(), FORMAT_VERSION.to_string());
        m.insert(KEY_PLAN.into(), self.plan_name.clone());
        m.insert(KEY_PLAN_CONFIG.into(), self.plan_config.to_string());
        m.insert(KEY_CLASSES.into(), json(&self.class_names));
        m.insert(KEY_PREPROCESSING.into(), json(&self.preprocessing));
        m.insert(KEY_STEP.into(), self.step.to_string());
        m.insert(KEY_EPOCH.into(), self.epoch.to_string());
        m.insert(KEY_LOSS_SCALER.into(), self.loss_scaler.to_json());
        m.insert(KEY_RNG.into(), json(&self.rng));
        m.insert(KEY_EXTRA.into(), json(&self.extra));
        m
    }

    fn from_map(m: &HashMap<String, String>) -> Result<Self> {
        Ok(CheckpointMeta {
            plan_name: field(m, KEY_PLAN)?.to_string(),
            plan_config: parse_json(m, KEY_PLAN_CONFIG)?,
            class_names: parse_json(m, KEY_CLASSES)?,
            preprocessing: parse_json(m, KEY_PREPROCESSING)?,
            step: parse_json(m, KEY_STEP)?,
            epoch: parse_json(m, KEY_EPOCH)?,
            loss_scaler: parse_json(m, KEY_LOSS_SCALER)?,
            rng: parse_json(m, KEY_RNG)?,
            extra: parse_json(m, KEY_EXTRA)?,
        })
    }
}

/// JSON of plain serde types (strings, numbers, maps with string keys), which cannot fail.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("metadata serialises")
}

fn field<'a>(m: &'a HashMap<String, String>, key: &str) -> Result<&'a str> {
    m.get(key)
        .map(String::as_str)
        .ok_or_else(|| anyhow!("metadata entry '{key}' is missing"))
}

fn parse_json<T: serde::de::DeserializeOwned>(m: &HashMap<String, String>, key: &str) -> Result<T> {
    let raw = field(m, key)?;
    serde_json::from_str(raw)
        .with_context(|| format!("metadata entry '{key}' is invalid: {raw:.200}"))
}

/// One f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorData {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A checkpoint in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    /// Every tensor by name, sorted (the order they are stored and hashed in).
    pub tensors: BTreeMap<String, TensorData>,
}

impl Checkpoint {
    /// Snapshot a model (and optionally its optimizer) with `meta`.
    pub fn from_state(model: &ModelState, optim: Option<&RmsProp>, meta: CheckpointMeta) -> Self {
        let mut tensors = BTreeMap::new();
        let layout = &model.layout;
        let mut put = |name: String, e: &ParamEntry, buf: &[f32]| {
            tensors.insert(
                name,
                TensorData {
                    shape: e.shape.clone(),
                    data: buf[e.range()].to_vec(),
                },
            );
        };
        for e in &layout.params {
            put(e.name.clone(), e, &model.params);
            if let Some(o) = optim {
                put(format!("{OPTIM_MS}{}", e.name), e, &o.ms);
                put(format!("{OPTIM_MOM}{}", e.name), e, &o.mom);
            }
        }
        for e in &layout.states {
            put(e.name.clone(), e, &model.states);
        }
        Checkpoint { meta, tensors }
    }

    /// Whether the optimizer state is stored.
    pub fn has_optimizer(&self) -> bool {
        self.tensors.keys().any(|k| k.starts_with(OPTIM_MS))
    }

    /// Copy the stored tensors into `model` (and `optim`). Everything is checked before anything
    /// is written, so on error both are untouched.
    pub fn apply_to(&self, model: &mut ModelState, optim: Option<&mut RmsProp>) -> Result<()> {
        let layout = &model.layout;
        let mut copies: Vec<(Target, Range<usize>, &TensorData)> = Vec::new();
        let mut problems = Vec::new();
        let mut want = |name: String, target: Target, e: &ParamEntry| match self.tensors.get(&name)
        {
            None => problems.push(format!("missing tensor {name}")),
            Some(t) if t.shape != e.shape => problems.push(format!(
                "{name}: checkpoint shape {:?}, model shape {:?}",
                t.shape, e.shape
            )),
            Some(t) => copies.push((target, e.range(), t)),
        };
        for e in &layout.params {
            want(e.name.clone(), Target::Param, e);
            if optim.is_some() {
                want(format!("{OPTIM_MS}{}", e.name), Target::Ms, e);
                want(format!("{OPTIM_MOM}{}", e.name), Target::Mom, e);
            }
        }
        for e in &layout.states {
            want(e.name.clone(), Target::State, e);
        }
        if let Some(o) = &optim {
            if o.len() != layout.param_len {
                problems.push(format!(
                    "optimizer has {} entries, model {}",
                    o.len(),
                    layout.param_len
                ));
            }
        }
        if !problems.is_empty() {
            bail!(
                "checkpoint does not fit the model:\n  - {}",
                problems.join("\n  - ")
            );
        }
        write_copies(copies, model, optim);
        Ok(())
    }

    /// Check that this checkpoint fits `plan`; the error lists every problem at once.
    pub fn check_compatible(&self, plan: &Plan) -> Result<()> {
        let mut problems = Vec::new();
        if self.meta.plan_name != plan.name {
            problems.push(format!(
                "plan is '{}', expected '{}'",
                self.meta.plan_name, plan.name
            ));
        }
        let classes = plan.config.num_classes;
        if let Some(n) = self.meta.num_classes().filter(|&n| n != classes) {
            problems.push(format!("{n} classes, expected {classes}"));
        }
        if !self.meta.class_names.is_empty() && self.meta.class_names.len() != classes {
            problems.push(format!(
                "{} class names, expected {classes}",
                self.meta.class_names.len()
            ));
        }
        problems.extend(self.tensor_problems(plan));
        if !problems.is_empty() {
            bail!(
                "checkpoint does not fit plan '{}':\n  - {}",
                plan.name,
                problems.join("\n  - ")
            );
        }
        Ok(())
    }

    /// Missing, mis-shaped and unexpected tensors against `plan`.
    fn tensor_problems(&self, plan: &Plan) -> Vec<String> {
        let mut expected: BTreeMap<String, &[usize]> = BTreeMap::new();
        let with_optim =
            self.has_optimizer() || self.tensors.keys().any(|k| k.starts_with(OPTIM_MOM));
        for t in plan.params() {
            let (name, shape) = (&plan.tensor(t).name, plan.shape(t));
            expected.insert(name.clone(), shape);
            if with_optim {
                expected.insert(format!("{OPTIM_MS}{name}"), shape);
                expected.insert(format!("{OPTIM_MOM}{name}"), shape);
            }
        }
        for t in plan.states() {
            expected.insert(plan.tensor(t).name.clone(), plan.shape(t));
        }
        let mut problems = Vec::new();
        for (name, &shape) in &expected {
            match self.tensors.get(name) {
                None => problems.push(format!("missing tensor {name}")),
                Some(t) if t.shape != shape => problems.push(format!(
                    "{name}: checkpoint shape {:?}, plan shape {shape:?}",
                    t.shape
                )),
                Some(_) => {}
            }
        }
        let unexpected = self.tensors.keys().filter(|k| !expected.contains_key(*k));
        problems.extend(unexpected.map(|k| format!("unexpected tensor {k}")));
        problems
    }

    /// Write atomically: `<path>.tmp` in the same directory, fsync, rename over `path`, fsync the
    /// directory. A crash or error at any point leaves the previous file at `path` intact.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let header = self.header()?;
        let tmp = tmp_path(path);
        let written = self.write_file(&tmp, &header).and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
        });
        if let Err(e) = written {
            // Best effort: the error that matters is the one returned; a directory in the way
            // (or a vanished file) is left alone.
            if tmp.is_file() {
                let _ = std::fs::remove_file(&tmp);
            }
            return Err(e.context(format!("saving checkpoint {} failed", path.display())));
        }
        sync_dir(path)
    }

    /// The safetensors header: JSON padded with spaces to a multiple of 8 bytes, tensors laid
    /// out in name order (the order `write_file` streams them in).
    fn header(&self) -> Result<Vec<u8>> {
        let sorted = self.meta.to_map();
        let tensors = self
            .tensors
            .iter()
            .map(|(n, t)| (n.as_str(), &t.shape[..], f32_bytes(&t.data)));
        let sum = checksum(tensors, &sorted);
        let mut meta: HashMap<String, String> = sorted.into_iter().collect();
        meta.insert(KEY_CHECKSUM.into(), sum);
        let mut offset = 0;
        let mut infos = Vec::with_capacity(self.tensors.len());
        for (name, t) in &self.tensors {
            let n = t.data.len() * 4;
            let info = TensorInfo {
                dtype: Dtype::F32,
                shape: t.shape.clone(),
                data_offsets: (offset, offset + n),
            };
            infos.push((name.clone(), info));
            offset += n;
        }
        let metadata =
            Metadata::new(Some(meta), infos).map_err(|e| anyhow!("invalid tensor layout: {e}"))?;
        let mut header = serde_json::to_vec(&metadata)?;
        header.resize(header.len().next_multiple_of(8), b' ');
        Ok(header)
    }

    /// Stream the file to `tmp` and fsync it; the data never exists twice in memory.
    fn write_file(&self, tmp: &Path, header: &[u8]) -> Result<()> {
        let file = File::create(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let io = |e: std::io::Error| anyhow!("cannot write {}: {e}", tmp.display());
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(header).map_err(io)?;
        for t in self.tensors.values() {
            w.write_all(&f32_bytes(&t.data)).map_err(io)?;
        }
        let file = w.into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)
    }

    /// Read and verify a checkpoint. Every failure is an error naming the file, never a panic.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = read_file(path)?;
        Self::parse(&bytes).with_context(|| format!("checkpoint {} is unusable", path.display()))
    }

    fn parse(bytes: &[u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(explain)?;
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(explain)?;
        let meta = header.metadata().clone().unwrap_or_default();
        check_format(&meta)?;
        let mut views: Vec<_> = st.tensors();
        views.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some((name, v)) = views.iter().find(|(_, v)| v.dtype() != Dtype::F32) {
            bail!(
                "tensor {name} is {:?}; checkpoints hold f32 only",
                v.dtype()
            );
        }
        let sorted: BTreeMap<_, _> = meta
            .iter()
            .filter(|(k, _)| *k != KEY_CHECKSUM)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let sum = checksum(
            views
                .iter()
                .map(|(n, v)| (n.as_str(), v.shape(), Cow::Borrowed(v.data()))),
            &sorted,
        );
        if field(&meta, KEY_CHECKSUM)? != sum {
            bail!("checksum mismatch: the file is corrupted");
        }
        let tensors = views
            .into_iter()
            .map(|(n, v)| {
                (
                    n,
                    TensorData {
                        shape: v.shape().to_vec(),
                        data: f32_from_le(v.data()),
                    },
                )
            })
            .collect();
        Ok(Checkpoint {
            meta: CheckpointMeta::from_map(&meta)?,
            tensors,
        })
    }
}

#[derive(Clone, Copy)]
enum Target {
    Param,
    State,
    Ms,
    Mom,
}

fn write_copies(
    copies: Vec<(Target, Range<usize>, &TensorData)>,
    model: &mut ModelState,
    mut optim: Option<&mut RmsProp>,
) {
    for (target, range, t) in copies {
        let dst = match (target, optim.as_deref_mut()) {
            (Target::Param, _) => &mut model.params,
            (Target::State, _) => &mut model.states,
            (Target::Ms, Some(o)) => &mut o.ms,
            (Target::Mom, Some(o)) => &mut o.mom,
            _ => continue, // optimizer targets are only queued when there is an optimizer
        };
        dst[range].copy_from_slice(&t.data);
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => anyhow!("checkpoint {} does not exist", path.display()),
        _ => anyhow!("cannot read checkpoint {}: {e}", path.display()),
    })
}

/// Turn the safetensors parser's error into what it most likely means for a checkpoint file.
fn explain(e: SafeTensorError) -> anyhow::Error {
    use SafeTensorError::*;
    match e {
        HeaderTooSmall => {
            anyhow!("the file is shorter than a safetensors header: truncated, or not a checkpoint")
        }
        InvalidHeaderLength => {
            anyhow!("the file ends inside its header: truncated, or not a safetensors file")
        }
        MetadataIncompleteBuffer => anyhow!(
            "the tensor data does not match the header's size: the file is truncated or damaged"
        ),
        HeaderTooLarge | InvalidHeader(_) | InvalidHeaderDeserialization(_) => {
            anyhow!("not a safetensors file ({e})")
        }
        other => anyhow!("invalid safetensors file: {other}"),
    }
}

fn check_format(meta: &HashMap<String, String>) -> Result<()> {
    if meta.get(KEY_FORMAT).map(String::as_str) != Some(FORMAT_NAME) {
        bail!("a safetensors file, but not an inception-engine checkpoint (no '{KEY_FORMAT}' metadata)");
    }
    let version = field(meta, KEY_VERSION)?;
    if version != FORMAT_VERSION.to_string() {
        bail!("checkpoint format version {version}; this build reads version {FORMAT_VERSION}");
    }
    Ok(())
}

/// sha256 over every tensor (name, shape, little-endian bytes) in name order, then every
/// metadata entry but the checksum, in key order; hex, prefixed with the algorithm.
fn checksum<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a [usize], Cow<'a, [u8]>)>,
    meta: &BTreeMap<String, String>,
) -> String {
    let mut h = Sha256::new();
    for (name, shape, data) in tensors {
        h.update(name.as_bytes());
        h.update([0]);
        for &d in shape {
            h.update((d as u64).to_le_bytes());
        }
        h.update(&data[..]);
    }
    for (k, v) in meta {
        h.update(k.as_bytes());
        h.update([0]);
        h.update(v.as_bytes());
        h.update([0]);
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// The little-endian bytes of an f32 slice (borrowed on little-endian machines).
fn f32_bytes(data: &[f32]) -> Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        Cow::Borrowed(bytemuck::cast_slice(data))
    } else {
        Cow::Owned(data.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
}

fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    if cfg!(target_endian = "little") {
        // One copy; the source may be unaligned, which pod_collect_to_vec handles.
        return bytemuck::pod_collect_to_vec(bytes);
    }
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
