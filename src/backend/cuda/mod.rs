//! The CUDA backend: kernel sources embedded at build time, NVRTC compilation with a disk cache,
//! library discovery, the device context and one launcher per op.
//!
//! Nothing here links CUDA at build time: cudarc loads the driver and NVRTC dynamically, and
//! [`libs`] turns their absence into errors.

pub mod context;
pub mod conv;
pub mod libs;
pub mod nvrtc;
pub mod ops;
pub mod selftest;
mod selftest_ops;
pub mod selftest_ref;
pub mod sources;

pub use context::{arch_for, CudaBackend, DevPtr};
pub use conv::{ConvImpl, ConvMode, ConvOut, ConvShape, Tile};
pub use nvrtc::{compile_all, Compiled, KernelInfo};
pub use ops::{bn_workspace, BnArgs, Labels, PoolShape, RmspropParams};
