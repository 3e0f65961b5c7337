//! `BlockCache`: keep large freed blocks for the next allocation of the same size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Blocks smaller than this are never cached: the C allocator reuses small blocks itself.
pub const BLOCK_CACHE_MIN: usize = 1 << 20;

/// Blocks of at most this alignment are cached (all a tensor needs).
const MAX_ALIGN: usize = 4096;
const SLOTS: usize = 64;

/// A global allocator over the system allocator that keeps large freed blocks for reuse.
///
/// Streaming a model allocates the same tensor sizes layer after layer. Giving each freed
/// layer back to the OS and asking for fresh pages for the next one costs a page fault per
/// 4 KiB: on a 2-core VM, first-touching 2 GiB takes about 2 s, more than reading it from
/// the page cache. The cache keeps freed blocks of at least [`BLOCK_CACHE_MIN`] bytes, up
/// to a byte capacity, and hands them back for an allocation of exactly the same size and
/// alignment: already resident, no fault. The capacity starts at 0 (off); set it with
/// [`set_block_cache_capacity`] to about one layer. [`clear_memory`](crate::clear_memory)
/// empties it, so cached blocks are never memory the user cannot get back.
///
/// Install it under the tracking allocator:
///
/// ```
/// use memwise::{BlockCache, TrackingAllocator};
///
/// #[global_allocator]
/// static ALLOC: TrackingAllocator<BlockCache> = TrackingAllocator::new(BlockCache::new());
/// ```
///
/// The heap figures then count cached blocks as freed (no program holds them), while RSS
/// includes them; [`block_cache_bytes`] says how much that is.
#[derive(Debug, Default, Clone, Copy)]
pub struct BlockCache;

impl BlockCache {
    /// The cache (its state is process-wide; capacity 0 until set).
    pub const fn new() -> Self {
        BlockCache
    }
}

struct Slot {
    ptr: AtomicUsize,
    size: AtomicUsize,
    align: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialize the array
const EMPTY: Slot = Slot {
    ptr: AtomicUsize::new(0),
    size: AtomicUsize::new(0),
    align: AtomicUsize::new(0),
};

static SLOT_TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
static CACHED: AtomicUsize = AtomicUsize::new(0);
static CAPACITY: AtomicUsize = AtomicUsize::new(0);
/// Guards the slot table. Taken only for blocks of 1 MiB or more, which are rare next to
/// the work done with them, and held for a scan of 64 slots; a spin lock needs no
/// allocation, so it is safe inside the allocator.
static LOCK: AtomicBool = AtomicBool::new(false);

struct Guard;

impl Guard {
    fn lock() -> Guard {
        while LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        Guard
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        LOCK.store(false, Ordering::Release);
    }
}

fn cacheable(layout: Layout) -> bool {
    layout.size() >= BLOCK_CACHE_MIN && layout.align() <= MAX_ALIGN
}

/// Takes a cached block of exactly this layout, if there is one.
fn take(layout: Layout) -> Option<*mut u8> {
    if CACHED.load(Ordering::Relaxed) == 0 {
        return None;
    }
    let _guard = Guard::lock();
    for slot in &SLOT_TABLE {
        let ptr = slot.ptr.load(Ordering::Relaxed);
        if ptr != 0
            && slot.size.load(Ordering::Relaxed) == layout.size()
            && slot.align.load(Ordering::Relaxed) == layout.align()
        {
            slot.ptr.store(0, Ordering::Relaxed);
            CACHED.fetch_sub(layout.size(), Ordering::Relaxed);
            return Some(ptr as *mut u8);
        }
    }
    None
}

/// Keeps a freed block if it fits the capacity and a slot is free.
fn keep(ptr: *mut u8, layout: Layout) -> bool {
    let capacity = CAPACITY.load(Ordering::Relaxed);
    if CACHED.load(Ordering::Relaxed) + layout.size() > capacity {
        return false;
    }
    let _guard = Guard::lock();
    if CACHED.load(Ordering::Relaxed) + layout.size() > capacity {
        return false;
    }
    for slot in &SLOT_TABLE {
        if slot.ptr.load(Ordering::Relaxed) == 0 {
            slot.size.store(layout.size(), Ordering::Relaxed);
            slot.align.store(layout.align(), Ordering::Relaxed);
            slot.ptr.store(ptr as usize, Ordering::Relaxed);
            CACHED.fetch_add(layout.size(), Ordering::Relaxed);
            return true;
        }
    }
    false
}

// SAFETY: every block handed out was allocated by `System` with exactly the requested
// layout (fresh, or cached after a free of that same layout), and every block is given
// back to `System` with the layout it was allocated with.
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if cacheable(layout) {
            if let Some(ptr) = take(layout) {
                return ptr;
            }
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if cacheable(layout) {
            if let Some(ptr) = take(layout) {
                // Writing zeros to resident pages is still far cheaper than faulting in
                // fresh ones.
                std::ptr::write_bytes(ptr, 0, layout.size());
                return ptr;
            }
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if !(cacheable(layout) && keep(ptr, layout)) {
            System.dealloc(ptr, layout);
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Every block came from System with `layout`, so System can resize it.
        System.realloc(ptr, layout, new_size)
    }
}

/// Sets how many bytes of freed blocks the [`BlockCache`] may keep (0 turns it off and
/// releases what it holds). About the size of one streamed layer is right.
pub fn set_block_cache_capacity(bytes: usize) {
    CAPACITY.store(bytes, Ordering::Relaxed);
    if bytes == 0 {
        release_block_cache();
    }
}

/// How many bytes the [`BlockCache`] may keep.
pub fn block_cache_capacity() -> usize {
    CAPACITY.load(Ordering::Relaxed)
}

/// Bytes of freed blocks the [`BlockCache`] holds now.
pub fn block_cache_bytes() -> usize {
    CACHED.load(Ordering::Relaxed)
}

/// Gives every cached block back to the system allocator. Returns the bytes released.
pub fn release_block_cache() -> usize {
    if CACHED.load(Ordering::Relaxed) == 0 {
        return 0;
    }
    let _guard = Guard::lock();
    let mut released = 0;
    for slot in &SLOT_TABLE {
        let ptr = slot.ptr.swap(0, Ordering::Relaxed);
        if ptr != 0 {
            let size = slot.size.load(Ordering::Relaxed);
            let align = slot.align.load(Ordering::Relaxed);
            // SAFETY: the slot held a block System allocated with this size and alignment
            // (a valid layout, as it came from one), and no one else owns it.
            unsafe {
                System.dealloc(
                    ptr as *mut u8,
                    Layout::from_size_align_unchecked(size, align),
                )
            };
            released += size;
        }
    }
    CACHED.fetch_sub(released, Ordering::Relaxed);
    released
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the cache state is process-wide.
    #[test]
    fn reuses_exact_sizes_within_capacity_and_releases_everything() {
        let cache = BlockCache::new();
        let big = Layout::from_size_align(4 << 20, 64).unwrap();
        let other = Layout::from_size_align(3 << 20, 64).unwrap();
        unsafe {
            // Capacity 0: nothing is kept.
            let a = cache.alloc(big);
            cache.dealloc(a, big);
            assert_eq!(block_cache_bytes(), 0);

            set_block_cache_capacity(6 << 20);
            let a = cache.alloc(big);
            a.write(7);
            cache.dealloc(a, big);
            assert_eq!(block_cache_bytes(), 4 << 20);
            // A different size is not served from the cache, and does not fit beside it.
            let b = cache.alloc(other);
            assert_ne!(b, a);
            cache.dealloc(b, other);
            assert_eq!(
                block_cache_bytes(),
                4 << 20,
                "over capacity: freed, not kept"
            );
            // The same size gets the same block back.
            let c = cache.alloc_zeroed(big);
            assert_eq!(c, a);
            assert_eq!(c.read(), 0, "alloc_zeroed zeroes a reused block");
            assert_eq!(block_cache_bytes(), 0);
            cache.dealloc(c, big);
            assert_eq!(release_block_cache(), 4 << 20);
            assert_eq!(block_cache_bytes(), 0);
            set_block_cache_capacity(0);
        }
    }
}
