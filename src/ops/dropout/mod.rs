//! Dropout with a counter-based RNG: element `i` of step `step` is kept iff its hash-derived uniform
//! `u >= p`. The mask is a pure function of (seed, step, i), so backward recomputes it, no mask is
//! stored, and the CUDA kernel reproduces it bit for bit.
//!
//! The op's room: this file is the CPU reference (the specification); [`cuda`] holds the
//! launchers of kernels/dropout.cu, [`check`] the self-test case that runs them against this file.

pub mod check;
pub mod cuda;

use super::store;

/// splitmix64's finaliser: a strong 64-bit mix.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z ^= z >> 30;
    z = z.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z ^= z >> 27;
    z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform in [0, 1) with 24 bits, from (seed, step, index).
#[inline]
pub fn uniform(seed: u64, step: u64, index: u64) -> f32 {
    let h = mix64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ index,
    );
    (h >> 40) as f32 / (1u32 << 24) as f32
}

/// Scale of element `i`: 0 if dropped, 1/(1-p) if kept.
#[inline]
fn factor(p: f32, seed: u64, step: u64, i: usize) -> f32 {
    if uniform(seed, step, i as u64) >= p {
        1.0 / (1.0 - p)
    } else {
        0.0
    }
}

/// Training forward; with `p == 0` it is the identity.
pub fn forward(x: &[f32], p: f32, seed: u64, step: u64, y: &mut [f32]) {
    for (i, (y, &x)) in y.iter_mut().zip(x).enumerate() {
        *y = if p > 0.0 {
            x * factor(p, seed, step, i)
        } else {
            x
        };
    }
}

pub fn backward(dy: &[f32], p: f32, seed: u64, step: u64, dx: &mut [f32], accumulate: bool) {
    for (i, (d, &g)) in dx.iter_mut().zip(dy).enumerate() {
        let v = if p > 0.0 {
            g * factor(p, seed, step, i)
        } else {
            g
        };
        store(d, v, accumulate);
    }
}
