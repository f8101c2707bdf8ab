//! The CUDA training backend: a plan's step program over one preallocated device arena.
//!
//! Memory (all allocated when the executor is built, nothing during a step):
//! - the arena: activations, BN saved statistics and activation gradients, placed over the fused
//!   step program's lifetimes (see [`Fusion`](super::fusion::Fusion): BN outputs a ReLU absorbs are never stored, and
//!   concat branches live in their slices of the block output). Element sizes follow the AMP level
//!   (see [`arena::elem_bytes`]);
//! - parameter buffers over padded slots ([`ParamSlots`]): fp32 master weights, the fp16 working
//!   copy the convolutions and the FC layer read (O2/O3; O0 reads the masters), fp32 gradients,
//!   RMSProp ms and mom, a per-element weight-decay mask; BN running statistics in fp32. An
//!   inference-only executor ([`CudaTrainer::for_inference`]) has only the masters, the working
//!   copy and the statistics, and an arena planned over the forward pass alone;
//! - one fp32 workspace shared by every split-K weight gradient and BN reduction;
//! - staging: the fp32 batch and labels (filled from pinned host buffers by async copies), the
//!   padded stem input and weights, per-sample losses and the step report.
//!
//! Synchronisation policy: launches are queued on one stream and nothing waits while a step is
//! being queued. Each training step's 32-byte report (loss, overflow flag, loss scale, clean-step
//! count) is copied after its last launch into one of two pinned slots, and the host reads it only
//! after queueing the next step, so the GPU never waits for the host: `train_step` returns the
//! previous step's outcome, and [`Backend::settle`] collects the last one. Under dynamic scaling
//! the scaler lives on the device: softmax-CE and RMSProp read the scale from memory, RMSProp
//! skips itself on the overflow flag and `loss_scale_update` halves or grows the scale; the host's
//! [`LossScaler`] replays the reported flags and must land on the reported scale.
//!
//! An error of an asynchronous kernel surfaces at the next wait, possibly one step later.

use anyhow::{bail, Context, Result};
use cudarc::driver::sys::{CUevent_flags, CUresult};
use cudarc::driver::{
    CudaEvent, CudaSlice, DevicePtr, DeviceRepr, DriverError, PinnedHostSlice, ValidAsZeroBits,
};
use half::f16;
use rayon::prelude::*;

use super::arena::{self, MemoryEstimate, ParamSlots, STEM_CHANNELS};
use super::conv::ConvShape;
use super::fusion;
use super::ops::ScaleArg;
use super::step_launch::{
    Ptrs, StepArgs, StepLayout, REPORT_CLEAN, REPORT_LOSS, REPORT_OVERFLOW, REPORT_SCALE,
    REPORT_WORDS,
};
use super::step_plan::Launch;
use super::CudaDevice;
use crate::backend::{Amp, Backend, StepOutcome};
use crate::params::{ModelState, ParamLayout};
use crate::plan::memory::MemoryPlan;
use crate::plan::{Conv2d, Plan, TensorId};
use crate::optim::{LossScaler, RmsProp};

/// Every device buffer of a training step.
struct DeviceBuffers {
    arena: CudaSlice<u8>,
    master: CudaSlice<f32>,
    w16: CudaSlice<f16>,
    grads: CudaSlice<f32>,
    ms: CudaSlice<f32>,
    mom: CudaSlice<f32>,
    decay: CudaSlice<u8>,
    states: CudaSlice<f32>,
    ws: CudaSlice<f32>,
    images: CudaSlice<f32>,
    labels: CudaSlice<f32>,
    row_loss: CudaSlice<f32>,
    report: CudaSlice<u32>,
    stem: Option<(CudaSlice<f16>, CudaSlice<f16>)>,
}

/// Pinned host buffers: the async input copies and the step report, with our own events. cudarc
/// records its pinned-buffer events only when a context runs several streams, and this backend
/// uses one, so the waits are explicit here.
struct Pinned {
    images: PinnedHostSlice<f32>,
    labels: PinnedHostSlice<f32>,
    /// Two report slots, each with the event recorded after its copy (valid once it fires):
    /// under dynamic scaling step k's report is read while step k + 1 runs.
    reports: [(PinnedHostSlice<u32>, CudaEvent); 2],
    /// Recorded after the uploads of a batch: the host may refill the input buffers once it fires.
    inputs_read: CudaEvent,
}

/// A step whose report has not been read yet.
#[derive(Clone, Copy, Debug)]
struct Pending {
    step: u64,
    slot: usize,
    /// Run under dynamic scaling (its overflow flag drives the scaler).
    dynamic: bool,
}

pub struct CudaTrainer {
    be: CudaDevice,
    /// The step program and where every tensor lives (plan, fusion, arena offsets, slots).
    step: StepLayout,
    layout: ParamLayout,
    estimate: MemoryEstimate,
    optim: RmsProp,
    dev: DeviceBuffers,
    pinned: Pinned,
    pending: Option<Pending>,
    /// Built for training (else inference only: no gradient or optimizer buffers).
    train: bool,
}

impl CudaTrainer {
    /// Builds the step program, allocates everything on GPU 0 and uploads the model and optimizer.
    pub fn new(plan: Plan, model: ModelState, optim: RmsProp, amp: Amp) -> Result<Self> {
        Self::create(plan, model, optim, amp, true)
    }

    /// An inference-only executor (eval, predict): its arena holds only what the forward pass
    /// needs, and no gradients, optimizer state or workspace are allocated. `optim` is kept on
    /// the host only, for [`Backend::state`].
    pub fn for_inference(plan: Plan, model: ModelState, optim: RmsProp, amp: Amp) -> Result<Self> {
        Self::create(plan, model, optim, amp, false)
    }

    fn create(
        plan: Plan,
        model: ModelState,
        optim: RmsProp,
        amp: Amp,
        train: bool,
    ) -> Result<Self> {
        let layout = ParamLayout::new(&plan);
        check_state(&plan, &layout, &model, &optim)?;
        let mut be = CudaDevice::new(0)?;
        // Every launcher picks the kernel variant of this level (fp32 tensors in O0, fp16 BN
        // parameters and statistics in O3).
        be.set_amp(amp);
        let (mut step, mem) = StepLayout::new(plan, amp, train, be.num_sms, optim.cfg)?;
        let (plan, params, states) = (&step.plan, &step.params, &step.states);
        let estimate = arena::estimate(plan, &mem, params, states, be.num_sms, train);
        check_free_memory(&be, plan, &estimate)?;
        let dev = DeviceBuffers::alloc(&be, plan, &mem, params, states, step.ws_elems, train)
            .map_err(|e| oom_error(e, plan, &estimate))?;
        step.ptr = dev.ptrs(&be);
        let pinned = Pinned::alloc(&be, &step.plan)?;
        verify_fast_convs(&be, &step.plan, step.stem);
        let mut trainer = CudaTrainer {
            be,
            step,
            layout,
            estimate,
            optim,
            dev,
            pinned,
            pending: None,
            train,
        };
        trainer.upload(&model)?;
        Ok(trainer)
    }

    fn check_training(&self) -> Result<()> {
        if !self.train {
            bail!("this CUDA executor was built for inference only (no gradient buffers)");
        }
        Ok(())
    }

    pub fn plan(&self) -> &Plan {
        &self.step.plan
    }

    pub fn amp(&self) -> Amp {
        self.step.amp
    }

    /// The device memory the step allocated (estimate of everything but the CUDA context).
    pub fn memory(&self) -> MemoryEstimate {
        self.estimate
    }

    /// Waits for every queued launch (a step returns before its backward and update finish when
    /// the loss scale is fixed).
    pub fn synchronize(&self) -> Result<()> {
        self.be.synchronize()
    }

    /// Device memory in use on the card now (all processes), from the driver.
    pub fn device_used_bytes(&self) -> Result<usize> {
        let (free, total) = self.be.ctx.mem_get_info()?;
        Ok(total - free)
    }

    /// The last step's parameter gradients (still scaled by the loss scale), flat host order.
    pub fn grads(&self) -> Result<Vec<f32>> {
        self.check_training()?;
        // Explicit, rather than relying on a pageable copy blocking: the last step may still be
        // running (its report is read a step later), and an async kernel error surfaces here.
        self.be.synchronize()?;
        Ok(self
            .step
            .params
            .gather(&self.be.stream.clone_dtoh(&self.dev.grads)?))
    }

    /// Runs only the forward launches of a training step (a diagnostic: the tensors the backward
    /// will read are then intact in the arena, see [`Self::read_tensor`]).
    pub fn forward_train(&mut self, images: &[f32], labels: &[u32], step: u64) -> Result<()> {
        self.check_training()?;
        self.stage(images, Some(labels))?;
        let args = StepArgs {
            train: true,
            step,
            ..StepArgs::infer()
        };
        let forward = self
            .step
            .program
            .train
            .iter()
            .take_while(|l| !matches!(l, Launch::Backward { .. }));
        for &launch in forward {
            self.step.launch(&self.be, launch, args)?;
        }
        self.be.synchronize()
    }

    /// Whether the device keeps tensor `id` at all (the fusion elides a BN output its ReLU
    /// absorbs, and that output's gradient).
    pub fn stores(&self, id: TensorId) -> bool {
        id < self.step.offsets.len() && !self.step.fusion.elided[id]
    }

    /// An arena tensor copied back as f32 (valid only while the planner keeps it alive). A slice
    /// is gathered from its root's rows.
    pub fn read_tensor(&self, id: TensorId) -> Result<Vec<f32>> {
        if id >= self.step.offsets.len() {
            bail!(
                "tensor {id} is not a tensor of plan '{}'",
                self.step.plan.name
            );
        }
        if self.step.fusion.elided[id] {
            bail!("tensor {id} is fused away on the device (a BN output its ReLU absorbs)");
        }
        let off = self.step.offsets[id].context("tensor has an arena placement")?;
        let elem = arena::elem_bytes(&self.step.plan, self.step.amp, id);
        let (c, ld) = (
            fusion::channels(&self.step.plan, &self.step.bwd, id),
            self.step.ld(id),
        );
        let count = if id < self.step.bwd.first_grad {
            self.step.plan.tensor(id).numel()
        } else {
            self.step.bwd.grad_tensor(id).numel()
        };
        let rows = count / c;
        // The span from the first element of the first row to the last of the last row.
        let span = elem * ((rows - 1) * ld + c);
        let bytes = self
            .be
            .stream
            .clone_dtoh(&self.dev.arena.slice(off..off + span))?;
        let value = |i: usize| -> f32 {
            let b = &bytes[i * elem..(i + 1) * elem];
            match elem {
                2 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
                _ => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            }
        };
        Ok((0..count).map(|i| value(i / c * ld + i % c)).collect())
    }

    /// Writes the fp32 masters, their fp16 copy, BN statistics, optimizer state and decay mask.
    fn upload(&mut self, model: &ModelState) -> Result<()> {
        let s = self.be.stream.clone();
        let p = &self.step.params;
        s.memcpy_htod(&p.scatter(&model.params, 0.0), &mut self.dev.master)?;
        let half: Vec<f16> = model.params.iter().map(|&v| f16::from_f32(v)).collect();
        s.memcpy_htod(&p.scatter(&half, f16::ZERO), &mut self.dev.w16)?;
        let st = self.step.states.scatter(&model.states, 0.0);
        s.memcpy_htod(&st, &mut self.dev.states)?;
        if !self.train {
            return self.be.synchronize();
        }
        s.memcpy_htod(&p.scatter(&self.optim.ms, 1.0), &mut self.dev.ms)?;
        s.memcpy_htod(&p.scatter(&self.optim.mom, 0.0), &mut self.dev.mom)?;
        let mut mask = vec![0u8; self.layout.param_len];
        for (r, on) in &self.optim.decay {
            mask[r.clone()].fill(*on as u8);
        }
        s.memcpy_htod(&p.scatter(&mask, 0), &mut self.dev.decay)?;
        self.be.synchronize()
    }

    /// Copies a batch into pinned memory and queues its async upload to the staging buffers.
    fn stage(&mut self, images: &[f32], labels: Option<&[u32]>) -> Result<()> {
        // Everything is checked before a pinned buffer is touched: bailing out between refilling
        // the images and recording `inputs_read` would leave an upload in flight that the next
        // `stage` does not wait for before overwriting its source.
        check_batch(&self.step.plan, images, labels)?;
        let s = self.be.stream.clone();
        // The previous batch's uploads must be done before its pinned buffers are overwritten.
        self.pinned.inputs_read.synchronize()?;
        // A v4 batch of 128 is 137 MB of f32: copy it into pinned memory on every core.
        let dst = self.pinned.images.as_mut_slice()?;
        dst.par_chunks_mut(1 << 16)
            .zip(images.par_chunks(1 << 16))
            .for_each(|(d, s)| d.copy_from_slice(s));
        s.memcpy_htod(&self.pinned.images, &mut self.dev.images)?;
        if let Some(labels) = labels {
            let dst = self.pinned.labels.as_mut_slice()?;
            dst.iter_mut().zip(labels).for_each(|(d, &l)| *d = l as f32);
            s.memcpy_htod(&self.pinned.labels, &mut self.dev.labels)?;
        }
        self.pinned.inputs_read.record(&s)?;
        Ok(())
    }

    /// Queues the copy of the step report to pinned slot `slot`, in stream order.
    fn queue_report(&mut self, slot: usize) -> Result<()> {
        let s = self.be.stream.clone();
        let (host, written) = &mut self.pinned.reports[slot];
        s.memcpy_dtoh(&self.dev.report, host)?;
        written.record(&s)?;
        Ok(())
    }

    /// Waits for the last report copied to `slot` (not for later work).
    fn read_report(&self, slot: usize) -> Result<Report> {
        let (host, written) = &self.pinned.reports[slot];
        written.synchronize()?;
        let r = host.as_slice()?;
        Ok(Report {
            loss: f32::from_bits(r[REPORT_LOSS]),
            overflow: r[REPORT_OVERFLOW] != 0,
            scale: f32::from_bits(r[REPORT_SCALE]),
            clean: r[REPORT_CLEAN],
        })
    }

    /// Starts the device scaler from the host's state (nothing may be in flight: the device
    /// would otherwise continue from its own, newer state).
    fn upload_scaler(&mut self, scaler: &LossScaler) -> Result<()> {
        let LossScaler::Dynamic {
            scale, clean_steps, ..
        } = *scaler
        else {
            return Ok(());
        };
        let words = [scale.to_bits(), clean_steps];
        let mut dst = self.dev.report.slice_mut(REPORT_SCALE..REPORT_CLEAN + 1);
        self.be.stream.memcpy_htod(&words, &mut dst)?;
        Ok(())
    }

    /// Reads the report of the pending step. Under dynamic scaling it replays the overflow flag on
    /// the host scaler and checks that the host lands where the device did.
    fn settle_pending(&mut self, scaler: &mut LossScaler) -> Result<Option<StepOutcome>> {
        let Some(p) = self.pending.take() else {
            return Ok(None);
        };
        let r = self.read_report(p.slot)?;
        if !p.dynamic {
            return Ok(Some(StepOutcome {
                step: p.step,
                loss: r.loss,
                skipped: false,
                scale_changed: None,
            }));
        }
        let decision = scaler.update(r.overflow);
        let host = match *scaler {
            LossScaler::Dynamic {
                scale, clean_steps, ..
            } => (scale, clean_steps),
            _ => bail!("the loss scaler changed kind while a dynamic-scaling step was in flight"),
        };
        if host != (r.scale, r.clean) {
            bail!(
                "after step {} the device loss scaler holds scale {} (clean steps {}) but the host \
                 holds {} ({})",
                p.step,
                r.scale,
                r.clean,
                host.0,
                host.1
            );
        }
        Ok(Some(StepOutcome {
            step: p.step,
            loss: r.loss,
            skipped: decision.skip,
            scale_changed: decision.scale_changed,
        }))
    }

    /// Queues every launch of the training step or inference pass; a training step's report is
    /// copied after its last launch (the scaler update).
    fn run_program(&mut self, train: bool, args: StepArgs) -> Result<()> {
        let count = if train {
            self.step.program.train.len()
        } else {
            self.step.program.infer.len()
        };
        for i in 0..count {
            let launch = if train {
                self.step.program.train[i]
            } else {
                self.step.program.infer[i]
            };
            self.step
                .launch(&self.be, launch, args)
                .with_context(|| format!("{launch:?} of plan '{}'", self.step.plan.name))?;
            if launch == Launch::ScaleUpdate {
                self.queue_report(args.slot)?;
            }
        }
        Ok(())
    }
}

/// What a step report says.
struct Report {
    loss: f32,
    overflow: bool,
    scale: f32,
    clean: u32,
}

impl Backend for CudaTrainer {
    fn name(&self) -> String {
        format!(
            "cuda ({}, {}, {} SMs, amp {:?})",
            self.be.device_name, self.be.arch, self.be.num_sms, self.step.amp
        )
    }

    fn train_step(
        &mut self,
        images: &[f32],
        labels: &[u32],
        step: u64,
        lr: f32,
        scaler: &mut LossScaler,
    ) -> Result<Vec<StepOutcome>> {
        self.check_training()?;
        self.stage(images, Some(labels))?;
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
            slot,
        };
        let s = self.be.stream.clone();
        s.memset_zeros(
            &mut self
                .dev
                .report
                .slice_mut(REPORT_OVERFLOW..REPORT_OVERFLOW + 1),
        )?;
        self.run_program(true, args)?;
        // Read the previous step's report while this one runs.
        settled.extend(self.settle_pending(scaler)?);
        self.pending = Some(Pending {
            step,
            slot,
            dynamic: dynamic.is_some(),
        });
        Ok(settled)
    }

    fn settle(&mut self, scaler: &mut LossScaler) -> Result<Vec<StepOutcome>> {
        Ok(self.settle_pending(scaler)?.into_iter().collect())
    }

    fn infer(&mut self, images: &[f32]) -> Result<Vec<f32>> {
        self.stage(images, None)?;
        self.run_program(false, StepArgs::infer())?;
        self.read_tensor(self.step.plan.logits)
    }

    fn state(&mut self) -> Result<(ModelState, RmsProp)> {
        // See `grads`: the last step's update may still be queued.
        self.be.synchronize()?;
        let s = &self.be.stream;
        let params = self.step.params.gather(&s.clone_dtoh(&self.dev.master)?);
        let states = self.step.states.gather(&s.clone_dtoh(&self.dev.states)?);
        let mut optim = self.optim.clone();
        if self.train {
            optim.ms = self.step.params.gather(&s.clone_dtoh(&self.dev.ms)?);
            optim.mom = self.step.params.gather(&s.clone_dtoh(&self.dev.mom)?);
        }
        let model = ModelState {
            layout: self.layout.clone(),
            params,
            states,
        };
        Ok((model, optim))
    }
}

impl Drop for CudaTrainer {
    /// Waits for queued work before the buffers go: freeing pinned host memory that an async copy
    /// still reads (after an error in the middle of queuing a step) is undefined behaviour, and
    /// cudarc's own pinned-buffer events are not recorded with a single stream (see [`Pinned`]).
    fn drop(&mut self) {
        let _ = self.be.synchronize();
    }
}

/// Checks that a model and optimizer state fit the plan's layout (every buffer the upload
/// scatters), so a mismatch is an error rather than an out-of-range panic.
pub fn check_state(
    plan: &Plan,
    layout: &ParamLayout,
    model: &ModelState,
    optim: &RmsProp,
) -> Result<()> {
    let n = layout.param_len;
    let fits = model.layout == *layout
        && model.params.len() == n
        && model.states.len() == layout.state_len
        && optim.ms.len() == n
        && optim.mom.len() == n
        && optim
            .decay
            .iter()
            .all(|(r, _)| r.start <= r.end && r.end <= n);
    if !fits {
        bail!("the model state does not fit the plan '{}'", plan.name);
    }
    Ok(())
}

/// Checks a batch against the plan before it is staged: the image and label counts, and labels
/// inside the class range (softmax-CE would silently train on an out-of-range label).
pub fn check_batch(plan: &Plan, images: &[f32], labels: Option<&[u32]>) -> Result<()> {
    if images.len() != plan.tensor(plan.input).numel() {
        bail!(
            "image batch has {} values, plan '{}' takes {}",
            images.len(),
            plan.name,
            plan.tensor(plan.input).numel()
        );
    }
    let Some(labels) = labels else {
        return Ok(());
    };
    if labels.len() != plan.batch() {
        bail!(
            "label batch has {} labels, plan '{}' takes {}",
            labels.len(),
            plan.name,
            plan.batch()
        );
    }
    let classes = *plan.shape(plan.logits).last().unwrap_or(&0);
    if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
        bail!("label {bad} is out of range for {classes} classes");
    }
    Ok(())
}

impl DeviceBuffers {
    fn alloc(
        be: &CudaDevice,
        plan: &Plan,
        mem: &MemoryPlan,
        params: &ParamSlots,
        states: &ParamSlots,
        ws_elems: usize,
        train: bool,
    ) -> std::result::Result<Self, DriverError> {
        let stem = match arena::stem_padded_elems(plan) {
            Some((x, w)) => Some((zeros(be, x)?, zeros(be, w)?)),
            None => None,
        };
        // Inference allocates no gradient or optimizer buffers (one element, never touched).
        let opt_len = if train { params.len } else { 1 };
        Ok(DeviceBuffers {
            arena: zeros(be, mem.peak_bytes)?,
            master: zeros(be, params.len)?,
            w16: zeros(be, params.len)?,
            grads: zeros(be, opt_len)?,
            ms: zeros(be, opt_len)?,
            mom: zeros(be, opt_len)?,
            decay: zeros(be, opt_len)?,
            states: zeros(be, states.len)?,
            ws: zeros(be, ws_elems)?,
            images: zeros(be, plan.tensor(plan.input).numel())?,
            labels: zeros(be, plan.batch())?,
            row_loss: zeros(be, plan.batch())?,
            report: zeros(be, REPORT_WORDS)?,
            stem,
        })
    }

    fn ptrs(&self, be: &CudaDevice) -> Ptrs {
        let s = &be.stream;
        Ptrs {
            arena: self.arena.device_ptr(s).0,
            master: self.master.device_ptr(s).0,
            w16: self.w16.device_ptr(s).0,
            grads: self.grads.device_ptr(s).0,
            ms: self.ms.device_ptr(s).0,
            mom: self.mom.device_ptr(s).0,
            decay: self.decay.device_ptr(s).0,
            states: self.states.device_ptr(s).0,
            ws: self.ws.device_ptr(s).0,
            images: self.images.device_ptr(s).0,
            labels: self.labels.device_ptr(s).0,
            row_loss: self.row_loss.device_ptr(s).0,
            report: self.report.device_ptr(s).0,
            stem: self
                .stem
                .as_ref()
                .map(|(x, w)| (x.device_ptr(s).0, w.device_ptr(s).0)),
        }
    }
}

impl Pinned {
    fn alloc(be: &CudaDevice, plan: &Plan) -> Result<Self> {
        let ctx = &be.ctx;
        // SAFETY: the buffers are written by the host before any copy reads them. The input
        // buffers are write-combined (the host only writes them); the report is read by the host,
        // so it is plain page-locked memory.
        let event = || ctx.new_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC));
        let report = || -> Result<_> {
            Ok((
                unsafe { ctx.alloc_pinned_with_flags(REPORT_WORDS, 0)? },
                event()?,
            ))
        };
        unsafe {
            Ok(Pinned {
                images: ctx.alloc_pinned(plan.tensor(plan.input).numel())?,
                labels: ctx.alloc_pinned(plan.batch())?,
                reports: [report()?, report()?],
                inputs_read: event()?,
            })
        }
    }
}

fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    be: &CudaDevice,
    len: usize,
) -> std::result::Result<CudaSlice<T>, DriverError> {
    be.stream.alloc_zeros::<T>(len.max(1))
}

/// Refuses up front when the card has less free memory than the estimate.
fn check_free_memory(be: &CudaDevice, plan: &Plan, est: &MemoryEstimate) -> Result<()> {
    let (free, total) = be.ctx.mem_get_info()?;
    if est.total() > free {
        bail!(
            "not enough device memory for plan '{}' at batch {}: the step needs about {}, the GPU \
             has {:.0} MiB free of {:.0} MiB; use a smaller --batch-size",
            plan.name,
            plan.batch(),
            est.describe(),
            free as f64 / (1 << 20) as f64,
            total as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}

/// An allocation failure, with the plan's estimate when the device ran out of memory.
fn oom_error(e: DriverError, plan: &Plan, est: &MemoryEstimate) -> anyhow::Error {
    if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        anyhow::anyhow!(
            "out of device memory allocating plan '{}' at batch {}: the step needs about {}; use a \
             smaller --batch-size",
            plan.name,
            plan.batch(),
            est.describe()
        )
    } else {
        anyhow::anyhow!("device allocation failed: {e:?}")
    }
}

/// Checks the tensor-core kernels at this plan's conv shapes (and the padded stem) against the
/// plain kernels, so the fast path runs only where it was verified on this card. A failure only
/// keeps those shapes on the plain kernels.
fn verify_fast_convs(be: &CudaDevice, plan: &Plan, stem: Option<usize>) {
    let mut shapes = super::selftest::plan_conv_shapes(plan);
    if let Some(s) = stem.and_then(|i| arena::conv_shape(plan, i)) {
        shapes.push(ConvShape {
            conv: Conv2d {
                cin: STEM_CHANNELS,
                ..s.conv
            },
            ..s
        });
    }
    match super::selftest::verify_conv_shapes(be, &shapes) {
        Ok(checks) => {
            let failed = checks
                .iter()
                .filter(|c| c.status == super::selftest::Status::Fail)
                .count();
            if failed > 0 {
                eprintln!("cuda: {failed} tensor-core conv checks failed; those shapes use the plain kernels");
            }
        }
        Err(e) => eprintln!(
            "cuda: conv verification did not run ({e:#}); unverified shapes use the plain kernels"
        ),
    }
}
