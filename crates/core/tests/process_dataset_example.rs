//! The `process_dataset` example runs: a scope per batch, each with its true peak, and a
//! batch size predicted from a measurement. One test: the heap counters are process-wide.

#[allow(dead_code)]
#[path = "../examples/process_dataset.rs"]
mod example;

use memwise::config::with_config;
use memwise::get_config;

#[test]
fn the_process_dataset_example_prints_a_scope_per_batch() {
    let mut config = (*get_config()).clone();
    config.memory.gpu_batch_size = 25;
    config.memory.max_memory.clear();
    let lines = with_config(config, || example::run().unwrap());
    assert_eq!(lines[0], "processed 100 samples in batches of 25");
    let batches: Vec<&String> = lines.iter().filter(|l| l.starts_with("batch_")).collect();
    assert_eq!(batches.len(), 4, "{lines:#?}");
    // The samples were allocated before the loop; each batch's peak is one sample's
    // features, 4 x 64 KiB.
    for line in batches {
        let peak: u64 = line
            .split('+')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(peak >= 4 * 64 * 1024, "{line}");
    }
    assert!(
        lines.last().unwrap().starts_with("largest batch within"),
        "{lines:#?}"
    );
}
