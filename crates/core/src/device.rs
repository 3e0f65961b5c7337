//! Accelerator memory behind one trait, and the registry of devices in use.
//!
//! The core has no device of its own: a CPU-only build registers none and the stats say so.
//! Backends (CUDA, in `memwise-model` behind its `cuda` feature) implement [`DeviceMemory`]
//! and [`register_device`] themselves. The trait is shaped after a caching memory pool:
//! bytes in use and bytes reserved from the driver, each with a high-water mark that the
//! scope tracker restarts at every scope edge, and a call that returns cached blocks.

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::Error;

/// One reading of a device's memory pool, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DeviceUsage {
    /// The device, as users name it (`"cuda:0"`).
    pub device: String,
    /// Bytes held by live tensors.
    pub used: u64,
    /// Bytes the pool holds from the driver (used plus cached).
    pub reserved: u64,
    /// High-water mark of `used` since the last [`DeviceMemory::reset_peaks`].
    pub peak_used: u64,
    /// High-water mark of `reserved` since the last [`DeviceMemory::reset_peaks`].
    pub peak_reserved: u64,
    /// The device's total memory, when the backend knows it.
    pub total: Option<u64>,
}

impl DeviceUsage {
    /// A reading with the given counters (for backends and tests).
    pub fn new(device: impl Into<String>, used: u64, reserved: u64) -> Self {
        DeviceUsage {
            device: device.into(),
            used,
            reserved,
            peak_used: used,
            peak_reserved: reserved,
            total: None,
        }
    }

    /// Sets the high-water marks.
    pub fn with_peaks(mut self, peak_used: u64, peak_reserved: u64) -> Self {
        self.peak_used = peak_used;
        self.peak_reserved = peak_reserved;
        self
    }

    /// Sets the device's total memory.
    pub fn with_total(mut self, total: u64) -> Self {
        self.total = Some(total);
        self
    }
}

/// A device whose memory memwise can read and trim.
pub trait DeviceMemory: Send + Sync {
    /// The device's name as users write it, e.g. `"cuda:0"`.
    fn name(&self) -> &str;

    /// Reads the pool's counters.
    fn usage(&self) -> Result<DeviceUsage, Error>;

    /// Restarts both high-water marks at the current values. Called at every scope edge.
    fn reset_peaks(&self) -> Result<(), Error>;

    /// Returns cached, unused blocks to the driver (`torch.cuda.empty_cache()`).
    /// Returns the bytes released.
    fn empty_cache(&self) -> Result<u64, Error>;

    /// Sets how many cached bytes the pool may keep before it returns memory to the driver
    /// on its own (CUDA's `cudaMemPoolAttrReleaseThreshold`); the configuration's
    /// `memory.pool_release_threshold`. Returns whether the backend has such a setting: the
    /// default has none and changes nothing.
    fn set_release_threshold(&self, bytes: u64) -> Result<bool, Error> {
        let _ = bytes;
        Ok(false)
    }
}

static DEVICES: RwLock<Vec<Arc<dyn DeviceMemory>>> = RwLock::new(Vec::new());

/// Registers a device so stats, scopes and [`clear_memory`](crate::clear_memory) include it.
/// A device with the same name replaces the earlier one.
pub fn register_device(device: Arc<dyn DeviceMemory>) {
    let mut devices = DEVICES.write().unwrap_or_else(|e| e.into_inner());
    devices.retain(|d| d.name() != device.name());
    devices.push(device);
}

/// Removes the device with this name; returns whether one was registered.
pub fn unregister_device(name: &str) -> bool {
    let mut devices = DEVICES.write().unwrap_or_else(|e| e.into_inner());
    let before = devices.len();
    devices.retain(|d| d.name() != name);
    devices.len() != before
}

/// The devices registered now. Empty in a CPU-only build.
pub fn devices() -> Vec<Arc<dyn DeviceMemory>> {
    DEVICES.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Reads every registered device. A device that fails to answer is left out of the list
/// and its error returned beside it, so one broken device does not hide the others.
pub(crate) fn read_all() -> (Vec<DeviceUsage>, Vec<String>) {
    let mut usages = Vec::new();
    let mut errors = Vec::new();
    for device in devices() {
        match device.usage() {
            Ok(u) => usages.push(u),
            Err(e) => errors.push(format!("{}: {e}", device.name())),
        }
    }
    (usages, errors)
}
