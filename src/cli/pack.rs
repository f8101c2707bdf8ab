//! `inception-engine pack`: pack an image folder into one memory-mapped file.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("`pack` is not built yet")
}
