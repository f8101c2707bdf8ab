//! `inception-engine selftest`: compile the CUDA kernels, or check them against the CPU reference.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("`selftest` is not built yet")
}
