//! Checkpoints as safetensors files, written atomically.
