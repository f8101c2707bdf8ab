//! Executors of a plan: the CPU reference backend and the CUDA backend.

pub mod cpu;
pub mod cuda;
