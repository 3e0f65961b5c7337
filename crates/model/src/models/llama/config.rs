//! `config.json` of the Llama family, and what the blocks need resolved from it.

use serde::{Deserialize, Serialize};

use crate::models::{head_dim, Activation, Architecture, ModelError, RopeType, TokenIds};

/// `config.json` of a Llama, Mistral, Qwen2, Qwen3, Phi-3 or Gemma 3 text model, with Hugging Face's keys and defaults.
///
/// Both the classic keys (`rope_theta`, `rope_scaling`) and the `rope_parameters` object of
/// newer transformers releases are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2`, `qwen3`, `phi3` or `gemma3_text`.
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
    /// Gemma 3: the MLP's activation (`gelu_pytorch_tanh` when absent); `hidden_act` is
    /// not read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<Activation>,
    /// Gemma 3: attention scores are scaled by `query_pre_attn_scalar^-0.5` (256 when
    /// absent) instead of `head_dim^-0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3 (older releases): the RoPE base of sliding layers (10^4 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3 (older releases): every `n`-th layer is global, the others slide (6 when
    /// absent); `layer_types` takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 2's attention score capping: Gemma 3 keeps the key, but transformers never
    /// applies it to Gemma 3, and neither do these blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attn_logit_softcapping: Option<f64>,
    /// Gemma: logits become `cap * tanh(logits / cap)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_logit_softcapping: Option<f64>,
    /// Gemma 3 embedding models: attention without the causal mask (not implemented).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
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

/// Default RoPE base of the family (and of Gemma 3's sliding layers).
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// Default RoPE base of Gemma 3's global layers.
const GEMMA_GLOBAL_ROPE_THETA: f64 = 1_000_000.0;

/// Gemma 3's defaults where its config leaves a key out.
const GEMMA_HEAD_DIM: usize = 256;
const GEMMA_QUERY_PRE_ATTN_SCALAR: f64 = 256.0;
const GEMMA_SLIDING_WINDOW: usize = 4096;
const GEMMA_SLIDING_WINDOW_PATTERN: usize = 6;

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
    /// Gemma 3 (`rope_parameters` of newer releases): the global layers' RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_attention: Option<Box<RopeScaling>>,
    /// Gemma 3 (`rope_parameters` of newer releases): the sliding layers' RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_attention: Option<Box<RopeScaling>>,
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
                | Architecture::Phi3
                | Architecture::Gemma3Text),
            ) => Ok(arch),
            _ => Err(ModelError::unsupported(
                "model_type",
                format!("`{}` is not a Llama-family decoder", self.model_type),
            )),
        }
    }

    /// The RoPE frequencies (one per pair of head dimensions) after scaling: those of the
    /// global layers and, where sliding layers have their own (Gemma 3), theirs.
    #[allow(clippy::type_complexity)]
    fn inverse_frequencies(
        &self,
        arch: Architecture,
        head_dim: usize,
    ) -> Result<(Vec<f32>, Option<Vec<f32>>), ModelError> {
        let scaling = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let key = if self.rope_parameters.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let gemma = arch == Architecture::Gemma3Text;
        let global_theta = self.rope_theta.unwrap_or(if gemma {
            GEMMA_GLOBAL_ROPE_THETA
        } else {
            DEFAULT_ROPE_THETA
        });
        let local_theta = self
            .extras
            .rope_local_base_freq
            .unwrap_or(DEFAULT_ROPE_THETA);
        // Newer releases give each layer type its own parameters.
        let per_type =
            scaling.filter(|s| s.full_attention.is_some() || s.sliding_attention.is_some());
        if let Some(per_type) = per_type {
            let full = per_type.full_attention.as_deref();
            let sliding = per_type.sliding_attention.as_deref();
            let global = self.frequencies(
                full,
                &format!("{key}.full_attention"),
                global_theta,
                head_dim,
            )?;
            let local = self.frequencies(
                sliding,
                &format!("{key}.sliding_attention"),
                local_theta,
                head_dim,
            )?;
            return Ok((global, Some(local)));
        }
        let global = self.frequencies(scaling, key, global_theta, head_dim)?;
        // Gemma 3's older keys: `rope_scaling` is the global layers' alone.
        let local = gemma
            .then(|| self.frequencies(None, key, local_theta, head_dim))
            .transpose()?;
        Ok((global, local))
    }

    /// The frequencies `scaling` (named `key`) describes, with base `theta` unless it
    /// gives its own.
    fn frequencies(
        &self,
        scaling: Option<&RopeScaling>,
        key: &str,
        theta: f64,
        head_dim: usize,
    ) -> Result<Vec<f32>, ModelError> {
        let theta = scaling.and_then(|s| s.rope_theta).unwrap_or(theta);
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
        let gemma = arch == Architecture::Gemma3Text;
        let sliding_window = self
            .sliding_window
            .or(gemma.then_some(GEMMA_SLIDING_WINDOW));
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
                    "sliding_attention" => sliding_window.map(Some).ok_or_else(|| {
                        ModelError::unsupported("sliding_window", "missing for a sliding layer")
                    }),
                    other => Err(ModelError::unsupported(
                        "layer_types",
                        format!("attention kind `{other}` is not implemented"),
                    )),
                })
                .collect();
        }
        if gemma {
            // Every `pattern`-th layer is global, as transformers derives `layer_types`.
            let pattern = self
                .extras
                .sliding_window_pattern
                .unwrap_or(GEMMA_SLIDING_WINDOW_PATTERN);
            if pattern == 0 {
                return Err(ModelError::unsupported(
                    "sliding_window_pattern",
                    "must be at least 1",
                ));
            }
            return Ok((0..layers)
                .map(|layer| sliding_window.filter(|_| (layer + 1) % pattern != 0))
                .collect());
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
    /// Gemma 3: the sliding layers' own RoPE frequencies.
    pub(super) local_inverse_frequencies: Option<Vec<f32>>,
    pub(super) sliding_windows: Vec<Option<usize>>,
    /// The MLP's activation: silu, gelu or its tanh approximation.
    pub(super) activation: Activation,
    /// Gemma: norms scale by `1 + weight`, and the attention and MLP outputs are normed
    /// too (`post_attention_layernorm`, `pre_feedforward_layernorm`,
    /// `post_feedforward_layernorm`).
    pub(super) gemma_norms: bool,
    /// Gemma: embeddings are scaled by `sqrt(hidden_size)`.
    pub(super) embed_scale: Option<f64>,
    /// What attention scores are multiplied by.
    pub(super) attention_scale: f64,
    pub(super) final_logit_softcapping: Option<f64>,
}

impl DecoderConfig {
    pub(super) fn resolve(config: &LlamaConfig) -> Result<Self, ModelError> {
        let arch = config.architecture()?;
        let gemma = arch == Architecture::Gemma3Text;
        let extras = &config.extras;
        let (activation, activation_key) = if gemma {
            let default = Activation::from("gelu_pytorch_tanh");
            let activation = extras.hidden_activation.clone().unwrap_or(default);
            (activation, "hidden_activation")
        } else {
            (config.hidden_act.clone(), "hidden_act")
        };
        if !matches!(
            activation,
            Activation::Silu | Activation::Gelu | Activation::GeluTanh(_)
        ) {
            return Err(ModelError::unsupported(
                activation_key,
                format!("`{activation}` is not implemented (silu, gelu, gelu_pytorch_tanh)"),
            ));
        }
        if extras.use_bidirectional_attention == Some(true) {
            return Err(ModelError::unsupported(
                "use_bidirectional_attention",
                "attention without the causal mask is not implemented",
            ));
        }
        let head_dim = match config.head_dim {
            Some(dim) => dim,
            None if gemma => GEMMA_HEAD_DIM,
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
        let scaled_by = if gemma {
            extras
                .query_pre_attn_scalar
                .unwrap_or(GEMMA_QUERY_PRE_ATTN_SCALAR)
        } else {
            head_dim as f64
        };
        let (inverse_frequencies, local_inverse_frequencies) =
            config.inverse_frequencies(arch, head_dim)?;
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
            qk_norm: matches!(arch, Architecture::Qwen3 | Architecture::Gemma3Text),
            fused_projections: arch == Architecture::Phi3,
            mlp_bias: config.mlp_bias,
            tie_word_embeddings: config.tie_word_embeddings,
            inverse_frequencies,
            local_inverse_frequencies,
            sliding_windows: config.sliding_windows(arch)?,
            activation,
            gemma_norms: gemma,
            embed_scale: gemma.then(|| (config.hidden_size as f64).sqrt()),
            attention_scale: 1.0 / scaled_by.sqrt(),
            final_logit_softcapping: extras.final_logit_softcapping,
        })
    }
}
