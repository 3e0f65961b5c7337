//! `optimize_memory_usage()` does what the configuration says, and reports it.
//! One test: it changes process-wide tracking, devices and configuration.

mod fake_device;

use memwise::device::register_device;
use memwise::scope::memory_tracking_enabled;
use memwise::{configure, optimize_memory_usage};
use serde_json::json;

use fake_device::FakeDevice;

const GIB: u64 = 1 << 30;

#[test]
fn optimize_applies_tracking_trim_and_device_policy_from_the_config() {
    let device = FakeDevice::new("cuda:0", 8 * GIB);
    register_device(device.clone());
    device.alloc(GIB).unwrap();
    device.set_reserved(3 * GIB);

    configure(json!({
        "memory": {
            "tracking": { "enabled": true, "record_capacity": 123 },
            "pool_release_threshold": "512MiB",
            "empty_device_cache": true,
            "trim_allocator": true
        }
    }))
    .unwrap();
    let report = optimize_memory_usage();
    assert!(memory_tracking_enabled());
    assert!(report.tracking_enabled);
    assert_eq!(report.record_capacity, 123);
    assert_eq!(
        report.release_thresholds,
        [("cuda:0".to_owned(), 512 << 20)]
    );
    assert_eq!(device.release_threshold(), Some(512 << 20));
    assert_eq!(device.empty_cache_calls(), 1);
    // Measured: the pool held 3 GiB with 1 GiB in use, so emptying it gave back 2 GiB.
    assert_eq!(report.cleanup.freed.device_reserved, Some(2 * GIB as i64));
    assert_eq!(
        report.cleanup.trimmed,
        cfg!(all(target_os = "linux", target_env = "gnu"))
    );
    let text = report.to_string();
    assert!(
        text.contains("scope tracking on, keeping 123 records"),
        "{text}"
    );
    assert!(
        text.contains("cuda:0: pool release threshold 512MiB"),
        "{text}"
    );

    // Turned the other way, the same call turns tracking off and leaves the pool alone.
    device.set_reserved(3 * GIB);
    configure(json!({
        "memory.tracking.enabled": false,
        "memory.empty_device_cache": false,
        "memory.trim_allocator": false,
        "memory.pool_release_threshold": null
    }))
    .unwrap();
    let report = optimize_memory_usage();
    assert!(!memory_tracking_enabled());
    assert!(!report.cleanup.trimmed);
    assert!(report.release_thresholds.is_empty());
    assert_eq!(device.empty_cache_calls(), 1);
    assert_eq!(report.cleanup.freed.device_reserved, Some(0));
}
