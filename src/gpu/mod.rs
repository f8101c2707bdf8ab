//! The CUDA runtime every kernel launcher stands on: library discovery ([`libs`]), the kernel
//! sources embedded at build time ([`sources`]), NVRTC compilation with a disk cache ([`nvrtc`]),
//! NCCL's discovery and communicator ([`nccl`]) and the device ([`device::CudaDevice`]: context, stream, loaded kernels, the registry of
//! verified fast-kernel shapes, and the `cuda_launch!` macro), the leaner step's path switches
//! ([`paths`]) and the model of the bytes a call moves ([`traffic`]).
//!
//! Nothing here links CUDA at build time: cudarc loads the driver, NVRTC and NCCL dynamically, and
//! [`libs`] turns their absence into errors.

pub mod device;
pub mod libs;
pub mod nccl;
pub mod nvrtc;
pub mod paths;
pub mod sources;
pub mod traffic;

pub mod check;

pub use device::{amp_variant, arch_for, AmpVariants, CudaDevice, DevPtr, Launch, BLOCK};
pub use paths::KernelPaths;
pub use traffic::Traffic;
