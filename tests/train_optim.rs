//! Schedule, RMSProp, loss scaler and metric helpers against values computed independently.

use inception_engine::optim::{has_overflow, LossScaler, RmsProp, RmsPropConfig};
use inception_engine::params::ParamLayout;
use inception_engine::plan::{self, PlanConfig};
use inception_engine::train::loss::{smoothed_ce_reference, smoothed_target, topk_correct};
use inception_engine::train::{lr_max_for_batch, Schedule};
use std::f64::consts::PI;

fn close(a: f32, b: f64, rel: f64) -> bool {
    ((a as f64) - b).abs() <= rel * b.abs().max(1e-12)
}

fn schedule() -> Schedule {
    Schedule {
        lr_init: 4e-5,
        lr_max: 0.4,
        lr_end: 4e-6,
        warmup_epochs: 1,
        steps_per_epoch: 10,
        epochs: 5,
    }
}

#[test]
fn schedule_key_steps_follow_the_formula() {
    let s = schedule();
    let (init, max, end) = (4e-5f32 as f64, 0.4f32 as f64, 4e-6f32 as f64);
    // warm = 10, total = 50.
    let cosine = |i: f64| end + (max - end) * 0.5 * (1.0 + (PI * (i - 10.0) / 40.0).cos());
    let cases = [
        (0, init + (max - init) / 10.0 * 1.0), // first warmup step
        (9, max),                              // last warmup step reaches lr_max
        (10, max),                             // first cosine step: cos(0) = 1
        (30, end + (max - end) * 0.5),         // middle of the cosine: cos(pi/2) = 0
        (49, cosine(49.0)),                    // last step
    ];
    for (step, want) in cases {
        let got = s.lr(step);
        assert!(
            close(got, want, 1e-6),
            "step {step}: got {got}, want {want}"
        );
    }
    assert!(
        s.lr(49) > s.lr(50) || s.lr(50) == 4e-6,
        "past the end stays at lr_end"
    );
    assert_eq!(s.lr(1000), 4e-6);
}

#[test]
fn schedule_matches_a_precomputed_array_when_resuming() {
    // The recipe precomputes lr for every step and slices it on resume; a pure function of the
    // global step must give the same entries.
    let s = schedule();
    let table: Vec<f32> = (0..s.total_steps()).map(|i| s.lr(i)).collect();
    let start_epoch = 3;
    let skipped = s.steps_per_epoch * (start_epoch - 1);
    for (k, &lr) in table[skipped..].iter().enumerate() {
        assert_eq!(lr, s.lr((skipped + k) as u64));
    }
    assert!(
        table[..10].windows(2).all(|w| w[0] < w[1]),
        "warmup increases"
    );
    assert!(
        table[10..].windows(2).all(|w| w[0] >= w[1]),
        "cosine decreases"
    );
}

#[test]
fn lr_max_scales_with_the_global_batch() {
    assert!(close(lr_max_for_batch(1024), 0.4, 1e-7));
    assert!(close(lr_max_for_batch(256), 0.1, 1e-7));
    assert!(close(lr_max_for_batch(32), 0.0125, 1e-7));
    let s = Schedule::for_batch(256, 100, 2);
    assert_eq!((s.lr_init, s.lr_end, s.warmup_epochs), (4e-5, 4e-6, 1));
}

fn custom_cfg() -> RmsPropConfig {
    RmsPropConfig {
        weight_decay: 0.01,
        ..RmsPropConfig::default()
    }
}

#[test]
fn rmsprop_two_steps_by_hand() {
    // Elements 0 and 1 are decayed, 2 and 3 are not. lr 0.1, grad scale 0.5, wd 0.01.
    let mut opt = RmsProp::with_mask(custom_cfg(), 4, vec![(0..2, true), (2..4, false)]);
    let mut w = vec![0.5f32, -1.0, 2.0, 0.0];
    let g = vec![2.0f32, 4.0, -8.0, 0.0];
    opt.step(&mut w, &g, 0.1, 0.5);
    // e0: g = 2*0.5 + 0.01*0.5 = 1.005; ms = 0.9 + 0.1*1.005^2 = 1.0010025;
    //     mom = 0.1*1.005/sqrt(2.0010025) = 0.0710464277; w = 0.5 - mom.
    // e1: g = 2 - 0.01 = 1.99; ms = 0.9 + 0.1*3.9601 = 1.29601; mom = 0.199/sqrt(2.29601).
    // e2: g = -4; ms = 0.9 + 1.6 = 2.5; mom = -0.4/sqrt(3.5) = -0.213808994.
    // e3: g = 0; ms = 0.9; mom = 0; w unchanged.
    let want_w = [0.428953572, -1.13133068, 2.21380899, 0.0];
    let want_ms = [1.0010025, 1.29601, 2.5, 0.9];
    let want_mom = [0.0710464277, 0.131330679, -0.213808994, 0.0];
    for i in 0..4 {
        assert!(close(w[i], want_w[i], 1e-6), "w[{i}] = {}", w[i]);
        assert!(
            close(opt.ms[i], want_ms[i], 1e-6),
            "ms[{i}] = {}",
            opt.ms[i]
        );
        assert!(
            close(opt.mom[i], want_mom[i], 1e-6),
            "mom[{i}] = {}",
            opt.mom[i]
        );
    }
    // A second step carries ms and momentum over.
    opt.step(&mut w, &g, 0.1, 0.5);
    let want_w = [0.294029054, -1.37377519, 2.58786773, 0.0];
    let want_mom = [0.134924518, 0.242444516, -0.374058738, 0.0];
    for i in 0..4 {
        assert!(close(w[i], want_w[i], 2e-6), "step 2 w[{i}] = {}", w[i]);
        assert!(
            close(opt.mom[i], want_mom[i], 2e-6),
            "step 2 mom[{i}] = {}",
            opt.mom[i]
        );
    }
}

/// A plain sequential RMSProp with a per-element decay mask, as the reference for the parallel one.
fn reference_step(
    w: &mut [f32],
    g: &[f32],
    ms: &mut [f32],
    mom: &mut [f32],
    decayed: &[bool],
    (lr, gs, wd): (f32, f32, f32),
) {
    for i in 0..w.len() {
        let gi = g[i] * gs + if decayed[i] { wd * w[i] } else { 0.0 };
        ms[i] = 0.9 * ms[i] + (1.0 - 0.9) * gi * gi;
        mom[i] = 0.9 * mom[i] + lr * gi / (ms[i] + 1.0).sqrt();
        w[i] -= mom[i];
    }
}

#[test]
fn rmsprop_parallel_chunks_match_a_sequential_loop() {
    // Runs that straddle the 65536-element work chunks, and a tail the mask does not cover.
    let n = 200_003;
    let runs = vec![
        (0..70_000, true),
        (70_000..70_001, false),
        (70_001..131_072, true),
        (131_072..199_000, false),
    ];
    let mut decayed = vec![false; n];
    for (r, f) in &runs {
        decayed[r.clone()].fill(*f);
    }
    let w0: Vec<f32> = (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let g: Vec<f32> = (0..n)
        .map(|i| ((i * 53 % 97) as f32 - 48.0) / 10.0)
        .collect();
    let mut opt = RmsProp::with_mask(custom_cfg(), n, runs);
    let mut w = w0.clone();
    let (mut rw, mut rms, mut rmom) = (w0, vec![1.0; n], vec![0.0; n]);
    for _ in 0..3 {
        opt.step(&mut w, &g, 0.05, 0.25);
        reference_step(
            &mut rw,
            &g,
            &mut rms,
            &mut rmom,
            &decayed,
            (0.05, 0.25, 0.01),
        );
    }
    assert_eq!(w, rw);
    assert_eq!(opt.ms, rms);
    assert_eq!(opt.mom, rmom);
}

#[test]
fn default_decay_skips_bn_and_biases_unless_decay_all() {
    let plan = plan::build(
        "tiny",
        PlanConfig {
            batch: 1,
            num_classes: 10,
            ..Default::default()
        },
    )
    .unwrap();
    let layout = ParamLayout::new(&plan);
    let opt = RmsProp::new(RmsPropConfig::default(), &layout);
    let flag_of = |name: &str| {
        let e = layout.param_entry(name).unwrap();
        opt.decay
            .iter()
            .find(|(r, _)| r.contains(&e.offset))
            .unwrap()
            .1
    };
    assert!(flag_of("stem.0.conv.weight"));
    assert!(flag_of("last_linear.weight"));
    assert!(!flag_of("stem.0.bn.weight"));
    assert!(!flag_of("stem.0.bn.bias"));
    assert!(!flag_of("last_linear.bias"));
    assert_eq!((opt.ms[0], opt.mom[0]), (1.0, 0.0));
    let all = RmsProp::new(
        RmsPropConfig {
            decay_all: true,
            ..Default::default()
        },
        &layout,
    );
    assert_eq!(all.decay, vec![(0..layout.param_len, true)]);
}

#[test]
fn dynamic_scaler_halves_and_skips_on_overflow() {
    let mut s = LossScaler::dynamic();
    assert_eq!(s.scale(), 65536.0);
    let d = s.update(true);
    assert!(d.skip);
    assert_eq!(d.scale_changed, Some((65536.0, 32768.0)));
    assert_eq!(s.grad_scale(), 1.0 / 32768.0);
    // Never below 1.
    let mut low = LossScaler::Dynamic {
        scale: 1.5,
        growth_interval: 2000,
        clean_steps: 7,
    };
    assert_eq!(low.update(true).scale_changed, Some((1.5, 1.0)));
    let d = low.update(true);
    assert!(d.skip && d.scale_changed.is_none());
    assert_eq!(low.scale(), 1.0);
}

#[test]
fn dynamic_scaler_doubles_after_2000_clean_steps() {
    let mut s = LossScaler::dynamic();
    s.update(true); // 32768, count reset
    for i in 0..1999 {
        let d = s.update(false);
        assert!(!d.skip && d.scale_changed.is_none(), "step {i}");
    }
    let d = s.update(false);
    assert_eq!(d.scale_changed, Some((32768.0, 65536.0)));
    assert!(!d.skip);
    // An overflow restarts the count.
    for _ in 0..1000 {
        s.update(false);
    }
    s.update(true);
    for _ in 0..1999 {
        assert!(s.update(false).scale_changed.is_none());
    }
    assert_eq!(s.update(false).scale_changed, Some((32768.0, 65536.0)));
}

#[test]
fn fixed_and_none_never_skip() {
    let mut f = LossScaler::Fixed(1024.0);
    let mut n = LossScaler::None;
    for overflow in [true, false, true] {
        assert!(!f.update(overflow).skip);
        assert!(!n.update(overflow).skip);
    }
    assert_eq!((f.scale(), n.scale()), (1024.0, 1.0));
    assert!(
        !f.checks_overflow() && !n.checks_overflow() && LossScaler::dynamic().checks_overflow()
    );
}

#[test]
fn scaler_state_round_trips_through_json() {
    let mut s = LossScaler::dynamic();
    for _ in 0..17 {
        s.update(false);
    }
    s.update(true);
    s.update(false);
    for x in [s, LossScaler::None, LossScaler::Fixed(128.0)] {
        assert_eq!(LossScaler::from_json(&x.to_json()).unwrap(), x);
    }
    assert!(LossScaler::from_json("{\"Dynamic\":1}").is_err());
}

#[test]
fn overflow_detection() {
    assert!(!has_overflow(&[0.0, -1e30, 3.4e38]));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert!(has_overflow(&[1.0, bad, 2.0]));
        let mut big = vec![0.5f32; 300_000];
        big[299_999] = bad;
        assert!(has_overflow(&big));
    }
}

#[test]
fn topk_breaks_ties_by_lower_index() {
    // Row 0: classes 1 and 2 tie at 3; class 1 wins the tie.
    // Row 1: all equal; only class 0 is top-1, classes 0..5 are top-5.
    let logits = [
        1.0, 3.0, 3.0, 0.0, -1.0, -2.0, /* row 1 */ 2.0, 2.0, 2.0, 2.0, 2.0, 2.0,
    ];
    let rows = |l0: u32, l1: u32, k: usize| topk_correct(&logits, &[l0, l1], 6, k);
    assert_eq!(rows(1, 0, 1), 2);
    assert_eq!(rows(2, 1, 1), 0);
    assert_eq!(rows(2, 1, 2), 2);
    assert_eq!(rows(5, 5, 5), 0);
    assert_eq!(rows(4, 4, 5), 2);
    assert_eq!(rows(5, 5, 6), 2);
    // A NaN logit never ranks above a real one.
    assert_eq!(topk_correct(&[f32::NAN, 1.0, 0.0], &[1], 3, 1), 1);
}

#[test]
fn smoothed_target_and_loss_follow_the_formula() {
    let t = smoothed_target(2, 4, 0.1);
    for (got, want) in t.iter().zip([0.025, 0.025, 0.925, 0.025]) {
        assert!(close(*got, want, 1e-6), "{t:?}");
    }
    assert!((t.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    assert_eq!(smoothed_target(0, 3, 0.0), vec![1.0, 0.0, 0.0]);
    // -sum_j t_j log softmax_j, written out with the softmax.
    let logits = [1.0f32, 2.0, 3.0];
    let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
    let p: Vec<f64> = logits.iter().map(|&x| (x as f64).exp() / z).collect();
    let eps = 0.1;
    let want = -((1.0 - eps) + eps / 3.0) * p[2].ln() - eps / 3.0 * (p[0].ln() + p[1].ln());
    assert!((smoothed_ce_reference(&logits, 2, 0.1) - want).abs() < 1e-6);
    // Large logits do not overflow.
    assert!(smoothed_ce_reference(&[1000.0, 0.0], 0, 0.0).abs() < 1e-9);
}
