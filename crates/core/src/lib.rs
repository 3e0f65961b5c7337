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
//!     let outputs = vec![1u8; 8 << 20]; // outputs = model(**inputs)
//!     drop(outputs);
//! }
//! let stats = get_memory_stats();
//! let record = stats.scopes_named("model_inference").last().unwrap();
//! if let Some(peak) = record.heap_peak_delta() {
//!     // Without the tracking allocator (as in this doctest) heap figures are unavailable.
//!     println!("model_inference needed {} MiB at its peak", peak >> 20);
//! }
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
//! let batch = vec![1f32; 1 << 20];
//! let results = vec![1f32; 1 << 18];
//! let report = clear_memory((batch, results)); // clear_memory([batch, results])
//! if let Some(rss) = report.freed.rss {
//!     println!("freed {} KiB of resident memory", rss >> 10);
//! }
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
//! use memwise::config::{get_config_origins, Source};
//! use memwise::{configure, get_config, optimize_memory_usage};
//! use serde_json::json;
//!
//! configure(json!({
//!     "memory": { "clean_weights_after_use": true, "gpu_batch_size": 8 }
//! }))
//! .unwrap();
//! assert_eq!(get_config().memory.gpu_batch_size, 8);
//! assert_eq!(
//!     get_config_origins().origin("memory.gpu_batch_size"),
//!     Some(&Source::Code)
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
//! # Where the rest lives
//!
//! The root holds the spec's names and the types met first; the rest is in modules:
//!
//! | module | what |
//! | --- | --- |
//! | [`config`] | [`Config`] and its sections, layers ([`config::Builder`]), origins ([`config::Source`]), errors ([`config::Error`]), byte sizes, scoped overrides |
//! | [`scope`] | [`MemoryTracker`] scopes, their records and aggregates, tracking switches |
//! | [`stats`] | [`MemoryStats`] and the process figures (`/proc`, glibc) it is built from |
//! | [`clear`] | [`clear_memory`] options, reports and reclaim hooks |
//! | [`alloc`] | [`TrackingAllocator`], heap counters, [`BlockCache`] |
//! | [`kind`] | the live heap by kind (weights, activations, KV cache, read-ahead), measured per thread |
//! | [`batch`] | [`batches`] and [`BatchSizeFinder`] with their meters and reports |
//! | [`device`] | the [`device::DeviceMemory`] trait and the device registry |
//! | [`report`] | report folders (stats JSON, a Chrome trace, an SVG timeline stacked by kind), the background sampler, comparing two runs |
//! | [`tracing_layer`] | a `tracing` layer that opens a scope for each span |
//!
//! # Accuracy
//!
//! Allocations of [`alloc::EXACT_THRESHOLD`] (64 KiB) or more are counted at once. Smaller ones are
//! batched per thread, so at any instant the heap figures may miss less than
//! [`alloc::FLUSH_BYTES`] (16 KiB) for each thread that allocated since its last fold; figures are
//! exact once threads exit or reach a scope boundary.
//!
//! # Platforms
//!
//! Process figures come from `/proc` on Linux and the allocator figures from glibc.
//! Elsewhere they are `None`: memwise never reports an unavailable figure as 0.
#![deny(missing_docs)]

pub mod alloc;
pub mod batch;
mod block_cache;
pub mod clear;
pub mod config;
pub mod device;
mod error;
pub mod kind;
mod process;
pub mod report;
pub mod scope;
pub mod stats;
pub mod tracing_layer;

pub use crate::alloc::{BlockCache, TrackingAllocator};
pub use crate::batch::{batches, BatchSizeFinder};
pub use crate::clear::{clear_memory, clear_memory_with, ClearOptions, ClearReport};
pub use crate::config::{
    configure, configure_with, get_config, init_config, load_config, optimize_memory_usage, Config,
};
pub use crate::error::{Error, ErrorKind, Result};
pub use crate::scope::{enable_memory_tracking, track, MemoryTracker};
pub use crate::stats::{get_memory_stats, reset_memory_stats, reset_peak_memory, MemoryStats};

/// The README's Rust snippets, compiled and run as doctests (the model pipeline, which needs
/// `memwise-model`, is marked `ignore` here and runs as that crate's example).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeSnippets;
