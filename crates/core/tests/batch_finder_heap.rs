//! The batch-size finder on a host workload whose memory per sample is known exactly.
//! One test per file: it reads the process-wide heap counters.

#[global_allocator]
static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();

use memwise::alloc::heap_totals;
use memwise::batch::{HeapPeak, PeakMeter, ProbeOutcome, WorkloadError};
use memwise::BatchSizeFinder;

const FIXED: usize = 3 << 20; // weights and buffers that do not depend on the batch
const PER_SAMPLE: usize = 512 << 10; // activations per sample
const SLOT: usize = std::mem::size_of::<Vec<u8>>(); // the list that holds each sample

/// Holds FIXED bytes, then PER_SAMPLE bytes per sample, all live at once, then frees them.
fn workload(batch_size: usize) -> Result<(), WorkloadError> {
    let fixed = vec![1u8; FIXED];
    let mut samples = Vec::with_capacity(batch_size);
    for _ in 0..batch_size {
        samples.push(vec![2u8; PER_SAMPLE]);
    }
    std::hint::black_box((&fixed, &samples));
    Ok(())
}

#[test]
fn lands_within_ten_percent_of_the_largest_batch_in_three_runs() {
    const TRUE_MAX: usize = 150;
    let baseline = heap_totals().live_bytes() as u64;
    // Half a sample of room above the largest batch, so that a few hundred bytes of
    // bookkeeping noise cannot move the true answer either way.
    let budget = baseline + (FIXED + TRUE_MAX * (PER_SAMPLE + SLOT) + PER_SAMPLE / 2) as u64;
    // The true answer, from the workload's exact allocations...
    let true_max = ((budget - baseline) as usize - FIXED) / (PER_SAMPLE + SLOT);
    assert_eq!(true_max, TRUE_MAX);
    // ...and confirmed by measuring the sizes on either side of it.
    let peak_at = |size: usize| {
        let measured = HeapPeak.measure(&mut || workload(size)).unwrap();
        assert!(measured.outcome.is_ok());
        measured.peak
    };
    assert!(peak_at(true_max) <= budget);
    assert!(peak_at(true_max + 1) > budget);

    let report = BatchSizeFinder::new()
        .budget(budget)
        .find(&mut HeapPeak, workload)
        .unwrap();

    assert!(report.runs.len() <= 3, "{report:#?}");
    assert_eq!(report.runs[0].batch_size, 1);
    assert_eq!(report.runs[1].batch_size, 4);
    assert!(report.runs.iter().all(|r| r.peak.is_some()));
    let off = report.batch_size.abs_diff(true_max) as f64 / true_max as f64;
    assert!(
        off <= 0.10,
        "chose {} for a true largest batch of {true_max}: {report:#?}",
        report.batch_size
    );
    // It never returns a size that was not seen to fit.
    assert!(report.batch_size <= true_max);
    let chosen = report
        .runs
        .iter()
        .find(|r| r.batch_size == report.batch_size)
        .unwrap();
    assert_eq!(chosen.outcome, ProbeOutcome::Fit);

    // The measurements behind the choice are reported, and they are the workload's.
    let slope = report.per_sample_bytes.unwrap();
    assert!(
        (slope - (PER_SAMPLE + SLOT) as f64).abs() < 0.01 * PER_SAMPLE as f64,
        "per-sample estimate {slope}"
    );
    let fixed = report.fixed_bytes.unwrap() - baseline as f64;
    assert!(
        (fixed - FIXED as f64).abs() < 0.05 * FIXED as f64,
        "fixed estimate {fixed}"
    );
    assert_eq!(report.budget, budget);
    assert_eq!(report.device, "cpu");
    assert_eq!(report.predicted, Some(report.batch_size));
}
