//! The emulated GPU of inception-engine's tests: where its libraries were built, and the builder
//! (for kernel sources with a bug put back, see tests/emu_injected_bugs.rs).
//!
//! Run the engine on it by pointing `INCEPTION_CUDA_DRIVER` at [`driver_path`]; see the README's
//! "Testing the CUDA path without a GPU".

pub mod builder;

use std::path::{Path, PathBuf};

/// The folder holding the driver and kernels libraries built by this crate's build script.
pub fn lib_dir() -> PathBuf {
    PathBuf::from(env!("INCEPTION_EMU_LIB_DIR"))
}

/// The emulated CUDA driver library (SONAME libcuda.so).
pub fn driver_path() -> PathBuf {
    lib_dir().join(builder::DRIVER_FILE)
}

/// This crate's folder: the runtime and include sources the builder compiles.
pub fn emu_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}
