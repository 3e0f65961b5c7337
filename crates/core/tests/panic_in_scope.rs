//! A panic inside a tracked scope, while the tracking allocator counts, leaves nothing
//! stuck: the heap counters keep counting and the next scope records its exact peak.

#[global_allocator]
static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();

use memwise::alloc::heap_totals;
use memwise::{enable_memory_tracking, get_memory_stats, track};

const MIB: usize = 1 << 20;

#[test]
fn a_panic_inside_a_tracked_allocation_path_does_not_leave_tracking_stuck() {
    enable_memory_tracking(true);
    let unwound = std::panic::catch_unwind(|| {
        track("panics", || {
            let held = vec![1u8; 4 * MIB];
            std::hint::black_box(&held);
            panic!("the workload failed");
        })
    });
    assert!(unwound.is_err());

    // The unwound scope was closed and recorded, with the buffer it held at its peak.
    let stats = get_memory_stats();
    let failed = stats
        .scopes_named("panics")
        .last()
        .expect("recorded")
        .clone();
    assert!(failed.heap_peak_delta().unwrap() >= 4 * MIB as u64);

    // Counting goes on: a new allocation shows in the totals and in the next scope.
    let before = heap_totals().live_bytes();
    let peak = track("after", || {
        let buffer = vec![2u8; 8 * MIB];
        let grew = heap_totals().live_bytes() - before;
        drop(std::hint::black_box(buffer));
        grew
    });
    assert!(peak >= 8 * MIB as i64, "live bytes grew by {peak}");
    let stats = get_memory_stats();
    let after = stats.scopes_named("after").last().expect("recorded");
    assert!(after.heap_peak_delta().unwrap() >= 8 * MIB as u64);
    assert!(memwise::scope::memory_tracking_enabled());
}
