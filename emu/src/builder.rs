//! Builds the emulated GPU with the system C++ compiler: the driver library (emu/runtime) and the
//! kernels library (the project's kernels/*.cu, unchanged, compiled for the CPU against
//! emu/include). Used by build.rs and, for kernel sources with a bug put back, by the tests.
//!
//! The kernels library gets a generated registry: each source is preprocessed once with the
//! `__global__` and `__launch_bounds__` markers of emu_cuda.h left in place, every
//! `extern "C" __global__` function found is registered under its name (with its launch bounds),
//! and the runtime maps the kernel names of NVRTC's CUBINs onto these entry points.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The driver library's file name; its SONAME is `libcuda.so`.
pub const DRIVER_FILE: &str = "libcuda-emulated.so";
/// The kernels library, plain and instrumented for the shared-memory race checker.
pub const KERNELS_FILE: &str = "libinception-emu-kernels.so";
pub const KERNELS_RACE_FILE: &str = "libinception-emu-kernels-race.so";

const RUNTIME_SOURCES: [&str; 5] = [
    "exec.cpp",
    "exec_entry.cpp",
    "driver.cpp",
    "driver_launch.cpp",
    "cubin.cpp",
];

fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// Flags of every translation unit. x86-64-v3 brings F16C: without it every half conversion is a
/// library call (about 7x slower). `-fno-extern-tls-init`: `extern thread_local` (the shared
/// memory, the thread context) is read directly, without a TLS wrapper call per access.
fn common_flags(emu: &Path) -> Vec<String> {
    [
        "-std=c++17",
        "-O2",
        "-g0",
        "-fPIC",
        "-march=x86-64-v3",
        "-fno-extern-tls-init",
        "-fno-strict-aliasing",
        "-pthread",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("-I{}", emu.join("include").display()),
        format!("-I{}", emu.join("runtime").display()),
    ])
    .collect()
}

fn run(mut cmd: Command) -> Result<(), String> {
    let shown = format!("{cmd:?}");
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run the C++ compiler ({shown}): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{shown} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Runs the commands, as many at a time as there are cores.
fn run_all(cmds: Vec<Command>) -> Result<(), String> {
    let width = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut cmds = cmds.into_iter();
    loop {
        let batch: Vec<Command> = cmds.by_ref().take(width).collect();
        if batch.is_empty() {
            return Ok(());
        }
        let handles: Vec<_> = batch
            .into_iter()
            .map(|c| std::thread::spawn(move || run(c)))
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| "compiler thread panicked".to_string())??;
        }
    }
}

/// Builds the driver library into `out`; returns its path.
pub fn build_driver(emu: &Path, out: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
    let mut compiles = Vec::new();
    let mut objects = Vec::new();
    for src in RUNTIME_SOURCES {
        let obj = out.join(format!("{src}.o"));
        let mut c = Command::new(cxx());
        c.args(common_flags(emu))
            .arg("-c")
            .arg(emu.join("runtime").join(src))
            .arg("-o")
            .arg(&obj);
        compiles.push(c);
        objects.push(obj);
    }
    run_all(compiles)?;
    let lib = out.join(DRIVER_FILE);
    let mut link = Command::new(cxx());
    link.args(["-shared", "-pthread", "-Wl,-soname,libcuda.so", "-o"])
        .arg(&lib)
        .args(&objects)
        .arg("-ldl");
    run(link)?;
    Ok(lib)
}

/// The `extern "C" __global__` entry points of one source, with their launch bounds (an
/// expression, "0" when absent), from the preprocessed text.
pub fn scan_entries(emu: &Path, source: &Path) -> Result<Vec<(String, String)>, String> {
    let mut c = Command::new(cxx());
    c.args(common_flags(emu))
        .args([
            "-E",
            "-P",
            "-DINCEPTION_EMU_SCAN",
            "-x",
            "c++",
            "-include",
            "emu_cuda.h",
        ])
        .arg(source);
    let out = c
        .output()
        .map_err(|e| format!("cannot run the C++ preprocessor: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "preprocessing {} failed:\n{}",
            source.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(parse_entries(&String::from_utf8_lossy(&out.stdout)))
}

/// Finds `__emu_kernel__ void [__emu_launch_bounds__(EXPR)] NAME (` in preprocessed text.
fn parse_entries(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for piece in text.split("__emu_kernel__").skip(1) {
        let rest = piece.trim_start();
        let Some(rest) = rest.strip_prefix("void") else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut bounds = "0".to_string();
        if let Some(r) = rest.strip_prefix("__emu_launch_bounds__") {
            let r = r.trim_start();
            let mut depth = 0;
            let mut end = 0;
            for (i, ch) in r.char_indices() {
                match ch {
                    '(' => depth += 1,
                    ')' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            bounds = r[1..end].trim().to_string();
            rest = r[end + 1..].trim_start();
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            out.push((name, bounds));
        }
    }
    out
}

/// Builds the kernels library from the `.cu` files of `kernels` into `out`, linked against the
/// driver library at `driver` (for the runtime entry points the kernels call). With `racecheck`,
/// the kernels are instrumented for the shared-memory race checker. Returns the library's path.
pub fn build_kernels(
    emu: &Path,
    kernels: &Path,
    out: &Path,
    driver: &Path,
    racecheck: bool,
) -> Result<PathBuf, String> {
    let tag = if racecheck { "race" } else { "plain" };
    let work = out.join(format!("kernels-{tag}"));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let mut sources: Vec<PathBuf> = std::fs::read_dir(kernels)
        .map_err(|e| format!("reading {}: {e}", kernels.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    if sources.is_empty() {
        return Err(format!("no .cu files in {}", kernels.display()));
    }
    let mut flags = common_flags(emu);
    if racecheck {
        flags.push("-DINCEPTION_EMU_RACECHECK".into());
    }
    let mut compiles = Vec::new();
    let mut objects = Vec::new();
    for src in &sources {
        let stem = src.file_stem().unwrap().to_string_lossy().to_string();
        let mut unit = format!("#include \"{}\"\n#include \"registry.h\"\n", src.display());
        for (name, bounds) in scan_entries(emu, src)? {
            unit += &format!("EMU_REGISTER({name}, ({bounds}))\n");
        }
        let cpp = work.join(format!("{stem}.cpp"));
        std::fs::write(&cpp, unit).map_err(|e| e.to_string())?;
        let obj = work.join(format!("{stem}.o"));
        let mut c = Command::new(cxx());
        c.args(&flags).args(["-include", "emu_cuda.h"]);
        if racecheck {
            c.args([
                "-fsanitize=thread",
                "--param=tsan-instrument-func-entry-exit=0",
            ]);
        }
        c.arg("-c").arg(&cpp).arg("-o").arg(&obj);
        compiles.push(c);
        objects.push(obj);
    }
    let tls_obj = work.join("kernels_tls.o");
    let mut c = Command::new(cxx());
    c.args(&flags)
        .arg("-c")
        .arg(emu.join("runtime/kernels_tls.cpp"))
        .arg("-o")
        .arg(&tls_obj);
    compiles.push(c);
    objects.push(tls_obj);
    run_all(compiles)?;
    let lib = out.join(if racecheck {
        KERNELS_RACE_FILE
    } else {
        KERNELS_FILE
    });
    let mut link = Command::new(cxx());
    link.args(["-shared", "-pthread", "-Wl,--no-undefined", "-o"])
        .arg(&lib)
        .args(&objects)
        .arg(driver);
    run(link)?;
    Ok(lib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_entries_with_and_without_launch_bounds() {
        let text = "extern \"C\" __emu_kernel__ void relu_fwd(const __half* x) { }\n\
                    extern \"C\" __emu_kernel__ void __emu_launch_bounds__(2 * 4 * 32) conv_a(const ConvParams p) {}\n\
                    __emu_kernel__ int not_a_kernel;";
        assert_eq!(
            parse_entries(text),
            vec![
                ("relu_fwd".to_string(), "0".to_string()),
                ("conv_a".to_string(), "2 * 4 * 32".to_string())
            ]
        );
    }
}
