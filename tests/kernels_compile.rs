//! Compiles every CUDA kernel with NVRTC for sm_90a and sm_80 (no GPU needed) and fails on any
//! compile error or register spill, printing the resource table.
//!
//! tools/test.sh installs the pinned NVRTC wheels and sets INCEPTION_REQUIRE_ALL=1, so there a
//! missing libnvrtc fails the test; a plain `cargo test` skips it with a note.

use std::io::Write;

use inception_engine::gpu::libs;
use inception_engine::gpu::nvrtc::compile_all;

#[path = "common/tool_groups.rs"]
mod tool_groups;

/// Writes straight to stderr: libtest captures `println!`, and CI should show the table even when
/// the test passes.
fn report(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn nvrtc_available() -> bool {
    // After tools/test.sh has made .venv once, a plain `cargo test` finds its wheels too.
    if std::env::var_os("INCEPTION_CUDA_HOME").is_none() {
        if let Some(home) = tool_groups::venv_cuda_home() {
            // The only test of this binary, so no other thread reads the environment.
            std::env::set_var("INCEPTION_CUDA_HOME", home);
        }
    }
    tool_groups::available(
        "the CUDA kernel compile check (tests/kernels_compile.rs)",
        libs::ensure_nvrtc().map_err(|e| format!("NVRTC not found: {e:#}")),
    )
}

fn check_arch(arch: &str) {
    let compiled = compile_all(arch).unwrap_or_else(|e| panic!("compiling for {arch}: {e:#}"));
    let mut spills = Vec::new();
    report(&format!(
        "{:<28} {:>7} {:>5} {:>7} {:>7}",
        format!("kernel ({arch})"),
        "regs",
        "spill",
        "smem",
        "stack"
    ));
    for k in compiled.iter().flat_map(|c| &c.kernels) {
        report(&format!(
            "{:<28} {:>7} {:>5} {:>7} {:>7}",
            k.name, k.registers, k.spill_bytes, k.shared_bytes, k.stack_bytes
        ));
        if k.spill_bytes > 0 {
            spills.push(k.name.clone());
        }
    }
    let total: usize = compiled.iter().map(|c| c.kernels.len()).sum();
    assert!(total > 0, "no kernels reported for {arch}");
    assert!(spills.is_empty(), "register spills on {arch}: {spills:?}");
}

#[test]
fn kernels_compile_sm90a_and_sm80() {
    if !nvrtc_available() {
        return;
    }
    for arch in ["sm_90a", "sm_80"] {
        check_arch(arch);
    }
}
