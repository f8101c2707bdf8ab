//! The CUDA training backend: a plan's step program over one preallocated device arena.
//!
//! Memory (all allocated when the executor is built, nothing during a step):
//! - the arena: activations, BN saved statistics and activation gradients, placed over the fused
//!   step program's lifetimes (see [`Fusion`]: BN outputs a ReLU absorbs are never stored, and
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
use std::collections::HashMap;

use super::arena::{self, MemoryEstimate, ParamSlots, STEM_CHANNELS};
use super::conv::{ConvOut, ConvShape};
use super::fusion::{self, Fusion};
use super::ops::{BnArgs, Labels, PoolShape, RmspropParams, ScaleArg};
use super::step_plan::{check_program, Launch, StepProgram};
use super::{CudaBackend, DevPtr};
use crate::backend::{Amp, Backend, StepOutcome};
use crate::params::{ModelState, ParamLayout};
use crate::plan::backward::{derive, BackwardPlan};
use crate::plan::memory::MemoryPlan;
use crate::plan::{Conv2d, Op, Plan, TensorId};
use crate::train::{LossScaler, RmsProp};

/// Report words: the mean loss (f32 bits), the overflow flag, softmax-CE's block counter, and the
/// device loss scaler's state (scale as f32 bits, clean steps).
const REPORT_LOSS: usize = 0;
const REPORT_OVERFLOW: usize = 1;
const REPORT_COUNTER: usize = 2;
const REPORT_SCALE: usize = 3;
const REPORT_CLEAN: usize = 4;
const REPORT_WORDS: usize = 8;

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

/// Raw addresses of [`DeviceBuffers`], taken once: the launchers work on raw pointers.
struct Ptrs {
    arena: DevPtr,
    master: DevPtr,
    w16: DevPtr,
    grads: DevPtr,
    ms: DevPtr,
    mom: DevPtr,
    decay: DevPtr,
    states: DevPtr,
    ws: DevPtr,
    images: DevPtr,
    labels: DevPtr,
    row_loss: DevPtr,
    report: DevPtr,
    stem: Option<(DevPtr, DevPtr)>,
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

/// Per-step values the launches need.
#[derive(Clone, Copy)]
struct StepArgs {
    train: bool,
    step: u64,
    lr: f32,
    /// The loss scale: a value, or the device scaler's (dynamic scaling).
    scale: ScaleArg,
    /// Dynamic scaling: the scaler's growth interval (the device checks overflow and updates it).
    growth: Option<u32>,
    /// The report slot this step's report goes to.
    slot: usize,
}

impl StepArgs {
    fn infer() -> Self {
        StepArgs {
            train: false,
            step: 0,
            lr: 0.0,
            scale: ScaleArg::Value(1.0),
            growth: None,
            slot: 0,
        }
    }
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
    be: CudaBackend,
    plan: Plan,
    bwd: BackwardPlan,
    program: StepProgram,
    /// BN+ReLU fusion and the concat slices the program and arena were built with.
    fusion: Fusion,
    amp: Amp,
    layout: ParamLayout,
    params: ParamSlots,
    states: ParamSlots,
    /// Device element offset of each parameter and state tensor.
    slot_of: HashMap<TensorId, usize>,
    /// Byte offset of each arena tensor.
    offsets: Vec<Option<usize>>,
    estimate: MemoryEstimate,
    optim: RmsProp,
    dev: DeviceBuffers,
    ptr: Ptrs,
    pinned: Pinned,
    ws_elems: usize,
    stem: Option<usize>,
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
        let mut be = CudaBackend::new(0)?;
        // Every launcher picks the kernel variant of this level (fp32 tensors in O0, fp16 BN
        // parameters and statistics in O3).
        be.set_amp(amp);
        let bwd = derive(&plan);
        let fusion = Fusion::new(&plan, &bwd);
        // The stem is padded for the tensor cores, which O0 (fp32, plain kernels) never uses.
        let stem = arena::stem_conv(&plan).filter(|_| amp != Amp::O0);
        // Cheap, and it turns a program/plan mismatch into an error before anything launches.
        let program = StepProgram::new(&plan, &bwd, &fusion, stem);
        check_program(&plan, &bwd, &fusion, &program.train)?;
        let run = if train {
            &program.train
        } else {
            &program.infer
        };
        let mem = arena::arena_plan(&plan, &bwd, &fusion, run, amp, train);
        let (params, states) = (
            ParamSlots::new(&layout.params),
            ParamSlots::new(&layout.states),
        );
        let estimate = arena::estimate(&plan, &mem, &params, &states, be.num_sms, train);
        check_free_memory(&be, &plan, &estimate)?;
        let ws_elems = match train {
            true => arena::workspace_elems(&plan, be.num_sms),
            false => 1,
        };
        let dev = DeviceBuffers::alloc(&be, &plan, &mem, &params, &states, ws_elems, train)
            .map_err(|e| oom_error(e, &plan, &estimate))?;
        let ptr = dev.ptrs(&be);
        let pinned = Pinned::alloc(&be, &plan)?;
        verify_fast_convs(&be, &plan, stem);
        let slot_of = params
            .tensors
            .iter()
            .zip(&params.slots)
            .chain(states.tensors.iter().zip(&states.slots))
            .map(|(&t, s)| (t, s.1))
            .collect();
        let mut trainer = CudaTrainer {
            program,
            offsets: arena::offsets(&plan, &mem, &fusion, amp),
            fusion,
            be,
            plan,
            bwd,
            amp,
            layout,
            params,
            states,
            slot_of,
            estimate,
            optim,
            dev,
            ptr,
            pinned,
            ws_elems,
            stem,
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
        &self.plan
    }

    pub fn amp(&self) -> Amp {
        self.amp
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
        // Explicit, rather than relying on a pageable copy blocking: the step may still be running
        // (fixed scaling returns before its backward), and an async kernel error surfaces here.
        self.be.synchronize()?;
        Ok(self
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
            .program
            .train
            .iter()
            .take_while(|l| !matches!(l, Launch::Backward { .. }));
        for &launch in forward {
            self.launch(launch, args)?;
        }
        self.be.synchronize()
    }

    /// Whether the device keeps tensor `id` at all (the fusion elides a BN output its ReLU
    /// absorbs, and that output's gradient).
    pub fn stores(&self, id: TensorId) -> bool {
        id < self.offsets.len() && !self.fusion.elided[id]
    }

    /// An arena tensor copied back as f32 (valid only while the planner keeps it alive). A slice
    /// is gathered from its root's rows.
    pub fn read_tensor(&self, id: TensorId) -> Result<Vec<f32>> {
        if id >= self.offsets.len() {
            bail!("tensor {id} is not a tensor of plan '{}'", self.plan.name);
        }
        if self.fusion.elided[id] {
            bail!("tensor {id} is fused away on the device (a BN output its ReLU absorbs)");
        }
        let off = self.offsets[id].context("tensor has an arena placement")?;
        let elem = arena::elem_bytes(&self.plan, self.amp, id);
        let (c, ld) = (fusion::channels(&self.plan, &self.bwd, id), self.ld(id));
        let count = if id < self.bwd.first_grad {
            self.plan.tensor(id).numel()
        } else {
            self.bwd.grad_tensor(id).numel()
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
        let p = &self.params;
        s.memcpy_htod(&p.scatter(&model.params, 0.0), &mut self.dev.master)?;
        let half: Vec<f16> = model.params.iter().map(|&v| f16::from_f32(v)).collect();
        s.memcpy_htod(&p.scatter(&half, f16::ZERO), &mut self.dev.w16)?;
        let st = self.states.scatter(&model.states, 0.0);
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
        check_batch(&self.plan, images, labels)?;
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
            self.program.train.len()
        } else {
            self.program.infer.len()
        };
        for i in 0..count {
            let launch = if train {
                self.program.train[i]
            } else {
                self.program.infer[i]
            };
            self.launch(launch, args)
                .with_context(|| format!("{launch:?} of plan '{}'", self.plan.name))?;
            if launch == Launch::ScaleUpdate {
                self.queue_report(args.slot)?;
            }
        }
        Ok(())
    }

    fn launch(&self, launch: Launch, a: StepArgs) -> Result<()> {
        match launch {
            Launch::LoadInput => self.load_input(),
            Launch::PadStem { node } => self.pad_stem(node),
            Launch::Forward { node } => self.forward(node, a),
            Launch::Backward { step } => self.backward(step, a),
            Launch::OverflowCheck if a.growth.is_some() => self.be.overflow_check(
                self.ptr.grads,
                self.params.len,
                false,
                self.report_word(REPORT_OVERFLOW),
            ),
            Launch::Update => self.update(a),
            Launch::ScaleUpdate => match a.growth {
                Some(growth) => self.be.loss_scale_update(
                    self.report_word(REPORT_OVERFLOW),
                    self.report_word(REPORT_SCALE),
                    self.report_word(REPORT_CLEAN),
                    growth,
                ),
                None => Ok(()),
            },
            Launch::OverflowCheck => Ok(()),
        }
    }

    fn report_word(&self, word: usize) -> DevPtr {
        self.ptr.report + 4 * word as u64
    }

    /// Address of an arena tensor (forward or gradient id); a slice's address is its first
    /// channel in its root.
    fn t(&self, id: TensorId) -> DevPtr {
        let off = self.offsets[id].expect("tensor has an arena placement");
        self.ptr.arena + off as u64
    }

    /// Address of an arena tensor, or 0 (null) when this arena does not store it.
    fn t_or_null(&self, id: TensorId) -> DevPtr {
        self.offsets[id].map_or(0, |off| self.ptr.arena + off as u64)
    }

    /// Row stride of an arena tensor in elements (a slice's is its root's channel count).
    fn ld(&self, id: TensorId) -> usize {
        self.fusion.ld(&self.plan, &self.bwd, id)
    }

    fn slot(&self, id: TensorId) -> u64 {
        self.slot_of[&id] as u64
    }

    fn w32(&self, id: TensorId) -> DevPtr {
        self.ptr.master + 4 * self.slot(id)
    }

    fn w16(&self, id: TensorId) -> DevPtr {
        self.ptr.w16 + 2 * self.slot(id)
    }

    /// The copy of a conv or FC weight the kernels read: the fp16 working copy, or in O0 the fp32
    /// master itself.
    fn weight(&self, id: TensorId) -> DevPtr {
        match self.amp {
            Amp::O0 => self.w32(id),
            _ => self.w16(id),
        }
    }

    /// The copy of a BN parameter the kernels read: fp16 in O3, fp32 otherwise.
    fn bn_param(&self, id: TensorId) -> DevPtr {
        match self.amp {
            Amp::O3 => self.w16(id),
            _ => self.w32(id),
        }
    }

    /// The staged fp32 batch into the input tensor: converted to fp16, or copied in O0.
    fn load_input(&self) -> Result<()> {
        let x = self.t(self.plan.input);
        let n = self.plan.tensor(self.plan.input).numel();
        match self.amp {
            Amp::O0 => {
                let c = *self.plan.shape(self.plan.input).last().unwrap();
                self.be
                    .copy_channels(n / c, c, self.ptr.images, c, 0, x, c, 0, 0, false)
            }
            _ => self.be.cast_f32_to_f16(self.ptr.images, n, x),
        }
    }

    fn grad(&self, id: TensorId) -> DevPtr {
        self.ptr.grads + 4 * self.slot(id)
    }

    fn state(&self, id: TensorId) -> DevPtr {
        self.ptr.states + 4 * self.slot(id)
    }

    fn pad_stem(&self, node: usize) -> Result<()> {
        let (x, w) = self.ptr.stem.context("stem buffers are allocated")?;
        let s = arena::conv_shape(&self.plan, node).context("the stem is a convolution")?;
        let c = s.conv;
        let rows = s.n * s.h * s.w;
        let wx = self.w16(self.plan.nodes[node].params[0]);
        self.be
            .pad_channels(rows, c.cin, STEM_CHANNELS, self.t(self.plan.input), x)?;
        self.be
            .pad_channels(c.cout * c.kh * c.kw, c.cin, STEM_CHANNELS, wx, w)
    }

    fn forward(&self, i: usize, a: StepArgs) -> Result<()> {
        let node = &self.plan.nodes[i];
        let xs = self.plan.shape(node.inputs[0]);
        // What the node's kernel writes: an absorbing BN's own output is never stored.
        let out = self.fusion.effective_output(&self.plan, i);
        let (x, y) = (self.t(node.inputs[0]), self.t(out));
        match &node.op {
            Op::Conv2d(c) => self.conv_forward(i, *c, x, y),
            Op::BatchNorm { .. } => self.bn_forward(i, x, y, a.train),
            // A ReLU no BN absorbed (never in v4 or tiny).
            Op::Relu => self
                .be
                .relu_forward(self.plan.tensor(node.inputs[0]).numel(), x, y),
            Op::MaxPool(p) | Op::AvgPool(p) => {
                let s = pool_shape(*p, xs);
                let max = matches!(node.op, Op::MaxPool(_));
                self.be
                    .pool_forward(&s, max, x, y, self.ld(node.outputs[0]), 0)
            }
            Op::GlobalAvgPool => self
                .be
                .global_avgpool_forward(xs[0], xs[1] * xs[2], xs[3], x, y),
            Op::Concat => self.concat_forward(i),
            Op::Dropout { p, seed } => {
                let p = if a.train { *p } else { 0.0 };
                let n = self.plan.tensor(node.inputs[0]).numel();
                self.be.dropout_forward(n, p, *seed, a.step, x, y)
            }
            Op::Linear {
                in_features,
                out_features,
            } => self.be.linear_forward(
                xs[0],
                *in_features,
                *out_features,
                x,
                self.weight(node.params[0]),
                self.w32(node.params[1]),
                y,
                None,
            ),
            Op::SoftmaxCrossEntropy { .. } => Ok(()),
        }
    }

    fn conv_forward(&self, i: usize, c: Conv2d, x: DevPtr, y: DevPtr) -> Result<()> {
        let node = &self.plan.nodes[i];
        let s = arena::conv_shape(&self.plan, i).context("conv shape")?;
        let out = ConvOut::dense(y, c.cout);
        match (self.stem == Some(i), self.ptr.stem) {
            (true, Some((xp, wp))) => {
                let padded = ConvShape {
                    conv: Conv2d {
                        cin: STEM_CHANNELS,
                        ..c
                    },
                    ..s
                };
                self.be.conv_fprop(&padded, xp, wp, out, None)
            }
            _ => self
                .be
                .conv_fprop(&s, x, self.weight(node.params[0]), out, None),
        }
        .map(|_| ())
    }

    fn bn_args(&self, i: usize) -> BnArgs {
        let node = &self.plan.nodes[i];
        let Op::BatchNorm { eps, momentum } = node.op else {
            unreachable!("bn_args on a batchnorm node")
        };
        let xs = self.plan.shape(node.inputs[0]);
        let c = *xs.last().unwrap();
        BnArgs {
            m: xs.iter().product::<usize>() / c,
            c,
            eps,
            momentum,
            relu: self.fusion.relu_after[i].is_some(),
            gamma: self.bn_param(node.params[0]),
            beta: self.bn_param(node.params[1]),
            // An inference-only arena stores no saved statistics (inference never touches them).
            save_mean: node.saved.first().map_or(0, |&t| self.t_or_null(t)),
            save_inv_std: node.saved.get(1).map_or(0, |&t| self.t_or_null(t)),
            running_mean: self.state(node.state[0]),
            running_var: self.state(node.state[1]),
            ldy: self.ld(self.fusion.effective_output(&self.plan, i)),
            yoff: 0,
        }
    }

    /// y = BN(x), straight into the absorbed ReLU's output (clipped) when there is one.
    fn bn_forward(&self, i: usize, x: DevPtr, y: DevPtr, train: bool) -> Result<()> {
        let a = self.bn_args(i);
        if train {
            self.be.bn_forward_train(&a, x, y, self.ptr.ws)
        } else {
            self.be.bn_forward_infer(&a, x, y)
        }
    }

    /// Channel counts and offsets of a concat's inputs, and the output's row count.
    fn concat_layout(&self, i: usize) -> (Vec<(usize, usize)>, usize) {
        let node = &self.plan.nodes[i];
        let ys = self.plan.shape(node.outputs[0]);
        let rows = ys[..ys.len() - 1].iter().product();
        let mut off = 0;
        let parts = node
            .inputs
            .iter()
            .map(|&t| {
                let c = *self.plan.shape(t).last().unwrap();
                off += c;
                (c, off - c)
            })
            .collect();
        (parts, rows)
    }

    /// Copies the inputs that are not already slices of the output into their channels.
    fn concat_forward(&self, i: usize) -> Result<()> {
        let node = &self.plan.nodes[i];
        let (parts, rows) = self.concat_layout(i);
        let (y, ld) = (self.t(node.outputs[0]), self.ld(node.outputs[0]));
        for (&x, (c, off)) in node.inputs.iter().zip(parts) {
            if self.fusion.view[x].is_none() {
                self.be
                    .copy_channels(rows, c, self.t(x), c, 0, y, ld, off, 0, false)?;
            }
        }
        Ok(())
    }

    fn backward(&self, j: usize, a: StepArgs) -> Result<()> {
        let step = &self.bwd.steps[j];
        let node = &self.plan.nodes[step.node];
        let xs = self.plan.shape(node.inputs[0]);
        let x = self.t(node.inputs[0]);
        // A fused BN's own output gradient is never materialised (`bn_backward` reads its ReLU's).
        let dy = step
            .grad_output
            .filter(|&g| !self.fusion.elided[g])
            .map_or(0, |g| self.t(g));
        let dx = step.grad_inputs[0].map(|g| self.t(g));
        let acc = step.accumulate[0];
        match &node.op {
            Op::Conv2d(c) => self.conv_backward(step.node, *c, x, dy, dx, acc),
            Op::BatchNorm { .. } => self.bn_backward(j, x, dx, acc),
            Op::Relu => {
                let n = self.plan.tensor(node.inputs[0]).numel();
                let y = self.t(node.outputs[0]);
                self.be
                    .relu_backward(n, y, dy, dx.context("relu gradient")?, acc)
            }
            Op::MaxPool(p) | Op::AvgPool(p) => {
                let s = pool_shape(*p, xs);
                let max = matches!(node.op, Op::MaxPool(_));
                let dx = dx.context("pool gradient")?;
                let ld = step.grad_output.map_or(s.c, |g| self.ld(g));
                self.be.pool_backward(&s, max, x, dy, ld, 0, dx, acc)
            }
            Op::GlobalAvgPool => self.be.global_avgpool_backward(
                xs[0],
                xs[1] * xs[2],
                xs[3],
                dy,
                dx.context("global pool gradient")?,
                acc,
            ),
            Op::Concat => self.concat_backward(j),
            Op::Dropout { p, seed } => {
                let n = self.plan.tensor(node.inputs[0]).numel();
                let dx = dx.context("dropout gradient")?;
                self.be.dropout_backward(n, *p, *seed, a.step, dy, dx, acc)
            }
            Op::Linear { .. } => self.linear_backward(j, x, dy, dx, acc),
            Op::SoftmaxCrossEntropy { smoothing } => self.be.softmax_ce(
                xs[0],
                xs[1],
                *smoothing,
                a.scale,
                x,
                Labels::F32(self.ptr.labels),
                self.ptr.row_loss,
                self.report_word(REPORT_LOSS),
                self.report_word(REPORT_COUNTER),
                dx.context("logits gradient")?,
            ),
        }
    }

    /// BN backward; with an absorbed ReLU it reads the ReLU's output and that output's gradient
    /// (both at the stride `bn_args` gives) and masks the gradient where the ReLU clipped.
    fn bn_backward(&self, j: usize, x: DevPtr, dx: Option<DevPtr>, acc: bool) -> Result<()> {
        let i = self.bwd.steps[j].node;
        let node = &self.plan.nodes[i];
        let out = self.fusion.effective_output(&self.plan, i);
        let gout = self.bwd.grad_of[out].context("batchnorm output gradient")?;
        let a = self.bn_args(i);
        if self.ld(gout) != a.ldy {
            bail!("{}: output and output gradient strides differ", node.name);
        }
        // Without a fused ReLU the kernel does not read y: pass x as a valid address.
        let y = if a.relu { self.t(out) } else { x };
        let (g, b) = (self.grad(node.params[0]), self.grad(node.params[1]));
        let dx = dx.context("batchnorm input always has a gradient")?;
        self.be
            .bn_backward(&a, x, y, self.t(gout), g, b, dx, acc, self.ptr.ws)
    }

    fn conv_backward(
        &self,
        i: usize,
        c: Conv2d,
        x: DevPtr,
        dy: DevPtr,
        dx: Option<DevPtr>,
        acc: bool,
    ) -> Result<()> {
        let s = arena::conv_shape(&self.plan, i).context("conv shape")?;
        let wt = self.plan.nodes[i].params[0];
        self.be.conv_wgrad(
            &s,
            x,
            dy,
            self.grad(wt),
            false,
            self.ptr.ws,
            self.ws_elems,
            None,
        )?;
        if let Some(dx) = dx {
            let out = ConvOut {
                accumulate: acc,
                ..ConvOut::dense(dx, c.cin)
            };
            self.be.conv_dgrad(&s, dy, self.weight(wt), out, None)?;
        }
        Ok(())
    }

    fn linear_backward(
        &self,
        j: usize,
        x: DevPtr,
        dy: DevPtr,
        dx: Option<DevPtr>,
        acc: bool,
    ) -> Result<()> {
        let node = &self.plan.nodes[self.bwd.steps[j].node];
        let Op::Linear {
            in_features: fi,
            out_features: fo,
        } = node.op
        else {
            unreachable!("linear_backward on a linear node")
        };
        let n = self.plan.batch();
        let (w, b) = (node.params[0], node.params[1]);
        if let Some(dx) = dx {
            self.be
                .linear_backward_data(n, fi, fo, dy, self.weight(w), dx, acc, None)?;
        }
        let (dw, db) = (self.grad(w), self.grad(b));
        self.be
            .linear_backward_weight(n, fi, fo, x, dy, dw, db, self.ptr.ws, self.ws_elems, None)
    }

    /// Copies the output gradient's channels into the input gradients that are not slices of it.
    fn concat_backward(&self, j: usize) -> Result<()> {
        let step = &self.bwd.steps[j];
        let (parts, rows) = self.concat_layout(step.node);
        let gy = step.grad_output.context("concat output gradient")?;
        let (dy, ld) = (self.t(gy), self.ld(gy));
        for ((g, &acc), (c, off)) in step.grad_inputs.iter().zip(&step.accumulate).zip(parts) {
            if let Some(g) = g.filter(|&g| self.fusion.view[g].is_none()) {
                self.be
                    .copy_channels(rows, c, dy, ld, off, self.t(g), c, 0, 0, acc)?;
            }
        }
        Ok(())
    }

    fn update(&self, a: StepArgs) -> Result<()> {
        let cfg = self.optim.cfg;
        let overflow = a.growth.map_or(0, |_| self.report_word(REPORT_OVERFLOW));
        let (inv_loss_scale, loss_scale) = match a.scale {
            ScaleArg::Value(v) => (1.0 / v, 0),
            ScaleArg::Device(p) => (1.0, p),
        };
        let p = RmspropParams {
            w: self.ptr.master,
            w16: self.ptr.w16,
            ms: self.ptr.ms,
            mom: self.ptr.mom,
            grad: self.ptr.grads,
            decay: self.ptr.decay,
            lr_dev: 0,
            overflow,
            count: self.params.len as u64,
            lr: a.lr,
            rho: cfg.rho,
            momentum: cfg.momentum,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
            inv_loss_scale,
            loss_scale,
        };
        self.be.rmsprop(p, false)
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
            "cuda ({}, {} SMs, amp {:?})",
            self.be.arch, self.be.num_sms, self.amp
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
                Some(_) => ScaleArg::Device(self.report_word(REPORT_SCALE)),
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
        self.read_tensor(self.plan.logits)
    }

    fn state(&mut self) -> Result<(ModelState, RmsProp)> {
        // See `grads`: the last step's update may still be queued.
        self.be.synchronize()?;
        let s = &self.be.stream;
        let params = self.params.gather(&s.clone_dtoh(&self.dev.master)?);
        let states = self.states.gather(&s.clone_dtoh(&self.dev.states)?);
        let mut optim = self.optim.clone();
        if self.train {
            optim.ms = self.params.gather(&s.clone_dtoh(&self.dev.ms)?);
            optim.mom = self.params.gather(&s.clone_dtoh(&self.dev.mom)?);
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
        be: &CudaBackend,
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

    fn ptrs(&self, be: &CudaBackend) -> Ptrs {
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
    fn alloc(be: &CudaBackend, plan: &Plan) -> Result<Self> {
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
    be: &CudaBackend,
    len: usize,
) -> std::result::Result<CudaSlice<T>, DriverError> {
    be.stream.alloc_zeros::<T>(len.max(1))
}

fn pool_shape(pool: crate::plan::Pool, xs: &[usize]) -> PoolShape {
    PoolShape {
        pool,
        n: xs[0],
        h: xs[1],
        w: xs[2],
        c: xs[3],
    }
}

/// Refuses up front when the card has less free memory than the estimate.
fn check_free_memory(be: &CudaBackend, plan: &Plan, est: &MemoryEstimate) -> Result<()> {
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
fn verify_fast_convs(be: &CudaBackend, plan: &Plan, stem: Option<usize>) {
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
