//! Whole-process benchmark of the streaming runner (issue 5): a 2.11 GB fp32 synthetic
//! Llama (hidden 2048, intermediate 5632, 9 layers, 32 heads / 4 key-value heads, vocab
//! 32000, untied), one forward pass over 1×128 tokens, loaded whole versus streamed.
//!
//! Run by hand: `cargo bench -p memwise-model --bench streaming`. The checkpoint is
//! generated once into `$MEMWISE_BENCH_DIR` (default: `memwise-bench/` in the cargo target
//! folder) and reused while its `config.json` and index stay valid. `MEMWISE_BENCH_SMALL=1`
//! swaps in a small model of the same shape for a quick smoke run;
//! `MEMWISE_BENCH_REPEATS=n` runs every measurement n times, interleaved, and keeps the
//! fastest forward pass with the highest memory peaks.
//!
//! Each measurement runs in a fresh child process (this binary re-run with `--child`), so
//! its `VmHWM` is its own, with the page cache warm (every file read just before) and with
//! the weight files evicted (`sync`, then `posix_fadvise(DONTNEED)` on each). Modes:
//!
//! - `full`: every tensor read through the checkpoint reader into one `VarBuilder`,
//!   [`DecoderModel::load`], then one forward pass; load and forward timed apart.
//! - `stream p0` / `stream p1`: [`ModelConverter`] with `clean_weights` and prefetch depth
//!   0 or 1; the forward time includes reading every stage.
//!
//! Peak RSS is the kernel's `VmHWM` for the whole child. Peak anonymous memory comes from a
//! sampler thread reading `/proc/self/status` every millisecond; a [`LayerHook`] tells it
//! which stage is running, so each streamed stage gets its own peaks (the breakdown
//! printed at the end). Every mode checksums its logits' bits, and all must agree.
//!
//! # Measured
//!
//! `cargo bench -p memwise-model --bench streaming` runs the 2.11 GB fp32 Llama (hidden 2048, intermediate 5632, 9 layers, 32/4 heads, vocab
//! 32000; made by `write_synthetic_checkpoint`) on 1×128 tokens, each mode in a fresh
//! process, best of 2, on the 2-core development VM (load average about 1):
//!
//! | mode | forward | vs full | peak RSS (VmHWM) | peak anon |
//! | --- | ---: | ---: | ---: | ---: |
//! | full load (load 2.4 s, then forward), warm | 1.77 s | 1.00× | 2267 MiB | 2263 MiB |
//! | streamed, no prefetch, warm | 2.57 s | 1.45× | 276 MiB | 271 MiB |
//! | streamed, prefetch 1, 400 MiB budget, warm | 2.43 s | 1.37× | 366 MiB | 361 MiB |
//! | full load (load 4.5 s), files evicted | 1.80 s | 1.00× | 2267 MiB | 2263 MiB |
//! | streamed, no prefetch, evicted | 3.67 s | 2.04× | 277 MiB | 272 MiB |
//! | streamed, prefetch 1, evicted | 3.74 s | 2.08× | 366 MiB | 361 MiB |
//!
//! The logits are bitwise equal in every mode. Streaming needs 0.16× the full load's
//! memory; counting the full load's loading time, it is also faster end to end (2.4 s
//! against 4.2 s warm). On two cores, reading is CPU work (copying out of the page cache)
//! that competes with the two compute threads, so prefetch gains only 5% over reading
//! each stage when it is due. Two things keep streaming cheap: tensors are read with
//! `pread` straight into their own storage (`Checkpoint::load_candle_tensors`), and a
//! `memwise::BlockCache` hands each layer the resident blocks the previous one freed,
//! instead of faulting in fresh pages (which cost more than the reads: 2 s per 2 GiB here).

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use memwise::stats::ProcessMemory;
use memwise_model::models::{ArchitectureConfig, DecoderModel};
use memwise_model::{
    Checkpoint, Family, HookError, Inputs, LayerHook, LayerWeights, ModelConverter, ReadStrategy,
};
use serde_json::json;

use common::{evict, fold, prepare_checkpoint, read_files, run_child, synthetic_llama};

const MIB: f64 = (1u64 << 20) as f64;
const TOKENS: usize = 128;
const MODES: [&str; 3] = ["full", "stream p0", "stream p1"];
const CACHES: [&str; 2] = ["warm", "evicted"];
const RSS_TARGET_MIB: f64 = 450.0;
const WARM_FORWARD_TARGET: f64 = 1.15;
const EVICTED_SPEEDUP_TARGET: f64 = 0.80;

// The allocator the memwise CLI installs: counts the heap, and lets streamed layers reuse
// the previous layer's resident blocks (the runner sizes the cache; the full load never
// uses it).
#[global_allocator]
static ALLOC: memwise::TrackingAllocator<memwise::BlockCache> =
    memwise::TrackingAllocator::new(memwise::BlockCache::new());

/// The budget the streamed modes run under, for the whole process's peak (the plan takes
/// the runtime floor, activations and logits out of it first; what is left bounds the
/// stages in memory at once): a 250 MiB embedding or head never sits beside a layer.
const STREAM_BUDGET: u64 = 400 << 20;

fn main() {
    common::dispatch("streaming", child, orchestrate);
}

/// What one child measured.
struct Run {
    cache: &'static str,
    mode: &'static str,
    load_s: f64,
    forward_s: f64,
    vm_hwm: f64,
    peak_anon: f64,
    /// CPU seconds in user space and in the kernel, and minor page faults (whole child).
    user_s: f64,
    sys_s: f64,
    minor_faults: u64,
    checksum: String,
    phases: Vec<(String, PhasePeak)>,
}

impl Run {
    /// Keeps the fastest forward of repeated runs (the one least disturbed by other load)
    /// with the highest memory peaks of any of them; differing logits are kept as such.
    fn merge(&mut self, other: Run) {
        let (vm_hwm, peak_anon) = (
            self.vm_hwm.max(other.vm_hwm),
            self.peak_anon.max(other.peak_anon),
        );
        let checksum = if self.checksum == other.checksum {
            other.checksum.clone()
        } else {
            format!("{} / {}", self.checksum, other.checksum)
        };
        let mut phases = std::mem::take(&mut self.phases);
        for ((_, mine), (_, theirs)) in phases.iter_mut().zip(&other.phases) {
            mine.rss = mine.rss.max(theirs.rss);
            mine.anon = mine.anon.max(theirs.anon);
            mine.file = mine.file.max(theirs.file);
        }
        if other.forward_s < self.forward_s {
            *self = other;
        }
        self.vm_hwm = vm_hwm;
        self.peak_anon = peak_anon;
        self.checksum = checksum;
        self.phases = phases;
    }
}

fn orchestrate() {
    let small = std::env::var("MEMWISE_BENCH_SMALL").is_ok_and(|v| !v.is_empty() && v != "0");
    let folder = prepare_checkpoint(&synthetic_llama(small));
    let files = Checkpoint::open(&folder).unwrap().files().to_vec();
    let bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    println!(
        "model: {:.2} GB ({:.0} MiB) in {} files; 1x{TOKENS} tokens; {} CPUs; load average {}",
        bytes as f64 / 1e9,
        bytes as f64 / MIB,
        files.len(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );

    let repeats: usize = std::env::var("MEMWISE_BENCH_REPEATS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut runs: Vec<Run> = Vec::new();
    for repeat in 0..repeats {
        for cache in CACHES {
            for mode in MODES {
                if cache == "warm" {
                    read_files(&files, |_| ());
                } else {
                    evict(&files);
                }
                let run = measure(cache, mode, &folder);
                println!(
                    "  run {}/{repeats}: {cache:<7} {mode:<9} load {:.3}s forward {:.3}s VmHWM {:.0} MiB",
                    repeat + 1,
                    run.load_s,
                    run.forward_s,
                    run.vm_hwm
                );
                match runs.iter_mut().find(|r| r.cache == cache && r.mode == mode) {
                    Some(kept) => kept.merge(run),
                    None => runs.push(run),
                }
            }
        }
    }
    report(&runs);
    println!("load average after: {}", load_average());
}

/// Runs one child and reads what it printed.
fn measure(cache: &'static str, mode: &'static str, folder: &Path) -> Run {
    let v = run_child(&[mode, folder.to_str().unwrap()]);
    let phases = v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let peak = PhasePeak {
                rss: p["rss"].as_u64().unwrap(),
                anon: p["anon"].as_u64().unwrap(),
                file: p["file"].as_u64().unwrap(),
            };
            (p["name"].as_str().unwrap().to_owned(), peak)
        })
        .collect();
    Run {
        cache,
        mode,
        load_s: v["load_s"].as_f64().unwrap(),
        forward_s: v["forward_s"].as_f64().unwrap(),
        vm_hwm: v["vm_hwm"].as_u64().unwrap() as f64 / MIB,
        peak_anon: v["peak_anon"].as_u64().unwrap() as f64 / MIB,
        user_s: v["user_s"].as_f64().unwrap(),
        sys_s: v["sys_s"].as_f64().unwrap(),
        minor_faults: v["minor_faults"].as_u64().unwrap(),
        checksum: v["checksum"].as_str().unwrap().to_owned(),
        phases,
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn find<'a>(runs: &'a [Run], cache: &str, mode: &str) -> &'a Run {
    runs.iter()
        .find(|r| r.cache == cache && r.mode == mode)
        .unwrap()
}

fn report(runs: &[Run]) {
    println!(
        "\n{:<8} {:<10} {:>7} {:>9} {:>7} {:>9} {:>10} {:>7} {:>10} {:>7} {:>7} {:>7} {:>9}",
        "cache",
        "mode",
        "load s",
        "forward s",
        "total s",
        "fwd/full",
        "VmHWM MiB",
        "/full",
        "anon MiB",
        "/full",
        "user s",
        "sys s",
        "faults k"
    );
    for run in runs {
        let full = find(runs, run.cache, "full");
        println!(
            "{:<8} {:<10} {:>7.3} {:>9.3} {:>7.3} {:>8.2}x {:>10.0} {:>6.2}x {:>10.0} {:>6.2}x {:>7.2} {:>7.2} {:>9}",
            run.cache,
            run.mode,
            run.load_s,
            run.forward_s,
            run.load_s + run.forward_s,
            run.forward_s / full.forward_s,
            run.vm_hwm,
            run.vm_hwm / full.vm_hwm,
            run.peak_anon,
            run.peak_anon / full.peak_anon,
            run.user_s,
            run.sys_s,
            run.minor_faults / 1000,
        );
    }
    println!(
        "(streamed: whole-process budget {} MiB; load = building the skeleton; forward includes",
        STREAM_BUDGET >> 20
    );
    println!(" reading every stage;");
    println!(" user, sys and minor faults are the whole child's, from getrusage)");

    let reference = &runs[0].checksum;
    let equal = runs.iter().all(|r| &r.checksum == reference);
    println!(
        "logits checksum: {} ({})",
        reference,
        if equal {
            "equal in every run".to_owned()
        } else {
            let all: Vec<String> = runs
                .iter()
                .map(|r| format!("{} {}: {}", r.cache, r.mode, r.checksum))
                .collect();
            format!("DIFFER: {}", all.join(", "))
        }
    );

    println!("\ntargets:");
    let streamed_rss = runs
        .iter()
        .filter(|r| r.mode != "full")
        .map(|r| r.vm_hwm)
        .fold(0.0, f64::max);
    target(
        &format!("streamed peak RSS <= {RSS_TARGET_MIB} MiB (worst streamed run)"),
        streamed_rss,
        RSS_TARGET_MIB,
        "MiB",
    );
    let warm = find(runs, "warm", "stream p1").forward_s / find(runs, "warm", "full").forward_s;
    target(
        &format!("warm: stream p1 forward <= {WARM_FORWARD_TARGET} x full forward"),
        warm,
        WARM_FORWARD_TARGET,
        "x",
    );
    let evicted =
        find(runs, "evicted", "stream p1").forward_s / find(runs, "evicted", "stream p0").forward_s;
    target(
        &format!("evicted: stream p1 forward <= {EVICTED_SPEEDUP_TARGET} x stream p0 (20% faster)"),
        evicted,
        EVICTED_SPEEDUP_TARGET,
        "x",
    );

    for cache in CACHES {
        breakdown(runs, cache);
    }
}

fn target(what: &str, value: f64, limit: f64, unit: &str) {
    let verdict = if value <= limit { "met" } else { "MISSED" };
    println!(
        "  {what}: {value:.2} {unit}: {verdict} by {:.2} {unit} ({:+.1}%)",
        (limit - value).abs(),
        100.0 * (value - limit) / limit
    );
}

/// Per-stage peaks of the streamed runs: where the memory goes.
fn breakdown(runs: &[Run], cache: &str) {
    let streamed: Vec<&Run> = MODES[1..].iter().map(|m| find(runs, cache, m)).collect();
    println!("\nper-stage peaks, {cache} cache, MiB (sampled every 1 ms):");
    print!("{:<44}", "phase");
    for run in &streamed {
        print!(" {:>26}", format!("{}: rss / anon / file", run.mode));
    }
    println!();
    for (i, (name, _)) in streamed[0].phases.iter().enumerate() {
        print!("{name:<44}");
        for run in &streamed {
            let p = &run.phases[i].1;
            print!(
                " {:>26}",
                format!(
                    "{:.0} / {:.0} / {:.0}",
                    p.rss as f64 / MIB,
                    p.anon as f64 / MIB,
                    p.file as f64 / MIB
                )
            );
        }
        println!();
    }
}

/// The highest resident figures seen during one phase, in bytes (each maximized alone).
#[derive(Clone, Copy, Default)]
struct PhasePeak {
    rss: u64,
    anon: u64,
    file: u64,
}

/// The highest figures seen in each phase, and which phase is current. A sampler thread
/// reads `/proc/self/status` every millisecond; phase changes read it too, so a phase
/// shorter than a millisecond still has a sample.
struct Probe {
    phase: AtomicUsize,
    peaks: Mutex<Vec<PhasePeak>>,
}

impl Probe {
    fn new(phases: usize) -> Probe {
        Probe {
            phase: AtomicUsize::new(0),
            peaks: Mutex::new(vec![PhasePeak::default(); phases]),
        }
    }

    fn enter(&self, phase: usize) {
        self.phase.store(phase, Ordering::Relaxed);
        self.sample();
    }

    fn sample(&self) {
        if let Some(m) = ProcessMemory::read() {
            let mut peaks = self.peaks.lock().unwrap();
            let last = peaks.len() - 1;
            let p = &mut peaks[self.phase.load(Ordering::Relaxed).min(last)];
            p.rss = p.rss.max(m.rss);
            p.anon = p.anon.max(m.rss_anon);
            p.file = p.file.max(m.rss_file);
        }
    }
}

/// Samples `probe` every millisecond until `finish`.
struct Sampler {
    probe: Arc<Probe>,
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Sampler {
    fn start(phases: usize) -> Sampler {
        let probe = Arc::new(Probe::new(phases));
        let stop = Arc::new(AtomicBool::new(false));
        probe.sample();
        let (sampled, stopped) = (Arc::clone(&probe), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Acquire) {
                sampled.sample();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Sampler {
            probe,
            stop,
            thread,
        }
    }

    fn finish(self) -> Vec<PhasePeak> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap();
        self.probe.sample();
        self.probe.peaks.lock().unwrap().clone()
    }
}

/// Tells the probe which stage runs: phase `2i + 1` while stage `i` runs (with prefetch,
/// stage `i + 1` loads meanwhile), `2i + 2` from its end until stage `i + 1` starts (its
/// weights are freed and, without prefetch, the next stage is read).
struct PhaseHook(Arc<Probe>);

impl LayerHook for PhaseHook {
    fn before_layer(&self, layer: &mut LayerWeights) -> Result<(), HookError> {
        self.0.enter(2 * layer.index() + 1);
        Ok(())
    }

    fn after_layer(&self, _name: &str, index: usize) -> Result<(), HookError> {
        self.0.enter(2 * index + 2);
        Ok(())
    }
}

fn child(args: &[String]) {
    let (mode, folder) = (args[0].as_str(), Path::new(&args[1]));
    let ArchitectureConfig::Decoder(config) = ArchitectureConfig::from_file(folder).unwrap() else {
        panic!("{} is not a decoder", folder.display())
    };
    let device = Device::Cpu;
    let skeleton = DecoderModel::new(&config, DType::F32, &device).unwrap();
    let ids: Vec<u32> = (0..TOKENS)
        .map(|i| ((i * 7919 + 13) % config.vocab_size) as u32)
        .collect();
    let input_ids = Tensor::new(ids.as_slice(), &device)
        .unwrap()
        .unsqueeze(0)
        .unwrap();

    let (names, load_s, forward_s, peaks, logits) = if mode == "full" {
        let names = vec!["load".to_owned(), "forward".to_owned(), "end".to_owned()];
        let sampler = Sampler::start(names.len());
        let started = Instant::now();
        let loaded = skeleton.load(read_all(folder)).unwrap();
        let load_s = started.elapsed().as_secs_f64();
        sampler.probe.enter(1);
        let started = Instant::now();
        let logits = loaded.forward(Inputs::new(&input_ids)).unwrap();
        let forward_s = started.elapsed().as_secs_f64();
        sampler.probe.enter(2);
        (names, load_s, forward_s, sampler.finish(), logits)
    } else {
        let depth = if mode == "stream p1" { 1 } else { 0 };
        let stages: Vec<&str> = skeleton.stages().iter().map(|s| s.name()).collect();
        let mut names = vec![format!("get {}", stages[0])];
        for (i, stage) in stages.iter().enumerate() {
            names.push(format!("run {stage}"));
            names.push(match stages.get(i + 1) {
                Some(next) => format!("free {stage}, get {next}"),
                None => format!("free {stage}, end"),
            });
        }
        let sampler = Sampler::start(names.len());
        let started = Instant::now();
        let mut model = ModelConverter::new(folder)
            .prefetch_depth(depth)
            .budget(Some(STREAM_BUDGET))
            .hook(PhaseHook(Arc::clone(&sampler.probe)))
            .load_model_with_hooks(true)
            .unwrap();
        let load_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let logits = model.forward(&input_ids).unwrap();
        let forward_s = started.elapsed().as_secs_f64();
        (names, load_s, forward_s, sampler.finish(), logits)
    };

    let values = logits.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bits: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let memory = ProcessMemory::read().unwrap();
    let usage = cpu_usage();
    let phases: Vec<_> = names
        .iter()
        .zip(&peaks)
        .map(|(name, p)| json!({"name": name, "rss": p.rss, "anon": p.anon, "file": p.file}))
        .collect();
    println!(
        "{}",
        json!({
            "mode": mode,
            "load_s": load_s,
            "forward_s": forward_s,
            "vm_hwm": memory.rss_peak,
            "peak_anon": peaks.iter().map(|p| p.anon).max().unwrap_or(0).max(memory.rss_anon),
            "user_s": usage.0,
            "sys_s": usage.1,
            "minor_faults": usage.2,
            "checksum": format!("{:016x} {:?}", fold(&bits, 0), logits.dims()),
            "phases": phases,
        })
    );
}

/// Every tensor of the checkpoint, read stage by stage (mapped pages released after each)
/// into one `VarBuilder`: a full load that holds the weights once, not also their pages.
fn read_all(folder: &Path) -> VarBuilder<'static> {
    let checkpoint = Checkpoint::open(folder).unwrap();
    let mut reader = checkpoint.reader(ReadStrategy::default());
    let mut tensors = HashMap::new();
    for stage in checkpoint.stages() {
        let data = reader.read_stage(&stage.name).unwrap();
        for view in data.tensors() {
            let bytes = view
                .to_dtype(memwise_model::checkpoint::StoredDType::F32)
                .unwrap();
            let tensor =
                Tensor::from_raw_buffer(&bytes, DType::F32, view.shape(), &Device::Cpu).unwrap();
            tensors.insert(view.name().to_owned(), tensor);
        }
    }
    VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
}

/// This process's user and system CPU seconds and minor page faults so far.
fn cpu_usage() -> (f64, f64, u64) {
    // SAFETY: `rusage` is plain data, so all zeros is a valid value for getrusage to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a `rusage` that lives across the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (
        seconds(usage.ru_utime),
        seconds(usage.ru_stime),
        usage.ru_minflt as u64,
    )
}
