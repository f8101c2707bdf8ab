//! ONNX export checked by onnx's checker and run by onnxruntime against the CPU backend.
//!
//! Needs python with `onnx`, `onnxruntime` and `numpy` (tools/test.sh installs them in `.venv`;
//! see `tool_groups::python` for which python runs). Without them a plain `cargo test` skips
//! these tests with a note, and tools/test.sh (INCEPTION_REQUIRE_ALL=1) fails them.

#[path = "interop_util.rs"]
mod util;

#[path = "common/tool_groups.rs"]
mod tool_groups;

use inception_engine::backend::cpu::{CpuExecutor, Mode};
use inception_engine::checkpoint::Checkpoint;
use std::path::Path;
use std::process::Command;
use util::*;

/// Whether onnxruntime can be used; panics if it cannot and every group is required.
fn onnxruntime_available() -> bool {
    let python = tool_groups::python();
    let probe = Command::new(&python)
        .args(["-c", "import onnx, onnxruntime, numpy"])
        .output();
    let probe = match probe {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "{} cannot import onnx, onnxruntime and numpy: {}",
            python.display(),
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or_default()
        )),
        Err(e) => Err(format!("cannot run {}: {e}", python.display())),
    };
    tool_groups::available("the ONNX export tests (tests/interop_onnx.rs)", probe)
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
    let out = Command::new(tool_groups::python())
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

/// The graph's structure, read back with the same prost types (no Python needed).
#[test]
fn onnx_graph_has_one_node_per_plan_op() {
    use inception_engine::export::{onnx, onnx_proto::ModelProto};
    use prost::Message;
    let plan = v4_plan(1);
    let model = perturbed_model(&plan, 1);
    let ckpt = checkpoint(&plan, &model);
    let proto = onnx::to_model(&plan, &model, &ckpt.meta, None).unwrap();
    let proto = ModelProto::decode(&proto.encode_to_vec()[..]).unwrap();
    let graph = proto.graph.unwrap();
    let count = |op: &str| {
        let ops = graph
            .node
            .iter()
            .filter(|n| n.op_type.as_deref() == Some(op));
        ops.count()
    };
    for (op, n) in [
        ("Conv", 149),
        ("BatchNormalization", 149),
        ("Relu", 149),
        ("MaxPool", 4),
        ("AveragePool", 14),
        ("Concat", 19),
        ("GlobalAveragePool", 1),
        ("Flatten", 1),
        ("Gemm", 1),
    ] {
        assert_eq!(count(op), n, "{op}");
    }
    assert_eq!(graph.node.len(), 149 * 3 + 4 + 14 + 19 + 3);
    assert_eq!(graph.initializer.len(), 149 * 5 + 2);
    let node = |name: &str| graph.node.iter().find(|n| n.name.as_deref() == Some(name));
    let attr = |name: &str, a: &str| {
        let n = node(name).unwrap_or_else(|| panic!("no node {name}"));
        n.attribute
            .iter()
            .find(|x| x.name.as_deref() == Some(a))
            .cloned()
    };
    // A zero must be on the wire: the checker wants exactly one value field per attribute.
    let pad = attr("features.6.branch3.0", "count_include_pad").unwrap();
    assert_eq!(pad.i, Some(0));
    // A 1x7 conv pads left and right only: ONNX order [top, left, bottom, right].
    let pads = attr("features.4.branch1.1.conv", "pads").unwrap();
    assert_eq!(pads.ints, [0, 3, 0, 3]);
    let w = graph
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some("features.4.branch1.1.conv.weight"))
        .unwrap();
    assert_eq!(w.dims, [64, 64, 1, 7]); // OIHW
}
