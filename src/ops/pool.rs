//! Max and average pooling over NHWC, square windows, symmetric padding.
//!
//! Padded positions are never read: max pool ignores them, and average pool divides by the number
//! of in-bounds positions (timm's `count_include_pad=False`). Max pool's backward routes the
//! gradient to the first maximum in window scan order (rows, then columns); the CUDA kernel does
//! the same, so the two agree exactly even on ties.

use crate::plan::Pool;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct PoolShape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub oh: usize,
    pub ow: usize,
    pub p: Pool,
}

impl PoolShape {
    pub fn new(p: Pool, n: usize, h: usize, w: usize, c: usize) -> Self {
        let oh = (h + 2 * p.pad - p.k) / p.stride + 1;
        let ow = (w + 2 * p.pad - p.k) / p.stride + 1;
        PoolShape {
            n,
            h,
            w,
            c,
            oh,
            ow,
            p,
        }
    }

    /// In-bounds input rows and columns covered by output (oy, ox).
    fn window(&self, oy: usize, ox: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let range = |o: usize, len: usize| {
            let lo = (o * self.p.stride).saturating_sub(self.p.pad);
            let hi = (o * self.p.stride + self.p.k)
                .saturating_sub(self.p.pad)
                .min(len);
            lo..hi
        };
        (range(oy, self.h), range(ox, self.w))
    }

    fn in_image(&self) -> usize {
        self.h * self.w * self.c
    }

    fn out_image(&self) -> usize {
        self.oh * self.ow * self.c
    }
}

pub fn max_forward(s: &PoolShape, x: &[f32], y: &mut [f32]) {
    let c = s.c;
    y.par_chunks_mut(s.out_image())
        .enumerate()
        .for_each(|(n, yimg)| {
            let ximg = &x[n * s.in_image()..][..s.in_image()];
            for oy in 0..s.oh {
                for ox in 0..s.ow {
                    let out = &mut yimg[(oy * s.ow + ox) * c..][..c];
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
    let c = s.c;
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
            for oy in 0..s.oh {
                for ox in 0..s.ow {
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
                    let g = &dyimg[(oy * s.ow + ox) * c..][..c];
                    for (ch, (&pix, &gv)) in at.iter().zip(g).enumerate() {
                        dximg[pix * c + ch] += gv;
                    }
                }
            }
        });
}

pub fn avg_forward(s: &PoolShape, x: &[f32], y: &mut [f32]) {
    let c = s.c;
    y.par_chunks_mut(s.out_image())
        .enumerate()
        .for_each(|(n, yimg)| {
            let ximg = &x[n * s.in_image()..][..s.in_image()];
            for oy in 0..s.oh {
                for ox in 0..s.ow {
                    let out = &mut yimg[(oy * s.ow + ox) * c..][..c];
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
    let c = s.c;
    dx.par_chunks_mut(s.in_image())
        .enumerate()
        .for_each(|(n, dximg)| {
            if !accumulate {
                dximg.fill(0.0);
            }
            let dyimg = &dy[n * s.out_image()..][..s.out_image()];
            for oy in 0..s.oh {
                for ox in 0..s.ow {
                    let (rows, cols) = s.window(oy, ox);
                    let inv = 1.0 / (rows.len() * cols.len()) as f32;
                    let g = &dyimg[(oy * s.ow + ox) * c..][..c];
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
