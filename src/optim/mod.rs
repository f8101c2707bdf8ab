//! The optimizer and the loss scaler, below every backend: the CPU's RMSProp update (the
//! reference the fused CUDA kernel is checked against) and the loss-scaling policy both backends
//! follow. [`cuda`] holds the fused RMSProp, overflow-check and device loss-scaler launchers,
//! [`check`] their self-test cases.

pub mod check;
pub mod cuda;
pub mod loss_scale;
pub mod rmsprop;

pub use loss_scale::{has_overflow, LossScaler, StepDecision};
pub use rmsprop::{RmsProp, RmsPropConfig};
