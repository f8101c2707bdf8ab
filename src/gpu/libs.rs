//! Finding the CUDA libraries and headers without a CUDA toolkit install.
//!
//! cudarc opens libraries by bare name (`libnvrtc.so.13`, ...) through dlopen, so it only sees
//! what LD_LIBRARY_PATH or the system paths hold. The pinned NVRTC comes from PyPI wheels
//! (site-packages/nvidia/cu13/lib), which are on neither. Setting LD_LIBRARY_PATH at run time
//! does not work (glibc reads it once at start-up), but dlopen by bare name returns an already
//! loaded library whose SONAME matches: so we dlopen the wheel's files by full path first, and
//! cudarc's later lookup finds them. Probing goes through `is_culib_present`, never through a call
//! that would panic.

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlerror() -> *const c_char;
}
const RTLD_NOW: c_int = 2;
const RTLD_GLOBAL: c_int = 0x100;

/// Folders that may hold a CUDA 13 install: the env overrides, the toolkit's usual place, and the
/// `nvidia/cu13` folder of every Python site-packages we can find.
pub(crate) fn cuda_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for var in ["INCEPTION_CUDA_HOME", "CUDA_HOME", "CUDA_PATH"] {
        if let Ok(v) = std::env::var(var) {
            roots.push(PathBuf::from(v));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    for sp in site_packages() {
        roots.push(sp.join("nvidia/cu13"));
        roots.push(sp.join("nvidia/cuda_nvrtc"));
        roots.push(sp.join("nvidia/cuda_runtime"));
    }
    roots.retain(|r| r.is_dir());
    roots
}

/// Python site-packages folders in the usual places (system, user, pyenv, venv, conda).
pub(crate) fn site_packages() -> Vec<PathBuf> {
    let home = std::env::var("HOME").unwrap_or_default();
    let mut prefixes: Vec<PathBuf> = ["/usr/lib", "/usr/local/lib", "/opt/conda/lib"]
        .iter()
        .map(PathBuf::from)
        .collect();
    prefixes.push(Path::new(&home).join(".local/lib"));
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Ok(v) = std::env::var(var) {
            prefixes.push(Path::new(&v).join("lib"));
        }
    }
    for v in subdirs(&Path::new(&home).join(".pyenv/versions")) {
        prefixes.push(v.join("lib"));
    }
    let mut out = Vec::new();
    for p in prefixes {
        for py in subdirs(&p)
            .into_iter()
            .filter(|d| file_name(d).starts_with("python3"))
        {
            out.push(py.join("site-packages"));
            out.push(py.join("dist-packages"));
        }
    }
    out.retain(|d| d.is_dir());
    out
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The install whose libnvrtc we preloaded: its headers match that NVRTC, so they come first.
static NVRTC_ROOT: OnceLock<PathBuf> = OnceLock::new();

/// Include folders holding cuda_fp16.h (and the CCCL headers beside it when present).
pub fn include_dirs() -> Vec<PathBuf> {
    let mut out = Vec::new();
    let roots = NVRTC_ROOT.get().cloned().into_iter().chain(cuda_roots());
    for root in roots {
        let inc = root.join("include");
        if inc.join("cuda_fp16.h").is_file() {
            out.push(inc.clone());
            if inc.join("cccl").is_dir() {
                out.push(inc.join("cccl"));
            }
            break;
        }
    }
    out
}

pub(crate) fn dlopen_path(path: &Path) -> bool {
    let Ok(c) = CString::new(path.to_string_lossy().as_bytes()) else {
        return false;
    };
    // SAFETY: dlopen with a valid NUL-terminated path; the handle is kept for the process lifetime.
    !unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_GLOBAL) }.is_null()
}

/// Makes libnvrtc loadable for cudarc, preloading the wheel's copy when the system has none.
/// Returns a clear error (not a panic) when it cannot be found.
pub fn ensure_nvrtc() -> anyhow::Result<()> {
    // SAFETY: is_culib_present only tries to dlopen candidate names.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Ok(());
    }
    for root in cuda_roots() {
        for lib in ["lib", "lib64"] {
            let dir = root.join(lib);
            // libnvrtc dlopens its builtins by bare name too: preload them first.
            for f in ["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"] {
                dlopen_path(&dir.join(f));
            }
        }
        // SAFETY: as above.
        if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            let _ = NVRTC_ROOT.set(root);
            return Ok(());
        }
    }
    anyhow::bail!(
        "libnvrtc (CUDA 13.0) not found: install it with `python3 -m pip install nvidia-cuda-nvrtc==13.0.88 \
         nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85`, or put its folder on LD_LIBRARY_PATH"
    )
}

/// Checks that the CUDA driver library (libcuda) can be loaded; a clear error otherwise.
///
/// `INCEPTION_CUDA_DRIVER=PATH` loads that library as the driver instead of the system's: the
/// emulated GPU of the tests (emu/, SONAME libcuda.so) is used this way. Opening it by full path
/// before cudarc's first lookup makes cudarc's `dlopen("libcuda.so")` return it, with no search.
pub fn ensure_driver() -> anyhow::Result<()> {
    if let Some(path) = std::env::var_os("INCEPTION_CUDA_DRIVER") {
        let path = PathBuf::from(path);
        if !dlopen_path(&path) {
            // SAFETY: dlerror returns null or a NUL-terminated message about the failed dlopen.
            let why = unsafe {
                let e = dlerror();
                if e.is_null() {
                    String::new()
                } else {
                    std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            anyhow::bail!(
                "INCEPTION_CUDA_DRIVER={}: the library could not be loaded: {why}",
                path.display()
            );
        }
    }
    // SAFETY: is_culib_present only tries to dlopen candidate names.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        return Ok(());
    }
    anyhow::bail!(
        "no CUDA driver: libcuda could not be loaded (no NVIDIA GPU or driver on this machine)"
    )
}
