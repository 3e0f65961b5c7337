//! `optimize_memory_usage()`: apply the memory configuration and report what that did.

use std::fmt;

use serde::Serialize;

use super::schema::Config;
use crate::scope::{apply_configured_tracking, set_record_capacity};
use crate::{clear_memory_with, device, ClearReport};

/// What [`optimize_memory_usage`] did, and what it freed (measured, not assumed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct OptimizeReport {
    /// Scope tracking is now on (`memory.tracking.enabled`, unless an explicit
    /// [`enable_memory_tracking`](crate::enable_memory_tracking) decided it).
    pub tracking_enabled: bool,
    /// An explicit [`enable_memory_tracking`](crate::enable_memory_tracking) call decided
    /// tracking, so the configured default was not applied.
    pub tracking_explicit: bool,
    /// Finished scope records now kept (`memory.tracking.record_capacity`).
    pub record_capacity: usize,
    /// Devices whose pool release threshold was set (`memory.pool_release_threshold`), with
    /// the threshold in bytes.
    pub release_thresholds: Vec<(String, u64)>,
    /// Devices that have no release threshold to set.
    pub release_threshold_unsupported: Vec<String>,
    /// The cleanup: allocator trim (`memory.trim_allocator`), device cache release
    /// (`memory.empty_device_cache`) and reclaim hooks, with before, after and freed.
    pub cleanup: ClearReport,
    /// Device operations that failed, naming the device.
    pub errors: Vec<String>,
}

impl fmt::Display for OptimizeReport {
    /// One line per action, for people.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = if self.tracking_enabled { "on" } else { "off" };
        let why = if self.tracking_explicit {
            " (set by enable_memory_tracking)"
        } else {
            ""
        };
        writeln!(
            f,
            "scope tracking {on}{why}, keeping {} records",
            self.record_capacity
        )?;
        for (device, bytes) in &self.release_thresholds {
            writeln!(
                f,
                "{device}: pool release threshold {}",
                super::ByteSize(*bytes)
            )?;
        }
        for device in &self.release_threshold_unsupported {
            writeln!(f, "{device}: has no pool release threshold to set")?;
        }
        let trimmed = if self.cleanup.trimmed {
            "allocator trimmed"
        } else {
            "allocator not trimmed"
        };
        let signed = |v: Option<i64>| v.map_or("unavailable".to_owned(), |b| format!("{b} bytes"));
        writeln!(
            f,
            "{trimmed}; freed heap {}, RSS {}, device pools {}",
            signed(self.cleanup.freed.heap),
            signed(self.cleanup.freed.rss),
            signed(self.cleanup.freed.device_reserved)
        )?;
        for error in self.errors.iter().chain(&self.cleanup.errors) {
            writeln!(f, "error: {error}")?;
        }
        Ok(())
    }
}

/// Applies the memory configuration in force (the spec's `optimize_memory_usage()`): turns
/// scope tracking on or off (unless [`enable_memory_tracking`](crate::enable_memory_tracking)
/// was called: an explicit call wins over the configured default) and sizes its record buffer, sets each device pool's release
/// threshold where one is configured, then cleans up: reclaim hooks, allocator trim and
/// device cache release as the configuration says. Returns what it did and what it freed.
///
/// ```
/// use memwise::{configure, optimize_memory_usage};
/// use serde_json::json;
///
/// configure(json!({ "memory": { "tracking": { "enabled": true } } })).unwrap();
/// let report = optimize_memory_usage();
/// assert!(report.tracking_enabled && memwise::scope::memory_tracking_enabled());
/// print!("{report}");
/// ```
///
/// # Panics
///
/// As [`get_config`](crate::get_config), when the environment holds a bad value.
pub fn optimize_memory_usage() -> OptimizeReport {
    optimize_memory_usage_with(&crate::get_config())
}

/// [`optimize_memory_usage`] with a given configuration instead of the one in force.
pub fn optimize_memory_usage_with(config: &Config) -> OptimizeReport {
    let memory = &config.memory;
    let (tracking_enabled, tracking_explicit) = apply_configured_tracking(memory.tracking.enabled);
    set_record_capacity(memory.tracking.record_capacity);

    let mut release_thresholds = Vec::new();
    let mut release_threshold_unsupported = Vec::new();
    let mut errors = Vec::new();
    if let Some(threshold) = memory.pool_release_threshold {
        for dev in device::devices() {
            match dev.set_release_threshold(threshold.bytes()) {
                Ok(true) => release_thresholds.push((dev.name().to_owned(), threshold.bytes())),
                Ok(false) => release_threshold_unsupported.push(dev.name().to_owned()),
                Err(e) => errors.push(format!(
                    "{}: setting the release threshold: {e}",
                    dev.name()
                )),
            }
        }
    }
    let cleanup = clear_memory_with((), memory.clear_options());
    OptimizeReport {
        tracking_enabled,
        tracking_explicit,
        record_capacity: memory.tracking.record_capacity,
        release_thresholds,
        release_threshold_unsupported,
        cleanup,
        errors,
    }
}
