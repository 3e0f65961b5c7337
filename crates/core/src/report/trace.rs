//! The Chrome trace-event format (the JSON object form), as Perfetto and `chrome://tracing`
//! read it: complete slices (`"ph": "X"`) for scopes, counters (`"ph": "C"`) for memory.
//! Timestamps are microseconds on memwise's clock.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};

use super::Sample;
use crate::MemoryStats;

const PID: u64 = 1;

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The whole trace: metadata first, then every slice and counter in timestamp order.
pub(super) fn trace_events(stats: &MemoryStats, readings: &[Sample], budget: Option<u64>) -> Value {
    let mut metadata = vec![json!({
        "name": "process_name", "ph": "M", "pid": PID, "tid": 0,
        "args": { "name": "memwise" },
    })];
    // Threads in the order their first scope opened, numbered from 1.
    let mut scopes: Vec<_> = stats.scopes.iter().collect();
    scopes.sort_by(|a, b| a.start.cmp(&b.start).then(b.duration.cmp(&a.duration)));
    let mut tids: BTreeMap<&str, u64> = BTreeMap::new();
    for r in &scopes {
        let next = tids.len() as u64 + 1;
        let tid = *tids.entry(r.thread.as_str()).or_insert(next);
        if tid == next {
            metadata.push(json!({
                "name": "thread_name", "ph": "M", "pid": PID, "tid": tid,
                "args": { "name": r.thread },
            }));
            metadata.push(json!({
                "name": "thread_sort_index", "ph": "M", "pid": PID, "tid": tid,
                "args": { "sort_index": tid },
            }));
        }
    }

    // (timestamp, order within a timestamp, event): slices that open together nest
    // longest first, and counters at a slice edge follow the slice.
    let mut timed: Vec<(Duration, u8, Value)> = Vec::new();
    for r in &scopes {
        timed.push((
            r.start,
            0,
            json!({
                "name": r.name, "cat": "scope", "ph": "X", "pid": PID, "tid": tids[r.thread.as_str()],
                "ts": micros(r.start), "dur": micros(r.duration),
                "args": {
                    "id": r.id,
                    "parent": r.parent,
                    "heap_at_entry": r.heap_at_entry,
                    "heap_at_exit": r.heap_at_exit,
                    "heap_peak": r.heap_peak,
                    "heap_peak_delta": r.heap_peak_delta(),
                    "rss_anon_at_entry": r.rss_at_entry.map(|p| p.rss_anon),
                    "rss_anon_at_exit": r.rss_at_exit.map(|p| p.rss_anon),
                    "devices": r.devices,
                },
            }),
        ));
    }
    let counter = |name: &str, at: Duration, args: Value| {
        (
            at,
            1,
            json!({ "name": name, "ph": "C", "pid": PID, "ts": micros(at), "args": args }),
        )
    };
    for s in readings {
        if let Some(heap) = s.heap {
            timed.push(counter("heap", s.at, json!({ "live": heap })));
        }
        if let Some(p) = s.process {
            timed.push(counter(
                "RSS",
                s.at,
                json!({ "anon": p.rss_anon, "file": p.rss_file }),
            ));
        }
        for (device, used) in &s.devices {
            timed.push(counter(device, s.at, json!({ "used": used })));
        }
    }
    if let Some(budget) = budget {
        let end = timed.iter().map(|t| t.0).max().unwrap_or_default();
        timed.push(counter(
            "budget",
            Duration::ZERO,
            json!({ "bytes": budget }),
        ));
        timed.push(counter("budget", end, json!({ "bytes": budget })));
    }
    // Stable: equal keys keep the longest-first order of the slices above.
    timed.sort_by_key(|t| (t.0, t.1));

    let mut events = metadata;
    events.extend(timed.into_iter().map(|t| t.2));
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "generator": concat!("memwise ", env!("CARGO_PKG_VERSION")),
            "dropped_records": stats.dropped_records,
        },
    })
}
