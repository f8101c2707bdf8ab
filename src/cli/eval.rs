//! `inception-engine eval`: evaluate a checkpoint: loss, top-1, top-5.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("`eval` is not built yet")
}
