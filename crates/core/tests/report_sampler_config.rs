//! The report sampler's interval and capacity are configuration keys
//! (`memory.tracking.sample_interval_ms`, `memory.tracking.sample_capacity`): a file that
//! sets them changes the sampler [`Sampler::configured`] starts.

use std::time::Duration;

use memwise::report::{Sampler, DEFAULT_CAPACITY, DEFAULT_INTERVAL};

#[test]
fn a_config_file_sets_the_samplers_interval_and_capacity() {
    memwise::config::reset_config().unwrap();
    let defaults = Sampler::configured();
    assert_eq!(defaults.interval(), DEFAULT_INTERVAL);
    assert_eq!(defaults.capacity(), DEFAULT_CAPACITY);
    drop(defaults);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("memwise.toml");
    std::fs::write(
        &file,
        "[memory.tracking]\nsample_interval_ms = 3\nsample_capacity = 5\n",
    )
    .unwrap();
    let config = memwise::load_config(&file).unwrap();
    assert_eq!(config.memory.tracking.sample_interval_ms, 3);
    let sampler = Sampler::configured();
    assert_eq!(sampler.interval(), Duration::from_millis(3));
    assert_eq!(sampler.capacity(), 5);

    // The capacity is what the ring keeps on a run longer than it.
    memwise::enable_memory_tracking(true);
    std::thread::sleep(Duration::from_millis(60));
    let samples = sampler.stop();
    assert!(
        (2..=5).contains(&samples.len()),
        "{} readings kept under a capacity of 5",
        samples.len()
    );
    memwise::config::reset_config().unwrap();
}
