//! `memwise demo`: the whole story on a model made on the spot, no download needed.
//!
//! Makes (once, into the cache dir) a seeded random-weight Llama of about 1 GiB in the
//! Hugging Face layout, then runs it twice with `memwise run`, each run in a child process of
//! its own so that each peak RSS is that run's alone: loaded whole, and streamed layer by
//! layer under a budget. It checks both wrote the same logits, bit for bit, prints them side
//! by side, and says where each run's report folder is.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use memwise::config::ByteSize;
use memwise_model::{write_synthetic_checkpoint, Architecture, Checkpoint, SynthSpec};

use super::report::mib;

/// Options for `memwise demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// About how large the generated model is (f32 weights): the layers are as many as
    /// fit, at least one. --layers wins.
    #[arg(long, value_name = "SIZE", default_value = "1GiB")]
    size: ByteSize,
    /// Decoder layers of the generated model (default: from --size).
    #[arg(long)]
    layers: Option<usize>,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 2048)]
    hidden: usize,
    /// Width of the MLP's inner layer.
    #[arg(long, default_value_t = 5632)]
    intermediate: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 32)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    /// Tokens in the vocabulary.
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Tokens in the input.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// The whole-process budget of the streamed run, e.g. 400MiB.
    #[arg(long, value_name = "SIZE", default_value = "400MiB")]
    budget: ByteSize,
    /// The model folder: reused while it holds this model, written otherwise (default: a
    /// folder in the cache dir named after the model's shape).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Where the two report folders go, `full` and `streamed` (default: `demo-reports` in
    /// the cache dir).
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
}

/// What one child run measured.
struct Measured {
    /// Wall time of the child process, start to exit (the report's writing included).
    seconds: f64,
    /// `VmHWM` of the child.
    peak: Option<u64>,
    /// What the plan predicted for its peak.
    predicted: Option<u64>,
    /// The largest anonymous and file-backed RSS among the report's readings.
    anon: Option<u64>,
    file: Option<u64>,
    /// Stages by heap peak, largest first.
    stage_peaks: Vec<(String, u64)>,
    /// The placement the plan chose.
    placement: String,
    /// The report folder and the logits file it wrote.
    report: PathBuf,
    output: PathBuf,
}

/// Makes the model if needed, runs it both ways and prints the comparison.
pub fn run(args: Args) -> anyhow::Result<()> {
    memwise::init_config().context("reading the memwise configuration")?;
    let cache = memwise::get_config().cache_dir.clone();
    let spec = spec(&args);
    let folder = args.model.clone().unwrap_or_else(|| {
        cache.join(format!(
            "demo-llama-h{}-i{}-l{}-v{}",
            spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.vocab_size
        ))
    });
    prepare(&spec, &folder)?;
    let reports = args
        .report
        .clone()
        .unwrap_or_else(|| cache.join("demo-reports"));

    let ids: Vec<String> = (0..args.tokens)
        .map(|i| ((i * 7919) % spec.vocab_size).to_string())
        .collect();
    let ids = ids.join(",");
    let budget = args.budget.bytes().to_string();
    let full = measure(&folder, &ids, &reports.join("full"), &["--full"])?;
    let streamed = measure(
        &folder,
        &ids,
        &reports.join("streamed"),
        &["--budget", &budget],
    )?;

    let same = std::fs::read(&full.output)? == std::fs::read(&streamed.output)?;
    ensure!(
        same,
        "the streamed run's logits ({}) differ from the full load's ({})",
        streamed.output.display(),
        full.output.display()
    );

    let breakdown = std::fs::read_to_string(streamed.report.join("breakdown.txt"))
        .context("reading the streamed run's breakdown")?;
    println!("\nstreamed, stage by stage (each stage a scope; with read-ahead, a stage's peak");
    println!("includes the next stage being read meanwhile):\n{breakdown}");
    print!(
        "{}",
        side_by_side(&full, &streamed, args.budget.bytes(), args.tokens)
    );
    println!(
        "\nthe logits are identical, bit for bit ({} and {}).",
        full.output.display(),
        streamed.output.display()
    );
    if let (Some(f), Some(s)) = (full.peak, streamed.peak) {
        println!(
            "streaming needed {:.0}% of the full load's peak RSS.",
            100.0 * s as f64 / f as f64
        );
    }
    println!("\nreports (trace.json opens in https://ui.perfetto.dev, timeline.svg in a browser):");
    for (name, m) in [("full load", &full), ("streamed", &streamed)] {
        println!("  {name:<10} {}", m.report.display());
    }
    Ok(())
}

/// The model the options describe: a Llama whose layers are as many as `--size` allows.
fn spec(args: &Args) -> SynthSpec {
    let (h, i, v) = (
        args.hidden as u64,
        args.intermediate as u64,
        args.vocab as u64,
    );
    let kv = (h / args.heads.max(1) as u64) * args.kv_heads as u64;
    // f32: embeddings and lm_head, final norm; per layer attention, MLP and two norms.
    let fixed = 4 * (2 * v * h + h);
    let per_layer = 4 * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h);
    let fit = args.size.bytes().saturating_sub(fixed) as f64 / per_layer as f64;
    let layers = args.layers.unwrap_or((fit.round() as usize).max(1));
    SynthSpec {
        hidden_size: args.hidden,
        intermediate_size: args.intermediate,
        num_layers: layers,
        num_heads: args.heads,
        num_kv_heads: args.kv_heads,
        vocab_size: args.vocab,
        max_position_embeddings: 2048,
        ..SynthSpec::tiny(Architecture::Llama)
    }
}

/// Reuses `folder` while its `config.json` is the spec's and its index holds every byte;
/// otherwise writes the model there, with a progress bar on a terminal.
fn prepare(spec: &SynthSpec, folder: &Path) -> anyhow::Result<()> {
    let config = spec.config_json()?;
    let expected: u64 = spec
        .tensors()?
        .iter()
        .map(|t| t.element_count() as u64 * 4)
        .sum();
    let valid = std::fs::read_to_string(folder.join("config.json")).is_ok_and(|c| c == config)
        && Checkpoint::open(folder).is_ok_and(|c| {
            c.index().stored_bytes() == expected && c.files().iter().all(|f| f.metadata().is_ok())
        });
    if valid {
        println!(
            "reusing the {}-layer Llama ({}) in {}",
            spec.num_layers,
            mib(Some(expected)),
            folder.display()
        );
        return Ok(());
    }
    if folder.exists() {
        // Only what the writer makes is removed: never a folder of the user's own.
        let ours = |name: &str| {
            name == "config.json"
                || name == "model.safetensors.index.json"
                || (name.starts_with("model-") && name.ends_with(".safetensors"))
        };
        let entries =
            std::fs::read_dir(folder).with_context(|| format!("reading {}", folder.display()))?;
        for entry in entries {
            let name = entry?.file_name();
            if !ours(&name.to_string_lossy()) {
                bail!(
                    "{} holds {:?}, which the demo did not write; choose another --model folder",
                    folder.display(),
                    name
                );
            }
        }
        std::fs::remove_dir_all(folder)
            .with_context(|| format!("removing the stale model in {}", folder.display()))?;
    }
    if let Some(parent) = folder.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let bar = ProgressBar::with_draw_target(Some(expected), ProgressDrawTarget::stderr())
        .with_style(ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
        )?)
        .with_message("writing the demo model");
    let started = Instant::now();
    let done = AtomicBool::new(false);
    // The writer stages its files in `.NAME.partial-PID` beside the folder; their sizes
    // are the progress.
    let staging = folder.with_file_name(format!(
        ".{}.partial-{}",
        folder
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let written = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                bar.set_position(folder_bytes(&staging));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let written = write_synthetic_checkpoint(spec, folder);
        done.store(true, Ordering::Relaxed);
        written
    })
    .with_context(|| format!("writing the demo model to {}", folder.display()))?;
    bar.finish_and_clear();
    println!(
        "wrote a {}-layer Llama ({} of f32 weights) to {} in {:.1} s; later demos reuse it",
        spec.num_layers,
        mib(Some(written.total_size)),
        written.folder.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Bytes in the files of `dir` (0 where it does not exist).
fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// Runs `memwise run` on the model in a child process with `extra` options, a report in
/// `report` and the logits written there, and reads what it measured.
fn measure(model: &Path, ids: &str, report: &Path, extra: &[&str]) -> anyhow::Result<Measured> {
    std::fs::create_dir_all(report).with_context(|| format!("creating {}", report.display()))?;
    let output = report.join("logits.safetensors");
    let exe = std::env::current_exe().context("finding the memwise executable")?;
    let mut command = Command::new(exe);
    command
        .arg("run")
        .arg(model)
        .args(["--input-ids", ids, "--json", "--report"])
        .arg(report)
        .arg("--output")
        .arg(&output)
        .args(extra);
    let what = if extra.contains(&"--full") {
        "loaded whole".to_owned()
    } else {
        format!("streamed ({})", extra.join(" "))
    };
    let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr())
        .with_message(format!("running the model {what} in a child process"));
    spinner.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let result = command.output().context("starting memwise run")?;
    let seconds = started.elapsed().as_secs_f64();
    spinner.finish_and_clear();
    let stdout = String::from_utf8_lossy(&result.stdout);
    let stderr = String::from_utf8_lossy(&result.stderr);
    let log = report.join("run.log");
    std::fs::write(&log, format!("{stdout}{stderr}"))
        .with_context(|| format!("writing {}", log.display()))?;
    if !result.status.success() {
        bail!(
            "the run {what} failed ({}):\n{}",
            result.status,
            stderr.trim_end()
        );
    }
    // The summary is the one line of JSON (the output file and the report are named after).
    let summary: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| {
            serde_json::from_str(l)
                .ok()
                .filter(|v: &serde_json::Value| v.is_object())
        })
        .with_context(|| {
            format!(
                "the run {what} ended without its JSON summary; see {}",
                log.display()
            )
        })?;
    let (anon, file) = rss_peaks(&report.join("trace.json"))?;
    Ok(Measured {
        seconds,
        peak: summary["measured_peak"].as_u64(),
        predicted: summary["predicted_peak"].as_u64(),
        placement: summary["plan"]["placement"]
            .as_str()
            .unwrap_or("?")
            .replace('_', " "),
        anon,
        file,
        stage_peaks: stage_peaks(&report.join("breakdown.json"))?,
        report: report.to_owned(),
        output,
    })
}

/// The largest anonymous and file-backed RSS among a trace's `RSS` counter readings.
fn rss_peaks(trace: &Path) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let text = std::fs::read(trace).with_context(|| format!("reading {}", trace.display()))?;
    let trace: serde_json::Value = serde_json::from_slice(&text)?;
    let mut peaks = (None, None);
    let counters = trace["traceEvents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["ph"] == "C" && e["name"] == "RSS");
    for event in counters {
        let args = &event["args"];
        peaks.0 = peaks.0.max(args["anon"].as_u64());
        peaks.1 = peaks.1.max(args["file"].as_u64());
    }
    Ok(peaks)
}

/// Each stage's heap peak from a report's `breakdown.json`, largest first.
fn stage_peaks(breakdown: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let text =
        std::fs::read(breakdown).with_context(|| format!("reading {}", breakdown.display()))?;
    let breakdown: serde_json::Value = serde_json::from_slice(&text)?;
    let rows = breakdown["stages"].as_array().cloned().unwrap_or_default();
    let mut peaks: Vec<(String, u64)> = rows
        .iter()
        .filter_map(|r| {
            Some((
                r["stage"].as_str()?.to_owned(),
                r["heap_peak_delta"].as_u64()?,
            ))
        })
        .collect();
    peaks.sort_by_key(|p| std::cmp::Reverse(p.1));
    Ok(peaks)
}

/// The two runs side by side.
fn side_by_side(full: &Measured, streamed: &Measured, budget: u64, tokens: usize) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let streamed_name = format!("streamed, budget {}", mib(Some(budget)));
    let mut row = |label: &str, a: String, b: String| {
        let _ = writeln!(out, "{label:<34} {a:>14}   {b:>26}");
    };
    row(
        &format!("{tokens} tokens, one forward pass"),
        "full load".into(),
        streamed_name,
    );
    row(
        "placement (plan)",
        full.placement.clone(),
        streamed.placement.clone(),
    );
    row(
        "time to result (whole process)",
        format!("{:.2} s", full.seconds),
        format!("{:.2} s", streamed.seconds),
    );
    row("peak RSS (VmHWM)", mib(full.peak), mib(streamed.peak));
    row(
        "  predicted by the plan",
        mib(full.predicted),
        mib(streamed.predicted),
    );
    row("  anonymous, at most", mib(full.anon), mib(streamed.anon));
    row("  file-backed, at most", mib(full.file), mib(streamed.file));
    // The stages with the largest heap peaks in either run.
    let peak_of = |m: &Measured, stage: &str| {
        m.stage_peaks
            .iter()
            .find(|(s, _)| s == stage)
            .map(|&(_, p)| p)
    };
    let mut stages: Vec<&str> = full
        .stage_peaks
        .iter()
        .chain(&streamed.stage_peaks)
        .map(|(s, _)| s.as_str())
        .collect();
    stages.sort_by_key(|s| {
        std::cmp::Reverse(peak_of(full, s).max(peak_of(streamed, s)).unwrap_or(0))
    });
    let mut seen = Vec::new();
    for stage in stages {
        if seen.contains(&stage) {
            continue;
        }
        seen.push(stage);
        if seen.len() > 3 {
            break;
        }
        row(
            &format!("heap peak of {stage}"),
            mib(peak_of(full, stage)),
            mib(peak_of(streamed, stage)),
        );
    }
    out
}
