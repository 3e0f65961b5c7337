//! Scope bookkeeping: tracking off records nothing, the record buffer is bounded and
//! counts what it drops, aggregates see everything, and device pools are folded into the
//! scopes open while they peak.

use std::sync::{Arc, Mutex};

use memwise::device::{register_device, unregister_device, DeviceMemory, DeviceUsage};
use memwise::scope::{set_record_capacity, DEFAULT_RECORD_CAPACITY};
use memwise::{
    enable_memory_tracking, get_memory_stats, reset_memory_stats, track, Error, MemoryTracker,
};

/// A device pool simulated in memory: what a CUDA caching allocator reports.
#[derive(Default)]
struct FakePool {
    state: Mutex<(u64, u64, u64, u64)>, // used, reserved, peak used, peak reserved
}

impl FakePool {
    fn set_used(&self, used: u64) {
        let mut s = self.state.lock().unwrap();
        s.0 = used;
        s.1 = s.1.max(used);
        s.2 = s.2.max(used);
        s.3 = s.3.max(s.1);
    }
}

impl DeviceMemory for FakePool {
    fn name(&self) -> &str {
        "fake:0"
    }
    fn usage(&self) -> Result<DeviceUsage, Error> {
        let s = self.state.lock().unwrap();
        Ok(DeviceUsage::new("fake:0", s.0, s.1).with_peaks(s.2, s.3))
    }
    fn reset_peaks(&self) -> Result<(), Error> {
        let mut s = self.state.lock().unwrap();
        s.2 = s.0;
        s.3 = s.1;
        Ok(())
    }
    fn empty_cache(&self) -> Result<u64, Error> {
        let mut s = self.state.lock().unwrap();
        let freed = s.1 - s.0;
        s.1 = s.0;
        Ok(freed)
    }
}

// The tests share the process-wide registry, so they run in sequence from one test.
#[test]
fn scope_bookkeeping() {
    tracking_off_records_nothing();
    record_buffer_is_bounded_and_counts_drops();
    device_peaks_are_folded_per_scope();
}

fn tracking_off_records_nothing() {
    enable_memory_tracking(false);
    let scope = MemoryTracker::new("ignored");
    assert!(!scope.is_recording());
    drop(scope);
    track("ignored too", || ());
    let stats = get_memory_stats();
    assert!(stats.scopes.is_empty() && stats.aggregates.is_empty());
    assert!(!stats.tracking_enabled);
}

fn record_buffer_is_bounded_and_counts_drops() {
    enable_memory_tracking(true);
    set_record_capacity(3);
    for i in 0..5u64 {
        track(format!("batch_{}", i % 2), || ());
    }
    let stats = get_memory_stats();
    assert_eq!(stats.scopes.len(), 3);
    assert_eq!(stats.dropped_records, 2);
    let names: Vec<_> = stats.scopes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        ["batch_0", "batch_1", "batch_0"],
        "the oldest are dropped"
    );
    let counts: Vec<_> = stats
        .aggregates
        .iter()
        .map(|a| (a.name.as_str(), a.count))
        .collect();
    assert_eq!(
        counts,
        [("batch_0", 3), ("batch_1", 2)],
        "aggregates keep dropped records"
    );
    set_record_capacity(DEFAULT_RECORD_CAPACITY);
    reset_memory_stats();
}

fn device_peaks_are_folded_per_scope() {
    let pool = Arc::new(FakePool::default());
    register_device(pool.clone());
    pool.set_used(100);
    {
        let _outer = MemoryTracker::new("outer");
        {
            let _inner = MemoryTracker::new("inner");
            pool.set_used(1_000); // a transient spike inside the inner scope
            pool.set_used(200);
        }
        {
            let _later = MemoryTracker::new("later");
            pool.set_used(300);
        }
        pool.set_used(100);
    }
    let stats = get_memory_stats();
    let get = |name| stats.scopes_named(name).next().expect(name).clone();
    let (outer, inner, later) = (get("outer"), get("inner"), get("later"));
    let dev = |r: &memwise::scope::ScopeRecord| r.devices[0].clone();
    assert_eq!(
        (dev(&inner).used_at_entry, dev(&inner).peak_used),
        (100, 1_000)
    );
    assert_eq!(dev(&inner).used_at_exit, 200);
    assert_eq!(
        dev(&later).peak_used,
        300,
        "the earlier spike must not leak into a later scope"
    );
    assert_eq!(dev(&outer).peak_used, 1_000);
    assert_eq!(stats.peak_gpu_mb(), Some(1_000.0 / 1048576.0));
    assert_eq!(stats.current_gpu_mb(), Some(100.0 / 1048576.0));

    let report = memwise::clear_memory_with((), memwise::ClearOptions::with_device_cache());
    assert_eq!(report.freed.device_reserved, Some(900));
    assert!(unregister_device("fake:0"));
    assert_eq!(
        get_memory_stats().peak_gpu_mb(),
        None,
        "no device: unavailable, not 0"
    );
}
