//! Checkpoint files: round trip, atomic save, rotation, and every bad-file case as an error.

use inception_engine::checkpoint::{self, Checkpoint, CheckpointMeta, Preprocessing, RngState};
use inception_engine::optim::{LossScaler, RmsProp, RmsPropConfig};
use inception_engine::params::ModelState;
use inception_engine::plan::{self, Plan, PlanConfig};
use std::path::{Path, PathBuf};

fn tiny(classes: usize) -> Plan {
    plan::build(
        "tiny",
        PlanConfig {
            batch: 1,
            num_classes: classes,
            ..Default::default()
        },
    )
    .unwrap()
}

fn meta(plan: &Plan) -> CheckpointMeta {
    let classes = (0..plan.config.num_classes)
        .map(|i| format!("class \"{i}\""))
        .collect();
    let pre = Preprocessing {
        image_size: 299,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
        resize: "shorter-side 0.875 crop".into(),
    };
    let mut m = CheckpointMeta::new(plan, classes, pre);
    m.step = 1234;
    m.epoch = 3;
    m.loss_scaler = LossScaler::Dynamic {
        scale: 8192.0,
        growth_interval: 2000,
        clean_steps: 17,
    };
    m.rng = RngState {
        seed: 99,
        epoch: 3,
        step: 1234,
        extra: [("loader".to_string(), "5".to_string())].into(),
    };
    m.extra.insert("command".into(), "train --plan tiny".into());
    m
}

/// A model and optimizer after one step, so every buffer holds non-trivial values.
fn trained(plan: &Plan) -> (ModelState, RmsProp) {
    let mut model = ModelState::init(plan, 5);
    let mut opt = RmsProp::new(RmsPropConfig::default(), &model.layout);
    let grads: Vec<f32> = (0..model.params.len())
        .map(|i| ((i % 13) as f32 - 6.0) * 0.1)
        .collect();
    opt.step(&mut model.params, &grads, 0.01, 1.0);
    for (i, s) in model.states.iter_mut().enumerate() {
        *s += i as f32 * 0.001;
    }
    (model, opt)
}

fn saved(dir: &Path, name: &str) -> (PathBuf, Checkpoint, ModelState, RmsProp) {
    let plan = tiny(10);
    let (model, opt) = trained(&plan);
    let ck = Checkpoint::from_state(&model, Some(&opt), meta(&plan));
    let path = dir.join(name);
    ck.save(&path).unwrap();
    (path, ck, model, opt)
}

fn err_of(path: &Path) -> String {
    format!("{:#}", Checkpoint::load(path).expect_err("load must fail"))
}

#[test]
fn round_trip_restores_every_tensor_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let (path, ck, model, opt) = saved(dir.path(), "a.safetensors");
    let back = Checkpoint::load(&path).unwrap();
    assert_eq!(back.meta, ck.meta);
    assert_eq!(back.tensors, ck.tensors);
    back.check_compatible(&tiny(10)).unwrap();

    let mut model2 = ModelState::zeros(&tiny(10));
    let mut opt2 = RmsProp::new(RmsPropConfig::default(), &model2.layout);
    back.apply_to(&mut model2, Some(&mut opt2)).unwrap();
    assert_eq!(model2, model);
    assert_eq!(opt2, opt);

    // Readable by any safetensors reader, under the plan's names.
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let w = st.tensor("last_linear.weight").unwrap();
    let raw: Vec<f32> = w
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(raw, model.param("last_linear.weight").unwrap());
    assert!(st.tensor("optim.ms.stem.0.conv.weight").is_ok());
    assert!(st.tensor("optim.mom.last_linear.bias").is_ok());
    assert!(st.tensor("stem.0.bn.running_var").is_ok());
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let m = header.metadata().as_ref().unwrap();
    assert_eq!(m["step"], "1234");
    assert_eq!(m["plan"], "tiny");
    assert!(m["checksum"].starts_with("sha256:"));
}

#[test]
fn weights_only_checkpoint() {
    let plan = tiny(10);
    let (model, _) = trained(&plan);
    let ck = Checkpoint::from_state(&model, None, meta(&plan));
    assert!(!ck.has_optimizer());
    ck.check_compatible(&plan).unwrap();
    let mut m2 = ModelState::zeros(&plan);
    ck.apply_to(&mut m2, None).unwrap();
    assert_eq!(m2, model);
    let mut opt = RmsProp::new(RmsPropConfig::default(), &m2.layout);
    let e = format!("{:#}", ck.apply_to(&mut m2, Some(&mut opt)).unwrap_err());
    assert!(
        e.contains("missing tensor optim.ms.stem.0.conv.weight"),
        "{e}"
    );
}

#[test]
fn save_leaves_no_tmp_and_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let (path, mut ck, _, _) = saved(dir.path(), "a.safetensors");
    ck.meta.step = 5000;
    ck.save(&path).unwrap();
    assert_eq!(Checkpoint::load(&path).unwrap().meta.step, 5000);
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("a.safetensors")]);
}

#[test]
fn failed_save_keeps_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (path, ck, _, _) = saved(dir.path(), "a.safetensors");
    let before = std::fs::read(&path).unwrap();
    // A directory where the temporary file must go makes the save fail before the rename
    // (this works even as root, unlike a read-only directory).
    let tmp = dir.path().join("a.safetensors.tmp");
    std::fs::create_dir(&tmp).unwrap();
    let mut newer = ck.clone();
    newer.meta.step = 9999;
    let e = format!("{:#}", newer.save(&path).unwrap_err());
    assert!(e.contains("a.safetensors"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(Checkpoint::load(&path).unwrap().meta.step, 1234);
    // Saving into a directory that does not exist is an error too.
    assert!(ck.save(dir.path().join("nope/b.safetensors")).is_err());
}

#[test]
fn missing_file() {
    let e = err_of(Path::new("/definitely/not/here.safetensors"));
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn truncated_at_many_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _, _) = saved(dir.path(), "a.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let cut = dir.path().join("cut.safetensors");
    for len in [
        0,
        3,
        8,
        9,
        100,
        header_end - 1,
        header_end,
        header_end + 1,
        header_end + 4096,
        bytes.len() - 4,
        bytes.len() - 1,
    ] {
        std::fs::write(&cut, &bytes[..len]).unwrap();
        let e = err_of(&cut);
        assert!(e.contains("cut.safetensors"), "length {len}: {e}");
        assert!(
            e.contains("truncated") || e.contains("not a safetensors"),
            "length {len}: {e}"
        );
    }
}

#[test]
fn flipped_bytes_are_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _, _) = saved(dir.path(), "a.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let bad = dir.path().join("bad.safetensors");
    for at in [
        header_end,
        header_end + (bytes.len() - header_end) / 2,
        bytes.len() - 1,
    ] {
        let mut b = bytes.clone();
        b[at] ^= 0x10;
        std::fs::write(&bad, &b).unwrap();
        let e = err_of(&bad);
        assert!(e.contains("checksum mismatch"), "byte {at}: {e}");
    }
    // A changed metadata value keeps the header valid JSON, so only the checksum catches it.
    let text = String::from_utf8_lossy(&bytes[..header_end]).into_owned();
    let at = text.find("\"step\":\"1234\"").expect("step in header") + "\"step\":\"".len();
    let mut b = bytes.clone();
    b[at] = b'9';
    std::fs::write(&bad, &b).unwrap();
    assert!(err_of(&bad).contains("checksum mismatch"));
}

#[test]
fn not_a_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    std::fs::write(&p, "this is a text file, not a checkpoint at all\n").unwrap();
    assert!(
        err_of(&p).contains("not a safetensors file"),
        "{}",
        err_of(&p)
    );
    std::fs::write(&p, b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
    assert!(
        err_of(&p).contains("not a safetensors file"),
        "{}",
        err_of(&p)
    );
    // Valid safetensors, but not ours.
    let data = vec![0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
    let bytes = safetensors::serialize([("w", view)], None).unwrap();
    std::fs::write(&p, bytes).unwrap();
    assert!(
        err_of(&p).contains("not an inception-engine checkpoint"),
        "{}",
        err_of(&p)
    );
}

#[test]
fn wrong_format_version() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _, _) = saved(dir.path(), "a.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"]["format_version"] = "999".into();
    let mut h = serde_json::to_vec(&header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(&h);
    out.extend(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    let e = err_of(&path);
    assert!(e.contains("format version 999"), "{e}");
}

#[test]
fn mismatches_list_every_name() {
    let plan = tiny(10);
    let (model, opt) = trained(&plan);
    let ck = Checkpoint::from_state(&model, Some(&opt), meta(&plan));

    let e = format!("{:#}", ck.check_compatible(&tiny(5)).unwrap_err());
    for part in [
        "10 classes, expected 5",
        "10 class names",
        "last_linear.weight: checkpoint shape",
        "last_linear.bias",
        "optim.ms.last_linear.weight",
    ] {
        assert!(e.contains(part), "missing '{part}' in: {e}");
    }
    assert!(!e.contains("stem.0.conv.weight"), "{e}");

    let v4 = plan::build(
        "v4",
        PlanConfig {
            batch: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let e = format!("{:#}", ck.check_compatible(&v4).unwrap_err());
    for part in [
        "plan is 'tiny', expected 'v4'",
        "missing tensor features.0.conv.weight",
        "missing tensor features.21.branch3.1.bn.running_var",
        "unexpected tensor stem.0.conv.weight",
    ] {
        assert!(e.contains(part), "missing '{part}' in: {e}");
    }

    let mut gone = ck.clone();
    gone.tensors.remove("a.branch1.1.conv.weight");
    gone.tensors.remove("c.branch3.1.bn.running_mean");
    let e = format!("{:#}", gone.check_compatible(&plan).unwrap_err());
    assert!(e.contains("missing tensor a.branch1.1.conv.weight"), "{e}");
    assert!(
        e.contains("missing tensor c.branch3.1.bn.running_mean"),
        "{e}"
    );

    // apply_to refuses too, and leaves the model as it was.
    let mut target = ModelState::init(&plan, 1);
    let before = target.clone();
    assert!(gone.apply_to(&mut target, None).is_err());
    assert_eq!(target, before);
}

#[test]
fn rotate_keeps_the_newest_by_step() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (e, s) in [(1, 5), (2, 10), (10, 100), (4, 20)] {
        std::fs::write(d.join(checkpoint::file_name("inception-v4", e, s)), b"x").unwrap();
    }
    std::fs::write(d.join("other-e1-s1.safetensors"), b"x").unwrap();
    std::fs::write(d.join("inception-v4-e1-sX.safetensors"), b"x").unwrap();
    // A save cut off by a crash leaves a .tmp, which is no checkpoint.
    std::fs::write(d.join("inception-v4-e11-s200.safetensors.tmp"), b"x").unwrap();
    let listed: Vec<(u64, u64)> = checkpoint::list(d, "inception-v4")
        .unwrap()
        .into_iter()
        .map(|(s, e, _)| (s, e))
        .collect();
    assert_eq!(
        listed,
        [(5, 1), (10, 2), (20, 4), (100, 10)],
        "oldest first, by step"
    );
    std::fs::remove_file(d.join("inception-v4-e11-s200.safetensors.tmp")).unwrap();
    assert!(checkpoint::rotate(d, "inception-v4", 0).unwrap().is_empty());
    let mut deleted = checkpoint::rotate(d, "inception-v4", 2).unwrap();
    deleted.sort();
    assert_eq!(
        deleted,
        vec![
            d.join("inception-v4-e1-s5.safetensors"),
            d.join("inception-v4-e2-s10.safetensors")
        ]
    );
    let mut left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "inception-v4-e1-sX.safetensors",
            "inception-v4-e10-s100.safetensors",
            "inception-v4-e4-s20.safetensors",
            "other-e1-s1.safetensors"
        ]
    );
    assert_eq!(
        checkpoint::parse_file_name("inception-v4", "inception-v4-e10-s100.safetensors"),
        Some((10, 100))
    );
}
