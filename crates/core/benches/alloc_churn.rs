//! Small-allocation churn (16–256 B alloc + free pairs): `System` against
//! `TrackingAllocator` with scope tracking on and off, on one thread and on two threads
//! churning at once. Criterion measures each case; a summary then prints the costs side by
//! side with the targets.
//!
//! Run: `cargo bench -p memwise --bench alloc_churn`

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use memwise::{enable_memory_tracking, TrackingAllocator};

/// Called directly (not installed), so System and the tracker run in the same binary.
static TRACKING: TrackingAllocator = TrackingAllocator::system();

const SIZES: [usize; 16] = [
    16, 24, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 256,
];

#[derive(Clone, Copy, PartialEq)]
enum Case {
    System,
    TrackingOn,
    TrackingOff,
}

impl Case {
    const ALL: [Case; 3] = [Case::System, Case::TrackingOn, Case::TrackingOff];

    fn name(self) -> &'static str {
        match self {
            Case::System => "System",
            Case::TrackingOn => "Tracking (on)",
            Case::TrackingOff => "Tracking (off)",
        }
    }

    fn prepare(self) {
        enable_memory_tracking(self == Case::TrackingOn);
    }
}

/// `pairs` alloc+free pairs through the allocator of `case`.
#[inline(never)]
fn churn(case: Case, pairs: u64) {
    fn run<A: GlobalAlloc>(a: &A, pairs: u64) {
        for i in 0..pairs {
            let layout = Layout::from_size_align(SIZES[(i % 16) as usize], 8).unwrap();
            // SAFETY: a non-zero-size layout, freed right away with the same layout.
            unsafe {
                let p = a.alloc(layout);
                black_box(p);
                a.dealloc(p, layout);
            }
        }
    }
    match case {
        Case::System => run(&System, pairs),
        Case::TrackingOn | Case::TrackingOff => run(&TRACKING, pairs),
    }
}

/// Wall time for `threads` threads each doing `pairs` pairs at once.
fn timed(case: Case, threads: usize, pairs: u64) -> Duration {
    let start_line = Barrier::new(threads + 1);
    let finish_line = Barrier::new(threads + 1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                start_line.wait();
                churn(case, pairs);
                finish_line.wait();
            });
        }
        start_line.wait();
        let start = Instant::now();
        finish_line.wait();
        start.elapsed()
    })
}

fn bench(c: &mut Criterion) {
    for threads in [1usize, 2] {
        let mut group = c.benchmark_group(format!("churn_{threads}_thread"));
        for case in Case::ALL {
            case.prepare();
            group.bench_function(case.name(), |b| {
                b.iter_custom(|iters| timed(case, threads, iters))
            });
        }
        group.finish();
    }
}

/// Best-of-rounds nanoseconds per pair (per thread: each thread does `PAIRS` pairs).
fn ns_per_pair(case: Case, threads: usize) -> f64 {
    const PAIRS: u64 = 4_000_000;
    case.prepare();
    (0..7)
        .map(|_| timed(case, threads, PAIRS).as_secs_f64() * 1e9 / PAIRS as f64)
        .fold(f64::INFINITY, f64::min)
}

fn summary() {
    let single: Vec<f64> = Case::ALL.iter().map(|&c| ns_per_pair(c, 1)).collect();
    let double: Vec<f64> = Case::ALL.iter().map(|&c| ns_per_pair(c, 2)).collect();
    println!("\nalloc+free pairs, 16-256 B (best of 7 rounds of 4M pairs per thread)");
    println!(
        "{:<16} {:>12} {:>14} {:>16} {:>14}",
        "allocator", "1 thread", "vs System", "2 threads (wall)", "vs System"
    );
    for (i, case) in Case::ALL.iter().enumerate() {
        println!(
            "{:<16} {:>9.2} ns {:>+11.2} ns {:>13.2} ns {:>13.1}%",
            case.name(),
            single[i],
            single[i] - single[0],
            double[i],
            (double[i] / double[0] - 1.0) * 100.0
        );
    }
    println!(
        "targets: on +1.5 ns/pair (1 thread) -> {}; on +25% (2 threads) -> {}; off +1 ns -> {}",
        verdict(single[1] - single[0] <= 1.5),
        verdict(double[1] / double[0] - 1.0 <= 0.25),
        verdict(single[2] - single[0] <= 1.0),
    );
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    summary();
}
