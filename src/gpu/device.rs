//! The device context: one CUDA context and stream, every kernel compiled (NVRTC, cached) and
//! loaded for the card's architecture, and the registry of shapes whose fast kernels passed the
//! self-test.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig};
use cudarc::nvrtc::Ptx;

use super::paths::KernelPaths;
use super::{libs, nvrtc};
use crate::precision::Amp;

/// A raw device address (`CUdeviceptr`), as carved out of the arena. Launchers take these so they
/// never allocate and work on any sub-range of one big allocation.
pub type DevPtr = u64;

/// Largest element count of one grid-stride launch (see GRID_STRIDE in kernels/common.cuh).
pub const MAX_ELEMENTS: u64 = 1 << 31;

/// Threads per block of the elementwise and gather kernels.
pub const BLOCK: u32 = 256;

/// One kernel launch (or a short fixed sequence of them) with every operand resolved. Each op's
/// launchers are such values, so a step is a list of them that the device runs, a host test
/// inspects and a CUDA graph can capture.
pub trait Launch {
    /// Queues the launch on the device's stream.
    fn launch(&self, dev: &CudaDevice) -> Result<()>;
}

/// The entry points of one kernel at the precision levels `[O0, O2, O3]`: the unsuffixed name is
/// the O2 kernel, `_o0` takes fp32 activations, `_o3` (BN only) fp16 gamma/beta and saved
/// statistics (see kernels/common.cuh). A kernel without an O3 variant repeats its O2 name. The
/// launchers spell the three names out as literals, so tests/kernel_signatures.rs checks each
/// against the launch's arguments.
pub type AmpVariants = [&'static str; 3];

/// The entry point of `v` for precision level `amp`.
pub fn amp_variant(amp: Amp, v: AmpVariants) -> &'static str {
    match amp {
        Amp::O0 => v[0],
        Amp::O2 => v[1],
        Amp::O3 => v[2],
    }
}

pub struct CudaDevice {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    /// The device's name as the driver reports it ("... (emulated on CPU)" on the emulated GPU).
    pub device_name: String,
    /// Compile target, e.g. `sm_90a` on an H200.
    pub arch: String,
    pub num_sms: u32,
    funcs: HashMap<String, CudaFunction>,
    verified: Mutex<HashSet<String>>,
    /// Kernels whose dynamic shared memory limit was raised ([`CudaDevice::opt_in_smem`]).
    smem_opted: Mutex<HashSet<String>>,
    /// Use fast kernels even for shapes the self-test has not passed (benchmarks; the self-test).
    pub trust_unverified: bool,
    /// Precision level of the tensors the launchers are given (O2 unless set): picks each
    /// launcher's kernel entry point ([`AmpVariants`]), and at O0 keeps convolutions on the plain
    /// kernels. The caller must pass tensors of the matching types (see src/backend/cuda/mod.rs).
    pub amp: Amp,
    /// The leaner step's changes this device's launchers and the trainer use, or the paths they
    /// replaced (`INCEPTION_KERNELS`; see [`KernelPaths`]).
    pub paths: KernelPaths,
}

/// The NVRTC architecture for a compute capability: the `a` variant on Hopper (sm_90a) so
/// architecture-specific instructions are allowed.
pub fn arch_for(major: i32, minor: i32) -> String {
    if major == 9 {
        format!("sm_{major}{minor}a")
    } else {
        format!("sm_{major}{minor}")
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`, compiles (or loads from cache) and loads every kernel. A machine
    /// without the CUDA driver or NVRTC gets an error, never a panic.
    pub fn new(ordinal: usize) -> Result<Self> {
        libs::ensure_driver()?;
        libs::ensure_nvrtc()?;
        let ctx =
            CudaContext::new(ordinal).context("creating the CUDA context (is there a GPU?)")?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = arch_for(major, minor);
        let num_sms =
            ctx.attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
        let mut funcs = HashMap::new();
        for compiled in nvrtc::compile_all(&arch)? {
            // The CUBINs come from NVRTC 13.0: a driver older than CUDA 13 refuses them with a
            // bare driver error, so the message names the driver's version.
            let module = ctx
                .load_module(Ptx::from_binary(compiled.cubin.clone()))
                .with_context(|| {
                    format!(
                        "loading the CUBIN of {} (NVRTC 13.0 output; the driver supports CUDA {})",
                        compiled.file,
                        driver_cuda_version()
                    )
                })?;
            for k in &compiled.kernels {
                let f = module
                    .load_function(&k.name)
                    .with_context(|| format!("loading kernel {}", k.name))?;
                funcs.insert(k.name.clone(), f);
            }
        }
        let device_name = ctx.name()?;
        let registry = Self::registry_name(&arch, &device_name);
        // A stream of its own rather than the legacy default stream, which cannot be captured
        // into a CUDA graph (KernelPaths::graph).
        let stream = ctx
            .new_stream()
            .context("creating the device's CUDA stream")?;
        let backend = Self {
            stream,
            device_name,
            ctx,
            verified: Mutex::new(Self::load_verified(&registry)),
            smem_opted: Mutex::new(HashSet::new()),
            arch,
            num_sms,
            funcs,
            trust_unverified: std::env::var("INCEPTION_TRUST_FAST_KERNELS").as_deref() == Ok("1"),
            amp: Amp::O2,
            paths: KernelPaths::from_env()?,
        };
        Ok(backend)
    }

    /// Lets kernel `name` launch with up to `bytes` of dynamic shared memory: above the default
    /// 48 KiB a kernel must opt in. The launcher that knows the kernel's need calls this before
    /// the launch; the attribute is set once per kernel.
    pub fn opt_in_smem(&self, name: &str, bytes: usize) -> Result<()> {
        if bytes <= 48 * 1024 || self.smem_opted.lock().unwrap().contains(name) {
            return Ok(());
        }
        self.func(name)?.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )?;
        self.smem_opted.lock().unwrap().insert(name.to_string());
        Ok(())
    }

    /// Switches the precision level of later launches (already queued work is unaffected).
    pub fn set_amp(&mut self, amp: Amp) {
        self.amp = amp;
    }

    /// The entry point of `v` at this backend's precision level.
    pub fn amp_kernel(&self, v: AmpVariants) -> &'static str {
        amp_variant(self.amp, v)
    }

    pub fn func(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs
            .get(name)
            .with_context(|| format!("kernel {name} is not loaded"))
    }

    pub fn kernel_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.funcs.keys().cloned().collect();
        v.sort();
        v
    }

    /// Records that the fast kernel identified by `key` passed its self-test.
    pub fn mark_verified(&self, key: String) {
        self.verified.lock().unwrap().insert(key);
    }

    /// The registry's name: the architecture, and `-emulated` for the emulated GPU, whose passes
    /// must not stand in for a real card's.
    fn registry_name(arch: &str, device_name: &str) -> String {
        if device_name.contains("emulated") {
            format!("{arch}-emulated")
        } else {
            arch.to_string()
        }
    }

    /// File holding the verified keys of this registry and exact kernel sources.
    fn verified_file(registry: &str) -> Option<PathBuf> {
        let name = format!("verified-{registry}-{}.txt", nvrtc::sources_digest());
        nvrtc::cache_dir().map(|d| d.join(name))
    }

    /// Keys verified by an earlier run with the same kernels on the same kind of device.
    fn load_verified(registry: &str) -> HashSet<String> {
        Self::verified_file(registry)
            .and_then(|f| std::fs::read_to_string(f).ok())
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Persists the verified keys next to the CUBIN cache (best effort), so later runs use the
    /// fast kernels without repeating the check.
    pub fn save_verified(&self) -> Result<()> {
        let Some(file) = Self::verified_file(&Self::registry_name(&self.arch, &self.device_name))
        else {
            return Ok(());
        };
        let mut keys: Vec<String> = self.verified.lock().unwrap().iter().cloned().collect();
        keys.sort();
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&file, keys.join("\n") + "\n")
            .with_context(|| format!("writing {}", file.display()))
    }

    pub fn is_verified(&self, key: &str) -> bool {
        self.trust_unverified || self.verified.lock().unwrap().contains(key)
    }

    /// Whether this is the emulated GPU of the tests (emu/): the real kernels run on the CPU.
    pub fn is_emulated(&self) -> bool {
        self.device_name.contains("emulated")
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().context("CUDA stream synchronize")
    }

    /// One thread per channel: the per-channel finalise and bias kernels.
    pub fn grid_channels(&self, c: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (c.div_ceil(BLOCK as usize) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A 1-D grid for a grid-stride kernel over `count` items: enough blocks to fill the GPU, no
    /// more than the work needs. The kernels index with 32 bits, so counts above 2^31 are refused.
    pub fn grid_1d(&self, count: u64) -> Result<LaunchConfig> {
        if count > MAX_ELEMENTS {
            anyhow::bail!(
                "{count} elements exceed the kernels' 32-bit index range ({MAX_ELEMENTS})"
            );
        }
        let want = count.div_ceil(BLOCK as u64).max(1);
        let cap = self.num_sms as u64 * 16;
        Ok(LaunchConfig {
            grid_dim: (want.min(cap) as u32, 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        })
    }
}

/// The CUDA version the driver supports, e.g. "13.0" ("unknown" when the query fails).
fn driver_cuda_version() -> String {
    let mut v: std::ffi::c_int = 0;
    // SAFETY: cuDriverGetVersion writes one int; the driver library is loaded (ensure_driver).
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r == cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        format!("{}.{}", v / 1000, v % 1000 / 10)
    } else {
        "unknown".into()
    }
}

/// Launches per entry point queued by this process (any device instance): `selftest` lists the
/// entry points as `entry_points_run`, and the total counts a step's launches.
static LAUNCHED: Mutex<Option<HashMap<String, u64>>> = Mutex::new(None);

/// Records that kernel `name` was queued for launch.
pub fn note_launch(name: &str) {
    let mut map = LAUNCHED.lock().unwrap();
    let map = map.get_or_insert_with(HashMap::new);
    match map.get_mut(name) {
        Some(n) => *n += 1,
        None => {
            map.insert(name.to_string(), 1);
        }
    }
}

/// The entry points launched so far, sorted.
pub fn launched_entry_points() -> Vec<String> {
    let map = LAUNCHED.lock().unwrap();
    let mut v: Vec<String> = map.iter().flat_map(|m| m.keys().cloned()).collect();
    v.sort();
    v
}

/// Launches queued so far by this process of the entry points whose names contain `part`.
pub fn launches_matching(part: &str) -> u64 {
    let map = LAUNCHED.lock().unwrap();
    map.iter()
        .flat_map(|m| m.iter())
        .filter(|(name, _)| name.contains(part))
        .map(|(_, n)| n)
        .sum()
}

/// Kernel launches queued so far by this process.
pub fn launches_queued() -> u64 {
    LAUNCHED
        .lock()
        .unwrap()
        .iter()
        .flat_map(|m| m.values())
        .sum()
}

/// Launches kernel `$name` of device `$b` with config `$cfg` and the listed arguments: local
/// variables of `DeviceRepr` types (locals, so the references the builder keeps stay alive).
#[macro_export]
#[doc(hidden)]
macro_rules! cuda_launch {
    ($b:expr, $name:expr, $cfg:expr $(, $arg:ident)* $(,)?) => {{
        use cudarc::driver::PushKernelArg as _;
        let f = $b.func($name)?;
        $crate::gpu::device::note_launch($name);
        let mut builder = $b.stream.launch_builder(f);
        $( builder.arg(&$arg); )*
        // SAFETY: the argument list matches the kernel's C signature (kept in sync with
        // kernels/*.cu) and the pointers are device addresses of live buffers supplied by the caller.
        unsafe { builder.launch($cfg) }.map(|_| ()).with_context(|| format!("launching {}", $name))
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amp_variant_picks_the_entry_point_of_each_level() {
        let v = ["bn_apply_o0", "bn_apply", "bn_apply_o3"];
        assert_eq!(amp_variant(Amp::O0, v), "bn_apply_o0");
        assert_eq!(amp_variant(Amp::O2, v), "bn_apply");
        assert_eq!(amp_variant(Amp::O3, v), "bn_apply_o3");
    }
}
