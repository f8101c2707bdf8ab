//! The start-up check production needs: before a trainer uses the tensor-core convolutions, each
//! of its plan's shapes is checked against the plain kernels on this card (a small batch; the
//! registry key ignores the batch), and only verified shapes take the fast path. A shape is
//! checked when any implementation the device's kernel paths would prefer for it (a narrow tile,
//! the phase-split data gradient, the stem's weight gradient over its padded input) is not yet
//! verified. The passes are persisted next to the kernel cache, so later runs skip the check.

use anyhow::Result;

use super::arena::STEM_CHANNELS;
use crate::gpu::check::{Check, SelfTest, Status};
use crate::gpu::CudaDevice;
use crate::ops::conv::cuda::{choose_on, choose_with, needs_pad8, ConvMode, ConvTarget};
use crate::ops::conv::{plan_shapes, ConvShape};
use crate::plan::{Conv2d, Plan};
use crate::precision::Amp;

/// Checks the tensor-core kernels against the plain kernels at `shapes` (batch capped at 4) and
/// records the passes, persisting them. Returns the checks that ran (failures mean those shapes
/// stay on the plain kernels).
pub fn verify_conv_shapes(dev: &CudaDevice, shapes: &[ConvShape]) -> Result<Vec<Check>> {
    if dev.amp == Amp::O0 {
        return Ok(Vec::new()); // O0 never runs the tensor-core kernels
    }
    let mut test = SelfTest::new(dev, 0x5eed);
    test.cpu_conv = false;
    for s in shapes {
        let small = ConvShape {
            n: s.n.min(4),
            ..*s
        };
        // What the launchers would pick with everything verified, against what they pick now (a
        // 3-channel input counts as padded: the trainer holds the stem's padded copy).
        let target = ConvTarget::of(dev);
        let padded = needs_pad8(s);
        let fast = [ConvMode::Fprop, ConvMode::Dgrad, ConvMode::Wgrad]
            .iter()
            .all(|&m| {
                choose_on(dev, &small, m, None, padded)
                    == choose_with(&target, &small, m, None, padded, |_| true)
            });
        if !fast {
            test.conv(&small)?;
        }
    }
    dev.save_verified()?;
    Ok(test
        .checks
        .into_iter()
        .filter(|c| c.status != Status::Skip)
        .collect())
}

/// Checks the tensor-core kernels at this plan's conv shapes (and the padded stem). A failure
/// only keeps those shapes on the plain kernels, so it is reported, not returned.
pub fn verify_fast_convs(dev: &CudaDevice, plan: &Plan, stem: Option<usize>) {
    let mut shapes = plan_shapes(plan);
    if let Some(s) = stem.and_then(|i| ConvShape::of_node(plan, i)) {
        let cin = STEM_CHANNELS;
        shapes.push(ConvShape {
            conv: Conv2d { cin, ..s.conv },
            ..s
        });
    }
    match verify_conv_shapes(dev, &shapes) {
        Ok(checks) => {
            let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
            if failed > 0 {
                eprintln!(
                    "cuda: {failed} tensor-core conv checks failed; those shapes use the plain \
                     kernels"
                );
            }
        }
        Err(e) => eprintln!(
            "cuda: conv verification did not run ({e:#}); unverified shapes use the plain kernels"
        ),
    }
}
