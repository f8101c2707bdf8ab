//! Each case's physical limit: the time its useful work would take at the card's measured matrix
//! rate (the [`Case::Matrix`] row) and copy bandwidth (the [`Case::Copy`] row), whichever binds
//! (the model of src/backend/cuda/cost.rs, which `bench train` sums over a whole step).

use super::cases::{Cases, PoolCase, RMSPROP_BYTES_PER_PARAM};
use super::gpu::Case;
use crate::backend::cuda::cost::{conv_cost, Cost};
use crate::ops::conv::cuda::ConvMode;

/// The useful work of `case`; None for the two reference rows.
pub fn case_cost(case: &Case, cases: &Cases) -> Option<Cost> {
    let bytes = |b: f64| Cost {
        flop: 0.0,
        bytes: b,
    };
    Some(match case {
        Case::Copy | Case::Matrix => return None,
        Case::Conv(c, m) => conv_cost(&c.shape, *m, 2.0),
        Case::ConvPad8(c) => conv_cost(&c.shape, ConvMode::Fprop, 2.0),
        Case::Fc(m) => conv_cost(&cases.fc_shape(), *m, 2.0),
        Case::Bn(b, fwd) => bytes(if *fwd { b.fwd_bytes() } else { b.bwd_bytes() }),
        Case::Pool(p, fwd) => bytes(pool_bytes(p, *fwd)),
        Case::SoftmaxCe => bytes(2.0 * 2.0 * (cases.batch * cases.classes) as f64),
        Case::Rmsprop => bytes(RMSPROP_BYTES_PER_PARAM * cases.params as f64),
    })
}

/// Input and output read or written once (fp16); a max pool's backward also reads which window
/// position won (a byte per output).
fn pool_bytes(p: &PoolCase, fwd: bool) -> f64 {
    let s = &p.shape;
    let (input, output) = (
        (s.n * s.h * s.w * s.c) as f64,
        (s.n * s.oh() * s.ow() * s.c) as f64,
    );
    let argmax = if p.max && !fwd { output } else { 0.0 };
    2.0 * (input + output) + argmax
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::cases::derive;

    #[test]
    fn every_measured_case_has_a_cost_and_the_references_none() {
        let cases = derive("v4", 128, 299).unwrap();
        for case in Case::all(&cases) {
            let cost = case_cost(&case, &cases);
            match case {
                Case::Copy | Case::Matrix => assert!(cost.is_none()),
                _ => assert!(cost.is_some_and(|c| c.bytes > 0.0), "{}", case.id()),
            }
        }
    }
}
