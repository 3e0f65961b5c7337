//! `memwise demo`: the whole story on a model made on the spot, no download needed.
//!
//! Writes a seeded random-weight Llama in the Hugging Face layout, runs it loaded whole and
//! streamed layer by layer, checks both give the same logits, and shows what each cost.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context as _};
use candle_core::{Device, Tensor};
use memwise::{enable_memory_tracking, get_memory_stats, reset_memory_stats, reset_peak_memory};
use memwise_model::{write_synthetic_checkpoint, Architecture, ModelConverter, SynthSpec};

use super::report::{aggregate_table, aggregates_in_run_order, mib};

/// Options for `memwise demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Decoder layers of the generated model (each about 12 MiB in f32).
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// Tokens in the input.
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Keep the generated model here instead of a temporary folder.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
}

/// One way of running the model, measured.
struct Measured {
    heap_peak: u64,
    seconds: f64,
    logits: Tensor,
}

/// Generates the model, runs it both ways and prints the comparison.
pub fn run(args: Args) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir().context("creating a temporary folder")?;
    let folder = args
        .keep
        .clone()
        .unwrap_or_else(|| scratch.path().join("demo-llama"));
    let spec = SynthSpec {
        hidden_size: 512,
        intermediate_size: 1408,
        num_layers: args.layers,
        num_heads: 8,
        num_kv_heads: 4,
        vocab_size: 8000,
        max_position_embeddings: 2048,
        ..SynthSpec::tiny(Architecture::Llama)
    };
    let written = write_synthetic_checkpoint(&spec, &folder)
        .with_context(|| format!("writing the demo model to {}", folder.display()))?;
    println!(
        "wrote a {}-layer Llama ({:.1} MiB of f32 weights) to {}",
        args.layers,
        written.total_size as f64 / 1048576.0,
        written.folder.display()
    );
    let ids: Vec<u32> = (0..args.tokens as u32).map(|i| (i * 7919) % 8000).collect();
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;

    enable_memory_tracking(true);
    let full = measure(&written.folder, &input, true)?;
    reset_memory_stats();
    let streamed = measure(&written.folder, &input, false)?;
    let stats = get_memory_stats();

    let same = full.logits.flatten_all()?.to_vec1::<f32>()?
        == streamed.logits.flatten_all()?.to_vec1::<f32>()?;
    ensure!(same, "streamed logits differ from the full load");

    println!("\nstreamed, layer by layer (each layer in its own MemoryTracker scope; with");
    println!("prefetch, a layer's peak includes the next layer being read meanwhile):");
    print!("{}", aggregate_table(aggregates_in_run_order(&stats)));
    println!("\n{:<28} {:>14} {:>12}", "", "heap peak", "time");
    for (name, m) in [
        ("full load, then forward", &full),
        ("streamed, prefetch 1", &streamed),
    ] {
        println!(
            "{:<28} {:>14} {:>10.1}ms",
            name,
            mib(Some(m.heap_peak)),
            m.seconds * 1e3
        );
    }
    println!(
        "\nstreaming needed {:.0}% of the full load's peak heap; the logits are identical.",
        100.0 * streamed.heap_peak as f64 / full.heap_peak as f64
    );
    Ok(())
}

/// Runs the model once, loaded whole first (`full`) or streamed, from a fresh peak.
fn measure(folder: &std::path::Path, input: &Tensor, full: bool) -> anyhow::Result<Measured> {
    reset_peak_memory();
    let start = Instant::now();
    let mut model = ModelConverter::new(folder)
        .prefetch_depth(1)
        .load_model_with_hooks(true)?;
    if full {
        model.load_all()?;
    }
    let logits = model.forward(input)?;
    let seconds = start.elapsed().as_secs_f64();
    drop(model);
    let heap_peak = get_memory_stats().heap.map_or(0, |h| h.peak);
    Ok(Measured {
        heap_peak,
        seconds,
        logits,
    })
}
