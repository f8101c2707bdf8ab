//! The training loop end to end on the CPU: bit-exact resume, NaN handling, the demo preset and
//! config files, evaluation and prediction through the command line.

use inception_engine::backend::Device;
use inception_engine::checkpoint::Checkpoint;
use inception_engine::cli::train::{config_from, expand_config, Args};
use inception_engine::data::AugmentConfig;
use inception_engine::optim::{LossScaler, RmsPropConfig};
use inception_engine::train::trainer::{train, TrainConfig};
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
        save_every_steps: 0,
        keep_max: 0,
        eval_every_epochs: 1,
        log_every: 1,
        resume: None,
        grad_sync: Default::default(),
        bucket_mib: 25.0,
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

/// Every tensor of two checkpoints, bit for bit.
fn assert_same_weights(a: &Path, b: &Path) {
    let (a, b) = (Checkpoint::load(a).unwrap(), Checkpoint::load(b).unwrap());
    assert_eq!(a.meta.step, b.meta.step);
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let same = t
            .data
            .iter()
            .zip(&b.tensors[name].data)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{name} differs");
    }
}

/// Checkpoint file names in a folder, sorted.
fn checkpoints(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    names
}

/// The step of the last `start` line of a run's metrics: where its last attempt began.
fn last_start_step(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|v| v["event"] == "start")
        .unwrap()["step"]
        .as_u64()
        .unwrap()
}

/// 25 files of which one is unreadable: batches of 8 then do not start at multiples of 8 in
/// the shuffled order, so a resume must restore the stream position, not just count batches.
fn folder_with_a_bad_file(dir: &Path) -> PathBuf {
    let data = small_folder(dir, 6);
    std::fs::write(data.join("1-trouser/broken.png"), b"\x89PNG not really").unwrap();
    data
}

#[test]
fn mid_epoch_resume_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = folder_with_a_bad_file(dir.path());
    // 25 files, batch 8: 3 steps per epoch.
    let straight = train(&tiny_config(data.clone(), dir.path().join("straight"), 3)).unwrap();
    assert_eq!(straight.steps, 9);
    let mut saving = tiny_config(data.clone(), dir.path().join("saving"), 3);
    saving.save_every_steps = 2;
    let saved = train(&saving).unwrap();
    assert_same_weights(
        straight.last_checkpoint.as_ref().unwrap(),
        saved.last_checkpoint.as_ref().unwrap(),
    );
    // Saves at steps 2, 4, 6, 8 (mid-epoch) and at the end of each epoch (3, 6, 9); step 6 is
    // both, saved once after the epoch.
    assert_eq!(
        checkpoints(&dir.path().join("saving")),
        [
            "inception-e0-s2.safetensors",
            "inception-e1-s3.safetensors",
            "inception-e1-s4.safetensors",
            "inception-e2-s6.safetensors",
            "inception-e2-s8.safetensors",
            "inception-e3-s9.safetensors",
        ]
    );
    // Resume from each mid-epoch checkpoint alone in a fresh folder, with another worker count.
    for (name, epoch_of_it) in [
        ("inception-e0-s2.safetensors", 0),
        ("inception-e1-s4.safetensors", 1),
        ("inception-e2-s8.safetensors", 2),
    ] {
        let out = dir.path().join(format!("resumed-{name}"));
        std::fs::create_dir_all(&out).unwrap();
        std::fs::copy(dir.path().join("saving").join(name), out.join(name)).unwrap();
        let mut cfg = tiny_config(data.clone(), out.clone(), 3);
        cfg.workers = 3;
        cfg.resume = Some(out.join(name));
        let resumed = train(&cfg).unwrap();
        assert_eq!(resumed.steps, 9, "{name}");
        assert_same_weights(
            straight.last_checkpoint.as_ref().unwrap(),
            resumed.last_checkpoint.as_ref().unwrap(),
        );
        // The interrupted epoch's mean loss covers all of its steps, as in the straight run.
        assert_eq!(
            resumed.epoch_losses[0].to_bits(),
            straight.epoch_losses[epoch_of_it].to_bits(),
            "{name}"
        );
    }
}

#[test]
fn mid_epoch_checkpoints_count_against_keep_max() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), 6);
    let mut cfg = tiny_config(data, dir.path().join("out"), 2);
    cfg.save_every_steps = 1;
    cfg.keep_max = 2;
    train(&cfg).unwrap();
    assert_eq!(
        checkpoints(&dir.path().join("out")),
        ["inception-e1-s5.safetensors", "inception-e2-s6.safetensors"]
    );
}

#[test]
fn resume_auto_starts_fresh_in_an_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), 4);
    let plain = train(&tiny_config(data.clone(), dir.path().join("plain"), 1)).unwrap();
    let mut cfg = tiny_config(data, dir.path().join("auto"), 1);
    cfg.resume = Some(PathBuf::from("auto"));
    let auto = train(&cfg).unwrap();
    assert_eq!(auto.steps, plain.steps);
    assert_eq!(last_start_step(&dir.path().join("auto")), 0);
    assert_same_weights(
        plain.last_checkpoint.as_ref().unwrap(),
        auto.last_checkpoint.as_ref().unwrap(),
    );
}

#[test]
fn resume_auto_takes_the_newest_valid_checkpoint_and_skips_a_truncated_one() {
    let dir = tempfile::tempdir().unwrap();
    let data = folder_with_a_bad_file(dir.path());
    let straight = train(&tiny_config(data.clone(), dir.path().join("straight"), 3)).unwrap();
    let out = dir.path().join("run");
    // A run "preempted" after step 8: 2 epochs and 2 steps of 3 epochs, saved every 2 steps.
    let mut first = tiny_config(data.clone(), out.clone(), 3);
    first.save_every_steps = 2;
    train(&first).unwrap();
    std::fs::remove_file(out.join("inception-e3-s9.safetensors")).unwrap();
    let mut again = first.clone();
    again.resume = Some(PathBuf::from("auto"));
    let resumed = train(&again).unwrap();
    assert_eq!(last_start_step(&out), 8, "the newest checkpoint is step 8");
    assert_same_weights(
        straight.last_checkpoint.as_ref().unwrap(),
        resumed.last_checkpoint.as_ref().unwrap(),
    );
    // Now the newest (step 9) is cut short and step 8's is gone: auto falls back to step 6.
    let newest = out.join("inception-e3-s9.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(out.join("inception-e2-s8.safetensors")).unwrap();
    let resumed = train(&again).unwrap();
    assert_eq!(
        last_start_step(&out),
        6,
        "the truncated step-9 file is skipped"
    );
    assert_eq!(resumed.steps, 9);
    assert_same_weights(
        straight.last_checkpoint.as_ref().unwrap(),
        resumed.last_checkpoint.as_ref().unwrap(),
    );
    // The metrics read back as one run: each epoch once, in order.
    let summary = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let epochs: Vec<&str> = summary
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap())
        .collect();
    assert_eq!(epochs, ["1", "2", "3"], "{summary}");
    // A finished run restarted with the same command line has nothing to do.
    let done = train(&again).unwrap();
    assert!(done.epoch_losses.is_empty());
    assert_eq!(done.steps, 9);
}

fn run_cli(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_inception-engine"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

#[test]
fn train_draws_curves_and_summary_csv_plot_draws_several_runs_eval_takes_size_and_crop() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), 4);
    let runs = [dir.path().join("a"), dir.path().join("b")];
    for (run, epochs) in runs.iter().zip(["2", "3"]) {
        let args = [
            os("train"),
            os("--plan"),
            os("tiny"),
            os("--image-size"),
            os("32"),
            os("--batch-size"),
            os("8"),
            os("--epochs"),
            os(epochs),
            os("--device"),
            os("cpu"),
            os("--log-every"),
            os("1"),
            os("--data"),
            data.as_os_str(),
            os("--eval-data"),
            data.as_os_str(),
            os("--out"),
            run.as_os_str(),
        ];
        run_cli(&args);
        let csv = std::fs::read_to_string(run.join("summary.csv")).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(
            lines[0],
            "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr"
        );
        let rows = &lines[1..];
        assert_eq!(rows.len().to_string(), epochs, "{csv}");
        for (i, row) in rows.iter().enumerate() {
            let cells: Vec<&str> = row.split(',').collect();
            assert_eq!(cells.len(), 6, "{row}");
            assert_eq!(cells[0], (i + 1).to_string());
            for c in &cells[1..] {
                let v: f64 = c.parse().unwrap_or_else(|_| panic!("{row}"));
                assert!(v.is_finite() && v >= 0.0, "{row}");
            }
            let top1: f64 = cells[3].parse().unwrap();
            assert!(top1 <= 100.0, "top-1 in percent: {row}");
        }
        let png = image::open(run.join("curves.png")).unwrap();
        assert_eq!((png.width(), png.height()), (1500, 900));
        let svg = std::fs::read_to_string(run.join("curves.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("Loss"),
            "{}",
            &svg[..200]
        );
    }
    // Both runs on one picture: each run's colour appears.
    let both = dir.path().join("both.png");
    let args = [
        os("plot"),
        runs[0].as_os_str(),
        runs[1].as_os_str(),
        os("--out"),
        both.as_os_str(),
    ];
    run_cli(&args);
    let img = image::open(&both).unwrap().to_rgb8();
    let count = |rgb: [u8; 3]| img.pixels().filter(|p| p.0 == rgb).count();
    assert!(count([31, 119, 180]) > 500, "first run's blue");
    assert!(count([255, 127, 14]) > 500, "second run's orange");
    let one = image::open(runs[0].join("curves.png")).unwrap().to_rgb8();
    assert_eq!(
        one.pixels().filter(|p| p.0 == [255, 127, 14]).count(),
        0,
        "a single run has no second colour"
    );

    // Evaluation at another size and crop than the checkpoint's (trained at 32).
    let ckpt = runs[0].join("inception-e2-s4.safetensors");
    let args = [
        os("eval"),
        os("--json"),
        os("--image-size"),
        os("40"),
        os("--crop-pct"),
        os("0.875"),
        os("--data"),
        data.as_os_str(),
        os("--checkpoint"),
        ckpt.as_os_str(),
    ];
    let stdout = run_cli(&args);
    assert!(
        stdout.contains(
            "image size 40, crop_pct 0.875 (shorter side resized to 45, centre crop 40x40; trained at 32)"
        ),
        "{stdout}"
    );
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(
        (v["image_size"].as_u64(), v["crop_pct"].as_f64()),
        (Some(40), Some(0.875))
    );
    assert_eq!(v["images"], 16);
    let default = run_cli(&[
        os("eval"),
        os("--json"),
        os("--data"),
        data.as_os_str(),
        os("--checkpoint"),
        ckpt.as_os_str(),
    ]);
    let d: serde_json::Value = serde_json::from_str(default.lines().last().unwrap()).unwrap();
    assert_eq!(
        (d["image_size"].as_u64(), d["crop_pct"].as_f64()),
        (Some(32), Some(1.0))
    );
    assert_ne!(d["loss"], v["loss"], "another input gives another loss");
    let image = std::fs::read_dir(data.join("1-trouser"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let pred = run_cli(&[
        os("predict"),
        os("--json"),
        os("--image-size"),
        os("48"),
        os("--crop-pct"),
        os("0.9"),
        os("--checkpoint"),
        ckpt.as_os_str(),
        image.as_os_str(),
    ]);
    let p: serde_json::Value = serde_json::from_str(pred.trim()).unwrap();
    assert_eq!(
        (p["image_size"].as_u64(), p["crop_pct"].as_f64()),
        (Some(48), Some(0.9))
    );
    let bad = Command::new(env!("CARGO_BIN_EXE_inception-engine"))
        .args([os("eval"), os("--crop-pct"), os("1.5"), os("--data")])
        .arg(&data)
        .arg("--checkpoint")
        .arg(&ckpt)
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--crop-pct"));
}
