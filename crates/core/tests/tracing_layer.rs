//! The tracing layer: an `#[instrument]`ed function gets a scope record with its peak.

use memwise::tracing_layer::MemoryLayer;
use memwise::{enable_memory_tracking, get_memory_stats};
use tracing_subscriber::layer::SubscriberExt as _;

#[global_allocator]
static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();

const MIB: usize = 1 << 20;

#[tracing::instrument]
fn allocate_and_free(mib: usize) -> usize {
    let buffer = vec![1u8; mib * MIB];
    let sum = std::hint::black_box(&buffer).len();
    drop(buffer);
    sum
}

#[tracing::instrument]
fn outer() -> usize {
    allocate_and_free(8) + allocate_and_free(24)
}

#[test]
fn an_instrumented_function_gets_a_scope_with_its_peak() {
    enable_memory_tracking(true);
    let subscriber = tracing_subscriber::registry().with(MemoryLayer::new());
    tracing::subscriber::with_default(subscriber, || {
        assert_eq!(outer(), 32 * MIB);
    });
    let stats = get_memory_stats();
    let inner: Vec<_> = stats.scopes_named("allocate_and_free").collect();
    assert_eq!(inner.len(), 2);
    let peaks: Vec<u64> = inner.iter().map(|r| r.heap_peak_delta().unwrap()).collect();
    for (peak, mib) in peaks.iter().zip([8u64, 24]) {
        let expected = mib * MIB as u64;
        assert!(
            *peak >= expected && *peak < expected + (MIB as u64 / 4),
            "peak {peak} for a {mib} MiB buffer"
        );
    }
    let outer = stats.scopes_named("outer").next().unwrap();
    assert!(inner.iter().all(|r| r.parent == Some(outer.id)));
    assert!(outer.heap_peak_delta().unwrap() >= 24 * MIB as u64);
    assert!(outer.heap_retained().unwrap().unsigned_abs() < MIB as u64 / 4);
}
