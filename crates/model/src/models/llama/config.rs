//! `config.json` of the Llama family, and what the blocks need resolved from it.

use serde::{Deserialize, Serialize};

use crate::models::{head_dim, Activation, Architecture, ModelError, RopeType, TokenIds};

/// `config.json` of a Llama, Mistral, Qwen2, Qwen3 or Phi-3 model, with Hugging Face's keys and defaults.
///
/// Both the classic keys (`rope_theta`, `rope_scaling`) and the `rope_parameters` object of
/// newer transformers releases are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2`, `qwen3` or `phi3`.
    pub model_type: String,
    /// The Hugging Face classes this checkpoint was saved from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); the query heads' count when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Width of one head; `hidden_size / num_attention_heads` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// The MLP's activation; only `silu` is implemented.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: Activation,
    /// RMSNorm's epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE scaling, the classic key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// RoPE base and scaling, the key of newer transformers releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeScaling>,
    /// Longest sequence the model was trained for.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Whether `lm_head` reuses `model.embed_tokens.weight`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama, Qwen3: biases on q/k/v/o. Qwen2 always has q/k/v biases and never an o bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Llama: biases on the MLP's projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Tokens a sliding-window layer attends to (itself included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2, Qwen3: whether any layer uses the sliding window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2, Qwen3: layers below this index attend to everything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Newer releases: `full_attention` or `sliding_attention` for each layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// Token that starts a sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// Token(s) that end generation: one id or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// The dtype the weights were saved in (older releases' key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// Keys only some of the family's architectures read.
    #[serde(flatten)]
    pub extras: DecoderExtras,
}

/// Keys of `config.json` that only some Llama-family architectures read, all optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DecoderExtras {
    /// Phi-3: the share of each head's width that RoPE rotates (older releases' place for
    /// it; newer ones write it into `rope_parameters`). Only 1 is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
}

fn default_hidden_act() -> Activation {
    Activation::Silu
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_max_position_embeddings() -> usize {
    2048
}

/// Default RoPE base of all three families.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// `rope_scaling` (or `rope_parameters`) of `config.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// The kind: `default`, `linear` or `llama3` are implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<RopeType>,
    /// The kind, under the key older releases wrote (often next to `rope_type`).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<RopeType>,
    /// RoPE base frequency (`rope_parameters` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// How much longer the context gets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `llama3`: wavelengths above `original_max_position_embeddings / low_freq_factor` are scaled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// `llama3`: wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// `llama3`: the context length before scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Phi-3: the share of each head's width that RoPE rotates; only 1 is implemented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
}

impl LlamaConfig {
    /// The family, from `model_type`.
    pub fn architecture(&self) -> Result<Architecture, ModelError> {
        match Architecture::from_model_type(&self.model_type) {
            Some(
                arch @ (Architecture::Llama
                | Architecture::Mistral
                | Architecture::Qwen2
                | Architecture::Qwen3
                | Architecture::Phi3),
            ) => Ok(arch),
            _ => Err(ModelError::unsupported(
                "model_type",
                format!("`{}` is not a Llama-family decoder", self.model_type),
            )),
        }
    }

    /// The RoPE frequencies (one per pair of head dimensions) after scaling.
    fn inverse_frequencies(&self, head_dim: usize) -> Result<Vec<f32>, ModelError> {
        let scaling = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = scaling
            .and_then(|s| s.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(DEFAULT_ROPE_THETA);
        let base: Vec<f64> = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f64 / head_dim as f64))
            .collect();
        let rotated = scaling
            .and_then(|s| s.partial_rotary_factor)
            .or(self.extras.partial_rotary_factor)
            .unwrap_or(1.0);
        if rotated != 1.0 {
            return Err(ModelError::unsupported(
                "partial_rotary_factor",
                format!("RoPE over {rotated} of each head is not implemented (only 1)"),
            ));
        }
        let Some(scaling) = scaling else {
            return Ok(base.into_iter().map(|f| f as f32).collect());
        };
        let key = if self.rope_parameters.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let (kind, field) = match (&scaling.rope_type, &scaling.legacy_type) {
            (Some(kind), _) => (kind, "rope_type"),
            (None, Some(kind)) => (kind, "type"),
            (None, None) => (&RopeType::Default, "rope_type"),
        };

        let factor = || {
            scaling
                .factor
                .ok_or_else(|| ModelError::unsupported(key, format!("`{kind}` needs `factor`")))
        };
        let scaled: Vec<f64> = match kind {
            RopeType::Default => base,
            RopeType::Linear => {
                let factor = factor()?;
                base.into_iter().map(|f| f / factor).collect()
            }
            RopeType::Llama3 => {
                let factor = factor()?;
                let missing =
                    |name: &str| ModelError::unsupported(key, format!("`llama3` needs `{name}`"));
                let low = scaling
                    .low_freq_factor
                    .ok_or_else(|| missing("low_freq_factor"))?;
                let high = scaling
                    .high_freq_factor
                    .ok_or_else(|| missing("high_freq_factor"))?;
                let original = scaling
                    .original_max_position_embeddings
                    .ok_or_else(|| missing("original_max_position_embeddings"))?
                    as f64;
                let (low_wavelen, high_wavelen) = (original / low, original / high);
                base.into_iter()
                    .map(|freq| {
                        let wavelen = 2.0 * std::f64::consts::PI / freq;
                        if wavelen < high_wavelen {
                            freq
                        } else if wavelen > low_wavelen {
                            freq / factor
                        } else {
                            let smooth = (original / wavelen - low) / (high - low);
                            (1.0 - smooth) * freq / factor + smooth * freq
                        }
                    })
                    .collect()
            }
            other => {
                let reason = format!(
                    "RoPE type `{other}` is not implemented (supported: default, linear, llama3)"
                );
                return Err(ModelError::unsupported(&format!("{key}.{field}"), reason));
            }
        };
        Ok(scaled.into_iter().map(|f| f as f32).collect())
    }

    /// The window of each layer: `None` where it attends to every earlier token.
    fn sliding_windows(&self, arch: Architecture) -> Result<Vec<Option<usize>>, ModelError> {
        let layers = self.num_hidden_layers;
        if let Some(types) = &self.layer_types {
            if types.len() != layers {
                return Err(ModelError::unsupported(
                    "layer_types",
                    format!("{} entries for {layers} layers", types.len()),
                ));
            }
            return types
                .iter()
                .map(|kind| match kind.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => self.sliding_window.map(Some).ok_or_else(|| {
                        ModelError::unsupported("sliding_window", "missing for a sliding layer")
                    }),
                    other => Err(ModelError::unsupported(
                        "layer_types",
                        format!("attention kind `{other}` is not implemented"),
                    )),
                })
                .collect();
        }
        let window = match arch {
            Architecture::Mistral | Architecture::Phi3 => self.sliding_window,
            Architecture::Qwen2 | Architecture::Qwen3 if self.use_sliding_window == Some(true) => {
                self.sliding_window
            }
            _ => None,
        };
        // Qwen2 and Qwen3 keep their first `max_window_layers` layers on full attention.
        let first_windowed = match arch {
            Architecture::Qwen2 | Architecture::Qwen3 => self.max_window_layers.unwrap_or(0),
            _ => 0,
        };
        Ok((0..layers)
            .map(|layer| window.filter(|_| layer >= first_windowed))
            .collect())
    }
}

/// What the blocks need, resolved and checked once from a [`LlamaConfig`].
#[derive(Debug, Clone)]
pub(super) struct DecoderConfig {
    pub(super) hidden_size: usize,
    pub(super) intermediate_size: usize,
    pub(super) vocab_size: usize,
    pub(super) max_position_embeddings: usize,
    pub(super) num_heads: usize,
    pub(super) num_kv_heads: usize,
    pub(super) head_dim: usize,
    pub(super) rms_norm_eps: f64,
    pub(super) qkv_bias: bool,
    pub(super) o_bias: bool,
    /// Qwen3: an RMSNorm over each query and key head (`q_norm`, `k_norm`) before RoPE.
    pub(super) qk_norm: bool,
    /// Phi-3: q/k/v stored as one `qkv_proj`, gate and up as one `gate_up_proj`.
    pub(super) fused_projections: bool,
    pub(super) mlp_bias: bool,
    pub(super) tie_word_embeddings: bool,
    pub(super) inverse_frequencies: Vec<f32>,
    pub(super) sliding_windows: Vec<Option<usize>>,
}

impl DecoderConfig {
    pub(super) fn resolve(config: &LlamaConfig) -> Result<Self, ModelError> {
        let arch = config.architecture()?;
        if config.hidden_act != Activation::Silu {
            return Err(ModelError::unsupported(
                "hidden_act",
                format!("`{}` is not implemented (only silu)", config.hidden_act),
            ));
        }
        let head_dim = match config.head_dim {
            Some(dim) => dim,
            None => head_dim(
                config.hidden_size,
                "hidden_size",
                config.num_attention_heads,
                "num_attention_heads",
            )?,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(ModelError::unsupported(
                "head_dim",
                format!("RoPE needs an even, non-zero head width, got {head_dim}"),
            ));
        }
        let num_kv_heads = config
            .num_key_value_heads
            .unwrap_or(config.num_attention_heads);
        if num_kv_heads == 0 || config.num_attention_heads % num_kv_heads != 0 {
            return Err(ModelError::unsupported(
                "num_key_value_heads",
                format!(
                    "{num_kv_heads} key/value heads do not divide {} query heads",
                    config.num_attention_heads
                ),
            ));
        }
        let (qkv_bias, o_bias) = match arch {
            Architecture::Qwen2 => (true, false),
            _ => {
                let bias = config.attention_bias.unwrap_or(false);
                (bias, bias)
            }
        };
        Ok(Self {
            hidden_size: config.hidden_size,
            intermediate_size: config.intermediate_size,
            vocab_size: config.vocab_size,
            max_position_embeddings: config.max_position_embeddings,
            num_heads: config.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: config.rms_norm_eps,
            qkv_bias,
            o_bias,
            qk_norm: arch == Architecture::Qwen3,
            fused_projections: arch == Architecture::Phi3,
            mlp_bias: config.mlp_bias,
            tie_word_embeddings: config.tie_word_embeddings,
            inverse_frequencies: config.inverse_frequencies(head_dim)?,
            sliding_windows: config.sliding_windows(arch)?,
        })
    }
}
