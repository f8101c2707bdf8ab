//! Test groups that need tools from outside Rust (NVRTC for the kernel compile check; python
//! with onnx and onnxruntime for the ONNX tests). Under a plain `cargo test` a group whose tools
//! are missing is skipped with a note saying which and why; under `tools/test.sh`, which
//! installs them and sets `INCEPTION_REQUIRE_ALL=1`, it fails instead.

#![allow(dead_code)]
use std::io::Write;
use std::path::{Path, PathBuf};

/// Whether every group must run (set by tools/test.sh).
pub fn all_required() -> bool {
    std::env::var("INCEPTION_REQUIRE_ALL").as_deref() == Ok("1")
}

/// `Ok`: the group runs. `Err(why)`: it is skipped with a note, or fails when all groups are
/// required. Returns whether the group should run.
pub fn available(group: &str, probe: Result<(), String>) -> bool {
    let Err(why) = probe else {
        return true;
    };
    if all_required() {
        panic!("{group}: {why} (INCEPTION_REQUIRE_ALL=1: every test group must run)");
    }
    // Straight to stderr: libtest captures print macros of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {group}: {why}. tools/test.sh installs what it needs and runs everything."
    );
    false
}

/// The python the ONNX tests run: `INCEPTION_PYTHON`, else the project's `.venv` (made by
/// tools/test.sh) when it exists, else `python3` on the PATH.
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("INCEPTION_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python3");
    if venv.is_file() {
        return venv;
    }
    PathBuf::from("python3")
}

/// The NVRTC wheels' folder (`nvidia/cu13`) in the project's `.venv`, if tools/test.sh made one.
pub fn venv_cuda_home() -> Option<PathBuf> {
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("site-packages/nvidia/cu13")))
        .filter(|p| p.join("lib").is_dir())
        .collect();
    found.sort();
    found.pop()
}
