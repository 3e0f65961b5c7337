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
    quiet_library_backtraces();
    let cli = commands::Cli::parse();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// candle captures a backtrace into its errors whenever `RUST_BACKTRACE` is set, as many
/// Rust developers have it, and an error's text would then carry dozens of frames. Error
/// messages are for users: library backtraces stay off (`RUST_LIB_BACKTRACE=0`) unless the
/// user asked for them by that name; panics still follow `RUST_BACKTRACE`.
fn quiet_library_backtraces() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // Before any other thread exists, and before anything captured a backtrace.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
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
