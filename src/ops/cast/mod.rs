//! fp32 <-> fp16 casts. Their CPU reference is IEEE round-to-nearest-even as the `half` crate
//! implements it; [`cuda`] holds the launchers of kernels/cast.cu, [`check`] the self-test case.

pub mod check;
pub mod cuda;
