//! `MemoryTracker` scopes: exact peaks per named interval, nested and across threads.
//!
//! The allocator keeps one process-wide high-water mark. At every scope boundary (a scope
//! opening or closing, anywhere in the process) we take that mark, restart it at the live
//! count, and fold it into every scope open at that moment, all under one lock. Each scope
//! therefore ends with the maximum of live heap bytes over exactly its own interval,
//! including bytes allocated by other threads (rayon workers) while it was open. Registered
//! devices are folded the same way through their resettable pool high-water marks.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::kind::{self, Kind, KindBytes, KindScope};
use crate::process::ProcessMemory;
use crate::{alloc, device};

/// The default number of finished scope records kept (see [`set_record_capacity`]).
pub const DEFAULT_RECORD_CAPACITY: usize = 10_000;

static ENABLED: AtomicBool = AtomicBool::new(false);
/// Set once [`enable_memory_tracking`] has been called: from then on the configured default
/// (`memory.tracking.enabled`) no longer changes tracking.
static EXPLICIT: AtomicBool = AtomicBool::new(false);

/// Turns scope tracking on or off, process-wide (the spec's `enable_memory_tracking`).
///
/// While off, creating and dropping a [`MemoryTracker`] records nothing and costs one
/// relaxed atomic load. Heap counters keep running either way: they are the allocator's.
///
/// An explicit call wins over the configuration: once it has been made,
/// [`optimize_memory_usage`](crate::optimize_memory_usage) leaves tracking as this call set
/// it, whatever `memory.tracking.enabled` says.
pub fn enable_memory_tracking(enabled: bool) {
    EXPLICIT.store(true, Ordering::Relaxed);
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Applies the configured default (`memory.tracking.enabled`) unless
/// [`enable_memory_tracking`] was called. Returns whether tracking is on, and whether an
/// explicit call decided it.
pub(crate) fn apply_configured_tracking(enabled: bool) -> (bool, bool) {
    let explicit = EXPLICIT.load(Ordering::Relaxed);
    if !explicit {
        ENABLED.store(enabled, Ordering::Relaxed);
    }
    (ENABLED.load(Ordering::Relaxed), explicit)
}

/// Whether scope tracking is on.
pub fn memory_tracking_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Sets how many finished scope records are kept. When full, the oldest record is dropped
/// and counted in [`MemoryStats::dropped_records`](crate::MemoryStats::dropped_records);
/// the per-name aggregates still include it.
pub fn set_record_capacity(capacity: usize) {
    let mut reg = registry();
    reg.capacity = capacity;
    while reg.records.len() > capacity {
        reg.records.pop_front();
        reg.dropped += 1;
    }
}

/// A device's figures over one scope, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ScopeDevice {
    /// The device's name (`"cuda:0"`).
    pub device: String,
    /// Bytes in use when the scope opened.
    pub used_at_entry: u64,
    /// Bytes in use when the scope closed.
    pub used_at_exit: u64,
    /// The most bytes in use at any time while the scope was open.
    pub peak_used: u64,
    /// The most bytes reserved by the pool at any time while the scope was open.
    pub peak_reserved: u64,
}

impl ScopeDevice {
    /// How far usage rose above its value at entry.
    pub fn peak_delta(&self) -> u64 {
        self.peak_used.saturating_sub(self.used_at_entry)
    }
}

/// One finished scope.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ScopeRecord {
    /// Unique within the process, in opening order.
    pub id: u64,
    /// The name given to [`MemoryTracker::new`].
    pub name: String,
    /// The innermost scope open on the same thread when this one opened.
    pub parent: Option<u64>,
    /// The thread's name, or its id when it has none.
    pub thread: String,
    /// When the scope opened, measured from memwise's clock start: the first scope of the
    /// process, or an earlier reading of the [`report`](crate::report) sampler.
    pub start: Duration,
    /// How long it was open.
    pub duration: Duration,
    /// Live heap bytes at entry (`None` without the [`TrackingAllocator`](crate::TrackingAllocator)).
    pub heap_at_entry: Option<u64>,
    /// Live heap bytes at exit.
    pub heap_at_exit: Option<u64>,
    /// The most live heap bytes, process-wide, at any moment while the scope was open.
    pub heap_peak: Option<u64>,
    /// Resident memory when the scope opened (`None` where `/proc` is unavailable).
    pub rss_at_entry: Option<ProcessMemory>,
    /// Resident memory when it closed.
    pub rss_at_exit: Option<ProcessMemory>,
    /// Registered devices' figures over the scope.
    pub devices: Vec<ScopeDevice>,
    /// The [`Kind`] this scope's own heap bytes counted for
    /// ([`MemoryTracker::with_kind`]); `None` for a plain scope.
    pub kind: Option<Kind>,
    /// Heap bytes this scope's thread added to its kind while it was open (negative if it
    /// freed more), measured by the allocator; `None` for a plain scope or while nothing is
    /// attributed.
    pub kind_bytes: Option<i64>,
    /// Live heap bytes per kind, process-wide, when the scope opened (`None` without the
    /// [`TrackingAllocator`](crate::TrackingAllocator)).
    pub kinds_at_entry: Option<KindBytes>,
    /// Live heap bytes per kind when it closed.
    pub kinds_at_exit: Option<KindBytes>,
}

impl ScopeRecord {
    /// How far live heap rose above its value at entry: the memory this scope needed.
    pub fn heap_peak_delta(&self) -> Option<u64> {
        Some(self.heap_peak?.saturating_sub(self.heap_at_entry?))
    }

    /// Live heap at exit minus at entry (negative when the scope freed more than it kept).
    pub fn heap_retained(&self) -> Option<i64> {
        Some(self.heap_at_exit? as i64 - self.heap_at_entry? as i64)
    }
}

/// Figures for all finished scopes of one name.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[non_exhaustive]
pub struct ScopeAggregate {
    /// The scope name.
    pub name: String,
    /// How many scopes of this name finished.
    pub count: u64,
    /// The largest heap peak delta among them.
    pub max_heap_peak_delta: Option<u64>,
    /// The largest device peak delta among them, over all devices.
    pub max_device_peak_delta: Option<u64>,
    /// Their total time open.
    pub total_time: Duration,
}

struct OpenScope {
    id: u64,
    name: Cow<'static, str>,
    parent: Option<u64>,
    thread: String,
    start: Instant,
    heap_at_entry: i64,
    heap_peak: i64,
    rss_at_entry: Option<ProcessMemory>,
    devices: Vec<ScopeDevice>,
    kind: Option<Kind>,
    kinds_at_entry: KindBytes,
}

pub(crate) struct Registry {
    open: Vec<OpenScope>,
    records: VecDeque<ScopeRecord>,
    capacity: usize,
    dropped: u64,
    aggregates: BTreeMap<String, ScopeAggregate>,
    /// Heap high-water mark since start or the last reset, as folded at boundaries.
    heap_peak: i64,
    /// Device high-water marks (used, reserved) since the last reset, as folded at boundaries.
    device_peaks: BTreeMap<String, (u64, u64)>,
    next_id: u64,
}

/// memwise's clock: scope starts and sampler readings are measured from this instant, set
/// by whichever comes first (the first scope opened, or a report sampler starting).
pub(crate) fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

pub(crate) fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(|| {
            Mutex::new(Registry {
                open: Vec::new(),
                records: VecDeque::new(),
                capacity: DEFAULT_RECORD_CAPACITY,
                dropped: 0,
                aggregates: BTreeMap::new(),
                heap_peak: 0,
                device_peaks: BTreeMap::new(),
                next_id: 0,
            })
        })
        .lock()
        // A panic while holding the lock leaves only counters behind; they stay usable.
        .unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// Ids of the scopes open on this thread, innermost last.
    static THREAD_SCOPES: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

impl Registry {
    /// Takes the heap and device high-water marks since the last boundary, restarts them,
    /// and folds them into every open scope and the process-wide peaks.
    /// Returns the live heap and device readings at this boundary.
    fn boundary(&mut self) -> (i64, Vec<device::DeviceUsage>) {
        let (live, mark) = alloc::take_mark();
        self.heap_peak = self.heap_peak.max(mark);
        for scope in &mut self.open {
            scope.heap_peak = scope.heap_peak.max(mark);
        }
        let mut usages = Vec::new();
        for dev in device::devices() {
            // A device that cannot be read is left out of this boundary; the stats report
            // its error when they read it.
            let Ok(usage) = dev.usage() else { continue };
            let _ = dev.reset_peaks();
            let entry = self
                .device_peaks
                .entry(usage.device.clone())
                .or_insert((0, 0));
            entry.0 = entry.0.max(usage.peak_used);
            entry.1 = entry.1.max(usage.peak_reserved);
            for scope in &mut self.open {
                if let Some(d) = scope.devices.iter_mut().find(|d| d.device == usage.device) {
                    d.peak_used = d.peak_used.max(usage.peak_used);
                    d.peak_reserved = d.peak_reserved.max(usage.peak_reserved);
                }
            }
            usages.push(usage);
        }
        (live, usages)
    }

    /// Process-wide heap peak since the last reset, including the unfolded mark.
    pub(crate) fn heap_peak(&self) -> i64 {
        self.heap_peak.max(alloc::peek_mark())
    }

    pub(crate) fn device_peak(&self, name: &str) -> Option<(u64, u64)> {
        self.device_peaks.get(name).copied()
    }

    pub(crate) fn records(&self) -> (Vec<ScopeRecord>, u64) {
        (self.records.iter().cloned().collect(), self.dropped)
    }

    pub(crate) fn aggregates(&self) -> Vec<ScopeAggregate> {
        self.aggregates.values().cloned().collect()
    }

    /// Restarts every process-wide high-water mark at the current value.
    pub(crate) fn reset_peaks(&mut self) {
        let (live, usages) = self.boundary();
        self.heap_peak = live;
        for usage in usages {
            self.device_peaks
                .insert(usage.device, (usage.used, usage.reserved));
        }
    }

    /// Forgets finished records and aggregates (open scopes are kept).
    pub(crate) fn clear_records(&mut self) {
        self.records.clear();
        self.aggregates.clear();
        self.dropped = 0;
    }

    fn open(&mut self, name: Cow<'static, str>, kind: Option<Kind>) -> u64 {
        // Everything the bookkeeping allocates happens before the boundary, so the scope's
        // entry figure already includes it and a scope that frees what it allocates ends
        // with exit == entry.
        let rss_at_entry = ProcessMemory::read();
        let thread = std::thread::current();
        let thread = match thread.name() {
            Some(n) => n.to_owned(),
            None => format!("{:?}", thread.id()),
        };
        self.open.reserve(1);
        let id = self.next_id;
        self.next_id += 1;
        let parent = THREAD_SCOPES.with(|s| {
            let mut s = s.borrow_mut();
            let parent = s.last().copied();
            s.push(id);
            parent
        });
        let (live, usages) = self.boundary();
        let now = Instant::now();
        epoch();
        self.open.push(OpenScope {
            id,
            name,
            parent,
            thread,
            start: now,
            heap_at_entry: live,
            heap_peak: live,
            rss_at_entry,
            kind,
            kinds_at_entry: kind::held(),
            devices: usages
                .into_iter()
                .map(|u| ScopeDevice {
                    device: u.device,
                    used_at_entry: u.used,
                    used_at_exit: u.used,
                    peak_used: u.used,
                    peak_reserved: u.reserved,
                })
                .collect(),
        });
        id
    }

    fn close(&mut self, id: u64, kind_bytes: Option<i64>) {
        let rss_at_exit = ProcessMemory::read();
        let (live, usages) = self.boundary();
        THREAD_SCOPES.with(|s| s.borrow_mut().retain(|&open| open != id));
        let Some(pos) = self.open.iter().position(|s| s.id == id) else {
            return;
        };
        let scope = self.open.remove(pos);
        let mut devices = scope.devices;
        for d in &mut devices {
            if let Some(u) = usages.iter().find(|u| u.device == d.device) {
                d.used_at_exit = u.used;
            }
        }
        let heap_known = alloc::tracking_allocator_installed();
        let to_u64 = |v: i64| heap_known.then_some(v.max(0) as u64);
        let record = ScopeRecord {
            id,
            name: scope.name.into_owned(),
            parent: scope.parent,
            thread: scope.thread,
            start: scope.start.saturating_duration_since(epoch()),
            duration: scope.start.elapsed(),
            heap_at_entry: to_u64(scope.heap_at_entry),
            heap_at_exit: to_u64(live),
            heap_peak: to_u64(scope.heap_peak),
            rss_at_entry: scope.rss_at_entry,
            rss_at_exit,
            devices,
            kind: scope.kind,
            kind_bytes,
            kinds_at_entry: heap_known.then_some(scope.kinds_at_entry),
            kinds_at_exit: heap_known.then(kind::held),
        };
        self.aggregate(&record);
        if self.capacity == 0 {
            self.dropped += 1;
            return;
        }
        if self.records.len() >= self.capacity {
            self.records.pop_front();
            self.dropped += 1;
        }
        self.records.push_back(record);
    }

    fn aggregate(&mut self, record: &ScopeRecord) {
        let agg = self
            .aggregates
            .entry(record.name.clone())
            .or_insert_with(|| ScopeAggregate {
                name: record.name.clone(),
                ..ScopeAggregate::default()
            });
        agg.count += 1;
        agg.total_time += record.duration;
        agg.max_heap_peak_delta = agg.max_heap_peak_delta.max(record.heap_peak_delta());
        let device_delta = record.devices.iter().map(ScopeDevice::peak_delta).max();
        agg.max_device_peak_delta = agg.max_device_peak_delta.max(device_delta);
    }
}

/// A named scope whose memory is recorded when it ends (the spec's `with MemoryTracker(..)`).
///
/// Create it at the start of the work and let it drop at the end. The record (see
/// [`ScopeRecord`]) holds the exact peak of live heap bytes while it was open, not just the
/// figures at its edges. Scopes nest, and scopes on different threads may overlap.
///
/// ```
/// use memwise::{enable_memory_tracking, get_memory_stats, MemoryTracker};
///
/// enable_memory_tracking(true);
/// {
///     let _scope = MemoryTracker::new("model_inference");
///     let outputs = vec![0f32; 1 << 20];
///     drop(outputs);
/// }
/// let stats = get_memory_stats();
/// let record = stats.scopes.iter().find(|r| r.name == "model_inference").unwrap();
/// println!("needed {:?} bytes", record.heap_peak_delta());
/// ```
///
/// The guard is not `Send`: a scope belongs to the thread that opened it.
#[must_use = "the scope ends when this guard is dropped"]
pub struct MemoryTracker {
    id: Option<u64>,
    kind: Option<KindScope>,
    _not_send: PhantomData<*const ()>,
}

impl MemoryTracker {
    /// Opens a scope named `name`. Records nothing while tracking is off.
    #[inline]
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        let id = memory_tracking_enabled().then(|| registry().open(name.into(), None));
        MemoryTracker {
            id,
            kind: None,
            _not_send: PhantomData,
        }
    }

    /// Opens a scope named `name` whose thread's heap bytes count for `kind` while it is
    /// open (see [`crate::kind`]): its record says how many, and reports stack the live
    /// heap by kind. Records and attributes nothing while tracking is off.
    ///
    /// ```
    /// use memwise::kind::Kind;
    /// use memwise::MemoryTracker;
    ///
    /// memwise::enable_memory_tracking(true);
    /// let weights = {
    ///     let _read = MemoryTracker::with_kind("layer.0:read", Kind::Weights);
    ///     vec![0f32; 1 << 18]
    /// };
    /// let stats = memwise::get_memory_stats();
    /// let record = stats.scopes_named("layer.0:read").last().unwrap();
    /// assert_eq!(record.kind, Some(Kind::Weights));
    /// # drop(weights);
    /// ```
    #[inline]
    pub fn with_kind(name: impl Into<Cow<'static, str>>, kind: Kind) -> Self {
        if !memory_tracking_enabled() {
            return MemoryTracker::new(name);
        }
        // The record's bookkeeping is allocated before the kind begins, so it is not counted.
        let id = registry().open(name.into(), Some(kind));
        MemoryTracker {
            id: Some(id),
            kind: Some(kind::enter(kind)),
            _not_send: PhantomData,
        }
    }

    /// Heap bytes this scope's thread has added to its kind so far (see
    /// [`KindScope::held_so_far`]), or `None` for a plain scope or while nothing is
    /// attributed.
    pub fn kind_bytes_so_far(&self) -> Option<i64> {
        self.kind.as_ref()?.held_so_far()
    }

    /// Whether this scope is being recorded.
    pub fn is_recording(&self) -> bool {
        self.id.is_some()
    }

    /// Live heap bytes above this scope's entry value at its highest so far, or `None` if the
    /// scope is not recording or the tracking allocator is not installed.
    pub fn peak_delta_so_far(&self) -> Option<u64> {
        let id = self.id?;
        if !alloc::tracking_allocator_installed() {
            return None;
        }
        let mut reg = registry();
        reg.boundary();
        let scope = reg.open.iter().find(|s| s.id == id)?;
        Some((scope.heap_peak - scope.heap_at_entry).max(0) as u64)
    }
}

impl Drop for MemoryTracker {
    #[inline]
    fn drop(&mut self) {
        // The kind ends first, so the record's figures at exit include its bytes.
        let kind_bytes = self.kind.take().and_then(|k| {
            let held = k.held_so_far();
            drop(k);
            held
        });
        if let Some(id) = self.id {
            registry().close(id, kind_bytes);
        }
    }
}

impl std::fmt::Debug for MemoryTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTracker")
            .field("id", &self.id)
            .finish()
    }
}

/// Runs `work` inside a [`MemoryTracker`] scope named `name` and returns its result.
///
/// ```
/// let sum: u64 = memwise::track("sum", || (0..1000u64).sum());
/// assert_eq!(sum, 499_500);
/// ```
pub fn track<R>(name: impl Into<Cow<'static, str>>, work: impl FnOnce() -> R) -> R {
    let _scope = MemoryTracker::new(name);
    work()
}
