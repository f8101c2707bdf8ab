//! NCCL through cudarc: finding the library, and a communicator over raw device addresses.
//!
//! Discovery. cudarc opens NCCL by bare name, and its candidates (`libnccl.so`, `libnccl.so.13`,
//! `.12`, ...) never include `libnccl.so.2`, the only name the PyPI wheel (nvidia-nccl-cu13 /
//! -cu12) ships. Preloading the wheel's file by full path is not enough here (unlike NVRTC, see
//! [`super::libs`]): glibc matches a bare name against a loaded library's SONAME, which is
//! `libnccl.so.2`. So after the real library we load a tiny alias built with the crate (see
//! build.rs): SONAME `libnccl.so`, one dependency `libnccl.so.2` (the already loaded file).
//! cudarc's `dlopen("libnccl.so")` then returns the alias, and its symbol lookups go through to
//! the real library. A machine with `libnccl.so` on the library path needs none of this.
//!
//! The communicator is driven with raw addresses on a stream the caller names, as every launcher
//! of the engine is: cudarc's typed wrappers would add their own cross-stream events, which
//! the bucket schedule already orders explicitly.

use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::CudaStream;
use cudarc::nccl::{result, sys};
use std::path::{Path, PathBuf};

use super::libs::{cuda_roots, dlopen_path, site_packages};
use super::DevPtr;

/// The alias library (empty when the build had no C compiler).
const ALIAS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libnccl_alias.so"));

/// File names of the NCCL library, most specific first.
const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// Folders that may hold NCCL: `INCEPTION_NCCL_HOME` and `NCCL_HOME` (the folder or its `lib`),
/// the wheel's `nvidia/nccl/lib` in every site-packages, the CUDA installs' `lib`/`lib64`, and the
/// system's library folders.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["INCEPTION_NCCL_HOME", "NCCL_HOME"] {
        if let Some(v) = std::env::var_os(var) {
            let v = PathBuf::from(v);
            dirs.extend([v.clone(), v.join("lib")]);
        }
    }
    for sp in site_packages() {
        dirs.push(sp.join("nvidia/nccl/lib"));
    }
    for root in cuda_roots() {
        dirs.extend([root.join("lib"), root.join("lib64")]);
    }
    for sys in ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/lib"] {
        dirs.push(PathBuf::from(sys));
    }
    dirs.dedup();
    dirs
}

/// The first NCCL library file in `dirs` (by [`NAMES`] order within each folder), or an error
/// naming every path tried.
pub fn find_library(dirs: &[PathBuf]) -> Result<PathBuf> {
    let mut tried = Vec::new();
    for dir in dirs {
        for name in NAMES {
            let path = dir.join(name);
            if path.is_file() {
                return Ok(path);
            }
            tried.push(path.display().to_string());
        }
    }
    bail!(
        "NCCL not found: cudarc could not open libnccl.so by name, and none of these exists: \
         [{}]. Install it with `python3 -m pip install nvidia-nccl-cu13` (the wheel's \
         libnccl.so.2 is found in site-packages), or set INCEPTION_NCCL_HOME to its folder",
        tried.join(", ")
    )
}

/// Whether cudarc can open NCCL now.
fn loadable() -> bool {
    // SAFETY: is_culib_present only tries to dlopen candidate names.
    unsafe { sys::is_culib_present() }
}

/// Makes NCCL loadable for cudarc (see the module doc); a clear error, never a panic, when it
/// cannot be found or loaded. Returns where it came from, for the log.
pub fn ensure_nccl() -> Result<String> {
    if loadable() {
        return Ok("libnccl.so on the library path".into());
    }
    let lib = find_library(&search_dirs())?;
    if !dlopen_path(&lib) {
        bail!("{} exists but could not be loaded", lib.display());
    }
    load_alias(&lib)?;
    if !loadable() {
        bail!(
            "{} was loaded but cudarc still cannot open libnccl.so; put a link named libnccl.so \
             to it on LD_LIBRARY_PATH before starting",
            lib.display()
        );
    }
    Ok(lib.display().to_string())
}

/// Writes the alias to a private temporary file, loads it, and removes the file (the loaded
/// mapping stays).
fn load_alias(lib: &Path) -> Result<()> {
    if ALIAS.is_empty() {
        bail!(
            "found {} but this binary was built without a C compiler, so it has no libnccl.so \
             alias: put a link named libnccl.so to it on LD_LIBRARY_PATH before starting",
            lib.display()
        );
    }
    let path = std::env::temp_dir().join(format!(
        "inception-engine-libnccl-alias-{}.so",
        std::process::id()
    ));
    std::fs::write(&path, ALIAS).with_context(|| format!("writing {}", path.display()))?;
    let loaded = dlopen_path(&path);
    let _ = std::fs::remove_file(&path);
    if !loaded {
        bail!(
            "the libnccl.so alias for {} could not be loaded",
            lib.display()
        );
    }
    Ok(())
}

/// NCCL's version as a number (2.27.3 is 22703).
pub fn version() -> Result<i32> {
    ensure_nccl()?;
    result::get_nccl_version().map_err(|e| anyhow!("ncclGetVersion failed: {e:?}"))
}

/// A fresh NCCL unique id (rank 0 makes it; the others receive it by MPI broadcast).
pub fn unique_id() -> Result<Vec<u8>> {
    ensure_nccl()?;
    let id = result::get_uniqueid().map_err(|e| anyhow!("ncclGetUniqueId failed: {e:?}"))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// One rank's NCCL communicator. Dropping it aborts it (never blocks on peers that are gone).
pub struct NcclComm {
    comm: sys::ncclComm_t,
    world: usize,
}

impl NcclComm {
    /// Joins the communicator of `world` ranks named by `id` (the bytes of rank 0's
    /// [`unique_id`]) as `rank`, on the current CUDA context's device. Blocks until every rank
    /// has joined.
    pub fn init(id: &[u8], rank: usize, world: usize) -> Result<Self> {
        ensure_nccl()?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id.len() != internal.len() {
            bail!("an NCCL unique id is 128 bytes, got {}", id.len());
        }
        for (d, &s) in internal.iter_mut().zip(id) {
            *d = s as std::ffi::c_char;
        }
        if rank >= world {
            bail!("NCCL rank {rank} is outside a world of {world}");
        }
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: comm is written by ncclCommInitRank on success and read only then.
        let comm = unsafe {
            result::comm_init_rank(
                comm.as_mut_ptr(),
                world as i32,
                sys::ncclUniqueId { internal },
                rank as i32,
            )
            .map_err(|e| anyhow!("ncclCommInitRank (rank {rank} of {world}) failed: {e:?}"))?;
            comm.assume_init()
        };
        Ok(NcclComm { comm, world })
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Queues the in-place sum of `count` fp32 elements at `ptr` over every rank on `stream`.
    pub fn all_reduce_sum_f32(&self, ptr: DevPtr, count: usize, stream: &CudaStream) -> Result<()> {
        // SAFETY: ptr addresses `count` f32 on this communicator's device (the caller's buffer);
        // the call only queues work on `stream`.
        unsafe {
            result::all_reduce(
                ptr as *const std::ffi::c_void,
                ptr as *mut std::ffi::c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|e| anyhow!("ncclAllReduce of {count} floats failed: {e:?}"))?;
        Ok(())
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator was initialised and is not used after this.
        let _ = unsafe { result::comm_abort(self.comm) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_names_every_path_searched() {
        let dirs = vec![PathBuf::from("/nowhere/a"), PathBuf::from("/nowhere/b")];
        let e = find_library(&dirs).unwrap_err().to_string();
        for p in [
            "/nowhere/a/libnccl.so.2",
            "/nowhere/a/libnccl.so",
            "/nowhere/b/libnccl.so.2",
        ] {
            assert!(e.contains(p), "{e}");
        }
        assert!(e.contains("nvidia-nccl-cu13"), "{e}");
    }

    #[test]
    fn the_wheel_name_is_preferred_in_a_folder() {
        let dir = std::env::temp_dir().join(format!("nccl-find-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for n in NAMES {
            std::fs::write(dir.join(n), b"").unwrap();
        }
        let found = find_library(std::slice::from_ref(&dir)).unwrap();
        assert_eq!(found, dir.join("libnccl.so.2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_alias_was_built() {
        // The build machines have a C compiler; an empty alias would silently need a link.
        assert!(ALIAS.len() > 1000, "{} bytes", ALIAS.len());
    }
}
