//! 2-D convolution without bias, NHWC activations, weights `[cout, kh, kw, cin]`.
//!
//! As a GEMM: each output pixel is a row of the im2col matrix (K = kh*kw*cin values in the same
//! order as a weight row), so `y[M, cout] = col[M, K] * w[cout, K]^T`. The batch is processed in
//! chunks of whole images to bound the im2col scratch. Unit 1x1 convolutions skip im2col.
//!
//! The op's room: this file is the CPU reference (the specification) and the shape type;
//! [`cuda`] holds the launchers of kernels/conv_tc.cu and kernels/conv_plain.cu over the GEMM view
//! of [`tiles`] (modes, tiles, implementations, parameter block, split-K) and [`phase`] (the
//! stride phases of a data gradient); [`choice`] picks an implementation from the kernel paths
//! and the verified shapes, [`count`] counts what a launch issues (MMAs, FMAs); [`check`] is the
//! self-test case that runs the launchers against this file.

pub mod check;
pub mod choice;
pub mod count;
pub mod cuda;
pub mod phase;
pub mod tiles;

use super::gemm::{matmul, Mat};
use crate::plan::{out_size, Conv2d, Op, Plan};
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

/// A convolution at a batch size and input size: the one shape type of the op, used by the CPU
/// reference, the CUDA launchers, the self-test and the benchmarks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConvShape {
    pub conv: Conv2d,
    pub n: usize,
    pub h: usize,
    pub w: usize,
}

/// Distinct convolution shapes of a plan (geometry plus input size), in forward order; the fully
/// connected layer is included as its 1x1-convolution equivalent.
pub fn plan_shapes(plan: &Plan) -> Vec<ConvShape> {
    let mut out: Vec<ConvShape> = Vec::new();
    for (i, node) in plan.nodes.iter().enumerate() {
        let shape = match &node.op {
            Op::Conv2d(_) => ConvShape::of_node(plan, i),
            Op::Linear {
                in_features,
                out_features,
            } => Some(ConvShape::fc(plan.batch(), *in_features, *out_features)),
            _ => None,
        };
        if let Some(shape) = shape.filter(|s| !out.contains(s)) {
            out.push(shape);
        }
    }
    out
}

/// Scratch budget for one im2col chunk, in f32 elements (64 MiB).
const COL_BUDGET: usize = 16 << 20;

impl ConvShape {
    pub fn new(conv: Conv2d, n: usize, h: usize, w: usize) -> Self {
        ConvShape { conv, n, h, w }
    }

    /// A fully connected layer as the 1x1 convolution over an `n x 1 x 1` image that the CUDA
    /// linear launchers run (see linear.cu).
    pub fn fc(n: usize, in_features: usize, out_features: usize) -> Self {
        let conv = Conv2d {
            cin: in_features,
            cout: out_features,
            kh: 1,
            kw: 1,
            stride: 1,
            pad_top: 0,
            pad_bottom: 0,
            pad_left: 0,
            pad_right: 0,
        };
        ConvShape::new(conv, n, 1, 1)
    }

    /// The shape of plan node `node` if it is a convolution (its input's n, h, w).
    pub fn of_node(plan: &Plan, node: usize) -> Option<Self> {
        let n = &plan.nodes[node];
        let Op::Conv2d(conv) = n.op else {
            return None;
        };
        let s = plan.shape(n.inputs[0]);
        Some(ConvShape::new(conv, s[0], s[1], s[2]))
    }

    /// Output rows (the builder checked that the window fits).
    pub fn oh(&self) -> usize {
        let c = &self.conv;
        out_size(self.h, c.kh, c.stride, c.pad_top, c.pad_bottom).expect("window fits")
    }

    /// Output columns.
    pub fn ow(&self) -> usize {
        let c = &self.conv;
        out_size(self.w, c.kw, c.stride, c.pad_left, c.pad_right).expect("window fits")
    }

    /// Compact label: `HxWxCin->Cout kKHxKW sS pT,B,L,R`.
    pub fn label(&self) -> String {
        let c = &self.conv;
        format!(
            "{}x{}x{}->{} k{}x{} s{} p{},{},{},{}",
            self.h,
            self.w,
            c.cin,
            c.cout,
            c.kh,
            c.kw,
            c.stride,
            c.pad_top,
            c.pad_bottom,
            c.pad_left,
            c.pad_right
        )
    }

    /// GEMM depth: one weight row.
    pub fn k(&self) -> usize {
        self.conv.kh * self.conv.kw * self.conv.cin
    }

    /// A 1x1, stride-1, unpadded convolution is a plain matrix product over the pixels.
    fn is_pointwise(&self) -> bool {
        let g = &self.conv;
        g.kh == 1
            && g.kw == 1
            && g.stride == 1
            && g.pad_top + g.pad_bottom + g.pad_left + g.pad_right == 0
    }

    fn images_per_chunk(&self) -> usize {
        (COL_BUDGET / (self.oh() * self.ow() * self.k()).max(1)).clamp(1, self.n)
    }

    /// Input pixel read by output (oy, ox) at tap (ky, kx), or None in the padding.
    #[inline]
    fn source(&self, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
        let y = (oy * self.conv.stride + ky).checked_sub(self.conv.pad_top)?;
        let x = (ox * self.conv.stride + kx).checked_sub(self.conv.pad_left)?;
        (y < self.h && x < self.w).then_some((y, x))
    }

    /// Fill `col` (rows of K) for `images` images of `x` starting at image `first`.
    fn im2col(&self, x: &[f32], first: usize, images: usize, col: &mut [f32]) {
        let (k, cin) = (self.k(), self.conv.cin);
        let (oh, ow) = (self.oh(), self.ow());
        let row_len = oh * ow * k;
        col[..images * row_len]
            .par_chunks_mut(k)
            .enumerate()
            .for_each(|(r, row)| {
                let img = first + r / (oh * ow);
                let (oy, ox) = ((r / ow) % oh, r % ow);
                for ky in 0..self.conv.kh {
                    for kx in 0..self.conv.kw {
                        let dst = &mut row[(ky * self.conv.kw + kx) * cin..][..cin];
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
        let (k, cin) = (self.k(), self.conv.cin);
        let img_in = self.h * self.w * cin;
        let (oh, ow) = (self.oh(), self.ow());
        let img_col = oh * ow * k;
        dx[first * img_in..(first + images) * img_in]
            .par_chunks_mut(img_in)
            .enumerate()
            .for_each(|(i, dimg)| {
                if !accumulate {
                    dimg.fill(0.0);
                }
                let ccol = &col[i * img_col..(i + 1) * img_col];
                for oy in 0..oh {
                    for ox in 0..ow {
                        let row = &ccol[(oy * ow + ox) * k..][..k];
                        for ky in 0..self.conv.kh {
                            for kx in 0..self.conv.kw {
                                if let Some((y, x)) = self.source(oy, ox, ky, kx) {
                                    let src = &row[(ky * self.conv.kw + kx) * cin..][..cin];
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
    let (k, cout) = (s.k(), s.conv.cout);
    let wt = Mat::rows(w, cout, k).t();
    if s.is_pointwise() {
        let m = s.n * s.h * s.w;
        return matmul(&mut y[..m * cout], Mat::rows(x, m, k), wt, false);
    }
    let pix = s.oh() * s.ow();
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
    let (k, cout) = (s.k(), s.conv.cout);
    let wm = Mat::rows(w, cout, k);
    if s.is_pointwise() {
        let m = s.n * s.h * s.w;
        return matmul(&mut dx[..m * k], Mat::rows(dy, m, cout), wm, accumulate);
    }
    let pix = s.oh() * s.ow();
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
    let (k, cout) = (s.k(), s.conv.cout);
    if s.is_pointwise() {
        let m = s.n * s.h * s.w;
        return matmul(
            &mut dw[..cout * k],
            Mat::rows(dy, m, cout).t(),
            Mat::rows(x, m, k),
            false,
        );
    }
    let pix = s.oh() * s.ow();
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
    let (g, oh, ow) = (&s.conv, s.oh(), s.ow());
    for n in 0..s.n {
        for oy in 0..oh {
            for ox in 0..ow {
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
                    y[((n * oh + oy) * ow + ox) * g.cout + co] = acc as f32;
                }
            }
        }
    }
}
