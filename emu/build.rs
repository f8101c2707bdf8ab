//! Builds the emulated GPU (driver and kernels libraries, plain and race-checking) into OUT_DIR
//! with the system C++ compiler, from emu/runtime, emu/include and the project's kernels/.

#[path = "src/builder.rs"]
mod builder;

use std::path::{Path, PathBuf};

fn main() {
    let emu = Path::new(env!("CARGO_MANIFEST_DIR"));
    let kernels = emu.join("../kernels");
    for dir in [emu.join("runtime"), emu.join("include"), kernels.clone()] {
        println!("cargo:rerun-if-changed={}", dir.display());
    }
    println!("cargo:rerun-if-changed=src/builder.rs");
    println!("cargo:rerun-if-env-changed=CXX");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("lib");
    let result = builder::build_driver(emu, &out).and_then(|driver| {
        builder::build_kernels(emu, &kernels, &out, &driver, false)?;
        builder::build_kernels(emu, &kernels, &out, &driver, true)
    });
    if let Err(e) = result {
        panic!(
            "building the emulated GPU failed (it needs a C++17 compiler, g++ or clang++):\n{e}"
        );
    }
    println!("cargo:rustc-env=INCEPTION_EMU_LIB_DIR={}", out.display());
}
