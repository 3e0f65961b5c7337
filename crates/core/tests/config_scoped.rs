//! Scoped configuration: two threads, each inside its own `with_config`, see their own
//! configuration at the same moment, with no global lock and no change to the process-wide
//! configuration.

use std::sync::{Arc, Barrier};

use memwise::batch::Batches;
use memwise::config::{override_config, with_config};
use memwise::{batches, get_config, init_config, Config};

fn with_batch_size(size: usize) -> Config {
    let mut config = Config::default();
    config.memory.gpu_batch_size = size;
    config
}

/// What a thread sees inside its override: the batch size from `get_config`,
/// `init_config` and the batch sizes `batches` and `Batches::from_config` produce.
fn seen_inside(size: usize, both_inside: &Barrier) -> (usize, usize, Vec<usize>, Vec<usize>) {
    with_config(with_batch_size(size), || {
        // Both threads are inside their overrides before either reads.
        both_inside.wait();
        let config = get_config();
        let from_init = init_config().unwrap().memory.gpu_batch_size;
        let sizes = batches(0..10, config.memory.gpu_batch_size)
            .map(|b| b.len())
            .collect();
        let explicit = Batches::from_config(0..10, &config)
            .map(|b| b.len())
            .collect();
        both_inside.wait();
        (config.memory.gpu_batch_size, from_init, sizes, explicit)
    })
}

#[test]
fn two_threads_with_different_configs_run_at_once_without_a_lock() {
    let global = get_config();
    let barrier = Arc::new(Barrier::new(2));
    let threads: Vec<_> = [3, 4]
        .into_iter()
        .map(|size| {
            let barrier = barrier.clone();
            std::thread::spawn(move || seen_inside(size, &barrier))
        })
        .collect();
    let seen: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(seen[0], (3, 3, vec![3, 3, 3, 1], vec![3, 3, 3, 1]));
    assert_eq!(seen[1], (4, 4, vec![4, 4, 2], vec![4, 4, 2]));
    // The process-wide configuration never changed.
    assert_eq!(*get_config(), *global);
}

#[test]
fn overrides_nest_and_end_with_their_guard_even_on_panic() {
    let global = get_config();
    let outer = override_config(with_batch_size(5));
    let unwound = std::panic::catch_unwind(|| {
        with_config(with_batch_size(6), || {
            assert_eq!(get_config().memory.gpu_batch_size, 6);
            panic!("inside the inner override");
        })
    });
    assert!(unwound.is_err());
    assert_eq!(get_config().memory.gpu_batch_size, 5);
    drop(outer);
    assert_eq!(*get_config(), *global);
}
