//! `memwise plan`: predict a run's whole-process peak and choose where each stage's
//! weights live, before reading any of them.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use memwise_model::plan::{Placement, Plan, Request, Residency};
use memwise_model::Checkpoint;

use super::report::mib;

/// Options for `memwise plan`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Hugging Face model folder (config.json plus safetensors or .bin weights).
    model: PathBuf,
    /// The whole process's peak the run may reach, e.g. 400MiB (default:
    /// memory.max_memory.cpu; none: no limit).
    #[arg(long, value_name = "SIZE")]
    budget: Option<memwise::config::ByteSize>,
    /// Tokens in each input sequence.
    #[arg(long, default_value_t = 128, value_name = "N")]
    seq: usize,
    /// Tokens generated after the input.
    #[arg(long, default_value_t = 0, value_name = "N")]
    new_tokens: usize,
    /// Sequences run together.
    #[arg(long, default_value_t = 1, value_name = "N")]
    batch: usize,
    /// Stages read ahead (default: memory.prefetch_depth).
    #[arg(long, value_name = "N")]
    prefetch: Option<usize>,
    /// Stream every stage instead of the cheapest placement that fits.
    #[arg(long)]
    streamed: bool,
    /// Plan for weights copied into memory (`memwise run --no-mmap`) instead of computed on
    /// the mapped files (what `memwise run` does by default).
    #[arg(long)]
    no_mmap: bool,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// Plans the run and prints the plan; a budget nothing fits is an error naming the deficit.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config = memwise::init_config().context("reading the memwise configuration")?;
    let checkpoint = Checkpoint::open(&args.model)
        .with_context(|| format!("opening {}", args.model.display()))?;
    let request = Request::new(args.seq)
        .batch(args.batch)
        .new_tokens(args.new_tokens)
        .budget(
            args.budget
                .or_else(|| config.memory.budget("cpu"))
                .map(|b| b.bytes()),
        )
        .prefetch_depth(args.prefetch.unwrap_or(config.memory.prefetch_depth))
        .placement(args.streamed.then_some(Placement::Streamed))
        .mapped(!args.no_mmap);
    let plan = Plan::new(&checkpoint, &request)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&plan_json(&plan))?);
    } else {
        print!("{}", render(&plan));
    }
    Ok(())
}

/// The plan and the request it answers, as JSON (`run --json` carries it too).
pub fn plan_json(plan: &Plan) -> serde_json::Value {
    let request = plan.request();
    let mut value = serde_json::to_value(plan).unwrap_or_default();
    value["request"] = serde_json::json!({
        "batch": request.batch,
        "seq_len": request.seq_len,
        "new_tokens": request.new_tokens,
        "dtype": format!("{:?}", request.dtype).to_lowercase(),
        "budget": request.budget,
        "prefetch_depth": request.prefetch_depth,
    });
    value
}

/// The plan as text: the request, the placement, each device's parts and each stage.
pub fn render(plan: &Plan) -> String {
    let request = plan.request();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "plan: batch {} x {} tokens, {} new, {:?}, prefetch {}, budget {}",
        request.batch,
        request.seq_len,
        request.new_tokens,
        request.dtype,
        request.prefetch_depth,
        request.budget.map_or("none".into(), |b| mib(Some(b)))
    );
    let _ = writeln!(out, "placement: {}", plan.placement());
    for device in plan.devices() {
        let _ = writeln!(
            out,
            "{} predicted peak {}",
            device.device,
            mib(Some(device.peak))
        );
        for (name, bytes) in device.parts.named() {
            let _ = writeln!(out, "  {name:<18} {:>12}", mib(Some(bytes)));
        }
    }
    let _ = writeln!(
        out,
        "{:<28} {:>12} {:>12}  where",
        "stage", "weights", "stored"
    );
    for stage in plan.stages() {
        let residency = match stage.residency {
            Residency::Resident => "resident",
            Residency::Streamed => "streamed",
        };
        let _ = writeln!(
            out,
            "{:<28} {:>12} {:>12}  {residency}",
            stage.name,
            mib(Some(stage.weight_bytes)),
            mib(Some(stage.stored_bytes))
        );
    }
    out
}
