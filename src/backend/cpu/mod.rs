//! The CPU backend: [`executor::CpuExecutor`] runs a plan's forward and backward over the ops'
//! CPU references; [`trainer::CpuTrainer`] adds the optimizer and implements `Backend`.

pub mod executor;
pub mod trainer;

pub use executor::{CpuExecutor, Mode};
pub use trainer::CpuTrainer;
