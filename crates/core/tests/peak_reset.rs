//! `reset_peak_memory` restarts every high-water mark: the heap peak and the kernel's
//! resident peak (`VmHWM`, through `/proc/self/clear_refs`).

use memwise::{clear_memory, get_memory_stats, reset_peak_memory, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

#[test]
fn reset_restarts_heap_and_resident_peaks() {
    let mut spike = vec![0u8; 128 << 20];
    spike.iter_mut().step_by(4096).for_each(|b| *b = 1);
    clear_memory(spike);

    let before = get_memory_stats();
    let heap_peak = before.heap.as_ref().unwrap().peak;
    assert!(heap_peak >= 128 << 20);
    assert!(before.process.unwrap().rss_peak >= 128 << 20);

    reset_peak_memory();
    let after = get_memory_stats();
    let heap = after.heap.unwrap();
    assert!(
        heap.peak < 16 << 20,
        "heap peak restarted near the live heap: {heap:?}"
    );
    assert!(heap.peak >= heap.current);
    let rss = after.process.unwrap();
    assert!(
        rss.rss_peak < 96 << 20,
        "VmHWM restarted at the current RSS: {rss:?}"
    );
}
