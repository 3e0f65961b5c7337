//! Small allocations are counted in per-thread batches. The documented bound: the shared
//! figures miss less than `FLUSH_BYTES` per thread, and are exact once a thread exits.

use std::sync::{Arc, Barrier};
use std::thread;

use memwise::alloc::FLUSH_BYTES;
use memwise::{get_memory_stats, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

fn live() -> i64 {
    get_memory_stats()
        .heap
        .expect("allocator installed")
        .current as i64
}

#[test]
fn small_allocations_on_another_thread_are_within_the_documented_bound() {
    // Barriers never allocate after construction, unlike channels.
    let gates = Arc::new((Barrier::new(2), Barrier::new(2)));
    let worker_gates = Arc::clone(&gates);
    thread::spawn(|| ()).join().unwrap(); // first-spawn runtime set-up, outside the figures
    let base = live();
    let worker = thread::spawn(move || {
        // 3000 boxes of 100 B: each far below the exact threshold, 300 KB together.
        let boxes: Vec<Box<[u8; 100]>> = (0..3000).map(|_| Box::new([1u8; 100])).collect();
        worker_gates.0.wait();
        worker_gates.1.wait();
        drop(boxes);
    });
    gates.0.wait();
    let held = 3000 * 100 + 3000 * 8 /* the Vec of pointers */;
    let seen = live() - base;
    // The worker's pending delta is under FLUSH_BYTES; thread spawn bookkeeping adds a
    // little more, also under the same bound.
    assert!(
        (seen - held).abs() < 2 * FLUSH_BYTES,
        "saw {seen} live bytes from the worker, it holds {held}"
    );
    gates.1.wait();
    worker.join().unwrap();
    assert_eq!(live(), base, "exact once the worker has exited");
}
