//! `memwise quantize MODEL --bits 4 --group-size 128 [--sym|--asym] --out DIR`: round-to-nearest
//! quantization, stage by stage, into auto-round's checkpoint format.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use indicatif::{ProgressBar, ProgressStyle};
use memwise_model::quant::{
    plan_quantization, quantize_checkpoint_with, QuantizeEvent, QuantizeOptions, Start,
};

use super::inspect::human_bytes;

/// Options for `memwise quantize`. Unset options come from the configuration's
/// `quantization` and `export` sections (`memwise config show`); a flag wins over them.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Hugging Face model folder.
    model: PathBuf,
    /// Bits per weight: 2, 3, 4 or 8 (default: quantization.bits).
    #[arg(long)]
    bits: Option<u8>,
    /// Weights sharing one scale and zero point, or -1 for one group per output channel
    /// (default: quantization.group_size).
    #[arg(long, allow_negative_numbers = true)]
    group_size: Option<i64>,
    /// Symmetric quantization, the zero point fixed mid-range (default:
    /// quantization.symmetric, true as auto-round's).
    #[arg(long, conflicts_with = "asym")]
    sym: bool,
    /// Asymmetric quantization, a zero point per group.
    #[arg(long)]
    asym: bool,
    /// The checkpoint format written; only auto_round is implemented (default:
    /// export.export_format).
    #[arg(long)]
    format: Option<String>,
    /// The new model folder, which must not exist (default: export.export_path).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Checks the options, quantizes, and prints what was written.
pub fn run(args: Args) -> anyhow::Result<()> {
    let config = memwise::init_config().context("reading the memwise configuration")?;
    // Every option is checked before the model is opened.
    let (options, out) = options(&args, &config)?;
    let plan = plan_quantization(&args.model, &options)
        .with_context(|| format!("reading {}", args.model.display()))?;
    println!(
        "planned peak {}: stage {}, {} read + {} quantized output + {} working (the largest \
         linear's f32 copy, codes and packed form) + {} runtime",
        human_bytes(plan.peak_bytes),
        plan.stage,
        human_bytes(plan.read_bytes),
        human_bytes(plan.output_bytes),
        human_bytes(plan.working_bytes),
        human_bytes(plan.runtime_bytes),
    );
    // Drawn on stderr, and not at all when stderr is not a terminal.
    let bar = ProgressBar::new(0).with_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta}) {msg}",
    )?);
    let report = quantize_checkpoint_with(&args.model, &out, &options, &mut |p| {
        bar.set_length(p.bytes_total);
        bar.set_position(p.bytes_done);
        let stage = format!("{}/{} {}", p.stages_done, p.stages_total, p.stage);
        match &p.event {
            QuantizeEvent::Started(start) if *start != Start::Fresh => {
                bar.suspend(|| eprintln!("{start}"));
            }
            QuantizeEvent::TensorDone(name) => bar.set_message(format!("{stage}: {name}")),
            QuantizeEvent::StageReused => bar.set_message(format!("{stage}: verified, kept")),
            QuantizeEvent::StageWritten => bar.set_message(format!("{stage}: written")),
            QuantizeEvent::Finishing => bar.set_message("writing shards and configs"),
            _ => {}
        }
    })
    .with_context(|| format!("quantizing {} into {}", args.model.display(), out.display()))?;
    bar.finish_and_clear();
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
    if let Some(measured) = memwise::stats::ProcessMemory::read().map(|p| p.rss_peak) {
        println!(
            "peak: planned {}, measured {} (VmHWM)",
            human_bytes(plan.peak_bytes),
            human_bytes(measured)
        );
    }
    Ok(())
}

/// The options the flags and the configuration ask for, and the folder to write. Every key
/// of the `quantization` and `export` sections is honoured or refused, naming the key and
/// where its value came from.
fn options(args: &Args, config: &memwise::Config) -> anyhow::Result<(QuantizeOptions, PathBuf)> {
    use memwise::config::{refuse, ExportFormat};
    let (quant, export) = (&config.quantization, &config.export);
    let bits = args.bits.unwrap_or(quant.bits);
    let sym = if args.sym || args.asym {
        args.sym
    } else {
        quant.symmetric
    };
    // A weight dtype names the integer scheme (`int4` for 4 bits, or plain `int`).
    if args.bits.is_none()
        && !matches!(quant.weight_dtype.strip_prefix("int"), Some(n) if n.is_empty() || n == bits.to_string())
    {
        return Err(refuse(
            "quantization.weight_dtype",
            format!(
                "{:?} is not the integer scheme of quantization.bits = {bits} (use \"int{bits}\")",
                quant.weight_dtype
            ),
        )
        .into());
    }
    if quant.act_bits < 16 {
        return Err(refuse(
            "quantization.act_bits",
            format!(
                "{}: quantizing activations is not implemented; memwise quantizes weights only \
                 (set 16)",
                quant.act_bits
            ),
        )
        .into());
    }
    let format = match (&args.format, export.export_format) {
        (Some(format), _) => format.clone(),
        (None, ExportFormat::AutoRound) => "auto_round".to_owned(),
        (None, other) => {
            return Err(refuse(
                "export.export_format",
                format!("{other:?} is not implemented yet; memwise writes auto-round's format"),
            )
            .into())
        }
    };
    for (key, on) in [
        ("export.mixed_precision", export.mixed_precision),
        ("export.interleave", export.interleave),
    ] {
        if on {
            return Err(refuse(key, "true is not implemented yet; set false").into());
        }
    }
    let out = match (&args.out, &export.export_path) {
        (Some(out), _) => out.clone(),
        (None, Some(path)) => path.clone(),
        (None, None) => bail!("give --out DIR, or set export.export_path"),
    };
    let group_size = args.group_size.unwrap_or(quant.group_size);
    Ok((
        QuantizeOptions::from_values(bits, group_size, sym, &format)?,
        out,
    ))
}
