//! Training: loop, optimizer, learning-rate schedule, loss scaler, metrics, logging.

pub mod loss;
pub mod loss_scale;
pub mod optimizer;
pub mod schedule;

pub use loss_scale::{has_overflow, LossScaler, StepDecision};
pub use optimizer::{RmsProp, RmsPropConfig};
pub use schedule::{lr_max_for_batch, Schedule};
pub mod eval;
pub mod log;
pub mod trainer;
