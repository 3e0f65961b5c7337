//! The spec's "Processing Large Datasets": batches from the configuration, each inside a
//! `MemoryTracker` scope, with cleanup between batches. Then the batch size picked from a
//! measurement instead of by hand.
//!
//! ```sh
//! cargo run -p memwise --example process_dataset
//! MEMWISE_MEMORY__GPU_BATCH_SIZE=32 MEMWISE_MEMORY__MAX_MEMORY__CPU=64MiB \
//!     cargo run -p memwise --example process_dataset
//! ```

// Count every heap allocation, so each batch's scope records its true peak.
#[global_allocator]
static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();

use memwise::alloc::heap_totals;
use memwise::batch::{HeapPeak, WorkloadError};
use memwise::{
    batches, enable_memory_tracking, get_config, get_memory_stats, init_config, BatchSizeFinder,
};

const SAMPLE_FLOATS: usize = 16 * 1024; // 64 KiB per sample

/// A stand-in for a model step: per-sample features, 4x the input, as activations would be.
fn process_batch(batch: &[Vec<f32>]) -> Vec<Vec<f32>> {
    batch
        .iter()
        .map(|sample| {
            let features: Vec<f32> = sample
                .iter()
                .flat_map(|&x| [x, x * 2.0, x * 3.0, x * 4.0])
                .collect();
            vec![features.iter().sum::<f32>() / features.len() as f32]
        })
        .collect()
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the batches and the batch-size finder, and returns what `main` prints.
pub fn run() -> Result<Vec<String>, memwise::Error> {
    // A bad MEMWISE_* variable or config file is reported here, naming the key and source.
    init_config()?;
    let config = get_config();
    let batch_size = config.memory.gpu_batch_size;
    enable_memory_tracking(true);

    let dataset: Vec<Vec<f32>> = (0..100).map(|i| vec![i as f32; SAMPLE_FLOATS]).collect();
    let mut saved = Vec::new();
    // for i in range(0, len(dataset), batch_size): with MemoryTracker(f"batch_{i}"): ...
    for batch in batches(dataset, batch_size) {
        let results = process_batch(&batch);
        // save_results(results)
        saved.extend(results.into_iter().flatten());
        // clear_memory([batch, results]): the batch and its scope end here, and batches()
        // cleans up (allocator trim, device caches) before forming the next one.
    }
    let mut lines = vec![format!(
        "processed {} samples in batches of {batch_size}",
        saved.len()
    )];

    let stats = get_memory_stats();
    for record in stats.scopes.iter().filter(|r| r.name.starts_with("batch_")) {
        lines.push(format!(
            "{:<10} peak +{:>8} bytes, kept {:>6} bytes",
            record.name,
            record.heap_peak_delta().unwrap_or(0),
            record.heap_retained().unwrap_or(0)
        ));
    }

    // Better than guessing: measure two small batches and predict the largest that fits the
    // budget (memory.max_memory.cpu when set, else 64 MiB above what is in use now).
    let budget = match config.memory.budget("cpu") {
        Some(budget) => budget.bytes(),
        None => heap_totals().live_bytes() as u64 + (64 << 20),
    };
    let report = BatchSizeFinder::new()
        .budget(budget)
        .find(&mut HeapPeak, |size| {
            let batch: Vec<Vec<f32>> = (0..size).map(|i| vec![i as f32; SAMPLE_FLOATS]).collect();
            std::hint::black_box(process_batch(&batch));
            Ok::<(), WorkloadError>(())
        })?;
    lines.push(format!(
        "largest batch within {budget} bytes: {} ({} runs; {:.0} bytes per sample, predicted {})",
        report.batch_size,
        report.runs.len(),
        report.per_sample_bytes.unwrap_or(0.0),
        report
            .predicted
            .map_or("nothing".to_owned(), |p| p.to_string())
    ));
    Ok(lines)
}
