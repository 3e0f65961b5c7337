//! Model blocks of our own on candle-nn, one file per architecture.
//!
//! candle-transformers keeps its blocks private, and a streaming runner needs to build one
//! block at a time from only that block's tensors. So each architecture here is split into
//! [`Stage`]s that run one after another (embeddings, each layer, the head), and each stage
//! is built by `load(vb, cfg)` from a [`candle_nn::VarBuilder`] that may hold just its own
//! tensors, named exactly as Hugging Face names them.
//!
//! The tensors a stage reads are not written down twice: [`Stage::tensors`] is found by
//! running the stage's own `load` against a recording backend, so the list a runner streams
//! and the names the block reads cannot drift apart.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use serde::Deserialize;

mod bert;
mod error;
mod llama;

pub use bert::{mean_pool, BertConfig, EncoderBlock, EncoderModel, EncoderPass, LoadedEncoder};
pub use error::ModelError;
pub use llama::{
    DecoderBlock, DecoderModel, DecoderPass, Generation, KvCache, LlamaConfig, LoadedDecoder,
    RopeScaling,
};

/// One step of a model's forward pass, and the tensors it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    name: String,
    tensors: Vec<TensorSpec>,
}

impl Stage {
    /// The stage's name, e.g. `model.layers.3`: the Hugging Face prefix of its tensors, but
    /// for a tied `lm_head`, which reads `model.embed_tokens.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensors this stage reads, in the order its `load` asks for them, with the shapes
    /// it expects. A stage may read a tensor another stage reads too (tied embeddings).
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The Hugging Face names of [`Stage::tensors`].
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// Bytes this stage's weights take in `dtype`.
    pub fn weight_bytes(&self, dtype: DType) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.element_count() as u64 * dtype.size_in_bytes() as u64)
            .sum()
    }

    /// Traces `load` against a backend that records every tensor it asks for.
    fn trace<T>(
        name: String,
        dtype: DType,
        load: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
    ) -> Result<Self, ModelError> {
        let recorder = TensorRecorder::default();
        let seen = Arc::clone(&recorder.seen);
        let vb = VarBuilder::from_backend(Box::new(recorder), dtype, Device::Cpu);
        load(vb).map_err(ModelError::stage(&name))?;
        let tensors = std::mem::take(&mut *seen.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(Self { name, tensors })
    }
}

/// A tensor's Hugging Face name and the shape the blocks expect it to have.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    /// The full name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// How many elements the tensor has.
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A candle backend that hands out weightless tensors and notes what was asked for.
///
/// The tensors it returns are one zero broadcast to the requested shape, so tracing a
/// 2 GB layer allocates nothing; `load` functions only store tensors, never compute.
#[derive(Default)]
struct TensorRecorder {
    seen: Arc<Mutex<Vec<TensorSpec>>>,
}

impl SimpleBackend for TensorRecorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(TensorSpec {
                name: name.to_owned(),
                shape: shape.dims().to_vec(),
            });
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tensor {name} was requested without a shape, so it cannot be traced")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The architectures these blocks implement, as `config.json`'s `model_type` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Architecture {
    /// `llama`: Llama 2 and 3 style decoders.
    Llama,
    /// `mistral`: a Llama decoder whose attention may use a sliding window.
    Mistral,
    /// `qwen2`: a Llama decoder with q/k/v biases.
    Qwen2,
    /// `bert`: a BERT-style encoder (MiniLM and other sentence-embedding models).
    Bert,
}

impl Architecture {
    /// Every architecture, in the order the CLI lists them.
    pub const ALL: [Architecture; 4] = [Self::Llama, Self::Mistral, Self::Qwen2, Self::Bert];

    /// The `model_type` value of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Bert => "bert",
        }
    }

    /// The architecture a `model_type` names, if these blocks implement it.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|arch| arch.model_type() == model_type)
    }

    /// The class name `config.json` lists under `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Bert => "BertModel",
        }
    }
}

/// A `config.json` parsed for the architecture its `model_type` names, with every key the
/// blocks need typed (the checkpoint reader's `ModelConfig` keeps only a summary).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ArchitectureConfig {
    /// A Llama-family decoder (Llama, Mistral, Qwen2).
    Decoder(Box<LlamaConfig>),
    /// A BERT-style encoder.
    Encoder(BertConfig),
}

impl ArchitectureConfig {
    /// Reads and parses a model folder's `config.json` (or the file itself).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ModelError> {
        let path = path.as_ref();
        let path = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ModelError::ConfigRead {
            path: path.clone(),
            source,
        })?;
        Self::from_json_named(&text, &path.display().to_string())
    }

    /// Parses the text of a `config.json`, choosing the architecture by its `model_type`.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        Self::from_json_named(text, "<json>")
    }

    fn from_json_named(text: &str, origin: &str) -> Result<Self, ModelError> {
        #[derive(Deserialize)]
        struct ModelType {
            model_type: Option<String>,
        }
        let parse_error = |source| ModelError::ConfigParse {
            origin: origin.to_owned(),
            source,
        };
        let model_type = serde_json::from_str::<ModelType>(text)
            .map_err(parse_error)?
            .model_type
            .ok_or_else(|| ModelError::unsupported("model_type", "missing"))?;
        match Architecture::from_model_type(&model_type) {
            Some(Architecture::Bert) => Ok(Self::Encoder(
                serde_json::from_str(text).map_err(parse_error)?,
            )),
            Some(_) => Ok(Self::Decoder(Box::new(
                serde_json::from_str(text).map_err(parse_error)?,
            ))),
            None => Err(ModelError::unsupported(
                "model_type",
                format!(
                    "`{model_type}` is not implemented; supported: {}",
                    Architecture::ALL.map(Architecture::model_type).join(", ")
                ),
            )),
        }
    }

    /// The architecture this config describes.
    pub fn architecture(&self) -> Result<Architecture, ModelError> {
        match self {
            Self::Decoder(config) => config.architecture(),
            Self::Encoder(_) => Ok(Architecture::Bert),
        }
    }
}

/// Checks that `heads` divide `size`, naming the keys when they do not.
fn head_dim(
    size: usize,
    size_key: &str,
    heads: usize,
    heads_key: &str,
) -> Result<usize, ModelError> {
    if heads == 0 || size % heads != 0 {
        return Err(ModelError::unsupported(
            heads_key,
            format!("{heads} heads do not divide {size_key} = {size}"),
        ));
    }
    Ok(size / heads)
}

/// Where a forward pass stands: the stage due next and the activations it hands on.
///
/// Both architectures' passes keep one, so the order rules (each stage once, in order,
/// output only after the last) are written once.
struct StageCursor {
    next: usize,
    stage_count: usize,
    hidden: Option<Tensor>,
}

impl StageCursor {
    fn new(stage_count: usize) -> Self {
        Self {
            next: 0,
            stage_count,
            hidden: None,
        }
    }

    /// Refuses any stage but the one due.
    fn check(&self, index: usize) -> Result<(), ModelError> {
        if index != self.next {
            return Err(ModelError::StageOrder {
                expected: self.next,
                got: index,
                stage_count: self.stage_count,
            });
        }
        Ok(())
    }

    /// The previous stage's output.
    fn hidden(&self) -> candle_core::Result<&Tensor> {
        self.hidden
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg("no hidden states yet".into()))
    }

    /// Records stage `next`'s output; true when it was the last stage.
    fn advance(&mut self, hidden: Tensor) -> bool {
        self.hidden = Some(hidden);
        self.next += 1;
        self.next == self.stage_count
    }

    /// The last stage's output, or an error naming the stage still due.
    fn finish(self) -> Result<Tensor, ModelError> {
        match self.hidden {
            Some(hidden) if self.next == self.stage_count => Ok(hidden),
            _ => Err(ModelError::StageOrder {
                expected: self.next,
                got: self.stage_count,
                stage_count: self.stage_count,
            }),
        }
    }
}

/// The stage at `index` of a model computing in `dtype`, once `weights` is known to yield
/// that dtype: candle would otherwise fail deep inside the stage on mixed dtypes.
fn stage_for<'s>(
    stages: &'s [Stage],
    index: usize,
    weights: &VarBuilder,
    dtype: DType,
) -> Result<&'s Stage, ModelError> {
    let stage = stage_at(stages, index)?;
    if weights.dtype() != dtype {
        return Err(ModelError::Input(format!(
            "stage `{}`: the weights builder yields {:?} but the model computes in {dtype:?}",
            stage.name(),
            weights.dtype()
        )));
    }
    Ok(stage)
}

/// The stage at `index`, or an error saying how many there are.
fn stage_at(stages: &[Stage], index: usize) -> Result<&Stage, ModelError> {
    stages.get(index).ok_or(ModelError::NoSuchStage {
        index,
        stage_count: stages.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_choose_their_architecture_by_model_type() {
        let decoder = r#"{"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}"#;
        let config = ArchitectureConfig::from_json(decoder).unwrap();
        assert_eq!(config.architecture().unwrap(), Architecture::Qwen2);

        let err = ArchitectureConfig::from_json(r#"{"model_type": "gpt2"}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model config key `model_type`: `gpt2` is not implemented; supported: llama, mistral, qwen2, bert"
        );
        let err = ArchitectureConfig::from_json(r#"{"model_type": "llama", "vocab_size": 8}"#)
            .unwrap_err();
        let source = std::error::Error::source(&err).unwrap().to_string();
        assert!(source.contains("hidden_size"), "{source}");
    }

    #[test]
    fn heads_that_do_not_divide_the_width_name_their_key() {
        let config: LlamaConfig = serde_json::from_str(
            r#"{"model_type": "llama", "vocab_size": 8, "hidden_size": 10,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 3}"#,
        )
        .unwrap();
        let err = DecoderModel::new(&config, DType::F32, &Device::Cpu).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model config key `num_attention_heads`: 3 heads do not divide hidden_size = 10"
        );
        let config = LlamaConfig {
            hidden_size: 12,
            num_key_value_heads: Some(2),
            ..config
        };
        let err = DecoderModel::new(&config, DType::F32, &Device::Cpu).unwrap_err();
        assert!(err.to_string().contains("`num_key_value_heads`"), "{err}");
    }

    #[test]
    fn a_stage_lists_its_weight_bytes() {
        let config: LlamaConfig = serde_json::from_str(
            r#"{"model_type": "llama", "vocab_size": 10, "hidden_size": 4,
            "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2}"#,
        )
        .unwrap();
        let model = DecoderModel::new(&config, DType::F32, &Device::Cpu).unwrap();
        // q, k, v, o: 4x4 each; gate, up, down: 4x8 each; two norms of 4.
        assert_eq!(
            model.stages()[1].weight_bytes(DType::F32),
            (4 * 16 + 3 * 32 + 2 * 4) * 4
        );
        assert_eq!(model.stages()[0].weight_bytes(DType::BF16), 10 * 4 * 2);
    }
}
