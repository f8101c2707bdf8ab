//! Flat layout and deterministic initialisation of the model state.

use inception_engine::params::{ModelState, ParamLayout};
use inception_engine::plan::{self, Op, Plan, PlanConfig};

fn tiny() -> Plan {
    plan::build(
        "tiny",
        PlanConfig {
            batch: 1,
            num_classes: 10,
            ..Default::default()
        },
    )
    .unwrap()
}

fn v4() -> Plan {
    plan::build(
        "v4",
        PlanConfig {
            batch: 1,
            ..Default::default()
        },
    )
    .unwrap()
}

fn mean_std(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn layout_is_contiguous_in_plan_order() {
    for plan in [tiny(), v4()] {
        let layout = ParamLayout::new(&plan);
        let ids: Vec<_> = layout.params.iter().map(|e| e.tensor).collect();
        assert_eq!(ids, plan.params());
        let sids: Vec<_> = layout.states.iter().map(|e| e.tensor).collect();
        assert_eq!(sids, plan.states());
        assert_eq!(layout.param_len, plan.param_count());
        let mut next = 0;
        for e in &layout.params {
            assert_eq!(e.offset, next, "{}", e.name);
            assert_eq!(e.len, e.shape.iter().product::<usize>());
            assert_eq!(e.decay, plan.is_decayed(e.tensor));
            next += e.len;
        }
        assert_eq!(next, layout.param_len);
        assert!(layout.states.iter().all(|e| !e.decay));
        assert_eq!(
            layout.states.iter().map(|e| e.len).sum::<usize>(),
            layout.state_len
        );
        // The mask covers the buffer exactly, alternating flags.
        let mask = layout.decay_mask(false);
        assert_eq!(mask.first().unwrap().0.start, 0);
        assert_eq!(mask.last().unwrap().0.end, layout.param_len);
        assert!(mask
            .windows(2)
            .all(|w| w[0].0.end == w[1].0.start && w[0].1 != w[1].1));
    }
}

#[test]
fn v4_has_the_expected_parameter_count_and_names() {
    let plan = v4();
    let layout = ParamLayout::new(&plan);
    // timm's inception_v4 has 42,679,816 parameters at 1000 classes.
    assert_eq!(layout.param_len, 42_679_816);
    for name in [
        "features.0.conv.weight",
        "features.0.bn.weight",
        "features.0.bn.bias",
        "last_linear.weight",
        "last_linear.bias",
    ] {
        assert!(layout.param_entry(name).is_some(), "{name}");
    }
    assert!(layout.state_entry("features.0.bn.running_var").is_some());
}

#[test]
fn init_is_deterministic_in_the_seed() {
    let plan = tiny();
    let a = ModelState::init(&plan, 7);
    let b = ModelState::init(&plan, 7);
    let c = ModelState::init(&plan, 8);
    assert_eq!(a.params, b.params);
    assert_eq!(a.states, b.states);
    let w = "stem.0.conv.weight";
    assert_ne!(a.param(w), c.param(w));
    assert_ne!(a.param("last_linear.weight"), c.param("last_linear.weight"));
    // Different tensors of one model do not repeat each other's stream.
    let x = a.param("a.branch0.conv.weight").unwrap();
    let y = a.param("a.branch1.0.conv.weight").unwrap();
    assert_ne!(x, y);
}

#[test]
fn init_follows_each_op() {
    let plan = tiny();
    let m = ModelState::init(&plan, 3);
    for node in &plan.nodes {
        let p = |i: usize| m.param(&plan.tensor(node.params[i]).name).unwrap();
        let s = |i: usize| m.state(&plan.tensor(node.state[i]).name).unwrap();
        match &node.op {
            Op::BatchNorm { .. } => {
                assert!(p(0).iter().all(|&v| v == 1.0), "{} gamma", node.name);
                assert!(p(1).iter().all(|&v| v == 0.0), "{} beta", node.name);
                assert!(s(0).iter().all(|&v| v == 0.0), "{} running mean", node.name);
                assert!(s(1).iter().all(|&v| v == 1.0), "{} running var", node.name);
            }
            Op::Linear { in_features, .. } => {
                let bound = 1.0 / (*in_features as f32).sqrt();
                for i in 0..2 {
                    assert!(
                        p(i).iter().all(|v| v.abs() <= bound),
                        "{} param {i}",
                        node.name
                    );
                    assert!(p(i).iter().any(|&v| v != 0.0));
                }
            }
            Op::Conv2d(_) => assert!(p(0).iter().all(|v| v.is_finite())),
            _ => {}
        }
    }
}

#[test]
fn conv_init_has_he_statistics() {
    let plan = v4();
    let m = ModelState::init(&plan, 42);
    // The largest conv weight, and every conv with enough elements for a stable estimate.
    let mut checked = 0;
    for node in &plan.nodes {
        let Op::Conv2d(c) = &node.op else { continue };
        let w = m.param(&plan.tensor(node.params[0]).name).unwrap();
        if w.len() < 100_000 {
            continue;
        }
        let want = (2.0 / (c.kh * c.kw * c.cin) as f64).sqrt();
        let (mean, std) = mean_std(w);
        assert!(
            (std / want - 1.0).abs() < 0.02,
            "{}: std {std}, want {want}",
            node.name
        );
        assert!(mean.abs() < 0.02 * want, "{}: mean {mean}", node.name);
        // Normal, not uniform: about 68.3% within one standard deviation.
        let within =
            w.iter().filter(|&&v| (v as f64).abs() <= want).count() as f64 / w.len() as f64;
        assert!(
            (within - 0.6827).abs() < 0.01,
            "{}: {within} within 1 sigma",
            node.name
        );
        checked += 1;
    }
    assert!(checked > 10, "only {checked} conv layers checked");
}
