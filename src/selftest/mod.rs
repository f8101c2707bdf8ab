//! The GPU self-test runner: every op's check case (src/ops/<op>/check.rs, src/optim/check.rs)
//! at the distinct shapes of a plan and at every precision level, then whole training steps
//! against the CPU backend ([`step`]). `inception-engine selftest --device cuda` prints its
//! table; tests/emu_gpu.rs runs it on the emulated GPU.

pub mod step;

use anyhow::Result;

use crate::gpu::check::{Check, SelfTest, Status};
use crate::gpu::CudaDevice;
use crate::ops::conv::cuda::{tc_supported, ConvMode};
use crate::ops::conv::{plan_shapes as plan_conv_shapes, ConvShape};
use crate::ops::pool::PoolShape;
use crate::plan::{Conv2d, Op, Plan};
use crate::precision::Amp;

/// The kernel checks at every precision level: O2 (all kernels), then the O0 and O3 variants.
/// Appends to `checks` even when a level fails to run, and leaves the device at O2.
pub fn run_levels(
    dev: &mut CudaDevice,
    plan: &Plan,
    seed: u64,
    checks: &mut Vec<Check>,
) -> Result<()> {
    let mut outcome = Ok(());
    for amp in [Amp::O2, Amp::O0, Amp::O3] {
        dev.set_amp(amp);
        let mut test = SelfTest::new(dev, seed);
        outcome = run_plan(&mut test, plan);
        checks.append(&mut test.checks);
        if outcome.is_err() {
            break;
        }
    }
    dev.set_amp(Amp::O2);
    outcome
}

/// Every check at the shapes of `plan` for the device's precision level: everything at O2; at
/// O0 the fp32 variants (the plain convolutions at one shape per geometry); at O3 the BN
/// variants, the only kernels O3 does not share with O2.
pub fn run_plan(t: &mut SelfTest, plan: &Plan) -> Result<()> {
    match t.dev.amp {
        Amp::O2 => run_plan_o2(t, plan),
        Amp::O0 => {
            for s in plan_conv_geometries(plan) {
                t.conv(&s)?;
            }
            run_bn(t, plan, false)?;
            run_activation_ops(t, plan)
        }
        Amp::O3 => run_bn(t, plan, false),
    }
}

/// All distinct convolutions (and the stem padded to 8 channels), BN shapes with and without
/// ReLU, pools, global pool, dropout, softmax-CE, channel copies, the FC layer, RMSProp.
fn run_plan_o2(t: &mut SelfTest, plan: &Plan) -> Result<()> {
    let shapes = plan_conv_shapes(plan);
    for s in &shapes {
        t.conv(s)?;
        if s.conv.cin % 8 != 0 {
            t.stem_padding(s)?;
        }
    }
    // The epilogue's slice and accumulate options, on a stride-1 shape and on a strided one (whose
    // data gradient may run by stride phase, with its own row-to-pixel mapping).
    for strided in [false, true] {
        if let Some(s) = shapes
            .iter()
            .find(|s| tc_supported(s, ConvMode::Dgrad, None) && (s.conv.stride > 1) == strided)
        {
            t.conv_slice_accumulate(s)?;
        }
    }
    t.casts(1 << 16)?;
    let input = plan.shape(plan.input);
    t.normalize_u8(input[0], input[1])?;
    run_bn(t, plan, true)?;
    run_activation_ops(t, plan)?;
    t.rmsprop(1 << 20)?;
    t.fp16_gradients(1 << 14)?;
    t.device_step_args(1 << 12)?;
    t.wgrad_reduce_f16(1 << 14)
}

/// BN with the fused ReLU at every distinct shape (`all`) or only the first, then without ReLU
/// at the last shape, each on both paths; then the other layouts at one shape.
fn run_bn(t: &mut SelfTest, plan: &Plan, all: bool) -> Result<()> {
    let bns = plan_bn_shapes(plan);
    let with_relu = if all { bns.len() } else { 1 };
    for &(m, c) in bns.iter().take(with_relu) {
        t.batchnorm(m, c, true)?;
    }
    if let Some(&(m, c)) = bns.last() {
        t.batchnorm(m, c, false)?;
    }
    // Concat slices, accumulation and the vectorised path's fallbacks, at the first shape it takes.
    if let Some(&(m, c)) = bns.iter().find(|&&(_, c)| c.is_multiple_of(8)) {
        t.batchnorm_layouts(m, c)?;
    }
    Ok(())
}

/// The kernels that take activations and have fp32 variants, besides convolution and BN.
fn run_activation_ops(t: &mut SelfTest, plan: &Plan) -> Result<()> {
    for (s, max) in plan_pools(plan) {
        t.pool(&s, max)?;
    }
    let feat = plan.shape(plan.logits);
    let (n, classes) = (feat[0], feat[1]);
    let gap_in = plan
        .nodes
        .iter()
        .find(|nd| nd.op == Op::GlobalAvgPool)
        .map(|nd| plan.shape(nd.inputs[0]).to_vec());
    if let Some(s) = gap_in {
        t.global_avgpool(s[0], s[1] * s[2], s[3])?;
    }
    t.dropout(n * 1536, plan.config.dropout.max(0.2))?;
    t.softmax_ce(n, classes, plan.config.label_smoothing)?;
    t.copy_channels(n * 35 * 35)?; // the rows of an Inception-A concat
    t.relu(1 << 14)?;
    if let Some((in_f, out_f)) = plan_linear(plan) {
        t.linear(n, in_f, out_f)?;
    }
    Ok(())
}

/// The pass/fail table, one line per check.
pub fn table(checks: &[Check]) -> String {
    let mut out = format!(
        "{:<34} {:<40} {:<12} {:>6} {:>11} {:>10}\n",
        "kernel", "shape", "oracle", "status", "max_abs_err", "rel_err"
    );
    for c in checks {
        out += &format!(
            "{:<34} {:<40} {:<12} {:>6} {:>11.3e} {:>10.3e}\n",
            c.kernel,
            c.shape,
            c.oracle,
            format!("{:?}", c.status).to_uppercase(),
            c.max_abs_err,
            c.rel_err
        );
    }
    let count = |s: Status| checks.iter().filter(|c| c.status == s).count();
    out += &format!(
        "{} checks: {} passed, {} failed, {} skipped\n",
        checks.len(),
        count(Status::Pass),
        count(Status::Fail),
        count(Status::Skip)
    );
    out
}

/// Failed checks in `checks`.
pub fn failed(checks: &[Check]) -> usize {
    checks.iter().filter(|c| c.status == Status::Fail).count()
}

/// The first convolution of each distinct geometry (kernel, stride, padding) of a plan: the O0
/// check's sample, since the plain kernels' index math depends on nothing else. The fully
/// connected layer is covered by the linear check.
pub fn plan_conv_geometries(plan: &Plan) -> Vec<ConvShape> {
    let geometry = |c: Conv2d| Conv2d {
        cin: 0,
        cout: 0,
        ..c
    };
    let mut out: Vec<ConvShape> = Vec::new();
    for s in plan_conv_shapes(plan) {
        if !out.iter().any(|o| geometry(o.conv) == geometry(s.conv)) {
            out.push(s);
        }
    }
    out
}

/// (in_features, out_features) of a plan's fully connected layer, if it has one.
pub fn plan_linear(plan: &Plan) -> Option<(usize, usize)> {
    plan.nodes.iter().find_map(|node| match node.op {
        Op::Linear {
            in_features,
            out_features,
        } => Some((in_features, out_features)),
        _ => None,
    })
}

/// Distinct BN inputs (m = n*h*w, c) of a plan.
pub fn plan_bn_shapes(plan: &Plan) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for node in plan
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::BatchNorm { .. }))
    {
        let s = plan.shape(node.inputs[0]);
        let mc = (s[..s.len() - 1].iter().product(), s[s.len() - 1]);
        if !out.contains(&mc) {
            out.push(mc);
        }
    }
    out
}

/// Distinct pools of a plan, with `true` for max pools.
pub fn plan_pools(plan: &Plan) -> Vec<(PoolShape, bool)> {
    let mut out = Vec::new();
    for node in &plan.nodes {
        let (pool, max) = match node.op {
            Op::MaxPool(p) => (p, true),
            Op::AvgPool(p) => (p, false),
            _ => continue,
        };
        let s = plan.shape(node.inputs[0]);
        let item = (PoolShape::new(pool, s[0], s[1], s[2], s[3]), max);
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::check::{compare, TOL};
    use crate::plan::PlanConfig;

    fn v4() -> Plan {
        let config = PlanConfig {
            batch: 2,
            ..PlanConfig::default()
        };
        crate::plan::build("v4", config).unwrap()
    }

    #[test]
    fn v4_has_38_distinct_conv_shapes_plus_the_fc() {
        let shapes = plan_conv_shapes(&v4());
        assert_eq!(shapes.len(), 39);
        let fast = shapes
            .iter()
            .filter(|s| tc_supported(s, ConvMode::Fprop, None))
            .count();
        assert_eq!(
            fast, 38,
            "every shape but the 3-channel stem takes the tensor-core path"
        );
    }

    #[test]
    fn the_o0_conv_sample_has_one_shape_per_geometry() {
        let plan = v4();
        let sample = plan_conv_geometries(&plan);
        let geometry = |s: &ConvShape| Conv2d {
            cin: 0,
            cout: 0,
            ..s.conv
        };
        for s in plan_conv_shapes(&plan) {
            let reps = sample.iter().filter(|g| geometry(g) == geometry(&s));
            assert_eq!(reps.count(), 1, "{s:?}");
        }
        // 3x3 s2, 3x3 s1 unpadded and padded, 1x1, 1x7, 7x1, 1x3, 3x1.
        assert_eq!(sample.len(), 8);
    }

    #[test]
    fn compare_flags_nan_and_scale() {
        assert_eq!(compare(&[1.0, f32::NAN], &[1.0, 2.0], 1.0).0, Status::Fail);
        assert_eq!(compare(&[100.5, 0.0], &[100.0, 0.0], TOL).0, Status::Pass);
        assert_eq!(compare(&[102.0, 0.0], &[100.0, 0.0], TOL).0, Status::Fail);
    }
}
