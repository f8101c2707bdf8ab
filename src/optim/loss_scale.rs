//! Loss scaling, shared by every backend: the loss is multiplied by `scale()` before backward and
//! the gradients by `grad_scale()` (its inverse) in the optimizer. In fp32 it is a no-op.

use serde::{Deserialize, Serialize};

/// The scale a dynamic scaler starts at.
pub const DYNAMIC_START: f32 = 65536.0;
/// Clean steps after which a dynamic scaler doubles its scale.
pub const GROWTH_INTERVAL: u32 = 2000;

/// How the loss is scaled. Serialisable, so checkpoints resume it exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum LossScaler {
    /// fp32: scale 1, never skips.
    #[default]
    None,
    /// A fixed scale that never skips a step: like MindSpore, no overflow check at all.
    Fixed(f32),
    /// Halve (down to 1) and skip the step on overflow; double after `growth_interval`
    /// consecutive clean steps.
    Dynamic {
        scale: f32,
        growth_interval: u32,
        clean_steps: u32,
    },
}

/// What the training loop does with the step just computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepDecision {
    /// Do not apply the update (the gradients overflowed).
    pub skip: bool,
    /// The scale changed from `.0` to `.1`, for logging.
    pub scale_changed: Option<(f32, f32)>,
}

impl LossScaler {
    /// A dynamic scaler with the standard start (65536) and growth interval (2000).
    pub fn dynamic() -> Self {
        LossScaler::Dynamic {
            scale: DYNAMIC_START,
            growth_interval: GROWTH_INTERVAL,
            clean_steps: 0,
        }
    }

    /// The default for a precision level: none in fp32 (O0), dynamic when activations and
    /// gradients are fp16 (O2, O3), where small gradients would otherwise flush to zero.
    pub fn for_amp(amp: crate::precision::Amp) -> Self {
        match amp {
            crate::precision::Amp::O0 => LossScaler::None,
            _ => LossScaler::dynamic(),
        }
    }

    /// The factor the loss is multiplied by.
    pub fn scale(&self) -> f32 {
        match *self {
            LossScaler::None => 1.0,
            LossScaler::Fixed(s) => s,
            LossScaler::Dynamic { scale, .. } => scale,
        }
    }

    /// The factor gradients are multiplied by before the update: `1 / scale()`.
    pub fn grad_scale(&self) -> f32 {
        1.0 / self.scale()
    }

    /// Whether the loop needs to look for overflow at all (only the dynamic scaler reacts).
    pub fn checks_overflow(&self) -> bool {
        matches!(self, LossScaler::Dynamic { .. })
    }

    /// Record one step whose gradients did (or did not) overflow.
    pub fn update(&mut self, overflow: bool) -> StepDecision {
        let LossScaler::Dynamic {
            scale,
            growth_interval,
            clean_steps,
        } = self
        else {
            return StepDecision {
                skip: false,
                scale_changed: None,
            };
        };
        let old = *scale;
        if overflow {
            *scale = (old * 0.5).max(1.0);
            *clean_steps = 0;
            return StepDecision {
                skip: true,
                scale_changed: changed(old, *scale),
            };
        }
        *clean_steps += 1;
        if *clean_steps >= *growth_interval {
            *clean_steps = 0;
            let grown = old * 2.0;
            // Stay finite: an infinite scale would turn every gradient into inf or NaN.
            if grown.is_finite() {
                *scale = grown;
            }
        }
        StepDecision {
            skip: false,
            scale_changed: changed(old, *scale),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a loss scaler always serialises")
    }

    pub fn from_json(s: &str) -> anyhow::Result<Self> {
        serde_json::from_str(s).map_err(|e| anyhow::anyhow!("invalid loss-scaler state '{s}': {e}"))
    }
}

fn changed(old: f32, new: f32) -> Option<(f32, f32)> {
    (old != new).then_some((old, new))
}

/// Whether any gradient is infinite or NaN.
pub fn has_overflow(grads: &[f32]) -> bool {
    use rayon::prelude::*;
    grads
        .par_chunks(1 << 16)
        .any(|c| c.iter().any(|g| !g.is_finite()))
}
