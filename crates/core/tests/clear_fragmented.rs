//! `clear_memory` really returns a fragmented heap to the OS, and its report says so:
//! checked against `/proc/self/status` read independently here.

use memwise::{clear_memory, clear_memory_with, ClearOptions, TrackingAllocator};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

const BLOCK: usize = 64 << 10;
const TOTAL: usize = 512 << 20;

/// VmRSS in bytes, parsed here rather than through memwise.
fn rss() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: i64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// 512 MiB in 64 KiB blocks, each followed by a small block that stays alive, so the
/// freed blocks are holes the allocator cannot give back by shrinking its heap top.
// The pins must be separate heap blocks between the big ones, hence the boxes.
#[allow(clippy::vec_box)]
fn fragmented_heap(pins: &mut Vec<Box<[u8; 64]>>) -> Vec<Vec<u8>> {
    (0..TOTAL / BLOCK)
        .map(|_| {
            let block = vec![1u8; BLOCK];
            pins.push(Box::new([0u8; 64]));
            block
        })
        .collect()
}

#[test]
fn clear_memory_returns_a_fragmented_heap_to_the_os() {
    let mut pins = Vec::with_capacity(2 * TOTAL / BLOCK);

    // Without trimming, dropping the blocks leaves most of them resident: that is the
    // fragmentation clear_memory exists to undo.
    let blocks = fragmented_heap(&mut pins);
    let mut no_trim = ClearOptions::default();
    no_trim.trim_allocator = false;
    let untrimmed = clear_memory_with(blocks, no_trim);
    assert!(
        untrimmed.freed.rss.unwrap() < TOTAL as i64 / 2,
        "the heap was not fragmented: {:?}",
        untrimmed.freed
    );
    clear_memory(()); // start the measured round from a trimmed heap

    let blocks = fragmented_heap(&mut pins);
    let rss_before = rss();
    let report = clear_memory(blocks);
    let rss_after = rss();

    let wanted = TOTAL as i64 * 8 / 10;
    assert!(report.trimmed);
    assert!(
        report.freed.heap.unwrap() >= TOTAL as i64,
        "{:?}",
        report.freed
    );
    assert!(
        report.freed.rss.unwrap() >= wanted,
        "report: {:?}",
        report.freed
    );
    assert!(
        rss_before - rss_after >= wanted,
        "/proc: {rss_before} -> {rss_after}"
    );
    drop(pins);
}
