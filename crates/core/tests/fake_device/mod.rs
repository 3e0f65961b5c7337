//! A device with exact, scriptable counters, standing in for a CUDA pool in tests.

// Each test binary that includes this module uses a different part of it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex, MutexGuard};

use memwise::batch::WorkloadError;
use memwise::device::{DeviceMemory, DeviceUsage};
use memwise::Error;

#[derive(Debug, Default)]
struct Counters {
    used: u64,
    reserved: u64,
    peak_used: u64,
    peak_reserved: u64,
    release_threshold: Option<u64>,
    empty_cache_calls: u32,
}

/// A caching pool with a hard capacity: allocating past it fails as CUDA would.
#[derive(Debug)]
pub struct FakeDevice {
    name: String,
    capacity: u64,
    counters: Mutex<Counters>,
}

impl FakeDevice {
    pub fn new(name: &str, capacity: u64) -> Arc<Self> {
        Arc::new(FakeDevice {
            name: name.to_owned(),
            capacity,
            counters: Mutex::new(Counters::default()),
        })
    }

    fn counters(&self) -> MutexGuard<'_, Counters> {
        self.counters.lock().unwrap()
    }

    /// Takes `bytes` from the pool, or fails with out-of-memory past the capacity.
    pub fn alloc(&self, bytes: u64) -> Result<(), WorkloadError> {
        let mut c = self.counters();
        if c.used + bytes > self.capacity {
            return Err(WorkloadError::OutOfMemory(format!(
                "{}: tried to allocate {bytes} bytes with {} of {} in use",
                self.name, c.used, self.capacity
            )));
        }
        c.used += bytes;
        c.reserved = c.reserved.max(c.used);
        c.peak_used = c.peak_used.max(c.used);
        c.peak_reserved = c.peak_reserved.max(c.reserved);
        Ok(())
    }

    /// Gives `bytes` back to the pool, which keeps them cached (reserved).
    pub fn free(&self, bytes: u64) {
        self.counters().used -= bytes;
    }

    pub fn set_reserved(&self, reserved: u64) {
        let mut c = self.counters();
        c.reserved = reserved;
        c.peak_reserved = c.peak_reserved.max(reserved);
    }

    pub fn release_threshold(&self) -> Option<u64> {
        self.counters().release_threshold
    }

    pub fn empty_cache_calls(&self) -> u32 {
        self.counters().empty_cache_calls
    }
}

impl DeviceMemory for FakeDevice {
    fn name(&self) -> &str {
        &self.name
    }

    fn usage(&self) -> Result<DeviceUsage, Error> {
        let c = self.counters();
        Ok(DeviceUsage::new(self.name.clone(), c.used, c.reserved)
            .with_peaks(c.peak_used, c.peak_reserved)
            .with_total(self.capacity))
    }

    fn reset_peaks(&self) -> Result<(), Error> {
        let mut c = self.counters();
        c.peak_used = c.used;
        c.peak_reserved = c.reserved;
        Ok(())
    }

    fn empty_cache(&self) -> Result<u64, Error> {
        let mut c = self.counters();
        c.empty_cache_calls += 1;
        let released = c.reserved - c.used;
        c.reserved = c.used;
        Ok(released)
    }

    fn set_release_threshold(&self, bytes: u64) -> Result<bool, Error> {
        self.counters().release_threshold = Some(bytes);
        Ok(true)
    }
}
