//! The `inception-engine` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
/// mimalloc reuses freed pages: the loader threads allocate and free a megabyte per image at
/// 299x299, which the system allocator turns into a page fault storm.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use inception_engine::cli::{
    bench, eval, export, import, inspect, pack, plot, predict, selftest, train,
};

#[derive(Parser)]
#[command(
    name = "inception-engine",
    version,
    about = "Train, evaluate and export InceptionV4 on the CPU or an NVIDIA GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the per-layer table of a plan: shapes, parameters, MACs, arena size.
    Inspect(inspect::Args),
    /// Time training steps or kernels.
    Bench(bench::Args),
    /// Compile the CUDA kernels, or check them against the CPU reference.
    Selftest(selftest::Args),
    /// Train a plan on an image folder or packed file.
    Train(Box<train::Args>),
    /// Evaluate a checkpoint: loss, top-1, top-5.
    Eval(eval::Args),
    /// Classify images with a checkpoint.
    Predict(predict::Args),
    /// Draw the training curves of one or more runs on the same axes.
    Plot(plot::Args),
    /// Pack an image folder into one memory-mapped file.
    Pack(pack::Args),
    /// Export a checkpoint to ONNX or a timm state dict.
    Export(export::Args),
    /// Import a timm state dict (safetensors) as an engine checkpoint.
    Import(import::Args),
}

fn main() {
    let argv = match train::expand_config(std::env::args().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(2);
        }
    };
    let cli = Cli::parse_from(argv);
    if let Err(e) = dispatch(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Inspect(a) => inspect::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Selftest(a) => selftest::run(a),
        Command::Train(a) => train::run(*a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Pack(a) => pack::run(a),
        Command::Export(a) => export::run(a),
        Command::Import(a) => import::run(a),
    }
}
