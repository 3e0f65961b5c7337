//! `memwise run`: stream a model through memory one layer at a time and show what each
//! layer cost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use candle_core::{Device, Tensor};
use memwise::report::{self, ReportOptions, Sampler};
use memwise::{enable_memory_tracking, get_memory_stats, reset_peak_memory, track};
use memwise_model::models::{GenerateOptions, Sampling};
use memwise_model::plan::{Placement, Request, RUNTIME_FLOOR};
use memwise_model::{Inputs, ModelConverter, ReadStrategy, StreamedModel};

use super::report::{
    breakdown_table, kind_peaks, memory_summary, mib, signed_mib, stage_breakdown, Breakdown,
};

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
    /// Text to run, tokenized with the model's tokenizer.json (its padding, truncation and
    /// special tokens). Repeat it to run several texts as one padded batch.
    #[arg(long, value_name = "TEXT")]
    prompt: Vec<String>,
    /// Decoders: tokens to generate after the input (0 runs one forward pass). Generation
    /// stops early at the model's end-of-sequence token (generation_config.json or
    /// config.json), and text is printed as it is generated.
    #[arg(long, default_value_t = 0, value_name = "N")]
    max_new_tokens: usize,
    /// Decoders: each --prompt is a user's chat message, wrapped in the chat template of
    /// the model's tokenizer_config.json (for instruct models).
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// Decoders: draw each new token at this temperature instead of taking the likeliest
    /// (0, the default, is greedy).
    #[arg(
        long,
        default_value_t = 0.0,
        value_name = "T",
        allow_negative_numbers = true
    )]
    temperature: f64,
    /// Decoders, with --temperature: draw only among the K likeliest tokens.
    #[arg(long, value_name = "K")]
    top_k: Option<usize>,
    /// Decoders, with --temperature: draw only among the likeliest tokens that together
    /// hold probability P.
    #[arg(long, value_name = "P")]
    top_p: Option<f64>,
    /// Decoders, with --temperature: the seed of the draw; the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Load every layer before running, for comparison with streaming.
    #[arg(long)]
    full: bool,
    /// Keep each layer's weights after it runs instead of freeing them.
    #[arg(long, conflicts_with = "full")]
    keep_weights: bool,
    /// Copy the weights into memory instead of computing on the model's mapped files. By
    /// default f32 weights are used where they lie in the page cache, as llama.cpp does:
    /// do not rewrite or truncate the model's files while memwise runs.
    #[arg(long)]
    no_mmap: bool,
    /// Layers read ahead on a background thread (default: memory.prefetch_depth); 0 turns
    /// read-ahead off. Mapped weights are read into the page cache further ahead, within
    /// half the memory available.
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
    /// End with a one-line JSON summary: the plan used and the predicted and measured
    /// whole-process peaks.
    #[arg(long)]
    json: bool,
    /// With --report: read RSS and the live heap this often, in milliseconds, between stage
    /// edges (default: memory.tracking.sample_interval_ms).
    #[arg(long, value_name = "MS", requires = "report", value_parser = clap::value_parser!(u64).range(1..))]
    sample_interval: Option<u64>,
    /// With --report: keep at most this many readings; a longer run keeps them at a coarser
    /// spacing (default: memory.tracking.sample_capacity).
    #[arg(long, value_name = "N", requires = "report", value_parser = clap::value_parser!(u64).range(2..))]
    sample_capacity: Option<u64>,
}

/// Loads the model's skeleton, runs it, and prints the result and a per-layer breakdown.
pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(out) = &args.output {
        check_output(out)?; // refuse a bad name or folder before any work
    }
    memwise::init_config().context("reading the memwise configuration")?;
    enable_memory_tracking(true);
    reset_peak_memory();
    let sampler = args.report.as_ref().map(|_| {
        let config = memwise::get_config();
        let tracking = &config.memory.tracking;
        Sampler::start(
            args.sample_interval
                .map_or(tracking.sample_interval(), Duration::from_millis),
            args.sample_capacity
                .map_or(tracking.sample_capacity, |n| n as usize),
        )
    });

    let is_decoder_model = is_decoder(&args.model)?;
    check_generation_flags(&args, is_decoder_model)?;
    let batch = input_batch(&args, is_decoder_model)?;
    let mut converter = ModelConverter::new(&args.model)
        .device(Device::Cpu)
        .request(run_request(&args, &batch));
    if let Some(depth) = args.prefetch {
        converter = converter.prefetch_depth(depth);
    }
    if !args.no_mmap {
        // SAFETY: `--help` asks the user not to change the model's files while memwise runs;
        // a file found shorter than its tensors is still an error, not a crash.
        converter = converter.read_strategy(unsafe { ReadStrategy::mmap_release() });
    }
    if let Some(budget) = args.budget {
        converter = converter.budget(Some(budget.bytes()));
    }
    let mut model = converter
        .load_model_with_hooks(!args.keep_weights && !args.full)
        .with_context(|| format!("loading {}", args.model.display()))?;
    print!("plan used:\n{}", super::plan::render(model.plan()));
    if args.full {
        track("load_all", || model.load_all()).context("loading every layer")?;
    }

    let result = if model.is_decoder() {
        decoder(&mut model, &batch, &args)?
    } else {
        encoder(&mut model, &batch)?
    };

    let stats = get_memory_stats();
    let dtype = candle_core::DType::F32;
    let stages: Vec<(&str, u64)> = model
        .stages()
        .iter()
        .map(|s| (s.name(), s.weight_bytes(dtype)))
        .collect();
    let samples = sampler.map(Sampler::stop);
    let breakdown = Breakdown {
        stages: stage_breakdown(&stats, &stages),
        kinds: kind_peaks(&stats, samples.as_deref().unwrap_or_default()),
    };
    let table = breakdown_table(&breakdown);
    println!("\n{table}");
    print!("{}", memory_summary(&stats));
    predicted_vs_measured(&model, args.json)?;

    if let Some(out) = &args.output {
        write_tensor(out, &result)?;
        println!("wrote {}", out.display());
    }
    if let (Some(dir), Some(samples)) = (&args.report, samples) {
        let budget = args
            .budget
            .or_else(|| memwise::get_config().memory.budget("cpu"))
            .map(|b| b.bytes());
        let options = ReportOptions::new().samples(samples).budget(budget);
        let files = report::write(dir, &stats, &options)
            .with_context(|| format!("writing the report to {}", dir.display()))?;
        write_breakdown(dir, &table, &breakdown)?;
        println!(
            "report written to {}: open {} in Perfetto or chrome://tracing, {} in a browser",
            files.dir.display(),
            files.trace.display(),
            files.timeline.display()
        );
    }
    Ok(())
}

/// Whether the model folder holds a decoder (read from its config, no weight).
/// Refuses generation flags that would be silently ignored: on an encoder, which embeds
/// and does not generate, and top-k/top-p without a temperature to draw at.
fn check_generation_flags(args: &Args, decoder: bool) -> anyhow::Result<()> {
    let generating = [
        ("--max-new-tokens", args.max_new_tokens > 0),
        ("--chat", args.chat),
        ("--temperature", args.temperature != 0.0),
        ("--top-k", args.top_k.is_some()),
        ("--top-p", args.top_p.is_some()),
    ];
    if let Some((flag, _)) = generating.iter().find(|(_, set)| *set && !decoder) {
        bail!(
            "{flag} is for decoders; {} is an encoder, which embeds and does not generate",
            args.model.display()
        );
    }
    if args.max_new_tokens == 0 {
        if let Some((flag, _)) = generating[2..].iter().find(|(_, set)| *set) {
            bail!("{flag} shapes generation: give --max-new-tokens too");
        }
    }
    if args.temperature == 0.0 {
        if let Some((flag, _)) = generating[3..].iter().find(|(_, set)| *set) {
            bail!("{flag} shapes a draw: give --temperature above 0 too (0 is greedy)");
        }
    }
    Ok(())
}

fn is_decoder(model: &Path) -> anyhow::Result<bool> {
    let checkpoint = memwise_model::Checkpoint::open(model)
        .with_context(|| format!("opening {}", model.display()))?;
    Ok(matches!(
        checkpoint.architecture(),
        Ok(memwise_model::models::ArchitectureConfig::Decoder(_))
    ))
}

/// The run the plan is made for: the batch's shape and the tokens to generate, with this
/// process's resident memory so far as the runtime floor where it is above the default.
fn run_request(args: &Args, batch: &Batch) -> Request {
    let (rows, len) = batch.ids.dims2().unwrap_or((1, 1));
    let now = memwise::stats::ProcessMemory::read().map_or(0, |p| p.rss);
    Request::new(len)
        .placement(args.full.then_some(Placement::AllResident))
        .batch(rows)
        .new_tokens(args.max_new_tokens)
        .runtime_floor(RUNTIME_FLOOR.max(now))
}

/// Prints the plan's predicted peak beside the measured one (`VmHWM`), and with `json` a
/// last line of JSON carrying both and the plan.
fn predicted_vs_measured(model: &StreamedModel, json: bool) -> anyhow::Result<()> {
    let predicted = model.plan().peak();
    let measured = memwise::stats::ProcessMemory::read().map(|p| p.rss_peak);
    let error = measured.map(|m| m as i64 - predicted as i64);
    println!(
        "peak: predicted {}, measured {} (VmHWM), measured - predicted {}",
        mib(Some(predicted)),
        mib(measured),
        signed_mib(error)
    );
    if json {
        let mut summary = serde_json::json!({
            "plan": super::plan::plan_json(model.plan()),
            "predicted_peak": predicted,
            "measured_peak": measured,
        });
        summary["error_bytes"] = error.into();
        println!("{summary}");
    }
    Ok(())
}

/// The sequences to run: token ids, padding mask and token types, `(batch, len)` each.
pub(super) struct Batch {
    pub(super) ids: Tensor,
    pub(super) mask: Tensor,
    pub(super) types: Tensor,
    /// Each sequence's tokens without padding.
    pub(super) sequences: Vec<Vec<u32>>,
    tokenizer: Option<tokenizers::Tokenizer>,
}

/// The ids to run: `--input-ids` as one sequence, or each `--prompt` tokenized as the model's
/// `tokenizer.json` says (its own padding and truncation; batches of unequal length are
/// padded to the longest, on the left for decoders), with the tokenizer's attention mask.
fn input_batch(args: &Args, decoder: bool) -> anyhow::Result<Batch> {
    let device = Device::Cpu;
    if args.prompt.is_empty() {
        let ids = Tensor::new(args.input_ids.as_slice(), &device)?.unsqueeze(0)?;
        return Ok(Batch {
            mask: ids.ones_like()?,
            types: ids.zeros_like()?,
            ids,
            sequences: vec![args.input_ids.clone()],
            tokenizer: None,
        });
    }
    let tokenizer = tokenizer_of(&args.model, "--prompt", decoder, args.prompt.len() > 1)?;
    // A chat template writes the special tokens itself.
    let texts = if args.chat {
        let template = super::chat::ChatTemplate::from_folder(&args.model)?;
        args.prompt
            .iter()
            .map(|message| template.render(message))
            .collect::<anyhow::Result<Vec<_>>>()?
    } else {
        args.prompt.clone()
    };
    let mut batch = encode_texts(&tokenizer, &texts, !args.chat)?;
    batch.tokenizer = Some(tokenizer);
    Ok(batch)
}

/// The model's `tokenizer.json` (`flag` names what needed it in the error), padding a batch
/// of `many` texts to its longest where the tokenizer sets no padding of its own: on the
/// left for decoders, so each sequence ends where its next token comes.
pub(super) fn tokenizer_of(
    model: &Path,
    flag: &str,
    decoder: bool,
    many: bool,
) -> anyhow::Result<tokenizers::Tokenizer> {
    let path = model.join("tokenizer.json");
    let mut tokenizer = tokenizers::Tokenizer::from_file(&path).map_err(|e| {
        anyhow::anyhow!(
            "{flag} needs {}: {e} (pass --input-ids instead)",
            path.display()
        )
    })?;
    if tokenizer.get_padding().is_none() && many {
        // The mask hides padding, so any id in the vocabulary pads; 0 always is one.
        tokenizer.with_padding(Some(tokenizers::PaddingParams {
            direction: if decoder {
                tokenizers::PaddingDirection::Left
            } else {
                tokenizers::PaddingDirection::Right
            },
            pad_id: 0,
            ..Default::default()
        }));
    }
    Ok(tokenizer)
}

/// `texts` tokenized as one padded batch, with the tokenizer's attention mask and token
/// types (its own special tokens when `add_special_tokens`). An empty text is refused.
pub(super) fn encode_texts(
    tokenizer: &tokenizers::Tokenizer,
    texts: &[String],
    add_special_tokens: bool,
) -> anyhow::Result<Batch> {
    let encodings = tokenizer
        .encode_batch(texts.to_vec(), add_special_tokens)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    let rows = encodings.len();
    let len = encodings
        .iter()
        .map(|e| e.get_ids().len())
        .max()
        .unwrap_or(0);
    let (mut ids, mut mask, mut types, mut sequences) = (vec![], vec![], vec![], vec![]);
    for (text, encoding) in texts.iter().zip(&encodings) {
        if !encoding.get_attention_mask().contains(&1) {
            bail!("the text {text:?} tokenized to no tokens");
        }
        if encoding.get_ids().len() != len {
            bail!("the tokenizer gave texts of different lengths without padding them");
        }
        ids.extend_from_slice(encoding.get_ids());
        mask.extend_from_slice(encoding.get_attention_mask());
        types.extend_from_slice(encoding.get_type_ids());
        let real = encoding.get_ids().iter().zip(encoding.get_attention_mask());
        sequences.push(real.filter(|(_, &m)| m == 1).map(|(&id, _)| id).collect());
    }
    let device = Device::Cpu;
    Ok(Batch {
        ids: Tensor::from_vec(ids, (rows, len), &device)?,
        mask: Tensor::from_vec(mask, (rows, len), &device)?,
        types: Tensor::from_vec(types, (rows, len), &device)?,
        sequences,
        tokenizer: None,
    })
}

/// Whether any position of the batch is padding.
fn padded(batch: &Batch) -> anyhow::Result<bool> {
    Ok(batch.mask.flatten_all()?.min(0)?.to_scalar::<u32>()? == 0)
}

/// Runs a decoder: one forward pass over the batch, or greedy generation for each
/// sequence. Returns the final logits.
fn decoder(model: &mut StreamedModel, batch: &Batch, args: &Args) -> anyhow::Result<Tensor> {
    if args.max_new_tokens == 0 {
        let mut inputs = Inputs::new(&batch.ids);
        if padded(batch)? {
            inputs = inputs.attention_mask(&batch.mask);
        }
        let logits = track("forward", || model.run(inputs))?;
        let mask: Vec<Vec<u32>> = batch.mask.to_vec2()?;
        for (row, mask) in mask.iter().enumerate() {
            // The last real token's logits, wherever the padding is.
            let last = mask.iter().rposition(|&m| m == 1).unwrap_or(0);
            let next = logits.get(row)?.get(last)?.argmax(0)?.to_scalar::<u32>()?;
            println!("{}next token after the input: {next}", prefix(batch, row));
        }
        return Ok(logits);
    }
    let eos = model.eos_token_ids().to_vec();
    let mut options = GenerateOptions::greedy(args.max_new_tokens, &eos);
    // A negative temperature reaches the sampler, which refuses it by name.
    if args.temperature != 0.0 {
        let mut sampling = Sampling::new(args.temperature).seed(args.seed);
        sampling.top_k = args.top_k;
        sampling.top_p = args.top_p;
        options = options.sampling(sampling);
    }
    let mut last = Vec::new();
    for (row, prompt) in batch.sequences.iter().enumerate() {
        let prefix = prefix(batch, row);
        let mut text = StreamedText::new(batch.tokenizer.as_ref(), &prefix);
        let started = std::time::Instant::now();
        let generated = track("generate", || {
            model.generate_with(prompt, &options, &mut |token| text.push(token))
        })?;
        let seconds = started.elapsed().as_secs_f64();
        text.finish();
        let ids: Vec<String> = generated.tokens.iter().map(u32::to_string).collect();
        println!("{prefix}generated token ids: {}", ids.join(","));
        if let Some(end) = generated.tokens.last().filter(|t| eos.contains(t)) {
            println!("{prefix}stopped at the end-of-sequence token {end}");
        }
        println!(
            "{prefix}{} tokens in {seconds:.2} s ({:.1} tokens/s)",
            generated.tokens.len(),
            generated.tokens.len() as f64 / seconds.max(1e-9)
        );
        println!(
            "{prefix}KV cache: {:.1} KiB",
            generated.kv_cache_bytes as f64 / 1024.0
        );
        last.push(generated.last_logits.context("no token was generated")?);
    }
    Ok(Tensor::cat(&last, 0)?)
}

/// Prints generated text as it comes: each new token's text once its bytes decode.
struct StreamedText<'t> {
    tokenizer: Option<&'t tokenizers::Tokenizer>,
    tokens: Vec<u32>,
    printed: usize,
}

impl<'t> StreamedText<'t> {
    fn new(tokenizer: Option<&'t tokenizers::Tokenizer>, prefix: &str) -> Self {
        if tokenizer.is_some() {
            print!("{prefix}generated text: ");
        }
        Self {
            tokenizer,
            tokens: Vec::new(),
            printed: 0,
        }
    }

    fn push(&mut self, token: u32) {
        use std::io::Write as _;
        let Some(tokenizer) = self.tokenizer else {
            return;
        };
        self.tokens.push(token);
        // Decode everything so far and print what is new: a token's text can depend on
        // the ones before it (byte-level pieces, leading spaces).
        let Ok(text) = tokenizer.decode(&self.tokens, true) else {
            return;
        };
        if text.len() > self.printed && text.is_char_boundary(self.printed) {
            print!("{}", &text[self.printed..]);
            let _ = std::io::stdout().flush();
            self.printed = text.len();
        }
    }

    fn finish(self) {
        if self.tokenizer.is_some() {
            println!();
        }
    }
}

/// `[prompt N] ` before each line of a batch's output; nothing for a single sequence.
fn prefix(batch: &Batch, row: usize) -> String {
    if batch.sequences.len() > 1 {
        format!("[prompt {}] ", row + 1)
    } else {
        String::new()
    }
}

/// Runs an encoder and prints each sequence's embedding, pooled over its tokens as the
/// folder's sentence-transformers modules say (mean where it has none).
/// Returns the embeddings, `(batch, hidden)`.
fn encoder(model: &mut StreamedModel, batch: &Batch) -> anyhow::Result<Tensor> {
    let pooled = track("forward", || {
        model.embed(&batch.ids, &batch.types, &batch.mask)
    })?;
    let pooling = model.pooling();
    let modes: Vec<String> = pooling
        .modes
        .iter()
        .map(|m| format!("{m:?}").to_lowercase())
        .collect();
    let normalized = if pooling.normalize {
        ", normalized"
    } else {
        ""
    };
    println!("pooling: {}{normalized}", modes.join(" + "));
    for row in 0..batch.sequences.len() {
        let values: Vec<f32> = pooled.get(row)?.to_vec1()?;
        let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
        let first: Vec<String> = values.iter().take(8).map(|v| format!("{v:.5}")).collect();
        let prefix = prefix(batch, row);
        println!(
            "{prefix}embedding: {} values, L2 norm {norm:.5}",
            values.len()
        );
        println!("{prefix}first values: [{}]", first.join(", "));
    }
    Ok(pooled)
}

#[derive(Clone, Copy)]
enum OutputFormat {
    Json,
    Safetensors,
}

/// Saves the breakdown beside the report: `breakdown.txt` as printed, `breakdown.json`.
fn write_breakdown(dir: &Path, table: &str, breakdown: &Breakdown) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(breakdown)?;
    for (name, text) in [("breakdown.txt", table), ("breakdown.json", json.as_str())] {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Refuses an output whose name or folder cannot work, before the model runs.
pub(super) fn check_output(path: &Path) -> anyhow::Result<()> {
    output_format(path)?;
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        bail!(
            "--output {}: the folder {} does not exist",
            path.display(),
            folder.display()
        );
    }
    Ok(())
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
pub(super) fn write_tensor(path: &Path, tensor: &Tensor) -> anyhow::Result<()> {
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
