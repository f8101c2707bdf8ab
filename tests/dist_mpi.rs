//! Distributed data-parallel training on the CPU: the built binary under
//! `mpirun --allow-run-as-root --oversubscribe -n 2`, on the tiny plan and a few bundled images.
//!
//! Needs the binary built with `--features mpi` and Open MPI's `mpirun`: without them the group is
//! skipped with a note, and fails under tools/test.sh (`INCEPTION_REQUIRE_ALL=1`), which installs
//! Open MPI and builds with the feature. One test runs the two ranks on the emulated GPU (emu/)
//! over the CUDA trainer's host-staged all-reduce.

#[path = "common/emu_env.rs"]
mod emu_env;
#[path = "common/metrics.rs"]
mod metrics;

use metrics::step_losses;
#[path = "common/tool_groups.rs"]
mod tool_groups;

use inception_engine::backend::cpu::{CpuExecutor, Mode};
use inception_engine::checkpoint::Checkpoint;
use inception_engine::data::{AugmentConfig, Dataset, Loader, LoaderConfig};
use inception_engine::params::ModelState;
use inception_engine::plan::{self, PlanConfig};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_inception-engine");
const GROUP: &str = "distributed training (mpirun, --features mpi)";

/// Whether the group runs: the feature is built in and `mpirun` answers.
fn mpi_available() -> bool {
    let probe = if !cfg!(feature = "mpi") {
        Err("the test binary was built without `--features mpi`".to_string())
    } else {
        match Command::new("mpirun").arg("--version").output() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(format!("`mpirun --version` failed: {}", o.status)),
            Err(e) => Err(format!(
                "mpirun not found ({e}); Debian: apt-get install openmpi-bin"
            )),
        }
    };
    tool_groups::available(GROUP, probe)
}

/// `mpirun -n <ranks> inception-engine <args>` with `env`, killed after `limit`.
fn mpirun(
    ranks: usize,
    args: &[&str],
    env: &[(&str, &str)],
    limit: Duration,
) -> (Output, Duration) {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe", "-n"])
        .arg(ranks.to_string())
        // Containers often forbid the cross-process memory attach of the shared-memory transport.
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"]);
    for (k, v) in env {
        cmd.args(["-x", &format!("{k}={v}")]);
    }
    cmd.arg(BIN).args(args);
    run_bounded(cmd, limit)
}

fn run_bounded(mut cmd: Command, limit: Duration) -> (Output, Duration) {
    let start = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the command");
    // Read the pipes on threads so a chatty child cannot block on a full pipe.
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut v).ok();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > limit {
            child.kill().ok();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    (out, start.elapsed())
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The first `per_class` bundled training images of 4 classes.
fn small_folder(dir: &Path, name: &str, per_class: usize) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-mini/train");
    let root = dir.join(name);
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

/// Drops images until the folder holds `n`.
fn trim_to(root: &Path, n: usize) {
    let mut files: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .flat_map(|c| std::fs::read_dir(c.unwrap().path()).unwrap())
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in &files[n..] {
        std::fs::remove_file(f).unwrap();
    }
}

const BATCH: usize = 4;
const SIZE: usize = 32;
const SEED: u64 = 5;

/// `train` flags of the tiny run: batch 4 per rank, 32x32, fixed learning rate range.
fn train_args<'a>(data: &'a str, out: &'a str, epochs: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--plan",
        "tiny",
        "--device",
        "cpu",
        "--data",
        data,
        "--out",
        out,
        "--epochs",
        epochs,
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--seed",
        "5",
        "--lr-max",
        "0.05",
        "--lr-init",
        "1e-3",
        "--lr-end",
        "1e-4",
        "--crop-min",
        "0.5",
        "--loss-scale",
        "none",
        "--keep-max",
        "0",
        "--log-every",
        "1",
        "--workers",
        "1",
    ]
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    v.sort();
    v
}

/// Every tensor of two checkpoints, bit for bit (weights, BN statistics, optimizer state).
fn assert_same_state(a: &Path, b: &Path) {
    let (ca, cb) = (Checkpoint::load(a).unwrap(), Checkpoint::load(b).unwrap());
    assert_eq!(
        ca.meta.step,
        cb.meta.step,
        "{} vs {}",
        a.display(),
        b.display()
    );
    assert_eq!(
        ca.tensors.keys().collect::<Vec<_>>(),
        cb.tensors.keys().collect::<Vec<_>>()
    );
    assert!(ca.has_optimizer() && cb.has_optimizer());
    for (name, t) in &ca.tensors {
        let same = t
            .data
            .iter()
            .zip(&cb.tensors[name].data)
            .all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(
            same,
            "{name} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The first step's gradient of rank `rank`'s shard of 2, computed in this process the way a
/// rank computes it (same initial weights, same batch, the rank's dropout seeds, one thread).
fn shard_gradient(data: &Path, rank: usize) -> Vec<f32> {
    let set = Arc::new(Dataset::open(data).unwrap());
    let config = PlanConfig {
        batch: BATCH,
        image_size: SIZE,
        num_classes: set.classes().len(),
        dropout: 0.2,
        label_smoothing: 0.1,
        ..Default::default()
    };
    let mut plan = plan::build("tiny", config).unwrap();
    let mut model = ModelState::init(&plan, SEED);
    inception_engine::dist::mix_dropout_seeds(&mut plan, rank);
    let loader = Loader::new(
        set,
        LoaderConfig {
            workers: 1,
            rank,
            world_size: 2,
            augment: AugmentConfig {
                scale: (0.5, 1.0),
                ..Default::default()
            },
            ..LoaderConfig::train(BATCH, SIZE, SEED)
        },
    )
    .unwrap();
    let batch = loader.epoch(0).next().unwrap();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        let mut exec = CpuExecutor::new(plan);
        let mut grads = vec![0.0; model.params.len()];
        exec.forward(
            &model.params,
            &mut model.states,
            &batch.images,
            &batch.labels,
            Mode::Train,
            0,
        );
        exec.backward(&model.params, &mut grads, 1.0);
        grads
    })
}

#[test]
fn two_ranks_train_one_model_sum_gradients_exactly_and_write_one_set_of_files() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 24 images, 12 per rank, batch 4: 3 steps per epoch; the evaluation set is odd (11).
    let data = small_folder(dir.path(), "train", 6);
    let eval = small_folder(dir.path(), "eval", 3);
    trim_to(&eval, 11);
    let (out, dump) = (dir.path().join("out"), dir.path().join("dump"));
    let mut args = train_args(s(&data), s(&out), "2");
    args.extend(["--eval-data", s(&eval)]);
    let t = Instant::now();
    let (o, _) = mpirun(
        2,
        &args,
        &[("INCEPTION_DIST_DUMP", s(&dump))],
        Duration::from_secs(120),
    );
    assert!(o.status.success(), "{}", text(&o));
    eprintln!(
        "2-rank tiny run of 6 steps with 2 evaluations: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The same model everywhere: weights, BN statistics and optimizer state, bit for bit.
    assert_same_state(
        &dump.join("rank0.safetensors"),
        &dump.join("rank1.safetensors"),
    );

    // The reduced gradient is the sum of the two shards' gradients, bit for bit, and each
    // rank's own gradient is its shard's gradient computed in one process.
    let local: Vec<Vec<f32>> = (0..2)
        .map(|r| read_f32(&dump.join(format!("grads-local-rank{r}.f32"))))
        .collect();
    for (r, l) in local.iter().enumerate() {
        let here = shard_gradient(&data, r);
        assert!(
            l.iter().zip(&here).all(|(a, b)| a.to_bits() == b.to_bits()),
            "rank {r}'s gradient differs from its shard's gradient computed in one process"
        );
    }
    assert_ne!(local[0], local[1], "the shards should differ");
    for r in 0..2 {
        let reduced = read_f32(&dump.join(format!("grads-reduced-rank{r}.f32")));
        let exact = reduced
            .iter()
            .zip(local[0].iter().zip(&local[1]))
            .all(|(s, (a, b))| s.to_bits() == (a + b).to_bits());
        assert!(
            exact,
            "rank {r}'s reduced gradient is not the sum of the shards'"
        );
    }

    // One set of files: a checkpoint per epoch, one log line per epoch, one start record.
    let ckpts = checkpoints(&out);
    assert_eq!(ckpts.len(), 2, "{ckpts:?}");
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert_eq!(log.matches("epoch: 1 step: 3,").count(), 1, "{log}");
    assert_eq!(log.matches("epoch: 2 step: 3,").count(), 1, "{log}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.matches(r#""event":"start""#).count(),
        1,
        "{metrics}"
    );
    assert_eq!(metrics.matches(r#""event":"eval""#).count(), 2, "{metrics}");
    assert!(metrics.contains(r#""world_size":2"#), "{metrics}");
    // Rank 0 alone reports: one copy of each epoch line.
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(stderr.matches("epoch 1: mean loss").count(), 1, "{stderr}");

    // The evaluation of the final checkpoint sharded over two ranks (11 images: 6 and 5)
    // counts what one process counts.
    let ckpt = ckpts.last().unwrap();
    let eval_args = [
        "eval",
        "--json",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--data",
        s(&eval),
        "--checkpoint",
        s(ckpt),
    ];
    let (two, _) = mpirun(2, &eval_args, &[], Duration::from_secs(60));
    assert!(two.status.success(), "{}", text(&two));
    let one = Command::new(BIN).args(eval_args).output().unwrap();
    assert!(one.status.success(), "{}", text(&one));
    let (two, one) = (last_json(&two), last_json(&one));
    assert_eq!(two["images"], 11);
    assert_eq!(one["images"], 11);
    assert_eq!(two["top1"], one["top1"]);
    assert_eq!(two["top5"], one["top5"]);
    let (l2, l1) = (two["loss"].as_f64().unwrap(), one["loss"].as_f64().unwrap());
    assert!((l2 - l1).abs() <= 1e-5 * l1.abs(), "loss {l2} vs {l1}");
}

/// The JSON object on the last line of a command's stdout (rank 0's only).
fn last_json(o: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&o.stdout);
    let jsons: Vec<&str> = stdout.lines().filter(|l| l.starts_with('{')).collect();
    assert_eq!(jsons.len(), 1, "one JSON line expected: {stdout}");
    serde_json::from_str(jsons[0]).unwrap()
}

#[test]
fn a_distributed_resume_continues_bit_exactly() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), "train", 6);
    // One unreadable file, in one rank's shard of epoch 2 (where the run is interrupted): the
    // ranks' stream positions then differ, and each must get its own back.
    std::fs::write(
        data.join(small_class(&data)).join("broken.png"),
        b"not a png",
    )
    .unwrap();
    assert_bad_file_in_one_shard(&data, 1);
    let limit = Duration::from_secs(120);
    // Both runs save at step 5: each save averages the BN statistics over the ranks, which the
    // training then continues from.
    let straight = dir.path().join("straight");
    let mut args = train_args(s(&data), s(&straight), "2");
    args.extend(["--save-every-steps", "5"]);
    let (o, _) = mpirun(2, &args, &[], limit);
    assert!(o.status.success(), "{}", text(&o));
    // Interrupted mid-epoch: epoch 1, then 2 steps of epoch 2 (save every 5 steps), then resumed.
    let split = dir.path().join("split");
    let mut first = train_args(s(&data), s(&split), "2");
    first.extend(["--save-every-steps", "5"]);
    let env = [("INCEPTION_DIST_FAULT", "1:exit:6")];
    let (o, _) = mpirun(2, &first, &env, limit);
    assert!(
        !o.status.success(),
        "the injected exit should end the job: {}",
        text(&o)
    );
    let saved = checkpoints(&split);
    assert!(
        saved
            .last()
            .unwrap()
            .ends_with("inception-e1-s5.safetensors"),
        "{saved:?}"
    );
    let mut resumed = train_args(s(&data), s(&split), "2");
    resumed.extend(["--save-every-steps", "5", "--resume", "auto"]);
    let (o, _) = mpirun(2, &resumed, &[], limit);
    assert!(o.status.success(), "{}", text(&o));
    let (a, b) = (checkpoints(&straight), checkpoints(&split));
    assert_same_state(a.last().unwrap(), b.last().unwrap());
}

/// The first class folder's name.
fn small_class(data: &Path) -> String {
    let mut classes: Vec<String> = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    classes.remove(0)
}

/// The file named broken.png lies in exactly one of the two ranks' shards of `epoch` (0-based).
fn assert_bad_file_in_one_shard(data: &Path, epoch: usize) {
    let set = Arc::new(Dataset::open(data).unwrap());
    let bad = (0..set.len())
        .find(|&i| set.describe(i).ends_with("broken.png"))
        .unwrap();
    let holders = (0..2)
        .filter(|&rank| {
            let cfg = LoaderConfig {
                rank,
                world_size: 2,
                ..LoaderConfig::train(BATCH, SIZE, SEED)
            };
            Loader::new(set.clone(), cfg)
                .unwrap()
                .shard(epoch)
                .contains(&bad)
        })
        .count();
    assert_eq!(
        holders, 1,
        "the bad file should be in one shard of epoch {epoch}"
    );
}

#[test]
fn a_killed_rank_ends_the_job_quickly_naming_it() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), "train", 6);
    let out = dir.path().join("out");
    let args = train_args(s(&data), s(&out), "100");
    let (o, took) = mpirun(
        2,
        &args,
        &[("INCEPTION_DIST_FAULT", "1:kill:4")],
        Duration::from_secs(60),
    );
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}: {all}");
    assert!(
        all.contains("rank 1"),
        "the message should name rank 1: {all}"
    );
}

#[test]
fn a_hung_rank_is_caught_by_the_collective_timeout_naming_rank_and_step() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), "train", 6);
    let out = dir.path().join("out");
    let mut args = train_args(s(&data), s(&out), "100");
    args.extend(["--collective-timeout", "5"]);
    let (o, took) = mpirun(
        2,
        &args,
        &[("INCEPTION_DIST_FAULT", "1:hang:4")],
        Duration::from_secs(60),
    );
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}: {all}");
    assert!(all.contains("rank 0 of 2 at step 4"), "{all}");
    assert!(all.contains("--collective-timeout"), "{all}");
}

#[test]
fn a_panicking_rank_aborts_the_job_naming_rank_and_step() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), "train", 6);
    let out = dir.path().join("out");
    let args = train_args(s(&data), s(&out), "100");
    let (o, took) = mpirun(
        2,
        &args,
        &[("INCEPTION_DIST_FAULT", "1:panic:4")],
        Duration::from_secs(60),
    );
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}: {all}");
    assert!(all.contains("rank 1 of 2 at step 4 panicked"), "{all}");
}

#[test]
fn a_launcher_of_another_mpi_is_a_clear_error() {
    if !mpi_available() {
        return;
    }
    // MPICH's or Slurm's launcher announces 4 processes, but this Open MPI build starts alone.
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), "train", 2);
    let out = dir.path().join("out");
    let mut cmd = Command::new(BIN);
    cmd.args(train_args(s(&data), s(&out), "1"))
        .env("PMI_SIZE", "4");
    let (o, _) = run_bounded(cmd, Duration::from_secs(60));
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(
        all.contains("PMI_SIZE=4") && all.contains("world of 1"),
        "{all}"
    );
}

#[cfg(not(feature = "mpi"))]
#[test]
fn without_the_feature_an_mpirun_launch_asks_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), "train", 2);
    let out = dir.path().join("out");
    let o = Command::new(BIN)
        .args(train_args(s(&data), s(&out), "1"))
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .unwrap();
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(all.contains("--features mpi"), "{all}");
}

#[test]
fn a_rank_whose_shard_is_unreadable_stops_the_job_instead_of_desynchronising_it() {
    if !mpi_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), "train", 6);
    // Every file of rank 1's shard of epoch 1's shuffle made unreadable.
    let set = Arc::new(Dataset::open(&data).unwrap());
    let loader = Loader::new(
        set.clone(),
        LoaderConfig {
            rank: 1,
            world_size: 2,
            ..LoaderConfig::train(BATCH, SIZE, SEED)
        },
    )
    .unwrap();
    for i in loader.shard(0) {
        // A folder dataset describes an image by its path.
        std::fs::write(set.describe(i), b"not an image").unwrap();
    }
    let out = dir.path().join("out");
    let args = train_args(s(&data), s(&out), "2");
    let (o, took) = mpirun(2, &args, &[], Duration::from_secs(60));
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(took < Duration::from_secs(30), "took {took:?}: {all}");
    assert!(
        all.contains("rank 1 of 2") && all.contains("ran out of readable images"),
        "{all}"
    );
}

#[test]
fn bench_allreduce_reports_every_bucket_size() {
    if !mpi_available() {
        return;
    }
    let args = [
        "bench",
        "allreduce",
        "--elems",
        "100000",
        "--iters",
        "2",
        "--buckets",
        "1,whole",
        "--json",
    ];
    let (o, _) = mpirun(2, &args, &[], Duration::from_secs(60));
    assert!(o.status.success(), "{}", text(&o));
    let report = last_json(&o);
    assert_eq!(report["world"], 2);
    assert_eq!(report["rows"].as_array().unwrap().len(), 2);
    assert!(report["rows"][1]["bucket_mib"].is_null());
    assert!(report["rows"][0]["median_ms"].as_f64().unwrap() > 0.0);
}

/// Two ranks on the emulated GPU (the CUDA trainer, its gradients all-reduced through host
/// memory) against the same two ranks on the CPU: both ranks end with the same model bit for
/// bit, and the loss curve follows the CPU's to fp16 tolerance.
#[test]
fn two_ranks_on_the_emulated_gpu_follow_the_cpu_run() {
    if !mpi_available() || !emu_env::nvrtc_available("distributed training on the emulated GPU") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = small_folder(dir.path(), "train", 6);
    let driver = inception_emu::driver_path();
    let home = emu_env::cuda_home().map(|h| h.display().to_string());
    let mut curves = Vec::new();
    for device in ["cpu", "cuda"] {
        let (out, dump) = (
            dir.path().join(device),
            dir.path().join(format!("dump-{device}")),
        );
        let mut args = train_args(s(&data), s(&out), "2");
        let at = args.iter().position(|a| *a == "--device").unwrap();
        args[at + 1] = device;
        let mut env = vec![("INCEPTION_DIST_DUMP", s(&dump))];
        if device == "cuda" {
            env.push(("INCEPTION_CUDA_DRIVER", s(&driver)));
            if let Some(h) = &home {
                env.push(("INCEPTION_CUDA_HOME", h.as_str()));
            }
        }
        let (o, _) = mpirun(2, &args, &env, Duration::from_secs(300));
        assert!(o.status.success(), "{device}: {}", text(&o));
        if device == "cuda" {
            assert!(text(&o).contains("through host memory"), "{}", text(&o));
        }
        assert_same_state(
            &dump.join("rank0.safetensors"),
            &dump.join("rank1.safetensors"),
        );
        curves.push(step_losses(&out));
    }
    let (cpu, gpu) = (&curves[0], &curves[1]);
    assert!(
        cpu.len() >= 6 && cpu.len() == gpu.len(),
        "{cpu:?} vs {gpu:?}"
    );
    // fp16 activations against fp32, the same reduced gradients on both: close at every step.
    let worst = cpu
        .iter()
        .zip(gpu)
        .map(|(a, b)| (a - b).abs() / a.abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 0.05,
        "loss curves differ by {worst:.3}: {cpu:?} vs {gpu:?}"
    );
}
