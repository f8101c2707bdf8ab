//! `inception-engine predict`: classify images with a checkpoint.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("`predict` is not built yet")
}
