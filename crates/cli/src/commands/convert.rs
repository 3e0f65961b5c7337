//! `memwise convert MODEL --workspace DIR`: write the layers that cannot be streamed as they
//! are into a workspace, resuming any earlier run.

use std::path::PathBuf;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressStyle};
use memwise_model::checkpoint::StoredDType;
use memwise_model::workspace::{ConvertEvent, ConvertOptions};
use memwise_model::{Checkpoint, Workspace};

use super::inspect::human_bytes;

/// Options for `memwise convert`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Hugging Face model folder.
    model: PathBuf,
    /// The workspace folder (config.memory.workspace_dir).
    #[arg(long, value_name = "DIR")]
    workspace: PathBuf,
    /// Convert float tensors to this compute dtype (f32, f16, bf16). Default: keep them.
    #[arg(long, value_parser = parse_dtype)]
    dtype: Option<StoredDType>,
}

fn parse_dtype(name: &str) -> Result<StoredDType, String> {
    StoredDType::parse(name)
        .filter(|d| d.is_float())
        .ok_or_else(|| format!("{name:?} is not a float dtype (f32, f16, bf16, f64)"))
}

/// Converts, showing a progress bar over the source bytes, then prints what it did.
pub fn run(args: Args) -> anyhow::Result<()> {
    let source = Checkpoint::open(&args.model)
        .with_context(|| format!("reading {}", args.model.display()))?;
    let workspace = Workspace::new(&args.workspace)?;
    let total: u64 = source.stages().iter().map(|s| s.bytes).sum();
    let bar = ProgressBar::new(total).with_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}) {msg}",
    )?);
    let report = workspace
        .convert(
            &source,
            &ConvertOptions::with_dtype(args.dtype),
            &mut |progress| {
                bar.set_position(progress.bytes_done);
                let verb = match progress.event {
                    ConvertEvent::TensorDone(_) => "converting",
                    ConvertEvent::StageWritten => "wrote",
                    ConvertEvent::StageReused => "kept",
                    ConvertEvent::StageInPlace => "streams in place:",
                    _ => "",
                };
                bar.set_message(format!("{verb} {}", progress.stage));
            },
        )
        .with_context(|| format!("converting into {}", args.workspace.display()))?;
    bar.finish_and_clear();
    println!(
        "{} written, {} rebuilt, {} kept from an earlier run, {} read from the source as they are; {} written; verified",
        report.written.len(),
        report.rebuilt.len(),
        report.reused.len(),
        report.in_place.len(),
        human_bytes(report.bytes_written)
    );
    Ok(())
}
