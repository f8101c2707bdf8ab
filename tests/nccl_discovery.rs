//! NCCL discovery and the `--grad-sync` choice, on a machine without NCCL or a GPU.
//!
//! - A stand-in `libnccl.so.2` (built here with the C compiler, answering `ncclGetVersion`) is
//!   found in `INCEPTION_NCCL_HOME` and reached through cudarc, which itself only looks for
//!   `libnccl.so`: the wheel's situation, proven without the wheel.
//! - Asking for NCCL where there is none is a clear error naming the paths searched.
//! - `--grad-sync` resolves as documented for each device and library state.

use inception_engine::backend::{choose_grad_sync, Device, SyncChoice};
use inception_engine::dist::GradSyncMode;
use std::path::Path;
use std::process::Command;

/// Builds a shared object named like the wheel's (SONAME libnccl.so.2) whose ncclGetVersion
/// answers 22703.
fn stand_in(dir: &Path) -> bool {
    let src = dir.join("nccl_stand_in.c");
    std::fs::write(
        &src,
        "int ncclGetVersion(int *v) { *v = 22703; return 0; }\n",
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("lib")).unwrap();
    let out = dir.join("lib/libnccl.so.2");
    Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libnccl.so.2", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_wheels_libnccl_so_2_is_reached_through_cudarc() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        stand_in(dir.path()),
        "the C compiler could not build the stand-in"
    );
    // The only test of this process that loads NCCL (dlopen is process-wide).
    std::env::set_var("INCEPTION_NCCL_HOME", dir.path());
    let from = inception_engine::gpu::nccl::ensure_nccl().unwrap();
    assert!(from.ends_with("lib/libnccl.so.2"), "{from}");
    assert_eq!(inception_engine::gpu::nccl::version().unwrap(), 22703);
}

#[test]
fn nccl_asked_for_but_absent_is_a_clear_error() {
    if Command::new("ldconfig")
        .arg("-p")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libnccl.so"))
    {
        eprintln!("skipped: this machine has NCCL installed");
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_inception-engine"))
        .args(["bench", "allreduce", "--transport", "nccl", "--elems", "16"])
        .env_remove("INCEPTION_NCCL_HOME")
        .env("NCCL_HOME", "/nowhere/nccl")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("NCCL not found"), "{err}");
    for path in ["/nowhere/nccl/libnccl.so.2", "/nowhere/nccl/lib/libnccl.so"] {
        assert!(err.contains(path), "{path} not named: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn found() -> anyhow::Result<String> {
    Ok("/x/libnccl.so.2".into())
}

fn absent() -> anyhow::Result<String> {
    anyhow::bail!("NCCL not found: searched /y")
}

#[test]
fn grad_sync_auto_takes_nccl_only_on_cuda_with_the_library() {
    let pick = |mode, device, lib: fn() -> anyhow::Result<String>| {
        choose_grad_sync(mode, device, lib).map(|(c, _)| c)
    };
    assert_eq!(
        pick(GradSyncMode::Auto, Device::Cuda, found).unwrap(),
        SyncChoice::Nccl
    );
    assert_eq!(
        pick(GradSyncMode::Auto, Device::Cuda, absent).unwrap(),
        SyncChoice::Host
    );
    assert_eq!(
        pick(GradSyncMode::Auto, Device::Cpu, found).unwrap(),
        SyncChoice::Host
    );
    assert_eq!(
        pick(GradSyncMode::Host, Device::Cuda, found).unwrap(),
        SyncChoice::Host
    );
    assert_eq!(
        pick(GradSyncMode::Nccl, Device::Cuda, found).unwrap(),
        SyncChoice::Nccl
    );
    // The fallback says why in the log line.
    let (_, line) = choose_grad_sync(GradSyncMode::Auto, Device::Cuda, absent).unwrap();
    assert!(
        line.contains("host memory") && line.contains("searched /y"),
        "{line}"
    );
}

#[test]
fn grad_sync_nccl_without_the_library_or_off_cuda_is_an_error() {
    let e = choose_grad_sync(GradSyncMode::Nccl, Device::Cuda, absent).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("--grad-sync nccl") && msg.contains("searched /y"),
        "{msg}"
    );
    let e = choose_grad_sync(GradSyncMode::Nccl, Device::Cpu, found).unwrap_err();
    assert!(e.to_string().contains("needs --device cuda"), "{e}");
}
