//! Channel concatenation of NHWC tensors sharing n, h, w.
//!
//! The op's room: this file is the CPU reference (the specification); [`cuda`] holds the
//! launchers of kernels/concat.cu, [`check`] the self-test case that runs them against this file.

pub mod check;
pub mod cuda;

use super::store;
use rayon::prelude::*;

/// `y[.., offset..offset+c_i] = x_i` for each input, in order.
pub fn forward(xs: &[&[f32]], channels: &[usize], y: &mut [f32]) {
    let total: usize = channels.iter().sum();
    y.par_chunks_mut(total).enumerate().for_each(|(p, row)| {
        let mut off = 0;
        for (x, &c) in xs.iter().zip(channels) {
            row[off..off + c].copy_from_slice(&x[p * c..][..c]);
            off += c;
        }
    });
}

/// The gradient of input `index`: its channel slice of `dy`.
pub fn backward(dy: &[f32], channels: &[usize], index: usize, dx: &mut [f32], accumulate: bool) {
    let total: usize = channels.iter().sum();
    let off: usize = channels[..index].iter().sum();
    let c = channels[index];
    dx.par_chunks_mut(c).enumerate().for_each(|(p, row)| {
        let src = &dy[p * total + off..][..c];
        row.iter_mut()
            .zip(src)
            .for_each(|(d, &v)| store(d, v, accumulate));
    });
}
