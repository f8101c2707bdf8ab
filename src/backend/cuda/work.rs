//! What a step's convolutions (and the classifier, which runs on the convolution kernels) issue,
//! counted on the host from the implementation each call's launcher would choose on a target:
//! tensor-core MMAs, plain-kernel FMAs and the multiply-adds the convolutions need. `bench train`
//! prints it for the lean and the baseline kernel paths; tests/conv_work.rs checks it.

use super::calls::{Call, Calls};
use super::layout::StepLayout;
use super::program::Stage;
use crate::ops::conv::count::{conv_macs, ConvWork};
use crate::ops::conv::cuda::{ConvDgrad, ConvFprop, ConvOut, ConvTarget, ConvWgrad};
use crate::ops::conv::ConvShape;

impl Call {
    /// What this call's convolution GEMM issues on `t` once every shape is verified (nothing for
    /// calls without one). The useful multiply-adds are those of the GEMM's own shape.
    pub fn conv_work(&self, t: &ConvTarget) -> ConvWork {
        match self {
            Call::ConvFprop(c) => c.work(t),
            Call::ConvDgrad(c) => c.work(t),
            Call::ConvWgrad(c) => c.work(t),
            Call::LinearForward(c) => ConvFprop {
                s: ConvShape::fc(c.n, c.in_f, c.out_f),
                x: c.x,
                w: c.w,
                out: ConvOut::dense(c.y, c.out_f),
                imp: c.imp,
            }
            .work(t),
            Call::LinearBackwardData(c) => ConvDgrad {
                s: ConvShape::fc(c.n, c.in_f, c.out_f),
                dy: c.dy,
                w: c.w,
                out: ConvOut::dense(c.dx, c.in_f),
                imp: c.imp,
            }
            .work(t),
            Call::LinearBackwardWeight(c) => ConvWgrad {
                s: ConvShape::fc(c.n, c.in_f, c.out_f),
                x: c.x,
                x_padded: None,
                dy: c.dy,
                dw: c.dw,
                accumulate: false,
                ws: c.ws,
                ws_elems: c.ws_elems,
                imp: c.imp,
            }
            .work(t),
            _ => ConvWork::default(),
        }
    }
}

impl StepLayout {
    /// The plan node a stage runs, if any.
    fn stage_node(&self, stage: &Stage) -> Option<usize> {
        match *stage {
            Stage::Forward { node } => Some(node),
            Stage::Backward { step } => Some(self.bwd.steps[step].node),
            _ => None,
        }
    }

    /// The convolution work of each call of `calls` (a resolved program) on `t`. A convolution's
    /// useful multiply-adds are its plan node's: the stem's forward runs over its input padded
    /// to 8 channels but computes the 3-channel convolution.
    pub fn conv_work_per_call(&self, calls: &Calls, t: &ConvTarget) -> Vec<ConvWork> {
        calls
            .iter()
            .map(|(stage, call)| {
                let mut w = call.conv_work(t);
                let node = self.stage_node(stage);
                if let Some(s) = node.and_then(|i| ConvShape::of_node(&self.plan, i)) {
                    w.useful_macs = conv_macs(&s);
                }
                w
            })
            .collect()
    }

    /// The sum of [`StepLayout::conv_work_per_call`].
    pub fn conv_work(&self, calls: &Calls, t: &ConvTarget) -> ConvWork {
        self.conv_work_per_call(calls, t).into_iter().sum()
    }
}
