//! `memwise stats`: a small tracked workload, then everything `get_memory_stats()` reports.

use std::fmt::Write as _;

use memwise::{clear_memory, enable_memory_tracking, get_memory_stats, track, MemoryStats};

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

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("unavailable".into(), |b| {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    })
}

fn signed_mib(bytes: Option<i64>) -> String {
    bytes.map_or("unavailable".into(), |b| {
        format!("{:.1} MiB", b as f64 / 1048576.0)
    })
}

/// The human breakdown: totals first, then one row per scope.
fn render(stats: &MemoryStats) -> String {
    let mut out = String::new();
    let heap = stats.heap.as_ref();
    let proc = stats.process.as_ref();
    let _ = writeln!(
        out,
        "heap       current {:>12}   peak {:>12}",
        mib(heap.map(|h| h.current)),
        mib(heap.map(|h| h.peak))
    );
    let _ = writeln!(
        out,
        "RSS        current {:>12}   peak {:>12}   anon {}   file {}",
        mib(proc.map(|p| p.rss)),
        mib(proc.map(|p| p.rss_peak)),
        mib(proc.map(|p| p.rss_anon)),
        mib(proc.map(|p| p.rss_file))
    );
    let _ = writeln!(
        out,
        "allocator  free held {}",
        mib(stats.allocator_free_bytes)
    );
    if stats.devices.is_empty() {
        let _ = writeln!(out, "devices    none registered (CPU-only build)");
    }
    for d in &stats.devices {
        let _ = writeln!(
            out,
            "{:<10} used {:>12}   reserved {:>12}   peak {:>12}",
            d.device,
            mib(Some(d.used)),
            mib(Some(d.reserved)),
            mib(Some(d.peak_used))
        );
    }
    let _ = writeln!(
        out,
        "\n{:<12} {:>10} {:>14} {:>14} {:>14}",
        "scope", "time", "heap entry", "heap exit", "peak delta"
    );
    for r in &stats.scopes {
        let _ = writeln!(
            out,
            "{:<12} {:>8.2}ms {:>14} {:>14} {:>14}",
            r.name,
            r.duration.as_secs_f64() * 1e3,
            mib(r.heap_at_entry),
            mib(r.heap_at_exit),
            mib(r.heap_peak_delta())
        );
    }
    if stats.dropped_records > 0 {
        let _ = writeln!(
            out,
            "({} older scope records dropped; raise the record capacity to keep them)",
            stats.dropped_records
        );
    }
    out
}
