//! `memwise`: see where memory goes in ML workloads, and stream models through a budget.

use std::process::ExitCode;

use clap::Parser;

mod commands;

// Every allocation in the CLI is counted, so `stats` and per-layer breakdowns show the heap
// exactly rather than sampling RSS.
#[global_allocator]
static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
