//! The live heap by kind: bytes a scope tagged with a kind holds show in that kind's series,
//! measured by the allocator; bytes handed over move between kinds; the timeline stacks one
//! layer per kind present.

use std::sync::{Mutex, MutexGuard};

use memwise::kind::{self, Kind};
use memwise::report::{self, ReportOptions, Sample};
use memwise::{enable_memory_tracking, get_memory_stats, reset_memory_stats, MemoryTracker};

#[global_allocator]
static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();

const N: usize = 12 << 20;

/// Kinds are process-wide: the tests here run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn bytes_a_weights_scope_holds_show_in_the_weights_series() {
    let _serial = serial();
    enable_memory_tracking(true);
    reset_memory_stats();
    let before = kind::held();
    let weights = {
        let scope = MemoryTracker::with_kind("kinds.load", Kind::Weights);
        let buffer = vec![7u8; N];
        assert_eq!(scope.kind_bytes_so_far(), Some(N as i64));
        buffer
    };
    let after = Sample::now();
    let stats = get_memory_stats();
    let record = stats.scopes_named("kinds.load").last().unwrap();
    assert_eq!(record.kind, Some(Kind::Weights));
    assert_eq!(record.kind_bytes, Some(N as i64));

    let series = report::kind_series(&stats, &[after]);
    let last = series.last().expect("a reading with kinds");
    assert_eq!(last.kinds.weights - before.weights, N as u64);
    assert_eq!(last.kinds.activations, before.activations);
    assert_eq!(last.kinds.read_ahead, before.read_ahead);
    // The scope's entry shows the weights before, its exit with them.
    let exit = series
        .iter()
        .find(|p| p.at == record.start + record.duration)
        .unwrap();
    assert_eq!(exit.kinds.weights - before.weights, N as u64);
    assert_eq!(record.kinds_at_entry.unwrap().weights, before.weights);

    // Freed under the same kind, the bytes leave it.
    {
        let _free = MemoryTracker::with_kind("kinds.free", Kind::Weights);
        drop(weights);
    }
    assert_eq!(kind::held().weights, before.weights);
}

#[test]
fn read_ahead_on_another_thread_is_handed_over_to_weights() {
    let _serial = serial();
    enable_memory_tracking(true);
    let before = kind::held();
    let (buffer, measured) = std::thread::spawn(|| {
        let read = MemoryTracker::with_kind("kinds.read", Kind::ReadAhead);
        let buffer = vec![1u8; N];
        let measured = read.kind_bytes_so_far().unwrap();
        (buffer, measured)
    })
    .join()
    .unwrap();
    assert_eq!(measured, N as i64);
    assert_eq!(kind::held().read_ahead - before.read_ahead, N as u64);

    kind::hand_over(Kind::ReadAhead, Kind::Weights, measured as u64);
    let now = kind::held();
    assert_eq!(now.read_ahead, before.read_ahead);
    assert_eq!(now.weights - before.weights, N as u64);

    // A computation's output kept as a KV cache is adopted by it, and nested kinds give the
    // bytes to the innermost.
    let cache = {
        let _compute = kind::enter(Kind::Activations);
        let keys = vec![2u8; N];
        let scratch = {
            let _inner = kind::enter(Kind::KvCache);
            vec![3u8; 1 << 20]
        };
        kind::adopt(Kind::KvCache, N as u64);
        (keys, scratch)
    };
    let now = kind::held();
    assert_eq!(now.activations, before.activations);
    assert_eq!(now.kv_cache - before.kv_cache, (N + (1 << 20)) as u64);
    {
        let _free = kind::enter(Kind::Weights);
        drop(buffer);
    }
    {
        let _free = kind::enter(Kind::KvCache);
        drop(cache);
    }
    assert_eq!(kind::held(), before);
}

#[test]
fn nothing_is_attributed_while_tracking_is_off() {
    let _serial = serial();
    enable_memory_tracking(false);
    let before = kind::held();
    let guard = kind::enter(Kind::Activations);
    assert_eq!(guard.kind(), None);
    let buffer = vec![0u8; N];
    drop(guard);
    assert_eq!(kind::held(), before);
    drop(buffer);
    enable_memory_tracking(true);
}

#[test]
fn the_timeline_stacks_one_layer_per_kind_present() {
    let _serial = serial();
    enable_memory_tracking(true);
    reset_memory_stats();
    let base = kind::held();
    let weights = {
        let _w = MemoryTracker::with_kind("kinds.weights", Kind::Weights);
        vec![1u8; N]
    };
    let activations = {
        let _a = MemoryTracker::with_kind("kinds.compute", Kind::Activations);
        vec![1u8; N / 2]
    };
    let stats = get_memory_stats();
    let dir = tempfile::tempdir().unwrap();
    let options = ReportOptions::new().budget(Some(64 << 20));
    let files = report::write(dir.path(), &stats, &options).unwrap();
    let svg = std::fs::read_to_string(&files.timeline).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
    let texts: Vec<&str> = doc
        .descendants()
        .filter_map(|n| n.text())
        .map(str::trim)
        .collect();
    let series = report::kind_series(&stats, &[]);
    let present = |f: fn(&memwise::kind::KindBytes) -> u64| series.iter().any(|p| f(&p.kinds) > 0);
    let mut layers = vec![];
    for (label, shown) in [
        ("weights", present(|k| k.weights)),
        ("read-ahead", present(|k| k.read_ahead)),
        ("KV cache", present(|k| k.kv_cache)),
        ("activations", present(|k| k.activations)),
        ("other heap", series.iter().any(|p| p.other > 0)),
    ] {
        assert_eq!(
            texts.contains(&label),
            shown,
            "{label} in the legend: {texts:?}"
        );
        if shown {
            layers.push(label);
        }
    }
    assert!(layers.contains(&"weights") && layers.contains(&"activations"));
    assert_eq!(base.read_ahead == 0, !layers.contains(&"read-ahead"));
    // One filled area per layer.
    let areas = doc
        .descendants()
        .filter(|n| n.has_tag_name("polygon"))
        .count();
    assert_eq!(areas, layers.len(), "{svg}");
    drop((weights, activations));
}
