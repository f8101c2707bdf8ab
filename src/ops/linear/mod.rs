//! Fully connected layer: `y[n, out] = x[n, in] * w[out, in]^T + b`.
//!
//! The op's room: this file is the CPU reference (the specification); [`cuda`] holds the
//! launchers of kernels/linear.cu (and the conv kernels), [`check`] the self-test case that runs them against this file.

pub mod check;
pub mod cuda;

use super::gemm::{matmul, Mat};

pub fn forward(x: &[f32], w: &[f32], b: &[f32], n: usize, fin: usize, fout: usize, y: &mut [f32]) {
    for row in y[..n * fout].chunks_mut(fout) {
        row.copy_from_slice(b);
    }
    matmul(y, Mat::rows(x, n, fin), Mat::rows(w, fout, fin).t(), true);
}

/// `dx (+)= dy * w`, `dw = dy^T * x`, `db = sum over rows of dy`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    n: usize,
    fin: usize,
    fout: usize,
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
    accumulate: bool,
) {
    if let Some(dx) = dx {
        matmul(
            dx,
            Mat::rows(dy, n, fout),
            Mat::rows(w, fout, fin),
            accumulate,
        );
    }
    matmul(dw, Mat::rows(dy, n, fout).t(), Mat::rows(x, n, fin), false);
    db.fill(0.0);
    for row in dy[..n * fout].chunks(fout) {
        db.iter_mut().zip(row).for_each(|(d, &g)| *d += g);
    }
}
