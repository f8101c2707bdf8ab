//! One module per subcommand: its clap arguments and its `run`.

pub mod inspect;
pub mod bench;
pub mod selftest;
pub mod train;
pub mod eval;
pub mod predict;
pub mod pack;
pub mod export;
