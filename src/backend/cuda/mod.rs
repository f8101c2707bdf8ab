//! The CUDA backend: kernel sources embedded at build time, NVRTC compilation with a disk cache,
//! library discovery, the device context and one launcher per op.
//!
//! Nothing here links CUDA at build time: cudarc loads the driver and NVRTC dynamically, and
//! [`libs`] turns their absence into errors.
//!
//! Conventions of every launcher ([`CudaDevice`] methods in [`conv`] and [`ops`]):
//! - tensors are raw device addresses ([`DevPtr`]) carved from the caller's arena; launchers never
//!   allocate, and scratch space (`ws`) is sized by `conv_wgrad_workspace` / `bn_workspace`;
//! - tensor types follow the backend's precision level `amp` (O2 unless `set_amp` says otherwise),
//!   which picks each launcher's kernel entry point (`AmpVariants`):
//!   - O2: activations, their gradients and conv/FC weights fp16 (NHWC, `[cout][kh][kw][cin]`,
//!     `[out][in]`); BN gamma/beta and saved mean/inverse std fp32;
//!   - O0: all of those fp32 (conv/FC weights are the fp32 masters; convolutions run on the plain
//!     kernels);
//!   - O3: as O2, but BN gamma/beta (the fp16 working copy) and saved statistics fp16;
//!   - at every level: BN running statistics, biases, parameter gradients (dgamma/dbeta, dW, db),
//!     optimizer state, workspaces, labels and losses are fp32;
//! - every tensor starts on a 16-byte boundary (the tensor-core path checks and refuses otherwise);
//! - `accumulate` adds into the destination (a tensor feeding several branches sums gradients);
//! - outputs that may land in a concat slice take a row stride and channel offset (`ldc`/`c_offset`
//!   for convs, `ldy`/`yoff` for BN and pools);
//! - all work is queued on the backend's stream; nothing synchronises except `synchronize`.

pub mod arena;
pub mod conv;
pub mod executor;
pub mod fusion;
pub mod ops;
pub mod selftest;
mod selftest_ops;
pub mod selftest_ref;
pub mod selftest_step;
pub mod step_launch;
pub mod step_plan;

pub use crate::gpu::{amp_variant, arch_for, AmpVariants, CudaDevice, DevPtr};
pub use conv::{ConvImpl, ConvMode, ConvOut, ConvShape, Tile};
pub use executor::CudaTrainer;
pub use crate::gpu::nvrtc::{compile_all, Compiled, KernelInfo};
pub use ops::{bn_workspace, BnArgs, Labels, PoolShape, RmspropParams, ScaleArg};
