//! The stride phases of a data gradient, the host mirror of `Phase` in kernels/conv_tc.cu.
//!
//! The data gradient of a strided convolution reaches input pixel `h` only through the taps `r`
//! with `(h + pad_top - r) % stride == 0`. Grouping the input rows by `(h + pad_top) % stride`
//! (the phase `ph`) leaves each group the taps `r = ph + i * stride` alone, so a phase is a
//! stride-1 GEMM over its sub-grid of pixels and its own taps: for a 3x3 stride-2 convolution the
//! four phases run 4, 2, 2 and 1 taps where the whole-GEMM data gradient runs 9 for every pixel.
//! The launcher sizes the grid from [`phases`], the MMA count sums over them.

use super::ConvShape;

/// One axis of one phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseAxis {
    /// The phase: `(coordinate + pad) % stride`, also the first tap that reaches it.
    pub phase: usize,
    /// First input coordinate of the phase.
    pub first: usize,
    /// Input coordinates in the phase (`first`, `first + stride`, ...).
    pub len: usize,
    /// Taps that reach it (`phase`, `phase + stride`, ...).
    pub taps: usize,
    /// Output coordinate that tap 0 of the phase's first coordinate reads.
    pub q: usize,
}

impl PhaseAxis {
    /// Phase `phase` of an axis of `size` input coordinates, `k` taps, `stride` and leading
    /// padding `pad` (as `phase_of` in conv_tc.cu computes it).
    pub fn new(phase: usize, size: usize, k: usize, stride: usize, pad: usize) -> Self {
        let first = (phase + stride - pad % stride) % stride;
        let len = if first < size {
            (size - first).div_ceil(stride)
        } else {
            0
        };
        let taps = if phase < k {
            (k - phase).div_ceil(stride)
        } else {
            0
        };
        PhaseAxis {
            phase,
            first,
            len,
            taps,
            q: (first + pad - phase) / stride,
        }
    }
}

/// One phase: its rows and columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phase {
    pub h: PhaseAxis,
    pub w: PhaseAxis,
}

impl Phase {
    /// (M, N, K) of the phase's GEMM: its pixels, the input channels, its taps times cout.
    pub fn gemm(&self, s: &ConvShape) -> (usize, usize, usize) {
        let c = &s.conv;
        (
            s.n * self.h.len * self.w.len,
            c.cin,
            self.h.taps * self.w.taps * c.cout,
        )
    }
}

/// The `stride * stride` phases of the data gradient of `s`, in `blockIdx.z` order
/// (`z = ph * stride + pw`).
pub fn phases(s: &ConvShape) -> Vec<Phase> {
    let c = &s.conv;
    let st = c.stride;
    (0..st * st)
        .map(|z| Phase {
            h: PhaseAxis::new(z / st, s.h, c.kh, st, c.pad_top),
            w: PhaseAxis::new(z % st, s.w, c.kw, st, c.pad_left),
        })
        .collect()
}

/// GEMM rows of the largest phase: the launch's grid covers it.
pub fn max_phase_rows(s: &ConvShape) -> usize {
    phases(s).iter().map(|p| p.gemm(s).0).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Conv2d;

    /// Every input coordinate lies in exactly one phase, and the taps the phase gives it are
    /// exactly those that reach it by brute force, each reading output `q + y - i`.
    #[test]
    fn phases_partition_the_pixels_and_keep_exactly_their_taps() {
        for size in 1..14 {
            for k in 1..8 {
                for stride in 1..4 {
                    for pad in 0..k {
                        if size + 2 * pad < k {
                            continue;
                        }
                        let out = (size + 2 * pad - k) / stride + 1;
                        let mut seen = vec![0; size];
                        for ph in 0..stride {
                            let a = PhaseAxis::new(ph, size, k, stride, pad);
                            for y in 0..a.len {
                                let h = a.first + y * stride;
                                assert_eq!((h + pad) % stride, ph);
                                seen[h] += 1;
                                // (tap, output) pairs by brute force, then the phase's.
                                let brute: Vec<(usize, usize)> = (0..k)
                                    .filter(|&r| {
                                        h + pad >= r && (h + pad - r).is_multiple_of(stride)
                                    })
                                    .map(|r| (r, (h + pad - r) / stride))
                                    .filter(|&(_, o)| o < out)
                                    .collect();
                                let mine: Vec<(usize, usize)> = (0..a.taps)
                                    .filter(|&i| a.q + y >= i && a.q + y - i < out)
                                    .map(|i| (ph + i * stride, a.q + y - i))
                                    .collect();
                                assert_eq!(
                                    brute, mine,
                                    "size {size} k {k} s {stride} p {pad} h {h}"
                                );
                            }
                        }
                        assert!(seen.iter().all(|&n| n == 1), "{size} {k} {stride} {pad}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_3x3_stride_2_dgrad_runs_9_taps_over_4_phases() {
        let conv = Conv2d {
            cin: 64,
            cout: 96,
            kh: 3,
            kw: 3,
            stride: 2,
            pad_top: 0,
            pad_bottom: 0,
            pad_left: 0,
            pad_right: 0,
        };
        let s = ConvShape::new(conv, 128, 147, 147);
        let p = phases(&s);
        let taps: Vec<usize> = p.iter().map(|p| p.h.taps * p.w.taps).collect();
        assert_eq!(taps, [4, 2, 2, 1]);
        let rows: Vec<usize> = p.iter().map(|p| p.gemm(&s).0).collect();
        assert_eq!(
            rows,
            [128 * 74 * 74, 128 * 74 * 73, 128 * 73 * 74, 128 * 73 * 73]
        );
        assert_eq!(rows.iter().sum::<usize>(), 128 * 147 * 147);
        assert_eq!(max_phase_rows(&s), 128 * 74 * 74);
    }
}
