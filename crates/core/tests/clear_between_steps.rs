//! `ClearOptions::between_steps()` trims the heap but keeps the blocks a `BlockCache` holds
//! for the next step; the default cleanup gives them back too.

use memwise::alloc::{block_cache_bytes, set_block_cache_capacity};
use memwise::{clear_memory, clear_memory_with, BlockCache, ClearOptions, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator<BlockCache> = TrackingAllocator::new(BlockCache::new());

#[test]
fn cleanup_between_steps_keeps_the_block_cache_and_the_default_releases_it() {
    set_block_cache_capacity(64 << 20);
    // A freed block of 8 MiB (cached blocks are 1 MiB or more) stays in the cache.
    drop(std::hint::black_box(vec![1u8; 8 << 20]));
    let cached = block_cache_bytes();
    assert!(cached >= 8 << 20, "the cache holds {cached} bytes");

    let report = clear_memory_with((), ClearOptions::between_steps());
    assert!(report.trimmed || cfg!(not(all(target_os = "linux", target_env = "gnu"))));
    assert_eq!(block_cache_bytes(), cached, "between steps the cache stays");

    clear_memory(());
    assert_eq!(
        block_cache_bytes(),
        0,
        "the default cleanup releases the cache"
    );
}
