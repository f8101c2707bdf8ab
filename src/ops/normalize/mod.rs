//! Normalisation of a u8 RGB batch (NHWC, the loader's layout) into the network's f32 input:
//! `x / 255` then `(x - mean) / std` per channel, computed as one multiply and one add with the
//! per-channel factors of [`Factors`]. This CPU function is the reference; the CUDA trainer runs
//! [`cuda::NormalizeU8`] on the batch after it arrives as u8 (4x fewer bytes over the bus than
//! f32), and the CPU packing path calls it directly.

pub mod check;
pub mod cuda;

/// Per-channel `mul` and `add` such that `out = u8 * mul + add` equals `(u8 / 255 - mean) / std`
/// up to rounding; the device computes with the same two f32 constants, so both agree.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Factors {
    pub mul: [f32; 3],
    pub add: [f32; 3],
}

impl Factors {
    pub fn new(mean: [f32; 3], std: [f32; 3]) -> Self {
        let mut f = Self {
            mul: [0.0; 3],
            add: [0.0; 3],
        };
        for c in 0..3 {
            f.mul[c] = 1.0 / (255.0 * std[c]);
            f.add[c] = -mean[c] / std[c];
        }
        f
    }
}

/// RGB u8 (NHWC, channel fastest) -> `src * mul + add` per channel, written to `dst`.
pub fn normalize_u8(src: &[u8], dst: &mut [f32], f: &Factors) {
    assert_eq!(
        src.len(),
        dst.len(),
        "normalize_u8: source and output lengths"
    );
    // Sixteen pixels per step, so that the channel pattern lines up with the vector lanes.
    const PX: usize = 16;
    let mut mul = [0.0f32; 3 * PX];
    let mut add = [0.0f32; 3 * PX];
    for i in 0..3 * PX {
        mul[i] = f.mul[i % 3];
        add[i] = f.add[i % 3];
    }
    let mut s = src.chunks_exact(3 * PX);
    let mut d = dst.chunks_exact_mut(3 * PX);
    for (s, d) in (&mut s).zip(&mut d) {
        for i in 0..3 * PX {
            d[i] = s[i] as f32 * mul[i] + add[i];
        }
    }
    for (i, (v, o)) in s.remainder().iter().zip(d.into_remainder()).enumerate() {
        *o = *v as f32 * mul[i] + add[i];
    }
}
