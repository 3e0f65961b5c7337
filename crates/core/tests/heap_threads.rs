//! Eight threads churn the heap with alloc / realloc / free of 1 B to 8 MiB; afterwards the
//! tracking allocator's live bytes are exactly back at the baseline and its totals equal
//! what the threads did. One test per file: the counters are process-wide.

use std::alloc::{alloc, dealloc, realloc, Layout};
use std::thread;

use memwise::alloc::{heap_totals, thread_heap_totals, HeapTotals};
use memwise::TrackingAllocator;

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

const THREADS: u64 = 8;
const OPS: usize = 20_000;
const SLOTS: usize = 64;

/// splitmix64: a seeded generator that never allocates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Log-uniform sizes from 1 B to 8 MiB, so small, medium and huge blocks all appear.
    fn size(&mut self) -> usize {
        let bits = self.next() % 24; // 2^0 .. 2^23 = 8 MiB
        let base = 1usize << bits;
        (base + (self.next() as usize % base)).min(8 << 20)
    }
}

/// Does random heap work and returns what it did, counted by hand without allocating.
fn churn(seed: u64) -> HeapTotals {
    let mut rng = Rng(seed);
    let mut slots: [(usize, usize); SLOTS] = [(0, 0); SLOTS]; // (pointer, size)
    let mut did = HeapTotals::default();
    let count = |did: &mut HeapTotals, grow: i64, kind: u8| {
        match kind {
            0 => did.allocations += 1,
            1 => did.frees += 1,
            _ => did.reallocations += 1,
        }
        if grow >= 0 {
            did.allocated_bytes += grow as u64;
        } else {
            did.freed_bytes += (-grow) as u64;
        }
    };
    for _ in 0..OPS {
        let slot = (rng.next() % SLOTS as u64) as usize;
        let (ptr, size) = slots[slot];
        let roll = rng.next() % 3;
        // SAFETY: every pointer in `slots` came from `alloc`/`realloc` with align 8 and the
        // recorded size, and is freed exactly once.
        unsafe {
            if ptr == 0 {
                let size = rng.size();
                let p = alloc(Layout::from_size_align(size, 8).unwrap());
                assert!(!p.is_null());
                p.write(1); // touch it
                slots[slot] = (p as usize, size);
                count(&mut did, size as i64, 0);
            } else if roll == 0 {
                let new_size = rng.size();
                let layout = Layout::from_size_align(size, 8).unwrap();
                let p = realloc(ptr as *mut u8, layout, new_size);
                assert!(!p.is_null());
                slots[slot] = (p as usize, new_size);
                count(&mut did, new_size as i64 - size as i64, 2);
            } else {
                dealloc(ptr as *mut u8, Layout::from_size_align(size, 8).unwrap());
                slots[slot] = (0, 0);
                count(&mut did, -(size as i64), 1);
            }
        }
    }
    for (ptr, size) in slots {
        if ptr != 0 {
            // SAFETY: as above.
            unsafe { dealloc(ptr as *mut u8, Layout::from_size_align(size, 8).unwrap()) };
            count(&mut did, -(size as i64), 1);
        }
    }
    did
}

/// Runs `work` on 8 threads at once; each returns (what it says it did, what its own
/// thread counters saw).
fn on_threads(work: fn(u64) -> HeapTotals) -> Vec<(HeapTotals, HeapTotals)> {
    let handles: Vec<_> = (0..THREADS)
        .map(|seed| {
            thread::spawn(move || {
                let start = thread_heap_totals();
                let did = work(seed);
                (did, thread_heap_totals().since(&start))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn idle(_: u64) -> HeapTotals {
    HeapTotals::default()
}

fn add(a: HeapTotals, b: &HeapTotals) -> HeapTotals {
    let mut sum = a;
    sum.allocations += b.allocations;
    sum.frees += b.frees;
    sum.reallocations += b.reallocations;
    sum.allocated_bytes += b.allocated_bytes;
    sum.freed_bytes += b.freed_bytes;
    sum
}

#[test]
fn eight_threads_leave_exact_live_bytes_and_totals() {
    // Spawning threads allocates bookkeeping of its own; warm up, then measure that cost
    // with idle threads so it can be told apart from the churn.
    on_threads(idle);
    let before_idle = heap_totals();
    on_threads(idle);
    let spawn_cost = heap_totals().since(&before_idle);

    let before = heap_totals();
    let results = on_threads(churn);

    let mut did = HeapTotals::default();
    for (said, seen) in &results {
        assert_eq!(said, seen, "a thread's own counters disagree with its work");
        assert!(said.allocations > 1000 && said.reallocations > 1000);
        did = add(did, said);
    }
    // The idle calibration freed its result vector too; do the same before reading.
    drop(results);
    let after = heap_totals();
    assert_eq!(
        after.live_bytes(),
        before.live_bytes(),
        "live bytes not back at baseline"
    );
    assert_eq!(
        after.since(&before),
        add(did, &spawn_cost),
        "totals differ from the work done"
    );
}
