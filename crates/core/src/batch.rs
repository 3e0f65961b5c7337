//! Batches with cleanup between them, and a batch-size finder that predicts instead of
//! halving.
//!
//! [`batches`] is the spec's "Processing Large Datasets" loop: each batch runs inside a
//! [`MemoryTracker`] scope named `batch_{i}`, and memory is cleaned up before the next one.
//!
//! [`BatchSizeFinder`] picks the largest batch that fits a memory budget. Hugging Face
//! accelerate's `find_executable_batch_size` starts large and halves after every
//! out-of-memory failure, which costs many failed runs and lands up to 2x below the
//! limit. Peak memory is close to linear in the batch size (fixed weights and buffers plus
//! activations per sample), so the finder runs two small probes, fits that line, predicts
//! the largest batch under the budget, and verifies it with one run. Only if that run fails
//! does it correct: from the new measurement when the run overran the budget, or by
//! shrinking when the device ran out of memory and left nothing to measure.

use std::fmt;
use std::iter::Peekable;
use std::ops::{Deref, DerefMut};

use std::sync::Arc;

use serde::Serialize;

use crate::alloc::{heap_totals, tracking_allocator_installed};
use crate::device::devices;
use crate::{
    clear_memory_with, get_memory_stats, reset_peak_memory, ClearOptions, ClearReport, Config,
    Error, ErrorKind, MemoryTracker,
};

/// Splits `items` into batches of `size` (the last may be shorter). Each [`Batch`] holds a
/// [`MemoryTracker`] scope named `batch_{i}` (`i` the index of its first item, as in the
/// spec) that ends when the batch is dropped; before the next batch is formed, and after
/// the last, memory is cleaned up as `memory.trim_allocator` and
/// `memory.empty_device_cache` say.
///
/// ```
/// use memwise::{batches, enable_memory_tracking, get_config, get_memory_stats};
///
/// enable_memory_tracking(true);
/// let dataset: Vec<u32> = (0..10).collect();
/// let mut total = 0;
/// for batch in batches(dataset, get_config().memory.gpu_batch_size.min(4)) {
///     let results: Vec<u64> = batch.iter().map(|&x| u64::from(x) * 2).collect();
///     total += results.iter().sum::<u64>();
/// }
/// assert_eq!(total, 90);
/// let stats = get_memory_stats();
/// assert_eq!(stats.scopes_named("batch_4").count(), 1);
/// ```
///
/// The cleanup follows the configuration in force; [`Batches::from_config`] takes one
/// explicitly, size included.
///
/// # Panics
///
/// If `size` is 0, and as [`get_config`](crate::get_config) when the environment holds a
/// bad value.
pub fn batches<I: IntoIterator>(items: I, size: usize) -> Batches<I::IntoIter> {
    Batches::new(items, size, &crate::get_config())
}

/// The iterator [`batches`] returns.
pub struct Batches<I: Iterator> {
    items: Peekable<I>,
    size: usize,
    next_start: usize,
    cleanup: Option<ClearOptions>,
    last_cleanup: Option<ClearReport>,
    finished: bool,
}

impl<I: Iterator> Batches<I> {
    /// Batches of `config.memory.gpu_batch_size`, cleaned up between them as `config` says
    /// (`memory.trim_allocator`, `memory.empty_device_cache`): [`batches`] with an explicit
    /// configuration instead of the one in force.
    ///
    /// ```
    /// use memwise::{batch::Batches, Config};
    ///
    /// let mut config = Config::default();
    /// config.memory.gpu_batch_size = 3;
    /// let sizes: Vec<usize> = Batches::from_config(0..7, &config).map(|b| b.len()).collect();
    /// assert_eq!(sizes, [3, 3, 1]);
    /// ```
    pub fn from_config(items: impl IntoIterator<IntoIter = I>, config: &Config) -> Self {
        Batches::new(items, config.memory.gpu_batch_size, config)
    }

    fn new(items: impl IntoIterator<IntoIter = I>, size: usize, config: &Config) -> Self {
        assert!(size > 0, "a batch needs at least one item");
        Batches {
            items: items.into_iter().peekable(),
            size,
            next_start: 0,
            cleanup: Some(config.memory.clear_options()),
            last_cleanup: None,
            finished: false,
        }
    }

    /// Cleans up with these options between batches instead of the configured ones.
    pub fn cleanup(mut self, options: ClearOptions) -> Self {
        self.cleanup = Some(options);
        self
    }

    /// Skips the cleanup between batches (scopes are still recorded).
    pub fn without_cleanup(mut self) -> Self {
        self.cleanup = None;
        self
    }

    /// What the most recent cleanup freed; `None` before the first one.
    pub fn last_cleanup(&self) -> Option<&ClearReport> {
        self.last_cleanup.as_ref()
    }
}

impl<I: Iterator> fmt::Debug for Batches<I> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batches")
            .field("size", &self.size)
            .field("next_start", &self.next_start)
            .field("cleanup", &self.cleanup)
            .finish_non_exhaustive()
    }
}

impl<I: Iterator> Iterator for Batches<I> {
    type Item = Batch<I::Item>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        // The previous batch has been dropped by now in a `for` loop, so this frees it.
        if self.next_start > 0 {
            if let Some(options) = self.cleanup {
                self.last_cleanup = Some(clear_memory_with((), options));
            }
        }
        if self.items.peek().is_none() {
            self.finished = true;
            return None;
        }
        let start = self.next_start;
        // The scope opens before the items are gathered, so it counts them, as the spec's
        // `batch = dataset[i:i+batch_size]` inside its `with MemoryTracker(...)`.
        let scope = MemoryTracker::new(format!("batch_{start}"));
        let items: Vec<_> = self.items.by_ref().take(self.size).collect();
        self.next_start += items.len();
        Some(Batch {
            items,
            start,
            _scope: scope,
        })
    }
}

/// One batch: its items, and the [`MemoryTracker`] scope that records it until dropped.
/// Reads and writes as a slice.
pub struct Batch<T> {
    // Declared before the scope, so the items are freed before the scope closes and the
    // record's exit figure shows them gone.
    items: Vec<T>,
    start: usize,
    _scope: MemoryTracker,
}

impl<T> Batch<T> {
    /// The index of this batch's first item in the whole sequence.
    pub fn start(&self) -> usize {
        self.start
    }
}

impl<T> Deref for Batch<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<T> DerefMut for Batch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.items
    }
}

impl<T: fmt::Debug> fmt::Debug for Batch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("start", &self.start)
            .field("items", &self.items)
            .finish()
    }
}

/// Why one run of a workload failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum WorkloadError {
    /// The batch did not fit: the device (or allocator) ran out of memory. The finder
    /// tries a smaller batch.
    OutOfMemory(String),
    /// Anything else. The finder stops and returns it.
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

impl fmt::Display for WorkloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkloadError::OutOfMemory(message) => write!(f, "out of memory: {message}"),
            WorkloadError::Failed(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for WorkloadError {}

impl From<Error> for WorkloadError {
    /// A [`ErrorKind::Budget`] error means the batch did not fit; any other is a failure.
    fn from(err: Error) -> Self {
        if err.kind() == ErrorKind::Budget {
            WorkloadError::OutOfMemory(err.to_string())
        } else {
            WorkloadError::Failed(Box::new(err))
        }
    }
}

/// The memory one run used, in bytes, and how the run ended.
#[derive(Debug)]
#[non_exhaustive]
pub struct Measured {
    /// How the workload ended.
    pub outcome: Result<(), WorkloadError>,
    /// Bytes in use when the run started.
    pub baseline: u64,
    /// The most bytes in use at any moment during the run (not above the baseline: the
    /// budget is for the whole device).
    pub peak: u64,
}

/// Where the finder reads peaks from: the host heap ([`HeapPeak`]), a registered device
/// ([`DevicePeak`]), or anything else that can measure one run.
pub trait PeakMeter {
    /// The memory measured, as `memory.max_memory` names it (`"cpu"`, `"cuda:0"`): the
    /// finder's budget is that entry unless one is given.
    fn device(&self) -> &str;

    /// Runs `work` once and reports its peak.
    fn measure(
        &mut self,
        work: &mut dyn FnMut() -> Result<(), WorkloadError>,
    ) -> Result<Measured, Error>;
}

/// Measures live heap bytes through the [`TrackingAllocator`](crate::TrackingAllocator),
/// which must be the global allocator. Each run restarts the process-wide peaks
/// ([`reset_peak_memory`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct HeapPeak;

impl PeakMeter for HeapPeak {
    fn device(&self) -> &str {
        "cpu"
    }

    fn measure(
        &mut self,
        work: &mut dyn FnMut() -> Result<(), WorkloadError>,
    ) -> Result<Measured, Error> {
        if !tracking_allocator_installed() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "measuring heap peaks needs memwise::TrackingAllocator as the global allocator; add \
                 `#[global_allocator] static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();` \
                 to the binary",
            ));
        }
        reset_peak_memory();
        let baseline = heap_totals().live_bytes().max(0) as u64;
        let outcome = work();
        let peak = get_memory_stats().heap.map_or(baseline, |h| h.peak);
        Ok(Measured {
            outcome,
            baseline,
            peak,
        })
    }
}

/// Measures a registered device's bytes in use (its pool's high-water mark). Each run
/// restarts the process-wide peaks ([`reset_peak_memory`]); peaks reset at scope edges
/// inside the run are folded back, so scopes in the workload do not hide them.
#[derive(Debug, Clone)]
pub struct DevicePeak {
    name: String,
}

impl DevicePeak {
    /// Measures the registered device named `name` (`"cuda:0"`).
    pub fn new(name: impl Into<String>) -> Self {
        DevicePeak { name: name.into() }
    }
}

impl PeakMeter for DevicePeak {
    fn device(&self) -> &str {
        &self.name
    }

    fn measure(
        &mut self,
        work: &mut dyn FnMut() -> Result<(), WorkloadError>,
    ) -> Result<Measured, Error> {
        let device = devices()
            .into_iter()
            .find(|d| d.name() == self.name)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("no device named {} is registered", self.name),
                )
            })?;
        reset_peak_memory();
        let baseline = device.usage()?.used;
        let outcome = work();
        let stats = get_memory_stats();
        let usage = stats
            .devices
            .iter()
            .find(|d| d.device == self.name)
            .ok_or_else(|| {
                let why = stats.device_errors.join("; ");
                Error::new(
                    ErrorKind::Device,
                    format!("{} did not answer after the run: {why}", self.name),
                )
            })?;
        Ok(Measured {
            outcome,
            baseline,
            peak: usage.peak_used.max(baseline),
        })
    }
}

/// How one run of the finder ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub enum ProbeOutcome {
    /// It ran and its peak stayed within the budget.
    Fit,
    /// It ran, but its peak went over the budget.
    OverBudget,
    /// The workload reported running out of memory.
    OutOfMemory(String),
}

/// One run of the workload during the search.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ProbeRun {
    /// The batch size tried.
    pub batch_size: usize,
    /// Bytes in use when it started.
    pub baseline: u64,
    /// The peak bytes in use; `None` when it ran out of memory.
    pub peak: Option<u64>,
    /// How it ended.
    pub outcome: ProbeOutcome,
}

/// The batch size the finder chose, and the measurements behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct BatchSizeReport {
    /// The largest batch size that ran within the budget.
    pub batch_size: usize,
    /// The memory measured (`"cpu"`, `"cuda:0"`).
    pub device: String,
    /// The budget, in bytes in use.
    pub budget: u64,
    /// Bytes each sample adds to the peak, from the two probes.
    pub per_sample_bytes: Option<f64>,
    /// The peak at zero samples (baseline plus fixed cost), from the two probes.
    pub fixed_bytes: Option<f64>,
    /// The first prediction, before it was verified.
    pub predicted: Option<usize>,
    /// Every run, in order.
    pub runs: Vec<ProbeRun>,
}

/// Finds the largest batch size whose peak fits a memory budget, in few runs.
///
/// Runs two probe batches (1 and 4 samples by default), fits peak = fixed + slope × size
/// through them, predicts the largest size under the budget, and runs it once to verify. If
/// the verifying run overruns the budget, it refits through that run's measurement; if it
/// runs out of memory, it shrinks by 10% at a time. It never returns a size that did not
/// fit in a run. The budget is the one given, else `memory.max_memory.<device>`.
///
/// ```
/// #[global_allocator]
/// static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();
///
/// use memwise::BatchSizeFinder;
/// use memwise::batch::HeapPeak;
///
/// let budget = memwise::alloc::heap_totals().live_bytes() as u64 + (64 << 20);
/// let report = BatchSizeFinder::new()
///     .budget(budget)
///     .find(&mut HeapPeak, |batch_size| {
///         let activations = vec![1u8; batch_size << 20]; // 1 MiB per sample
///         std::hint::black_box(&activations);
///         Ok(())
///     })
///     .unwrap();
/// assert!(report.batch_size >= 58 && report.batch_size <= 64, "{report:?}");
/// ```
#[derive(Debug, Clone)]
pub struct BatchSizeFinder {
    budget: Option<u64>,
    /// Where budgets come from when none is set: this configuration, else the one in force.
    config: Option<Arc<Config>>,
    probes: (usize, usize),
    max_batch: Option<usize>,
    max_runs: usize,
    cleanup: ClearOptions,
}

impl Default for BatchSizeFinder {
    fn default() -> Self {
        BatchSizeFinder {
            budget: None,
            config: None,
            probes: (1, 4),
            max_batch: None,
            max_runs: 8,
            cleanup: ClearOptions::default(),
        }
    }
}

impl BatchSizeFinder {
    /// A finder with the configured budget, probes of 1 and 4, and at most 8 runs.
    pub fn new() -> Self {
        BatchSizeFinder::default()
    }

    /// A finder that takes the budget (`memory.max_memory.<device>`) and the cleanup
    /// between runs from `config` instead of the configuration in force.
    pub fn from_config(config: &Config) -> Self {
        BatchSizeFinder {
            cleanup: config.memory.clear_options(),
            config: Some(Arc::new(config.clone())),
            ..BatchSizeFinder::default()
        }
    }

    /// The budget in bytes in use on the measured device, instead of
    /// `memory.max_memory.<device>`.
    pub fn budget(mut self, bytes: impl Into<crate::config::ByteSize>) -> Self {
        self.budget = Some(bytes.into().bytes());
        self
    }

    /// The two probe sizes (the smaller first). Wider apart, they measure the per-sample
    /// slope more precisely; both must fit.
    ///
    /// # Panics
    ///
    /// Unless `0 < small < large`.
    pub fn probes(mut self, small: usize, large: usize) -> Self {
        assert!(
            0 < small && small < large,
            "probe sizes must satisfy 0 < small < large"
        );
        self.probes = (small, large);
        self
    }

    /// Never tries more than this many samples (e.g. the dataset's length).
    pub fn max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = Some(max_batch);
        self
    }

    /// Gives up searching after this many runs, probes included, and returns the largest
    /// size that fit. At least 2.
    pub fn max_runs(mut self, runs: usize) -> Self {
        self.max_runs = runs.max(2);
        self
    }

    /// The cleanup between runs (default: [`ClearOptions::default`]).
    pub fn cleanup(mut self, options: ClearOptions) -> Self {
        self.cleanup = options;
        self
    }

    /// Runs `workload(batch_size)` under `meter` until it knows the largest size that fits.
    ///
    /// Fails when no budget is set for the meter's device, when the smaller probe does not
    /// fit (error kind [`ErrorKind::Budget`]), when the meter cannot measure, or when the
    /// workload fails other than by running out of memory.
    pub fn find<M, F>(&self, meter: &mut M, mut workload: F) -> Result<BatchSizeReport, Error>
    where
        M: PeakMeter + ?Sized,
        F: FnMut(usize) -> Result<(), WorkloadError>,
    {
        let device = meter.device().to_owned();
        let budget = match self.budget {
            Some(budget) => budget,
            None => (self.config.clone())
                .unwrap_or_else(crate::get_config)
                .memory
                .budget(&device)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::Config,
                        format!(
                            "no memory budget for {device}: set memory.max_memory.{device} (environment: {}) or call BatchSizeFinder::budget",
                            crate::config::env_var_for(&format!("memory.max_memory.{device}"))
                        ),
                    )
                })?
                .bytes(),
        };
        let mut search = Search {
            budget,
            runs: Vec::new(),
        };
        let mut run = |search: &mut Search, size: usize| -> Result<(), Error> {
            let measured = meter.measure(&mut || workload(size))?;
            clear_memory_with((), self.cleanup);
            search.record(size, measured)
        };

        let (small, large) = self.probes;
        let large = self.max_batch.map_or(large, |max| large.min(max));
        run(&mut search, small)?;
        if search.largest_fit().is_none() {
            let peak = search.runs[0]
                .peak
                .map_or("unknown".to_owned(), |p| p.to_string());
            return Err(Error::new(
                ErrorKind::Budget,
                format!(
                    "even a batch of {small} does not fit {device}'s budget of {budget} bytes (peak {peak}); lower the probe sizes or raise memory.max_memory.{device}"
                ),
            ));
        }
        if large > small {
            run(&mut search, large)?;
        }
        let line = search.line();
        let mut report = BatchSizeReport {
            batch_size: 0,
            device,
            budget,
            per_sample_bytes: line.map(|(slope, _)| slope),
            fixed_bytes: line.map(|(_, fixed)| fixed),
            predicted: None,
            runs: Vec::new(),
        };

        while search.runs.len() < self.max_runs {
            let good = search.largest_fit().unwrap_or(0);
            let smallest_failure = search.smallest_failure();
            let last_ran_out = matches!(
                search.runs.last().map(|r| &r.outcome),
                Some(ProbeOutcome::OutOfMemory(_))
            );
            let candidate = match (search.line(), smallest_failure) {
                // An out-of-memory run left nothing to measure: shrink below it.
                (_, Some(failed)) if last_ran_out => failed - failed.div_ceil(10),
                (Some((slope, fixed)), _) if slope > 0.0 => {
                    ((budget as f64 - fixed) / slope).floor().max(0.0) as usize
                }
                // Peaks did not grow with the batch: only the caller's limit bounds it.
                _ => match self.max_batch {
                    Some(max) => max,
                    None => {
                        return Err(Error::new(
                            ErrorKind::Budget,
                            "the peak did not grow between the probes, so no batch size can be predicted; set BatchSizeFinder::max_batch",
                        ))
                    }
                },
            };
            let mut candidate = self.max_batch.map_or(candidate, |max| candidate.min(max));
            if let Some(failed) = smallest_failure {
                candidate = candidate.min(failed - 1);
            }
            report.predicted.get_or_insert(candidate);
            if candidate <= good {
                break;
            }
            run(&mut search, candidate)?;
            if search.runs.last().map(|r| &r.outcome) == Some(&ProbeOutcome::Fit) {
                break;
            }
        }
        report.batch_size = search.largest_fit().unwrap_or(small);
        report.runs = search.runs;
        Ok(report)
    }
}

/// The runs so far, and what they say.
struct Search {
    budget: u64,
    runs: Vec<ProbeRun>,
}

impl Search {
    fn record(&mut self, batch_size: usize, measured: Measured) -> Result<(), Error> {
        let (peak, outcome) = match measured.outcome {
            Ok(()) if measured.peak <= self.budget => (Some(measured.peak), ProbeOutcome::Fit),
            Ok(()) => (Some(measured.peak), ProbeOutcome::OverBudget),
            Err(WorkloadError::OutOfMemory(message)) => (None, ProbeOutcome::OutOfMemory(message)),
            Err(WorkloadError::Failed(err)) => {
                return Err(Error::new(
                    ErrorKind::Device,
                    format!("the workload failed at batch size {batch_size}: {err}"),
                )
                .with_source(err))
            }
        };
        self.runs.push(ProbeRun {
            batch_size,
            baseline: measured.baseline,
            peak,
            outcome,
        });
        Ok(())
    }

    fn largest_fit(&self) -> Option<usize> {
        self.runs
            .iter()
            .filter(|r| r.outcome == ProbeOutcome::Fit)
            .map(|r| r.batch_size)
            .max()
    }

    fn smallest_failure(&self) -> Option<usize> {
        self.runs
            .iter()
            .filter(|r| r.outcome != ProbeOutcome::Fit)
            .map(|r| r.batch_size)
            .min()
    }

    /// The line (bytes per sample, bytes at zero samples) through the two measured runs
    /// with the largest batch sizes: the probes at first, then each overrun replaces the
    /// farther point, which makes the correction a secant step toward the budget.
    fn line(&self) -> Option<(f64, f64)> {
        let mut measured: Vec<(usize, u64)> = self
            .runs
            .iter()
            .filter_map(|r| Some((r.batch_size, r.peak?)))
            .collect();
        measured.sort_unstable();
        measured.dedup_by_key(|(size, _)| *size);
        let [.., (n1, p1), (n2, p2)] = measured[..] else {
            return None;
        };
        let slope = (p2 as f64 - p1 as f64) / (n2 - n1) as f64;
        Some((slope, p1 as f64 - slope * n1 as f64))
    }
}
