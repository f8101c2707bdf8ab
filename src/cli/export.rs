//! `inception-engine export`: export a checkpoint to ONNX or a timm state dict.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<()> {
    anyhow::bail!("`export` is not built yet")
}
