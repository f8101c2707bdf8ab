//! The launches of a CUDA step, apart from the device that runs them: [`StepLayout`] holds the
//! step program and where every tensor lives (arena offsets, parameter slots, buffer base
//! addresses), and turns each [`Launch`] into calls of [`StepKernels`]. The executor implements
//! that trait with the real launchers ([`CudaDevice`]); tests/cuda_launch.rs with a checker that
//! runs every launch of every program without a GPU and checks each operand against the buffers.

use anyhow::{bail, Context, Result};
use std::collections::HashMap;

use super::arena::{self, ParamSlots, STEM_CHANNELS};
use super::conv::{ConvOut, ConvShape};
use super::fusion::Fusion;
use super::ops::{BnArgs, Labels, PoolShape, RmspropParams, ScaleArg};
use super::step_plan::{check_program, Launch, StepProgram};
use super::{CudaDevice, DevPtr};
use crate::backend::Amp;
use crate::params::ParamLayout;
use crate::plan::backward::{derive, BackwardPlan};
use crate::plan::memory::MemoryPlan;
use crate::plan::{Conv2d, Op, Plan, TensorId};
use crate::optim::RmsPropConfig;

/// Report words: the mean loss (f32 bits), the overflow flag, softmax-CE's block counter, and the
/// device loss scaler's state (scale as f32 bits, clean steps).
pub const REPORT_LOSS: usize = 0;
pub const REPORT_OVERFLOW: usize = 1;
pub const REPORT_COUNTER: usize = 2;
pub const REPORT_SCALE: usize = 3;
pub const REPORT_CLEAN: usize = 4;
pub const REPORT_WORDS: usize = 8;

/// Base addresses of the device buffers (the executor's allocations), taken once: the launchers
/// work on raw pointers. 0 where a buffer does not exist.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ptrs {
    pub arena: DevPtr,
    pub master: DevPtr,
    pub w16: DevPtr,
    pub grads: DevPtr,
    pub ms: DevPtr,
    pub mom: DevPtr,
    pub decay: DevPtr,
    pub states: DevPtr,
    pub ws: DevPtr,
    pub images: DevPtr,
    pub labels: DevPtr,
    pub row_loss: DevPtr,
    pub report: DevPtr,
    pub stem: Option<(DevPtr, DevPtr)>,
}

/// Per-step values the launches need.
#[derive(Clone, Copy, Debug)]
pub struct StepArgs {
    pub train: bool,
    pub step: u64,
    pub lr: f32,
    /// The loss scale: a value, or the device scaler's (dynamic scaling).
    pub scale: ScaleArg,
    /// Dynamic scaling: the scaler's growth interval (the device checks overflow and updates it).
    pub growth: Option<u32>,
    /// The report slot this step's report goes to.
    pub slot: usize,
}

impl StepArgs {
    /// An inference pass.
    pub fn infer() -> Self {
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

/// The kernel launches a step makes, as the step program calls them (the launchers of
/// [`CudaDevice`] with the fast-path choice left to them).
#[allow(clippy::too_many_arguments)]
pub trait StepKernels {
    fn conv_fprop(&self, s: &ConvShape, x: DevPtr, w: DevPtr, out: ConvOut) -> Result<()>;
    fn conv_dgrad(&self, s: &ConvShape, dy: DevPtr, w: DevPtr, out: ConvOut) -> Result<()>;
    fn conv_wgrad(
        &self,
        s: &ConvShape,
        x: DevPtr,
        dy: DevPtr,
        dw: DevPtr,
        accumulate: bool,
        ws: DevPtr,
        ws_elems: usize,
    ) -> Result<()>;
    fn bn_forward_train(&self, a: &BnArgs, x: DevPtr, y: DevPtr, ws: DevPtr) -> Result<()>;
    fn bn_forward_infer(&self, a: &BnArgs, x: DevPtr, y: DevPtr) -> Result<()>;
    fn bn_backward(
        &self,
        a: &BnArgs,
        x: DevPtr,
        y: DevPtr,
        dy: DevPtr,
        dgamma: DevPtr,
        dbeta: DevPtr,
        dx: DevPtr,
        accumulate: bool,
        ws: DevPtr,
    ) -> Result<()>;
    fn relu_forward(&self, count: usize, x: DevPtr, y: DevPtr) -> Result<()>;
    fn relu_backward(
        &self,
        count: usize,
        y: DevPtr,
        dy: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()>;
    fn pool_forward(
        &self,
        s: &PoolShape,
        max: bool,
        x: DevPtr,
        y: DevPtr,
        ldy: usize,
        yoff: usize,
    ) -> Result<()>;
    fn pool_backward(
        &self,
        s: &PoolShape,
        max: bool,
        x: DevPtr,
        dy: DevPtr,
        ldy: usize,
        yoff: usize,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()>;
    fn global_avgpool_forward(
        &self,
        n: usize,
        hw: usize,
        c: usize,
        x: DevPtr,
        y: DevPtr,
    ) -> Result<()>;
    fn global_avgpool_backward(
        &self,
        n: usize,
        hw: usize,
        c: usize,
        dy: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()>;
    fn dropout_forward(
        &self,
        count: usize,
        p: f32,
        seed: u64,
        step: u64,
        x: DevPtr,
        y: DevPtr,
    ) -> Result<()>;
    fn dropout_backward(
        &self,
        count: usize,
        p: f32,
        seed: u64,
        step: u64,
        dy: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()>;
    fn linear_forward(
        &self,
        n: usize,
        in_f: usize,
        out_f: usize,
        x: DevPtr,
        w: DevPtr,
        b: DevPtr,
        y: DevPtr,
    ) -> Result<()>;
    fn linear_backward_data(
        &self,
        n: usize,
        in_f: usize,
        out_f: usize,
        dy: DevPtr,
        w: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()>;
    fn linear_backward_weight(
        &self,
        n: usize,
        in_f: usize,
        out_f: usize,
        x: DevPtr,
        dy: DevPtr,
        dw: DevPtr,
        db: DevPtr,
        ws: DevPtr,
        ws_elems: usize,
    ) -> Result<()>;
    fn softmax_ce(
        &self,
        n: usize,
        k: usize,
        smoothing: f32,
        scale: ScaleArg,
        logits: DevPtr,
        labels: Labels,
        row_loss: DevPtr,
        loss: DevPtr,
        counter: DevPtr,
        dlogits: DevPtr,
    ) -> Result<()>;
    fn copy_channels(
        &self,
        rows: usize,
        c: usize,
        src: DevPtr,
        src_ld: usize,
        src_off: usize,
        dst: DevPtr,
        dst_ld: usize,
        dst_off: usize,
        zero_to: usize,
        accumulate: bool,
    ) -> Result<()>;
    fn pad_channels(
        &self,
        rows: usize,
        c: usize,
        c_pad: usize,
        src: DevPtr,
        dst: DevPtr,
    ) -> Result<()>;
    fn cast_f32_to_f16(&self, src: DevPtr, count: usize, dst: DevPtr) -> Result<()>;
    fn overflow_check(&self, grads: DevPtr, count: usize, f16: bool, flag: DevPtr) -> Result<()>;
    fn rmsprop(&self, p: RmspropParams, grad_f16: bool) -> Result<()>;
    fn loss_scale_update(
        &self,
        flag: DevPtr,
        scale: DevPtr,
        clean: DevPtr,
        growth_interval: u32,
    ) -> Result<()>;
}

impl StepKernels for CudaDevice {
    fn conv_fprop(&self, s: &ConvShape, x: DevPtr, w: DevPtr, out: ConvOut) -> Result<()> {
        CudaDevice::conv_fprop(self, s, x, w, out, None).map(|_| ())
    }
    fn conv_dgrad(&self, s: &ConvShape, dy: DevPtr, w: DevPtr, out: ConvOut) -> Result<()> {
        CudaDevice::conv_dgrad(self, s, dy, w, out, None).map(|_| ())
    }
    fn conv_wgrad(
        &self,
        s: &ConvShape,
        x: DevPtr,
        dy: DevPtr,
        dw: DevPtr,
        accumulate: bool,
        ws: DevPtr,
        ws_elems: usize,
    ) -> Result<()> {
        CudaDevice::conv_wgrad(self, s, x, dy, dw, accumulate, ws, ws_elems, None).map(|_| ())
    }
    fn bn_forward_train(&self, a: &BnArgs, x: DevPtr, y: DevPtr, ws: DevPtr) -> Result<()> {
        CudaDevice::bn_forward_train(self, a, x, y, ws)
    }
    fn bn_forward_infer(&self, a: &BnArgs, x: DevPtr, y: DevPtr) -> Result<()> {
        CudaDevice::bn_forward_infer(self, a, x, y)
    }
    fn bn_backward(
        &self,
        a: &BnArgs,
        x: DevPtr,
        y: DevPtr,
        dy: DevPtr,
        dgamma: DevPtr,
        dbeta: DevPtr,
        dx: DevPtr,
        accumulate: bool,
        ws: DevPtr,
    ) -> Result<()> {
        CudaDevice::bn_backward(self, a, x, y, dy, dgamma, dbeta, dx, accumulate, ws)
    }
    fn relu_forward(&self, count: usize, x: DevPtr, y: DevPtr) -> Result<()> {
        CudaDevice::relu_forward(self, count, x, y)
    }
    fn relu_backward(
        &self,
        count: usize,
        y: DevPtr,
        dy: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()> {
        CudaDevice::relu_backward(self, count, y, dy, dx, accumulate)
    }
    fn pool_forward(
        &self,
        s: &PoolShape,
        max: bool,
        x: DevPtr,
        y: DevPtr,
        ldy: usize,
        yoff: usize,
    ) -> Result<()> {
        CudaDevice::pool_forward(self, s, max, x, y, ldy, yoff)
    }
    fn pool_backward(
        &self,
        s: &PoolShape,
        max: bool,
        x: DevPtr,
        dy: DevPtr,
        ldy: usize,
        yoff: usize,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()> {
        CudaDevice::pool_backward(self, s, max, x, dy, ldy, yoff, dx, accumulate)
    }
    fn global_avgpool_forward(
        &self,
        n: usize,
        hw: usize,
        c: usize,
        x: DevPtr,
        y: DevPtr,
    ) -> Result<()> {
        CudaDevice::global_avgpool_forward(self, n, hw, c, x, y)
    }
    fn global_avgpool_backward(
        &self,
        n: usize,
        hw: usize,
        c: usize,
        dy: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()> {
        CudaDevice::global_avgpool_backward(self, n, hw, c, dy, dx, accumulate)
    }
    fn dropout_forward(
        &self,
        count: usize,
        p: f32,
        seed: u64,
        step: u64,
        x: DevPtr,
        y: DevPtr,
    ) -> Result<()> {
        CudaDevice::dropout_forward(self, count, p, seed, step, x, y)
    }
    fn dropout_backward(
        &self,
        count: usize,
        p: f32,
        seed: u64,
        step: u64,
        dy: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()> {
        CudaDevice::dropout_backward(self, count, p, seed, step, dy, dx, accumulate)
    }
    fn linear_forward(
        &self,
        n: usize,
        in_f: usize,
        out_f: usize,
        x: DevPtr,
        w: DevPtr,
        b: DevPtr,
        y: DevPtr,
    ) -> Result<()> {
        CudaDevice::linear_forward(self, n, in_f, out_f, x, w, b, y, None)
    }
    fn linear_backward_data(
        &self,
        n: usize,
        in_f: usize,
        out_f: usize,
        dy: DevPtr,
        w: DevPtr,
        dx: DevPtr,
        accumulate: bool,
    ) -> Result<()> {
        CudaDevice::linear_backward_data(self, n, in_f, out_f, dy, w, dx, accumulate, None)
    }
    fn linear_backward_weight(
        &self,
        n: usize,
        in_f: usize,
        out_f: usize,
        x: DevPtr,
        dy: DevPtr,
        dw: DevPtr,
        db: DevPtr,
        ws: DevPtr,
        ws_elems: usize,
    ) -> Result<()> {
        CudaDevice::linear_backward_weight(self, n, in_f, out_f, x, dy, dw, db, ws, ws_elems, None)
    }
    fn softmax_ce(
        &self,
        n: usize,
        k: usize,
        smoothing: f32,
        scale: ScaleArg,
        logits: DevPtr,
        labels: Labels,
        row_loss: DevPtr,
        loss: DevPtr,
        counter: DevPtr,
        dlogits: DevPtr,
    ) -> Result<()> {
        CudaDevice::softmax_ce(
            self, n, k, smoothing, scale, logits, labels, row_loss, loss, counter, dlogits,
        )
    }
    fn copy_channels(
        &self,
        rows: usize,
        c: usize,
        src: DevPtr,
        src_ld: usize,
        src_off: usize,
        dst: DevPtr,
        dst_ld: usize,
        dst_off: usize,
        zero_to: usize,
        accumulate: bool,
    ) -> Result<()> {
        CudaDevice::copy_channels(
            self, rows, c, src, src_ld, src_off, dst, dst_ld, dst_off, zero_to, accumulate,
        )
    }
    fn pad_channels(
        &self,
        rows: usize,
        c: usize,
        c_pad: usize,
        src: DevPtr,
        dst: DevPtr,
    ) -> Result<()> {
        CudaDevice::pad_channels(self, rows, c, c_pad, src, dst)
    }
    fn cast_f32_to_f16(&self, src: DevPtr, count: usize, dst: DevPtr) -> Result<()> {
        CudaDevice::cast_f32_to_f16(self, src, count, dst)
    }
    fn overflow_check(&self, grads: DevPtr, count: usize, f16: bool, flag: DevPtr) -> Result<()> {
        CudaDevice::overflow_check(self, grads, count, f16, flag)
    }
    fn rmsprop(&self, p: RmspropParams, grad_f16: bool) -> Result<()> {
        CudaDevice::rmsprop(self, p, grad_f16)
    }
    fn loss_scale_update(
        &self,
        flag: DevPtr,
        scale: DevPtr,
        clean: DevPtr,
        growth_interval: u32,
    ) -> Result<()> {
        CudaDevice::loss_scale_update(self, flag, scale, clean, growth_interval)
    }
}

/// A plan's step program and where everything it touches lives.
pub struct StepLayout {
    pub plan: Plan,
    pub bwd: BackwardPlan,
    pub program: StepProgram,
    /// BN+ReLU fusion and the concat slices the program and arena were built with.
    pub fusion: Fusion,
    pub amp: Amp,
    /// Padded device slots of the parameters and of the BN running statistics.
    pub params: ParamSlots,
    pub states: ParamSlots,
    /// Device element offset of each parameter and state tensor.
    slot_of: HashMap<TensorId, usize>,
    /// Byte offset of each arena tensor (None where this arena does not store it).
    pub offsets: Vec<Option<usize>>,
    /// The padded stem convolution, when the 3-channel stem is padded for the tensor cores.
    pub stem: Option<usize>,
    pub ws_elems: usize,
    pub optim: RmsPropConfig,
    /// Base addresses of the buffers; all 0 until the executor has allocated them.
    pub ptr: Ptrs,
}

impl StepLayout {
    /// Derives the step program, checks it and places the arena, for a training step (`train`)
    /// or inference only, on a GPU with `num_sms` SMs (the split-K workspace depends on it).
    /// Returns the arena's memory plan beside the layout.
    pub fn new(
        plan: Plan,
        amp: Amp,
        train: bool,
        num_sms: u32,
        optim: RmsPropConfig,
    ) -> Result<(Self, MemoryPlan)> {
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
        let layout = ParamLayout::new(&plan);
        let (params, states) = (
            ParamSlots::new(&layout.params),
            ParamSlots::new(&layout.states),
        );
        let slot_of = params
            .tensors
            .iter()
            .zip(&params.slots)
            .chain(states.tensors.iter().zip(&states.slots))
            .map(|(&t, s)| (t, s.1))
            .collect();
        let ws_elems = match train {
            true => arena::workspace_elems(&plan, num_sms),
            false => 1,
        };
        let step = StepLayout {
            offsets: arena::offsets(&plan, &mem, &fusion, amp),
            plan,
            bwd,
            program,
            fusion,
            amp,
            params,
            states,
            slot_of,
            stem,
            ws_elems,
            optim,
            ptr: Ptrs::default(),
        };
        Ok((step, mem))
    }

    pub fn launch(&self, k: &dyn StepKernels, launch: Launch, a: StepArgs) -> Result<()> {
        match launch {
            Launch::LoadInput => self.load_input(k),
            Launch::PadStem { node } => self.pad_stem(k, node),
            Launch::Forward { node } => self.forward(k, node, a),
            Launch::Backward { step } => self.backward(k, step, a),
            Launch::OverflowCheck if a.growth.is_some() => k.overflow_check(
                self.ptr.grads,
                self.params.len,
                false,
                self.report_word(REPORT_OVERFLOW),
            ),
            Launch::Update => self.update(k, a),
            Launch::ScaleUpdate => match a.growth {
                Some(growth) => k.loss_scale_update(
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

    pub fn report_word(&self, word: usize) -> DevPtr {
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
    pub fn ld(&self, id: TensorId) -> usize {
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
    fn load_input(&self, k: &dyn StepKernels) -> Result<()> {
        let x = self.t(self.plan.input);
        let n = self.plan.tensor(self.plan.input).numel();
        match self.amp {
            Amp::O0 => {
                let c = *self.plan.shape(self.plan.input).last().unwrap();
                k.copy_channels(n / c, c, self.ptr.images, c, 0, x, c, 0, 0, false)
            }
            _ => k.cast_f32_to_f16(self.ptr.images, n, x),
        }
    }

    fn grad(&self, id: TensorId) -> DevPtr {
        self.ptr.grads + 4 * self.slot(id)
    }

    fn state(&self, id: TensorId) -> DevPtr {
        self.ptr.states + 4 * self.slot(id)
    }

    fn pad_stem(&self, k: &dyn StepKernels, node: usize) -> Result<()> {
        let (x, w) = self.ptr.stem.context("stem buffers are allocated")?;
        let s = arena::conv_shape(&self.plan, node).context("the stem is a convolution")?;
        let c = s.conv;
        let rows = s.n * s.h * s.w;
        let wx = self.w16(self.plan.nodes[node].params[0]);
        k.pad_channels(rows, c.cin, STEM_CHANNELS, self.t(self.plan.input), x)?;
        k.pad_channels(c.cout * c.kh * c.kw, c.cin, STEM_CHANNELS, wx, w)
    }

    fn forward(&self, k: &dyn StepKernels, i: usize, a: StepArgs) -> Result<()> {
        let node = &self.plan.nodes[i];
        let xs = self.plan.shape(node.inputs[0]);
        // What the node's kernel writes: an absorbing BN's own output is never stored.
        let out = self.fusion.effective_output(&self.plan, i);
        let (x, y) = (self.t(node.inputs[0]), self.t(out));
        match &node.op {
            Op::Conv2d(c) => self.conv_forward(k, i, *c, x, y),
            Op::BatchNorm { .. } => self.bn_forward(k, i, x, y, a.train),
            // A ReLU no BN absorbed (never in v4 or tiny).
            Op::Relu => k.relu_forward(self.plan.tensor(node.inputs[0]).numel(), x, y),
            Op::MaxPool(p) | Op::AvgPool(p) => {
                let s = pool_shape(*p, xs);
                let max = matches!(node.op, Op::MaxPool(_));
                k.pool_forward(&s, max, x, y, self.ld(node.outputs[0]), 0)
            }
            Op::GlobalAvgPool => k.global_avgpool_forward(xs[0], xs[1] * xs[2], xs[3], x, y),
            Op::Concat => self.concat_forward(k, i),
            Op::Dropout { p, seed } => {
                let p = if a.train { *p } else { 0.0 };
                let n = self.plan.tensor(node.inputs[0]).numel();
                k.dropout_forward(n, p, *seed, a.step, x, y)
            }
            Op::Linear {
                in_features,
                out_features,
            } => k.linear_forward(
                xs[0],
                *in_features,
                *out_features,
                x,
                self.weight(node.params[0]),
                self.w32(node.params[1]),
                y,
            ),
            Op::SoftmaxCrossEntropy { .. } => Ok(()),
        }
    }

    fn conv_forward(
        &self,
        k: &dyn StepKernels,
        i: usize,
        c: Conv2d,
        x: DevPtr,
        y: DevPtr,
    ) -> Result<()> {
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
                k.conv_fprop(&padded, xp, wp, out)
            }
            _ => k.conv_fprop(&s, x, self.weight(node.params[0]), out),
        }
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
    fn bn_forward(
        &self,
        k: &dyn StepKernels,
        i: usize,
        x: DevPtr,
        y: DevPtr,
        train: bool,
    ) -> Result<()> {
        let a = self.bn_args(i);
        if train {
            k.bn_forward_train(&a, x, y, self.ptr.ws)
        } else {
            k.bn_forward_infer(&a, x, y)
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
    fn concat_forward(&self, k: &dyn StepKernels, i: usize) -> Result<()> {
        let node = &self.plan.nodes[i];
        let (parts, rows) = self.concat_layout(i);
        let (y, ld) = (self.t(node.outputs[0]), self.ld(node.outputs[0]));
        for (&x, (c, off)) in node.inputs.iter().zip(parts) {
            if self.fusion.view[x].is_none() {
                k.copy_channels(rows, c, self.t(x), c, 0, y, ld, off, 0, false)?;
            }
        }
        Ok(())
    }

    fn backward(&self, k: &dyn StepKernels, j: usize, a: StepArgs) -> Result<()> {
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
            Op::Conv2d(_) => self.conv_backward(k, step.node, x, dy, dx, acc),
            Op::BatchNorm { .. } => self.bn_backward(k, j, x, dx, acc),
            Op::Relu => {
                let n = self.plan.tensor(node.inputs[0]).numel();
                let y = self.t(node.outputs[0]);
                k.relu_backward(n, y, dy, dx.context("relu gradient")?, acc)
            }
            Op::MaxPool(p) | Op::AvgPool(p) => {
                let s = pool_shape(*p, xs);
                let max = matches!(node.op, Op::MaxPool(_));
                let dx = dx.context("pool gradient")?;
                let ld = step.grad_output.map_or(s.c, |g| self.ld(g));
                k.pool_backward(&s, max, x, dy, ld, 0, dx, acc)
            }
            Op::GlobalAvgPool => k.global_avgpool_backward(
                xs[0],
                xs[1] * xs[2],
                xs[3],
                dy,
                dx.context("global pool gradient")?,
                acc,
            ),
            Op::Concat => self.concat_backward(k, j),
            Op::Dropout { p, seed } => {
                let n = self.plan.tensor(node.inputs[0]).numel();
                let dx = dx.context("dropout gradient")?;
                k.dropout_backward(n, *p, *seed, a.step, dy, dx, acc)
            }
            Op::Linear { .. } => self.linear_backward(k, j, x, dy, dx, acc),
            Op::SoftmaxCrossEntropy { smoothing } => k.softmax_ce(
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
    fn bn_backward(
        &self,
        k: &dyn StepKernels,
        j: usize,
        x: DevPtr,
        dx: Option<DevPtr>,
        acc: bool,
    ) -> Result<()> {
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
        k.bn_backward(&a, x, y, self.t(gout), g, b, dx, acc, self.ptr.ws)
    }

    fn conv_backward(
        &self,
        k: &dyn StepKernels,
        i: usize,
        x: DevPtr,
        dy: DevPtr,
        dx: Option<DevPtr>,
        acc: bool,
    ) -> Result<()> {
        let s = arena::conv_shape(&self.plan, i).context("conv shape")?;
        let wt = self.plan.nodes[i].params[0];
        k.conv_wgrad(&s, x, dy, self.grad(wt), false, self.ptr.ws, self.ws_elems)?;
        if let Some(dx) = dx {
            let out = ConvOut {
                accumulate: acc,
                ..ConvOut::dense(dx, s.conv.cin)
            };
            k.conv_dgrad(&s, dy, self.weight(wt), out)?;
        }
        Ok(())
    }

    fn linear_backward(
        &self,
        k: &dyn StepKernels,
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
            k.linear_backward_data(n, fi, fo, dy, self.weight(w), dx, acc)?;
        }
        let (dw, db) = (self.grad(w), self.grad(b));
        k.linear_backward_weight(n, fi, fo, x, dy, dw, db, self.ptr.ws, self.ws_elems)
    }

    /// Copies the output gradient's channels into the input gradients that are not slices of it.
    fn concat_backward(&self, k: &dyn StepKernels, j: usize) -> Result<()> {
        let step = &self.bwd.steps[j];
        let (parts, rows) = self.concat_layout(step.node);
        let gy = step.grad_output.context("concat output gradient")?;
        let (dy, ld) = (self.t(gy), self.ld(gy));
        for ((g, &acc), (c, off)) in step.grad_inputs.iter().zip(&step.accumulate).zip(parts) {
            if let Some(g) = g.filter(|&g| self.fusion.view[g].is_none()) {
                k.copy_channels(rows, c, dy, ld, off, self.t(g), c, 0, 0, acc)?;
            }
        }
        Ok(())
    }

    fn update(&self, k: &dyn StepKernels, a: StepArgs) -> Result<()> {
        let cfg = self.optim;
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
        k.rmsprop(p, false)
    }
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
