//! ReLU: `y = max(x, 0)`; the backward reads the output (`y > 0` exactly where `x > 0`).
//!
//! The op's room: this file is the CPU reference (the specification); [`cuda`] holds the
//! launchers of kernels/relu.cu, [`check`] the self-test case that runs them against this file.

pub mod check;
pub mod cuda;

use super::{store, PAR_CHUNK};
use rayon::prelude::*;

pub fn forward(x: &[f32], y: &mut [f32]) {
    y.par_chunks_mut(PAR_CHUNK)
        .zip(x.par_chunks(PAR_CHUNK))
        .for_each(|(yc, xc)| {
            yc.iter_mut().zip(xc).for_each(|(y, &x)| *y = x.max(0.0));
        });
}

pub fn backward(y: &[f32], dy: &[f32], dx: &mut [f32], accumulate: bool) {
    dx.par_chunks_mut(PAR_CHUNK)
        .zip(y.par_chunks(PAR_CHUNK))
        .zip(dy.par_chunks(PAR_CHUNK))
        .for_each(|((dxc, yc), dyc)| {
            for ((d, &y), &g) in dxc.iter_mut().zip(yc).zip(dyc) {
                store(d, if y > 0.0 { g } else { 0.0 }, accumulate);
            }
        });
}
