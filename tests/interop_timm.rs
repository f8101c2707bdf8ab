//! timm state dicts: export then import round-trips every tensor bit-exactly, and bad files give
//! errors that list every problem.

#[path = "interop_util.rs"]
mod util;

use inception_engine::checkpoint::Checkpoint;
use inception_engine::export::timm::{self, ImportOptions};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::path::Path;
use util::*;

/// An owned copy of a safetensors file's tensors, to edit and write back.
type Owned = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;

fn read_owned(bytes: &[u8]) -> Owned {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut out: Owned = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn serialize(tensors: &Owned) -> Vec<u8> {
    let views = tensors
        .iter()
        .map(|(n, d, s, b)| (n.as_str(), TensorView::new(*d, s.clone(), b).unwrap()));
    safetensors::serialize(views, None).unwrap()
}

/// A timm state dict of perturbed seeded weights, written through the CLI; returns its path and
/// the checkpoint it came from.
fn exported(dir: &Path) -> (std::path::PathBuf, Checkpoint) {
    let plan = v4_plan(1);
    let ckpt = checkpoint(&plan, &perturbed_model(&plan, 3));
    let (ck, st) = (dir.join("ck.safetensors"), dir.join("timm.safetensors"));
    ckpt.save(&ck).unwrap();
    engine(
        &["export", "--checkpoint", path(&ck), "--format", "timm"]
            .into_iter()
            .chain(["--out", path(&st)])
            .collect::<Vec<_>>(),
    );
    (st, ckpt)
}

fn opts() -> ImportOptions {
    ImportOptions {
        image_size: SIZE,
        ..ImportOptions::default()
    }
}

fn import_err(bytes: &[u8], opts: &ImportOptions) -> String {
    format!("{:#}", timm::import(bytes, opts).unwrap_err())
}

#[test]
fn export_then_import_round_trips_every_tensor_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let (st, original) = exported(dir.path());
    let back = dir.path().join("back.safetensors");
    let size = SIZE.to_string();
    engine(
        &["import", "--from", "timm", path(&st), "--out", path(&back)]
            .into_iter()
            .chain(["--image-size", &size])
            .collect::<Vec<_>>(),
    );
    let back = Checkpoint::load(&back).unwrap();
    assert_eq!(back.tensors.len(), original.tensors.len());
    for (name, t) in &original.tensors {
        let b = &back.tensors[name];
        assert_eq!(b.shape, t.shape, "{name}");
        let bits = |d: &[f32]| d.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert!(bits(&b.data) == bits(&t.data), "{name} differs");
    }
    assert_eq!(back.meta.plan_config, original.meta.plan_config);
}

#[test]
fn exported_file_has_timm_layout_and_batch_counters() {
    let dir = tempfile::tempdir().unwrap();
    let (st, original) = exported(dir.path());
    let bytes = std::fs::read(&st).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let conv = file.tensor("features.3.conv.conv.weight").unwrap();
    assert_eq!(conv.shape(), [96, 64, 3, 3]); // OIHW
    let w = &original.tensors["features.4.branch1.1.conv.weight"];
    assert_eq!(w.shape, [64, 1, 7, 64]); // engine [cout, kh, kw, cin] of a 1x7
    let oihw = file.tensor("features.4.branch1.1.conv.weight").unwrap();
    assert_eq!(oihw.shape(), [64, 64, 1, 7]);
    let counters: Vec<_> = file
        .tensors()
        .into_iter()
        .filter(|(n, _)| n.ends_with(".num_batches_tracked"))
        .collect();
    assert_eq!(counters.len(), 149, "one per BatchNorm");
    assert!(counters
        .iter()
        .all(|(_, v)| v.dtype() == Dtype::I64 && v.shape().is_empty()));
    let expected = original.tensors.len() + 149;
    assert_eq!(file.len(), expected);
}

#[test]
fn missing_and_misshaped_tensors_are_all_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = exported(dir.path());
    let mut t = read_owned(&std::fs::read(st).unwrap());
    let gone = [
        "features.0.bn.running_var",
        "features.21.branch3.1.conv.weight",
    ];
    t.retain(|e| !gone.contains(&e.0.as_str()));
    let bad = t
        .iter_mut()
        .find(|e| e.0 == "features.5.conv.bn.bias")
        .unwrap();
    bad.2 = vec![96, 2]; // same byte count, wrong shape
    t.push(("aux.weight".into(), Dtype::F32, vec![1], vec![0; 4]));
    let err = import_err(&serialize(&t), &opts());
    for needle in [
        "missing tensor features.0.bn.running_var",
        "missing tensor features.21.branch3.1.conv.weight",
        "features.5.conv.bn.bias: shape [96, 2]",
        "unexpected tensor aux.weight",
        "4 problems",
    ] {
        assert!(err.contains(needle), "'{needle}' not in: {err}");
    }
}

#[test]
fn class_count_change_needs_reset_and_keeps_the_backbone() {
    let dir = tempfile::tempdir().unwrap();
    let (st, original) = exported(dir.path());
    let bytes = std::fs::read(st).unwrap();
    let five = ImportOptions {
        num_classes: Some(5),
        ..opts()
    };
    let err = import_err(&bytes, &five);
    assert!(err.contains("--reset-classifier"), "{err}");
    assert!(err.contains("10 classes"), "{err}");
    let reset = ImportOptions {
        reset_classifier: true,
        ..five
    };
    let (plan, model) = timm::import(&bytes, &reset).unwrap();
    assert_eq!(plan.config.num_classes, 5);
    assert_eq!(model.param("last_linear.weight").unwrap().len(), 5 * 1536);
    let backbone = "features.21.branch2_3b.conv.weight";
    assert_eq!(
        model.param(backbone).unwrap(),
        &original.tensors[backbone].data[..]
    );
}

#[test]
fn half_precision_files_are_widened() {
    let dir = tempfile::tempdir().unwrap();
    let (st, original) = exported(dir.path());
    let mut t = read_owned(&std::fs::read(st).unwrap());
    let target = "features.7.branch0.bn.weight";
    let e = t.iter_mut().find(|e| e.0 == target).unwrap();
    let f32s: Vec<f32> =
        e.3.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
    e.1 = Dtype::BF16;
    e.3 = f32s
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let (_, model) = timm::import(&serialize(&t), &opts()).unwrap();
    let want: Vec<f32> = original.tensors[target]
        .data
        .iter()
        .map(|v| half::bf16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(model.param(target).unwrap(), &want[..]);
}

#[test]
fn a_class_count_mismatch_on_the_command_line_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = exported(dir.path());
    let out = dir.path().join("x.safetensors");
    let res = engine_output(&[
        "import",
        "--from",
        "timm",
        path(&st),
        "--out",
        path(&out),
        "--num-classes",
        "3",
    ]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    assert!(err.contains("--reset-classifier"), "{err}");
    assert!(!out.exists());
}

#[test]
fn import_records_the_normalisation_and_predict_applies_it() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = exported(dir.path());
    let size = SIZE.to_string();
    let import = |norm: &str, out: &Path| {
        engine(
            &["import", "--from", "timm", path(&st), "--out", path(out)]
                .into_iter()
                .chain(["--image-size", &size, "--normalization", norm])
                .collect::<Vec<_>>(),
        );
        Checkpoint::load(out).unwrap()
    };
    let (imagenet, inception) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let a = import("imagenet", &imagenet);
    let b = import("inception", &inception);
    assert_eq!(a.meta.preprocessing.mean, inception_engine::data::MEAN);
    assert_eq!(b.meta.preprocessing.mean, [0.5; 3]);
    assert_eq!(b.meta.preprocessing.std, [0.5; 3]);
    // Same weights, different input scaling: predict must read the checkpoint's normalisation.
    let val = inception_engine::data::bundled_dataset()
        .unwrap()
        .join("val");
    let img = std::fs::read_dir(val)
        .unwrap()
        .flat_map(|class| std::fs::read_dir(class.unwrap().path()).unwrap())
        .map(|f| f.unwrap().path())
        .next()
        .unwrap();
    let predict = |ck: &Path| {
        let args = [
            "predict",
            "--checkpoint",
            path(ck),
            "--device",
            "cpu",
            "--json",
            path(&img),
        ];
        engine(&args)
    };
    assert_ne!(predict(&imagenet), predict(&inception));
}
