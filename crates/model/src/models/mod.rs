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

mod bert;
mod config;
mod error;
mod family;
mod generate;
mod llama;
mod pooling;
mod stage;
mod weights;

pub use bert::{mean_pool, BertConfig, EncoderBlock, EncoderModel, EncoderState};
pub use config::{Activation, ArchitectureConfig, RopeType, TokenIds};
pub use error::ModelError;
pub use family::{Family, Inputs, Loaded, Pass};
pub(crate) use generate::generate;
pub use generate::{GenerateOptions, Generation, Sampling};
pub use llama::{
    DecoderBlock, DecoderExtras, DecoderModel, DecoderState, KvCache, LlamaConfig, RopeScaling,
};
pub use pooling::{PoolingMode, SentencePooling};
pub use stage::{Stage, TensorSpec};
pub(crate) use weights::rows_per_chunk;
pub use weights::{Embedding, Linear, Matrix, Weights};

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
    /// `qwen3`: a Llama decoder with an RMSNorm on each query and key head before RoPE.
    Qwen3,
    /// `phi3`: a Llama decoder whose q/k/v and gate/up projections are stored fused.
    Phi3,
    /// `gemma3_text`: Gemma 3's text decoder (sliding and global layers, (1 + weight)
    /// norms around attention and MLP, q/k norms, scaled embeddings).
    Gemma3Text,
    /// `bert`: a BERT-style encoder (MiniLM and other sentence-embedding models).
    Bert,
}

impl Architecture {
    /// Every architecture, in the order the CLI lists them.
    pub const ALL: [Architecture; 7] = [
        Self::Llama,
        Self::Mistral,
        Self::Qwen2,
        Self::Qwen3,
        Self::Phi3,
        Self::Gemma3Text,
        Self::Bert,
    ];

    /// The `model_type` value of `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Phi3 => "phi3",
            Self::Gemma3Text => "gemma3_text",
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
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Phi3 => "Phi3ForCausalLM",
            Self::Gemma3Text => "Gemma3ForCausalLM",
            Self::Bert => "BertModel",
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

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

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
            "model config key `model_type`: `gpt2` is not implemented; supported: llama, mistral, qwen2, qwen3, phi3, gemma3_text, bert"
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
