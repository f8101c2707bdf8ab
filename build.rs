//! Embeds the CUDA kernel sources (kernels/*.cu and *.cuh) into the binary.
//!
//! Generates `$OUT_DIR/kernel_sources.rs` with two tables of `(file name, include_str!(...))`;
//! src/gpu/sources.rs includes it. The kernels are compiled at run time with NVRTC, so
//! building the crate needs no CUDA toolkit.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let mut out = String::new();
    for (table, ext) in [("SOURCES", "cu"), ("HEADERS", "cuh")] {
        writeln!(out, "pub const {table}: &[(&str, &str)] = &[").unwrap();
        for f in files
            .iter()
            .filter(|f| f.extension().is_some_and(|e| e == ext))
        {
            println!("cargo:rerun-if-changed={}", f.display());
            let name = f.file_name().unwrap().to_string_lossy();
            writeln!(
                out,
                "    ({name:?}, include_str!({:?})),",
                f.display().to_string()
            )
            .unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("kernel_sources.rs");
    std::fs::write(dest, out).unwrap();
}
