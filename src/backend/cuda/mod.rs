//! The CUDA backend: [`trainer::CudaTrainer`] implements `Backend` over one preallocated device
//! arena. The kernels' launchers live with their ops (src/ops/<op>/cuda.rs) and the runtime in
//! src/gpu; this room holds what makes a step out of them:
//! - [`fusion`]: BN+ReLU fusion, concat slices and the max pools' saved argmax; [`program`]: the
//!   step's stages in order, and the host proof that they cover the plan;
//! - [`arena`]: element sizes, arena placement, parameter slots, the memory estimate;
//! - [`layout`]: where every tensor lives; [`calls`] (and `backward_calls`): the stages resolved
//!   into kernel calls; [`figures`]: a program's launches and the bytes BN and the pools move;
//! - [`cost`]: the useful work of each call and the step's limit at a card's rates;
//! - [`buffers`]: the allocations; [`verify`]: the start-up check of the fast convolutions;
//!   [`work`]: what a step's convolutions issue (MMAs, FMAs), counted on the host;
//! - [`buckets`]: the gradient buffer cut into NCCL all-reduce buckets at plan time, and the host
//!   proof of their schedule; [`nccl_sync`]: those buckets queued on a communication stream;
//!   [`grad_sync`]: a step's calls queued around its gradient sum (none, host-staged, NCCL);
//! - [`trainer`]: staging, the step reports, the device loss scaler, `Backend`; [`graph`]: the
//!   step replayed from captured CUDA graphs.
//!
//! Conventions of every launcher:
//! - tensors are raw device addresses ([`DevPtr`]) carved from the caller's arena; launchers never
//!   allocate, and scratch space (`ws`) is sized by `wgrad_workspace_elems` / `bn_workspace`;
//! - tensor types follow the device's precision level `amp` (O2 unless `set_amp` says otherwise),
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
//! - all work is queued on the device's stream; nothing synchronises except `synchronize`.

pub mod arena;
mod backward_calls;
pub mod buckets;
pub mod buffers;
pub mod calls;
pub mod cost;
pub mod figures;
pub mod fusion;
pub mod grad_sync;
pub mod graph;
pub mod layout;
pub mod nccl_sync;
pub mod program;
pub mod staging;
pub mod trainer;
pub mod verify;
pub mod work;

pub use crate::gpu::{CudaDevice, DevPtr};
pub use trainer::CudaTrainer;
