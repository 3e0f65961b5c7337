//! Whole-process benchmark of the planner and the mapped weights (issue 10): the release
//! `memwise` binary on the 2.11 GB fp32 Llama, one forward pass over 1×128 tokens and 16
//! tokens generated after them, at budgets of 200 MiB, 400 MiB, 1 GiB and none, with the
//! page cache warm and with the weight files evicted, against memwise's own full load.
//!
//! Run by hand: `cargo build --release -p memwise-cli && cargo bench -p memwise-model
//! --bench budgets`. The model is `$MEMWISE_BENCH_MODEL`, else the synthetic checkpoint the
//! other benches generate (`MEMWISE_BENCH_SMALL=1`: a small one of the same shape); the
//! binary is `$MEMWISE_BENCH_BIN`, else `release/memwise` in the cargo target folder.
//! `MEMWISE_BENCH_REPEATS=n` (default 3) runs every cell n times, interleaved, and keeps
//! the median time and the highest peak.
//!
//! Each cell is one `memwise run MODEL --input-ids <128 ids> [--max-new-tokens 16]
//! --keep-weights --budget B --json` in a fresh process: the time is from spawn to exit
//! (the full load's loading counts), the peak its `ru_maxrss`, and the plan's prediction
//! comes from its JSON line. The full load is `memwise run --full` (mapped, as `run` is by
//! default); `--full --no-mmap` (reading every weight into memory) is shown for reference.
//! Evicted, the 400 MiB forward also runs with `--prefetch 0`, to measure read-ahead.
//!
//! # Measured
//!
//! The tables in the README (2.11 GB Llama in f32 and the same in bf16, quiet 2-core VM, 3
//! runs per cell). Targets of issue 10 (set for the f32 model), all met on it: the 200 MiB
//! forward peaks at 53 MiB, the 400 MiB forward takes 0.98× the full load, generation
//! 1.12× at 400 MiB and 1.05× at 1 GiB, read-ahead when evicted 0.70× of none, and every
//! prediction is within 5% or 16 MiB. On the bf16 model every target but read-ahead is met
//! too (48 MiB, 0.35×, 0.65×, 0.73×, every prediction within the bound); its cold read
//! costs only 0.3 s, and read-ahead gave 0.97× of none in the last run (0.77× before).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use memwise_model::Checkpoint;

use common::{evict, measure, prepare_checkpoint, read_files, synthetic_llama, Measured};

const MIB: f64 = (1u64 << 20) as f64;
const TOKENS: usize = 128;
const NEW_TOKENS: usize = 16;
const BUDGETS: [Option<&str>; 4] = [Some("200MiB"), Some("400MiB"), Some("1GiB"), None];

fn main() {
    common::dispatch("budgets", |_| {}, orchestrate);
}

/// What a cell runs: a forward pass or a generation.
#[derive(Clone, Copy, PartialEq)]
enum Job {
    Forward,
    Generate,
}

impl Job {
    fn label(self) -> String {
        match self {
            Job::Forward => format!("1x{TOKENS} forward"),
            Job::Generate => format!("{TOKENS} + {NEW_TOKENS} generated"),
        }
    }
}

/// One cell's runs.
struct Cell {
    cache: &'static str,
    job: Job,
    /// `full`, `full (copied)`, a budget, `unlimited`, or `400MiB, no read-ahead`.
    setting: String,
    runs: Vec<(Measured, Option<(f64, f64)>)>,
}

impl Cell {
    /// The median wall time.
    fn time(&self) -> f64 {
        let mut times: Vec<f64> = self.runs.iter().map(|(m, _)| m.wall_s).collect();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    }

    /// The highest peak, MiB.
    fn peak(&self) -> f64 {
        self.runs.iter().map(|(m, _)| m.peak()).fold(0.0, f64::max)
    }

    /// The largest gap between a run's prediction and its measured peak, with that run's
    /// prediction, and whether every run is within 5% or 16 MiB of its own (`None`: no
    /// prediction printed).
    fn prediction(&self) -> Option<(f64, f64, bool)> {
        let figures: Vec<(f64, f64)> = self.runs.iter().filter_map(|(_, f)| *f).collect();
        let within = |&(predicted, measured): &(f64, f64)| {
            (measured - predicted).abs() <= (predicted * 0.05).max(16.0)
        };
        let worst = figures
            .iter()
            .max_by(|a, b| (a.1 - a.0).abs().total_cmp(&(b.1 - b.0).abs()))?;
        Some((worst.0, worst.1 - worst.0, figures.iter().all(within)))
    }
}

fn orchestrate() {
    let model = match std::env::var_os("MEMWISE_BENCH_MODEL") {
        Some(folder) => PathBuf::from(folder),
        None => prepare_checkpoint(&synthetic_llama(
            std::env::var_os("MEMWISE_BENCH_SMALL").is_some(),
        )),
    };
    let binary = common::release_binary();
    assert!(
        binary.is_file(),
        "{} is missing: run `cargo build --release -p memwise-cli` first",
        binary.display()
    );
    let repeats: usize = std::env::var("MEMWISE_BENCH_REPEATS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
        .max(1);
    let files = Checkpoint::open(&model).unwrap().files().to_vec();
    let ids: Vec<String> = (0..TOKENS)
        .map(|i| (i * 7919 % 32000).to_string())
        .collect();
    let ids = ids.join(",");
    println!(
        "model {} ({:.0} MiB), binary {}, {repeats} run(s) per cell, load average {}",
        model.display(),
        files
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum::<u64>() as f64
            / MIB,
        binary.display(),
        load_average()
    );

    // What a warm page cache holds depends on how it was filled (large folios after reads,
    // 4 KiB pages after other paths, and a generation step maps the former far more
    // cheaply): start from the files evicted and read whole, as after a download or copy.
    evict(&files);
    read_files(&files, |_| {});
    let mut cells: Vec<Cell> = Vec::new();
    for cache in ["warm", "evicted"] {
        for job in [Job::Forward, Job::Generate] {
            let mut settings: Vec<(String, Vec<String>)> = vec![
                ("full".into(), vec!["--full".into()]),
                (
                    "full (copied)".into(),
                    vec!["--full".into(), "--no-mmap".into()],
                ),
            ];
            for budget in BUDGETS {
                let mut args = vec!["--keep-weights".to_owned()];
                let label = match budget {
                    Some(b) => {
                        args.extend(["--budget".to_owned(), b.to_owned()]);
                        b.to_owned()
                    }
                    None => "unlimited".into(),
                };
                settings.push((label, args));
            }
            if cache == "evicted" && job == Job::Forward {
                settings.push((
                    "400MiB, no read-ahead".into(),
                    vec![
                        "--keep-weights".into(),
                        "--budget".into(),
                        "400MiB".into(),
                        "--prefetch".into(),
                        "0".into(),
                    ],
                ));
            }
            for (setting, _) in &settings {
                cells.push(Cell {
                    cache,
                    job,
                    setting: setting.clone(),
                    runs: Vec::new(),
                });
            }
            for _ in 0..repeats {
                for (setting, args) in &settings {
                    if cache == "warm" {
                        read_files(&files, |_| {});
                    } else {
                        evict(&files);
                    }
                    let run = run_once(&binary, &model, &ids, job, args);
                    let cell = cells
                        .iter_mut()
                        .find(|c| c.cache == cache && c.job == job && &c.setting == setting)
                        .unwrap();
                    cell.runs.push(run);
                }
            }
        }
    }
    report(&cells);
}

/// One `memwise run`: what it measured, and the plan's predicted and the measured peak
/// (MiB) from its JSON line.
fn run_once(
    binary: &Path,
    model: &Path,
    ids: &str,
    job: Job,
    args: &[String],
) -> (Measured, Option<(f64, f64)>) {
    let mut command = Command::new(binary);
    command
        .arg("run")
        .arg(model)
        .args(["--input-ids", ids, "--json"])
        .args(args);
    if job == Job::Generate {
        command.args(["--max-new-tokens", &NEW_TOKENS.to_string()]);
    }
    let measured = measure(command);
    let figures = common::run_summary(&measured.stdout).and_then(|json| {
        Some((
            json["predicted_peak"].as_f64()? / MIB,
            json["measured_peak"].as_f64()? / MIB,
        ))
    });
    (measured, figures)
}

fn find<'a>(cells: &'a [Cell], cache: &str, job: Job, setting: &str) -> &'a Cell {
    cells
        .iter()
        .find(|c| c.cache == cache && c.job == job && c.setting == setting)
        .unwrap()
}

fn report(cells: &[Cell]) {
    println!();
    println!(
        "| cache | job | setting | time to result | vs full | peak RSS | predicted | error | within 5% / 16 MiB |"
    );
    println!("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for cell in cells {
        let full = find(cells, cell.cache, cell.job, "full").time();
        let (predicted, error, ok) = match cell.prediction() {
            Some((p, e, ok)) => (
                format!("{p:.0} MiB"),
                format!("{e:+.1} MiB"),
                if ok { "yes" } else { "no" },
            ),
            None => ("-".into(), "-".into(), "-"),
        };
        println!(
            "| {} | {} | {} | {:.2} s | {:.2}x | {:.0} MiB | {predicted} | {error} | {ok} |",
            cell.cache,
            cell.job.label(),
            cell.setting,
            cell.time(),
            cell.time() / full,
            cell.peak(),
        );
    }
    println!();
    let ratio = |cache, job, setting| {
        find(cells, cache, job, setting).time() / find(cells, cache, job, "full").time()
    };
    target(
        "200 MiB forward peaks within 200 MiB (warm)",
        find(cells, "warm", Job::Forward, "200MiB").peak(),
        200.0,
        " MiB",
    );
    target(
        "400 MiB forward at most 1.1x the full load (warm)",
        ratio("warm", Job::Forward, "400MiB"),
        1.1,
        "x",
    );
    target(
        "400 MiB generation at most 1.25x the full load (warm)",
        ratio("warm", Job::Generate, "400MiB"),
        1.25,
        "x",
    );
    target(
        "1 GiB generation at most 1.1x the full load (warm)",
        ratio("warm", Job::Generate, "1GiB"),
        1.1,
        "x",
    );
    let with = find(cells, "evicted", Job::Forward, "400MiB").time();
    let without = find(cells, "evicted", Job::Forward, "400MiB, no read-ahead").time();
    target(
        "evicted 400 MiB forward: read-ahead's time at most 0.8x none's",
        with / without,
        0.8,
        "x",
    );
    let outside: Vec<String> = cells
        .iter()
        .filter(|c| c.prediction().is_some_and(|(_, _, ok)| !ok))
        .map(|c| format!("{} {} {}", c.cache, c.job.label(), c.setting))
        .collect();
    println!(
        "target: predicted within 5% or 16 MiB in every cell: {}",
        if outside.is_empty() {
            "met".to_owned()
        } else {
            format!("missed in {}", outside.join("; "))
        }
    );
}

fn target(what: &str, value: f64, limit: f64, unit: &str) {
    let verdict = if value <= limit { "met" } else { "missed" };
    println!("target: {what}: {value:.2}{unit} (limit {limit}{unit}), {verdict}");
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
