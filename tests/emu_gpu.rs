//! The CUDA path on the emulated GPU (emu/): the real kernels/*.cu compiled for the CPU behind an
//! emulated CUDA driver, under the unchanged host code (executor, arena, launchers, events,
//! pinned report slots). Needs NVRTC (the CUBINs are still compiled, for the kernel names and
//! resources), which .ci/run installs.
//!
//! - the self-test at its reduced shapes: every compiled entry point runs, every check passes;
//! - the same kernels under other thread schedules and under the shared-memory race checker;
//! - known bugs put back (in a copy of the kernel sources, or in a launch's arguments) are caught;
//! - `train`, `eval` and `predict` on the emulated device agree with the CPU.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "common/emu_env.rs"]
mod emu_env;
#[path = "common/metrics.rs"]
mod metrics;
#[path = "common/tool_groups.rs"]
mod tool_groups;

use emu_env::cuda_home;

fn nvrtc_available() -> bool {
    emu_env::nvrtc_available("the emulated-GPU tests (tests/emu_gpu.rs)")
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_inception-engine")
}

/// The engine on the emulated GPU, with the given extra environment.
fn engine(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(bin());
    c.args(args)
        .env("INCEPTION_CUDA_DRIVER", inception_emu::driver_path());
    if let Some(home) = cuda_home() {
        c.env("INCEPTION_CUDA_HOME", home);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn last_json(o: &Output) -> serde_json::Value {
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("{}");
    serde_json::from_str(line).unwrap()
}

/// A small but complete per-kernel self-test: the `tiny` plan takes every tensor-core tile, the
/// padded stem, BN with and without ReLU, the pools and softmax-CE.
const SMALL: [&str; 10] = [
    "selftest",
    "--device",
    "cuda",
    "--plan",
    "tiny",
    "--image-size",
    "48",
    "--batch",
    "2",
    "--skip-steps",
];

#[test]
fn selftest_runs_every_entry_point_and_passes() {
    if !nvrtc_available() {
        return;
    }
    let o = engine(&["selftest", "--device", "cuda", "--json"], &[]);
    let all = text(&o);
    assert!(o.status.success(), "{all}");
    assert!(all.contains("emulated"), "the device names itself emulated");
    let v = last_json(&o);
    assert_eq!(v["failed"], 0, "{all}");
    assert_eq!(v["shapes"], "reduced");
    let compiled: Vec<&str> = v["entry_points_compiled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    let run: Vec<&str> = v["entry_points_run"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(compiled.len() >= 72, "{compiled:?}");
    let never: Vec<&&str> = compiled.iter().filter(|k| !run.contains(k)).collect();
    assert!(never.is_empty(), "compiled but never run: {never:?}");
    // The whole-step checks ran too: tiny at three levels, v4 at O2, the device scaler.
    let checks = v["checks"].as_array().unwrap();
    for want in [
        "step tiny b8 O0: param grads",
        "step tiny b8 O3: loss",
        "step v4 b2 O2: loss",
        "device loss scaler",
    ] {
        assert!(
            checks
                .iter()
                .any(|c| c["kernel"].as_str().unwrap().contains(want) && c["status"] == "Pass"),
            "no passing check {want}"
        );
    }
}

#[test]
fn other_thread_schedules_and_the_race_checker_pass() {
    if !nvrtc_available() {
        return;
    }
    for env in [
        [("INCEPTION_EMU_SCHEDULE", "reverse")],
        [("INCEPTION_EMU_SCHEDULE", "random:7")],
        [("INCEPTION_EMU_RACECHECK", "1")],
    ] {
        let o = engine(&SMALL, &env);
        assert!(o.status.success(), "{env:?}: {}", text(&o));
    }
}

/// A copy of kernels/ with `from` replaced by `to` in `file`, built into an emulator kernels
/// library (plain or race-checking).
fn mutant(dir: &Path, file: &str, from: &str, to: &str, racecheck: bool) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let src = dir.join("kernels");
    std::fs::create_dir_all(&src).unwrap();
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, src.join(p.file_name().unwrap())).unwrap();
    }
    let code = std::fs::read_to_string(src.join(file)).unwrap();
    assert_eq!(
        code.matches(from).count(),
        1,
        "{file}: `{from}` must occur once"
    );
    std::fs::write(src.join(file), code.replace(from, to)).unwrap();
    inception_emu::builder::build_kernels(
        inception_emu::emu_dir(),
        &src,
        &dir.join("out"),
        &inception_emu::driver_path(),
        racecheck,
    )
    .unwrap()
}

/// Runs the small self-test against a mutant library and asserts that it fails, with `expect`
/// in its output.
fn assert_caught(name: &str, lib: &Path, env: &[(&str, &str)], expect: &str) {
    let lib = lib.to_string_lossy().to_string();
    let mut env: Vec<(&str, &str)> = env.to_vec();
    env.push(("INCEPTION_EMU_KERNELS", &lib));
    let o = engine(&SMALL, &env);
    let all = text(&o);
    assert!(!o.status.success(), "{name}: not caught\n{all}");
    assert!(all.contains(expect), "{name}: no `{expect}` in\n{all}");
}

const MAIN_LOOP_BARRIER: &str =
    "        __syncthreads();  // tile kt landed for everyone; stage (kt-1) is no longer being read\n";
const REFILL: &str = "        if (next < kt1) load_tile((next - kt0) % STAGES, next);\n";

#[test]
fn injected_kernel_bugs_are_caught() {
    if !nvrtc_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = |n: &str| tmp.path().join(n);
    // The pipeline's barrier removed: warps read stages other threads have not landed (poisoned).
    let lib = mutant(&d("barrier"), "conv_tc.cu", MAIN_LOOP_BARRIER, "", false);
    assert_caught("barrier removed", &lib, &[], "FAIL");
    // cp.async.wait_group one group short: the newest tile is read while still in flight.
    let lib = mutant(
        &d("wait"),
        "conv_tc.cu",
        "cp_async_wait<STAGES - 2>();",
        "cp_async_wait<STAGES - 1>();",
        false,
    );
    assert_caught("wait_group one short", &lib, &[], "FAIL");
    // A stage refilled before the barrier: a write-after-read race on the stage slow warps still
    // read. No value need change in a given schedule; the race checker reports it.
    let lib = mutant(
        &d("refill"),
        "conv_tc.cu",
        &format!("{MAIN_LOOP_BARRIER}        int next = kt + STAGES - 1;\n{REFILL}"),
        &format!("        int next = kt + STAGES - 1;\n{REFILL}{MAIN_LOOP_BARRIER}"),
        true,
    );
    assert_caught(
        "stage refilled before the barrier",
        &lib,
        &[("INCEPTION_EMU_RACECHECK", "1")],
        "write after read",
    );
    // A wrong ldmatrix lane address: rows 8-15 of the A fragment read rows 0-7 again.
    let lib = mutant(
        &d("ldmatrix"),
        "conv_tc.cu",
        "(mb + (lane & 15))",
        "(mb + (lane & 7))",
        false,
    );
    assert_caught("wrong ldmatrix lane address", &lib, &[], "FAIL");
    // BN's partial-sum barrier removed: plain shared-memory loads race with the stores (found
    // through the instrumented loads and stores, not a collective).
    let lib = mutant(
        &d("bn"),
        "batchnorm.cu",
        "    sb[threadIdx.y][threadIdx.x] = b;\n    __syncthreads();\n",
        "    sb[threadIdx.y][threadIdx.x] = b;\n",
        true,
    );
    // In index order thread 0 reads its neighbours' partials before they exist; in reverse order
    // it reads them unsynchronised.
    assert_caught(
        "BN barrier removed",
        &lib,
        &[("INCEPTION_EMU_RACECHECK", "1")],
        "never written in this block",
    );
    assert_caught(
        "BN barrier removed, reverse order",
        &lib,
        &[
            ("INCEPTION_EMU_RACECHECK", "1"),
            ("INCEPTION_EMU_SCHEDULE", "reverse"),
        ],
        "race: load reads",
    );
}

/// The same kinds of bug in the leaner step's batchnorm and max-pool kernels.
#[test]
fn injected_bugs_in_the_vectorised_bn_and_the_argmax_are_caught() {
    if !nvrtc_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = |n: &str| tmp.path().join(n);
    // The tree's first barrier removed: row groups add partials other threads have not stored.
    let lib = mutant(
        &d("bnv_barrier"),
        "batchnorm_vec.cu",
        "        sb[t][i] = b[i];\n    }\n    __syncthreads();\n",
        "        sb[t][i] = b[i];\n    }\n",
        true,
    );
    assert_caught(
        "vectorised BN barrier removed",
        &lib,
        &[("INCEPTION_EMU_RACECHECK", "1")],
        "never written in this block",
    );
    // The last block no longer resets the ticket counter: the next reduction never finds its
    // last block, and the backward's dgamma and dbeta stay unwritten (poisoned).
    let lib = mutant(
        &d("bnv_counter"),
        "batchnorm_vec.cu",
        "    if (threadIdx.x == 0 && threadIdx.y == 0) *counter = 0u;\n",
        "",
        false,
    );
    assert_caught(
        "BN ticket counter not reset",
        &lib,
        &[],
        "bn_vec_bwd(dgamma)",
    );
    // The saved argmax one position off: the backward sends the gradient to the wrong input.
    let lib = mutant(
        &d("argmax"),
        "pool.cu",
        "                arg = r * p.k + s;\n",
        "                arg = r * p.k + s + 1;\n",
        false,
    );
    assert_caught("argmax off by one", &lib, &[], "maxpool_bwd_argmax");
}

/// Runs the small self-test against a mutant library and asserts that it fails with a FAIL line
/// naming `kernel`.
fn assert_check_fails(name: &str, lib: &Path, kernel: &str) {
    let lib = lib.to_string_lossy().to_string();
    let o = engine(&SMALL, &[("INCEPTION_EMU_KERNELS", &lib)]);
    let all = text(&o);
    assert!(!o.status.success(), "{name}: not caught\n{all}");
    for l in all.lines().filter(|l| l.contains("FAIL")) {
        eprintln!("{name}: {l}");
    }
    assert!(
        all.lines()
            .any(|l| l.contains(kernel) && l.contains("FAIL")),
        "{name}: no failing {kernel} check in\n{all}"
    );
}

/// Bugs put back into the leaner convolution variants (the phase-split data gradient, the stem's
/// weight gradient over its padded input, the narrow tiles) are caught by their self-test checks.
#[test]
fn injected_conv_variant_bugs_are_caught() {
    if !nvrtc_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = |n: &str| tmp.path().join(n);
    // A wrong phase offset: the output row tap 0 of a phase reads is off by one for odd phases.
    let lib = mutant(
        &d("phase"),
        "conv_tc.cu",
        "f.qh = (f.h0 + p.pad_top - f.ph) / st;",
        "f.qh = (f.h0 + p.pad_top + f.ph) / st;",
        false,
    );
    assert_check_fails("wrong phase offset", &lib, "conv_dgrad_phase_tc_");
    // The stem's reduction drops the wrong channels: the partials read as if unpadded.
    let lib = mutant(
        &d("drop"),
        "conv_tc.cu",
        "u64 j = (u64)(i / cin) * cin_pad + i % cin;",
        "u64 j = (u64)(i / cin) * cin + i % cin;",
        false,
    );
    assert_check_fails("wrong channel drop", &lib, "conv_wgrad_reduce_drop_f32");
    // A narrow tile whose warps lay out the transposed block (32x128, four warps side by side)
    // in the launcher's 128x32 grid: rows 32-127 of every block are never written.
    let lib = mutant(
        &d("narrow"),
        "conv_tc.cu",
        "TC_ENTRY(conv_dgrad_tc_128x32, MODE_DGRAD, 128, 32, 4, 1)",
        "TC_ENTRY(conv_dgrad_tc_128x32, MODE_DGRAD, 32, 128, 1, 4)",
        false,
    );
    assert_check_fails(
        "wrong narrow-tile warp layout",
        &lib,
        "conv_dgrad_tc_128x32",
    );
}

/// The u8 batch normalised with channels 1 and 2's factors exchanged is caught by its check.
#[test]
fn an_injected_normalisation_bug_is_caught() {
    if !nvrtc_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let lib = mutant(
        &tmp.path().join("normalize"),
        "normalize.cu",
        "float m = c == 0 ? m0 : (c == 1 ? m1 : m2);",
        "float m = c == 0 ? m0 : (c == 1 ? m2 : m1);",
        false,
    );
    assert_check_fails("normalisation factors swapped", &lib, "normalize_u8_f32");
}

#[test]
fn a_swapped_launch_argument_is_caught() {
    if !nvrtc_available() {
        return;
    }
    // gamma and beta of the BN normalisation exchanged, as a launcher passing them in the wrong
    // order would.
    let o = engine(&SMALL, &[("INCEPTION_EMU_SWAP_ARGS", "bn_apply:3:4")]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("bn_apply") && text(&o).contains("FAIL"),
        "{}",
        text(&o)
    );
}

fn small_folder(root: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist-mini/train");
    let dst = root.join("data");
    for class in std::fs::read_dir(&src).unwrap() {
        let class = class.unwrap().path();
        let out = dst.join(class.file_name().unwrap());
        std::fs::create_dir_all(&out).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&class)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().take(8) {
            std::fs::copy(f, out.join(f.file_name().unwrap())).unwrap();
        }
    }
    dst
}

fn train(device: &str, data: &Path, out: &Path) -> Output {
    engine(
        &[
            "train",
            "--plan",
            "tiny",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--epochs",
            "3",
            "--log-every",
            "1",
            "--seed",
            "3",
            "--workers",
            "1",
            "--device",
            device,
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &[],
    )
}

fn checkpoint(run: &Path) -> PathBuf {
    let mut c: Vec<PathBuf> = std::fs::read_dir(run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    c.sort();
    c.pop().unwrap()
}

#[test]
fn training_on_the_emulated_gpu_follows_the_cpu() {
    if !nvrtc_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = small_folder(tmp.path());
    let (cpu_run, gpu_run) = (tmp.path().join("cpu"), tmp.path().join("gpu"));
    let o = train("cpu", &data, &cpu_run);
    assert!(o.status.success(), "{}", text(&o));
    let o = train("cuda", &data, &gpu_run);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("emulated"), "{}", text(&o));
    let (a, b) = (
        metrics::step_losses(&cpu_run),
        metrics::step_losses(&gpu_run),
    );
    assert!(
        a.len() >= 24 && a.len() == b.len(),
        "{} vs {} losses",
        a.len(),
        b.len()
    );
    // fp16 activations and a dynamic loss scale against fp32: close, step by step, and both fall.
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / x.abs())
        .fold(0.0, f64::max);
    assert!(
        worst < 0.05,
        "loss curves differ by {worst:.3}: {a:?} vs {b:?}"
    );
    // The emulated GPU's checkpoint evaluates the same on the CPU and on the emulated GPU.
    let ckpt = checkpoint(&gpu_run);
    let eval = |device: &str| {
        let o = engine(
            &[
                "eval",
                "--json",
                "--batch-size",
                "8",
                "--device",
                device,
                "--data",
                data.to_str().unwrap(),
                "--checkpoint",
                ckpt.to_str().unwrap(),
            ],
            &[],
        );
        assert!(o.status.success(), "{}", text(&o));
        last_json(&o)
    };
    let (on_cpu, on_gpu) = (eval("cpu"), eval("cuda"));
    let (lc, lg) = (
        on_cpu["loss"].as_f64().unwrap(),
        on_gpu["loss"].as_f64().unwrap(),
    );
    assert!(
        (lc - lg).abs() / lc < 1e-2,
        "eval loss {lc} on the CPU, {lg} on the emulated GPU"
    );
    assert_eq!(on_cpu["images"], on_gpu["images"]);
    let image = std::fs::read_dir(
        data.join(
            std::fs::read_dir(&data)
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .file_name(),
        ),
    )
    .unwrap()
    .next()
    .unwrap()
    .unwrap()
    .path();
    let o = engine(
        &[
            "predict",
            "--json",
            "--device",
            "cuda",
            "--checkpoint",
            ckpt.to_str().unwrap(),
            image.to_str().unwrap(),
        ],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(last_json(&o)["logits"].as_array().unwrap().len(), 10);
}

#[test]
fn a_plan_larger_than_device_memory_is_a_clear_error() {
    if !nvrtc_available() {
        return;
    }
    let o = engine(
        &[
            "bench",
            "train",
            "--plan",
            "v4",
            "--device",
            "cuda",
            "--batch-size",
            "64",
            "--steps",
            "1",
        ],
        &[("INCEPTION_EMU_MEMORY_MB", "512")],
    );
    let all = text(&o);
    assert!(!o.status.success(), "{all}");
    assert!(
        all.contains("not enough device memory") && all.contains("use a smaller --batch-size"),
        "{all}"
    );
    assert!(!all.contains("panicked"), "{all}");
}
