//! 2-D convolution without bias, NHWC activations, weights `[cout, kh, kw, cin]`.
//!
//! As a GEMM: each output pixel is a row of the im2col matrix (K = kh*kw*cin values in the same
//! order as a weight row), so `y[M, cout] = col[M, K] * w[cout, K]^T`. The batch is processed in
//! chunks of whole images to bound the im2col scratch. Unit 1x1 convolutions skip im2col.

use super::gemm::{matmul, Mat};
use crate::plan::Conv2d;
use rayon::prelude::*;
use std::cell::RefCell;

thread_local! {
    /// im2col scratch, kept between calls so large buffers are not page-faulted in every time.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with a scratch slice of `len` elements (contents unspecified).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.take();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        let out = f(&mut buf[..len]);
        cell.replace(buf);
        out
    })
}

/// A convolution applied to a concrete input size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub oh: usize,
    pub ow: usize,
    pub g: Conv2d,
}

/// Scratch budget for one im2col chunk, in f32 elements (64 MiB).
const COL_BUDGET: usize = 16 << 20;

impl ConvShape {
    pub fn new(g: Conv2d, n: usize, h: usize, w: usize) -> Self {
        let oh = (h + g.pad_top + g.pad_bottom - g.kh) / g.stride + 1;
        let ow = (w + g.pad_left + g.pad_right - g.kw) / g.stride + 1;
        ConvShape { n, h, w, oh, ow, g }
    }

    /// GEMM depth: one weight row.
    pub fn k(&self) -> usize {
        self.g.kh * self.g.kw * self.g.cin
    }

    /// A 1x1, stride-1, unpadded convolution is a plain matrix product over the pixels.
    fn is_pointwise(&self) -> bool {
        let g = &self.g;
        g.kh == 1
            && g.kw == 1
            && g.stride == 1
            && g.pad_top + g.pad_bottom + g.pad_left + g.pad_right == 0
    }

    /// Images per parallel task: the batch is split so that every thread gets work and each
    /// task's im2col scratch stays within budget. Each task runs its own single-threaded GEMM on
    /// cache-sized operands, which beats one multi-threaded GEMM for InceptionV4's many narrow
    /// layers.
    fn images_per_task(&self) -> usize {
        let per_image = (self.oh * self.ow * self.k()).max(1);
        let tasks =
            rayon::current_num_threads().max(self.n.saturating_mul(per_image).div_ceil(COL_BUDGET));
        self.n.div_ceil(tasks.min(self.n).max(1))
    }

    /// Whether tasks should multi-thread their GEMM themselves (when the batch gives one task).
    fn gemm_parallel(&self) -> bool {
        self.images_per_task() >= self.n
    }

    /// Input pixel read by output (oy, ox) at tap (ky, kx), or None in the padding.
    #[inline]
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let y = (oy * self.g.stride + ky).checked_sub(self.g.pad_top)?;
        let x = (ox * self.g.stride + kx).checked_sub(self.g.pad_left)?;
        (y < self.h && x < self.w).then_some((y, x))
    }

    /// Fill `col` (one row of K per output pixel) from the images `x` (whole images).
    fn im2col(&self, x: &[f32], col: &mut [f32]) {
        let (k, cin) = (self.k(), self.g.cin);
        let img_in = self.h * self.w * cin;
        for (r, row) in col.chunks_mut(k).enumerate() {
            let img = &x[r / (self.oh * self.ow) * img_in..][..img_in];
            let (oy, ox) = ((r / self.ow) % self.oh, r % self.ow);
            for ky in 0..self.g.kh {
                for kx in 0..self.g.kw {
                    let dst = &mut row[(ky * self.g.kw + kx) * cin..][..cin];
                    match self.source(oy, ox, ky, kx) {
                        Some((y, xx)) => {
                            dst.copy_from_slice(&img[(y * self.w + xx) * cin..][..cin])
                        }
                        None => dst.fill(0.0),
                    }
                }
            }
        }
    }

    /// Scatter-add `col` rows back into the images `dx` (the adjoint of im2col).
    fn col2im(&self, col: &[f32], dx: &mut [f32], accumulate: bool) {
        let (k, cin) = (self.k(), self.g.cin);
        if !accumulate {
            dx.fill(0.0);
        }
        let img_in = self.h * self.w * cin;
        for (r, row) in col.chunks(k).enumerate() {
            let img = r / (self.oh * self.ow);
            let (oy, ox) = ((r / self.ow) % self.oh, r % self.ow);
            for ky in 0..self.g.kh {
                for kx in 0..self.g.kw {
                    if let Some((y, x)) = self.source(oy, ox, ky, kx) {
                        let src = &row[(ky * self.g.kw + kx) * cin..][..cin];
                        let dst = &mut dx[img * img_in + (y * self.w + x) * cin..][..cin];
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                    }
                }
            }
        }
    }
}

/// `y = conv(x, w)`.
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (k, cout, pix) = (s.k(), s.g.cout, s.oh * s.ow);
    let (per, par) = (s.images_per_task(), s.gemm_parallel());
    let img_in = s.h * s.w * s.g.cin;
    let wt = Mat::rows(w, cout, k).t();
    y[..s.n * pix * cout]
        .par_chunks_mut(per * pix * cout)
        .enumerate()
        .for_each(|(t, yc)| {
            let rows = yc.len() / cout;
            let xc = &x[t * per * img_in..][..rows / pix * img_in];
            if s.is_pointwise() {
                return matmul(yc, Mat::rows(xc, rows, k), wt, false, par);
            }
            with_scratch(rows * k, |col| {
                s.im2col(xc, col);
                matmul(yc, Mat::rows(col, rows, k), wt, false, par);
            })
        });
}

/// `dx (+)= conv_backward_data(dy, w)`.
pub fn backward_data(s: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32], accumulate: bool) {
    let (k, cout, pix) = (s.k(), s.g.cout, s.oh * s.ow);
    let (per, par) = (s.images_per_task(), s.gemm_parallel());
    let img_in = s.h * s.w * s.g.cin;
    let wm = Mat::rows(w, cout, k);
    dx[..s.n * img_in]
        .par_chunks_mut(per * img_in)
        .enumerate()
        .for_each(|(t, dxc)| {
            let rows = dxc.len() / img_in * pix;
            let dyc = Mat::rows(&dy[t * per * pix * cout..], rows, cout);
            if s.is_pointwise() {
                return matmul(dxc, dyc, wm, accumulate, par);
            }
            with_scratch(rows * k, |col| {
                matmul(col, dyc, wm, false, par);
                s.col2im(col, dxc, accumulate);
            })
        });
}

/// `dw = conv_backward_weight(x, dy)` (overwrites `dw`). Each task sums its images into a
/// partial; partials are added in task order, so the result does not depend on timing.
pub fn backward_weight(s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (k, cout, pix) = (s.k(), s.g.cout, s.oh * s.ow);
    let (per, par) = (s.images_per_task(), s.gemm_parallel());
    let img_in = s.h * s.w * s.g.cin;
    let partials: Vec<Vec<f32>> = (0..s.n.div_ceil(per))
        .into_par_iter()
        .map(|t| {
            let imgs = per.min(s.n - t * per);
            let rows = imgs * pix;
            let xc = &x[t * per * img_in..][..imgs * img_in];
            let dyc = Mat::rows(&dy[t * per * pix * cout..], rows, cout).t();
            let mut part = vec![0.0; cout * k];
            if s.is_pointwise() {
                matmul(&mut part, dyc, Mat::rows(xc, rows, k), false, par);
            } else {
                with_scratch(rows * k, |col| {
                    s.im2col(xc, col);
                    matmul(&mut part, dyc, Mat::rows(col, rows, k), false, par);
                });
            }
            part
        })
        .collect();
    let dw = &mut dw[..cout * k];
    dw.copy_from_slice(&partials[0]);
    for p in &partials[1..] {
        dw.iter_mut().zip(p).for_each(|(d, v)| *d += v);
    }
}

/// Direct convolution by definition: the test oracle for the GEMM formulation above.
pub fn forward_direct(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let g = &s.g;
    for n in 0..s.n {
        for oy in 0..s.oh {
            for ox in 0..s.ow {
                for co in 0..g.cout {
                    let mut acc = 0.0f64;
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let Some((iy, ix)) = s.source(oy, ox, ky, kx) else {
                                continue;
                            };
                            for ci in 0..g.cin {
                                let xv = x[((n * s.h + iy) * s.w + ix) * g.cin + ci];
                                let wv = w[((co * g.kh + ky) * g.kw + kx) * g.cin + ci];
                                acc += xv as f64 * wv as f64;
                            }
                        }
                    }
                    y[((n * s.oh + oy) * s.ow + ox) * g.cout + co] = acc as f32;
                }
            }
        }
    }
}
