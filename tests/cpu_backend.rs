//! The CPU executor on whole plans: a finite-difference check of a full `tiny` training step, and
//! v4 forward and backward at its smallest size.

mod common;

use common::{check_grad_l2, random};
use inception_engine::backend::cpu::{CpuExecutor, Mode};
use inception_engine::plan::{build, Op, Plan, PlanConfig};

/// Plausible random parameters: scaled conv/FC weights, gamma near 1, small beta.
fn params_for(plan: &Plan, seed: u64) -> Vec<f32> {
    let mut out = Vec::new();
    for node in &plan.nodes {
        for (k, &t) in node.params.iter().enumerate() {
            let n = plan.tensors[t].numel();
            let r = random(n, seed + t as u64);
            let v: Vec<f32> = match (&node.op, k) {
                (Op::BatchNorm { .. }, 0) => r.iter().map(|v| 1.0 + 0.2 * v).collect(),
                (Op::BatchNorm { .. }, _) => r.iter().map(|v| 0.1 * v).collect(),
                _ => {
                    let fan_in = plan.tensors[t].shape[1..].iter().product::<usize>().max(1) as f32;
                    r.iter().map(|v| v * (3.0 / fan_in).sqrt()).collect()
                }
            };
            out.extend(v);
        }
    }
    out
}

fn states_for(plan: &Plan) -> Vec<f32> {
    plan.nodes
        .iter()
        .flat_map(|n| {
            n.state
                .iter()
                .enumerate()
                .flat_map(|(k, &t)| vec![k as f32; plan.tensors[t].numel()])
        })
        .collect()
}

fn labels(n: usize, classes: usize) -> Vec<u32> {
    (0..n).map(|i| (i * 7 % classes) as u32).collect()
}

#[test]
fn tiny_training_step_matches_finite_differences() {
    let cfg = PlanConfig {
        batch: 4,
        image_size: 23,
        num_classes: 5,
        dropout: 0.2,
        ..Default::default()
    };
    let plan = build("tiny", cfg).unwrap();
    let images = random(plan.tensor(plan.input).numel(), 100);
    let labels = labels(4, 5);
    let params = params_for(&plan, 200);
    let mut exec = CpuExecutor::new(plan);
    let mut states = states_for(exec.plan());
    assert_eq!(params.len(), exec.param_len());
    assert_eq!(states.len(), exec.state_len());
    let loss = exec.forward(&params, &mut states, &images, &labels, Mode::Train, 9);
    assert!(loss.is_finite() && loss > 0.0);
    let mut grads = vec![f32::NAN; params.len()];
    exec.backward(&params, &mut grads, 1.0);
    assert!(grads.iter().all(|g| g.is_finite()));
    let mut probe = CpuExecutor::new(exec.plan().clone());
    // ReLU and max-pool kinks make the whole network only piecewise smooth: in f32 a step small
    // enough to avoid crossing kinks is too noisy, so compare the sampled gradient as a vector.
    check_grad_l2("tiny step", &params, &grads, 1e-3, 0.05, |p| {
        let mut s = states.clone();
        probe.forward(p, &mut s, &images, &labels, Mode::Train, 9) as f64
    });
}

#[test]
fn loss_scale_seeds_the_gradient() {
    let cfg = PlanConfig {
        batch: 2,
        image_size: 23,
        num_classes: 3,
        ..Default::default()
    };
    let mut exec = CpuExecutor::new(build("tiny", cfg).unwrap());
    let params = params_for(exec.plan(), 300);
    let mut states = states_for(exec.plan());
    let images = random(exec.plan().tensor(exec.plan().input).numel(), 301);
    let (mut g1, mut g8) = (vec![0.0; params.len()], vec![0.0; params.len()]);
    exec.forward(
        &params,
        &mut states.clone(),
        &images,
        &[0, 2],
        Mode::Train,
        1,
    );
    exec.backward(&params, &mut g1, 1.0);
    exec.forward(&params, &mut states, &images, &[0, 2], Mode::Train, 1);
    exec.backward(&params, &mut g8, 8.0);
    for (a, b) in g1.iter().zip(&g8) {
        assert!(
            (8.0 * a - b).abs() <= 1e-4 * b.abs().max(1e-3),
            "{a} * 8 vs {b}"
        );
    }
}

#[test]
fn eval_mode_uses_running_statistics_and_no_dropout() {
    let cfg = PlanConfig {
        batch: 2,
        image_size: 23,
        num_classes: 3,
        dropout: 0.5,
        ..Default::default()
    };
    let mut exec = CpuExecutor::new(build("tiny", cfg).unwrap());
    let params = params_for(exec.plan(), 400);
    let mut states = states_for(exec.plan());
    let images = random(exec.plan().tensor(exec.plan().input).numel(), 401);
    let before = states.clone();
    let a = exec.forward(&params, &mut states, &images, &[0, 1], Mode::Eval, 1);
    assert_eq!(
        states, before,
        "inference must not touch the running statistics"
    );
    let b = exec.forward(&params, &mut states, &images, &[0, 1], Mode::Eval, 2);
    assert_eq!(a, b, "inference is deterministic whatever the step");
    exec.forward(&params, &mut states, &images, &[0, 1], Mode::Train, 3);
    assert_ne!(states, before, "training updates the running statistics");
}

#[test]
fn v4_forward_and_backward_at_75x75() {
    let cfg = PlanConfig {
        batch: 2,
        image_size: 75,
        ..Default::default()
    };
    let mut exec = CpuExecutor::new(build("v4", cfg).unwrap());
    let params = params_for(exec.plan(), 500);
    let mut states = states_for(exec.plan());
    let images = random(exec.plan().tensor(exec.plan().input).numel(), 501);
    let loss = exec.forward(&params, &mut states, &images, &[3, 999], Mode::Train, 0);
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    assert!(exec.logits().iter().all(|v| v.is_finite()));
    let mut grads = vec![f32::NAN; params.len()];
    exec.backward(&params, &mut grads, 1.0);
    assert!(
        grads.iter().all(|g| g.is_finite()),
        "every gradient written and finite"
    );
    assert!(grads.iter().filter(|g| **g != 0.0).count() > grads.len() / 2);
}
