//! `memwise inspect MODEL`: what a checkpoint holds and the memory it needs.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use memwise_model::checkpoint::{CheckpointSummary, StageOrigin};
use memwise_model::Checkpoint;

/// Options for `memwise inspect`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Hugging Face model folder (config.json with safetensors or pytorch_model.bin).
    model: PathBuf,
    /// Print the summary as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Reads the folder's headers (no weights) and prints the summary.
pub fn run(args: Args) -> anyhow::Result<()> {
    let checkpoint = Checkpoint::open(&args.model)
        .with_context(|| format!("inspecting {}", args.model.display()))?;
    let summary = checkpoint.summary();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print!("{}", render(&summary));
    }
    Ok(())
}

/// Bytes in the largest binary unit that keeps the figure at or above 1.
pub(crate) fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = UNITS[0];
    for next in &UNITS[1..] {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.2} {unit}")
}

fn render(summary: &CheckpointSummary) -> String {
    let mut out = String::new();
    let unknown = || "unknown".to_owned();
    let _ = writeln!(out, "model         {}", summary.folder.display());
    let _ = writeln!(
        out,
        "architecture  {} ({})",
        summary.architecture.clone().unwrap_or_else(unknown),
        summary.model_type.clone().unwrap_or_else(unknown)
    );
    let _ = writeln!(out, "format        {:?}", summary.format);
    let _ = writeln!(
        out,
        "stages        {} blocks, {} stages ({}), {} tensors",
        summary.block_count,
        summary.stages.len(),
        match summary.stage_origin {
            StageOrigin::Traced => "as memwise runs them",
            _ => "grouped by module: memwise has no blocks for this architecture",
        },
        summary.tensor_count
    );
    let width = summary
        .stages
        .iter()
        .map(|s| s.stage.len())
        .fold(5, usize::max);
    let _ = writeln!(
        out,
        "\n{:<width$} {:>8} {:>14}  dtypes",
        "stage", "tensors", "bytes"
    );
    for stage in &summary.stages {
        let dtypes: Vec<String> = stage
            .bytes_by_dtype
            .iter()
            .map(|(dtype, bytes)| format!("{dtype} {}", human_bytes(*bytes)))
            .collect();
        let _ = writeln!(
            out,
            "{:<width$} {:>8} {:>14}  {}",
            stage.stage,
            stage.tensors,
            human_bytes(stage.bytes),
            dtypes.join(", ")
        );
    }
    let _ = writeln!(out);
    if let Some(largest) = &summary.largest_stage {
        let _ = writeln!(
            out,
            "largest stage     {} ({})",
            largest.stage,
            human_bytes(largest.bytes)
        );
    }
    let _ = writeln!(
        out,
        "total stored      {}",
        human_bytes(summary.total_bytes)
    );
    if summary.tied.is_empty() {
        let _ = writeln!(out, "tied weights      none");
    }
    for tied in &summary.tied {
        let _ = writeln!(out, "tied weights      {} → {}", tied.tensor, tied.source);
    }
    if !summary.unread_tensors.is_empty() {
        let _ = writeln!(
            out,
            "read by no stage  {}",
            summary.unread_tensors.join(", ")
        );
    }
    let _ = writeln!(
        out,
        "full load needs   {} of weights",
        human_bytes(summary.full_load_bytes)
    );
    let _ = writeln!(
        out,
        "stage by stage    {} of weights (running stage + prefetched next)",
        human_bytes(summary.stage_by_stage_bytes)
    );
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn human_sizes() {
        assert_eq!(super::human_bytes(512), "512 B");
        assert_eq!(super::human_bytes(2048), "2.00 KiB");
        assert_eq!(super::human_bytes(3 << 30), "3.00 GiB");
    }
}
