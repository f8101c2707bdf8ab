//! Shared helpers for the tests: seeded random data and finite-difference checks.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Uniform values in [-1, 1), never all zeros.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Random values kept at least `gap` away from zero, so that ReLU and max kinks are not crossed by
/// a finite-difference step smaller than `gap`.
pub fn random_away_from_ties(n: usize, seed: u64, gap: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // Distinct multiples of 4*gap: any two values differ by more than a step of size gap.
    let mut v: Vec<f32> = (0..n)
        .map(|i| (i as f32 + 0.5) * 4.0 * gap - n as f32 * 2.0 * gap)
        .collect();
    for i in (1..n).rev() {
        v.swap(i, rng.random_range(0..=i));
    }
    v
}

/// `sum_i r_i * y_i` in f64: the scalar whose gradient with respect to y is r.
pub fn project(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Compare an analytic gradient of `loss(x)` against central differences at every coordinate (400
/// spread over `x` when it is larger).
/// Panics naming the first coordinate whose error, relative to the largest gradient, exceeds `tol`.
pub fn check_grad(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    h: f32,
    tol: f64,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let scale = analytic
        .iter()
        .fold(0.0f64, |m, &g| m.max(g.abs() as f64))
        .max(1e-6);
    let coords: Vec<usize> = if x.len() <= 400 {
        (0..x.len()).collect()
    } else {
        (0..400).map(|i| i * x.len() / 400).collect()
    };
    let mut xp = x.to_vec();
    for &i in &coords {
        let numeric = central_difference(&mut xp, i, h, &mut loss);
        let err = (numeric - analytic[i] as f64).abs() / scale;
        assert!(err < tol, "{name}: coordinate {i}: analytic {} vs numeric {numeric} (error {err:.2e} of the largest gradient {scale:.3e})", analytic[i]);
    }
}

/// Central differences at up to 600 coordinates spread over `x`, compared as a vector: the relative
/// L2 error `|numeric - analytic| / |analytic|` must be below `tol`. Returns that error.
pub fn check_grad_l2(
    name: &str,
    x: &[f32],
    analytic: &[f32],
    h: f32,
    tol: f64,
    mut loss: impl FnMut(&[f32]) -> f64,
) -> f64 {
    let coords: Vec<usize> = (0..600.min(x.len()))
        .map(|i| i * x.len() / 600.min(x.len()))
        .collect();
    let mut xp = x.to_vec();
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for &i in &coords {
        let numeric = central_difference(&mut xp, i, h, &mut loss);
        diff += (numeric - analytic[i] as f64).powi(2);
        norm += (analytic[i] as f64).powi(2);
    }
    let err = (diff / norm.max(1e-30)).sqrt();
    println!(
        "{name}: relative L2 error {err:.3e} over {} coordinates",
        coords.len()
    );
    assert!(norm > 0.0, "{name}: the sampled gradient is all zeros");
    assert!(
        err < tol,
        "{name}: relative L2 error {err:.3e} exceeds {tol:.1e}"
    );
    err
}

/// `(loss(x + h e_i) - loss(x - h e_i)) / 2h`, leaving `x` as it was.
fn central_difference(
    x: &mut [f32],
    i: usize,
    h: f32,
    loss: &mut impl FnMut(&[f32]) -> f64,
) -> f64 {
    let orig = x[i];
    x[i] = orig + h;
    let lp = loss(x);
    x[i] = orig - h;
    let lm = loss(x);
    x[i] = orig;
    (lp - lm) / (2.0 * h as f64)
}
