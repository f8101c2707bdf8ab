//! Max and average pooling over NHWC, square windows, symmetric padding.
//!
//! Padded positions are never read: max pool ignores them, and average pool divides by the number
//! of in-bounds positions (timm's `count_include_pad=False`). Max pool's backward routes the
//! gradient to the first maximum in window scan order (rows, then columns); the CUDA kernel does
//! the same, so the two agree exactly even on ties.
//!
//! The op's room: this file is the CPU reference and the shape type; [`cuda`] the launchers of
//! kernels/pool.cu, [`check`] the self-test case.

pub mod check;
pub mod cuda;

use crate::plan::{out_size, Pool};
use rayon::prelude::*;

/// A pooling window over an [n, h, w, c] input: the one shape type of the op, used by the CPU
/// reference, the CUDA launchers and the self-test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolShape {
    pub pool: Pool,
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl PoolShape {
    pub fn new(pool: Pool, n: usize, h: usize, w: usize, c: usize) -> Self {
        PoolShape { pool, n, h, w, c }
    }

    /// Output rows (the builder checked that the window fits).
    pub fn oh(&self) -> usize {
        let p = &self.pool;
        out_size(self.h, p.k, p.stride, p.pad, p.pad).expect("window fits")
    }

    /// Output columns.
    pub fn ow(&self) -> usize {
        let p = &self.pool;
        out_size(self.w, p.k, p.stride, p.pad, p.pad).expect("window fits")
    }

    /// In-bounds input rows and columns covered by output (oy, ox).
    fn window(&self, oy: usize, ox: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let range = |o: usize, len: usize| {
            let lo = (o * self.pool.stride).saturating_sub(self.pool.pad);
            let hi = (o * self.pool.stride + self.pool.k)
                .saturating_sub(self.pool.pad)
                .min(len);
            lo..hi
        };
        (range(oy, self.h), range(ox, self.w))
    }

    fn in_image(&self) -> usize {
        self.h * self.w * self.c
    }

    fn out_image(&self) -> usize {
        self.oh() * self.ow() * self.c
    }
}

pub fn max_forward(s: &PoolShape, x: &[f32], y: &mut [f32]) {
    let (c, oh, ow) = (s.c, s.oh(), s.ow());
    y.par_chunks_mut(s.out_image())
        .enumerate()
        .for_each(|(n, yimg)| {
            let ximg = &x[n * s.in_image()..][..s.in_image()];
            for oy in 0..oh {
                for ox in 0..ow {
                    let out = &mut yimg[(oy * ow + ox) * c..][..c];
                    out.fill(f32::NEG_INFINITY);
                    let (rows, cols) = s.window(oy, ox);
                    for iy in rows {
                        for ix in cols.clone() {
                            let src = &ximg[(iy * s.w + ix) * c..][..c];
                            out.iter_mut().zip(src).for_each(|(o, &v)| *o = o.max(v));
                        }
                    }
                }
            }
        });
}

pub fn max_backward(s: &PoolShape, x: &[f32], dy: &[f32], dx: &mut [f32], accumulate: bool) {
    let (c, oh, ow) = (s.c, s.oh(), s.ow());
    dx.par_chunks_mut(s.in_image())
        .enumerate()
        .for_each(|(n, dximg)| {
            if !accumulate {
                dximg.fill(0.0);
            }
            let ximg = &x[n * s.in_image()..][..s.in_image()];
            let dyimg = &dy[n * s.out_image()..][..s.out_image()];
            // Per output pixel: the running maximum and its input pixel, channel by channel. A later
            // position wins only if strictly greater, so ties keep the first in scan order.
            let (mut best, mut at) = (vec![0.0f32; c], vec![0usize; c]);
            for oy in 0..oh {
                for ox in 0..ow {
                    let (rows, cols) = s.window(oy, ox);
                    let first = rows.start * s.w + cols.start;
                    best.copy_from_slice(&ximg[first * c..][..c]);
                    at.fill(first);
                    for iy in rows {
                        for ix in cols.clone() {
                            let pix = iy * s.w + ix;
                            for ((b, a), &v) in best
                                .iter_mut()
                                .zip(at.iter_mut())
                                .zip(&ximg[pix * c..][..c])
                            {
                                if v > *b {
                                    *b = v;
                                    *a = pix;
                                }
                            }
                        }
                    }
                    let g = &dyimg[(oy * ow + ox) * c..][..c];
                    for (ch, (&pix, &gv)) in at.iter().zip(g).enumerate() {
                        dximg[pix * c + ch] += gv;
                    }
                }
            }
        });
}

pub fn avg_forward(s: &PoolShape, x: &[f32], y: &mut [f32]) {
    let (c, oh, ow) = (s.c, s.oh(), s.ow());
    y.par_chunks_mut(s.out_image())
        .enumerate()
        .for_each(|(n, yimg)| {
            let ximg = &x[n * s.in_image()..][..s.in_image()];
            for oy in 0..oh {
                for ox in 0..ow {
                    let out = &mut yimg[(oy * ow + ox) * c..][..c];
                    out.fill(0.0);
                    let (rows, cols) = s.window(oy, ox);
                    let count = (rows.len() * cols.len()) as f32;
                    for iy in rows {
                        for ix in cols.clone() {
                            let src = &ximg[(iy * s.w + ix) * c..][..c];
                            out.iter_mut().zip(src).for_each(|(o, &v)| *o += v);
                        }
                    }
                    out.iter_mut().for_each(|o| *o /= count);
                }
            }
        });
}

pub fn avg_backward(s: &PoolShape, dy: &[f32], dx: &mut [f32], accumulate: bool) {
    let (c, oh, ow) = (s.c, s.oh(), s.ow());
    dx.par_chunks_mut(s.in_image())
        .enumerate()
        .for_each(|(n, dximg)| {
            if !accumulate {
                dximg.fill(0.0);
            }
            let dyimg = &dy[n * s.out_image()..][..s.out_image()];
            for oy in 0..oh {
                for ox in 0..ow {
                    let (rows, cols) = s.window(oy, ox);
                    let inv = 1.0 / (rows.len() * cols.len()) as f32;
                    let g = &dyimg[(oy * ow + ox) * c..][..c];
                    for iy in rows {
                        for ix in cols.clone() {
                            let dst = &mut dximg[(iy * s.w + ix) * c..][..c];
                            dst.iter_mut().zip(g).for_each(|(d, &v)| *d += v * inv);
                        }
                    }
                }
            }
        });
}
