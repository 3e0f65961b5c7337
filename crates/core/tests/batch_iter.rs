//! `batches`: the spec's batch loop, with a scope per batch and cleanup between batches.
//! One test: it turns process-wide tracking on and reads the scope records.

#[global_allocator]
static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();

use memwise::{batches, enable_memory_tracking, get_memory_stats, ClearOptions};

#[test]
fn each_batch_runs_in_its_own_scope_with_cleanup_between() {
    enable_memory_tracking(true);
    let dataset: Vec<u32> = (0..10).collect();
    let mut seen = Vec::new();
    let mut cleanups = 0;
    let mut iter = batches(dataset, 3).cleanup(ClearOptions::default());
    while let Some(mut batch) = iter.next() {
        assert!(iter.last_cleanup().is_some() || batch.start() == 0);
        if iter.last_cleanup().is_some() {
            cleanups += 1;
        }
        batch.iter_mut().for_each(|x| *x *= 10);
        seen.push((batch.start(), batch.to_vec()));
        // results = process_batch(batch): 1 MiB that lives only inside the batch.
        let results = vec![batch[0] as u8; 1 << 20];
        std::hint::black_box(&results);
    }
    // The cleanup after the last batch runs too.
    assert!(iter.last_cleanup().is_some());
    assert_eq!(cleanups, 3);
    assert_eq!(
        seen,
        [
            (0, vec![0, 10, 20]),
            (3, vec![30, 40, 50]),
            (6, vec![60, 70, 80]),
            (9, vec![90]),
        ]
    );

    let stats = get_memory_stats();
    for start in [0, 3, 6, 9] {
        let name = format!("batch_{start}");
        let record = stats
            .scopes_named(&name)
            .next()
            .unwrap_or_else(|| panic!("no {name}"));
        assert!(record.heap_peak_delta().unwrap() >= 1 << 20, "{record:?}");
        // The results and the batch were freed before the scope closed.
        assert!(record.heap_retained().unwrap() < 64 << 10, "{record:?}");
    }
    assert_eq!(stats.scopes_named("batch_1").count(), 0);
    assert_eq!(batches(Vec::<u8>::new(), 4).count(), 0);
}
