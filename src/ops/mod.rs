//! One folder per op: `mod.rs` its CPU reference forward and backward (plain f32 on NHWC slices)
//! and its shape type, `cuda.rs` the launchers of its kernels in `kernels/<op>.cu` (each launch a
//! value implementing [`crate::gpu::Launch`]), `check.rs` its self-test case.
//!
//! The CPU functions are the specification every other backend is checked against. They take
//! shapes and slices, allocate only scratch space, and parallelise with rayon where it matters.
//! Backward functions that write an input gradient take `accumulate`: add into the gradient (a
//! tensor that feeds several branches) instead of overwriting it.

pub mod batchnorm;
pub mod cast;
pub mod concat;
pub mod conv;
pub mod dropout;
pub mod gemm;
pub mod global_pool;
pub mod linear;
pub mod normalize;
pub mod pool;
pub mod relu;
pub mod softmax_ce;

/// Write `v` into `dst`, or add it when accumulating.
#[inline]
pub(crate) fn store(dst: &mut f32, v: f32, accumulate: bool) {
    if accumulate {
        *dst += v;
    } else {
        *dst = v;
    }
}

/// Rows per parallel task for elementwise work: big enough to amortise scheduling.
pub(crate) const PAR_CHUNK: usize = 1 << 14;
