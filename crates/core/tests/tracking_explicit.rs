//! An explicit `enable_memory_tracking` wins over the configured default:
//! `optimize_memory_usage()` applies `memory.tracking.enabled` only when no call was made.
//! One test: it changes process-wide tracking and configuration.

use memwise::scope::memory_tracking_enabled;
use memwise::{configure, enable_memory_tracking, optimize_memory_usage};
use serde_json::json;

#[test]
fn optimize_memory_usage_keeps_an_explicit_enable_memory_tracking() {
    // The default configuration says off; the explicit call says on, and stays on.
    assert!(!memwise::get_config().memory.tracking.enabled);
    enable_memory_tracking(true);
    let report = optimize_memory_usage();
    assert!(memory_tracking_enabled());
    assert!(report.tracking_enabled && report.tracking_explicit);
    assert!(
        report
            .to_string()
            .contains("scope tracking on (set by enable_memory_tracking)"),
        "{report}"
    );

    // The other way round: an explicit off beats a configured on.
    enable_memory_tracking(false);
    configure(json!({ "memory.tracking.enabled": true })).unwrap();
    let report = optimize_memory_usage();
    assert!(!memory_tracking_enabled());
    assert!(!report.tracking_enabled);
}
