//! What the live heap is made of: bytes attributed to a [`Kind`] (weights, activations,
//! KV cache, read-ahead) by the code that allocated them, measured by the allocator.
//!
//! A thread enters a kind with [`enter`] (or opens a scope with
//! [`MemoryTracker::with_kind`](crate::MemoryTracker::with_kind)); until the guard drops,
//! every byte the thread allocates counts for that kind and every byte it frees counts
//! against it. The figure is the thread's own exact heap totals
//! ([`thread_heap_totals`](crate::alloc::thread_heap_totals)), taken at the guard's edges,
//! so nothing is estimated and the hot path of the allocator is untouched. Kinds nest: the
//! innermost one open on a thread gets the bytes. When ownership of bytes moves to another
//! kind without an allocation (a stage read ahead on one thread becomes the running stage's
//! weights on another), [`hand_over`] moves the figure the reading measured.
//!
//! [`held`] is the process-wide figure per kind; the rest of the live heap is "other". It
//! changes at guard edges only, so a long allocation inside one guard shows when it ends.
//! Nothing is attributed while tracking is off or without the
//! [`TrackingAllocator`](crate::TrackingAllocator).
//!
//! ```
//! use memwise::kind::{self, Kind};
//!
//! # #[global_allocator]
//! # static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();
//! memwise::enable_memory_tracking(true);
//! let before = kind::held().get(Kind::Weights);
//! let weights = {
//!     let _weights = kind::enter(Kind::Weights);
//!     vec![1u8; 1 << 20]
//! };
//! assert_eq!(kind::held().get(Kind::Weights) - before, 1 << 20);
//! drop(weights); // outside the guard: the bytes stay counted until freed under one
//! ```

use std::cell::Cell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicI64, Ordering};

use serde::Serialize;

use crate::alloc;

/// What a block of memory holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Kind {
    /// A model's weights in use or kept resident.
    Weights,
    /// Intermediate values of a computation.
    Activations,
    /// A decoder's cached keys and values.
    KvCache,
    /// Weights read ahead of the stage that will use them.
    ReadAhead,
}

impl Kind {
    /// Every kind, in the order timelines stack them (bottom first).
    pub const ALL: [Kind; 4] = [
        Kind::Weights,
        Kind::ReadAhead,
        Kind::KvCache,
        Kind::Activations,
    ];

    /// The name reports use (`weights`, `activations`, `kv_cache`, `read_ahead`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Weights => "weights",
            Kind::Activations => "activations",
            Kind::KvCache => "kv_cache",
            Kind::ReadAhead => "read_ahead",
        }
    }

    fn index(self) -> usize {
        match self {
            Kind::Weights => 0,
            Kind::Activations => 1,
            Kind::KvCache => 2,
            Kind::ReadAhead => 3,
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Live heap bytes per [`Kind`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KindBytes {
    /// [`Kind::Weights`].
    pub weights: u64,
    /// [`Kind::Activations`].
    pub activations: u64,
    /// [`Kind::KvCache`].
    pub kv_cache: u64,
    /// [`Kind::ReadAhead`].
    pub read_ahead: u64,
}

impl KindBytes {
    /// The bytes of `kind`.
    pub fn get(&self, kind: Kind) -> u64 {
        match kind {
            Kind::Weights => self.weights,
            Kind::Activations => self.activations,
            Kind::KvCache => self.kv_cache,
            Kind::ReadAhead => self.read_ahead,
        }
    }

    /// Sets the bytes of `kind`.
    pub fn set(&mut self, kind: Kind, bytes: u64) {
        match kind {
            Kind::Weights => self.weights = bytes,
            Kind::Activations => self.activations = bytes,
            Kind::KvCache => self.kv_cache = bytes,
            Kind::ReadAhead => self.read_ahead = bytes,
        }
    }

    /// All kinds together.
    pub fn total(&self) -> u64 {
        Kind::ALL.iter().map(|&k| self.get(k)).sum()
    }
}

/// Process-wide bytes per kind (may dip below zero for a moment when bytes are freed
/// before the guard that allocated them has ended; read as zero then).
static HELD: [AtomicI64; 4] = [const { AtomicI64::new(0) }; 4];

thread_local! {
    /// The innermost kind open on this thread and the thread's live bytes when its current
    /// stretch began.
    static CURRENT: Cell<Option<(Kind, i64)>> = const { Cell::new(None) };
    /// Bytes this thread has credited to each kind over its life.
    static CREDITED: Cell<[i64; 4]> = const { Cell::new([0; 4]) };
}

/// Live heap bytes per kind, process-wide, now.
pub fn held() -> KindBytes {
    let mut out = KindBytes::default();
    for kind in Kind::ALL {
        out.set(
            kind,
            HELD[kind.index()].load(Ordering::Relaxed).max(0) as u64,
        );
    }
    out
}

/// Whether kinds are being attributed: tracking is on and the allocator counts.
fn attributing() -> bool {
    crate::scope::memory_tracking_enabled() && alloc::tracking_allocator_installed()
}

fn thread_live() -> i64 {
    alloc::thread_heap_totals().live_bytes()
}

fn credit(kind: Kind, bytes: i64) {
    if bytes == 0 {
        return;
    }
    HELD[kind.index()].fetch_add(bytes, Ordering::Relaxed);
    let _ = CREDITED.try_with(|c| {
        let mut all = c.get();
        all[kind.index()] += bytes;
        c.set(all);
    });
}

/// Credits the current stretch to the thread's open kind and starts a new stretch now.
fn close_stretch() -> i64 {
    let now = thread_live();
    if let Some((kind, start)) = CURRENT.with(Cell::get) {
        credit(kind, now - start);
    }
    now
}

/// Moves `bytes` from `from` to `to`: memory changed hands without being allocated again
/// (weights read ahead become the running stage's). `bytes` should be a figure measured
/// under `from`, e.g. [`KindScope::held_so_far`]. Does nothing while tracking is off.
pub fn hand_over(from: Kind, to: Kind, bytes: u64) {
    if !attributing() || from == to {
        return;
    }
    HELD[from.index()].fetch_sub(bytes as i64, Ordering::Relaxed);
    HELD[to.index()].fetch_add(bytes as i64, Ordering::Relaxed);
}

/// Counts `bytes` the calling thread allocated earlier under its current kind (or under
/// none) for `to` instead: values made as one kind and kept as another (a computation's
/// keys kept as the KV cache). Does nothing while tracking is off.
pub fn adopt(to: Kind, bytes: u64) {
    if !attributing() {
        return;
    }
    match CURRENT.with(Cell::get) {
        Some((from, _)) => hand_over(from, to, bytes),
        None => {
            HELD[to.index()].fetch_add(bytes as i64, Ordering::Relaxed);
        }
    }
}

/// Attributes the calling thread's heap bytes to `kind` until the guard drops. Does
/// nothing while tracking is off or without the tracking allocator.
#[must_use = "the kind ends when this guard is dropped"]
pub fn enter(kind: Kind) -> KindScope {
    if !attributing() {
        return KindScope {
            kind: None,
            outer: None,
            credited_at_entry: 0,
            _not_send: PhantomData,
        };
    }
    let now = close_stretch();
    let outer = CURRENT
        .with(|c| c.replace(Some((kind, now))))
        .map(|(k, _)| k);
    KindScope {
        kind: Some(kind),
        outer,
        credited_at_entry: credited(kind),
        _not_send: PhantomData,
    }
}

fn credited(kind: Kind) -> i64 {
    CREDITED.try_with(|c| c.get()[kind.index()]).unwrap_or(0)
}

/// While alive, the thread's heap bytes count for a [`Kind`] (see [`enter`]).
///
/// Guards on one thread must end in the reverse order they began (as scopes do); the guard
/// is not `Send`.
#[derive(Debug)]
pub struct KindScope {
    kind: Option<Kind>,
    outer: Option<Kind>,
    credited_at_entry: i64,
    _not_send: PhantomData<*const ()>,
}

impl KindScope {
    /// The kind it attributes to, or `None` when it attributes nothing (tracking off).
    pub fn kind(&self) -> Option<Kind> {
        self.kind
    }

    /// Bytes this thread has added to the kind since the guard began (negative if it freed
    /// more), exactly, or `None` when it attributes nothing.
    pub fn held_so_far(&self) -> Option<i64> {
        let kind = self.kind?;
        let pending = match CURRENT.with(Cell::get) {
            Some((current, start)) if current == kind => thread_live() - start,
            _ => 0,
        };
        Some(credited(kind) + pending - self.credited_at_entry)
    }
}

impl Drop for KindScope {
    fn drop(&mut self) {
        if self.kind.is_none() {
            return;
        }
        let now = close_stretch();
        CURRENT.with(|c| c.set(self.outer.map(|k| (k, now))));
    }
}
