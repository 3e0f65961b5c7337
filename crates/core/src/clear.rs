//! `clear_memory`: drop a value, give memory back, and measure what came back.
//!
//! Python's `clear_memory(tensor)` cannot free the caller's tensor: the caller still holds
//! a reference. Here the value is moved in, so it is really dropped. Then registered
//! reclaim hooks run (a tensor cache, a pool), the C allocator returns whole free pages to
//! the OS, and, when asked, device caches are emptied. The report is read from the heap
//! counters and `/proc` before and after, not assumed.

use std::sync::{Arc, RwLock};

use serde::Serialize;

use crate::alloc;
use crate::device;
use crate::process::{self, ProcessMemory};

/// What [`clear_memory_with`] does beyond dropping the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClearOptions {
    /// Run the hooks added with [`register_reclaim_hook`]. Default: true.
    pub run_reclaim_hooks: bool,
    /// Return free heap pages to the OS (`malloc_trim(0)` on glibc). Default: true.
    pub trim_allocator: bool,
    /// Return cached device blocks to the driver (`torch.cuda.empty_cache()`). Default: false.
    pub empty_device_cache: bool,
    /// Keep the blocks a [`BlockCache`](crate::BlockCache) holds for the next stage while
    /// trimming (a cleanup between steps of a loop that streams the same stages again).
    /// Default: false, they are given back too.
    pub keep_block_cache: bool,
}

impl Default for ClearOptions {
    fn default() -> Self {
        ClearOptions {
            run_reclaim_hooks: true,
            trim_allocator: true,
            empty_device_cache: false,
            keep_block_cache: false,
        }
    }
}

impl ClearOptions {
    /// The defaults, but keeping the block cache: the cleanup between steps of a loop that
    /// streams the same stages again (generation).
    pub fn between_steps() -> Self {
        ClearOptions {
            keep_block_cache: true,
            ..ClearOptions::default()
        }
    }

    /// The defaults plus emptying device caches (the spec's `force_cuda_empty_cache=True`).
    pub fn with_device_cache() -> Self {
        ClearOptions {
            empty_device_cache: true,
            ..ClearOptions::default()
        }
    }
}

/// Memory figures at one instant, in bytes. `None` where unavailable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct MemorySnapshot {
    /// Live heap bytes (needs the [`TrackingAllocator`](crate::TrackingAllocator)).
    pub heap: Option<u64>,
    /// Resident memory.
    pub process: Option<ProcessMemory>,
    /// Free bytes held by the C allocator.
    pub allocator_free: Option<u64>,
    /// Bytes reserved by all registered devices' pools together; `None` without a device.
    pub device_reserved: Option<u64>,
}

impl MemorySnapshot {
    /// Reads the figures now.
    pub fn now() -> Self {
        let (devices, _) = device::read_all();
        MemorySnapshot {
            heap: alloc::tracking_allocator_installed().then(|| alloc::live_bytes().max(0) as u64),
            process: ProcessMemory::read(),
            allocator_free: process::allocator_free_bytes(),
            device_reserved: (!devices.is_empty())
                .then(|| devices.iter().map(|d| d.reserved).sum()),
        }
    }
}

/// What a clear gave back: `before - after` for each figure; negative if it grew.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Freed {
    /// Live heap bytes released.
    pub heap: Option<i64>,
    /// Resident bytes returned to the OS.
    pub rss: Option<i64>,
    /// Resident anonymous bytes returned to the OS.
    pub rss_anon: Option<i64>,
    /// Device pool bytes returned to the driver.
    pub device_reserved: Option<i64>,
}

/// The measured result of [`clear_memory`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ClearReport {
    /// Figures before the value was dropped.
    pub before: MemorySnapshot,
    /// Figures after everything ran.
    pub after: MemorySnapshot,
    /// `before - after`.
    pub freed: Freed,
    /// Each reclaim hook that ran, with the bytes it reported releasing.
    pub hooks: Vec<(String, u64)>,
    /// Whether the C allocator was asked to return free pages.
    pub trimmed: bool,
    /// Errors from device caches that could not be emptied.
    pub errors: Vec<String>,
}

/// A function that releases memory a cache holds, returning the bytes it released.
pub type ReclaimHook = Arc<dyn Fn() -> u64 + Send + Sync>;

static HOOKS: RwLock<Vec<(String, ReclaimHook)>> = RwLock::new(Vec::new());

/// Adds a hook that [`clear_memory`] runs, so a tensor cache or a pool can give memory back.
/// A hook with the same name replaces the earlier one.
pub fn register_reclaim_hook(
    name: impl Into<String>,
    hook: impl Fn() -> u64 + Send + Sync + 'static,
) {
    let name = name.into();
    let mut hooks = HOOKS.write().unwrap_or_else(|e| e.into_inner());
    hooks.retain(|(n, _)| *n != name);
    hooks.push((name, Arc::new(hook)));
}

/// Removes the reclaim hook with this name; returns whether there was one.
pub fn unregister_reclaim_hook(name: &str) -> bool {
    let mut hooks = HOOKS.write().unwrap_or_else(|e| e.into_inner());
    let before = hooks.len();
    hooks.retain(|(n, _)| n != name);
    hooks.len() != before
}

/// Drops `value`, runs the reclaim hooks, returns free heap pages to the OS, and reports
/// what was freed (the spec's `clear_memory(tensor)`).
///
/// Takes anything by value: a tensor, a `Vec`, a tuple of several, or `()` to clean up
/// without dropping anything (the spec's `clear_memory()`).
///
/// ```
/// use memwise::clear_memory;
///
/// let activations = vec![0f32; 1 << 20];
/// let logits = vec![0f32; 1 << 16];
/// let report = clear_memory((activations, logits));
/// if let Some(rss) = report.freed.rss {
///     println!("returned {rss} bytes to the OS");
/// }
/// ```
pub fn clear_memory<T>(value: T) -> ClearReport {
    clear_memory_with(value, ClearOptions::default())
}

/// [`clear_memory`] with options, e.g. emptying device caches:
///
/// ```
/// use memwise::{clear_memory_with, ClearOptions};
///
/// // The spec's clear_memory(force_cuda_empty_cache=True):
/// let report = clear_memory_with((), ClearOptions::with_device_cache());
/// assert!(report.trimmed || cfg!(not(all(target_os = "linux", target_env = "gnu"))));
/// ```
pub fn clear_memory_with<T>(value: T, options: ClearOptions) -> ClearReport {
    let before = MemorySnapshot::now();
    drop(value);

    let mut hooks = Vec::new();
    if options.run_reclaim_hooks {
        let registered: Vec<_> = HOOKS.read().unwrap_or_else(|e| e.into_inner()).clone();
        for (name, hook) in registered {
            hooks.push((name, hook()));
        }
    }
    if options.trim_allocator && !options.keep_block_cache {
        // Blocks kept for reuse are memory no one holds: give them back before trimming.
        crate::block_cache::release_block_cache();
    }
    let trimmed = options.trim_allocator && process::trim_allocator();
    let mut errors = Vec::new();
    if options.empty_device_cache {
        for dev in device::devices() {
            if let Err(e) = dev.empty_cache() {
                errors.push(format!("{}: {e}", dev.name()));
            }
        }
    }

    let after = MemorySnapshot::now();
    let diff = |b: Option<u64>, a: Option<u64>| Some(b? as i64 - a? as i64);
    let freed = Freed {
        heap: diff(before.heap, after.heap),
        rss: diff(before.process.map(|p| p.rss), after.process.map(|p| p.rss)),
        rss_anon: diff(
            before.process.map(|p| p.rss_anon),
            after.process.map(|p| p.rss_anon),
        ),
        device_reserved: diff(before.device_reserved, after.device_reserved),
    };
    ClearReport {
        before,
        after,
        freed,
        hooks,
        trimmed,
        errors,
    }
}
