//! ReLU: `y = max(x, 0)`; the backward reads the output (`y > 0` exactly where `x > 0`).

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
        .enumerate()
        .for_each(|(t, dxc)| {
            let base = t * PAR_CHUNK;
            for (j, d) in dxc.iter_mut().enumerate() {
                let g = if y[base + j] > 0.0 { dy[base + j] } else { 0.0 };
                store(d, g, accumulate);
            }
        });
}
