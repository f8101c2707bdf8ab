//! The table of models: one row per plan builder.
//!
//! Everything that offers a choice of model (`plan::build`, the CLI's `--plan`, timm import and
//! export, the self-test) reads [`MODELS`], so adding a model is its builder file plus one row
//! here; nothing else lists model names.

use super::{tiny, v4, Plan, PlanConfig};
use anyhow::{anyhow, Result};

/// One whole-step self-test case: a training step of the model on the GPU against the CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepShape {
    pub batch: usize,
    pub image_size: usize,
    pub classes: usize,
    /// Whether the per-tensor comparisons are well conditioned enough to judge at this shape
    /// (a deep net at a tiny batch amplifies summation-order differences through its BNs).
    pub per_tensor: bool,
}

/// The whole-step self-test shapes of a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelfTestCases {
    /// The case on a real GPU.
    pub full: StepShape,
    /// A cheaper case for the emulated GPU; `None` when `full` is already cheap enough.
    pub reduced: Option<StepShape>,
}

impl SelfTestCases {
    /// The case a reduced run steps: `reduced`, or `full` when there is none.
    pub fn reduced_or_full(&self) -> StepShape {
        self.reduced.unwrap_or(self.full)
    }
}

/// A model the engine can build, train and (with `timm_name`) exchange with timm.
#[derive(Debug)]
pub struct Model {
    /// The `--plan` name, also the built plan's `Plan::name`.
    pub name: &'static str,
    /// One line for `--help` and `inspect --list-models`.
    pub summary: &'static str,
    pub build: fn(PlanConfig) -> Result<Plan>,
    /// timm's `create_model` name when the plan uses timm's module names (so state dicts map
    /// one to one); `None` when timm has no such model.
    pub timm_name: Option<&'static str>,
    pub selftest: SelfTestCases,
}

/// The model a command uses without `--plan`.
pub const DEFAULT: &str = "v4";

/// Every model, with its whole-step self-test shapes (src/selftest/step.rs).
pub const MODELS: &[Model] = &[
    Model {
        name: "v4",
        summary: "InceptionV4 with timm's module names (42.7M parameters at 1000 classes)",
        build: v4::build,
        timm_name: Some("inception_v4"),
        selftest: SelfTestCases {
            full: StepShape {
                batch: 8,
                image_size: 299,
                classes: 1000,
                per_tensor: true,
            },
            // The emulated GPU's case, run at O2 only (tiny covers O0 and O3). Its per-tensor
            // comparisons are information only: with batch 2 the last stages' BN normalises over
            // a handful of values and amplifies any difference, so the deep net's tensors
            // diverge from the CPU's even when only the summation order differs (measured on the
            // emulated GPU at O0 from 1e-6 per op: forward tensors 4.4e-3 at 139x139, above 1 at
            // 75x75, where the last BN sees two values). 139x139 keeps the loss well conditioned
            // (7e-3 at O2; at 75x75 fp16 gradients overflow). The per-tensor checks of v4 run at
            // batch 8 and 299x299 on a real GPU.
            reduced: Some(StepShape {
                batch: 2,
                image_size: 139,
                classes: 1000,
                per_tensor: false,
            }),
        },
    },
    Model {
        name: "tiny",
        summary: "a miniature InceptionV4 with every op and awkward shape, for fast tests",
        build: tiny::build,
        timm_name: None,
        selftest: SelfTestCases {
            full: StepShape {
                batch: 8,
                image_size: 32,
                classes: 10,
                per_tensor: true,
            },
            reduced: None,
        },
    },
];

/// The row named `name`; the error lists the known names.
pub fn find(name: &str) -> Result<&'static Model> {
    MODELS.iter().find(|m| m.name == name).ok_or_else(|| {
        anyhow!(
            "unknown plan '{name}': the plans are {}",
            names().join(", ")
        )
    })
}

/// The models' names in table order.
pub fn names() -> Vec<&'static str> {
    MODELS.iter().map(|m| m.name).collect()
}

impl Model {
    /// timm's name for this model, or an error saying it has none.
    pub fn timm(&self) -> Result<&'static str> {
        self.timm_name
            .ok_or_else(|| anyhow!("model {} has no timm counterpart", self.name))
    }
}

/// The `--plan` values: the table's names, each with its summary, so `--help` lists them and
/// clap rejects an unknown name with the list.
pub fn plan_values() -> clap::builder::PossibleValuesParser {
    let values = MODELS
        .iter()
        .map(|m| clap::builder::PossibleValue::new(m.name).help(m.summary));
    clap::builder::PossibleValuesParser::new(values)
}
