//! `memwise quantize MODEL --bits 4 --group-size 128 [--sym|--asym] --out DIR`: round-to-nearest
//! quantization, stage by stage, into auto-round's checkpoint format.

use std::path::PathBuf;

use anyhow::Context as _;
use memwise_model::quant::{quantize_checkpoint, QuantizeOptions};

use super::inspect::human_bytes;

/// Options for `memwise quantize`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Hugging Face model folder.
    model: PathBuf,
    /// Bits per weight: 2, 4 or 8.
    #[arg(long, default_value_t = 4)]
    bits: u8,
    /// Weights sharing one scale and zero point, or -1 for one group per output channel.
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    group_size: i64,
    /// Symmetric quantization, the zero point fixed mid-range (the default, as auto-round's).
    #[arg(long, conflicts_with = "asym")]
    sym: bool,
    /// Asymmetric quantization, a zero point per group.
    #[arg(long)]
    asym: bool,
    /// The checkpoint format written; only auto_round is implemented.
    #[arg(long, default_value = "auto_round")]
    format: String,
    /// The new model folder (must not exist).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
}

/// Checks the options, quantizes, and prints what was written.
pub fn run(args: Args) -> anyhow::Result<()> {
    // Every option is checked before the model is opened.
    let options =
        QuantizeOptions::from_values(args.bits, args.group_size, !args.asym, &args.format)?;
    let report = quantize_checkpoint(&args.model, &args.out, &options).with_context(|| {
        format!(
            "quantizing {} into {}",
            args.model.display(),
            args.out.display()
        )
    })?;
    let scheme = options.scheme();
    println!(
        "{}: {} linear weights quantized ({} bits, group size {}, {}), {} tensors kept, {} in {} file(s)",
        report.folder.display(),
        report.quantized,
        scheme.bits(),
        scheme.group_size(),
        if scheme.sym() { "symmetric" } else { "asymmetric" },
        report.kept,
        human_bytes(report.bytes),
        report.shards,
    );
    Ok(())
}
