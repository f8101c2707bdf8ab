//! The backward half of the step's resolution into calls (see calls.rs): each backward step's
//! launches, then the optimizer's stages (the overflow check, RMSProp, the scaler update).

use anyhow::{bail, Context, Result};

use super::calls::Call;
use super::layout::{StepArgs, StepLayout, REPORT_CLEAN, REPORT_COUNTER, REPORT_LOSS};
use super::layout::{ARG_LR, REPORT_OVERFLOW, REPORT_SCALE};
use crate::gpu::DevPtr;
use crate::ops::batchnorm::cuda::BnBackward;
use crate::ops::concat::cuda::CopyChannels;
use crate::ops::conv::cuda::{ConvDgrad, ConvOut, ConvWgrad};
use crate::ops::conv::ConvShape;
use crate::ops::dropout::cuda::DropoutBackward;
use crate::ops::global_pool::cuda::GlobalAvgPoolBackward;
use crate::ops::linear::cuda::{LinearBackwardData, LinearBackwardWeight};
use crate::ops::pool::cuda::PoolBackward;
use crate::ops::pool::PoolShape;
use crate::ops::relu::cuda::ReluBackward;
use crate::ops::softmax_ce::cuda::{Labels, ScaleArg, SoftmaxCe};
use crate::optim::cuda::{LossScaleUpdate, OverflowCheck, Rmsprop, RmspropParams};
use crate::plan::Op;

impl StepLayout {
    pub(super) fn backward(&self, j: usize, a: StepArgs, out: &mut Vec<Call>) -> Result<()> {
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
        let accumulate = step.accumulate[0];
        let count = self.plan.tensor(node.inputs[0]).numel();
        let call: Call = match &node.op {
            Op::Conv2d(_) => return self.conv_backward(step.node, x, dy, dx, accumulate, out),
            Op::BatchNorm { .. } => self.bn_backward(j, x, dx, accumulate)?,
            Op::Relu => ReluBackward {
                count,
                y: self.t(node.outputs[0]),
                dy,
                dx: dx.context("relu gradient")?,
                accumulate,
            }
            .into(),
            Op::MaxPool(p) | Op::AvgPool(p) => {
                let s = PoolShape::new(*p, xs[0], xs[1], xs[2], xs[3]);
                // With a saved argmax the input is not read (nor kept alive for this step).
                let argmax = self.fusion.argmax[step.node].map_or(0, |t| self.t(t));
                PoolBackward {
                    s,
                    max: matches!(node.op, Op::MaxPool(_)),
                    x: if argmax == 0 { x } else { 0 },
                    argmax,
                    dy,
                    ldy: step.grad_output.map_or(s.c, |g| self.ld(g)),
                    yoff: 0,
                    dx: dx.context("pool gradient")?,
                    accumulate,
                }
                .into()
            }
            Op::GlobalAvgPool => GlobalAvgPoolBackward {
                n: xs[0],
                hw: xs[1] * xs[2],
                c: xs[3],
                dy,
                dx: dx.context("global pool gradient")?,
                accumulate,
            }
            .into(),
            Op::Concat => return self.concat_backward(j, out),
            Op::Dropout { p, seed } => DropoutBackward {
                count,
                p: *p,
                seed: *seed,
                step: a.step,
                step_dev: self.step_word(a),
                dy,
                dx: dx.context("dropout gradient")?,
                accumulate,
            }
            .into(),
            Op::Linear { .. } => return self.linear_backward(j, x, dy, dx, accumulate, out),
            Op::SoftmaxCrossEntropy { smoothing } => SoftmaxCe {
                n: xs[0],
                k: xs[1],
                smoothing: *smoothing,
                grad_scale: a.scale,
                logits: x,
                labels: Labels::F32(self.ptr.labels),
                row_loss: self.ptr.row_loss,
                loss: self.report_word(REPORT_LOSS),
                counter: self.report_word(REPORT_COUNTER),
                dlogits: dx.context("logits gradient")?,
            }
            .into(),
        };
        out.push(call);
        Ok(())
    }

    /// BN backward; with an absorbed ReLU it reads the ReLU's output and that output's gradient
    /// (both at the stride `bn_args` gives) and masks the gradient where the ReLU clipped.
    fn bn_backward(&self, j: usize, x: DevPtr, dx: Option<DevPtr>, acc: bool) -> Result<Call> {
        let i = self.bwd.steps[j].node;
        let node = &self.plan.nodes[i];
        let y_id = self.fusion.effective_output(&self.plan, i);
        let gout = self.bwd.grad_of[y_id].context("batchnorm output gradient")?;
        let a = self.bn_args(i);
        if self.ld(gout) != a.ldy {
            bail!("{}: output and output gradient strides differ", node.name);
        }
        Ok(BnBackward {
            a,
            x,
            // Without a fused ReLU the kernel does not read y: pass x as a valid address.
            y: if a.relu { self.t(y_id) } else { x },
            dy: self.t(gout),
            dgamma: self.grad(node.params[0]),
            dbeta: self.grad(node.params[1]),
            dx: dx.context("batchnorm input always has a gradient")?,
            accumulate: acc,
            ws: self.ptr.ws,
        }
        .into())
    }

    fn conv_backward(
        &self,
        i: usize,
        x: DevPtr,
        dy: DevPtr,
        dx: Option<DevPtr>,
        accumulate: bool,
        out: &mut Vec<Call>,
    ) -> Result<()> {
        let s = ConvShape::of_node(&self.plan, i).context("conv shape")?;
        let wt = self.plan.nodes[i].params[0];
        let (ws, ws_elems) = (self.ptr.ws, self.ws_elems);
        let dw = self.grad(wt);
        // The stem's input padded to 8 channels (made by its forward each step): its weight
        // gradient may run on the tensor cores over that copy (`stem_wgrad_tc`).
        let x_padded = match (self.stem == Some(i), self.ptr.stem) {
            (true, Some((xp, _))) => Some(xp),
            _ => None,
        };
        let wgrad = ConvWgrad {
            s,
            x,
            x_padded,
            dy,
            dw,
            accumulate: false,
            ws,
            ws_elems,
            imp: None,
        };
        out.push(wgrad.into());
        if let Some(dx) = dx {
            let out_dx = ConvOut {
                accumulate,
                ..ConvOut::dense(dx, s.conv.cin)
            };
            let w = self.weight(wt);
            out.push(
                ConvDgrad {
                    s,
                    dy,
                    w,
                    out: out_dx,
                    imp: None,
                }
                .into(),
            );
        }
        Ok(())
    }

    fn linear_backward(
        &self,
        j: usize,
        x: DevPtr,
        dy: DevPtr,
        dx: Option<DevPtr>,
        accumulate: bool,
        out: &mut Vec<Call>,
    ) -> Result<()> {
        let node = &self.plan.nodes[self.bwd.steps[j].node];
        let Op::Linear {
            in_features: in_f,
            out_features: out_f,
        } = node.op
        else {
            unreachable!("linear_backward on a linear node")
        };
        let n = self.plan.batch();
        let (w, b) = (node.params[0], node.params[1]);
        if let Some(dx) = dx {
            let w = self.weight(w);
            let data = LinearBackwardData {
                n,
                in_f,
                out_f,
                dy,
                w,
                dx,
                accumulate,
                imp: None,
            };
            out.push(data.into());
        }
        let weight = LinearBackwardWeight {
            n,
            in_f,
            out_f,
            x,
            dy,
            dw: self.grad(w),
            db: self.grad(b),
            ws: self.ptr.ws,
            ws_elems: self.ws_elems,
            imp: None,
        };
        out.push(weight.into());
        Ok(())
    }

    /// Copies the output gradient's channels into the input gradients that are not slices of it.
    fn concat_backward(&self, j: usize, out: &mut Vec<Call>) -> Result<()> {
        let step = &self.bwd.steps[j];
        let (parts, rows) = self.concat_layout(step.node);
        let gy = step.grad_output.context("concat output gradient")?;
        let (dy, ld) = (self.t(gy), self.ld(gy));
        for ((g, &acc), (c, off)) in step.grad_inputs.iter().zip(&step.accumulate).zip(parts) {
            if let Some(g) = g.filter(|&g| self.fusion.view[g].is_none()) {
                let copy = CopyChannels {
                    src_ld: ld,
                    src_off: off,
                    accumulate: acc,
                    ..CopyChannels::dense(rows, c, dy, self.t(g))
                };
                out.push(copy.into());
            }
        }
        Ok(())
    }

    pub(super) fn overflow_check(&self) -> Call {
        OverflowCheck {
            grads: self.ptr.grads,
            count: self.params.len,
            f16: false,
            flag: self.report_word(REPORT_OVERFLOW),
        }
        .into()
    }

    pub(super) fn scale_update(&self, growth_interval: u32) -> Call {
        LossScaleUpdate {
            flag: self.report_word(REPORT_OVERFLOW),
            scale: self.report_word(REPORT_SCALE),
            clean: self.report_word(REPORT_CLEAN),
            growth_interval,
        }
        .into()
    }

    pub(super) fn update(&self, a: StepArgs) -> Call {
        let cfg = self.optim;
        let overflow = a.growth.map_or(0, |_| self.report_word(REPORT_OVERFLOW));
        // The mean over the ranks rides on the unscale factor (an exact no-op for one rank).
        let world = self.world as f32;
        let (inv_loss_scale, loss_scale) = match a.scale {
            ScaleArg::Value(v) => (1.0 / (v * world), 0),
            ScaleArg::Device(p) => (1.0 / world, p),
        };
        let params = RmspropParams {
            w: self.ptr.master,
            w16: self.ptr.w16,
            ms: self.ptr.ms,
            mom: self.ptr.mom,
            grad: self.ptr.grads,
            decay: self.ptr.decay,
            lr_dev: if a.on_device {
                self.report_word(ARG_LR)
            } else {
                0
            },
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
        Rmsprop {
            params,
            grad_f16: false,
        }
        .into()
    }
}
