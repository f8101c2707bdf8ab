//! `inception-engine inspect`: print the per-layer table of a plan: shapes, parameters, MACs, arena size.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("`inspect` is not built yet")
}
