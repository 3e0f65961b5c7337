//! Readings taken between scope edges: live heap, resident memory and devices over time.

use std::time::Duration;

use serde::Serialize;

use crate::stats::ProcessMemory;

/// One reading of the process's memory at a moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Sample {
    /// When it was taken, on the same clock as [`ScopeRecord::start`](crate::scope::ScopeRecord::start).
    pub at: Duration,
    /// Live heap bytes (`None` without the [`TrackingAllocator`](crate::TrackingAllocator)).
    pub heap: Option<u64>,
    /// Resident memory (`None` where `/proc` is unavailable).
    pub process: Option<ProcessMemory>,
    /// Bytes in use on each registered device, by device name.
    pub devices: Vec<(String, u64)>,
}

impl Sample {
    /// A reading taken `at` with the given figures (for tests and other sources).
    pub fn new(at: Duration, heap: Option<u64>, process: Option<ProcessMemory>) -> Self {
        Sample {
            at,
            heap,
            process,
            devices: Vec::new(),
        }
    }
}
