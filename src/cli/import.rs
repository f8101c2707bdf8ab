//! `inception-engine import`: read foreign weights (a timm state dict) into an engine checkpoint.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("`import` is not built yet")
}
