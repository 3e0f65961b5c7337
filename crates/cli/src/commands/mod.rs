//! The subcommands. Each lives in its own module with an `Args` struct and a `run`.

use clap::{Parser, Subcommand};

mod chat;
mod config;
mod convert;
mod demo;
mod embed;
mod inspect;
mod plan;
mod quantize;
mod report;
mod reports;
mod run;
mod stats;
mod synth;

/// See exactly where memory goes in ML workloads, give it back, and run models larger than
/// memory by streaming them through a budget.
#[derive(Debug, Parser)]
#[command(name = "memwise", version = version(), about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate a model, run it loaded whole and streamed, and compare memory and output.
    Demo(demo::Args),
    /// Run a small workload under tracking and print the memory stats it produced.
    Stats(stats::Args),
    /// Show the configuration and where each value came from, or check a config file.
    Config(config::Args),
    /// Show a model folder's layers, sizes, tied weights and the memory it needs.
    Inspect(inspect::Args),
    /// Write the layers that cannot be streamed in place into a workspace (resumable).
    Convert(convert::Args),
    /// Write a seeded random-weight model in the Hugging Face layout (config.json, sharded
    /// safetensors, index), so nothing has to be downloaded.
    Synth(synth::Args),
    /// Predict a run's whole-process peak and where each stage's weights live, reading no
    /// weight; a budget nothing fits is refused with the deficit.
    Plan(plan::Args),
    /// Stream a model through memory one layer at a time; print its output and per-layer memory.
    Run(run::Args),
    /// Embed many texts (arguments or a file, one per line) in batches with a sentence-
    /// embedding model, as sentence-transformers would.
    Embed(embed::Args),
    /// Quantize a model's linear weights with round-to-nearest, stage by stage, into
    /// auto-round's checkpoint format.
    Quantize(quantize::Args),
    /// Work with report folders: `report compare A B` puts two runs side by side.
    Report(reports::Args),
}

/// Dispatches to the chosen subcommand.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo(args) => demo::run(args),
        Command::Stats(args) => stats::run(args),
        Command::Config(args) => config::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args),
        Command::Synth(args) => synth::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Run(args) => run::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Quantize(args) => quantize::run(args),
        Command::Report(args) => reports::run(args),
    }
}

/// `--version` also says what this build can do.
fn version() -> &'static str {
    concat!(
        env!("CARGO_PKG_VERSION"),
        "\nfeatures: cpu",
        "\nallocator: memwise::TrackingAllocator"
    )
}
