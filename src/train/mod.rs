//! Training: loop, learning-rate schedule, loss, metrics, logging (the optimizer and loss scaler
//! are in `optim`, below the backends).

pub mod eval;
pub mod log;
pub mod loss;
pub mod schedule;
pub mod trainer;

pub use schedule::{lr_max_for_batch, Schedule};
