//! One module per subcommand: its clap arguments and its `run`.

pub mod bench;
pub mod bench_allreduce;
pub mod eval;
pub mod export;
pub mod import;
pub mod inspect;
pub mod pack;
pub mod plot;
pub mod predict;
pub mod selftest;
pub mod train;
