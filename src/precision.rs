//! The mixed-precision levels, below every room that stores tensors: the plan's arena sizes, the
//! kernels' entry points and the backends all depend on the level.

/// Mixed-precision level, MindSpore's names: O0 fp32 everywhere, O2 fp16 activations and
/// convolutions with fp32 BN statistics and master weights, O3 fp16 everywhere including BN.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Amp {
    #[value(name = "O0")]
    O0,
    #[value(name = "O2")]
    O2,
    #[value(name = "O3")]
    O3,
}
