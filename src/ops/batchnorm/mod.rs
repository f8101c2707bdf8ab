//! Batch normalisation over NHWC activations viewed as `[rows, c]` (rows = n*h*w).
//!
//! Training normalises with the batch statistics (biased variance) and updates the running
//! statistics with PyTorch's convention: `running = (1 - momentum) * running + momentum * batch`,
//! the variance unbiased. Sums are accumulated in f64 so the reference is not the noisy side.
//!
//! The op's room: this file is the CPU reference (the specification); [`cuda`] holds the
//! launchers of kernels/batchnorm.cu, [`check`] the self-test case that runs them against this file.

pub mod check;
pub mod cuda;

use super::store;
use rayon::prelude::*;

/// Rows per parallel partial sum.
const ROWS_PER_TASK: usize = 1024;

/// Per-channel sums over all rows: `row_fn(r, acc_a, acc_b)` adds row r's terms. Partials are
/// reduced in a fixed order, so the result does not depend on thread timing.
fn channel_sums(
    rows: usize,
    c: usize,
    row_fn: impl Fn(usize, &mut [f64], &mut [f64]) + Sync,
) -> (Vec<f64>, Vec<f64>) {
    let partials: Vec<(Vec<f64>, Vec<f64>)> = (0..rows.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
            for r in t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(rows) {
                row_fn(r, &mut a, &mut b);
            }
            (a, b)
        })
        .collect();
    let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
    for (pa, pb) in partials {
        a.iter_mut().zip(pa).for_each(|(s, p)| *s += p);
        b.iter_mut().zip(pb).for_each(|(s, p)| *s += p);
    }
    (a, b)
}

/// `y = (x - mean) * inv_std * gamma + beta` per channel, as `y = x * scale + shift`.
fn apply(
    x: &[f32],
    y: &mut [f32],
    c: usize,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    beta: &[f32],
) {
    let scale: Vec<f32> = inv_std.iter().zip(gamma).map(|(s, g)| s * g).collect();
    let shift: Vec<f32> = beta
        .iter()
        .zip(mean)
        .zip(&scale)
        .map(|((b, m), s)| b - m * s)
        .collect();
    y.par_chunks_mut(c * 64)
        .zip(x.par_chunks(c * 64))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(c).zip(xc.chunks(c)) {
                for (((y, &x), &s), &b) in yr.iter_mut().zip(xr).zip(&scale).zip(&shift) {
                    *y = x * s + b;
                }
            }
        });
}

/// Parameters of one batchnorm layer.
pub struct BnParams<'a> {
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub eps: f32,
}

/// Training forward: normalise with batch statistics, save them, update the running statistics.
#[allow(clippy::too_many_arguments)]
pub fn forward_train(
    x: &[f32],
    p: &BnParams,
    momentum: f32,
    c: usize,
    y: &mut [f32],
    mean: &mut [f32],
    inv_std: &mut [f32],
    running_mean: &mut [f32],
    running_var: &mut [f32],
) {
    let rows = x.len() / c;
    let (sum, _) = channel_sums(rows, c, |r, a, _| {
        a.iter_mut()
            .zip(&x[r * c..(r + 1) * c])
            .for_each(|(a, &v)| *a += v as f64);
    });
    let mu: Vec<f64> = sum.iter().map(|s| s / rows as f64).collect();
    let (sq, _) = channel_sums(rows, c, |r, a, _| {
        for ((a, &v), &m) in a.iter_mut().zip(&x[r * c..(r + 1) * c]).zip(&mu) {
            let d = v as f64 - m;
            *a += d * d;
        }
    });
    for ch in 0..c {
        let var = sq[ch] / rows as f64;
        mean[ch] = mu[ch] as f32;
        inv_std[ch] = (1.0 / (var + p.eps as f64).sqrt()) as f32;
        let unbiased = if rows > 1 {
            var * rows as f64 / (rows - 1) as f64
        } else {
            var
        };
        running_mean[ch] = (1.0 - momentum) * running_mean[ch] + momentum * mu[ch] as f32;
        running_var[ch] = (1.0 - momentum) * running_var[ch] + momentum * unbiased as f32;
    }
    apply(x, y, c, mean, inv_std, p.gamma, p.beta);
}

/// Inference forward with the running statistics.
pub fn forward_infer(
    x: &[f32],
    p: &BnParams,
    c: usize,
    running_mean: &[f32],
    running_var: &[f32],
    y: &mut [f32],
) {
    let inv_std: Vec<f32> = running_var
        .iter()
        .map(|v| 1.0 / (v + p.eps).sqrt())
        .collect();
    apply(x, y, c, running_mean, &inv_std, p.gamma, p.beta);
}

/// Training backward: `dx (+)=`, `dgamma =`, `dbeta =` from the saved batch statistics.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    mean: &[f32],
    inv_std: &[f32],
    c: usize,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
    accumulate: bool,
) {
    let rows = x.len() / c;
    let (sdy, sdyx) = channel_sums(rows, c, |r, a, b| {
        let (xr, dyr) = (&x[r * c..(r + 1) * c], &dy[r * c..(r + 1) * c]);
        let terms = xr.iter().zip(dyr).zip(mean).zip(inv_std);
        for ((a, b), (((&xv, &g), &m), &s)) in a.iter_mut().zip(b.iter_mut()).zip(terms) {
            *a += g as f64;
            *b += (g * (xv - m) * s) as f64;
        }
    });
    for ch in 0..c {
        dbeta[ch] = sdy[ch] as f32;
        dgamma[ch] = sdyx[ch] as f32;
    }
    // dx = gamma * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat)), with xhat expanded, is
    // per channel an affine function of (dy, x): dx = p * dy + q * x + r.
    let inv_rows = 1.0 / rows as f32;
    let p: Vec<f32> = gamma.iter().zip(inv_std).map(|(g, s)| g * s).collect();
    let q: Vec<f32> = (0..c)
        .map(|ch| -p[ch] * dgamma[ch] * inv_rows * inv_std[ch])
        .collect();
    let r: Vec<f32> = (0..c)
        .map(|ch| -p[ch] * dbeta[ch] * inv_rows - q[ch] * mean[ch])
        .collect();
    dx.par_chunks_mut(c * 64)
        .zip(x.par_chunks(c * 64))
        .zip(dy.par_chunks(c * 64))
        .for_each(|((dxc, xc), dyc)| {
            for ((dxr, xr), dyr) in dxc.chunks_mut(c).zip(xc.chunks(c)).zip(dyc.chunks(c)) {
                let coef = p.iter().zip(&q).zip(&r);
                for ((d, (&xv, &g)), ((&pc, &qc), &rc)) in
                    dxr.iter_mut().zip(xr.iter().zip(dyr)).zip(coef)
                {
                    store(d, pc * g + qc * xv + rc, accumulate);
                }
            }
        });
}
