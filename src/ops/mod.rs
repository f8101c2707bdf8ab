//! One module per op: its CPU reference forward and backward, plain f32 on NHWC slices.
