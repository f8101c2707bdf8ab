//! Softmax cross-entropy with label smoothing, mean over the batch.
//!
//! With K classes and smoothing eps the target is `q = (1 - eps) * onehot(label) + eps / K`, and
//! per row `loss = logsumexp(z) - sum_k q_k z_k`. Its gradient is `(softmax(z) - q) / n`.
//!
//! The op's room: this file is the CPU reference (the specification); [`cuda`] holds the
//! launchers of kernels/softmax_ce.cu, [`check`] the self-test case that runs them against this file.

pub mod check;
pub mod cuda;

/// Forward: the mean loss. Computed in f64 per row so the reference is exact to f32 precision.
pub fn forward(logits: &[f32], labels: &[f32], n: usize, k: usize, eps: f32) -> f32 {
    let mut total = 0.0f64;
    for (row, &label) in logits.chunks(k).zip(labels).take(n) {
        let lse = logsumexp(row);
        let target: f64 = row
            .iter()
            .enumerate()
            .map(|(j, &z)| q(j, label as usize, k, eps) * z as f64)
            .sum();
        total += lse - target;
    }
    (total / n as f64) as f32
}

/// Backward: `dz = scale * (softmax(z) - q) / n`; `scale` is the loss-scale seed.
pub fn backward(
    logits: &[f32],
    labels: &[f32],
    n: usize,
    k: usize,
    eps: f32,
    scale: f32,
    dz: &mut [f32],
) {
    for ((row, &label), drow) in logits.chunks(k).zip(labels).zip(dz.chunks_mut(k)).take(n) {
        let lse = logsumexp(row);
        for (j, (d, &z)) in drow.iter_mut().zip(row).enumerate() {
            let p = (z as f64 - lse).exp();
            *d = (scale as f64 * (p - q(j, label as usize, k, eps)) / n as f64) as f32;
        }
    }
}

/// Smoothed target probability of class `j` for a sample of class `label`.
#[inline]
pub fn q(j: usize, label: usize, k: usize, eps: f32) -> f64 {
    let base = eps as f64 / k as f64;
    if j == label {
        1.0 - eps as f64 + base
    } else {
        base
    }
}

fn logsumexp(row: &[f32]) -> f64 {
    let m = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    m + row.iter().map(|&z| (z as f64 - m).exp()).sum::<f64>().ln()
}
