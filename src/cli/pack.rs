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
    /// Store images whose shorter side exceeds N resized to a shorter side of N and re-encoded
    /// (JPEG at --quality; PNG stays PNG). Recorded in the pack. Default: images as they are.
    #[arg(long, value_name = "N")]
    pub max_side: Option<u32>,
    /// JPEG quality of the images --max-side re-encodes.
    #[arg(long, default_value_t = 90)]
    pub quality: u8,
}

pub fn run(args: Args) -> Result<()> {
    let folder = ImageFolder::open(&args.dir)?;
    let opts = packed::PackOptions {
        max_side: args.max_side,
        quality: args.quality,
    };
    let s = packed::write_packed_with(&folder, &args.out, opts)?;
    let bytes = std::fs::metadata(&args.out).map(|m| m.len()).unwrap_or(0);
    let resized = match args.max_side {
        Some(n) => format!(
            "; {} resized to a shorter side of {n} (JPEG quality {})",
            s.resized, args.quality
        ),
        None => String::new(),
    };
    println!(
        "packed {} images in {} classes from {} into {} ({:.1} MiB){resized}",
        s.images,
        folder.classes().len(),
        args.dir.display(),
        args.out.display(),
        bytes as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
