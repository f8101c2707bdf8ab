//! The CUDA backend: kernel sources embedded at build time, NVRTC compilation with a disk cache,
//! library discovery, the device context and one launcher per op.

pub mod libs;
pub mod nvrtc;
pub mod sources;

pub use nvrtc::{compile_all, Compiled, KernelInfo};
