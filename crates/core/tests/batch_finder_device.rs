//! The batch-size finder on a device: the budget from the configuration, and the fallback
//! when the predicted batch runs out of memory. One file: it registers a device and sets
//! the process-wide configuration.

mod fake_device;

use memwise::batch::{DevicePeak, ProbeOutcome};
use memwise::device::register_device;
use memwise::{configure, BatchSizeFinder, ErrorKind};
use serde_json::json;

use fake_device::FakeDevice;

const MIB: u64 = 1 << 20;
const FIXED: u64 = 100 * MIB;
const PER_SAMPLE: u64 = 10 * MIB;

#[test]
fn shrinks_only_when_the_predicted_batch_runs_out_of_memory() {
    // The configured budget (1 GiB) is more than the device can really give (900 MiB):
    // the prediction from the budget fails, and the finder must back off.
    let device = FakeDevice::new("cuda:0", 900 * MIB);
    register_device(device.clone());
    configure(json!({ "memory": { "max_memory": { "cuda:0": "1GiB" } } })).unwrap();

    let workload = |batch_size: usize| {
        let bytes = FIXED + batch_size as u64 * PER_SAMPLE;
        device.alloc(bytes)?;
        device.free(bytes);
        Ok(())
    };
    let report = BatchSizeFinder::new()
        .find(&mut DevicePeak::new("cuda:0"), workload)
        .unwrap();

    // The probes measured the line exactly, and the first prediction used the budget.
    assert_eq!(report.budget, 1 << 30);
    assert_eq!(report.per_sample_bytes, Some(PER_SAMPLE as f64));
    assert_eq!(report.fixed_bytes, Some(FIXED as f64));
    assert_eq!(
        report.predicted,
        Some(((1 << 30) - FIXED as usize) / PER_SAMPLE as usize)
    );
    let outcomes: Vec<_> = report.runs.iter().map(|r| &r.outcome).collect();
    assert!(
        matches!(outcomes[2], ProbeOutcome::OutOfMemory(_)),
        "{report:#?}"
    );
    assert_eq!(outcomes.last(), Some(&&ProbeOutcome::Fit));

    let device_max = ((900 * MIB - FIXED) / PER_SAMPLE) as usize; // 80
    assert!(report.batch_size <= device_max, "{report:#?}");
    assert!(report.batch_size * 10 >= device_max * 8, "{report:#?}");
    assert!(report.runs.len() <= 8);
}

#[test]
fn a_missing_budget_names_the_key_to_set() {
    let err = BatchSizeFinder::new()
        .find(&mut DevicePeak::new("cuda:1"), |_| Ok(()))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("memory.max_memory.cuda:1"), "{err}");
    assert!(
        err.message().contains("MEMWISE_MEMORY__MAX_MEMORY__CUDA_1"),
        "{err}"
    );
}

#[test]
fn an_explicit_config_gives_the_budget_instead_of_the_one_in_force() {
    let device = FakeDevice::new("cuda:2", 900 * MIB);
    register_device(device.clone());
    let mut config = memwise::Config::default();
    config
        .memory
        .max_memory
        .insert("cuda:2".into(), memwise::config::ByteSize(500 * MIB));
    let report = BatchSizeFinder::from_config(&config)
        .find(&mut DevicePeak::new("cuda:2"), |batch_size| {
            let bytes = FIXED + batch_size as u64 * PER_SAMPLE;
            device.alloc(bytes)?;
            device.free(bytes);
            Ok(())
        })
        .unwrap();
    assert_eq!(report.budget, 500 * MIB);
    assert_eq!(
        report.batch_size,
        ((500 * MIB - FIXED) / PER_SAMPLE) as usize
    );
}
