//! Human-readable memory reports shared by the subcommands.

use std::fmt::Write as _;

use memwise::scope::ScopeRecord;
use memwise::MemoryStats;

const MIB: f64 = 1024.0 * 1024.0;

/// Bytes in MiB, or "unavailable".
pub fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("unavailable".into(), |b| {
        format!("{:.1} MiB", b as f64 / MIB)
    })
}

/// A signed byte delta in MiB, or "unavailable".
pub fn signed_mib(bytes: Option<i64>) -> String {
    bytes.map_or("unavailable".into(), |b| {
        format!("{:.1} MiB", b as f64 / MIB)
    })
}

/// Process-wide figures: heap, RSS, allocator, devices.
pub fn memory_summary(stats: &MemoryStats) -> String {
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
    out
}

/// One row per finished scope: time, heap at entry and exit, and the peak above entry.
pub fn scope_table<'a>(records: impl IntoIterator<Item = &'a ScopeRecord>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:>10} {:>14} {:>14} {:>14}",
        "scope", "time", "heap entry", "heap exit", "peak delta"
    );
    for r in records {
        let _ = writeln!(
            out,
            "{:<20} {:>8.2}ms {:>14} {:>14} {:>14}",
            r.name,
            r.duration.as_secs_f64() * 1e3,
            mib(r.heap_at_entry),
            mib(r.heap_at_exit),
            mib(r.heap_peak_delta())
        );
    }
    out
}

/// Where one stage's time went in a run: read (on the read-ahead thread when prefetching),
/// waited for (read-ahead had not kept up), built, computed and freed; with its weights and
/// its largest heap peak.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageBreakdown {
    /// The stage.
    pub stage: String,
    /// Its weights in the compute dtype.
    pub weight_bytes: u64,
    /// Times it ran.
    pub runs: u64,
    /// Its largest heap peak above its start.
    pub heap_peak_delta: Option<u64>,
    /// Milliseconds reading its weights, in all.
    pub read_ms: f64,
    /// Milliseconds the computation stalled waiting for them.
    pub wait_ms: f64,
    /// Milliseconds building its block (hooks included).
    pub build_ms: f64,
    /// Milliseconds computing.
    pub compute_ms: f64,
    /// Milliseconds freeing its weights.
    pub free_ms: f64,
    /// Milliseconds of its reading that overlapped compute (read-ahead that kept up).
    pub overlap_ms: f64,
}

/// A run's breakdown as `breakdown.json` holds it: every stage, and the peaks per kind.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Breakdown {
    /// Per stage, in execution order.
    pub stages: Vec<StageBreakdown>,
    /// The largest live heap bytes each kind held, and the mapped file pages.
    pub kinds: KindPeaks,
}

/// The most each kind of memory held during the run, in bytes: the heap by kind as the
/// allocator measured it ([`memwise::report::kind_series`]: a kind's bytes are read at the
/// edges of its scopes and at samples, so a buffer allocated and freed inside one compute
/// does not show) and, where the sampler read it, file-backed resident memory (weights
/// computed on in their mapped files).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct KindPeaks {
    pub weights: u64,
    pub read_ahead: u64,
    pub kv_cache: u64,
    pub activations: u64,
    pub other_heap: u64,
    pub file_backed: Option<u64>,
}

/// The peaks per kind over the scopes' edges and the sampler's readings.
pub fn kind_peaks(stats: &MemoryStats, samples: &[memwise::report::Sample]) -> KindPeaks {
    let mut peaks = KindPeaks::default();
    for point in memwise::report::kind_series(stats, samples) {
        let k = point.kinds;
        peaks.weights = peaks.weights.max(k.weights);
        peaks.read_ahead = peaks.read_ahead.max(k.read_ahead);
        peaks.kv_cache = peaks.kv_cache.max(k.kv_cache);
        peaks.activations = peaks.activations.max(k.activations);
        peaks.other_heap = peaks.other_heap.max(point.other);
    }
    peaks.file_backed = samples
        .iter()
        .filter_map(|s| s.process.as_ref().map(|p| p.rss_file))
        .max();
    peaks
}

/// The breakdown of `stages` (name, weight bytes) from the phase scopes the runner records
/// (`stage:read`, `stage:wait`, ...).
pub fn stage_breakdown(stats: &MemoryStats, stages: &[(&str, u64)]) -> Vec<StageBreakdown> {
    let find = |name: &str| stats.aggregates.iter().find(|a| a.name == name);
    let ms = |stage: &str, phase: &str| {
        find(&format!("{stage}:{phase}")).map_or(0.0, |a| a.total_time.as_secs_f64() * 1e3)
    };
    stages
        .iter()
        .map(|&(stage, weight_bytes)| StageBreakdown {
            stage: stage.to_owned(),
            weight_bytes,
            runs: find(stage).map_or(0, |a| a.count),
            heap_peak_delta: find(stage).and_then(|a| a.max_heap_peak_delta),
            read_ms: ms(stage, "read"),
            wait_ms: ms(stage, "wait"),
            build_ms: ms(stage, "build"),
            compute_ms: ms(stage, "compute"),
            free_ms: ms(stage, "free"),
            overlap_ms: (ms(stage, "read") - ms(stage, "wait")).max(0.0),
        })
        .collect()
}

/// The breakdown as a table, with totals, the share of reading that overlapped compute and
/// the peaks per kind.
pub fn breakdown_table(breakdown: &Breakdown) -> String {
    let rows = &breakdown.stages;
    let mut out = String::new();
    let width = rows.iter().map(|r| r.stage.len()).fold(5, usize::max);
    let _ = writeln!(
        out,
        "{:<width$} {:>4} {:>10} {:>11} {:>9} {:>9} {:>9} {:>9}",
        "stage", "runs", "weights", "peak delta", "read ms", "wait ms", "build ms", "comp ms"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<width$} {:>4} {:>10} {:>11} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            r.stage,
            r.runs,
            mib(Some(r.weight_bytes)),
            mib(r.heap_peak_delta),
            r.read_ms,
            r.wait_ms,
            r.build_ms,
            r.compute_ms
        );
    }
    let total = |f: fn(&StageBreakdown) -> f64| rows.iter().map(f).sum::<f64>();
    let (read, wait, compute) = (
        total(|r| r.read_ms),
        total(|r| r.wait_ms),
        total(|r| r.compute_ms),
    );
    let _ = writeln!(
        out,
        "total: read {read:.1} ms, stalled {wait:.1} ms, computed {compute:.1} ms; \
         {:.0}% of reading overlapped compute",
        if read > 0.0 {
            100.0 * (read - wait.min(read)) / read
        } else {
            0.0
        }
    );
    let k = &breakdown.kinds;
    let _ = write!(
        out,
        "peak by kind: weights {}, read-ahead {}, KV cache {}, activations {}, other heap {}",
        mib(Some(k.weights)),
        mib(Some(k.read_ahead)),
        mib(Some(k.kv_cache)),
        mib(Some(k.activations)),
        mib(Some(k.other_heap))
    );
    if let Some(file) = k.file_backed {
        let _ = write!(out, "; mapped file pages {}", mib(Some(file)));
    }
    out.push('\n');
    out
}
