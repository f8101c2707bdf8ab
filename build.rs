//! Embeds the CUDA kernel sources (kernels/*.cu and *.cuh) into the binary.
//!
//! Generates `$OUT_DIR/kernel_sources.rs` with two tables of `(file name, include_str!(...))`;
//! src/gpu/sources.rs includes it. The kernels are compiled at run time with NVRTC, so
//! building the crate needs no CUDA toolkit.
//!
//! Also builds `$OUT_DIR/libnccl_alias.so`, a 9 KB shared object with no code whose SONAME is
//! `libnccl.so` and which needs `libnccl.so.2`: cudarc opens NCCL as `libnccl.so`, the PyPI
//! wheel ships only `libnccl.so.2`, and loading this alias after the wheel's file makes cudarc's
//! lookup find it (src/gpu/nccl.rs). Without a C compiler the alias is left empty and the
//! engine then asks for `libnccl.so` on the library path instead.

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
    build_nccl_alias(Path::new(&std::env::var("OUT_DIR").unwrap()));
}

/// Links the empty alias against an empty stand-in named `libnccl.so.2` (so the linker records
/// the dependency); on failure writes an empty file and warns.
fn build_nccl_alias(out: &Path) {
    let stub = out.join("nccl-stub");
    let alias = out.join("libnccl_alias.so");
    let _ = std::fs::create_dir_all(&stub);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let run = |args: &[&str]| {
        std::process::Command::new(&cc)
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    let stub_lib = stub.join("libnccl.so.2");
    let (stub_s, alias_s) = (stub_lib.to_str().unwrap(), alias.to_str().unwrap());
    let empty = ["-shared", "-nostdlib", "-x", "c", "/dev/null"];
    let built = run(&[&empty[..], &["-Wl,-soname,libnccl.so.2", "-o", stub_s]].concat())
        && run(&[
            &empty[..],
            &["-x", "none", "-Wl,--no-as-needed", stub_s],
            &["-Wl,-soname,libnccl.so", "-o", alias_s],
        ]
        .concat());
    if !built {
        println!("cargo:warning=no C compiler: NCCL's libnccl.so.2 will need a libnccl.so link");
        std::fs::write(&alias, b"").unwrap();
    }
}
