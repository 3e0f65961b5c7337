//! Reports people look at: a folder with the stats as JSON, a Chrome trace-event file
//! (opens in Perfetto or `chrome://tracing`) and an SVG timeline (opens in any browser).
//!
//! ```
//! use memwise::report::{self, ReportOptions};
//!
//! memwise::enable_memory_tracking(true);
//! memwise::track("load", || vec![1u8; 1 << 20]);
//! let dir = std::env::temp_dir().join("memwise-report-doctest");
//! let files = report::write(&dir, &memwise::get_memory_stats(), &ReportOptions::new()).unwrap();
//! println!("open {} in https://ui.perfetto.dev", files.trace.display());
//! ```
//!
//! The folder holds:
//!
//! | file | what |
//! | --- | --- |
//! | `stats.json` | the full [`MemoryStats`]: process figures, every scope record, aggregates |
//! | `trace.json` | a complete slice per scope on its thread; counters for live heap, RSS anonymous and file-backed, each device, and the budget |
//! | `timeline.svg` | memory over time: the live heap stacked by [`Kind`](crate::kind::Kind) (weights, read-ahead, KV cache, activations, other; see [`kind_series`]), resident memory and its file-backed part as lines, the budget as a line, the scopes drawn under it |
//!
//! [`compare`] puts two report folders side by side.
//!
//! Counter values come from every scope edge (each record keeps its entry and exit
//! figures) and from the [`Sample`]s passed in [`ReportOptions::samples`], which a
//! [`Sampler`] takes in the background at an interval, in a ring of bounded size.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::kind::KindBytes;
use crate::{Error, ErrorKind, MemoryStats, Result};

mod compare;
mod sampler;
mod timeline;
mod trace;

pub use compare::{compare, Comparison, Row, Unit};
pub use sampler::{Sample, SampleRing, Sampler, DEFAULT_CAPACITY, DEFAULT_INTERVAL};

/// What a report shows besides the stats.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ReportOptions {
    /// Readings taken between scope edges, in any order.
    pub samples: Vec<Sample>,
    /// The memory budget in bytes, drawn as a line and a counter.
    pub budget: Option<u64>,
}

impl ReportOptions {
    /// No samples, no budget.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds readings taken between scope edges.
    pub fn samples(mut self, samples: impl IntoIterator<Item = Sample>) -> Self {
        self.samples.extend(samples);
        self
    }

    /// Sets the budget in bytes.
    pub fn budget(mut self, budget: Option<u64>) -> Self {
        self.budget = budget;
        self
    }
}

/// The files a report wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReportFiles {
    /// The report folder.
    pub dir: PathBuf,
    /// `stats.json`.
    pub stats: PathBuf,
    /// `trace.json`.
    pub trace: PathBuf,
    /// `timeline.svg`.
    pub timeline: PathBuf,
}

/// Writes a report folder for `stats` into `dir` (created if missing; files in it with the
/// report's names are replaced, each atomically).
pub fn write(
    dir: impl AsRef<Path>,
    stats: &MemoryStats,
    options: &ReportOptions,
) -> Result<ReportFiles> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
    let readings = readings(stats, &options.samples);
    let files = ReportFiles {
        dir: dir.to_owned(),
        stats: dir.join("stats.json"),
        trace: dir.join("trace.json"),
        timeline: dir.join("timeline.svg"),
    };
    write_file(&files.stats, stats.to_json().as_bytes())?;
    let trace = trace::trace_events(stats, &readings, options.budget);
    let trace = serde_json::to_vec(&trace).expect("trace events serialize to JSON");
    write_file(&files.trace, &trace)?;
    let kinds = kind_points(&readings);
    let svg = timeline::timeline_svg(stats, &readings, &kinds, options.budget).map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("drawing {}: {e}", files.timeline.display()),
        )
    })?;
    write_file(&files.timeline, svg.as_bytes())?;
    Ok(files)
}

/// The live heap at one moment, split by [`Kind`](crate::kind::Kind): what `timeline.svg` stacks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KindPoint {
    /// When, on the scopes' clock.
    pub at: Duration,
    /// Live heap bytes attributed to each kind.
    pub kinds: KindBytes,
    /// The rest of the live heap: live bytes minus all kinds (zero if the kinds exceed it
    /// for a moment).
    pub other: u64,
}

/// The live heap by kind over time, oldest first, from every reading that has both the
/// heap and the per-kind figures: each scope's edges and `samples`. Empty without the
/// [`TrackingAllocator`](crate::TrackingAllocator).
///
/// ```
/// use memwise::kind::Kind;
/// use memwise::report;
///
/// # #[global_allocator]
/// # static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();
/// memwise::enable_memory_tracking(true);
/// let kept = memwise::MemoryTracker::with_kind("load", Kind::Weights);
/// let weights = vec![0u8; 4 << 20];
/// drop(kept);
/// let series = report::kind_series(&memwise::get_memory_stats(), &[]);
/// assert!(series.last().unwrap().kinds.weights >= 4 << 20);
/// # drop(weights);
/// ```
pub fn kind_series(stats: &MemoryStats, samples: &[Sample]) -> Vec<KindPoint> {
    kind_points(&readings(stats, samples))
}

fn kind_points(readings: &[Sample]) -> Vec<KindPoint> {
    readings
        .iter()
        .filter_map(|s| {
            let (heap, kinds) = (s.heap?, s.kinds?);
            Some(KindPoint {
                at: s.at,
                kinds,
                other: heap.saturating_sub(kinds.total()),
            })
        })
        .collect()
}

/// Every reading the report knows, oldest first: the samples and each scope's edges.
fn readings(stats: &MemoryStats, samples: &[Sample]) -> Vec<Sample> {
    let mut out: Vec<Sample> = samples.to_vec();
    for r in &stats.scopes {
        let devices = |exit: bool| {
            r.devices
                .iter()
                .map(|d| {
                    let used = if exit {
                        d.used_at_exit
                    } else {
                        d.used_at_entry
                    };
                    (d.device.clone(), used)
                })
                .collect()
        };
        out.push(Sample {
            at: r.start,
            heap: r.heap_at_entry,
            process: r.rss_at_entry,
            devices: devices(false),
            kinds: r.kinds_at_entry,
        });
        out.push(Sample {
            at: r.start + r.duration,
            heap: r.heap_at_exit,
            process: r.rss_at_exit,
            devices: devices(true),
            kinds: r.kinds_at_exit,
        });
    }
    out.sort_by_key(|s| s.at);
    out
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place.
fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| io_error("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io_error("moving into place", path, e))
}

fn io_error(what: &str, path: &Path, err: std::io::Error) -> Error {
    Error::new(ErrorKind::Io, format!("{what} {}: {err}", path.display())).with_source(err)
}
