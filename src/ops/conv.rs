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

    fn images_per_chunk(&self) -> usize {
        (COL_BUDGET / (self.oh * self.ow * self.k()).max(1)).clamp(1, self.n)
    }

    /// Input pixel read by output (oy, ox) at tap (ky, kx), or None in the padding.
    #[inline]
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let y = (oy * self.g.stride + ky).checked_sub(self.g.pad_top)?;
        let x = (ox * self.g.stride + kx).checked_sub(self.g.pad_left)?;
        (y < self.h && x < self.w).then_some((y, x))
    }

    /// Fill `col` (rows of K) for `images` images of `x` starting at image `first`.
    fn im2col(&self, x: &[f32], first: usize, images: usize, col: &mut [f32]) {
        let (k, cin) = (self.k(), self.g.cin);
        let row_len = self.oh * self.ow * k;
        col[..images * row_len]
            .par_chunks_mut(k)
            .enumerate()
            .for_each(|(r, row)| {
                let img = first + r / (self.oh * self.ow);
                let (oy, ox) = ((r / self.ow) % self.oh, r % self.ow);
                for ky in 0..self.g.kh {
                    for kx in 0..self.g.kw {
                        let dst = &mut row[(ky * self.g.kw + kx) * cin..][..cin];
                        match self.source(oy, ox, ky, kx) {
                            Some((y, xx)) => dst.copy_from_slice(
                                &x[((img * self.h + y) * self.w + xx) * cin..][..cin],
                            ),
                            None => dst.fill(0.0),
                        }
                    }
                }
            });
    }

    /// Scatter-add `col` rows back into `dx` images (the adjoint of im2col).
    fn col2im(&self, col: &[f32], first: usize, images: usize, dx: &mut [f32], accumulate: bool) {
        let (k, cin) = (self.k(), self.g.cin);
        let img_in = self.h * self.w * cin;
        let img_col = self.oh * self.ow * k;
        dx[first * img_in..(first + images) * img_in]
            .par_chunks_mut(img_in)
            .enumerate()
            .for_each(|(i, dimg)| {
                if !accumulate {
                    dimg.fill(0.0);
                }
                let ccol = &col[i * img_col..(i + 1) * img_col];
                for oy in 0..self.oh {
                    for ox in 0..self.ow {
                        let row = &ccol[(oy * self.ow + ox) * k..][..k];
                        for ky in 0..self.g.kh {
                            for kx in 0..self.g.kw {
                                if let Some((y, x)) = self.source(oy, ox, ky, kx) {
                                    let src = &row[(ky * self.g.kw + kx) * cin..][..cin];
                                    let dst = &mut dimg[(y * self.w + x) * cin..][..cin];
                                    dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                                }
                            }
                        }
                    }
                }
            });
    }
}

/// `y = conv(x, w)`.
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32], y: &mut [f32]) {
    let (k, cout) = (s.k(), s.g.cout);
    let wt = Mat::rows(w, cout, k).t();
    if s.is_pointwise() {
        let m = s.n * s.h * s.w;
        return matmul(&mut y[..m * cout], Mat::rows(x, m, k), wt, false);
    }
    let pix = s.oh * s.ow;
    let chunk = s.images_per_chunk();
    with_scratch(chunk * pix * k, |col| {
        for first in (0..s.n).step_by(chunk) {
            let imgs = chunk.min(s.n - first);
            s.im2col(x, first, imgs, col);
            let rows = imgs * pix;
            matmul(
                &mut y[first * pix * cout..][..rows * cout],
                Mat::rows(col, rows, k),
                wt,
                false,
            );
        }
    })
}

/// `dx (+)= conv_backward_data(dy, w)`.
pub fn backward_data(s: &ConvShape, dy: &[f32], w: &[f32], dx: &mut [f32], accumulate: bool) {
    let (k, cout) = (s.k(), s.g.cout);
    let wm = Mat::rows(w, cout, k);
    if s.is_pointwise() {
        let m = s.n * s.h * s.w;
        return matmul(&mut dx[..m * k], Mat::rows(dy, m, cout), wm, accumulate);
    }
    let pix = s.oh * s.ow;
    let chunk = s.images_per_chunk();
    with_scratch(chunk * pix * k, |col| {
        for first in (0..s.n).step_by(chunk) {
            let imgs = chunk.min(s.n - first);
            let rows = imgs * pix;
            matmul(
                &mut col[..rows * k],
                Mat::rows(&dy[first * pix * cout..], rows, cout),
                wm,
                false,
            );
            s.col2im(col, first, imgs, dx, accumulate);
        }
    })
}

/// `dw = conv_backward_weight(x, dy)` (overwrites `dw`).
pub fn backward_weight(s: &ConvShape, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (k, cout) = (s.k(), s.g.cout);
    if s.is_pointwise() {
        let m = s.n * s.h * s.w;
        return matmul(
            &mut dw[..cout * k],
            Mat::rows(dy, m, cout).t(),
            Mat::rows(x, m, k),
            false,
        );
    }
    let pix = s.oh * s.ow;
    let chunk = s.images_per_chunk();
    with_scratch(chunk * pix * k, |col| {
        for first in (0..s.n).step_by(chunk) {
            let imgs = chunk.min(s.n - first);
            let rows = imgs * pix;
            s.im2col(x, first, imgs, col);
            let dyc = Mat::rows(&dy[first * pix * cout..], rows, cout).t();
            matmul(&mut dw[..cout * k], dyc, Mat::rows(col, rows, k), first > 0);
        }
    })
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
