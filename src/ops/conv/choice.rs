//! Which implementation a convolution launch uses: the candidates the kernel paths allow, in order
//! of preference, and the first of them whose shape passed the self-test (the verified-shape
//! registry). With every leaner-step switch off the only candidate is the tile the launchers
//! always took, so the choice is exactly the baseline's.

use super::phase::max_phase_rows;
use super::tiles::{needs_pad8, pad8, tc_supported, tile_for, ConvImpl, ConvMode, ConvOut, Tile};
use super::ConvShape;
use crate::gpu::{CudaDevice, KernelPaths};
use crate::precision::Amp;

/// What a convolution's implementation depends on besides its shape and operands: the precision
/// level (O0 runs the plain kernels only), the SM count (tile choice) and the kernel paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvTarget {
    pub amp: Amp,
    pub num_sms: u32,
    pub paths: KernelPaths,
}

impl ConvTarget {
    /// The device's level, SMs and paths.
    pub fn of(dev: &CudaDevice) -> Self {
        ConvTarget {
            amp: dev.amp,
            num_sms: dev.num_sms,
            paths: dev.paths,
        }
    }

    /// The tiles to try for a GEMM of `m` x `n` (`grid_z` side by side): the narrow choice when
    /// `narrow_tiles` is on, then the baseline rule's tile.
    fn tiles(&self, mode: ConvMode, m: usize, n: usize, grid_z: usize) -> Vec<Tile> {
        let base = tile_for(mode, m, n, grid_z, self.num_sms, false);
        let lean = tile_for(mode, m, n, grid_z, self.num_sms, self.paths.narrow_tiles);
        if lean == base {
            vec![base]
        } else {
            vec![lean, base]
        }
    }
}

/// The tensor-core implementations a launch may use, best first. `out` is the fprop/dgrad output
/// (its stride and offset must suit the paired stores); `padded_x` says whether the caller holds
/// the input padded to 8 channels (the stem's copy), which the tensor-core weight gradient of a
/// 3-channel input reads.
pub fn candidates(
    t: &ConvTarget,
    s: &ConvShape,
    mode: ConvMode,
    out: Option<&ConvOut>,
    padded_x: bool,
) -> Vec<ConvImpl> {
    let mut v = Vec::new();
    if t.amp == Amp::O0 {
        return v; // the tensor-core kernels are fp16 only
    }
    let paths = &t.paths;
    if mode == ConvMode::Wgrad && padded_x && paths.stem_wgrad_tc && needs_pad8(s) {
        let p = pad8(s);
        if tc_supported(&p, mode, None) {
            let (m, n, _) = p.gemm(mode);
            v.extend(t.tiles(mode, m, n, 1).into_iter().map(ConvImpl::TcPad8));
        }
    }
    if !tc_supported(s, mode, out) {
        return v;
    }
    let stride = s.conv.stride;
    if mode == ConvMode::Dgrad && paths.dgrad_phase && stride > 1 {
        let (m, n) = (max_phase_rows(s), s.conv.cin);
        let tiles = t.tiles(mode, m, n, stride * stride);
        v.extend(tiles.into_iter().map(ConvImpl::TcPhase));
    }
    let (m, n, _) = s.gemm(mode);
    v.extend(t.tiles(mode, m, n, 1).into_iter().map(ConvImpl::Tc));
    v
}

/// The first candidate whose registry key `verified` accepts, else the plain kernel.
pub fn choose_with(
    t: &ConvTarget,
    s: &ConvShape,
    mode: ConvMode,
    out: Option<&ConvOut>,
    padded_x: bool,
    verified: impl Fn(&str) -> bool,
) -> ConvImpl {
    candidates(t, s, mode, out, padded_x)
        .into_iter()
        .find(|&imp| verified(&s.key(mode, imp)))
        .unwrap_or(ConvImpl::Plain)
}

/// What `dev` runs: its level, SMs and paths, over the shapes its registry has verified.
pub fn choose_on(
    dev: &CudaDevice,
    s: &ConvShape,
    mode: ConvMode,
    out: Option<&ConvOut>,
    padded_x: bool,
) -> ConvImpl {
    choose_with(&ConvTarget::of(dev), s, mode, out, padded_x, |k| {
        dev.is_verified(k)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Conv2d;

    fn target(paths: KernelPaths) -> ConvTarget {
        ConvTarget {
            amp: Amp::O2,
            num_sms: 132,
            paths,
        }
    }

    fn conv(cin: usize, cout: usize, stride: usize, hw: usize) -> ConvShape {
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

    #[test]
    fn the_baseline_keeps_the_one_tile_it_always_took() {
        let base = target(KernelPaths::BASELINE);
        for s in [
            conv(64, 96, 2, 147),
            conv(32, 32, 1, 149),
            conv(3, 32, 2, 299),
        ] {
            for mode in [ConvMode::Fprop, ConvMode::Dgrad, ConvMode::Wgrad] {
                let c = candidates(&base, &s, mode, None, true);
                let want: Vec<ConvImpl> = tc_supported(&s, mode, None)
                    .then(|| {
                        ConvImpl::Tc(super::super::tiles::preferred_tile(&s, mode, 132, false))
                    })
                    .into_iter()
                    .collect();
                assert_eq!(c, want, "{s:?} {mode:?}");
            }
        }
    }

    #[test]
    fn lean_prefers_each_new_variant_and_falls_back_to_the_old_tile() {
        let lean = target(KernelPaths::LEAN);
        // features.3: stride-2 dgrad by phase, then the whole GEMM.
        let s = conv(64, 96, 2, 147);
        let c = candidates(&lean, &s, ConvMode::Dgrad, None, false);
        assert_eq!(
            c,
            [
                ConvImpl::TcPhase(Tile::T128x64),
                ConvImpl::Tc(Tile::T128x64)
            ]
        );
        // features.1 (32 -> 32): the narrow tiles in all three modes.
        let s = conv(32, 32, 1, 149);
        let first = |m| candidates(&lean, &s, m, None, false)[0];
        assert_eq!(first(ConvMode::Fprop), ConvImpl::Tc(Tile::T128x32));
        assert_eq!(first(ConvMode::Dgrad), ConvImpl::Tc(Tile::T128x32));
        assert_eq!(first(ConvMode::Wgrad), ConvImpl::Tc(Tile::T32x64));
        // The stem's weight gradient needs its padded input.
        let s = conv(3, 32, 2, 299);
        assert!(candidates(&lean, &s, ConvMode::Wgrad, None, false).is_empty());
        let c = candidates(&lean, &s, ConvMode::Wgrad, None, true);
        assert_eq!(
            c,
            [
                ConvImpl::TcPad8(Tile::T32x64),
                ConvImpl::TcPad8(Tile::T64x64)
            ]
        );
        // Only verified keys are taken; nothing verified means the plain kernel.
        let key = s.key(ConvMode::Wgrad, ConvImpl::TcPad8(Tile::T64x64));
        let pick = choose_with(&lean, &s, ConvMode::Wgrad, None, true, |k| k == key);
        assert_eq!(pick, ConvImpl::TcPad8(Tile::T64x64));
        let none = choose_with(&lean, &s, ConvMode::Wgrad, None, true, |_| false);
        assert_eq!(none, ConvImpl::Plain);
        // O0 never takes the tensor cores.
        let o0 = ConvTarget {
            amp: Amp::O0,
            ..lean
        };
        assert!(candidates(&o0, &s, ConvMode::Wgrad, None, true).is_empty());
    }
}
