//! Launches as data: the step program (program.rs) resolved into [`Call`]s, one value per kernel
//! launch (or fixed short sequence) with every device address and shape filled in from the
//! [`StepLayout`]. The trainer builds a program's calls once, patches the per-step values
//! ([`Call::set_step`]) and runs them; tests/cuda_launch.rs inspects the same values without a GPU;
//! a CUDA graph could capture them as they are.

use anyhow::{Context, Result};

use super::arena::STEM_CHANNELS;
use super::layout::{StepArgs, StepLayout, REPORT_BN_COUNTER};
use super::program::Stage;
use crate::gpu::{CudaDevice, DevPtr, Launch};
use crate::ops::batchnorm::cuda::{BnArgs, BnBackward, BnForwardInfer, BnForwardTrain};
use crate::ops::cast::cuda::CastF32ToF16;
use crate::ops::concat::cuda::CopyChannels;
use crate::ops::conv::cuda::{ConvDgrad, ConvFprop, ConvOut, ConvWgrad};
use crate::ops::conv::ConvShape;
use crate::ops::dropout::cuda::{DropoutBackward, DropoutForward};
use crate::ops::global_pool::cuda::{GlobalAvgPoolBackward, GlobalAvgPoolForward};
use crate::ops::linear::cuda::{LinearBackwardData, LinearBackwardWeight, LinearForward};
use crate::ops::pool::cuda::{PoolBackward, PoolForward};
use crate::ops::pool::PoolShape;
use crate::ops::relu::cuda::{ReluBackward, ReluForward};
use crate::ops::softmax_ce::cuda::SoftmaxCe;
use crate::optim::cuda::{LossScaleUpdate, OverflowCheck, Rmsprop};
use crate::plan::{Conv2d, Op};
use crate::precision::Amp;

/// Declares [`Call`] with one variant per launch type (named as the type), its dispatch to the
/// type's [`Launch`], and the conversions.
macro_rules! calls {
    ($($kind:ident),* $(,)?) => {
        /// One resolved kernel call of a step.
        #[derive(Clone, Copy, Debug)]
        pub enum Call {
            $($kind($kind)),*
        }

        impl Launch for Call {
            fn launch(&self, dev: &CudaDevice) -> Result<()> {
                match self {
                    $(Call::$kind(c) => c.launch(dev)),*
                }
            }
        }

        $(impl From<$kind> for Call {
            fn from(c: $kind) -> Self {
                Call::$kind(c)
            }
        })*
    };
}

calls!(
    ConvFprop,
    ConvDgrad,
    ConvWgrad,
    BnForwardTrain,
    BnForwardInfer,
    BnBackward,
    ReluForward,
    ReluBackward,
    PoolForward,
    PoolBackward,
    GlobalAvgPoolForward,
    GlobalAvgPoolBackward,
    DropoutForward,
    DropoutBackward,
    LinearForward,
    LinearBackwardData,
    LinearBackwardWeight,
    SoftmaxCe,
    CopyChannels,
    CastF32ToF16,
    OverflowCheck,
    Rmsprop,
    LossScaleUpdate,
);

impl Call {
    /// Sets the values that change from step to step: the dropout masks' step and the learning
    /// rate. Everything else (addresses, shapes, the loss scale's value or address) is fixed once
    /// the arena is allocated.
    pub fn set_step(&mut self, step: u64, lr: f32) {
        match self {
            Call::DropoutForward(c) => c.step = step,
            Call::DropoutBackward(c) => c.step = step,
            Call::Rmsprop(c) => c.params.lr = lr,
            _ => {}
        }
    }
}

impl Call {
    /// Kernel launches this call queues: BN's reductions (two launches each on the baseline
    /// path, one on the vectorised), the split-K weight gradients and the classifier's bias
    /// kernels make some calls several. tests/emu_launch_count.rs checks the sum against the
    /// launches the launchers really queue (on the emulated GPU).
    pub fn kernel_launches(&self) -> usize {
        match self {
            Call::BnForwardTrain(c) => c.launches(),
            Call::BnBackward(c) => c.launches(),
            Call::LinearBackwardWeight(_) => 3,
            Call::ConvWgrad(_) | Call::LinearForward(_) => 2,
            _ => 1,
        }
    }
}

/// A program resolved into calls, each with the stage it came from (for error messages).
pub type Calls = Vec<(Stage, Call)>;

impl StepLayout {
    /// The calls of the training program (`train`) or the inference pass, for `a`.
    pub fn program_calls(&self, train: bool, a: StepArgs) -> Result<Calls> {
        let stages = match train {
            true => &self.program.train,
            false => &self.program.infer,
        };
        let mut out = Vec::new();
        for &stage in stages {
            let calls = self
                .calls(stage, a)
                .with_context(|| format!("{stage:?} of plan '{}'", self.plan.name))?;
            out.extend(calls.into_iter().map(|c| (stage, c)));
        }
        Ok(out)
    }

    /// The calls of one stage.
    pub fn calls(&self, stage: Stage, a: StepArgs) -> Result<Vec<Call>> {
        let mut out = Vec::new();
        match stage {
            Stage::LoadInput => out.push(self.load_input()),
            Stage::PadStem { node } => self.pad_stem(node, &mut out)?,
            Stage::Forward { node } => self.forward(node, a, &mut out)?,
            Stage::Backward { step } => self.backward(step, a, &mut out)?,
            Stage::OverflowCheck => out.extend(a.growth.map(|_| self.overflow_check())),
            Stage::Update => out.push(self.update(a)),
            Stage::ScaleUpdate => out.extend(a.growth.map(|g| self.scale_update(g))),
        }
        Ok(out)
    }

    /// The staged fp32 batch into the input tensor: converted to fp16, or copied in O0.
    fn load_input(&self) -> Call {
        let x = self.t(self.plan.input);
        let n = self.plan.tensor(self.plan.input).numel();
        match self.amp {
            Amp::O0 => {
                let c = *self.plan.shape(self.plan.input).last().unwrap();
                CopyChannels::dense(n / c, c, self.ptr.images, x).into()
            }
            _ => CastF32ToF16 {
                src: self.ptr.images,
                count: n,
                dst: x,
            }
            .into(),
        }
    }

    fn pad_stem(&self, node: usize, out: &mut Vec<Call>) -> Result<()> {
        let (x, w) = self.ptr.stem.context("stem buffers are allocated")?;
        let s = ConvShape::of_node(&self.plan, node).context("the stem is a convolution")?;
        let c = s.conv;
        let wx = self.w16(self.plan.nodes[node].params[0]);
        let rows = s.n * s.h * s.w;
        let input = self.t(self.plan.input);
        out.push(CopyChannels::pad(rows, c.cin, STEM_CHANNELS, input, x).into());
        out.push(CopyChannels::pad(c.cout * c.kh * c.kw, c.cin, STEM_CHANNELS, wx, w).into());
        Ok(())
    }

    fn forward(&self, i: usize, a: StepArgs, out: &mut Vec<Call>) -> Result<()> {
        let node = &self.plan.nodes[i];
        let xs = self.plan.shape(node.inputs[0]);
        // What the node's kernel writes: an absorbing BN's own output is never stored.
        let y_id = self.fusion.effective_output(&self.plan, i);
        let (x, y) = (self.t(node.inputs[0]), self.t(y_id));
        let numel = self.plan.tensor(node.inputs[0]).numel();
        let call: Call = match &node.op {
            Op::Conv2d(c) => self.conv_forward(i, *c, x, y)?,
            Op::BatchNorm { .. } => {
                let a_bn = self.bn_args(i);
                match a.train {
                    true => BnForwardTrain {
                        a: a_bn,
                        x,
                        y,
                        ws: self.ptr.ws,
                    }
                    .into(),
                    false => BnForwardInfer { a: a_bn, x, y }.into(),
                }
            }
            // A ReLU no BN absorbed (never in v4 or tiny).
            Op::Relu => ReluForward { count: numel, x, y }.into(),
            Op::MaxPool(p) | Op::AvgPool(p) => PoolForward {
                s: PoolShape::new(*p, xs[0], xs[1], xs[2], xs[3]),
                max: matches!(node.op, Op::MaxPool(_)),
                x,
                y,
                ldy: self.ld(node.outputs[0]),
                yoff: 0,
                // Saved for the backward: training only (an inference arena has no argmax).
                argmax: match a.train {
                    true => self.fusion.argmax[i].map_or(0, |t| self.t(t)),
                    false => 0,
                },
            }
            .into(),
            Op::GlobalAvgPool => GlobalAvgPoolForward {
                n: xs[0],
                hw: xs[1] * xs[2],
                c: xs[3],
                x,
                y,
            }
            .into(),
            Op::Concat => return self.concat_forward(i, out),
            Op::Dropout { p, seed } => DropoutForward {
                count: numel,
                p: if a.train { *p } else { 0.0 },
                seed: *seed,
                step: a.step,
                step_dev: self.step_word(a),
                x,
                y,
            }
            .into(),
            Op::Linear {
                in_features,
                out_features,
            } => LinearForward {
                n: xs[0],
                in_f: *in_features,
                out_f: *out_features,
                x,
                w: self.weight(node.params[0]),
                b: self.w32(node.params[1]),
                y,
                imp: None,
            }
            .into(),
            Op::SoftmaxCrossEntropy { .. } => return Ok(()),
        };
        out.push(call);
        Ok(())
    }

    /// The forward convolution; the stem reads its padded 8-channel copies when they exist.
    fn conv_forward(&self, i: usize, c: Conv2d, x: DevPtr, y: DevPtr) -> Result<Call> {
        let node = &self.plan.nodes[i];
        let s = ConvShape::of_node(&self.plan, i).context("conv shape")?;
        let out = ConvOut::dense(y, c.cout);
        let call = match (self.stem == Some(i), self.ptr.stem) {
            (true, Some((xp, wp))) => {
                let cin = STEM_CHANNELS;
                let s = ConvShape {
                    conv: Conv2d { cin, ..c },
                    ..s
                };
                ConvFprop {
                    s,
                    x: xp,
                    w: wp,
                    out,
                    imp: None,
                }
            }
            _ => {
                let w = self.weight(node.params[0]);
                ConvFprop {
                    s,
                    x,
                    w,
                    out,
                    imp: None,
                }
            }
        };
        Ok(call.into())
    }

    pub(super) fn bn_args(&self, i: usize) -> BnArgs {
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
            vec: self.paths.bn_vec,
            counter: self.report_word(REPORT_BN_COUNTER),
        }
    }

    /// Channel counts and offsets of a concat's inputs, and the output's row count.
    pub(super) fn concat_layout(&self, i: usize) -> (Vec<(usize, usize)>, usize) {
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
    fn concat_forward(&self, i: usize, out: &mut Vec<Call>) -> Result<()> {
        let node = &self.plan.nodes[i];
        let (parts, rows) = self.concat_layout(i);
        let (y, ld) = (self.t(node.outputs[0]), self.ld(node.outputs[0]));
        for (&x, (c, off)) in node.inputs.iter().zip(parts) {
            if self.fusion.view[x].is_none() {
                let copy = CopyChannels {
                    dst_ld: ld,
                    dst_off: off,
                    ..CopyChannels::dense(rows, c, self.t(x), y)
                };
                out.push(copy.into());
            }
        }
        Ok(())
    }
}
