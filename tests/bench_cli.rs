//! `inception-engine bench kernels` from the command line: its arguments, and on a machine without
//! a GPU a clear error with a non-zero exit instead of a panic; and `inspect`'s device-memory
//! estimate, which needs no GPU.

use std::process::Command;

fn engine(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_inception-engine"))
        .args(args)
        .output()
        .expect("running inception-engine")
}

#[test]
fn bench_kernels_takes_filter_batch_and_json() {
    let out = engine(&["bench", "kernels", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--json",
        "--filter",
        "--batch",
        "--samples",
        "--out",
        "--list",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}

#[test]
fn bench_kernels_without_a_gpu_fails_cleanly() {
    // SAFETY: only tries to dlopen the driver library.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("a CUDA driver is present: the no-GPU path is not exercised here");
        return;
    }
    let out = engine(&["bench", "kernels", "--json", "--filter", "rmsprop"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("need an NVIDIA GPU"), "stderr: {err}");
    assert!(!err.contains("panicked"), "stderr: {err}");
}

#[test]
fn bench_kernels_lists_every_case_without_a_gpu() {
    let out = engine(&["bench", "kernels", "--list"]);
    assert!(out.status.success());
    let ids = String::from_utf8_lossy(&out.stdout);
    let count = |prefix: &str| ids.lines().filter(|l| l.starts_with(prefix)).count();
    // 38 distinct convolutions x 3 directions, the classifier's 3 GEMMs, the copy and matrix
    // references. Plus the 3-channel stem forward on the padded tensor-core path.
    assert_eq!(count("conv/"), 115, "{ids}");
    assert!(ids.contains("conv/features.0.conv/fprop_pad8"));
    assert_eq!(count("fc/"), 3);
    assert_eq!(count("copy/"), 1);
    assert_eq!(count("matrix/"), 1);
    assert_eq!(count("rmsprop/"), 1);
    assert!(ids.contains("conv/features.0.conv/fprop"));
    let wgrad = engine(&["bench", "kernels", "--list", "--filter", "wgrad"]);
    let ids = String::from_utf8_lossy(&wgrad.stdout);
    // 38 convolutions, the classifier, the copy and matrix references.
    assert_eq!(ids.lines().count(), 38 + 1 + 2, "{ids}");
    let none = engine(&["bench", "kernels", "--list", "--filter", "no-such-case"]);
    assert_eq!(none.status.code(), Some(1));
}

#[test]
fn inspect_estimates_cuda_memory_per_level_without_a_gpu() {
    let out = engine(&[
        "inspect",
        "--plan",
        "tiny",
        "--image-size",
        "32",
        "--num-classes",
        "10",
        "--batch-size",
        "8",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = |k: &str| v["cuda_memory_bytes"][k].as_u64().unwrap();
    // fp32 everywhere needs more than fp16 activations; inference needs no gradients or optimizer.
    assert!(bytes("train_O0") > bytes("train_O2"));
    assert!(bytes("train_O2") >= bytes("train_O3"));
    assert!(bytes("infer_O2") < bytes("train_O2"));
    assert_eq!(v["cuda_batch_size"], 8);
}

#[test]
fn bench_loader_cycles_epochs_and_reports_the_stages() {
    // 20 images at batch 20: one batch per epoch, so the timed batches come from later epochs
    // (this used to time nothing and print 0 images/s).
    let dir = tempfile::tempdir().unwrap();
    for k in 0..20 {
        let class = dir.path().join(format!("c{}", k % 2));
        std::fs::create_dir_all(&class).unwrap();
        std::fs::copy(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/astronaut_500x375_baseline.jpg"
            ),
            class.join(format!("{k}.jpg")),
        )
        .unwrap();
    }
    let data = dir.path().to_str().unwrap();
    let out = engine(&[
        "bench",
        "loader",
        "--data",
        data,
        "--batch-size",
        "20",
        "--batches",
        "3",
        "--workers",
        "2",
        "--image-size",
        "64",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("per image (thread time): read"), "{stdout}");
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(last["images"], 60);
    assert!(last["images_per_sec"].as_f64().unwrap() > 0.0);
    for stage in ["read", "decode", "transform", "pack"] {
        let ms = last["stage_ms_per_image"][stage].as_f64().unwrap();
        assert!(ms >= 0.0, "{stage}: {ms}");
    }
    assert!(last["stage_ms_per_image"]["decode"].as_f64().unwrap() > 0.0);
    // Forcing zune-jpeg works everywhere.
    let out = engine(&[
        "bench",
        "loader",
        "--data",
        data,
        "--batch-size",
        "10",
        "--batches",
        "2",
        "--jpeg",
        "zune",
        "--image-size",
        "32",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("\"jpeg\":\"zune\""), "{stdout}");
}
