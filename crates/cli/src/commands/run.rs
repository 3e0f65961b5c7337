//! `memwise run`: stream a model through memory one layer at a time and show what each
//! layer cost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use candle_core::{Device, Tensor};
use memwise::report::{self, ReportOptions, Sampler};
use memwise::{enable_memory_tracking, get_memory_stats, reset_peak_memory, track};
use memwise_model::{ModelConverter, StreamedModel};

use super::report::{aggregate_table, memory_summary};

/// Options for `memwise run`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Hugging Face model folder (config.json plus safetensors or .bin weights).
    model: PathBuf,
    /// Token ids to run, comma-separated (e.g. 1,2,3).
    #[arg(
        long,
        value_delimiter = ',',
        required_unless_present = "prompt",
        conflicts_with = "prompt"
    )]
    input_ids: Vec<u32>,
    /// Text to run, tokenized with the model's tokenizer.json.
    #[arg(long)]
    prompt: Option<String>,
    /// Decoders: tokens to generate greedily after the input (0 runs one forward pass).
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_new_tokens: usize,
    /// Load every layer before running, for comparison with streaming.
    #[arg(long)]
    full: bool,
    /// Keep each layer's weights after it runs instead of freeing them.
    #[arg(long, conflicts_with = "full")]
    keep_weights: bool,
    /// Layers read ahead on a background thread (default: memory.prefetch_depth).
    #[arg(long, value_name = "N")]
    prefetch: Option<usize>,
    /// Bytes the weights in memory at once may take, e.g. 400MiB (default:
    /// memory.max_memory.cpu). Read-ahead waits while the next layer would not fit.
    #[arg(long, value_name = "SIZE")]
    budget: Option<memwise::config::ByteSize>,
    /// Write the final logits (decoders) or embeddings (encoders) here: .json or .safetensors.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// Write a report folder here: stats.json, trace.json (Perfetto, chrome://tracing) and
    /// timeline.svg, with each stage a slice.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// With --report: read RSS and the live heap this often, in milliseconds, between stage
    /// edges (the readings kept are bounded; a long run keeps them at a coarser spacing).
    #[arg(long, value_name = "MS", default_value_t = 10, requires = "report")]
    sample_interval: u64,
}

/// Loads the model's skeleton, runs it, and prints the result and a per-layer breakdown.
pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(out) = &args.output {
        output_format(out)?; // refuse a bad extension before any work
    }
    memwise::init_config().context("reading the memwise configuration")?;
    enable_memory_tracking(true);
    reset_peak_memory();
    let sampler = args.report.as_ref().map(|_| {
        Sampler::start(
            Duration::from_millis(args.sample_interval.max(1)),
            report::DEFAULT_CAPACITY,
        )
    });

    let mut converter = ModelConverter::new(&args.model).device(Device::Cpu);
    if let Some(depth) = args.prefetch {
        converter = converter.prefetch_depth(depth);
    }
    if let Some(budget) = args.budget {
        converter = converter.budget(Some(budget.bytes()));
    }
    let mut model = converter
        .load_model_with_hooks(!args.keep_weights)
        .with_context(|| format!("loading {}", args.model.display()))?;
    if args.full {
        track("load_all", || model.load_all()).context("loading every layer")?;
    }

    let (ids, tokenizer) = input_ids(&args)?;
    let input = Tensor::new(ids.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
    let result = if model.is_decoder() {
        decoder(&mut model, &input, &args, tokenizer.as_ref())?
    } else {
        encoder(&mut model, &input)?
    };

    let stats = get_memory_stats();
    let stage_names: Vec<&str> = model.stages().iter().map(|s| s.name()).collect();
    let per_layer = stage_names
        .iter()
        .filter_map(|name| stats.aggregates.iter().find(|a| a.name == *name));
    println!("\n{}", aggregate_table(per_layer));
    print!("{}", memory_summary(&stats));

    if let Some(out) = &args.output {
        write_tensor(out, &result)?;
        println!("wrote {}", out.display());
    }
    if let (Some(dir), Some(sampler)) = (&args.report, sampler) {
        let budget = args
            .budget
            .or_else(|| memwise::get_config().memory.budget("cpu"))
            .map(|b| b.bytes());
        let options = ReportOptions::new().samples(sampler.stop()).budget(budget);
        let files = report::write(dir, &stats, &options)
            .with_context(|| format!("writing the report to {}", dir.display()))?;
        println!(
            "report written to {}: open {} in Perfetto or chrome://tracing, {} in a browser",
            files.dir.display(),
            files.trace.display(),
            files.timeline.display()
        );
    }
    Ok(())
}

/// Runs a decoder: one forward pass, or greedy generation. Returns the final logits.
fn decoder(
    model: &mut StreamedModel,
    input: &Tensor,
    args: &Args,
    tokenizer: Option<&tokenizers::Tokenizer>,
) -> anyhow::Result<Tensor> {
    if args.max_new_tokens == 0 {
        let logits = track("forward", || model.forward(input))?;
        let last = logits.dim(1)? - 1;
        let next = logits.get(0)?.get(last)?.argmax(0)?.to_scalar::<u32>()?;
        println!("next token after the input: {next}");
        return Ok(logits);
    }
    let prompt = input.flatten_all()?.to_vec1::<u32>()?;
    let generated = track("generate", || {
        model.generate(&prompt, args.max_new_tokens, &[])
    })?;
    let ids: Vec<String> = generated.tokens.iter().map(u32::to_string).collect();
    println!("generated token ids: {}", ids.join(","));
    if let Some(tokenizer) = tokenizer {
        let text = tokenizer
            .decode(&generated.tokens, true)
            .map_err(|e| anyhow::anyhow!("decoding the generated tokens: {e}"))?;
        println!("generated text: {text}");
    }
    println!(
        "KV cache: {:.1} KiB",
        generated.kv_cache_bytes as f64 / 1024.0
    );
    generated.last_logits.context("no token was generated")
}

/// Runs an encoder and prints its mean-pooled embedding. Returns the embedding.
fn encoder(model: &mut StreamedModel, input: &Tensor) -> anyhow::Result<Tensor> {
    let types = input.zeros_like()?;
    let mask = input.ones_like()?;
    let pooled = track("forward", || model.embed(input, &types, &mask))?;
    let values: Vec<f32> = pooled.get(0)?.to_vec1()?;
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    let first: Vec<String> = values.iter().take(8).map(|v| format!("{v:.5}")).collect();
    println!("embedding: {} values, L2 norm {norm:.5}", values.len());
    println!("first values: [{}]", first.join(", "));
    Ok(pooled)
}

/// The ids to run, and the tokenizer when the input was text.
fn input_ids(args: &Args) -> anyhow::Result<(Vec<u32>, Option<tokenizers::Tokenizer>)> {
    let Some(prompt) = &args.prompt else {
        return Ok((args.input_ids.clone(), None));
    };
    let path = args.model.join("tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
        anyhow::anyhow!(
            "--prompt needs {}: {e} (pass --input-ids instead)",
            path.display()
        )
    })?;
    let encoding = tokenizer
        .encode(prompt.as_str(), true)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt with {}: {e}", path.display()))?;
    if encoding.get_ids().is_empty() {
        bail!("the prompt tokenized to no tokens");
    }
    Ok((encoding.get_ids().to_vec(), Some(tokenizer)))
}

#[derive(Clone, Copy)]
enum OutputFormat {
    Json,
    Safetensors,
}

fn output_format(path: &Path) -> anyhow::Result<OutputFormat> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => Ok(OutputFormat::Json),
        Some("safetensors") => Ok(OutputFormat::Safetensors),
        _ => bail!(
            "--output {}: use a .json or .safetensors file name",
            path.display()
        ),
    }
}

/// Writes `tensor` as f32 to `path`, atomically: a temporary file renamed into place, so
/// an interrupted run never leaves a half-written file.
fn write_tensor(path: &Path, tensor: &Tensor) -> anyhow::Result<()> {
    let tensor = tensor.to_dtype(candle_core::DType::F32)?;
    let file_name = path.file_name().context("--output needs a file name")?;
    let tmp = path.with_file_name(format!(".{}.tmp", file_name.to_string_lossy()));
    match output_format(path)? {
        OutputFormat::Json => {
            let json = serde_json::json!({
                "shape": tensor.dims(),
                "data": tensor.flatten_all()?.to_vec1::<f32>()?,
            });
            std::fs::write(&tmp, json.to_string())
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
        OutputFormat::Safetensors => {
            let tensors = HashMap::from([("output".to_string(), tensor)]);
            candle_core::safetensors::save(&tensors, &tmp)
                .with_context(|| format!("writing {}", tmp.display()))?;
        }
    }
    std::fs::rename(&tmp, path).with_context(|| format!("moving the result to {}", path.display()))
}
