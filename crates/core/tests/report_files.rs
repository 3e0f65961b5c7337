//! `memwise::report::write`: the folder's trace is trace-event JSON with a slice per scope
//! on its thread and counters in timestamp order, and its timeline is well-formed SVG that
//! names the scopes.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use memwise::report::{self, ReportOptions, Sample};
use memwise::stats::ProcessMemory;
use memwise::{enable_memory_tracking, get_memory_stats, reset_memory_stats, track, MemoryTracker};
use serde_json::Value;

#[global_allocator]
static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();

const MIB: usize = 1 << 20;

/// Heap peaks are process-wide: the tests here run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn work(mib: usize) {
    let buffer = vec![1u8; mib * MIB];
    std::hint::black_box(&buffer);
    std::thread::sleep(Duration::from_millis(40));
}

#[test]
fn report_folder_holds_stats_trace_and_timeline() {
    let _serial = serial();
    enable_memory_tracking(true);
    {
        let _outer = MemoryTracker::new("report.outer");
        track("report.stage_a", || work(4));
        std::thread::Builder::new()
            .name("report-worker".into())
            .spawn(|| track("report.worker", || work(2)))
            .unwrap()
            .join()
            .unwrap();
        track("report.stage_b", || work(8));
    }
    let stats = get_memory_stats();
    let first = stats.scopes_named("report.outer").next().unwrap().start;
    let samples = (0..5).map(|i| {
        Sample::new(
            first + Duration::from_millis(25 * i),
            Some(MIB as u64),
            ProcessMemory::read(),
        )
    });
    let dir = tempfile::tempdir().unwrap();
    let options = ReportOptions::new().samples(samples).budget(Some(64 << 20));
    let files = report::write(dir.path().join("run"), &stats, &options).unwrap();

    // stats.json: the full stats.
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(&files.stats).unwrap()).unwrap();
    let names: Vec<&str> = json["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"report.stage_b"), "{names:?}");

    // trace.json: slices, counters, order.
    let trace: Value =
        serde_json::from_str(&std::fs::read_to_string(&files.trace).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let slice = |name: &str| {
        let found: Vec<&Value> = events
            .iter()
            .filter(|e| e["ph"] == "X" && e["name"] == name)
            .collect();
        assert_eq!(found.len(), 1, "one slice named {name}");
        found[0]
    };
    let outer = slice("report.outer");
    let a = slice("report.stage_a");
    let b = slice("report.stage_b");
    let worker = slice("report.worker");
    let span = |e: &Value| {
        let ts = e["ts"].as_f64().unwrap();
        (ts, ts + e["dur"].as_f64().unwrap())
    };
    for inner in [a, b, worker] {
        assert!(span(outer).0 <= span(inner).0 && span(inner).1 <= span(outer).1);
    }
    assert!(span(a).1 <= span(worker).0 && span(worker).1 <= span(b).0);
    assert_eq!(a["tid"], outer["tid"]);
    assert_ne!(worker["tid"], outer["tid"]);
    let thread_named = events.iter().any(|e| {
        e["ph"] == "M"
            && e["name"] == "thread_name"
            && e["tid"] == worker["tid"]
            && e["args"]["name"] == "report-worker"
    });
    assert!(thread_named, "the worker's track carries its thread name");
    let delta = b["args"]["heap_peak_delta"].as_u64().unwrap();
    assert!(delta >= 8 * MIB as u64, "stage_b's peak delta {delta}");

    for (name, arg) in [
        ("heap", "live"),
        ("RSS", "anon"),
        ("RSS", "file"),
        ("budget", "bytes"),
    ] {
        assert!(
            events
                .iter()
                .any(|e| e["ph"] == "C" && e["name"] == name && e["args"][arg].is_u64()),
            "a {name} counter with {arg}"
        );
    }
    let timestamps: Vec<f64> = events
        .iter()
        .filter(|e| e["ph"] != "M")
        .map(|e| e["ts"].as_f64().unwrap())
        .collect();
    assert!(timestamps.len() > 10);
    assert!(
        timestamps.windows(2).all(|w| w[0] <= w[1]),
        "timestamps in order"
    );
    assert!(events.iter().take_while(|e| e["ph"] == "M").count() >= 3);

    // timeline.svg: well-formed, names the scopes.
    let svg = std::fs::read_to_string(&files.timeline).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text())
        .collect();
    for name in [
        "report.outer",
        "report.stage_a",
        "report.stage_b",
        "budget",
        "resident (RSS)",
        "other heap",
    ] {
        assert!(
            texts.iter().any(|t| t.contains(name)),
            "{name} in {texts:?}"
        );
    }
}

#[test]
fn a_report_of_nothing_is_still_a_report() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut stats = get_memory_stats();
    stats.scopes.clear();
    let files = report::write(dir.path(), &stats, &ReportOptions::new()).unwrap();
    let trace: Value =
        serde_json::from_str(&std::fs::read_to_string(&files.trace).unwrap()).unwrap();
    assert!(trace["traceEvents"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["ph"] != "X"));
    roxmltree::Document::parse(&std::fs::read_to_string(&files.timeline).unwrap()).unwrap();
}

#[test]
fn a_report_compared_with_itself_shows_no_difference_and_a_changed_one_shows_the_change() {
    let _serial = serial();
    enable_memory_tracking(true);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    track("compare.stage", || work(2));
    let mut stats = get_memory_stats();
    stats.scopes.retain(|r| r.name == "compare.stage");
    stats.aggregates.retain(|g| g.name == "compare.stage");
    report::write(&a, &stats, &ReportOptions::new()).unwrap();

    let same = report::compare(&a, &a).unwrap();
    assert_eq!(same.differences().count(), 0, "{same}");
    assert!(same.to_string().contains("no differences"));
    assert!(same
        .rows
        .iter()
        .any(|r| r.label == "compare.stage peak delta"));

    reset_memory_stats();
    track("compare.stage", || work(6));
    track("compare.new", || work(1));
    let mut stats = get_memory_stats();
    stats.scopes.retain(|r| r.name.starts_with("compare."));
    stats.aggregates.retain(|g| g.name.starts_with("compare."));
    report::write(&b, &stats, &ReportOptions::new()).unwrap();

    let changed = report::compare(&a, &b).unwrap();
    let row = |label: &str| changed.rows.iter().find(|r| r.label == label).unwrap();
    let grew = row("compare.stage peak delta").change().unwrap();
    assert!(
        (grew - (4 * MIB) as f64).abs() < (256 << 10) as f64,
        "the stage needs 4 MiB more: {grew}\n{changed}"
    );
    assert_eq!(row("compare.stage runs").change(), Some(0.0));
    let new = row("compare.new runs");
    assert_eq!((new.a, new.b), (None, Some(1.0)));
    assert!(changed.to_string().contains("only one"), "{changed}");

    // The same, drawn: one bar for A and one for B of each time and memory figure.
    let svg = changed.to_svg().unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
    let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
    assert!(
        texts.iter().any(|t| t.contains("compare.stage peak delta")),
        "{texts:?}"
    );
    let bars = doc.descendants().filter(|n| n.has_tag_name("rect")).count();
    let drawn = changed
        .rows
        .iter()
        .filter(|r| r.unit != report::Unit::Count)
        .map(|r| usize::from(r.a.is_some()) + usize::from(r.b.is_some()))
        .sum::<usize>();
    // The bars, the two legend boxes and the background.
    assert_eq!(bars, drawn + 3, "{svg}");
}
