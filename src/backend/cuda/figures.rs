//! Host-side figures of a resolved step program ([`StepFigures`]): its kernel launches, the
//! bytes batchnorm and the window pools move by their launchers' model ([`Traffic`]), and the
//! bytes the batch takes over the bus, for
//! comparing the leaner step's paths without a GPU (`bench train` prints them; tests/step_figures.rs
//! checks v4's). Nothing here is timed.

use super::calls::{Call, Calls};
use super::layout::StepLayout;
use crate::gpu::Traffic;
use crate::plan::Plan;
use crate::precision::Amp;

impl Call {
    /// The bytes a BN or pool call moves, by the launchers' model ([`Traffic`]); None for the
    /// other ops.
    pub fn op_traffic(&self, amp: Amp) -> Option<(OpGroup, Traffic)> {
        Some(match self {
            Call::BnForwardTrain(c) => (OpGroup::Batchnorm, c.traffic(amp)),
            Call::BnForwardInfer(c) => (OpGroup::Batchnorm, c.traffic(amp)),
            Call::BnBackward(c) => (OpGroup::Batchnorm, c.traffic(amp)),
            Call::PoolForward(c) => (OpGroup::Pool, c.traffic(amp)),
            Call::PoolBackward(c) => (OpGroup::Pool, c.traffic(amp)),
            _ => return None,
        })
    }
}

/// The ops whose bytes a step's figures count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpGroup {
    Batchnorm,
    /// The window pools (max and average; the global pool is not among them).
    Pool,
}

/// Host-side figures of a resolved program: kernel launches (the calls' and, on the `u8_input`
/// path, the normalisation's), the bytes BN and the window pools move by the launchers' model,
/// and the bytes uploaded per step (images and labels). Nothing is timed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StepFigures {
    pub launches: usize,
    pub bn: Traffic,
    pub pool: Traffic,
    pub upload: u64,
}

/// Bytes a training batch takes from the host: the images (f32, or u8 on the `u8_input` path)
/// and the labels (f32 on the device).
pub fn upload_bytes(plan: &Plan, u8_input: bool) -> u64 {
    let pixel = if u8_input { 1 } else { 4 };
    (plan.tensor(plan.input).numel() * pixel + plan.batch() * 4) as u64
}

impl StepFigures {
    /// The figures of `calls`, a training step resolved from `step`.
    pub fn of(calls: &Calls, step: &StepLayout) -> Self {
        let (amp, u8_input) = (step.amp, step.paths.u8_input);
        let mut f = StepFigures {
            launches: u8_input as usize,
            upload: upload_bytes(&step.plan, u8_input),
            ..StepFigures::default()
        };
        for (_, call) in calls {
            f.launches += call.kernel_launches();
            match call.op_traffic(amp) {
                Some((OpGroup::Batchnorm, t)) => f.bn = f.bn + t,
                Some((OpGroup::Pool, t)) => f.pool = f.pool + t,
                None => {}
            }
        }
        f
    }

    /// One line for logs: the MiB moved (the launches per step are on `bench train`'s limit
    /// line, which also counts what the host queues besides these calls).
    pub fn describe(&self) -> String {
        let mib = |t: Traffic| t.total() as f64 / (1 << 20) as f64;
        format!(
            "bytes moved per step, by model: batchnorm {:.1} MiB, pools {:.1} MiB; uploaded {:.1} MiB (no time measured)",
            mib(self.bn),
            mib(self.pool),
            self.upload as f64 / (1 << 20) as f64
        )
    }
}
