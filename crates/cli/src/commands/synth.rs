//! `memwise synth`: write a seeded random-weight model in the Hugging Face layout.

use std::path::PathBuf;

use anyhow::Context as _;
use memwise_model::{write_synthetic_checkpoint, Architecture, SynthSpec};

/// Options for `memwise synth`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The architecture: its config keys and tensor names.
    #[arg(long, value_enum, default_value_t = Arch::Llama)]
    arch: Arch,
    /// Width of the residual stream.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Width of the MLP's inner layer.
    #[arg(long, default_value_t = 128)]
    intermediate: usize,
    /// Layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    heads: usize,
    /// Key/value heads (decoders; defaults to --heads).
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Tokens in the vocabulary.
    #[arg(long, default_value_t = 128)]
    vocab: usize,
    /// Positions the model handles (BERT's position table has this many rows).
    #[arg(long, default_value_t = 512)]
    max_positions: usize,
    /// Decoders: lm_head reuses the input embeddings.
    #[arg(long)]
    tie_word_embeddings: bool,
    /// Seed of the weights: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Largest shard, e.g. 500MB, 2GiB or a byte count.
    #[arg(long, default_value = "500MB", value_parser = parse_size)]
    shard_size: u64,
    /// The weights' dtype.
    #[arg(long, value_enum, default_value_t = Dtype::F32)]
    dtype: Dtype,
    /// The model folder to create (must be absent or empty).
    out: PathBuf,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Arch {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Phi3,
    Gemma3,
    Bert,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

/// Writes the model and says what it wrote.
pub fn run(args: Args) -> anyhow::Result<()> {
    let spec = SynthSpec {
        arch: match args.arch {
            Arch::Llama => Architecture::Llama,
            Arch::Mistral => Architecture::Mistral,
            Arch::Qwen2 => Architecture::Qwen2,
            Arch::Qwen3 => Architecture::Qwen3,
            Arch::Phi3 => Architecture::Phi3,
            Arch::Gemma3 => Architecture::Gemma3Text,
            Arch::Bert => Architecture::Bert,
        },
        hidden_size: args.hidden,
        intermediate_size: args.intermediate,
        num_layers: args.layers,
        num_heads: args.heads,
        num_kv_heads: args.kv_heads.unwrap_or(args.heads),
        vocab_size: args.vocab,
        max_position_embeddings: args.max_positions,
        tie_word_embeddings: args.tie_word_embeddings,
        seed: args.seed,
        shard_bytes: args.shard_size,
        dtype: match args.dtype {
            Dtype::F32 => candle_core::DType::F32,
            Dtype::F16 => candle_core::DType::F16,
            Dtype::Bf16 => candle_core::DType::BF16,
        },
    };
    let report = write_synthetic_checkpoint(&spec, &args.out)
        .with_context(|| format!("writing a synthetic model to {}", args.out.display()))?;
    println!(
        "wrote {}: {} tensors, {:.1} MiB in {} shard(s)",
        report.folder.display(),
        report.tensor_count,
        report.total_size as f64 / 1048576.0,
        report.shards.len()
    );
    Ok(())
}

/// `500MB`, `2GiB`, `64k` or a plain byte count. Decimal units are powers of 1000, binary
/// ones (`KiB`, `MiB`, `GiB`) of 1024, as the Hugging Face `max_shard_size` reads them.
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size like 500MB"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}` (B, KB, MB, GB, KiB, MiB, GiB)"
            ))
        }
    };
    let bytes = (number * scale as f64).round();
    if bytes < 1.0 {
        return Err(format!("`{text}` is not a positive size"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_read_like_hugging_face_shard_sizes() {
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5kb"), Ok(1500));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("12 parsecs").is_err());
    }
}
