//! The implicit-GEMM view of a convolution that the launchers work from: the three modes, the
//! tensor-core tiles and their shared memory, the implementations, the kernels' parameter block,
//! which shapes the fast path supports, and the split-K factors and workspace of the weight
//! gradient.

use anyhow::{bail, Result};
use cudarc::driver::DeviceRepr;
use serde::Serialize;

use super::ConvShape;
use crate::gpu::DevPtr;

/// Which of the three convolution GEMMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ConvMode {
    Fprop,
    Dgrad,
    Wgrad,
}

impl ConvMode {
    pub(super) fn name(self) -> &'static str {
        match self {
            ConvMode::Fprop => "fprop",
            ConvMode::Dgrad => "dgrad",
            ConvMode::Wgrad => "wgrad",
        }
    }
}

/// Tensor-core tile shapes (block M x N); all use BK = 32 and a 3-stage pipeline. The narrow
/// ones (`narrow_tiles`) serve one side of the GEMM each: 128x32 a 32-wide N (fprop, dgrad),
/// 32x64 a 32-high M (wgrad, whose M is cout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Tile {
    T128x128,
    T128x64,
    T64x64,
    T128x32,
    T32x64,
}

pub const TILES: [Tile; 5] = [
    Tile::T128x128,
    Tile::T128x64,
    Tile::T64x64,
    Tile::T128x32,
    Tile::T32x64,
];

impl Tile {
    pub fn dims(self) -> (usize, usize) {
        match self {
            Tile::T128x128 => (128, 128),
            Tile::T128x64 => (128, 64),
            Tile::T64x64 => (64, 64),
            Tile::T128x32 => (128, 32),
            Tile::T32x64 => (32, 64),
        }
    }
    pub(super) fn threads(self) -> u32 {
        match self {
            Tile::T128x128 => 256,
            _ => 128,
        }
    }
    /// Whether conv_tc.cu instantiates this tile for `mode` (the narrow tiles only where their
    /// narrow side is).
    pub fn serves(self, mode: ConvMode) -> bool {
        match self {
            Tile::T128x32 => mode != ConvMode::Wgrad,
            Tile::T32x64 => mode == ConvMode::Wgrad,
            _ => true,
        }
    }
    /// The tiles conv_tc.cu instantiates for `mode`.
    pub fn for_mode(mode: ConvMode) -> impl Iterator<Item = Tile> {
        TILES.into_iter().filter(move |t| t.serves(mode))
    }
    /// mma.sync m16n8k16 instructions one block issues per BK-deep K tile.
    pub fn mmas_per_k_tile(self) -> u64 {
        let (bm, bn) = self.dims();
        (32 / 16) * (bm / 16) as u64 * (bn / 8) as u64
    }
    /// Dynamic shared memory, mirroring TcConv::SMEM_BYTES in conv_tc.cu.
    pub fn smem_bytes(self, mode: ConvMode) -> usize {
        let (bm, bn) = self.dims();
        let (bk, pad, stages) = (32, 8, 3);
        let a = if mode == ConvMode::Wgrad {
            bk * (bm + pad)
        } else {
            bm * (bk + pad)
        };
        let b = if mode == ConvMode::Fprop {
            bn * (bk + pad)
        } else {
            bk * (bn + pad)
        };
        stages * (a + b) * 2
    }
    pub fn kernel(self, mode: ConvMode) -> String {
        let (bm, bn) = self.dims();
        format!("conv_{}_tc_{bm}x{bn}", mode.name())
    }
    /// The phase-split data gradient's entry point of this tile.
    pub fn phase_kernel(self) -> String {
        let (bm, bn) = self.dims();
        format!("conv_dgrad_phase_tc_{bm}x{bn}")
    }
}

/// Every tensor-core kernel with its dynamic shared memory (each opts in at its first launch).
pub fn tc_smem_table() -> Vec<(String, usize)> {
    let modes = [ConvMode::Fprop, ConvMode::Dgrad, ConvMode::Wgrad];
    let whole = modes
        .iter()
        .flat_map(|&m| Tile::for_mode(m).map(move |t| (t.kernel(m), t.smem_bytes(m))));
    let phase =
        Tile::for_mode(ConvMode::Dgrad).map(|t| (t.phase_kernel(), t.smem_bytes(ConvMode::Dgrad)));
    whole.chain(phase).collect()
}

/// How a convolution runs: a tensor-core tile over the whole implicit GEMM, one of the leaner
/// tensor-core variants, or the plain FMA kernel. The variant is part of the verified-shape key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ConvImpl {
    Tc(Tile),
    /// A strided data gradient split by stride phase: `stride^2` sub-GEMMs, one per `blockIdx.z`
    /// of one launch, each over its own taps only (`dgrad_phase`; see [`super::phase`]).
    TcPhase(Tile),
    /// The weight gradient of a convolution with fewer than 8 input channels (the stem) over its
    /// input padded to 8 channels, the padded channels dropped in the split-K reduction
    /// (`stem_wgrad_tc`).
    TcPad8(Tile),
    Plain,
}

impl ConvImpl {
    /// The tile of a tensor-core implementation.
    pub fn tile(self) -> Option<Tile> {
        match self {
            ConvImpl::Tc(t) | ConvImpl::TcPhase(t) | ConvImpl::TcPad8(t) => Some(t),
            ConvImpl::Plain => None,
        }
    }
}

/// Channels a tensor-core gather needs per 16-byte chunk: inputs with fewer (the 3-channel stem)
/// are padded to this many.
pub const PAD_CHANNELS: usize = 8;

/// `s` with its input channels padded to [`PAD_CHANNELS`] (the stem's tensor-core shape).
pub fn pad8(s: &ConvShape) -> ConvShape {
    let mut p = *s;
    p.conv.cin = PAD_CHANNELS;
    p
}

/// Whether `s` has too few input channels for the tensor-core gathers and is padded instead.
pub fn needs_pad8(s: &ConvShape) -> bool {
    s.conv.cin < PAD_CHANNELS
}

impl ConvShape {
    /// (M, N, K) of the implicit GEMM for `mode`.
    pub fn gemm(&self, mode: ConvMode) -> (usize, usize, usize) {
        let c = &self.conv;
        let taps = c.kh * c.kw;
        match mode {
            ConvMode::Fprop => (self.n * self.oh() * self.ow(), c.cout, taps * c.cin),
            ConvMode::Dgrad => (self.n * self.h * self.w, c.cin, taps * c.cout),
            ConvMode::Wgrad => (c.cout, taps * c.cin, self.n * self.oh() * self.ow()),
        }
    }
    /// Registry key of the fast kernel `imp` for this shape and mode. The batch size is left out
    /// on purpose: it only changes M, whose tail the kernels handle generically, so a check at a
    /// small batch covers the training batch.
    pub fn key(&self, mode: ConvMode, imp: ConvImpl) -> String {
        let c = &self.conv;
        format!(
            "{}:{imp:?}:h{}w{}:{}x{}x{}x{}/s{}p{},{},{},{}",
            mode.name(),
            self.h,
            self.w,
            c.cout,
            c.kh,
            c.kw,
            c.cin,
            c.stride,
            c.pad_top,
            c.pad_bottom,
            c.pad_left,
            c.pad_right
        )
    }
}

/// Where fprop/dgrad write: row stride `ldc` (elements between pixels) and first channel
/// `c_offset`, so a branch can fill its slice of a concat output; `accumulate` adds to it.
#[derive(Clone, Copy, Debug)]
pub struct ConvOut {
    pub ptr: DevPtr,
    pub ldc: usize,
    pub c_offset: usize,
    pub accumulate: bool,
}

impl ConvOut {
    /// A dense output tensor of `channels` channels, overwritten.
    pub fn dense(ptr: DevPtr, channels: usize) -> Self {
        Self {
            ptr,
            ldc: channels,
            c_offset: 0,
            accumulate: false,
        }
    }
}

/// Kernel parameter block; mirrors `struct ConvParams` in kernels/common.cuh field for field.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConvParams {
    pub x: u64,
    pub w: u64,
    pub dy: u64,
    pub out: u64,
    pub ws: u64,
    pub n: i32,
    pub h: i32,
    pub w_: i32,
    pub cin: i32,
    pub cout: i32,
    pub kh: i32,
    pub kw: i32,
    pub stride: i32,
    pub pad_top: i32,
    pub pad_left: i32,
    pub oh: i32,
    pub ow: i32,
    pub ldc: i32,
    pub c_offset: i32,
    pub accumulate: i32,
    pub k_tiles_per_split: i32,
}

// SAFETY: plain repr(C) data, laid out like the CUDA struct (5 pointers, 16 ints, 104 bytes).
unsafe impl DeviceRepr for ConvParams {}
const _: () = assert!(std::mem::size_of::<ConvParams>() == 104);

impl ConvParams {
    pub(super) fn new(s: &ConvShape) -> Self {
        let c = &s.conv;
        Self {
            n: s.n as i32,
            h: s.h as i32,
            w_: s.w as i32,
            cin: c.cin as i32,
            cout: c.cout as i32,
            kh: c.kh as i32,
            kw: c.kw as i32,
            stride: c.stride as i32,
            pad_top: c.pad_top as i32,
            pad_left: c.pad_left as i32,
            oh: s.oh() as i32,
            ow: s.ow() as i32,
            ..Default::default()
        }
    }
    pub(super) fn with_out(mut self, out: &ConvOut) -> Self {
        self.out = out.ptr;
        self.ldc = out.ldc as i32;
        self.c_offset = out.c_offset as i32;
        self.accumulate = out.accumulate as i32;
        self
    }
}

/// Whether the tensor-core path can run `mode` on this shape: the gathered channel counts must be
/// multiples of 8 (16-byte cp.async chunks) and outputs are written as half pairs.
pub fn tc_supported(s: &ConvShape, mode: ConvMode, out: Option<&ConvOut>) -> bool {
    let c = &s.conv;
    let even_out = out.is_none_or(|o| o.ldc.is_multiple_of(2) && o.c_offset.is_multiple_of(2));
    match mode {
        ConvMode::Fprop => c.cin.is_multiple_of(8) && c.cout.is_multiple_of(2) && even_out,
        ConvMode::Dgrad | ConvMode::Wgrad => {
            c.cin.is_multiple_of(8) && c.cout.is_multiple_of(8) && even_out
        }
    }
}

/// The tile for a GEMM of `m` x `n` run `grid_z` times side by side (the phases of a data
/// gradient). Without `narrow`, as before the narrow tiles existed: N <= 64 takes 128x64; GEMMs
/// too small to give every SM a 128x128 block take 64x64. With `narrow`, a GEMM whose narrow
/// side is 32 or less takes the tile of that width instead of wasting half a 64-wide one.
pub fn tile_for(
    mode: ConvMode,
    m: usize,
    n: usize,
    grid_z: usize,
    num_sms: u32,
    narrow: bool,
) -> Tile {
    if narrow {
        match mode {
            ConvMode::Wgrad if m <= 32 => return Tile::T32x64,
            ConvMode::Fprop | ConvMode::Dgrad if n <= 32 => return Tile::T128x32,
            _ => {}
        }
    }
    if n <= 64 {
        return Tile::T128x64;
    }
    let blocks = m.div_ceil(128) * n.div_ceil(128) * grid_z;
    if blocks < num_sms as usize {
        Tile::T64x64
    } else {
        Tile::T128x128
    }
}

/// The tile the launcher prefers for the whole GEMM of a shape (see [`tile_for`]).
pub fn preferred_tile(s: &ConvShape, mode: ConvMode, num_sms: u32, narrow: bool) -> Tile {
    let (m, n, _) = s.gemm(mode);
    tile_for(mode, m, n, 1, num_sms, narrow)
}

/// K tiles per split and split count of a tensor-core weight gradient: enough splits to give the
/// GPU about two waves of blocks, each split at least 8 K tiles deep.
pub(super) fn tc_wgrad_split(s: &ConvShape, tile: Tile, num_sms: u32) -> (usize, usize) {
    let (m, n, k) = s.gemm(ConvMode::Wgrad);
    let (bm, bn) = tile.dims();
    let k_tiles = k.div_ceil(32).max(1);
    let blocks = m.div_ceil(bm) * n.div_ceil(bn);
    let want = (2 * num_sms as usize)
        .div_ceil(blocks)
        .clamp(1, (k_tiles / 8).max(1));
    let per = k_tiles.div_ceil(want);
    (per, k_tiles.div_ceil(per))
}

/// Split count of the plain weight gradient (over output pixels).
pub(super) fn plain_wgrad_splits(s: &ConvShape, num_sms: u32) -> usize {
    let (m, n, k) = s.gemm(ConvMode::Wgrad);
    (num_sms as usize * 2048)
        .div_ceil(m * n)
        .clamp(1, 256)
        .min(k.max(1))
}

/// The tensor-core kernels read operands with 16-byte cp.async and write pairs of halves: a
/// misaligned tensor would fault (and poison the CUDA context), so it is refused up front. Arena
/// tensors must therefore start on 16-byte boundaries.
/// The epilogue stores `__half2` at `out + m * ldc + c_offset + n` (n even), so `ldc` and
/// `c_offset` must be even as well: `tc_supported(.., None)` in the launchers does not see them,
/// and a caller forcing `ConvImpl::Tc` onto an odd concat slice would otherwise fault.
pub(super) fn check_tc_alignment(p: &ConvParams) -> Result<()> {
    let misaligned = [p.x, p.w, p.dy, p.ws]
        .iter()
        .any(|&a| !a.is_multiple_of(16))
        || !p.out.is_multiple_of(4)
        || p.ldc % 2 != 0
        || p.c_offset % 2 != 0;
    if misaligned {
        bail!(
            "tensor-core conv needs 16-byte aligned operands and an even output stride/offset \
             (x {:#x}, w {:#x}, dy {:#x}, out {:#x}, ldc {}, c_offset {})",
            p.x,
            p.w,
            p.dy,
            p.out,
            p.ldc,
            p.c_offset
        );
    }
    Ok(())
}

/// fp32 elements of split-K workspace for a weight gradient on a GPU with `num_sms` SMs: the
/// largest need of any implementation (for an input of fewer than 8 channels, the tensor cores
/// over its padded copy too), so the arena can be sized before choosing one.
pub fn wgrad_workspace_elems(s: &ConvShape, num_sms: u32) -> usize {
    let tc_need = |s: &ConvShape| {
        let (m, n, _) = s.gemm(ConvMode::Wgrad);
        let splits = Tile::for_mode(ConvMode::Wgrad)
            .map(|t| tc_wgrad_split(s, t, num_sms).1)
            .max()
            .unwrap_or(1);
        m * n * splits
    };
    let (m, n, _) = s.gemm(ConvMode::Wgrad);
    let plain = m * n * plain_wgrad_splits(s, num_sms);
    let padded = if needs_pad8(s) { tc_need(&pad8(s)) } else { 0 };
    tc_need(s).max(plain).max(padded)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Conv2d;

    fn shape(
        cin: usize,
        cout: usize,
        k: (usize, usize),
        stride: usize,
        pad: (usize, usize),
        hw: usize,
    ) -> ConvShape {
        let conv = Conv2d {
            cin,
            cout,
            kh: k.0,
            kw: k.1,
            stride,
            pad_top: pad.0,
            pad_bottom: pad.0,
            pad_left: pad.1,
            pad_right: pad.1,
        };
        ConvShape {
            conv,
            n: 128,
            h: hw,
            w: hw,
        }
    }

    #[test]
    fn gemm_views() {
        let s = shape(3, 32, (3, 3), 2, (0, 0), 299);
        assert_eq!((s.oh(), s.ow()), (149, 149));
        assert_eq!(s.gemm(ConvMode::Fprop), (128 * 149 * 149, 32, 27));
        assert_eq!(s.gemm(ConvMode::Dgrad), (128 * 299 * 299, 3, 9 * 32));
        assert_eq!(s.gemm(ConvMode::Wgrad), (32, 27, 128 * 149 * 149));
        let s = shape(192, 224, (1, 7), 1, (0, 3), 17);
        assert_eq!((s.oh(), s.ow()), (17, 17));
    }

    #[test]
    fn stem_takes_the_plain_path_and_padded_stem_the_fast_one() {
        let s = shape(3, 32, (3, 3), 2, (0, 0), 299);
        assert!(!tc_supported(&s, ConvMode::Fprop, None));
        let p = ConvShape {
            conv: Conv2d { cin: 8, ..s.conv },
            ..s
        };
        assert!(tc_supported(&p, ConvMode::Fprop, None));
        let odd = ConvOut {
            ptr: 0,
            ldc: 1536,
            c_offset: 3,
            accumulate: false,
        };
        assert!(!tc_supported(&p, ConvMode::Fprop, Some(&odd)));
    }

    #[test]
    fn wgrad_splits_cover_k_and_fit_the_workspace() {
        for s in [
            shape(32, 32, (3, 3), 1, (0, 0), 149),
            shape(1536, 256, (1, 1), 1, (0, 0), 8),
            shape(448, 512, (1, 3), 1, (0, 1), 8),
        ] {
            let (m, n, k) = s.gemm(ConvMode::Wgrad);
            let k_tiles = k.div_ceil(32);
            assert!(plain_wgrad_splits(&s, 132) * m * n <= wgrad_workspace_elems(&s, 132));
            for t in Tile::for_mode(ConvMode::Wgrad) {
                let (per, splits) = tc_wgrad_split(&s, t, 132);
                assert!(
                    per * splits >= k_tiles && (splits - 1) * per < k_tiles,
                    "{s:?} {t:?}"
                );
                assert!(splits * m * n <= wgrad_workspace_elems(&s, 132));
            }
        }
    }

    #[test]
    fn smem_of_tiles() {
        assert_eq!(
            Tile::T128x128.smem_bytes(ConvMode::Fprop),
            3 * (128 * 40 + 128 * 40) * 2
        );
        assert_eq!(
            Tile::T128x64.smem_bytes(ConvMode::Wgrad),
            3 * (32 * 136 + 32 * 72) * 2
        );
        assert!(tc_smem_table().iter().all(|(_, b)| *b <= 227 * 1024));
    }
}
