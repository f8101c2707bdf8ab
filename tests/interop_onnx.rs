//! ONNX export checked by onnx's checker and run by onnxruntime against the CPU backend.
//!
//! Needs `python3` with `onnx`, `onnxruntime` and `numpy` (.ci/run installs them). Without them
//! the tests fail, unless `INCEPTION_ALLOW_NO_ONNXRUNTIME=1` lets them pass with a note.

#[path = "interop_util.rs"]
mod util;

use inception_engine::backend::cpu::{CpuExecutor, Mode};
use inception_engine::checkpoint::Checkpoint;
use std::path::Path;
use std::process::Command;
use util::*;

/// Whether onnxruntime can be used; panics if it cannot and that is not allowed.
fn onnxruntime_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let allowed = std::env::var("INCEPTION_ALLOW_NO_ONNXRUNTIME").is_ok_and(|v| v == "1");
        assert!(
            allowed,
            "python3 with onnx, onnxruntime and numpy is needed (pip install onnx onnxruntime \
             numpy), or set INCEPTION_ALLOW_NO_ONNXRUNTIME=1 to skip"
        );
        eprintln!("onnxruntime missing: ONNX test skipped (INCEPTION_ALLOW_NO_ONNXRUNTIME=1)");
    }
    ok
}

/// Engine CPU logits of `n` real images, the same images as NCHW, and the checkpoint. With
/// `calibrated`, BN statistics come from the images (see [`calibrate`]); else they are random.
fn cpu_logits(n: usize, seed: u64, calibrated: bool) -> (Vec<f32>, Vec<f32>, Checkpoint) {
    let plan = v4_plan(n);
    let images = real_images(n);
    let mut model = perturbed_model(&plan, seed);
    if calibrated {
        calibrate(&mut model, &images, n, seed);
    }
    let ckpt = checkpoint(&plan, &model);
    let mut states = model.states.clone();
    let mut cpu = CpuExecutor::new(plan);
    let labels = vec![0; n];
    cpu.forward(&model.params, &mut states, &images, &labels, Mode::Eval, 0);
    (cpu.logits().to_vec(), nhwc_to_nchw(&images, n, SIZE), ckpt)
}

/// Export through the CLI, run with onnxruntime; returns its logits and the model description.
fn run_onnx(
    dir: &Path,
    ckpt: &Checkpoint,
    nchw: &[f32],
    n: usize,
    batch_flag: Option<usize>,
) -> (Vec<f32>, serde_json::Value) {
    let (ck, model, input, output) = (
        dir.join("m.safetensors"),
        dir.join("m.onnx"),
        dir.join("x.f32"),
        dir.join("y.f32"),
    );
    ckpt.save(&ck).unwrap();
    let batch = batch_flag.map(|b| b.to_string());
    let mut args = vec!["export", "--checkpoint", path(&ck), "--format", "onnx"];
    args.extend(["--out", path(&model)]);
    if let Some(b) = &batch {
        args.extend(["--batch", b]);
    }
    engine(&args);
    write_f32(&input, nchw);
    let shape = format!("{n},3,{SIZE},{SIZE}");
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tools/interop_run_onnx.py"
        ))
        .args([path(&model), path(&input), &shape, path(&output)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "onnx check or onnxruntime failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = serde_json::from_slice(&out.stdout).unwrap();
    (read_f32(&output), info)
}

/// The brief's setting: random BN statistics (BN far from the identity), 1e-4 relative L2.
#[test]
fn onnx_matches_cpu_logits_on_real_images() {
    if !onnxruntime_available() {
        return;
    }
    let n = 4;
    let (want, nchw, ckpt) = cpu_logits(n, 7, false);
    let dir = tempfile::tempdir().unwrap();
    let (got, info) = run_onnx(dir.path(), &ckpt, &nchw, n, None);
    let err = rel_l2(&got, &want);
    eprintln!("random BN statistics: onnxruntime vs engine CPU relative L2 {err:.3e}");
    assert!(err < 1e-4, "relative L2 {err}");
    assert_eq!(info["input_shape"], serde_json::json!(["N", 3, SIZE, SIZE]));
    assert_eq!(info["output_shape"], serde_json::json!(["N", CLASSES]));
    assert_eq!(info["opset"], serde_json::json!([17]));
}

/// With random statistics the logits hardly depend on the image, so an input layout or channel
/// order mistake could pass the test above. Calibrated statistics make the logits follow the
/// image; the bound is looser because float32 rounding itself reaches ~2e-4 on such a network.
#[test]
fn onnx_follows_the_image_like_the_cpu_backend() {
    if !onnxruntime_available() {
        return;
    }
    let n = 4;
    let (want, nchw, ckpt) = cpu_logits(n, 5, true);
    let dir = tempfile::tempdir().unwrap();
    let (got, _) = run_onnx(dir.path(), &ckpt, &nchw, n, None);
    let err = rel_l2(&got, &want);
    let diff: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
    let (spread, of_spread) = (spread(&want, CLASSES), norm(&diff) / spread(&want, CLASSES));
    eprintln!("calibrated BN: relative L2 {err:.3e}, {of_spread:.3e} of the between-image spread");
    // The images really give different logits...
    assert!(
        spread > 0.05 * norm(&want),
        "logits hardly depend on the image"
    );
    // ...and the exported model reproduces those differences.
    assert!(err < 1e-3, "relative L2 {err}");
    assert!(
        of_spread < 1e-2,
        "error {of_spread} of the between-image spread"
    );
}

#[test]
fn onnx_fixed_batch_and_preprocessing_metadata() {
    if !onnxruntime_available() {
        return;
    }
    let n = 2;
    let (want, nchw, ckpt) = cpu_logits(n, 11, false);
    let dir = tempfile::tempdir().unwrap();
    let (got, info) = run_onnx(dir.path(), &ckpt, &nchw, n, Some(n));
    assert!(rel_l2(&got, &want) < 1e-4);
    assert_eq!(info["input_shape"], serde_json::json!([n, 3, SIZE, SIZE]));
    let meta = &info["metadata"];
    assert_eq!(meta["input_layout"], "NCHW");
    assert_eq!(meta["image_size"], SIZE.to_string());
    let mean: Vec<f32> = serde_json::from_str(meta["mean"].as_str().unwrap()).unwrap();
    assert_eq!(mean, inception_engine::data::MEAN);
    let classes: Vec<String> = serde_json::from_str(meta["class_names"].as_str().unwrap()).unwrap();
    assert_eq!(classes.len(), CLASSES);
}
