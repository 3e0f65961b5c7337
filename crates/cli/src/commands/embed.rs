//! `memwise embed MODEL [TEXT]... [--file FILE]`: sentence embeddings for many texts, in
//! batches, as sentence-transformers would return them.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context as _};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use memwise_model::ModelConverter;

use super::run::{check_output, encode_texts, tokenizer_of, write_tensor};

/// Options for `memwise embed`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A sentence-embedding model folder: a BERT-style encoder with its tokenizer.json
    /// (its modules.json, where present, decides pooling and normalization).
    model: PathBuf,
    /// Texts to embed; or use --file.
    texts: Vec<String>,
    /// A file with one text per line (blank lines skipped); `-` reads standard input.
    #[arg(long, value_name = "FILE")]
    file: Option<PathBuf>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32, value_name = "N")]
    batch_size: usize,
    /// Free the weights after every batch (stream each batch within the least memory)
    /// instead of keeping them once the first batch has read them.
    #[arg(long)]
    stream: bool,
    /// Write the embeddings here, one row per text: .json or .safetensors.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

/// Embeds every text, batch by batch, with a progress bar on a terminal.
pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(out) = &args.output {
        check_output(out)?;
    }
    if args.batch_size == 0 {
        bail!("--batch-size 0 embeds nothing; use 1 or more");
    }
    let texts = texts(&args)?;
    if texts.is_empty() {
        bail!("no text to embed: give texts after the model or --file");
    }
    memwise::init_config().context("reading the memwise configuration")?;
    let mut model = ModelConverter::new(&args.model)
        .device(Device::Cpu)
        .load_model_with_hooks(args.stream)
        .with_context(|| format!("loading {}", args.model.display()))?;
    if model.is_decoder() {
        bail!(
            "{} is a decoder; memwise embed needs a BERT-style encoder (use memwise run)",
            args.model.display()
        );
    }
    let mut tokenizer = tokenizer_of(&args.model, "memwise embed", false, true)?;
    // Pad each batch only to its longest text, as sentence-transformers does, even where
    // tokenizer.json pads to a fixed length (all-MiniLM's pads to 128): padding is masked
    // out of every embedding, so only the time spent on it changes.
    if let Some(padding) = tokenizer.get_padding_mut() {
        padding.strategy = tokenizers::PaddingStrategy::BatchLongest;
    }
    let bar = ProgressBar::new(texts.len() as u64).with_style(ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} texts ({per_sec})",
    )?);
    let started = Instant::now();
    let mut rows: Vec<Tensor> = Vec::with_capacity(texts.len().div_ceil(args.batch_size));
    for chunk in texts.chunks(args.batch_size) {
        let batch = encode_texts(&tokenizer, chunk, true)?;
        rows.push(model.embed(&batch.ids, &batch.types, &batch.mask)?);
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let embeddings = Tensor::cat(&rows, 0)?;
    let pooling = model.pooling();
    println!(
        "embedded {} texts in {seconds:.2} s ({:.1} texts/s, batches of {}): {} values each, {}{}",
        texts.len(),
        texts.len() as f64 / seconds.max(1e-9),
        args.batch_size,
        embeddings.dim(1)?,
        pooling
            .modes
            .iter()
            .map(|m| format!("{m:?}").to_lowercase())
            .collect::<Vec<_>>()
            .join(" + "),
        if pooling.normalize {
            ", normalized"
        } else {
            ""
        }
    );
    match &args.output {
        Some(out) => {
            write_tensor(out, &embeddings)?;
            println!("wrote {}", out.display());
        }
        None => {
            for (text, row) in texts.iter().zip(embeddings.to_vec2::<f32>()?) {
                let first: Vec<String> = row.iter().take(4).map(|v| format!("{v:.4}")).collect();
                println!("{text:?}: [{}, ...]", first.join(", "));
            }
        }
    }
    Ok(())
}

/// The texts of the arguments, then of `--file`, one per line.
fn texts(args: &Args) -> anyhow::Result<Vec<String>> {
    let mut texts = args.texts.clone();
    if let Some(file) = &args.file {
        let reader: Box<dyn std::io::BufRead> = if file.as_os_str() == "-" {
            Box::new(std::io::stdin().lock())
        } else {
            let opened =
                std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
            Box::new(std::io::BufReader::new(opened))
        };
        for line in reader.lines() {
            let line = line.with_context(|| format!("reading {}", file.display()))?;
            if !line.trim().is_empty() {
                texts.push(line);
            }
        }
    }
    Ok(texts)
}
