//! The arithmetic a convolution launch issues, counted on the host from its implementation: the
//! tensor-core kernels issue `mma.sync` instructions per block and K tile whatever the operands
//! hold (zeros of padding, stride holes or tile edges included), the plain kernels one FMA per
//! multiply-add of the convolution. Nothing here is a time: it is what a GPU visit would time.

use std::ops::{Add, AddAssign};

use serde::Serialize;

use super::phase::phases;
use super::tiles::{pad8, ConvImpl, ConvMode, Tile};
use super::ConvShape;

/// Multiply-adds of one `mma.sync.m16n8k16`.
pub const MACS_PER_MMA: u64 = 16 * 8 * 16;

/// What one or more convolution launches issue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConvWork {
    /// `mma.sync` instructions of the tensor-core launches.
    pub mmas: u64,
    /// Multiply-adds of the launches on the plain kernels (CUDA-core FMAs; taps in the padding
    /// are skipped there, so this is at most the figure below).
    pub plain_macs: u64,
    /// Multiply-adds of the convolutions themselves, `n*oh*ow*cout*kh*kw*cin` per launch in
    /// every mode (the usual convention: padding taps count, stride holes and tile edges do not).
    pub useful_macs: u64,
}

impl ConvWork {
    /// Multiply-adds the tensor cores perform.
    pub fn tc_macs(&self) -> u64 {
        self.mmas * MACS_PER_MMA
    }

    /// Useful multiply-adds over those issued (tensor-core and plain together).
    pub fn useful_fraction(&self) -> f64 {
        self.useful_macs as f64 / (self.tc_macs() + self.plain_macs).max(1) as f64
    }
}

impl Add for ConvWork {
    type Output = ConvWork;
    fn add(self, o: ConvWork) -> ConvWork {
        ConvWork {
            mmas: self.mmas + o.mmas,
            plain_macs: self.plain_macs + o.plain_macs,
            useful_macs: self.useful_macs + o.useful_macs,
        }
    }
}

impl AddAssign for ConvWork {
    fn add_assign(&mut self, o: ConvWork) {
        *self = *self + o;
    }
}

impl std::iter::Sum for ConvWork {
    fn sum<I: Iterator<Item = ConvWork>>(iter: I) -> Self {
        iter.fold(ConvWork::default(), Add::add)
    }
}

/// Multiply-adds of the convolution `s` (the same in each of its three GEMMs).
pub fn conv_macs(s: &ConvShape) -> u64 {
    let c = &s.conv;
    (s.n * s.oh() * s.ow()) as u64 * (c.cout * c.kh * c.kw * c.cin) as u64
}

/// `mma.sync` instructions of a GEMM of `m` x `n` x `k` on tile `t`: every block of the grid runs
/// every K tile (a split-K weight gradient divides the K tiles among its splits, which leaves
/// the sum unchanged).
fn gemm_mmas(t: Tile, m: usize, n: usize, k: usize) -> u64 {
    let (bm, bn) = t.dims();
    (m.div_ceil(bm) * n.div_ceil(bn) * k.div_ceil(32)) as u64 * t.mmas_per_k_tile()
}

/// `mma.sync` instructions `imp` issues for `mode` of `s` (0 on the plain kernels).
pub fn mmas(s: &ConvShape, mode: ConvMode, imp: ConvImpl) -> u64 {
    match imp {
        ConvImpl::Plain => 0,
        ConvImpl::Tc(t) => {
            let (m, n, k) = s.gemm(mode);
            gemm_mmas(t, m, n, k)
        }
        // Blocks of the grid past a smaller phase's rows return before any MMA.
        ConvImpl::TcPhase(t) => phases(s)
            .iter()
            .map(|p| {
                let (m, n, k) = p.gemm(s);
                gemm_mmas(t, m, n, k)
            })
            .sum(),
        ConvImpl::TcPad8(t) => mmas(&pad8(s), mode, ConvImpl::Tc(t)),
    }
}

/// The work of one launch of `mode` of `s` on `imp`.
pub fn work(s: &ConvShape, mode: ConvMode, imp: ConvImpl) -> ConvWork {
    let useful = conv_macs(s);
    ConvWork {
        mmas: mmas(s, mode, imp),
        plain_macs: if imp == ConvImpl::Plain { useful } else { 0 },
        useful_macs: useful,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Conv2d;

    fn conv3x3(cin: usize, cout: usize, stride: usize, hw: usize) -> ConvShape {
        let conv = Conv2d {
            cin,
            cout,
            kh: 3,
            kw: 3,
            stride,
            pad_top: 0,
            pad_bottom: 0,
            pad_left: 0,
            pad_right: 0,
        };
        ConvShape::new(conv, 128, hw, hw)
    }

    /// The stem at batch 128 (299x299x3 -> 32, 3x3 stride 2), its forward on the padded input:
    /// M = 128*149*149 = 2,841,728 rows (22,201 blocks of 128), N = 32, K = 9*8 = 72 (3 K tiles).
    #[test]
    fn stem_forward_by_hand() {
        let s = pad8(&conv3x3(3, 32, 2, 299));
        assert_eq!(s.gemm(ConvMode::Fprop), (2_841_728, 32, 72));
        // 128x64: one 64-wide block column, 2 k16 steps x 8 row x 8 column fragments = 128 MMAs
        // per block and K tile.
        let wide = mmas(&s, ConvMode::Fprop, ConvImpl::Tc(Tile::T128x64));
        assert_eq!(wide, 22_201 * 3 * 128);
        // 128x32: the same blocks, half the fragments.
        let narrow = mmas(&s, ConvMode::Fprop, ConvImpl::Tc(Tile::T128x32));
        assert_eq!(narrow, 22_201 * 3 * 64);
        // Useful: 2,841,728 * 32 * 27 of the 3-channel convolution.
        assert_eq!(conv_macs(&conv3x3(3, 32, 2, 299)), 2_841_728 * 32 * 27);
    }

    /// Mixed_3a's convolution (147x147x64 -> 96, 3x3 stride 2) data gradient at batch 128:
    /// whole GEMM M = 128*147*147 = 2,765,952 (21,609 blocks), N = 64, K = 9*96 = 864 (27 tiles);
    /// by phase the four sub-GEMMs have 74x74, 74x73, 73x74 and 73x73 pixels and 4, 2, 2, 1 taps
    /// (K = 384, 192, 192, 96: 12, 6, 6, 3 tiles).
    #[test]
    fn stride_2_dgrad_by_hand() {
        let s = conv3x3(64, 96, 2, 147);
        let whole = mmas(&s, ConvMode::Dgrad, ConvImpl::Tc(Tile::T128x64));
        assert_eq!(whole, 21_609 * 27 * 128);
        let blocks = |px: usize| (128 * px).div_ceil(128);
        let by_phase = (blocks(74 * 74) * 12 + 2 * blocks(74 * 73) * 6 + blocks(73 * 73) * 3) * 128;
        let phase = mmas(&s, ConvMode::Dgrad, ConvImpl::TcPhase(Tile::T128x64));
        assert_eq!(phase, by_phase as u64);
        assert_eq!(phase, 18_754_944);
        // A quarter of the taps, so about a quarter of the MMAs.
        assert!((phase as f64 / whole as f64 - 0.25).abs() < 0.01);
    }

    /// The stem's weight gradient: M = cout = 32, N = 9*8 = 72 on the padded input, K = 2,841,728
    /// pixels (88,804 K tiles). 64x64 runs 1 x 2 blocks of 2*4*8 = 64 MMAs per K tile; 32x64 runs
    /// 1 x 2 blocks of 2*2*8 = 32.
    #[test]
    fn stem_wgrad_by_hand() {
        let s = conv3x3(3, 32, 2, 299);
        let k_tiles: u64 = 2_841_728u64.div_ceil(32);
        assert_eq!(k_tiles, 88_804);
        let wide = mmas(&s, ConvMode::Wgrad, ConvImpl::TcPad8(Tile::T64x64));
        assert_eq!(wide, 2 * k_tiles * 64);
        let narrow = mmas(&s, ConvMode::Wgrad, ConvImpl::TcPad8(Tile::T32x64));
        assert_eq!(narrow, 2 * k_tiles * 32);
        let plain = work(&s, ConvMode::Wgrad, ConvImpl::Plain);
        assert_eq!((plain.mmas, plain.plain_macs), (0, 2_841_728 * 32 * 27));
    }
}
