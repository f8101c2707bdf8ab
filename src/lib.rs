//! inception-engine: a training engine for InceptionV4.
//!
//! See docs/ARCHITECTURE.md for the map of the code.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod dist;
pub mod export;
pub mod gpu;
pub mod ops;
pub mod optim;
pub mod params;
pub mod plan;
pub mod precision;
pub mod report;
pub mod selftest;
pub mod train;
