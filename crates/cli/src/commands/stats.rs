//! `memwise stats`: a small tracked workload, then everything `get_memory_stats()` reports.

use memwise::{clear_memory, enable_memory_tracking, get_memory_stats, track, MemoryStats};

use super::report::{memory_summary, scope_table, signed_mib};

/// Options for `memwise stats`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Print the stats as JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// MiB the workload allocates (and frees) inside its middle scope.
    #[arg(long, default_value_t = 64, value_name = "MIB")]
    spike_mib: usize,
}

/// Runs three nested scopes: a load, a transient spike inside it, and a cleanup. The spike
/// is freed before its scope ends, so only a true peak tracker sees it.
pub fn run(args: Args) -> anyhow::Result<()> {
    enable_memory_tracking(true);
    let kept = track("load", || {
        let weights: Vec<f32> = vec![0.5; 4 << 20]; // 16 MiB that stays
        track("spike", || {
            let mut scratch = vec![0u8; args.spike_mib << 20];
            // Touch every page so the spike is resident, not only reserved.
            scratch.iter_mut().step_by(4096).for_each(|b| *b = 1);
            scratch.len()
        });
        weights
    });
    let report = track("clear", || clear_memory(kept));
    let stats = get_memory_stats();
    if args.json {
        println!("{}", stats.to_json());
    } else {
        print!("{}", render(&stats));
        println!(
            "clear_memory freed: heap {}, RSS {}",
            signed_mib(report.freed.heap),
            signed_mib(report.freed.rss)
        );
    }
    Ok(())
}

/// The human breakdown: totals first, then one row per scope.
fn render(stats: &MemoryStats) -> String {
    let mut out = memory_summary(stats);
    out.push('\n');
    out.push_str(&scope_table(&stats.scopes));
    if stats.dropped_records > 0 {
        out.push_str(&format!(
            "({} older scope records dropped; raise the record capacity to keep them)\n",
            stats.dropped_records
        ));
    }
    out
}
