//! `inception-engine pack`: pack an image folder into one memory-mapped file.

use crate::data::{packed, ImageFolder};
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Image folder to pack (DIR/<class>/<image>).
    pub dir: PathBuf,
    /// Packed file to write (replaced atomically if it exists).
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let folder = ImageFolder::open(&args.dir)?;
    let n = packed::write_packed(&folder, &args.out)?;
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    println!(
        "packed {n} images in {} classes from {} into {} ({:.1} MiB)",
        folder.classes().len(),
        args.dir.display(),
        args.out.display(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
