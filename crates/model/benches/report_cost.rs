//! Whole-process cost of `memwise run --report` (issue 11): the same streamed run with and
//! without a report folder, wall time and peak RSS side by side, in one run.
//!
//! Run by hand:
//!
//! ```text
//! cargo build --release -p memwise-cli
//! MEMWISE_REPORT_BENCH_MODEL=/path/to/llama cargo bench -p memwise-model --bench report_cost
//! ```
//!
//! The model is `$MEMWISE_REPORT_BENCH_MODEL` when set; otherwise the 2.11 GB fp32 Llama of
//! issue 5, made once by `write_synthetic_checkpoint` into `$MEMWISE_BENCH_DIR` (see
//! `common`), or with `MEMWISE_BENCH_SMALL=1` a small one of the same shape. Each run is a
//! child process of the release binary (`$MEMWISE_BENCH_BIN`, or `release/memwise` in the
//! cargo target folder): `memwise run MODEL --input-ids <128 ids> --budget 400MiB`, and the
//! same with `--report DIR`, alternating, the page cache warm (the weight files read just
//! before each), `$MEMWISE_BENCH_REPEATS` times each (default 3). The figures are medians;
//! peak RSS is the child's own `ru_maxrss` from `wait4` (its `VmHWM`). The targets: at
//! most 3% slower and at most 2 MiB more peak RSS with the report.
//!
//! # Measured
//!
//! On the 2.11 GB fp32 Llama (mapped weights, `memwise run`'s default), quiet 2-core VM,
//! 7 runs each, alternating (`MEMWISE_REPORT_BENCH_MODEL=/work/models/llama-2g
//! MEMWISE_BENCH_REPEATS=7 cargo bench -p memwise-model --bench report_cost`): without
//! `--report` 1.047 s and 53.3 MiB peak RSS, with it 1.048 s and 53.3 MiB (medians):
//! 1.001× the time and +0.0 MiB, inside both targets. (Earlier, under other builds' load,
//! single runs spread from 1.5 s to 3.6 s either way and could not resolve 3%.)

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use memwise_model::Checkpoint;

use common::{prepare_checkpoint, read_files, synthetic_llama};

const MIB: f64 = (1u64 << 20) as f64;
const TOKENS: usize = 128;
const BUDGET: &str = "400MiB";
const SLOWER_TARGET: f64 = 0.03;
const PEAK_TARGET_MIB: f64 = 2.0;

fn main() {
    common::dispatch("report_cost", |_| {}, orchestrate);
}

fn orchestrate() {
    let model = match std::env::var_os("MEMWISE_REPORT_BENCH_MODEL") {
        Some(folder) => PathBuf::from(folder),
        None => {
            let small =
                std::env::var("MEMWISE_BENCH_SMALL").is_ok_and(|v| !v.is_empty() && v != "0");
            prepare_checkpoint(&synthetic_llama(small))
        }
    };
    let repeats: usize = std::env::var("MEMWISE_BENCH_REPEATS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let binary = common::release_binary();
    assert!(
        binary.is_file(),
        "no release binary at {}: run `cargo build --release -p memwise-cli` first, or set MEMWISE_BENCH_BIN",
        binary.display()
    );
    let files = Checkpoint::open(&model).unwrap().files().to_vec();
    let bytes: u64 = files.iter().map(|f| f.metadata().unwrap().len()).sum();
    println!(
        "model: {} ({:.2} GB); {TOKENS} tokens, budget {BUDGET}; {repeats} runs each, alternating; {}",
        model.display(),
        bytes as f64 / 1e9,
        binary.display()
    );
    let ids: Vec<String> = (0..TOKENS)
        .map(|i| (1 + i * 37 % 997).to_string())
        .collect();
    let ids = ids.join(",");
    let report = common::bench_dir().join("report-cost");
    std::fs::create_dir_all(&report).unwrap();

    let (mut plain, mut reported) = (Vec::new(), Vec::new());
    for round in 1..=repeats {
        for with_report in [false, true] {
            let mut command = Command::new(&binary);
            command
                .arg("run")
                .arg(&model)
                .args(["--input-ids", &ids, "--budget", BUDGET]);
            if with_report {
                command.arg("--report").arg(&report);
            }
            command.stdout(std::process::Stdio::null());
            common::without_bench_vars(&mut command, &["MEMWISE_REPORT_BENCH_MODEL"]);
            read_files(&files, |_| {});
            let started = Instant::now();
            let child = command.spawn().unwrap();
            let peak = common::wait_for_peak(child.id() as i32, &command);
            let wall = started.elapsed().as_secs_f64();
            drop(child); // reaped by wait4 above
            println!(
                "  run {round}/{repeats}: {:<14} {wall:.3} s, peak RSS {:.1} MiB",
                if with_report {
                    "with --report"
                } else {
                    "without"
                },
                peak as f64 / MIB
            );
            let runs = if with_report {
                &mut reported
            } else {
                &mut plain
            };
            runs.push((wall, peak as f64 / MIB));
        }
    }
    let median = |runs: &[(f64, f64)], pick: fn(&(f64, f64)) -> f64| {
        let mut values: Vec<f64> = runs.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        values[values.len() / 2]
    };
    let (time0, time1) = (median(&plain, |r| r.0), median(&reported, |r| r.0));
    let (peak0, peak1) = (median(&plain, |r| r.1), median(&reported, |r| r.1));
    println!();
    println!("| | wall time (median) | peak RSS (median) |");
    println!("| --- | ---: | ---: |");
    println!("| without --report | {time0:.3} s | {peak0:.1} MiB |");
    println!("| with --report | {time1:.3} s | {peak1:.1} MiB |");
    println!(
        "| with / without | {:.3}× | {:+.1} MiB |",
        time1 / time0,
        peak1 - peak0
    );
    println!();
    let slower = time1 / time0 - 1.0;
    println!(
        "target: at most {:.0}% slower: {:+.1}%, {}",
        SLOWER_TARGET * 100.0,
        slower * 100.0,
        if slower <= SLOWER_TARGET {
            "met"
        } else {
            "MISSED"
        }
    );
    let more = peak1 - peak0;
    println!(
        "target: at most {PEAK_TARGET_MIB:.0} MiB more peak RSS: {more:+.1} MiB, {}",
        if more <= PEAK_TARGET_MIB {
            "met"
        } else {
            "MISSED"
        }
    );
    let _ = std::fs::remove_dir_all(&report);
}
