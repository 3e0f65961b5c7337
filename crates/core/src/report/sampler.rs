//! Readings taken between scope edges: live heap, resident memory and devices over time,
//! from a background thread into a ring of bounded size.
//!
//! Scope records hold figures at their edges only; resident memory (and a device pool)
//! changes between them without an allocation memwise sees, e.g. as mapped checkpoint pages
//! are touched. The [`Sampler`] reads those figures at an interval. Its [`SampleRing`] keeps
//! at most a fixed number of readings: when full it drops every other one and from then on
//! keeps one reading in twice as many, so a day-long job's report stays the same size, at a
//! coarser but still even resolution.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Serialize;

use crate::kind::{self, KindBytes};
use crate::stats::ProcessMemory;
use crate::{alloc, device, scope};

/// The interval a [`Sampler`] reads at by default (`memory.tracking.sample_interval_ms`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);
/// The number of readings a [`SampleRing`] keeps by default (`memory.tracking.sample_capacity`).
pub const DEFAULT_CAPACITY: usize = 4096;

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
    /// Live heap bytes per [`Kind`](crate::kind::Kind) (`None` without the
    /// [`TrackingAllocator`](crate::TrackingAllocator)).
    pub kinds: Option<KindBytes>,
}

impl Sample {
    /// A reading taken `at` with the given figures (for tests and other sources).
    pub fn new(at: Duration, heap: Option<u64>, process: Option<ProcessMemory>) -> Self {
        Sample {
            at,
            heap,
            process,
            devices: Vec::new(),
            kinds: None,
        }
    }

    /// The same reading with live heap bytes per kind.
    pub fn with_kinds(mut self, kinds: Option<KindBytes>) -> Self {
        self.kinds = kinds;
        self
    }
}

impl Sample {
    /// Reads live heap, resident memory and every registered device now.
    pub fn now() -> Self {
        let mut sample =
            Sample::new(Duration::ZERO, heap_now(), ProcessMemory::read()).with_kinds(kinds_now());
        sample.devices = devices_now();
        sample.at = scope::epoch().elapsed();
        sample
    }
}

fn heap_now() -> Option<u64> {
    alloc::tracking_allocator_installed().then(|| alloc::live_bytes().max(0) as u64)
}

fn kinds_now() -> Option<KindBytes> {
    alloc::tracking_allocator_installed().then(kind::held)
}

fn devices_now() -> Vec<(String, u64)> {
    device::devices()
        .iter()
        .filter_map(|d| d.usage().ok().map(|u| (u.device, u.used)))
        .collect()
}

/// Readings at an even resolution, never more than a fixed number of them.
///
/// Of the readings offered, one in [`stride`](Self::stride) is kept: the 0th, the
/// stride-th, and so on. When the ring is full the stride doubles and every other kept
/// reading is dropped.
#[derive(Debug, Clone)]
pub struct SampleRing {
    samples: Vec<Sample>,
    capacity: usize,
    stride: u64,
    offered: u64,
}

impl SampleRing {
    /// An empty ring that keeps at most `capacity` readings (at least 2).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(2);
        SampleRing {
            samples: Vec::with_capacity(capacity),
            capacity,
            stride: 1,
            offered: 0,
        }
    }

    /// Offers a reading; it is kept if it falls on the current stride.
    pub fn push(&mut self, sample: Sample) {
        let n = self.offered;
        self.offered += 1;
        if n % self.stride != 0 {
            return;
        }
        if self.samples.len() >= self.capacity {
            let mut keep = false;
            self.samples.retain(|_| {
                keep = !keep;
                keep
            });
            self.stride *= 2;
            if n % self.stride != 0 {
                return;
            }
        }
        self.samples.push(sample);
    }

    /// The kept readings, oldest first.
    pub fn samples(&self) -> &[Sample] {
        &self.samples
    }

    /// The most readings kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// One reading in this many offered is kept.
    pub fn stride(&self) -> u64 {
        self.stride
    }

    /// How many readings were offered.
    pub fn offered(&self) -> u64 {
        self.offered
    }
}

struct Shared {
    ring: Mutex<SampleRing>,
    stopped: Mutex<bool>,
    wake: Condvar,
}

/// A background thread that reads [`Sample`]s at an interval into a [`SampleRing`].
///
/// It reads only while scope tracking is on
/// ([`enable_memory_tracking`](crate::enable_memory_tracking)); while off it sleeps. Each
/// reading re-reads `/proc/self/status` through one open file into one buffer, so without
/// registered devices it allocates nothing. Dropping it stops the thread.
///
/// ```
/// use std::time::Duration;
/// use memwise::report::{self, ReportOptions, Sampler};
///
/// memwise::enable_memory_tracking(true);
/// let sampler = Sampler::start(Duration::from_millis(1), 1024);
/// memwise::track("work", || std::thread::sleep(Duration::from_millis(5)));
/// let options = ReportOptions::new().samples(sampler.stop());
/// # let dir = std::env::temp_dir().join("memwise-sampler-doctest");
/// report::write(&dir, &memwise::get_memory_stats(), &options).unwrap();
/// ```
pub struct Sampler {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    interval: Duration,
}

impl Sampler {
    /// Starts reading at the configured interval, keeping at most the configured number of
    /// readings: `memory.tracking.sample_interval_ms` and `memory.tracking.sample_capacity`
    /// of [`get_config`](crate::get_config).
    ///
    /// ```
    /// memwise::configure(serde_json::json!({
    ///     "memory.tracking.sample_interval_ms": 5,
    ///     "memory.tracking.sample_capacity": 100,
    /// }))
    /// .unwrap();
    /// let sampler = memwise::report::Sampler::configured();
    /// assert_eq!(sampler.interval(), std::time::Duration::from_millis(5));
    /// assert_eq!(sampler.capacity(), 100);
    /// ```
    pub fn configured() -> Sampler {
        let config = crate::get_config();
        let tracking = &config.memory.tracking;
        Sampler::start(tracking.sample_interval(), tracking.sample_capacity)
    }

    /// Starts reading every `interval`, keeping at most `capacity` readings.
    pub fn start(interval: Duration, capacity: usize) -> Sampler {
        scope::epoch();
        let shared = Arc::new(Shared {
            ring: Mutex::new(SampleRing::new(capacity)),
            stopped: Mutex::new(false),
            wake: Condvar::new(),
        });
        let inner = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("memwise-sampler".into())
            .spawn(move || sample_until_stopped(&inner, interval))
            .ok();
        Sampler {
            shared,
            thread,
            interval,
        }
    }

    /// How often it reads.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The most readings it keeps.
    pub fn capacity(&self) -> usize {
        self.ring().capacity()
    }

    /// The readings so far, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.ring().samples().to_vec()
    }

    /// Stops the thread and returns its readings, oldest first.
    pub fn stop(mut self) -> Vec<Sample> {
        self.halt();
        self.samples()
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, SampleRing> {
        self.shared
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn halt(&mut self) {
        *self
            .shared
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.halt();
    }
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.ring();
        f.debug_struct("Sampler")
            .field("samples", &ring.samples().len())
            .field("stride", &ring.stride())
            .finish()
    }
}

fn sample_until_stopped(shared: &Shared, interval: Duration) {
    let mut status = StatusReader::new();
    loop {
        if scope::memory_tracking_enabled() {
            let mut sample =
                Sample::new(Duration::ZERO, heap_now(), status.read()).with_kinds(kinds_now());
            sample.devices = devices_now();
            sample.at = scope::epoch().elapsed();
            shared
                .ring
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(sample);
        }
        let stopped = shared
            .stopped
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (stopped, _) = shared
            .wake
            .wait_timeout_while(stopped, interval, |stopped| !*stopped)
            .unwrap_or_else(PoisonError::into_inner);
        if *stopped {
            return;
        }
    }
}

/// `/proc/self/status` kept open and re-read from offset 0 into one buffer.
struct StatusReader {
    #[cfg(unix)]
    file: Option<std::fs::File>,
    buf: Vec<u8>,
}

impl StatusReader {
    fn new() -> Self {
        StatusReader {
            #[cfg(unix)]
            file: std::fs::File::open("/proc/self/status").ok(),
            buf: vec![0; 16 << 10],
        }
    }

    #[cfg(unix)]
    fn read(&mut self) -> Option<ProcessMemory> {
        use std::os::unix::fs::FileExt as _;
        let file = self.file.as_ref()?;
        let mut len = 0;
        while len < self.buf.len() {
            match file.read_at(&mut self.buf[len..], len as u64) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(_) => return None,
            }
        }
        ProcessMemory::parse(std::str::from_utf8(&self.buf[..len]).ok()?)
    }

    #[cfg(not(unix))]
    fn read(&mut self) -> Option<ProcessMemory> {
        let _ = &self.buf;
        ProcessMemory::read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64) -> Sample {
        Sample::new(Duration::from_millis(ms), Some(ms), None)
    }

    #[test]
    fn the_ring_never_exceeds_its_capacity_and_stays_even() {
        let mut ring = SampleRing::new(64);
        for i in 0..1_000_000 {
            ring.push(at(i));
            assert!(ring.samples().len() <= 64);
        }
        let kept: Vec<u64> = ring.samples().iter().map(|s| s.heap.unwrap()).collect();
        let stride = ring.stride();
        assert!(
            stride > 1 && kept.len() >= 32,
            "{} kept at stride {stride}",
            kept.len()
        );
        assert_eq!(kept[0], 0, "the first reading is kept");
        assert!(
            kept.windows(2).all(|w| w[1] - w[0] == stride),
            "evenly spaced"
        );
        assert!(
            999_999 - kept.last().unwrap() < stride,
            "the latest stride is covered"
        );
        assert_eq!(ring.offered(), 1_000_000);
    }

    #[test]
    fn a_ring_under_capacity_keeps_everything() {
        let mut ring = SampleRing::new(10);
        (0..10).for_each(|i| ring.push(at(i)));
        assert_eq!(ring.samples().len(), 10);
        assert_eq!(ring.stride(), 1);
        ring.push(at(10));
        let kept: Vec<u64> = ring.samples().iter().map(|s| s.heap.unwrap()).collect();
        assert_eq!(kept, [0, 2, 4, 6, 8, 10]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_status_reader_reads_again_and_again() {
        let mut reader = StatusReader::new();
        for _ in 0..3 {
            let m = reader.read().expect("/proc/self/status");
            assert!(m.rss > 0);
        }
    }
}
