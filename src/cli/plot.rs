//! `inception-engine plot`: the training curves of one or more runs on the same axes.

use crate::report::{plot, RunMetrics};
use anyhow::{Context, Result};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run folders written by train (each holding a metrics.jsonl).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Picture to write: SVG when the name ends in .svg, otherwise PNG.
    #[arg(long, default_value = "curves.png")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let runs = args
        .runs
        .iter()
        .map(|dir| {
            RunMetrics::read(dir).with_context(|| format!("{} is not a run folder", dir.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    plot::draw(&runs, &args.out)?;
    for r in &runs {
        eprintln!(
            "{}: {} log points, {} epochs, {} evaluations",
            r.name,
            r.steps.len(),
            r.epochs.len(),
            r.evals.len()
        );
    }
    println!("{}", args.out.display());
    Ok(())
}
