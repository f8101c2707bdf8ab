//! One module per subcommand: its clap arguments and its `run`.

pub mod bench;
pub mod eval;
pub mod export;
pub mod import;
pub mod inspect;
pub mod pack;
pub mod plot;
pub mod predict;
pub mod selftest;
pub mod train;

use crate::plan::models;
use clap::builder::{PossibleValue, PossibleValuesParser};

/// The `--plan` values: the model table's names, each with its summary, so `--help` lists them
/// and clap rejects an unknown name with the list.
pub fn plan_values() -> PossibleValuesParser {
    let values = models::MODELS
        .iter()
        .map(|m| PossibleValue::new(m.name).help(m.summary));
    PossibleValuesParser::new(values)
}
