//! Helpers shared by the interop tests (included with `#[path]`; alone it holds no tests).
#![allow(dead_code)]

use inception_engine::backend::cpu::{CpuExecutor, Mode};
use inception_engine::checkpoint::{Checkpoint, CheckpointMeta};
use inception_engine::data::{bundled_dataset, transform::eval_transform, Dataset, Normalization};
use inception_engine::export::engine_preprocessing;
use inception_engine::params::ModelState;
use inception_engine::plan::{self, Plan, PlanConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::process::Command;

/// The smallest image size v4 accepts, to keep the tests fast.
pub const SIZE: usize = 75;
pub const CLASSES: usize = 10;

pub fn v4_plan(batch: usize) -> Plan {
    let config = PlanConfig {
        batch,
        image_size: SIZE,
        num_classes: CLASSES,
        ..PlanConfig::default()
    };
    plan::build("v4", config).unwrap()
}

/// Seeded weights with BN made non-trivial: random running mean, positive running variance,
/// gamma and beta, so an exporter that dropped or misordered any BN input would be caught.
pub fn perturbed_model(plan: &Plan, seed: u64) -> ModelState {
    let mut model = ModelState::init(plan, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let names: Vec<String> = model.layout.states.iter().map(|e| e.name.clone()).collect();
    for name in names {
        let var = name.ends_with("running_var");
        for v in model.state_mut(&name).unwrap() {
            *v = if var {
                rng.random_range(0.5..2.0)
            } else {
                rng.random_range(-0.3..0.3)
            };
        }
    }
    let bn: Vec<String> = model
        .layout
        .params
        .iter()
        .filter(|e| e.name.contains(".bn."))
        .map(|e| e.name.clone())
        .collect();
    for name in bn {
        let gamma = name.ends_with(".weight");
        for v in model.param_mut(&name).unwrap() {
            *v = if gamma {
                rng.random_range(0.7..1.3)
            } else {
                rng.random_range(-0.2..0.2)
            };
        }
    }
    model
}

/// Set the BN running statistics from a training pass over `images` (momentum 1: the batch
/// statistics), then jitter them. Random statistics wash the input out over v4's 149 BN layers:
/// the logits then hardly depend on the image, only on the weights. Calibrated ones keep the
/// activations normalised, so the logits follow the image, at the price of float32 rounding
/// that grows with depth to about 2e-4 relative (timm in float32 against float64 is as far).
pub fn calibrate(model: &mut ModelState, images: &[f32], n: usize, seed: u64) {
    let config = PlanConfig {
        batch: n,
        image_size: SIZE,
        num_classes: CLASSES,
        bn_momentum: 1.0,
        ..PlanConfig::default()
    };
    let mut cpu = CpuExecutor::new(plan::build("v4", config).unwrap());
    cpu.forward(
        &model.params,
        &mut model.states,
        images,
        &vec![0; n],
        Mode::Train,
        0,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xca1b);
    for e in model.layout.states.clone() {
        let var = e.name.ends_with("running_var");
        for v in &mut model.states[e.range()] {
            *v = if var {
                *v * rng.random_range(0.8..1.25)
            } else {
                *v + rng.random_range(-0.05..0.05)
            };
        }
    }
}

/// ||b - mean over images of b|| for `[n, k]` logits: how much they differ between images.
pub fn spread(b: &[f32], k: usize) -> f64 {
    let n = b.len() / k;
    let mean: Vec<f32> = (0..k)
        .map(|j| (0..n).map(|i| b[i * k + j]).sum::<f32>() / n as f32)
        .collect();
    let s: f64 = b
        .iter()
        .enumerate()
        .map(|(i, v)| ((v - mean[i % k]) as f64).powi(2))
        .sum();
    s.sqrt()
}

pub fn norm(a: &[f32]) -> f64 {
    a.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()
}

/// ||a - b|| / ||b||.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: Vec<f32> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&d) / norm(b)
}

pub fn checkpoint(plan: &Plan, model: &ModelState) -> Checkpoint {
    let classes = (0..CLASSES).map(|i| format!("c{i}")).collect();
    let meta = CheckpointMeta::new(
        plan,
        classes,
        engine_preprocessing(SIZE, Normalization::IMAGENET),
    );
    Checkpoint::from_state(model, None, meta)
}

/// `n` real validation images (one per class in turn) through the eval transform, NHWC.
pub fn real_images(n: usize) -> Vec<f32> {
    let root = bundled_dataset().expect("the bundled dataset is in the checkout");
    let ds = Dataset::open(&root.join("val")).unwrap();
    let stride = ds.len() / n;
    (0..n)
        .flat_map(|i| {
            eval_transform(
                &ds.read(i * stride).unwrap(),
                SIZE,
                &Normalization::IMAGENET,
            )
        })
        .collect()
}

pub fn nhwc_to_nchw(x: &[f32], n: usize, s: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for b in 0..n {
        for p in 0..s * s {
            for c in 0..3 {
                out[(b * 3 + c) * s * s + p] = x[(b * s * s + p) * 3 + c];
            }
        }
    }
    out
}

/// Run the engine's binary; panics with its stderr unless it succeeds.
pub fn engine(args: &[&str]) -> String {
    let out = engine_output(args);
    assert!(
        out.status.success(),
        "inception-engine {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn engine_output(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inception-engine"))
        .args(args)
        .output()
        .unwrap()
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn write_f32(path: &Path, data: &[f32]) {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

pub fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
