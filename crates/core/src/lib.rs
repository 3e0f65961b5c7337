//! memwise: one place to manage memory in ML workloads.
//!
//! It tells you exactly where memory went, gives it back when you are done, and measures
//! that it did. This crate is the core: heap accounting with true peaks, `MemoryTracker`
//! scopes, measured cleanup and the device trait. It has no ML dependencies; the model
//! runner lives in `memwise-model`.
//!
//! # Usage
//!
//! Install the tracking allocator in your binary (a library cannot do it for you):
//!
//! ```
//! #[global_allocator]
//! static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();
//! ```
//!
//! Then the spec's API reads the same in Rust. Track a scope; its record holds the exact
//! peak of live heap while it was open, not a sample at its edges:
//!
//! ```
//! use memwise::{enable_memory_tracking, get_memory_stats, MemoryTracker};
//!
//! enable_memory_tracking(true);
//! {
//!     let _t = MemoryTracker::new("model_inference");
//!     let outputs = vec![0u8; 8 << 20]; // outputs = model(**inputs)
//!     drop(outputs);
//! }
//! let stats = get_memory_stats();
//! let record = stats.scopes_named("model_inference").last().unwrap();
//! println!("model_inference needed {:?} bytes at its peak", record.heap_peak_delta());
//! match stats.peak_gpu_mb() {
//!     Some(mb) => println!("Peak GPU memory: {mb:.1} MB"),
//!     None => println!("no device registered in this build"),
//! }
//! ```
//!
//! Drop values and give memory back, with a measured report:
//!
//! ```
//! use memwise::{clear_memory, clear_memory_with, ClearOptions};
//!
//! let batch = vec![0f32; 1 << 20];
//! let results = vec![0f32; 1 << 18];
//! let report = clear_memory((batch, results)); // clear_memory([batch, results])
//! println!("freed {:?} resident bytes", report.freed.rss);
//!
//! // torch.cuda.empty_cache() becomes:
//! clear_memory_with((), ClearOptions::with_device_cache());
//! ```
//!
//! # Configuration
//!
//! One typed [`Config`], built from layers (defaults < a TOML or JSON file named by
//! `MEMWISE_CONFIG` or [`load_config`] < `MEMWISE_*` environment variables < code), every
//! value checked against its key, and every value's origin known. A refused update changes
//! nothing, and its error names the key and where the bad value came from:
//!
//! ```
//! use memwise::{configure, get_config, get_config_origins, optimize_memory_usage, ConfigSource};
//! use serde_json::json;
//!
//! configure(json!({
//!     "memory": { "clean_weights_after_use": true, "use_cpu_offload": true, "gpu_batch_size": 8 }
//! }))
//! .unwrap();
//! assert_eq!(get_config().memory.gpu_batch_size, 8);
//! assert_eq!(
//!     get_config_origins().origin("memory.gpu_batch_size"),
//!     Some(&ConfigSource::Code)
//! );
//!
//! let err = configure(json!({ "memory": { "gpu_bach_size": 4 } })).unwrap_err();
//! assert!(err.to_string().contains("did you mean memory.gpu_batch_size?"));
//!
//! let report = optimize_memory_usage(); // applies tracking, trim and device policy
//! println!("{report}");
//! ```
//!
//! Process data in configured batches, each one a scope, with cleanup between them, or let
//! [`BatchSizeFinder`] measure two small batches and predict the largest that fits:
//!
//! ```
//! for batch in memwise::batches(0..100u32, memwise::get_config().memory.gpu_batch_size) {
//!     let results: Vec<u32> = batch.iter().map(|x| x * 2).collect();
//!     # assert!(!results.is_empty());
//! }
//! ```
//!
//! # Accuracy
//!
//! Allocations of [`EXACT_THRESHOLD`] (64 KiB) or more are counted at once. Smaller ones are
//! batched per thread, so at any instant the heap figures may miss less than
//! [`FLUSH_BYTES`] (16 KiB) for each thread that allocated since its last fold; figures are
//! exact once threads exit or reach a scope boundary.
//!
//! # Platforms
//!
//! Process figures come from `/proc` on Linux and the allocator figures from glibc.
//! Elsewhere they are `None`: memwise never reports an unavailable figure as 0.
#![deny(missing_docs)]

mod alloc;
mod block_cache;
mod clear;
mod device;
mod error;
mod process;
mod scope;
mod stats;

pub use crate::alloc::{
    heap_totals, thread_heap_totals, tracking_allocator_installed, HeapTotals, TrackingAllocator,
    EXACT_THRESHOLD, FLUSH_BYTES, FLUSH_OPS,
};
pub use crate::block_cache::{
    block_cache_bytes, block_cache_capacity, release_block_cache, set_block_cache_capacity,
    BlockCache, BLOCK_CACHE_MIN,
};
pub use crate::clear::{
    clear_memory, clear_memory_with, register_reclaim_hook, unregister_reclaim_hook, ClearOptions,
    ClearReport, Freed, MemorySnapshot, ReclaimHook,
};
pub use crate::device::{devices, register_device, unregister_device, DeviceMemory, DeviceUsage};
pub use crate::error::{Error, ErrorKind};
pub use crate::process::{allocator_free_bytes, reset_rss_peak, trim_allocator, ProcessMemory};
pub use crate::scope::{
    enable_memory_tracking, memory_tracking_enabled, set_record_capacity, track, MemoryTracker,
    ScopeAggregate, ScopeDevice, ScopeRecord, DEFAULT_RECORD_CAPACITY,
};
pub use crate::stats::{
    get_memory_stats, reset_memory_stats, reset_peak_memory, HeapStats, MemoryStats,
};

mod batch;
mod config;

pub use crate::batch::{
    batches, Batch, BatchSizeFinder, BatchSizeReport, Batches, DevicePeak, HeapPeak, Measured,
    PeakMeter, ProbeOutcome, ProbeRun, WorkloadError,
};
pub use crate::config::{
    configure, configure_with, env_var_for, get_config, get_config_origins, init_config,
    load_config, optimize_memory_usage, optimize_memory_usage_with, reset_config, save_config,
    ByteSize, ByteSizeError, Config, ConfigBuilder, ConfigEntry, ConfigError, ConfigErrorKind,
    ConfigSource, Device, ExportConfig, ExportFormat, LogLevel, MemoryConfig, OptimizeReport,
    QuantizationConfig, ResolvedConfig, TrackingConfig, CONFIG_FILE_VAR, ENV_PREFIX,
};
