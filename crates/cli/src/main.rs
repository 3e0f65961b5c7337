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
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: many library errors already end
/// with their source's text (`opening F: No such file`) and also return it as their
/// source, which anyhow's `{:#}` would print a second time.
fn one_line(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.ends_with(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
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

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug)]
    struct Opening(std::io::Error);

    impl std::fmt::Display for Opening {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "opening config.json: {}", self.0)
        }
    }

    impl std::error::Error for Opening {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let err = anyhow::Error::new(Opening(io)).context("loading m");
        assert_eq!(
            one_line(&err),
            "loading m: opening config.json: no such file"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(one_line(&plain), "outer: inner");
    }
}
