//! The CUDA training backend: a plan's step program over one preallocated device arena.
//!
//! Memory (all allocated when the trainer is built, nothing during a step):
//! - the arena: activations, BN saved statistics and activation gradients, placed over the fused
//!   step program's lifetimes (see [`Fusion`](super::fusion::Fusion): BN outputs a ReLU absorbs
//!   are never stored, and
//!   concat branches live in their slices of the block output). Element sizes follow the AMP level
//!   (see [`arena::elem_bytes`]);
//! - parameter buffers over padded slots ([`ParamSlots`]): fp32 master weights, the fp16 working
//!   copy the convolutions and the FC layer read (O2/O3; O0 reads the masters), fp32 gradients,
//!   RMSProp ms and mom, a per-element weight-decay mask; BN running statistics in fp32. An
//!   inference-only trainer ([`CudaTrainer::for_inference`]) has only the masters, the working
//!   copy and the statistics, and an arena planned over the forward pass alone;
//! - one fp32 workspace shared by every split-K weight gradient and BN reduction;
//! - staging: the fp32 batch and labels (filled from pinned host buffers by async copies), the
//!   padded stem input and weights, per-sample losses and the step report; on the
//!   `KernelPaths::u8_input` path a training batch arrives as u8 through [`U8Staging`] (a copy
//!   stream into two device images) and is normalised into the fp32 batch on the device.
//!
//! Synchronisation policy: launches are queued on the device's stream (plus, in a data-parallel
//! run on NCCL, the buckets' all-reduces on a communication stream ordered by events, see
//! [`super::nccl_sync`]) and nothing waits while a step is being queued. Each training step's
//! report (loss, overflow flag, loss scale, clean-step count: `REPORT_WORDS` words) is copied
//! after its last launch into one of two pinned slots, and the host reads it only after queueing
//! the next step, so the GPU never waits for the host: `train_step` returns the previous step's
//! outcome, and [`Backend::settle`] collects the last one (see `trainer/report.rs`). Under
//! dynamic scaling the scaler lives on the device: softmax-CE and RMSProp read the scale from
//! memory, RMSProp skips itself on the overflow flag and `loss_scale_update` halves or grows the
//! scale; the host's [`LossScaler`] replays the reported flags and must land on the reported
//! scale.
//!
//! An error of an asynchronous kernel surfaces at the next wait, possibly one step later.

use anyhow::{bail, Result};
use half::f16;
use rayon::prelude::*;
use std::rc::Rc;

use super::arena::{self, MemoryEstimate};
use super::buffers::{
    check_batch, check_free_memory, check_state, oom_error, DeviceBuffers, Pinned,
};
use super::calls::Calls;
use super::grad_sync::{GradSync, StepQueue};
use super::graph::{run_calls, StepGraphs};
use super::layout::{StepArgs, StepLayout};
use super::layout::{REPORT_OVERFLOW, REPORT_SCALE};
use super::nccl_sync::NcclSync;
use super::staging::U8Staging;
use super::verify::verify_fast_convs;
use crate::backend::{Backend, Images, InputFormat, StepOutcome};
use crate::dist::{Comm, GradReducer};
use crate::gpu::{CudaDevice, KernelPaths, Launch};
use crate::ops::softmax_ce::cuda::ScaleArg;
use crate::optim::{LossScaler, RmsProp};
use crate::params::{ModelState, ParamLayout};
use crate::plan::Plan;
use crate::precision::Amp;

mod probe;
mod report;

use report::Pending;

pub struct CudaTrainer {
    dev: CudaDevice,
    /// The step program and where every tensor lives (plan, fusion, arena offsets, slots).
    step: StepLayout,
    layout: ParamLayout,
    estimate: MemoryEstimate,
    optim: RmsProp,
    bufs: DeviceBuffers,
    pinned: Pinned,
    pending: Option<Pending>,
    /// Built for training (else inference only: no gradient or optimizer buffers).
    train: bool,
    /// The inference pass's calls, built once.
    infer_calls: Calls,
    /// The training step's calls, built for the loss scaling they were resolved with (rebuilt
    /// only when the scaler's kind or fixed value changes); per step only the step number and
    /// learning rate are patched in.
    train_calls: Option<(ScaleKey, Calls)>,
    /// The training calls captured as CUDA graphs (`KernelPaths::graph`), once per resolution of
    /// `train_calls`.
    graphs: Option<StepGraphs>,
    /// Data-parallel training: how the gradients are summed over the ranks between the backward
    /// pass and the overflow check.
    sync: GradSync,
    /// The u8 upload of training batches (`KernelPaths::u8_input`, training only).
    u8_staging: Option<U8Staging>,
}

/// What a training step's calls depend on besides addresses: the loss scale argument and the
/// dynamic scaler's growth interval.
type ScaleKey = (ScaleArg, Option<u32>);

impl CudaTrainer {
    /// Builds the step program, allocates everything on GPU 0 and uploads the model and optimizer.
    pub fn new(plan: Plan, model: ModelState, optim: RmsProp, amp: Amp) -> Result<Self> {
        Self::on_device(0, plan, model, optim, amp)
    }

    /// As [`Self::new`] with the kernel paths `paths` instead of `INCEPTION_KERNELS`'s (a
    /// benchmark timing several in one process).
    pub fn with_paths(
        paths: KernelPaths,
        plan: Plan,
        model: ModelState,
        optim: RmsProp,
        amp: Amp,
    ) -> Result<Self> {
        Self::with_paths_on(0, paths, plan, model, optim, amp)
    }

    /// As [`Self::with_paths`] on GPU `ordinal` (a benchmark's rank).
    pub fn with_paths_on(
        ordinal: usize,
        paths: KernelPaths,
        plan: Plan,
        model: ModelState,
        optim: RmsProp,
        amp: Amp,
    ) -> Result<Self> {
        Self::create(ordinal, plan, model, optim, amp, true, Some(paths))
    }

    /// As [`Self::new`] on GPU `ordinal` (a data-parallel rank's local rank; wraps around the
    /// GPUs present, so ranks share a card when there are fewer cards than ranks).
    pub fn on_device(
        ordinal: usize,
        plan: Plan,
        model: ModelState,
        optim: RmsProp,
        amp: Amp,
    ) -> Result<Self> {
        Self::create(ordinal, plan, model, optim, amp, true, None)
    }

    /// Data-parallel training: every step sums the gradients over the ranks with `reducer`
    /// before the overflow check and the update, and the update divides by the world size. The
    /// gradients go through host memory (a device sync per step): the slow, portable path.
    pub fn with_reducer(self, reducer: Rc<dyn GradReducer>) -> Self {
        self.with_sync(GradSync::Host(reducer))
    }

    /// Data-parallel training over NCCL: the job's communicator is set up through `comm` (the
    /// unique id broadcast by MPI), and each step all-reduces the gradients in buckets of
    /// `bucket_elems` on a second stream while the backward pass goes on.
    pub fn with_nccl(self, comm: &dyn Comm, bucket_elems: usize) -> Result<Self> {
        let sync = NcclSync::new(&self.dev, comm, bucket_elems)?;
        Ok(self.with_sync(GradSync::Nccl(sync)))
    }

    fn with_sync(mut self, sync: GradSync) -> Self {
        self.step.world = sync.world();
        self.train_calls = None; // the update's unscale factor changed
        self.graphs = None;
        self.sync = sync;
        self
    }

    /// How this trainer sums gradients over the ranks.
    pub fn grad_sync(&self) -> &GradSync {
        &self.sync
    }

    /// An inference-only trainer (eval, predict): its arena holds only what the forward pass
    /// needs, and no gradients, optimizer state or workspace are allocated. `optim` is kept on
    /// the host only, for [`Backend::state`].
    pub fn for_inference(plan: Plan, model: ModelState, optim: RmsProp, amp: Amp) -> Result<Self> {
        Self::create(0, plan, model, optim, amp, false, None)
    }

    /// As [`Self::for_inference`] on GPU `ordinal` (a sharded evaluation's local rank).
    pub fn for_inference_on(
        ordinal: usize,
        plan: Plan,
        model: ModelState,
        optim: RmsProp,
        amp: Amp,
    ) -> Result<Self> {
        Self::create(ordinal, plan, model, optim, amp, false, None)
    }

    fn create(
        ordinal: usize,
        plan: Plan,
        model: ModelState,
        optim: RmsProp,
        amp: Amp,
        train: bool,
        paths: Option<KernelPaths>,
    ) -> Result<Self> {
        let layout = ParamLayout::new(&plan);
        check_state(&plan, &layout, &model, &optim)?;
        let mut dev = CudaDevice::new(ordinal % device_count()?)?;
        if let Some(paths) = paths {
            dev.paths = paths;
        }
        // Every launcher picks the kernel variant of this level (fp32 tensors in O0, fp16 BN
        // parameters and statistics in O3).
        dev.set_amp(amp);
        let (mut step, mem) = StepLayout::new(plan, amp, train, dev.num_sms, optim.cfg, dev.paths)?;
        let (plan, params, states) = (&step.plan, &step.params, &step.states);
        let estimate = arena::estimate(plan, &mem, params, states, dev.num_sms, train);
        check_free_memory(&dev, plan, &estimate)?;
        let bufs = DeviceBuffers::alloc(&dev, plan, &mem, params, states, step.ws_elems, train)
            .map_err(|e| oom_error(e, plan, &estimate))?;
        step.ptr = bufs.ptrs(&dev);
        let pinned = Pinned::alloc(&dev, &step.plan)?;
        let u8_staging = match train && dev.paths.u8_input {
            true => Some(U8Staging::new(
                &dev,
                step.plan.tensor(step.plan.input).numel(),
            )?),
            false => None,
        };
        verify_fast_convs(&dev, &step.plan, step.stem);
        let infer_calls = step.program_calls(false, StepArgs::infer())?;
        let mut trainer = CudaTrainer {
            dev,
            step,
            layout,
            estimate,
            optim,
            bufs,
            pinned,
            pending: None,
            train,
            infer_calls,
            train_calls: None,
            graphs: None,
            sync: GradSync::Local,
            u8_staging,
        };
        trainer.upload(&model)?;
        Ok(trainer)
    }

    fn check_training(&self) -> Result<()> {
        if !self.train {
            bail!("this CUDA trainer was built for inference only (no gradient buffers)");
        }
        Ok(())
    }

    pub fn plan(&self) -> &Plan {
        &self.step.plan
    }

    pub fn amp(&self) -> Amp {
        self.step.amp
    }

    /// The leaner step's paths this trainer's calls take.
    pub fn kernel_paths(&self) -> KernelPaths {
        self.step.paths
    }

    /// The device memory the step allocated (estimate of everything but the CUDA context).
    pub fn memory(&self) -> MemoryEstimate {
        self.estimate
    }

    /// Waits for every queued launch (a step returns before its backward and update finish when
    /// the loss scale is fixed).
    pub fn synchronize(&self) -> Result<()> {
        self.dev.synchronize()
    }

    /// Device memory in use on the card now (all processes), from the driver.
    pub fn device_used_bytes(&self) -> Result<usize> {
        let (free, total) = self.dev.ctx.mem_get_info()?;
        Ok(total - free)
    }

    /// Writes the fp32 masters, their fp16 copy, BN statistics, optimizer state and decay mask.
    fn upload(&mut self, model: &ModelState) -> Result<()> {
        let s = self.dev.stream.clone();
        let p = &self.step.params;
        s.memcpy_htod(&p.scatter(&model.params, 0.0), &mut self.bufs.master)?;
        let half: Vec<f16> = model.params.iter().map(|&v| f16::from_f32(v)).collect();
        s.memcpy_htod(&p.scatter(&half, f16::ZERO), &mut self.bufs.w16)?;
        let st = self.step.states.scatter(&model.states, 0.0);
        s.memcpy_htod(&st, &mut self.bufs.states)?;
        if !self.train {
            return self.dev.synchronize();
        }
        s.memcpy_htod(&p.scatter(&self.optim.ms, 1.0), &mut self.bufs.ms)?;
        s.memcpy_htod(&p.scatter(&self.optim.mom, 0.0), &mut self.bufs.mom)?;
        let mut mask = vec![0u8; self.layout.param_len];
        for (r, on) in &self.optim.decay {
            mask[r.clone()].fill(*on as u8);
        }
        s.memcpy_htod(&p.scatter(&mask, 0), &mut self.bufs.decay)?;
        self.dev.synchronize()
    }

    /// Queues a batch's upload into the fp32 staging image: a u8 batch through [`U8Staging`]
    /// when this trainer has it (normalised on the device), else as f32 (a u8 batch normalised
    /// on the host first, as the CPU packing does).
    fn stage_input(&mut self, images: Images<'_>, labels: Option<&[u32]>) -> Result<()> {
        check_batch(&self.step.plan, images.len(), labels)?;
        match images {
            Images::U8 { pixels, norm } if self.u8_staging.is_some() => {
                self.stage(None, labels)?;
                let dst = self.step.ptr.images;
                if let Some(staging) = &mut self.u8_staging {
                    staging.stage(&self.dev, pixels, norm, dst)?;
                }
                Ok(())
            }
            images => self.stage(Some(&images.to_f32()), labels),
        }
    }

    /// Copies a batch (when given) and labels into pinned memory and queues their async upload to
    /// the staging buffers on the compute stream.
    fn stage(&mut self, images: Option<&[f32]>, labels: Option<&[u32]>) -> Result<()> {
        // Everything is checked before a pinned buffer is touched: bailing out between refilling
        // the images and recording `inputs_read` would leave an upload in flight that the next
        // `stage` does not wait for before overwriting its source.
        let numel = self.step.plan.tensor(self.step.plan.input).numel();
        check_batch(&self.step.plan, images.map_or(numel, <[f32]>::len), labels)?;
        let s = self.dev.stream.clone();
        // The previous batch's uploads must be done before its pinned buffers are overwritten.
        self.pinned.inputs_read.synchronize()?;
        if let Some(images) = images {
            // A v4 batch of 128 is 137 MB of f32: copy it into pinned memory on every core.
            let dst = self.pinned.images.as_mut_slice()?;
            dst.par_chunks_mut(1 << 16)
                .zip(images.par_chunks(1 << 16))
                .for_each(|(d, s)| d.copy_from_slice(s));
            s.memcpy_htod(&self.pinned.images, &mut self.bufs.images)?;
        }
        if let Some(labels) = labels {
            let dst = self.pinned.labels.as_mut_slice()?;
            dst.iter_mut().zip(labels).for_each(|(d, &l)| *d = l as f32);
            s.memcpy_htod(&self.pinned.labels, &mut self.bufs.labels)?;
        }
        self.pinned.inputs_read.record(&s)?;
        Ok(())
    }

    /// Queues every call of a training step (resolving the program first when the loss scaling
    /// changed) and the copy of its report to pinned slot `slot` after the last one. With
    /// `KernelPaths::graph` the calls read the step's values from device memory and are
    /// replayed from CUDA graphs captured at their first step.
    fn run_train_calls(&mut self, args: StepArgs, slot: usize) -> Result<()> {
        let graph = self.dev.paths.graph;
        let args = StepArgs {
            on_device: graph,
            ..args
        };
        let key = (args.scale, args.growth);
        if self.train_calls.as_ref().is_none_or(|(k, _)| *k != key) {
            let calls = self.step.program_calls(true, args)?;
            if let GradSync::Nccl(s) = &mut self.sync {
                s.plan(&self.dev, &calls, self.step.ptr.grads, self.step.params.len)?;
            }
            self.train_calls = Some((key, calls));
            self.graphs = None;
        }
        let (_, calls) = self.train_calls.as_mut().expect("built above");
        for (_, call) in calls.iter_mut() {
            call.set_step(args.step, args.lr);
        }
        let queue = StepQueue {
            dev: &self.dev,
            calls,
            grads: &mut self.bufs.grads,
            grads_ptr: self.step.ptr.grads,
            plan: &self.step.plan.name,
        };
        if graph {
            self.step.step_args(args).launch(&self.dev)?;
            queue.replay(&self.sync, &mut self.graphs)?;
        } else {
            queue.run(&self.sync)?;
        }
        self.queue_report(slot)
    }
}

/// GPUs the driver reports (at least one, or an error). The driver is opened the engine's way
/// first: cudarc would panic on a machine without one.
fn device_count() -> Result<usize> {
    crate::gpu::libs::ensure_driver()?;
    cudarc::driver::result::init()
        .map_err(|e| anyhow::anyhow!("the CUDA driver failed to initialise: {e:?}"))?;
    let n = cudarc::driver::result::device::get_count()
        .map_err(|e| anyhow::anyhow!("cannot count CUDA devices: {e:?}"))?;
    if n < 1 {
        bail!("the CUDA driver reports no GPU");
    }
    Ok(n as usize)
}

impl Backend for CudaTrainer {
    fn name(&self) -> String {
        format!(
            "cuda ({}, {}, {} SMs, amp {:?})",
            self.dev.device_name, self.dev.arch, self.dev.num_sms, self.step.amp
        )
    }

    fn train_step(
        &mut self,
        images: Images<'_>,
        labels: &[u32],
        step: u64,
        lr: f32,
        scaler: &mut LossScaler,
    ) -> Result<Vec<StepOutcome>> {
        self.check_training()?;
        self.stage_input(images, Some(labels))?;
        let dynamic = match *scaler {
            LossScaler::Dynamic {
                growth_interval, ..
            } => Some(growth_interval),
            _ => None,
        };
        let mut settled = Vec::new();
        // A change of scaler kind settles the step in flight under the old kind first.
        if self.pending.is_some_and(|p| p.dynamic != dynamic.is_some()) {
            settled.extend(self.settle_pending(scaler)?);
        }
        if dynamic.is_some() && self.pending.is_none() {
            self.upload_scaler(scaler)?;
        }
        // The other slot than the pending step's, whose report is still to be read.
        let slot = self.pending.map_or(0, |p| 1 - p.slot);
        let args = StepArgs {
            train: true,
            step,
            lr,
            scale: match dynamic {
                Some(_) => ScaleArg::Device(self.step.report_word(REPORT_SCALE)),
                None => ScaleArg::Value(scaler.scale()),
            },
            growth: dynamic,
            on_device: false, // set by run_train_calls for graphs
        };
        let s = self.dev.stream.clone();
        let flag = REPORT_OVERFLOW..REPORT_OVERFLOW + 1;
        s.memset_zeros(&mut self.bufs.report.slice_mut(flag))?;
        self.run_train_calls(args, slot)?;
        // Read the previous step's report while this one runs.
        settled.extend(self.settle_pending(scaler)?);
        self.pending = Some(Pending {
            step,
            slot,
            dynamic: dynamic.is_some(),
        });
        Ok(settled)
    }

    fn input_format(&self) -> InputFormat {
        match self.u8_staging {
            Some(_) => InputFormat::U8,
            None => InputFormat::F32,
        }
    }

    fn settle(&mut self, scaler: &mut LossScaler) -> Result<Vec<StepOutcome>> {
        Ok(self.settle_pending(scaler)?.into_iter().collect())
    }

    fn infer(&mut self, images: &[f32]) -> Result<Vec<f32>> {
        self.stage(Some(images), None)?;
        run_calls(&self.dev, &self.infer_calls, &self.step.plan.name)?;
        self.read_tensor(self.step.plan.logits)
    }

    fn state(&mut self) -> Result<(ModelState, RmsProp)> {
        // See `grads`: the last step's update may still be queued.
        self.dev.synchronize()?;
        let s = &self.dev.stream;
        let params = self.step.params.gather(&s.clone_dtoh(&self.bufs.master)?);
        let states = self.step.states.gather(&s.clone_dtoh(&self.bufs.states)?);
        let mut optim = self.optim.clone();
        if self.train {
            optim.ms = self.step.params.gather(&s.clone_dtoh(&self.bufs.ms)?);
            optim.mom = self.step.params.gather(&s.clone_dtoh(&self.bufs.mom)?);
        }
        let model = ModelState {
            layout: self.layout.clone(),
            params,
            states,
        };
        Ok((model, optim))
    }

    fn bn_states(&mut self) -> Result<Vec<f32>> {
        self.dev.synchronize()?;
        let states = self.dev.stream.clone_dtoh(&self.bufs.states)?;
        Ok(self.step.states.gather(&states))
    }

    fn set_bn_states(&mut self, states: &[f32]) -> Result<()> {
        if states.len() != self.layout.state_len {
            bail!(
                "{} BN statistics given for {}",
                states.len(),
                self.layout.state_len
            );
        }
        // The queued steps read and update the statistics: replace them after those.
        self.dev.synchronize()?;
        let slots = self.step.states.scatter(states, 0.0);
        self.dev.stream.memcpy_htod(&slots, &mut self.bufs.states)?;
        self.dev.synchronize()
    }
}

impl Drop for CudaTrainer {
    /// Waits for queued work before the buffers go: freeing pinned host memory that an async copy
    /// still reads (after an error in the middle of queuing a step) is undefined behaviour, and
    /// cudarc's own pinned-buffer events are not recorded with a single stream (see [`Pinned`]).
    fn drop(&mut self) {
        let _ = self.dev.synchronize();
        if let Some(staging) = &self.u8_staging {
            let _ = staging.synchronize();
        }
    }
}
