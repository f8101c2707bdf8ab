//! The CUDA backend: kernel compilation (NVRTC), loading, launchers, arena.
