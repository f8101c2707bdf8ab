//! The training loop end to end on the CPU: bit-exact resume, NaN handling, the demo preset and
//! config files, evaluation and prediction through the command line.

use inception_engine::backend::Device;
use inception_engine::checkpoint::Checkpoint;
use inception_engine::cli::train::{config_from, expand_config, Args};
use inception_engine::data::AugmentConfig;
use inception_engine::train::trainer::{train, TrainConfig};
use inception_engine::train::{LossScaler, RmsPropConfig};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A small ImageFolder of real images: the first `per_class` bundled training images of 4 classes.
fn small_folder(dir: &Path, per_class: usize) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-mini/train");
    let root = dir.join("small");
    let mut classes: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    classes.sort();
    for class in classes.iter().take(4) {
        let dst = root.join(class.file_name().unwrap());
        std::fs::create_dir_all(&dst).unwrap();
        let mut files: Vec<_> = std::fs::read_dir(class)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(per_class) {
            std::fs::copy(f, dst.join(f.file_name().unwrap())).unwrap();
        }
    }
    root
}

fn tiny_config(data: PathBuf, out: PathBuf, epochs: usize) -> TrainConfig {
    TrainConfig {
        plan: "tiny".into(),
        data,
        eval_data: None,
        out,
        epochs,
        batch_size: 8,
        image_size: 32,
        device: Device::Cpu,
        amp: None,
        seed: 5,
        workers: 2,
        lr_init: 1e-3,
        lr_max: 0.05,
        lr_end: 1e-4,
        warmup_epochs: 1,
        rmsprop: RmsPropConfig::default(),
        label_smoothing: 0.1,
        dropout: 0.2,
        loss_scaler: Some(LossScaler::None),
        augment: AugmentConfig {
            scale: (0.5, 1.0),
            ..Default::default()
        },
        save_every_epochs: 1,
        keep_max: 0,
        eval_every_epochs: 1,
        log_every: 1,
        resume: None,
    }
}

#[test]
fn resume_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), 6);
    let straight = train(&tiny_config(data.clone(), dir.path().join("straight"), 2)).unwrap();
    let first = train(&tiny_config(data.clone(), dir.path().join("split"), 1)).unwrap();
    let mut resumed_cfg = tiny_config(data, dir.path().join("split"), 2);
    resumed_cfg.resume = first.last_checkpoint.clone();
    let resumed = train(&resumed_cfg).unwrap();
    assert_eq!(straight.steps, resumed.steps);
    let a = Checkpoint::load(straight.last_checkpoint.unwrap()).unwrap();
    let b = Checkpoint::load(resumed.last_checkpoint.unwrap()).unwrap();
    assert_eq!(a.meta.step, b.meta.step);
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let u = &b.tensors[name];
        let same = t
            .data
            .iter()
            .zip(&u.data)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name} differs after resume");
    }
    // And training really changed the weights.
    let init = Checkpoint::load(first.last_checkpoint.unwrap()).unwrap();
    assert_ne!(
        init.tensors["last_linear.weight"].data,
        a.tensors["last_linear.weight"].data
    );
}

#[test]
fn a_diverging_fp32_run_stops_with_the_step_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), 4);
    let mut cfg = tiny_config(data, dir.path().join("out"), 3);
    cfg.lr_init = 1e30;
    cfg.lr_max = 1e30;
    cfg.lr_end = 1e30;
    let err = format!("{:#}", train(&cfg).unwrap_err());
    assert!(
        err.contains("the loss became") && err.contains("at step"),
        "{err}"
    );
}

#[test]
fn resuming_needs_a_compatible_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), 4);
    let first = train(&tiny_config(data.clone(), dir.path().join("a"), 1)).unwrap();
    let mut cfg = tiny_config(data, dir.path().join("b"), 2);
    cfg.plan = "v4".into();
    cfg.image_size = 75;
    cfg.resume = first.last_checkpoint;
    let err = format!("{:#}", train(&cfg).unwrap_err());
    assert!(err.contains("cannot resume"), "{err}");
}

#[test]
fn demo_preset_uses_the_bundled_data() {
    let args = parse(&["inception-engine", "train", "--plan", "v4"]);
    let cfg = config_from(&args).unwrap();
    assert!(cfg.data.ends_with("fashion-mnist-mini/train"));
    assert!(cfg.eval_data.unwrap().ends_with("fashion-mnist-mini/val"));
    assert_eq!(cfg.image_size, 75);
    assert!(cfg.lr_max < 0.4 * 16.0 / 1024.0);
}

#[test]
fn config_file_flags_are_overridden_by_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run.toml");
    std::fs::write(
        &path,
        "epochs = 7\nbatch_size = 4\nlr_max = 0.01\ndecay_all = true\nloss-scale = \"dynamic\"\n",
    )
    .unwrap();
    let argv: Vec<String> = [
        "inception-engine",
        "train",
        "--data",
        "x",
        "--config",
        path.to_str().unwrap(),
        "--epochs",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args = parse_owned(expand_config(argv).unwrap());
    let cfg = config_from(&args).unwrap();
    assert_eq!(cfg.epochs, 2);
    assert_eq!(cfg.batch_size, 4);
    assert_eq!(cfg.lr_max, 0.01);
    assert!(cfg.rmsprop.decay_all);
    assert!(matches!(cfg.loss_scaler, Some(LossScaler::Dynamic { .. })));
    std::fs::write(&path, "epochs = [1, 2]\n").unwrap();
    let argv: Vec<String> = [
        "inception-engine",
        "train",
        "--config",
        path.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert!(expand_config(argv).is_err());
}

fn parse(argv: &[&str]) -> Args {
    parse_owned(argv.iter().map(|s| s.to_string()).collect())
}

fn parse_owned(argv: Vec<String>) -> Args {
    use clap::FromArgMatches;
    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }
    #[derive(clap::Subcommand)]
    enum Cmd {
        Train(Args),
    }
    let m = <Cli as clap::CommandFactory>::command().get_matches_from(argv);
    match Cli::from_arg_matches(&m).unwrap().cmd {
        Cmd::Train(a) => a,
    }
}

#[test]
fn train_eval_and_predict_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), 4);
    let out = dir.path().join("run");
    let bin = env!("CARGO_BIN_EXE_inception-engine");
    let status = Command::new(bin)
        .args([
            "train",
            "--plan",
            "tiny",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--epochs",
            "1",
            "--device",
            "cpu",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--eval-data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert!(log.contains("epoch: 1 step: 2, loss is "), "{log}");
    assert!(
        log.contains("Epoch time: ") && log.contains("per step time: "),
        "{log}"
    );
    assert!(std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
    let ckpt = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .unwrap();
    let eval = Command::new(bin)
        .args(["eval", "--json", "--batch-size", "5"])
        .arg("--data")
        .arg(&data)
        .arg("--checkpoint")
        .arg(&ckpt)
        .output()
        .unwrap();
    assert!(
        eval.status.success(),
        "{}",
        String::from_utf8_lossy(&eval.stderr)
    );
    let stdout = String::from_utf8(eval.stdout).unwrap();
    assert!(stdout.starts_with("metric: {'Loss': "), "{stdout}");
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        v["images"], 16,
        "every image, the short last batch included"
    );
    let image = std::fs::read_dir(data.join("1-trouser"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let pred = Command::new(bin)
        .args(["predict", "--json", "--top", "2"])
        .arg("--checkpoint")
        .arg(&ckpt)
        .arg(&image)
        .output()
        .unwrap();
    assert!(
        pred.status.success(),
        "{}",
        String::from_utf8_lossy(&pred.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8(pred.stdout).unwrap().trim()).unwrap();
    assert_eq!(v["logits"].as_array().unwrap().len(), 4);
    assert_eq!(v["top"].as_array().unwrap().len(), 2);
    let p: f64 = v["top"][0]["probability"].as_f64().unwrap();
    assert!(p > 0.0 && p <= 1.0);
    let bad = Command::new(bin)
        .args(["eval", "--data"])
        .arg(&data)
        .arg("--checkpoint")
        .arg(dir.path().join("missing.safetensors"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("missing.safetensors"));
}

/// Real JPEGs of mixed sizes (baseline and progressive, colour and grey) and PNGs, plus a corrupt
/// file: v4 trains on them at its smallest size and a larger one.
#[test]
fn v4_trains_on_mixed_jpegs_at_any_size_from_75() {
    use image::codecs::jpeg::JpegEncoder;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("mixed");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for (c, class) in ["a", "b"].iter().enumerate() {
        let d = root.join(class);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(fixtures.join("data_progressive.jpg"), d.join("prog.jpg")).unwrap();
        std::fs::copy(
            fixtures.join("data_progressive_grey.jpg"),
            d.join("prog_grey.jpg"),
        )
        .unwrap();
        for (i, (w, h)) in [(31u32, 200u32), (500, 120), (90, 90)].iter().enumerate() {
            let img = image::RgbImage::from_fn(*w, *h, |x, y| {
                image::Rgb([(x * 7 + c as u32 * 50) as u8, (y * 3) as u8, (i * 80) as u8])
            });
            let mut bytes = Vec::new();
            JpegEncoder::new_with_quality(&mut bytes, 85)
                .encode_image(&img)
                .unwrap();
            std::fs::write(d.join(format!("base{i}.jpg")), bytes).unwrap();
            img.save(d.join(format!("png{i}.png"))).unwrap();
        }
        std::fs::write(d.join("broken.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    }
    for size in [75, 83] {
        let mut cfg = tiny_config(root.clone(), dir.path().join(format!("out{size}")), 1);
        cfg.plan = "v4".into();
        cfg.image_size = size;
        cfg.batch_size = 4;
        let summary = train(&cfg).unwrap();
        assert_eq!(
            summary.steps, 4,
            "18 files, 2 of them unreadable, still make 4 full batches of 4"
        );
        assert!(summary.epoch_losses[0].is_finite());
    }
}
