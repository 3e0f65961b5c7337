//! Without the tracking allocator, heap figures are unavailable (not 0) and the MiB
//! accessors fall back to process RSS.

use memwise::get_memory_stats;

#[test]
fn heap_figures_are_unavailable_without_the_tracking_allocator() {
    let stats = get_memory_stats();
    assert!(stats.heap.is_none());
    assert!(!memwise::alloc::tracking_allocator_installed());
    let process = stats.process.expect("Linux has /proc/self/status");
    assert_eq!(
        stats.peak_cpu_mb(),
        Some(process.rss_peak as f64 / 1048576.0)
    );
    assert!(stats.current_cpu_mb().unwrap() > 0.0);
    assert_eq!(stats.peak_gpu_mb(), None);
    assert!(stats.to_json().contains("\"heap\": null"));
}
