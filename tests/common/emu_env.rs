//! Where the emulated-GPU tests find NVRTC (the emulated GPU still compiles the kernels with it,
//! for their names and resources). Included with `#[path]` beside tool_groups.rs.

#![allow(dead_code)]
use std::path::PathBuf;

use super::tool_groups;

/// The NVRTC wheels' folder when known: the environment's, else the project's `.venv`.
pub fn cuda_home() -> Option<PathBuf> {
    std::env::var_os("INCEPTION_CUDA_HOME")
        .map(PathBuf::from)
        .or_else(tool_groups::venv_cuda_home)
}

/// Under tools/test.sh a missing NVRTC fails the test group `group`, under a plain `cargo test`
/// it skips it.
pub fn nvrtc_available(group: &str) -> bool {
    let probe = match cuda_home() {
        Some(h) if h.join("lib/libnvrtc.so.13").is_file() => Ok(()),
        _ => inception_engine::gpu::libs::ensure_nvrtc()
            .map_err(|e| format!("NVRTC not found: {e:#}")),
    };
    tool_groups::available(group, probe)
}
