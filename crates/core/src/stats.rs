//! `get_memory_stats()`: one typed snapshot of everything memwise knows, and the process
//! figures it is built from (`/proc` and the C allocator).

use serde::Serialize;

use crate::alloc::{self, HeapTotals};
use crate::device::{self, DeviceUsage};
use crate::process;
use crate::scope::{self, ScopeAggregate, ScopeRecord};

pub use crate::process::{allocator_free_bytes, reset_rss_peak, trim_allocator, ProcessMemory};

const MIB: f64 = 1024.0 * 1024.0;

/// Live heap figures from the [`TrackingAllocator`](crate::TrackingAllocator), in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HeapStats {
    /// Live heap bytes now.
    pub current: u64,
    /// The most live heap bytes since start or the last [`reset_peak_memory`].
    pub peak: u64,
    /// Totals of allocations, reallocations and frees since start.
    pub totals: HeapTotals,
}

/// Everything memwise knows about this process's memory (the spec's `get_memory_stats()`).
///
/// A figure that this platform or build cannot provide is `None`, never 0.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct MemoryStats {
    /// Whether scope tracking is on.
    pub tracking_enabled: bool,
    /// Heap figures; `None` when the [`TrackingAllocator`](crate::TrackingAllocator) is not
    /// the global allocator.
    pub heap: Option<HeapStats>,
    /// Resident memory from `/proc/self/status`; `None` off Linux.
    pub process: Option<ProcessMemory>,
    /// Free bytes the C allocator holds (glibc `mallinfo2`); `None` without glibc.
    pub allocator_free_bytes: Option<u64>,
    /// One reading per registered device, with peaks since the last reset.
    pub devices: Vec<DeviceUsage>,
    /// Devices that failed to answer, with their errors.
    pub device_errors: Vec<String>,
    /// Finished scopes, oldest first, up to the record capacity.
    pub scopes: Vec<ScopeRecord>,
    /// Scope records dropped because the buffer was full (the aggregates include them).
    pub dropped_records: u64,
    /// Per-name figures over every finished scope.
    pub aggregates: Vec<ScopeAggregate>,
}

impl MemoryStats {
    /// Peak host memory in MiB: the heap peak, or the resident high-water mark (`VmHWM`)
    /// when the tracking allocator is not installed.
    pub fn peak_cpu_mb(&self) -> Option<f64> {
        match (&self.heap, &self.process) {
            (Some(h), _) => Some(h.peak as f64 / MIB),
            (None, Some(p)) => Some(p.rss_peak as f64 / MIB),
            (None, None) => None,
        }
    }

    /// Current host memory in MiB: live heap, or RSS without the tracking allocator.
    pub fn current_cpu_mb(&self) -> Option<f64> {
        match (&self.heap, &self.process) {
            (Some(h), _) => Some(h.current as f64 / MIB),
            (None, Some(p)) => Some(p.rss as f64 / MIB),
            (None, None) => None,
        }
    }

    /// Peak device memory in use, in MiB, the largest over all devices. `None` when no
    /// device is registered (a CPU-only build).
    pub fn peak_gpu_mb(&self) -> Option<f64> {
        self.devices
            .iter()
            .map(|d| d.peak_used as f64 / MIB)
            .reduce(f64::max)
    }

    /// Device memory in use now, in MiB, summed over devices; `None` without a device.
    pub fn current_gpu_mb(&self) -> Option<f64> {
        (!self.devices.is_empty()).then(|| self.devices.iter().map(|d| d.used as f64 / MIB).sum())
    }

    /// The finished scopes with this name.
    pub fn scopes_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ScopeRecord> {
        self.scopes.iter().filter(move |r| r.name == name)
    }

    /// The stats as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("MemoryStats serializes to JSON")
    }
}

/// Reads every figure memwise has: heap, process, allocator, devices and scope records.
///
/// ```
/// memwise::enable_memory_tracking(true);
/// memwise::track("load", || vec![1u8; 4096]);
/// let stats = memwise::get_memory_stats();
/// assert!(stats.scopes_named("load").count() >= 1);
/// if let Some(peak) = stats.peak_gpu_mb() {
///     println!("Peak GPU memory: {peak:.1} MB");
/// }
/// ```
pub fn get_memory_stats() -> MemoryStats {
    let reg = scope::registry();
    let heap = alloc::tracking_allocator_installed().then(|| HeapStats {
        current: alloc::live_bytes().max(0) as u64,
        peak: reg.heap_peak().max(0) as u64,
        totals: alloc::heap_totals(),
    });
    let (mut devices, device_errors) = device::read_all();
    for d in &mut devices {
        if let Some((used, reserved)) = reg.device_peak(&d.device) {
            d.peak_used = d.peak_used.max(used);
            d.peak_reserved = d.peak_reserved.max(reserved);
        }
    }
    let (scopes, dropped_records) = reg.records();
    MemoryStats {
        tracking_enabled: scope::memory_tracking_enabled(),
        heap,
        process: ProcessMemory::read(),
        allocator_free_bytes: process::allocator_free_bytes(),
        devices,
        device_errors,
        scopes,
        dropped_records,
        aggregates: reg.aggregates(),
    }
}

/// Restarts every high-water mark at the current value: the heap peak, each device's
/// peaks, and the kernel's resident peak (`VmHWM`, where `/proc/self/clear_refs` allows).
pub fn reset_peak_memory() {
    scope::registry().reset_peaks();
    process::reset_rss_peak();
}

/// Forgets finished scope records and aggregates; open scopes keep running.
pub fn reset_memory_stats() {
    scope::registry().clear_records();
}
