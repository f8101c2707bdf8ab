//! Executors of a plan: the CPU reference backend and the CUDA backend, behind one trait that the
//! training loop, evaluation and prediction drive.

pub mod cpu;
pub mod cuda;

use crate::ops::normalize::{normalize_u8, Factors};
use crate::optim::{LossScaler, RmsProp};
use crate::params::ModelState;
pub use crate::precision::Amp;
use anyhow::Result;

/// What one training step did.
#[derive(Clone, Copy, Debug)]
pub struct StepOutcome {
    /// The step (as passed to [`Backend::train_step`]) this outcome is about.
    pub step: u64,
    /// Mean loss of the batch (unscaled).
    pub loss: f32,
    /// The step was skipped because the gradients overflowed.
    pub skipped: bool,
    /// The dynamic loss scale changed: (old, new).
    pub scale_changed: Option<(f32, f32)>,
}

/// A batch of input images, NHWC: normalised f32, or the loader's u8 pixels with the factors
/// that normalise them (the CUDA trainer uploads these and normalises on the device).
#[derive(Clone, Copy, Debug)]
pub enum Images<'a> {
    F32(&'a [f32]),
    U8 { pixels: &'a [u8], norm: Factors },
}

impl Images<'_> {
    /// Values in the batch (`n * h * w * 3`).
    pub fn len(&self) -> usize {
        match self {
            Images::F32(v) => v.len(),
            Images::U8 { pixels, .. } => pixels.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The normalised f32 batch (borrowed when it is one already).
    pub fn to_f32(&self) -> std::borrow::Cow<'_, [f32]> {
        match *self {
            Images::F32(v) => v.into(),
            Images::U8 { pixels, norm } => {
                let mut out = vec![0.0; pixels.len()];
                normalize_u8(pixels, &mut out, &norm);
                out.into()
            }
        }
    }
}

/// The batch format a backend's training step takes best.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFormat {
    /// Normalised f32, packed by the loader.
    F32,
    /// The loader's u8 pixels, normalised by the backend.
    U8,
}

/// A backend that can train and run a fixed-shape plan.
pub trait Backend {
    /// Short name for logs, e.g. "cpu".
    fn name(&self) -> String;
    /// Forward, backward, loss-scale check and optimizer update on one batch. Returns the
    /// outcomes settled by this call, in step order: this step's on the CPU; the previous step's
    /// on CUDA, which reads a step's report only after queueing the next so the GPU never waits
    /// for the host (under dynamic scaling it keeps the scaler on the device and updates `scaler`
    /// to match as the reports arrive). [`Backend::settle`] collects what is still pending.
    fn train_step(
        &mut self,
        images: Images<'_>,
        labels: &[u32],
        step: u64,
        lr: f32,
        scaler: &mut LossScaler,
    ) -> Result<Vec<StepOutcome>>;
    /// The batch format [`Backend::train_step`] takes best (f32 unless the backend says so).
    fn input_format(&self) -> InputFormat {
        InputFormat::F32
    }
    /// The outcomes of steps not reported yet; afterwards `scaler` holds the state after the last
    /// step. Call it before saving the scaler, evaluating, or stopping.
    fn settle(&mut self, _scaler: &mut LossScaler) -> Result<Vec<StepOutcome>> {
        Ok(Vec::new())
    }
    /// Inference forward on one batch: the logits `[batch, classes]`.
    fn infer(&mut self, images: &[f32]) -> Result<Vec<f32>>;
    /// The current weights, BN statistics and optimizer state, copied to the host.
    fn state(&mut self) -> Result<(ModelState, RmsProp)>;
    /// The BN running statistics (the flat state buffer), copied to the host.
    fn bn_states(&mut self) -> Result<Vec<f32>> {
        Ok(self.state()?.0.states)
    }
    /// Replaces the BN running statistics (a distributed run averages them over the ranks).
    fn set_bn_states(&mut self, _states: &[f32]) -> Result<()> {
        anyhow::bail!(
            "the {} backend cannot replace its BN statistics",
            self.name()
        )
    }
}

/// Which device a command asked for.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda,
}

impl Amp {
    /// The level a device trains at when `--amp` is not given: O2 on CUDA, fp32 on the CPU.
    pub fn default_for(device: Device) -> Amp {
        match device {
            Device::Cuda => Amp::O2,
            Device::Cpu | Device::Auto => Amp::O0,
        }
    }
}

/// The precision level a run uses, resolved once: `--amp` when given, else the device's default;
/// the CPU trains in fp32 only, so anything else there is an error.
pub fn resolve_amp(device: Device, amp: Option<Amp>) -> Result<Amp> {
    let amp = amp.unwrap_or(Amp::default_for(device));
    if device != Device::Cuda && amp != Amp::O0 {
        anyhow::bail!("--amp {amp:?} needs the CUDA backend; the CPU runs fp32 (O0)");
    }
    Ok(amp)
}

/// The training backend for a resolved device and level ([`resolve_amp`]): the CPU reference
/// (fp32 only) or the CUDA trainer.
pub fn build(
    device: Device,
    amp: Amp,
    plan: crate::plan::Plan,
    model: ModelState,
    optim: RmsProp,
) -> Result<Box<dyn Backend>> {
    let amp = resolve_amp(device, Some(amp))?;
    match device {
        Device::Cuda => Ok(Box::new(cuda::CudaTrainer::new(plan, model, optim, amp)?)),
        Device::Cpu | Device::Auto => Ok(Box::new(cpu::CpuTrainer::new(plan, model, optim)?)),
    }
}

/// The training backend of one rank of a data-parallel run: like [`build`], with `reducer`
/// summing every step's gradients over the ranks. On CUDA the rank takes GPU `ordinal` (its
/// local rank); with `nccl` (the job's communicator and the elements per bucket) its gradients
/// are all-reduced by NCCL in buckets, else through host memory with `reducer`.
#[allow(clippy::too_many_arguments)]
pub fn build_distributed(
    device: Device,
    amp: Amp,
    ordinal: usize,
    plan: crate::plan::Plan,
    model: ModelState,
    optim: RmsProp,
    reducer: std::rc::Rc<dyn crate::dist::GradReducer>,
    nccl: Option<(&dyn crate::dist::Comm, usize)>,
) -> Result<Box<dyn Backend>> {
    let amp = resolve_amp(device, Some(amp))?;
    if device == Device::Cuda {
        let trainer = cuda::CudaTrainer::on_device(ordinal, plan, model, optim, amp)?;
        return Ok(Box::new(match (reducer.world(), nccl) {
            (1, _) => trainer,
            (_, Some((comm, bucket_elems))) => trainer.with_nccl(comm, bucket_elems)?,
            (_, None) => trainer.with_reducer(reducer),
        }));
    }
    if reducer.world() == 1 {
        return build(device, amp, plan, model, optim);
    }
    Ok(Box::new(
        cpu::CpuTrainer::new(plan, model, optim)?.with_reducer(reducer),
    ))
}

/// How a data-parallel run on `device` sums its gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncChoice {
    /// MPI through host memory (the CPU backend; CUDA without NCCL).
    Host,
    /// NCCL buckets on the GPU.
    Nccl,
}

/// Resolves `--grad-sync` for `device`; `find_nccl` is asked (once, only when it matters)
/// whether NCCL can be loaded and says from where. Returns the choice and a line for the log.
/// `nccl` on a device other than CUDA, or without the library, is an error naming why.
pub fn choose_grad_sync(
    mode: crate::dist::GradSyncMode,
    device: Device,
    find_nccl: impl FnOnce() -> Result<String>,
) -> Result<(SyncChoice, String)> {
    use crate::dist::GradSyncMode as M;
    let host = "gradients all-reduced through host memory over MPI (a device sync per step)";
    match (mode, device) {
        (M::Nccl, Device::Cuda) => {
            let from = find_nccl().map_err(|e| e.context("--grad-sync nccl"))?;
            Ok((
                SyncChoice::Nccl,
                format!("gradients all-reduced by NCCL ({from}) in buckets"),
            ))
        }
        (M::Nccl, _) => {
            anyhow::bail!("--grad-sync nccl needs --device cuda (the CPU backend sums over MPI)")
        }
        (M::Host, Device::Cuda) => Ok((
            SyncChoice::Host,
            format!("{host}, as --grad-sync host asks"),
        )),
        (M::Auto, Device::Cuda) => Ok(match find_nccl() {
            Ok(from) => (
                SyncChoice::Nccl,
                format!("gradients all-reduced by NCCL ({from}) in buckets"),
            ),
            Err(e) => (
                SyncChoice::Host,
                format!("{host}: NCCL is not usable ({e:#})"),
            ),
        }),
        (_, _) => Ok((
            SyncChoice::Host,
            "gradients all-reduced over MPI on the CPU".into(),
        )),
    }
}

/// A backend for evaluation and prediction: on CUDA an inference-only trainer on GPU `ordinal`
/// (no gradient or optimizer buffers, an arena sized for the forward pass); the CPU trainer
/// otherwise.
pub fn build_inference(
    device: Device,
    amp: Amp,
    ordinal: usize,
    plan: crate::plan::Plan,
    model: ModelState,
    optim: RmsProp,
) -> Result<Box<dyn Backend>> {
    match device {
        Device::Cuda => {
            let exec = cuda::CudaTrainer::for_inference_on(ordinal, plan, model, optim, amp)?;
            Ok(Box::new(exec))
        }
        Device::Cpu | Device::Auto => build(device, amp, plan, model, optim),
    }
}

/// Resolve `auto` (CUDA when a GPU is usable, else the CPU, saying so) and check that CUDA is
/// usable when asked for, with a clear message instead of a panic when it is not.
pub fn resolve_device(device: Device) -> Result<Device> {
    match device {
        Device::Cpu => Ok(Device::Cpu),
        Device::Cuda => {
            cuda_probe()?;
            Ok(Device::Cuda)
        }
        Device::Auto => match cuda_probe() {
            Ok(()) => {
                eprintln!("device auto: using the GPU (cuda)");
                Ok(Device::Cuda)
            }
            Err(e) => {
                eprintln!("device auto: using the CPU ({e:#})");
                Ok(Device::Cpu)
            }
        },
    }
}

/// Whether this machine can run the CUDA backend: the driver and NVRTC load and a GPU exists.
pub fn cuda_probe() -> Result<()> {
    crate::gpu::libs::ensure_driver()?;
    crate::gpu::libs::ensure_nvrtc()?;
    cudarc::driver::result::init()
        .map_err(|e| anyhow::anyhow!("the CUDA driver failed to initialise: {e:?}"))?;
    let count = cudarc::driver::result::device::get_count()
        .map_err(|e| anyhow::anyhow!("cannot count CUDA devices: {e:?}"))?;
    if count < 1 {
        anyhow::bail!("the CUDA driver reports no GPU");
    }
    Ok(())
}
