//! The physical limit of a step: for each call, the useful arithmetic (2 x the MACs of the
//! convolutions and the classifier) and the minimum memory traffic (every operand read once and
//! every result written once, at the level's element sizes), and the time it would take at a
//! card's matrix rate and copy bandwidth, whichever binds. `bench train` sums it over the step
//! and `bench kernels` prints it per case, so a GPU visit shows where the step stands against the
//! card and not only against cuDNN. A model of the work, not of an implementation: it is the
//! same on every kernel path.

use serde::Serialize;

use super::calls::{Call, Calls};
use crate::ops::conv::cuda::ConvMode;
use crate::ops::conv::ConvShape;
use crate::ops::pool::PoolShape;
use crate::precision::Amp;

/// Bytes RMSProp must move per parameter: the fp32 weight, mean square and momentum read and
/// written, the fp32 gradient read and the fp16 working copy written (the decay mask left out).
pub const RMSPROP_BYTES_PER_PARAM: f64 = 4.0 * 2.0 * 3.0 + 4.0 + 2.0;

/// Useful work of a call or a step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Cost {
    /// Floating-point operations that need the matrix units (2 x MACs).
    pub flop: f64,
    /// Minimum bytes read and written in device memory.
    pub bytes: f64,
}

/// A card's measured rates (None where not measured): the matrix rate and the read + write
/// bandwidth of a device copy.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Rates {
    pub matrix_tflops: Option<f64>,
    pub copy_gbps: Option<f64>,
}

impl Cost {
    /// Milliseconds at `r`: arithmetic and traffic can overlap, so the slower of the two; None
    /// when a rate the work needs is unknown.
    pub fn limit_ms(&self, r: Rates) -> Option<f64> {
        let at = |amount: f64, rate: Option<f64>, unit: f64| match (amount, rate) {
            (0.0, _) => Some(0.0),
            (a, Some(rate)) => Some(a / (rate * unit) * 1e3),
            (_, None) => None,
        };
        let flop_ms = at(self.flop, r.matrix_tflops, 1e12)?;
        let bytes_ms = at(self.bytes, r.copy_gbps, 1e9)?;
        Some(flop_ms.max(bytes_ms))
    }

    fn add(self, o: Cost) -> Cost {
        Cost {
            flop: self.flop + o.flop,
            bytes: self.bytes + o.bytes,
        }
    }
}

/// A convolution's cost in `mode`: the forward's MACs in every mode; traffic of its operands
/// (activations `act` bytes each, the weight gradient in fp32).
pub fn conv_cost(s: &ConvShape, mode: ConvMode, act: f64) -> Cost {
    let c = &s.conv;
    let (x, y) = (
        (s.n * s.h * s.w * c.cin) as f64,
        (s.n * s.oh() * s.ow() * c.cout) as f64,
    );
    let w = (c.cout * c.kh * c.kw * c.cin) as f64;
    let bytes = match mode {
        ConvMode::Fprop | ConvMode::Dgrad => act * (x + y + w),
        ConvMode::Wgrad => act * (x + y) + 4.0 * w,
    };
    Cost {
        flop: 2.0 * y * w / c.cout as f64,
        bytes,
    }
}

/// Input plus output elements of a pooling window.
fn pool_elems(s: &PoolShape) -> f64 {
    (s.n * s.c * (s.h * s.w + s.oh() * s.ow())) as f64
}

/// Traffic only.
fn bytes(b: f64) -> Cost {
    Cost {
        flop: 0.0,
        bytes: b,
    }
}

impl Call {
    /// The useful work of this call at precision level `amp` (see the module documentation).
    pub fn cost(&self, amp: Amp) -> Cost {
        let act = if amp == Amp::O0 { 4.0 } else { 2.0 };
        let fc = |n, i, o| ConvShape::fc(n, i, o);
        match self {
            Call::ConvFprop(c) => conv_cost(&c.s, ConvMode::Fprop, act),
            Call::ConvDgrad(c) => conv_cost(&c.s, ConvMode::Dgrad, act),
            Call::ConvWgrad(c) => conv_cost(&c.s, ConvMode::Wgrad, act),
            Call::LinearForward(c) => conv_cost(&fc(c.n, c.in_f, c.out_f), ConvMode::Fprop, act),
            Call::LinearBackwardData(c) => {
                conv_cost(&fc(c.n, c.in_f, c.out_f), ConvMode::Dgrad, act)
            }
            Call::LinearBackwardWeight(c) => {
                conv_cost(&fc(c.n, c.in_f, c.out_f), ConvMode::Wgrad, act)
            }
            // Statistics and normalisation: x read, y written (the statistics are tiny).
            Call::BnForwardTrain(c) => bytes(2.0 * act * (c.a.m * c.a.c) as f64),
            Call::BnForwardInfer(c) => bytes(2.0 * act * (c.a.m * c.a.c) as f64),
            // x and dy read, dx written, and y read for the fused ReLU's mask.
            Call::BnBackward(c) => {
                let passes = if c.a.relu { 4.0 } else { 3.0 };
                bytes(passes * act * (c.a.m * c.a.c) as f64)
            }
            Call::ReluForward(c) => bytes(2.0 * act * c.count as f64),
            Call::ReluBackward(c) => bytes(3.0 * act * c.count as f64),
            Call::PoolForward(c) => bytes(act * pool_elems(&c.s)),
            // dy read and dx written; a max pool also reads which position won (a byte).
            Call::PoolBackward(c) => {
                let arg = if c.max {
                    (c.s.n * c.s.oh() * c.s.ow() * c.s.c) as f64
                } else {
                    0.0
                };
                bytes(act * pool_elems(&c.s) + arg)
            }
            Call::GlobalAvgPoolForward(c) => bytes(act * (c.n * c.c * (c.hw + 1)) as f64),
            Call::GlobalAvgPoolBackward(c) => bytes(act * (c.n * c.c * (c.hw + 1)) as f64),
            Call::DropoutForward(c) => bytes(2.0 * act * c.count as f64),
            Call::DropoutBackward(c) => bytes(2.0 * act * c.count as f64),
            // Logits read, their gradient written.
            Call::SoftmaxCe(c) => bytes(2.0 * act * (c.n * c.k) as f64),
            Call::CopyChannels(c) => bytes(2.0 * act * (c.rows * c.c) as f64),
            Call::CastF32ToF16(c) => bytes(6.0 * c.count as f64),
            Call::OverflowCheck(c) => bytes(if c.f16 { 2.0 } else { 4.0 } * c.count as f64),
            Call::Rmsprop(c) => bytes(RMSPROP_BYTES_PER_PARAM * c.params.count as f64),
            Call::LossScaleUpdate(_) => Cost::default(),
        }
    }
}

/// The sum over `calls` of the work, and of each call's limit at `rates` (each call is bound by
/// its own resource, so the step's limit is the sum of the calls' limits, not the larger of
/// the summed arithmetic and traffic; None when a rate is unknown).
pub fn step_limit(calls: &Calls, amp: Amp, rates: Rates) -> (Cost, Option<f64>) {
    let mut sum = Cost::default();
    let mut ms = Some(0.0);
    for (_, call) in calls {
        let c = call.cost(amp);
        sum = sum.add(c);
        ms = ms.zip(c.limit_ms(rates)).map(|(a, b)| a + b);
    }
    (sum, ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Conv2d;

    #[test]
    fn conv_cost_counts_the_forward_macs_and_each_operand_once() {
        // 3x3, 8 -> 16 channels, stride 1, pad 1 on a 4x5 image, batch 2: 2*4*5*16*72 MACs.
        let s = ConvShape {
            conv: Conv2d {
                cin: 8,
                cout: 16,
                kh: 3,
                kw: 3,
                stride: 1,
                pad_top: 1,
                pad_bottom: 1,
                pad_left: 1,
                pad_right: 1,
            },
            n: 2,
            h: 4,
            w: 5,
        };
        let macs = (2 * 4 * 5 * 16 * 72) as f64;
        let (x, y, w) = (2.0 * 4.0 * 5.0 * 8.0, 2.0 * 4.0 * 5.0 * 16.0, 16.0 * 72.0);
        for mode in [ConvMode::Fprop, ConvMode::Dgrad, ConvMode::Wgrad] {
            assert_eq!(conv_cost(&s, mode, 2.0).flop, 2.0 * macs, "{mode:?}");
        }
        assert_eq!(conv_cost(&s, ConvMode::Fprop, 2.0).bytes, 2.0 * (x + y + w));
        assert_eq!(
            conv_cost(&s, ConvMode::Wgrad, 2.0).bytes,
            2.0 * (x + y) + 4.0 * w
        );
    }

    #[test]
    fn the_limit_is_the_slower_of_arithmetic_and_traffic_and_needs_its_rates() {
        let r = Rates {
            matrix_tflops: Some(1.0),
            copy_gbps: Some(1.0),
        };
        let conv = Cost {
            flop: 2e12,
            bytes: 1e9,
        };
        assert_eq!(conv.limit_ms(r), Some(2000.0));
        let c = Cost {
            flop: 1e12,
            bytes: 3e9,
        };
        assert_eq!(c.limit_ms(r), Some(3000.0));
        let no_matrix = Rates {
            matrix_tflops: None,
            ..r
        };
        assert_eq!(conv.limit_ms(no_matrix), None);
        let bn = Cost {
            flop: 0.0,
            bytes: 4e9,
        };
        assert_eq!(bn.limit_ms(no_matrix), Some(4000.0));
    }
}
