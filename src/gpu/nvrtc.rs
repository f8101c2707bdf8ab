//! Compiling the embedded kernels with NVRTC to CUBINs for one architecture, with a disk cache and
//! the ptxas resource report (registers, spills, shared memory) of every kernel.

use std::ffi::{c_char, CString};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cudarc::nvrtc::{result, sys};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{libs, sources};

/// Resources ptxas reported for one kernel.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct KernelInfo {
    pub name: String,
    pub arch: String,
    pub registers: u32,
    /// Spill stores plus spill loads, in bytes. Anything but zero fails the compile check.
    pub spill_bytes: u32,
    /// Static shared memory; the tensor-core convolutions add dynamic shared memory at launch.
    pub shared_bytes: u32,
    pub stack_bytes: u32,
}

/// One compiled source file.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub file: String,
    pub cubin: Vec<u8>,
    pub log: String,
    pub kernels: Vec<KernelInfo>,
}

/// NVRTC options for an architecture such as `sm_90a` or `sm_80`.
fn options(arch: &str) -> Vec<String> {
    let mut o = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "--ptxas-options=-v".into(),
        "-DNDEBUG".into(),
    ];
    o.extend(
        libs::include_dirs()
            .iter()
            .map(|d| format!("-I{}", d.display())),
    );
    o
}

/// Where CUBINs are cached: $INCEPTION_CACHE_DIR, else $XDG_CACHE_HOME or ~/.cache, under
/// inception-engine/.
pub(crate) fn cache_dir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("INCEPTION_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .ok()?;
    Some(base.join("inception-engine"))
}

/// Digest of every embedded kernel source and header: names state that is only valid for this
/// exact kernel code (the registry of verified shapes).
pub fn sources_digest() -> String {
    let mut h = Sha256::new();
    for (n, src) in sources::SOURCES.iter().chain(sources::HEADERS) {
        h.update(n.as_bytes());
        h.update(src.as_bytes());
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Cache key: the source, every header, the architecture and the options (which carry the include
/// folder, hence the toolkit version).
fn cache_key(file: &str, src: &str, opts: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(file.as_bytes());
    h.update(src.as_bytes());
    for (n, s) in sources::HEADERS {
        h.update(n.as_bytes());
        h.update(s.as_bytes());
    }
    for o in opts {
        h.update(o.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn cache_load(key: &str) -> Option<(Vec<u8>, String)> {
    let dir = cache_dir()?;
    let cubin = std::fs::read(dir.join(format!("{key}.cubin"))).ok()?;
    let log = std::fs::read_to_string(dir.join(format!("{key}.log"))).ok()?;
    Some((cubin, log))
}

/// Best effort: a read-only home just means no cache. Writes go through a temporary name so a
/// concurrent reader never sees half a file.
fn cache_store(key: &str, cubin: &[u8], log: &str) {
    let Some(dir) = cache_dir() else { return };
    if std::fs::create_dir_all(&dir).is_err() {
        return;
    }
    let pid = std::process::id();
    for (ext, bytes) in [("cubin", cubin), ("log", log.as_bytes())] {
        let tmp = dir.join(format!("{key}.{ext}.{pid}.tmp"));
        if std::fs::write(&tmp, bytes).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(format!("{key}.{ext}")));
        }
    }
}

/// Compiles one embedded source file for `arch`, from the cache when possible.
pub fn compile(file: &str, arch: &str) -> Result<Compiled> {
    let src = sources::source(file).with_context(|| format!("no embedded kernel source {file}"))?;
    libs::ensure_nvrtc()?;
    let opts = options(arch);
    if libs::include_dirs().is_empty() {
        bail!("cuda_fp16.h not found: install nvidia-cuda-runtime==13.0.96 or set CUDA_HOME");
    }
    let key = cache_key(file, src, &opts);
    let (cubin, log) = match cache_load(&key) {
        Some(hit) => hit,
        None => {
            let (cubin, log) = nvrtc_compile(file, src, &opts)?;
            cache_store(&key, &cubin, &log);
            (cubin, log)
        }
    };
    let kernels = parse_ptxas_log(&log, arch);
    Ok(Compiled {
        file: file.to_string(),
        cubin,
        log,
        kernels,
    })
}

/// Compiles every embedded source file for `arch`.
pub fn compile_all(arch: &str) -> Result<Vec<Compiled>> {
    sources::SOURCES
        .iter()
        .map(|(f, _)| compile(f, arch))
        .collect()
}

fn cstring(s: &str) -> Result<CString> {
    CString::new(s).context("kernel source contains a NUL byte")
}

/// Runs NVRTC: returns the CUBIN and the log, or the log as the error.
fn nvrtc_compile(file: &str, src: &str, opts: &[String]) -> Result<(Vec<u8>, String)> {
    let c_src = cstring(src)?;
    let c_name = cstring(file)?;
    let hdr_src: Vec<CString> = sources::HEADERS
        .iter()
        .map(|(_, s)| cstring(s))
        .collect::<Result<_>>()?;
    let hdr_name: Vec<CString> = sources::HEADERS
        .iter()
        .map(|(n, _)| cstring(n))
        .collect::<Result<_>>()?;
    let hdr_src_p: Vec<*const c_char> = hdr_src.iter().map(|c| c.as_ptr()).collect();
    let hdr_name_p: Vec<*const c_char> = hdr_name.iter().map(|c| c.as_ptr()).collect();
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live CString for the duration of the call, and the counts
    // match the arrays.
    unsafe {
        sys::nvrtcCreateProgram(
            &mut prog,
            c_src.as_ptr(),
            c_name.as_ptr(),
            hdr_src_p.len() as i32,
            hdr_src_p.as_ptr(),
            hdr_name_p.as_ptr(),
        )
        .result()
        .context("nvrtcCreateProgram")?;
    }
    // SAFETY: prog was created above and is destroyed exactly once, after its last use.
    let out = unsafe { compile_program(prog, opts) };
    unsafe {
        let _ = result::destroy_program(prog);
    }
    let (ok, log, cubin) = out?;
    if !ok {
        bail!("NVRTC failed to compile {file}:\n{log}");
    }
    Ok((cubin, log))
}

/// Compiles `prog`; returns (success, log, cubin).
///
/// # Safety
/// `prog` must be a live NVRTC program.
unsafe fn compile_program(
    prog: sys::nvrtcProgram,
    opts: &[String],
) -> Result<(bool, String, Vec<u8>)> {
    let ok = result::compile_program(prog, opts).is_ok();
    let raw = result::get_program_log(prog).context("nvrtcGetProgramLog")?;
    let bytes: Vec<u8> = raw
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    let log = String::from_utf8_lossy(&bytes).into_owned();
    if !ok {
        return Ok((false, log, Vec::new()));
    }
    let mut size = 0usize;
    sys::nvrtcGetCUBINSize(prog, &mut size)
        .result()
        .context("nvrtcGetCUBINSize")?;
    let mut cubin = vec![0u8; size];
    sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char)
        .result()
        .context("nvrtcGetCUBIN")?;
    Ok((true, log, cubin))
}

/// Extracts per-kernel resources from ptxas' verbose output, which reads like:
/// `ptxas info    : Compiling entry function 'k' for 'sm_90a'`
/// `ptxas info    : Function properties for k`
/// `    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads`
/// `ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]`
pub fn parse_ptxas_log(log: &str, arch: &str) -> Vec<KernelInfo> {
    let mut out: Vec<KernelInfo> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(KernelInfo {
                name,
                arch: arch.to_string(),
                ..Default::default()
            });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            k.stack_bytes = number_before(line, "bytes stack frame");
            k.spill_bytes = number_before(line, "bytes spill stores")
                + number_before(line, "bytes spill loads");
        } else if line.contains("Used") && line.contains("registers") {
            k.registers = number_before(line, "registers");
            k.shared_bytes = number_before(line, "bytes smem");
        }
    }
    out
}

/// The integer just before `marker` in `line` (0 when absent).
fn number_before(line: &str, marker: &str) -> u32 {
    let Some(pos) = line.find(marker) else {
        return 0;
    };
    line[..pos]
        .split(|c: char| !c.is_ascii_digit())
        .rev()
        .find(|s| !s.is_empty())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_report() {
        let log = "ptxas info    : Compiling entry function 'k1' for 'sm_90a'\n\
                   ptxas info    : Function properties for k1\n\
                   \x20   8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
                   ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]\n\
                   ptxas info    : Compiling entry function 'k2' for 'sm_90a'\n\
                   ptxas info    : Used 12 registers, 380 bytes cmem[0]\n";
        let k = parse_ptxas_log(log, "sm_90a");
        assert_eq!(k.len(), 2);
        assert_eq!(
            (
                k[0].registers,
                k[0].spill_bytes,
                k[0].shared_bytes,
                k[0].stack_bytes
            ),
            (40, 8, 4096, 8)
        );
        assert_eq!(
            (k[1].name.as_str(), k[1].registers, k[1].spill_bytes),
            ("k2", 12, 0)
        );
    }
}
