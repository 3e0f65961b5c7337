//! A scope's peak is the true maximum of live heap while it was open, including spikes
//! freed before it closed and spikes made on other threads. One test per file: the
//! counters are process-wide.

use memwise::{enable_memory_tracking, get_memory_stats, MemoryTracker, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

const MIB: u64 = 1 << 20;

fn spike(bytes: usize) {
    let mut buffer = vec![0u8; bytes];
    // Touch every page: the spike is resident, not only reserved.
    buffer.iter_mut().step_by(4096).for_each(|b| *b = 1);
    std::hint::black_box(&buffer);
}

#[test]
fn scope_peaks_catch_spikes_inside_nested_scopes_and_on_rayon_workers() {
    enable_memory_tracking(true);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| ()); // start the workers outside the scopes

    {
        let _outer = MemoryTracker::new("outer");
        let kept = vec![7u8; 8 << 20];
        {
            let _inner = MemoryTracker::new("inner");
            spike(256 << 20);
        }
        {
            let _worker = MemoryTracker::new("on_worker");
            // The spike happens on a rayon worker while this thread's scope is open.
            pool.install(|| spike(64 << 20));
        }
        drop(kept);
    }

    let stats = get_memory_stats();
    let get = |name| stats.scopes_named(name).next().expect(name).clone();
    let (outer, inner, worker) = (get("outer"), get("inner"), get("on_worker"));

    // The heap is the whole process's: the test harness's own threads may allocate a few
    // bytes meanwhile, so allow that much, far below the spike.
    let (entry, exit) = (inner.heap_at_entry.unwrap(), inner.heap_at_exit.unwrap());
    assert!(
        entry.abs_diff(exit) < 64 << 10,
        "the spike was freed inside the scope: {entry} at entry, {exit} at exit"
    );
    assert!(inner.heap_peak_delta().unwrap() >= 256 * MIB, "{inner:?}");
    assert!(inner.heap_peak.unwrap() <= outer.heap_peak.unwrap());
    assert!(
        outer.heap_peak_delta().unwrap() >= 264 * MIB,
        "outer holds 8 MiB + the spike"
    );
    assert_eq!(inner.parent, Some(outer.id));
    assert_eq!(outer.parent, None);
    assert!(worker.heap_peak_delta().unwrap() >= 64 * MIB, "{worker:?}");
    assert!(
        worker.heap_peak_delta().unwrap() < 256 * MIB,
        "the earlier spike leaked in"
    );

    let rss_in = inner.rss_at_entry.expect("/proc is readable on Linux");
    assert!(rss_in.rss > 0);
    let agg = stats.aggregates.iter().find(|a| a.name == "inner").unwrap();
    assert_eq!(agg.count, 1);
    assert_eq!(agg.max_heap_peak_delta, inner.heap_peak_delta());
}
