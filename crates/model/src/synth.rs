//! Seeded random-weight checkpoints in the Hugging Face layout, so tests, benchmarks and
//! demos never download a model.
//!
//! The tensors written are exactly those the blocks read ([`crate::models::Stage::tensors`]), in
//! stage order, so each layer lands in one shard (or two at a boundary) as in real
//! checkpoints. Each tensor's values depend only on the seed and its name, so the shard
//! size changes the files, never the weights.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::Serialize;

use crate::models::{
    Activation, Architecture, BertConfig, DecoderModel, EncoderModel, Family, LlamaConfig,
    ModelError, TensorSpec, TokenIds,
};

/// What model [`write_synthetic_checkpoint`] writes.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthSpec {
    /// The architecture, which decides the config keys and tensor names.
    pub arch: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Layers.
    pub num_layers: usize,
    /// Attention (query) heads.
    pub num_heads: usize,
    /// Key/value heads of a decoder; ignored for BERT.
    pub num_kv_heads: usize,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Positions the model claims to handle (BERT's position embeddings have this many rows).
    pub max_position_embeddings: usize,
    /// Whether a decoder's `lm_head` reuses the input embeddings; ignored for BERT.
    pub tie_word_embeddings: bool,
    /// Seed of every tensor's values.
    pub seed: u64,
    /// Largest shard in bytes; a tensor larger than this gets a shard of its own.
    pub shard_bytes: u64,
    /// `F32`, `F16` or `BF16`.
    pub dtype: DType,
}

impl SynthSpec {
    /// A model of a few hundred KB: 2 layers, width 64, 4 heads (2 key/value heads).
    pub fn tiny(arch: Architecture) -> Self {
        Self {
            arch,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            vocab_size: 128,
            max_position_embeddings: 128,
            tie_word_embeddings: false,
            seed: 0,
            shard_bytes: 500_000_000,
            dtype: DType::F32,
        }
    }

    /// The `config.json` this spec describes, as JSON text.
    pub fn config_json(&self) -> Result<String, SynthError> {
        let json = match self.arch {
            Architecture::Bert => serde_json::to_string_pretty(&self.bert_config()?),
            _ => serde_json::to_string_pretty(&self.decoder_config()?),
        };
        Ok(json.expect("configs are plain data that always serialize"))
    }

    fn torch_dtype(&self) -> Result<&'static str, SynthError> {
        match self.dtype {
            DType::F32 => Ok("float32"),
            DType::F16 => Ok("float16"),
            DType::BF16 => Ok("bfloat16"),
            other => Err(SynthError::Spec(format!(
                "dtype {other:?} is not written (f32, f16, bf16)"
            ))),
        }
    }

    fn decoder_config(&self) -> Result<LlamaConfig, SynthError> {
        let qwen2 = self.arch == Architecture::Qwen2;
        Ok(LlamaConfig {
            model_type: self.arch.model_type().into(),
            architectures: Some(vec![self.arch.hf_class().into()]),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_layers,
            num_attention_heads: self.num_heads,
            num_key_value_heads: Some(self.num_kv_heads),
            head_dim: None,
            hidden_act: Activation::Silu,
            rms_norm_eps: 1e-6,
            rope_theta: Some(10_000.0),
            rope_scaling: None,
            rope_parameters: None,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            // Qwen2's biases follow from its model_type; its config has no such key.
            attention_bias: (!qwen2).then_some(false),
            mlp_bias: false,
            sliding_window: None,
            use_sliding_window: qwen2.then_some(false),
            max_window_layers: None,
            layer_types: None,
            bos_token_id: Some(1),
            eos_token_id: Some(TokenIds(vec![2])),
            torch_dtype: Some(self.torch_dtype()?.into()),
            extras: Default::default(),
        })
    }

    fn bert_config(&self) -> Result<BertConfig, SynthError> {
        Ok(BertConfig {
            model_type: "bert".into(),
            architectures: Some(vec![self.arch.hf_class().into()]),
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_hidden_layers: self.num_layers,
            num_attention_heads: self.num_heads,
            intermediate_size: self.intermediate_size,
            hidden_act: Activation::Gelu,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: "absolute".into(),
            torch_dtype: Some(self.torch_dtype()?.into()),
        })
    }

    /// Every tensor the checkpoint holds, once each, in stage order: those the blocks read,
    /// and for BERT the pooler.
    pub fn tensors(&self) -> Result<Vec<TensorSpec>, SynthError> {
        let dtype = self.dtype;
        let stages = match self.arch {
            Architecture::Bert => EncoderModel::new(&self.bert_config()?, dtype, &Device::Cpu)?
                .stages()
                .to_vec(),
            _ => DecoderModel::new(&self.decoder_config()?, dtype, &Device::Cpu)?
                .stages()
                .to_vec(),
        };
        let mut tensors: Vec<TensorSpec> = Vec::new();
        for tensor in stages.iter().flat_map(|stage| stage.tensors()) {
            // Tied embeddings are read by two stages and stored once.
            if !tensors.iter().any(|t| t.name == tensor.name) {
                tensors.push(tensor.clone());
            }
        }
        if self.arch == Architecture::Bert {
            // The blocks pool by mean and never read the pooler, but transformers'
            // `BertModel` expects one, as real checkpoints have it.
            let hidden = self.hidden_size;
            tensors.extend([
                TensorSpec {
                    name: "pooler.dense.weight".into(),
                    shape: vec![hidden, hidden],
                },
                TensorSpec {
                    name: "pooler.dense.bias".into(),
                    shape: vec![hidden],
                },
            ]);
        }
        Ok(tensors)
    }
}

/// Why a synthetic checkpoint could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SynthError {
    /// The spec cannot describe a model.
    #[error("invalid synthetic model: {0}")]
    Spec(String),
    /// The spec's config is rejected by the blocks.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The output folder already holds files.
    #[error("{0} exists and is not empty; remove it or choose another folder")]
    OutputExists(PathBuf),
    /// Writing a file failed.
    #[error("cannot write {path}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
}

/// What [`write_synthetic_checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthReport {
    /// The model folder.
    pub folder: PathBuf,
    /// The shard file names, in order.
    pub shards: Vec<String>,
    /// Tensors written.
    pub tensor_count: usize,
    /// Bytes of tensor data (the index's `metadata.total_size`).
    pub total_size: u64,
}

/// Writes the model `spec` describes into the folder `out`: `config.json`,
/// `model-0000i-of-0000N.safetensors` shards and `model.safetensors.index.json`.
///
/// Everything is written into a temporary folder beside `out` that is renamed to `out` at
/// the end, so `out` is either complete or absent. Tensors are generated and written in
/// small chunks: memory use does not grow with the model.
///
/// ```
/// use memwise_model::{write_synthetic_checkpoint, Architecture, SynthSpec};
/// use memwise_model::models::ArchitectureConfig;
///
/// let dir = tempfile::tempdir()?;
/// let spec = SynthSpec { seed: 7, ..SynthSpec::tiny(Architecture::Llama) };
/// let report = write_synthetic_checkpoint(&spec, &dir.path().join("tiny-llama"))?;
/// assert_eq!(report.shards, ["model-00001-of-00001.safetensors"]);
/// assert!(matches!(ArchitectureConfig::from_file(&report.folder)?, ArchitectureConfig::Decoder(_)));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_synthetic_checkpoint(spec: &SynthSpec, out: &Path) -> Result<SynthReport, SynthError> {
    if spec.shard_bytes == 0 {
        return Err(SynthError::Spec("shard size must be above 0".into()));
    }
    let config = spec.config_json()?;
    let tensors = spec.tensors()?;
    let element_bytes = spec.dtype.size_in_bytes() as u64;
    let shards = plan_shards(&tensors, element_bytes, spec.shard_bytes);

    if fs::read_dir(out).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(SynthError::OutputExists(out.to_path_buf()));
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    let file_name = out
        .file_name()
        .ok_or_else(|| SynthError::Spec(format!("{} has no folder name", out.display())))?;
    let staging = out.with_file_name(format!(
        ".{}.partial-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io(&staging))?;
    }
    fs::create_dir_all(&staging).map_err(io(&staging))?;

    let written = (|| {
        let shard_count = shards.len();
        let mut names = Vec::with_capacity(shard_count);
        let mut weight_map = serde_json::Map::new();
        for (number, shard) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{shard_count:05}.safetensors", number + 1);
            let path = staging.join(&name);
            write_shard(&path, shard, spec).map_err(io(&path))?;
            for tensor in shard {
                weight_map.insert(tensor.name.clone(), name.clone().into());
            }
            names.push(name);
        }
        let total_size = tensors
            .iter()
            .map(|t| t.element_count() as u64 * element_bytes)
            .sum::<u64>();
        let index = serde_json::json!({
            "metadata": { "total_size": total_size },
            "weight_map": weight_map,
        });
        let index_path = staging.join("model.safetensors.index.json");
        write_file(
            &index_path,
            serde_json::to_string_pretty(&index)
                .expect("plain JSON")
                .as_bytes(),
        )
        .map_err(io(&index_path))?;
        let config_path = staging.join("config.json");
        write_file(&config_path, config.as_bytes()).map_err(io(&config_path))?;
        Ok((names, total_size))
    })();
    let (shard_names, total_size) = match written {
        Ok(done) => done,
        Err(err) => {
            // Best effort: the error that matters is the one that stopped the write.
            let _ = fs::remove_dir_all(&staging);
            return Err(err);
        }
    };
    if out.exists() {
        // An empty folder the caller made: rename cannot replace it on every platform.
        fs::remove_dir(out).map_err(io(out))?;
    }
    fs::rename(&staging, out).map_err(io(out))?;
    Ok(SynthReport {
        folder: out.to_path_buf(),
        shards: shard_names,
        tensor_count: tensors.len(),
        total_size,
    })
}

/// Packs tensors in order into shards of at most `shard_bytes` (a larger tensor alone).
fn plan_shards(
    tensors: &[TensorSpec],
    element_bytes: u64,
    shard_bytes: u64,
) -> Vec<Vec<TensorSpec>> {
    let mut shards: Vec<Vec<TensorSpec>> = Vec::new();
    let mut current_bytes = 0;
    for tensor in tensors {
        let bytes = tensor.element_count() as u64 * element_bytes;
        match shards.last_mut() {
            Some(shard) if current_bytes + bytes <= shard_bytes => {
                shard.push(tensor.clone());
                current_bytes += bytes;
            }
            _ => {
                shards.push(vec![tensor.clone()]);
                current_bytes = bytes;
            }
        }
    }
    shards
}

fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// The safetensors header of `tensors` laid out back to back in order.
#[derive(Serialize)]
struct HeaderEntry {
    dtype: &'static str,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

fn write_shard(path: &Path, tensors: &[TensorSpec], spec: &SynthSpec) -> std::io::Result<()> {
    let dtype_name = match spec.dtype {
        DType::F16 => "F16",
        DType::BF16 => "BF16",
        _ => "F32",
    };
    let element_bytes = spec.dtype.size_in_bytes() as u64;
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0;
    for tensor in tensors {
        let end = offset + tensor.element_count() as u64 * element_bytes;
        let entry = HeaderEntry {
            dtype: dtype_name,
            shape: tensor.shape.clone(),
            data_offsets: [offset, end],
        };
        header.insert(
            tensor.name.clone(),
            serde_json::to_value(entry).expect("plain data"),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&header).expect("plain JSON");
    // safetensors aligns the data to 8 bytes by padding the header with spaces.
    header.resize(header.len().next_multiple_of(8), b' ');

    let mut file = BufWriter::with_capacity(1 << 20, File::create(path)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(&header)?;
    let mut chunk = Vec::with_capacity(CHUNK_ELEMENTS * element_bytes as usize);
    for tensor in tensors {
        let mut values = TensorValues::new(spec.seed, tensor);
        let mut left = tensor.element_count();
        while left > 0 {
            let count = left.min(CHUNK_ELEMENTS);
            chunk.clear();
            for value in values.by_ref().take(count) {
                match spec.dtype {
                    DType::F16 => chunk.extend(half::f16::from_f32(value).to_le_bytes()),
                    DType::BF16 => chunk.extend(half::bf16::from_f32(value).to_le_bytes()),
                    _ => chunk.extend(value.to_le_bytes()),
                }
            }
            file.write_all(&chunk)?;
            left -= count;
        }
    }
    file.into_inner().map_err(|e| e.into_error())?.sync_all()
}

/// Elements generated and written at a time.
const CHUNK_ELEMENTS: usize = 1 << 16;

/// The values of one tensor: what kind of parameter it is decides the distribution.
///
/// Matrices get a standard deviation of `1/sqrt(fan_in)` so activations stay of order 1 at
/// any width (the forward stays finite and the logits are not all equal); norm gains are 1
/// and biases 0, as freshly initialized models have them; embeddings are standard normal,
/// since a norm follows them.
struct TensorValues {
    rng: SplitMix64,
    kind: ValueKind,
}

enum ValueKind {
    Constant(f32),
    Normal { std: f32 },
}

impl TensorValues {
    fn new(seed: u64, tensor: &TensorSpec) -> Self {
        let name = tensor.name.as_str();
        let kind = if name.ends_with(".bias") {
            ValueKind::Constant(0.0)
        } else if tensor.shape.len() == 1 {
            ValueKind::Constant(1.0)
        } else if name.contains("embed") {
            ValueKind::Normal { std: 1.0 }
        } else {
            let fan_in = tensor.shape.last().copied().unwrap_or(1).max(1);
            ValueKind::Normal {
                std: 1.0 / (fan_in as f32).sqrt(),
            }
        };
        // Seeded by name, so a tensor's values do not depend on the tensors before it.
        Self {
            rng: SplitMix64(seed ^ fnv1a(name.as_bytes())),
            kind,
        }
    }
}

impl Iterator for TensorValues {
    type Item = f32;

    fn next(&mut self) -> Option<f32> {
        Some(match self.kind {
            ValueKind::Constant(value) => value,
            ValueKind::Normal { std } => self.rng.next_normalish() * std,
        })
    }
}

/// splitmix64: tiny, fast, and statistically good enough for weights.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 24 random bits, exact in f32.
    fn next_unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Mean 0, variance 1: the sum of four uniforms (Irwin-Hall), recentred and scaled.
    /// Only additions and a multiplication, so the bytes are the same on every platform,
    /// unlike Box-Muller's `ln` and `cos`.
    fn next_normalish(&mut self) -> f32 {
        let sum: f32 = (0..4).map(|_| self.next_unit()).sum();
        (sum - 2.0) * 3.0f32.sqrt()
    }
}

/// FNV-1a: a stable hash of a tensor's name (std's hasher may change between releases).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalish_values_have_unit_variance() {
        let mut rng = SplitMix64(42);
        let samples: Vec<f32> = (0..100_000).map(|_| rng.next_normalish()).collect();
        let mean = samples.iter().sum::<f32>() / samples.len() as f32;
        let variance =
            samples.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / samples.len() as f32;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((variance - 1.0).abs() < 0.02, "variance {variance}");
    }

    #[test]
    fn shards_respect_the_size_and_keep_order() {
        let tensor = |name: &str, n| TensorSpec {
            name: name.into(),
            shape: vec![n],
        };
        let tensors = [
            tensor("a", 10),
            tensor("b", 10),
            tensor("c", 30),
            tensor("d", 5),
        ];
        let shards = plan_shards(&tensors, 4, 80);
        let names: Vec<Vec<&str>> = shards
            .iter()
            .map(|s| s.iter().map(|t| t.name.as_str()).collect())
            .collect();
        // c (120 bytes) exceeds the shard size and gets a shard of its own.
        assert_eq!(names, [vec!["a", "b"], vec!["c"], vec!["d"]]);
    }
}
