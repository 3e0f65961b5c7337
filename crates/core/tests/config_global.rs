//! The process-wide configuration: atomic updates, layer order after `load_config`, and
//! snapshots that readers see whole. The tests share one global, so they take turns.

use std::sync::{Mutex, MutexGuard};

use memwise::config::{self, get_config_origins, reset_config, save_config};
use memwise::{configure, configure_with, get_config, load_config};
use serde_json::json;

static TURN: Mutex<()> = Mutex::new(());

/// Waits for the global configuration, then starts it afresh from the defaults.
fn exclusive() -> MutexGuard<'static, ()> {
    let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    reset_config().unwrap();
    turn
}

#[test]
fn a_refused_configure_leaves_the_previous_config_in_force() {
    let _turn = exclusive();
    configure(json!({ "memory": { "gpu_batch_size": 8 } })).unwrap();
    let before = get_config();

    // One bad value spoils the whole update, including its good values.
    let err = configure(json!({
        "memory": { "gpu_batch_size": 4 },
        "quantization": { "bits": 5 }
    }))
    .unwrap_err();
    assert_eq!(err.key(), Some("quantization.bits"));
    assert_eq!(err.origin(), &config::Source::Code);
    assert_eq!(get_config().memory.gpu_batch_size, 8);
    assert_eq!(*get_config(), *before);

    let err = configure_with(|config| {
        config.memory.gpu_batch_size = 2;
        config.quantization.group_size = 100;
    })
    .unwrap_err();
    assert_eq!(err.key(), Some("quantization.group_size"));
    assert_eq!(*get_config(), *before);

    let err = configure(json!({ "memory.gpu_batch_siz": 2 })).unwrap_err();
    assert_eq!(err.kind(), config::ErrorKind::UnknownKey);
    assert_eq!(*get_config(), *before);
    assert_eq!(
        get_config_origins().origin("memory.gpu_batch_size"),
        Some(&config::Source::Code)
    );
}

#[test]
fn a_loaded_file_sits_below_code_and_a_bad_one_changes_nothing() {
    let _turn = exclusive();
    let dir = tempfile::tempdir().unwrap();
    configure(json!({ "memory.gpu_batch_size": 8 })).unwrap();

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[memory]\ngpu_batch_size = 32\nprefetch_depth = 4\n").unwrap();
    load_config(&good).unwrap();
    let config = get_config();
    assert_eq!(config.memory.gpu_batch_size, 8, "code stays above the file");
    assert_eq!(config.memory.prefetch_depth, 4);
    assert_eq!(config.config_path.as_deref(), Some(good.as_path()));
    let origins = get_config_origins();
    assert_eq!(
        origins.origin("memory.prefetch_depth"),
        Some(&config::Source::File(good.clone()))
    );

    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"{"memory": {"prefetch_depth": 2, "trim_allocator": "sometimes"}}"#,
    )
    .unwrap();
    let err = load_config(&bad).unwrap_err();
    assert_eq!(err.key(), Some("memory.trim_allocator"));
    assert_eq!(err.origin(), &config::Source::File(bad));
    assert_eq!(get_config().memory.prefetch_depth, 4);
    assert_eq!(get_config().config_path.as_deref(), Some(good.as_path()));

    // reset_config forgets both.
    let fresh = reset_config().unwrap();
    assert_eq!(fresh.memory.gpu_batch_size, 16);
    assert_eq!(fresh.config_path, None);
}

#[test]
fn save_config_writes_what_load_config_reads() {
    let _turn = exclusive();
    let dir = tempfile::tempdir().unwrap();
    configure(json!({ "quantization": { "bits": 8, "symmetric": true }, "verbose": true }))
        .unwrap();
    let saved = get_config();
    let path = dir.path().join("saved.toml");
    save_config(&path).unwrap();
    reset_config().unwrap();
    assert_eq!(get_config().quantization.bits, 4);
    let loaded = load_config(&path).unwrap();
    assert_eq!(loaded.quantization, saved.quantization);
    assert!(loaded.verbose);
}

#[test]
fn readers_always_see_a_whole_snapshot() {
    let _turn = exclusive();
    let in_step = |step: usize| {
        configure_with(|config| {
            config.memory.prefetch_depth = step;
            config.memory.tracking.record_capacity = step;
        })
        .unwrap();
    };
    in_step(0);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..4)
            .map(|_| {
                scope.spawn(|| {
                    let mut reads = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let config = get_config();
                        // The writer always changes both together.
                        assert_eq!(
                            config.memory.prefetch_depth,
                            config.memory.tracking.record_capacity
                        );
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        (1..200).for_each(in_step);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for reader in readers {
            assert!(reader.join().unwrap() > 0);
        }
    });
    assert_eq!(get_config().memory.prefetch_depth, 199);
}
