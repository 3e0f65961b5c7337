//! The tracking global allocator, its process-wide heap counters, and the [`BlockCache`]
//! that can sit under it.
//!
//! Counting every allocation with shared atomics costs a contended cache line per call. We
//! count small allocations in thread-local cells instead and fold them into the shared
//! counters in batches. The rules that bound the error:
//!
//! * an allocation, reallocation or free of [`EXACT_THRESHOLD`] bytes or more folds the
//!   thread's pending figures and itself into the shared counters at once;
//! * a thread folds whenever its pending live-byte delta reaches [`FLUSH_BYTES`] in either
//!   direction, and every [`FLUSH_OPS`] operations;
//! * a thread folds at every scope boundary, when it reads the stats, and when it exits.
//!
//! So at any instant the shared live-byte figure differs from the truth by less than
//! `FLUSH_BYTES` for each thread that has allocated since its last fold, and a peak is missed
//! by at most that much. Once threads have exited (or folded), the figures are exact.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub use crate::block_cache::{
    block_cache_bytes, block_cache_capacity, release_block_cache, set_block_cache_capacity,
    BlockCache, BLOCK_CACHE_MIN,
};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

/// Allocations, reallocations and frees of at least this many bytes are counted in the
/// shared counters immediately, so large buffers are always exact.
pub const EXACT_THRESHOLD: usize = 64 * 1024;

/// A thread folds its pending small-allocation delta into the shared counters once it
/// reaches this many bytes. This is the per-thread bound on the live-byte error.
pub const FLUSH_BYTES: i64 = 16 * 1024;

/// A thread folds its pending counts at least every this many operations of each kind, so
/// totals seen from other threads lag by a bounded amount even when the live delta stays
/// small. A power of two.
pub const FLUSH_OPS: u32 = 4096;

/// A global allocator that counts live heap bytes, their high-water mark, and totals of
/// allocations, reallocations and frees.
///
/// A library cannot choose the allocator of the program that uses it, so the binary opts in
/// with one line:
///
/// ```
/// #[global_allocator]
/// static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();
/// ```
///
/// It wraps any inner allocator (`System` by default). `realloc` and `alloc_zeroed` forward
/// to the inner allocator, so in-place growth and lazily zeroed pages keep working. The hooks
/// never allocate, lock or log. Without it installed, [`get_memory_stats`](crate::get_memory_stats)
/// marks the heap figures unavailable and falls back to process RSS.
#[derive(Debug, Default)]
pub struct TrackingAllocator<A = System> {
    inner: A,
}

impl TrackingAllocator<System> {
    /// The tracking allocator over the system allocator.
    pub const fn system() -> Self {
        TrackingAllocator { inner: System }
    }
}

impl<A> TrackingAllocator<A> {
    /// Wraps `inner`, counting everything that passes through it.
    pub const fn new(inner: A) -> Self {
        TrackingAllocator { inner }
    }
}

// SAFETY: every method forwards to the inner allocator with the caller's arguments unchanged
// and only updates counters afterwards, so the inner allocator's guarantees carry over.
unsafe impl<A: GlobalAlloc> GlobalAlloc for TrackingAllocator<A> {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = self.inner.alloc(layout);
        if !ptr.is_null() {
            record(Op::Alloc, layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let ptr = self.inner.alloc_zeroed(layout);
        if !ptr.is_null() {
            record(Op::Alloc, layout.size());
        }
        ptr
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.inner.dealloc(ptr, layout);
        record(Op::Free, layout.size());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = self.inner.realloc(ptr, layout, new_size);
        if !new.is_null() {
            record(Op::Realloc(layout.size()), new_size);
        }
        new
    }
}

/// Heap totals: what has passed through the [`TrackingAllocator`].
///
/// Reallocation counts once in `reallocations`; growth adds to `allocated_bytes` and
/// shrinkage to `freed_bytes`, so `allocated_bytes - freed_bytes` is the live heap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct HeapTotals {
    /// Calls to `alloc` and `alloc_zeroed` that succeeded.
    pub allocations: u64,
    /// Calls to `dealloc`.
    pub frees: u64,
    /// Calls to `realloc` that succeeded.
    pub reallocations: u64,
    /// Bytes handed out, including growth by `realloc`.
    pub allocated_bytes: u64,
    /// Bytes given back, including shrinkage by `realloc`.
    pub freed_bytes: u64,
}

impl HeapTotals {
    /// Live bytes these totals account for (`allocated_bytes - freed_bytes`).
    pub fn live_bytes(&self) -> i64 {
        self.allocated_bytes as i64 - self.freed_bytes as i64
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &HeapTotals) -> HeapTotals {
        HeapTotals {
            allocations: self.allocations - earlier.allocations,
            frees: self.frees - earlier.frees,
            reallocations: self.reallocations - earlier.reallocations,
            allocated_bytes: self.allocated_bytes - earlier.allocated_bytes,
            freed_bytes: self.freed_bytes - earlier.freed_bytes,
        }
    }
}

#[derive(Clone, Copy)]
enum Op {
    Alloc,
    Free,
    /// A reallocation from the given old size.
    Realloc(usize),
}

/// One cache line per shared counter so threads folding different counters do not contend.
#[repr(align(128))]
struct Padded<T>(T);

static LIVE: Padded<AtomicI64> = Padded(AtomicI64::new(0));
/// High-water mark of `LIVE` since the last scope boundary (see `crate::scope`).
static MARK: Padded<AtomicI64> = Padded(AtomicI64::new(0));
static ALLOCATIONS: Padded<AtomicU64> = Padded(AtomicU64::new(0));
static FREES: AtomicU64 = AtomicU64::new(0);
static REALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static ALLOCATED_BYTES: AtomicU64 = AtomicU64::new(0);
static FREED_BYTES: AtomicU64 = AtomicU64::new(0);
/// Set the first time any thread counts anything: the allocator is installed.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// A thread's counters. They are cumulative for the thread's whole life; `folded` remembers
/// how much of them the shared counters already hold.
struct Local {
    allocations: Cell<u64>,
    frees: Cell<u64>,
    reallocations: Cell<u64>,
    allocated_bytes: Cell<u64>,
    freed_bytes: Cell<u64>,
    /// The counters above as of the last fold.
    folded: Cell<[u64; 5]>,
    /// `allocated_bytes - freed_bytes` as of the last fold; kept apart so the hot path
    /// computes the pending live delta with one load.
    folded_live: Cell<i64>,
}

impl Local {
    const fn new() -> Self {
        Local {
            allocations: Cell::new(0),
            frees: Cell::new(0),
            reallocations: Cell::new(0),
            allocated_bytes: Cell::new(0),
            freed_bytes: Cell::new(0),
            folded: Cell::new([0; 5]),
            folded_live: Cell::new(0),
        }
    }

    fn totals(&self) -> HeapTotals {
        HeapTotals {
            allocations: self.allocations.get(),
            frees: self.frees.get(),
            reallocations: self.reallocations.get(),
            allocated_bytes: self.allocated_bytes.get(),
            freed_bytes: self.freed_bytes.get(),
        }
    }

    /// Live bytes this thread added since its last fold (negative if it freed more).
    #[inline(always)]
    fn pending(&self) -> i64 {
        self.allocated_bytes
            .get()
            .wrapping_sub(self.freed_bytes.get()) as i64
            - self.folded_live.get()
    }

    /// Moves everything not yet folded into the shared counters.
    fn fold(&self) {
        let now = [
            self.allocations.get(),
            self.frees.get(),
            self.reallocations.get(),
            self.allocated_bytes.get(),
            self.freed_bytes.get(),
        ];
        let before = self.folded.replace(now);
        let pending = self.pending();
        self.folded_live.set(now[3].wrapping_sub(now[4]) as i64);
        fold_shared(
            [
                now[0] - before[0],
                now[1] - before[1],
                now[2] - before[2],
                now[3] - before[3],
                now[4] - before[4],
            ],
            pending,
        );
    }
}

thread_local! {
    // No destructor, so access is a plain TLS offset with no lazy-registration check.
    static LOCAL: Local = const { Local::new() };
    // Set while this thread is inside the allocator's slow path: anything allocated then
    // (only possible while registering the exit guard) is counted without re-entering it.
    static IN_SLOW_PATH: Cell<bool> = const { Cell::new(false) };
    static EXIT_GUARD: ExitGuard = const { ExitGuard };
}

/// Folds the thread's pending figures when the thread exits, so nothing is lost.
struct ExitGuard;

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let _ = LOCAL.try_with(Local::fold);
    }
}

fn fold_shared(counts: [u64; 5], live_delta: i64) {
    // Relaxed is enough: each counter is a sum, and readers want a recent value, not an
    // ordering with other memory.
    if counts[0] != 0 {
        ALLOCATIONS.0.fetch_add(counts[0], Ordering::Relaxed);
    }
    if counts[1] != 0 {
        FREES.fetch_add(counts[1], Ordering::Relaxed);
    }
    if counts[2] != 0 {
        REALLOCATIONS.fetch_add(counts[2], Ordering::Relaxed);
    }
    if counts[3] != 0 {
        ALLOCATED_BYTES.fetch_add(counts[3], Ordering::Relaxed);
    }
    if counts[4] != 0 {
        FREED_BYTES.fetch_add(counts[4], Ordering::Relaxed);
    }
    if live_delta != 0 {
        let live = LIVE.0.fetch_add(live_delta, Ordering::Relaxed) + live_delta;
        if live_delta > 0 && live > MARK.0.load(Ordering::Relaxed) {
            MARK.0.fetch_max(live, Ordering::Relaxed);
        }
    }
}

/// Operation counts at which a thread folds: the first operation of each kind (which also
/// registers the exit guard) and every `FLUSH_OPS` after it.
const FOLD_MASK: u64 = FLUSH_OPS as u64 - 1;

#[inline(always)]
fn record(op: Op, size: usize) {
    // `try_with` only fails during thread teardown after LOCAL was destroyed, which cannot
    // happen to a TLS value without a destructor; the fallback keeps the count regardless.
    let counted = LOCAL.try_with(|local| {
        // The hot path: two counter updates and one branch on three cheap conditions.
        let fold = match op {
            Op::Alloc => {
                let n = local.allocations.get() + 1;
                local.allocations.set(n);
                local
                    .allocated_bytes
                    .set(local.allocated_bytes.get() + size as u64);
                size >= EXACT_THRESHOLD || local.pending() >= FLUSH_BYTES || n & FOLD_MASK == 1
            }
            Op::Free => {
                let n = local.frees.get() + 1;
                local.frees.set(n);
                local.freed_bytes.set(local.freed_bytes.get() + size as u64);
                size >= EXACT_THRESHOLD || local.pending() <= -FLUSH_BYTES || n & FOLD_MASK == 1
            }
            Op::Realloc(old) => {
                let n = local.reallocations.get() + 1;
                local.reallocations.set(n);
                if size >= old {
                    let grow = (size - old) as u64;
                    local
                        .allocated_bytes
                        .set(local.allocated_bytes.get() + grow);
                } else {
                    let shrink = (old - size) as u64;
                    local.freed_bytes.set(local.freed_bytes.get() + shrink);
                }
                size.max(old) >= EXACT_THRESHOLD
                    || local.pending().abs() >= FLUSH_BYTES
                    || n & FOLD_MASK == 1
            }
        };
        if fold {
            slow_path(local);
        }
    });
    if counted.is_err() {
        count_shared_only(op, size);
    }
}

#[cold]
#[inline(never)]
fn slow_path(local: &Local) {
    // Re-entered while registering the exit guard: the outer fold covers this too.
    let Some(_guard) = SlowPath::enter() else {
        return;
    };
    INSTALLED.store(true, Ordering::Relaxed);
    // The first touch registers the destructor (glibc's __cxa_thread_atexit_impl allocates
    // with its own malloc, not through us; on other platforms it may allocate through us,
    // which IN_SLOW_PATH turns into plain counting). Later touches are a flag check.
    let _ = EXIT_GUARD.try_with(|_| ());
    local.fold();
}

/// This thread's claim on the slow path: holding it sets `IN_SLOW_PATH`, dropping it
/// (unwinding included) clears it, so a panic inside can never leave the thread counting
/// in plain mode for good.
struct SlowPath(());

impl SlowPath {
    /// Claims the slow path, or `None` when this thread already holds it (re-entry).
    fn enter() -> Option<SlowPath> {
        (!IN_SLOW_PATH.replace(true)).then_some(SlowPath(()))
    }
}

impl Drop for SlowPath {
    fn drop(&mut self) {
        IN_SLOW_PATH.set(false);
    }
}

#[cold]
fn count_shared_only(op: Op, size: usize) {
    let mut counts = [0u64; 5];
    let delta = match op {
        Op::Alloc => {
            counts[0] = 1;
            counts[3] = size as u64;
            size as i64
        }
        Op::Free => {
            counts[1] = 1;
            counts[4] = size as u64;
            -(size as i64)
        }
        Op::Realloc(old) => {
            counts[2] = 1;
            if size >= old {
                counts[3] = (size - old) as u64;
            } else {
                counts[4] = (old - size) as u64;
            }
            size as i64 - old as i64
        }
    };
    fold_shared(counts, delta);
}

/// Folds the calling thread's pending figures into the shared counters.
pub(crate) fn flush_current_thread() {
    let _ = LOCAL.try_with(|local| {
        if !IN_SLOW_PATH.get() {
            local.fold();
        }
    });
}

/// Whether a [`TrackingAllocator`] is the global allocator of this process (it has counted
/// at least one allocation).
pub fn tracking_allocator_installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Live heap bytes, process-wide, after folding the calling thread's pending figures.
pub(crate) fn live_bytes() -> i64 {
    flush_current_thread();
    LIVE.0.load(Ordering::Relaxed)
}

/// Returns the high-water mark since the last call and restarts it at the current live
/// count. Called only at scope boundaries, under the scope registry's lock.
pub(crate) fn take_mark() -> (i64, i64) {
    flush_current_thread();
    let live = LIVE.0.load(Ordering::Relaxed);
    // A fold racing with this swap either raised MARK before it (we return it) or raises
    // it after (the next boundary sees it): no high-water value is lost.
    let mark = MARK.0.swap(live, Ordering::Relaxed);
    (live, mark.max(live))
}

/// Reads the high-water mark since the last boundary without restarting it.
pub(crate) fn peek_mark() -> i64 {
    flush_current_thread();
    MARK.0
        .load(Ordering::Relaxed)
        .max(LIVE.0.load(Ordering::Relaxed))
}

/// Process-wide heap totals, after folding the calling thread's pending figures.
pub fn heap_totals() -> HeapTotals {
    flush_current_thread();
    HeapTotals {
        allocations: ALLOCATIONS.0.load(Ordering::Relaxed),
        frees: FREES.load(Ordering::Relaxed),
        reallocations: REALLOCATIONS.load(Ordering::Relaxed),
        allocated_bytes: ALLOCATED_BYTES.load(Ordering::Relaxed),
        freed_bytes: FREED_BYTES.load(Ordering::Relaxed),
    }
}

/// What the calling thread alone has allocated and freed over its life.
///
/// Exact (no batching error), and cheap: it reads this thread's own counters. Useful to
/// attribute allocations to a worker, and to check the allocator itself.
pub fn thread_heap_totals() -> HeapTotals {
    LOCAL.try_with(Local::totals).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_holding_the_slow_path_releases_it() {
        let unwound = std::panic::catch_unwind(|| {
            let _held = SlowPath::enter().expect("not yet held");
            assert!(SlowPath::enter().is_none(), "re-entry is refused");
            panic!("inside the slow path");
        });
        assert!(unwound.is_err());
        assert!(!IN_SLOW_PATH.get(), "the flag was left set");
        assert!(SlowPath::enter().is_some());
    }
}
