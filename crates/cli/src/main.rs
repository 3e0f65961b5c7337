//! `memwise`: see where memory goes in ML workloads, and stream models through a budget.

use std::process::ExitCode;

use clap::Parser;

mod commands;

// Every allocation in the CLI is counted, so `stats` and per-layer breakdowns show the heap
// exactly rather than sampling RSS. Under it, the block cache lets a streamed layer reuse the
// previous layer's resident memory (the runner sizes it; clear_memory empties it).
#[global_allocator]
static ALLOC: memwise::TrackingAllocator<memwise::BlockCache> =
    memwise::TrackingAllocator::new(memwise::BlockCache::new());

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Rust ignores SIGPIPE, so `memwise ... | head` would panic on a closed pipe; a command-line
/// tool should end quietly instead, as other Unix tools do.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
