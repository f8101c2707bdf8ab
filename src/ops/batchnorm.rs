//! Batch normalisation over NHWC activations viewed as `[rows, c]` (rows = n*h*w).
//!
//! Training normalises with the batch statistics (biased variance) and updates the running
//! statistics with PyTorch's convention: `running = (1 - momentum) * running + momentum * batch`,
//! the variance unbiased. Sums are accumulated in f64 so the reference is not the noisy side.

use super::store;
use rayon::prelude::*;

/// Rows per parallel partial sum.
const ROWS_PER_TASK: usize = 2048;

/// Per-channel sums of `f(row, channel, value)` over all rows, in f64.
fn channel_sums(
    rows: usize,
    c: usize,
    f: impl Fn(usize, usize) -> [f64; 2] + Sync,
) -> (Vec<f64>, Vec<f64>) {
    let partials: Vec<(Vec<f64>, Vec<f64>)> = (0..rows.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .map(|t| {
            let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
            for r in t * ROWS_PER_TASK..((t + 1) * ROWS_PER_TASK).min(rows) {
                for ch in 0..c {
                    let [u, v] = f(r, ch);
                    a[ch] += u;
                    b[ch] += v;
                }
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

/// `y = gamma * (x - scale_shift.0) * scale_shift.1 + beta` applied per channel.
fn apply(
    x: &[f32],
    y: &mut [f32],
    c: usize,
    mean: &[f32],
    inv_std: &[f32],
    gamma: &[f32],
    beta: &[f32],
) {
    y.par_chunks_mut(c * 64)
        .zip(x.par_chunks(c * 64))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(c).zip(xc.chunks(c)) {
                for ch in 0..c {
                    yr[ch] = (xr[ch] - mean[ch]) * inv_std[ch] * gamma[ch] + beta[ch];
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
    let (sum, _) = channel_sums(rows, c, |r, ch| [x[r * c + ch] as f64, 0.0]);
    let mu: Vec<f64> = sum.iter().map(|s| s / rows as f64).collect();
    let (sq, _) = channel_sums(rows, c, |r, ch| {
        let d = x[r * c + ch] as f64 - mu[ch];
        [d * d, 0.0]
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
    let (sdy, sdyx) = channel_sums(rows, c, |r, ch| {
        let i = r * c + ch;
        let xhat = (x[i] - mean[ch]) * inv_std[ch];
        [dy[i] as f64, (dy[i] * xhat) as f64]
    });
    for ch in 0..c {
        dbeta[ch] = sdy[ch] as f32;
        dgamma[ch] = sdyx[ch] as f32;
    }
    // dx = gamma * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat))
    let inv_rows = 1.0 / rows as f32;
    dx.par_chunks_mut(c * 64).enumerate().for_each(|(t, dxc)| {
        for (j, dxr) in dxc.chunks_mut(c).enumerate() {
            let r = t * 64 + j;
            for ch in 0..c {
                let i = r * c + ch;
                let xhat = (x[i] - mean[ch]) * inv_std[ch];
                let g = gamma[ch]
                    * inv_std[ch]
                    * (dy[i] - dbeta[ch] * inv_rows - xhat * dgamma[ch] * inv_rows);
                store(&mut dxr[ch], g, accumulate);
            }
        }
    });
}
