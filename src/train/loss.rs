//! Label smoothing targets and accuracy metrics. The cross-entropy op itself lives in `ops`.
//!
//! Smoothed cross-entropy with factor `eps` over `k` classes (the TF-slim and PyTorch
//! convention, not MindSpore's eps/(k-1) off-value):
//!
//! ```text
//! target_j = (1 - eps) * [j == label] + eps / k
//! loss     = -sum_j target_j * log_softmax(logits)_j
//!          = logsumexp(logits) - sum_j target_j * logits_j
//! ```
//!
//! [`smoothed_ce_reference`] computes it in f64 for tests of the op.

/// The smoothed target distribution for one label.
pub fn smoothed_target(label: usize, k: usize, eps: f32) -> Vec<f32> {
    assert!(label < k, "label {label} out of range for {k} classes");
    let mut t = vec![eps / k as f32; k];
    t[label] += 1.0 - eps;
    t
}

/// Smoothed cross-entropy of one row of logits, in f64: the reference the op is tested against.
pub fn smoothed_ce_reference(logits: &[f32], label: usize, eps: f32) -> f64 {
    let k = logits.len();
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let lse = max
        + logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let target = smoothed_target(label, k, eps);
    target
        .iter()
        .zip(logits)
        .map(|(&t, &x)| t as f64 * (lse - x as f64))
        .sum()
}

/// How many rows of `logits` (`labels.len()` rows of `classes`) have their label among the `k`
/// highest logits. Ties go to the lower class index, so a tie never counts in the label's favour
/// by accident of iteration order.
pub fn topk_correct(logits: &[f32], labels: &[u32], classes: usize, k: usize) -> usize {
    assert_eq!(
        logits.len(),
        labels.len() * classes,
        "logits must be labels.len() rows of {classes}"
    );
    logits
        .chunks_exact(classes)
        .zip(labels)
        .filter(|(row, &label)| in_topk(row, label as usize, k))
        .count()
}

/// The label is in the top k when fewer than k classes rank above it: a class ranks above when
/// its logit is larger, or equal with a lower index. NaN logits never rank above.
fn in_topk(row: &[f32], label: usize, k: usize) -> bool {
    let Some(&v) = row.get(label) else {
        return false;
    };
    let above = row
        .iter()
        .enumerate()
        .filter(|&(j, &x)| x > v || (x == v && j < label))
        .count();
    above < k
}
