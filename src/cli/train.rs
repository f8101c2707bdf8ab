//! `inception-engine train`: train a plan on an image folder or packed file.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("`train` is not built yet")
}
