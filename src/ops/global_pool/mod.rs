//! Global average pool: `[n, h, w, c] -> [n, c]`.
//!
//! The op's room: this file is the CPU reference (the specification); [`cuda`] holds the
//! launchers of kernels/global_pool.cu, [`check`] the self-test case that runs them against this file.

pub mod check;
pub mod cuda;

use super::store;

pub fn forward(x: &[f32], n: usize, hw: usize, c: usize, y: &mut [f32]) {
    for b in 0..n {
        let out = &mut y[b * c..][..c];
        out.fill(0.0);
        for p in 0..hw {
            let src = &x[(b * hw + p) * c..][..c];
            out.iter_mut().zip(src).for_each(|(o, &v)| *o += v);
        }
        out.iter_mut().for_each(|o| *o /= hw as f32);
    }
}

pub fn backward(dy: &[f32], n: usize, hw: usize, c: usize, dx: &mut [f32], accumulate: bool) {
    let inv = 1.0 / hw as f32;
    for b in 0..n {
        for p in 0..hw {
            let dst = &mut dx[(b * hw + p) * c..][..c];
            for ch in 0..c {
                store(&mut dst[ch], dy[b * c + ch] * inv, accumulate);
            }
        }
    }
}
