//! Llama-family decoders: Llama, Mistral and Qwen2.
//!
//! Grouped-query attention with rotary position embeddings (`rope_theta`, and the `linear`
//! and `llama3` kinds of `rope_scaling`), RMSNorm, a SiLU-gated MLP, and tied or untied
//! embeddings. Qwen2 differs only by biases on q/k/v; Mistral (and Qwen2 when it asks for
//! it) by a sliding attention window. The stages run in the order of [`DecoderModel::layer_names`]:
//! `model.embed_tokens`, `model.layers.0` … `model.layers.{N-1}`, `model.norm`, `lm_head`.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use serde::{Deserialize, Serialize};

use super::{head_dim, stage_for, Architecture, ModelError, Stage, StageCursor};

/// `config.json` of a Llama, Mistral or Qwen2 model, with Hugging Face's keys and defaults.
///
/// Both the classic keys (`rope_theta`, `rope_scaling`) and the `rope_parameters` object of
/// newer transformers releases are read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
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
    pub hidden_act: String,
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
    /// Llama: biases on q/k/v/o. Qwen2 always has q/k/v biases and never an o bias.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Llama: biases on the MLP's projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Tokens a sliding-window layer attends to (itself included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether any layer uses the sliding window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers below this index attend to everything.
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
    pub eos_token_id: Option<serde_json::Value>,
    /// The dtype the weights were saved in (older releases' key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

fn default_hidden_act() -> String {
    "silu".into()
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
    pub rope_type: Option<String>,
    /// The kind, under the key older releases wrote (often next to `rope_type`).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub legacy_type: Option<String>,
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
}

impl LlamaConfig {
    /// The family, from `model_type`.
    pub fn architecture(&self) -> Result<Architecture, ModelError> {
        match Architecture::from_model_type(&self.model_type) {
            Some(arch @ (Architecture::Llama | Architecture::Mistral | Architecture::Qwen2)) => {
                Ok(arch)
            }
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
        let Some(scaling) = scaling else {
            return Ok(base.into_iter().map(|f| f as f32).collect());
        };
        let key = if self.rope_parameters.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let kind = scaling
            .rope_type
            .as_deref()
            .or(scaling.legacy_type.as_deref())
            .unwrap_or("default");
        let factor = || {
            scaling
                .factor
                .ok_or_else(|| ModelError::unsupported(key, format!("`{kind}` needs `factor`")))
        };
        let scaled: Vec<f64> = match kind {
            "default" => base,
            "linear" => {
                let factor = factor()?;
                base.into_iter().map(|f| f / factor).collect()
            }
            "llama3" => {
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
                return Err(ModelError::unsupported(
                    key,
                    format!(
                    "RoPE type `{other}` is not implemented (supported: default, linear, llama3)"
                ),
                ))
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
            Architecture::Mistral => self.sliding_window,
            Architecture::Qwen2 if self.use_sliding_window == Some(true) => self.sliding_window,
            _ => None,
        };
        // Qwen2 keeps its first `max_window_layers` layers on full attention.
        let first_windowed = match arch {
            Architecture::Qwen2 => self.max_window_layers.unwrap_or(0),
            _ => 0,
        };
        Ok((0..layers)
            .map(|layer| window.filter(|_| layer >= first_windowed))
            .collect())
    }
}

/// What the blocks need, resolved and checked once from a [`LlamaConfig`].
#[derive(Debug, Clone)]
struct DecoderConfig {
    hidden_size: usize,
    intermediate_size: usize,
    vocab_size: usize,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    rms_norm_eps: f64,
    qkv_bias: bool,
    o_bias: bool,
    mlp_bias: bool,
    tie_word_embeddings: bool,
    inverse_frequencies: Vec<f32>,
    sliding_windows: Vec<Option<usize>>,
}

impl DecoderConfig {
    fn resolve(config: &LlamaConfig) -> Result<Self, ModelError> {
        let arch = config.architecture()?;
        if config.hidden_act != "silu" {
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
            num_heads: config.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: config.rms_norm_eps,
            qkv_bias,
            o_bias,
            mlp_bias: config.mlp_bias,
            tie_word_embeddings: config.tie_word_embeddings,
            inverse_frequencies: config.inverse_frequencies(head_dim)?,
            sliding_windows: config.sliding_windows(arch)?,
        })
    }
}

/// A linear layer with or without a bias, named as Hugging Face names it.
fn linear(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
) -> candle_core::Result<Linear> {
    if bias {
        candle_nn::linear(in_dim, out_dim, vb)
    } else {
        candle_nn::linear_no_bias(in_dim, out_dim, vb)
    }
}

/// The cos and sin tables of the positions one pass covers, each `(seq_len, head_dim / 2)`.
struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTables {
    fn new(
        inverse_frequencies: &[f32],
        positions: std::ops::Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let half = inverse_frequencies.len();
        let angles: Vec<f32> = positions
            .clone()
            .flat_map(|p| inverse_frequencies.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (positions.len(), half), device)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }
}

/// Additive attention mask `(seq_len, offset + seq_len)`: 0 where a query may look, -inf
/// elsewhere. `None` when nothing is hidden (a single new token inside its window).
fn attention_mask(
    seq_len: usize,
    offset: usize,
    window: Option<usize>,
    device: &Device,
) -> candle_core::Result<Option<Tensor>> {
    let total = offset + seq_len;
    let visible = |query: usize, key: usize| key <= query && window.is_none_or(|w| query - key < w);
    let hides_any = (0..seq_len).any(|i| (0..total).any(|key| !visible(offset + i, key)));
    if !hides_any {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| {
            (0..total).map(move |key| {
                if visible(offset + i, key) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (seq_len, total), device).map(Some)
}

/// `(batch, kv_heads, seq, dim)` → `(batch, kv_heads * repeats, seq, dim)`, each key/value
/// head repeated for the query heads of its group, as transformers' `repeat_kv` does.
fn repeat_kv(xs: Tensor, repeats: usize) -> candle_core::Result<Tensor> {
    if repeats == 1 {
        return Ok(xs);
    }
    let (batch, kv_heads, seq_len, dim) = xs.dims4()?;
    xs.unsqueeze(2)?
        .broadcast_as((batch, kv_heads, repeats, seq_len, dim))?
        .reshape((batch, kv_heads * repeats, seq_len, dim))
}

/// Grouped-query self-attention with RoPE.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &DecoderConfig) -> candle_core::Result<Self> {
        let (hidden, dim) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            q_proj: linear(hidden, cfg.num_heads * dim, cfg.qkv_bias, vb.pp("q_proj"))?,
            k_proj: linear(
                hidden,
                cfg.num_kv_heads * dim,
                cfg.qkv_bias,
                vb.pp("k_proj"),
            )?,
            v_proj: linear(
                hidden,
                cfg.num_kv_heads * dim,
                cfg.qkv_bias,
                vb.pp("v_proj"),
            )?,
            o_proj: linear(cfg.num_heads * dim, hidden, cfg.o_bias, vb.pp("o_proj"))?,
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: dim,
        })
    }

    /// `cache` holds this layer's keys and values of earlier passes; the new ones are
    /// appended to it.
    fn forward(
        &self,
        xs: &Tensor,
        rotary: &RotaryTables,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let (batch, seq_len, _) = xs.dims3()?;
        let heads = |proj: &Linear, count: usize| -> candle_core::Result<Tensor> {
            proj.forward(xs)?
                .reshape((batch, seq_len, count, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = heads(&self.q_proj, self.num_heads)?;
        let k = heads(&self.k_proj, self.num_kv_heads)?;
        let v = heads(&self.v_proj, self.num_kv_heads)?;
        let q = candle_nn::rotary_emb::rope(&q, &rotary.cos, &rotary.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &rotary.cos, &rotary.sin)?;
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    None => (k, v),
                    Some((past_k, past_v)) => (
                        Tensor::cat(&[&past_k, &k], 2)?,
                        Tensor::cat(&[&past_v, &v], 2)?,
                    ),
                };
                *slot = Some((k.clone(), v.clone()));
                (k, v)
            }
        };
        let repeats = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(k, repeats)?;
        let v = repeat_kv(v, repeats)?;
        let dtype = q.dtype();
        // Softmax in f32 whatever the weights' dtype, as transformers does.
        let scores =
            (q.matmul(&k.t()?)? * (1.0 / (self.head_dim as f64).sqrt()))?.to_dtype(DType::F32)?;
        let scores = match mask {
            Some(mask) => scores.broadcast_add(mask)?,
            None => scores,
        };
        let weights = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((
            batch,
            seq_len,
            self.num_heads * self.head_dim,
        ))?;
        self.o_proj.forward(&out)
    }
}

/// `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &DecoderConfig) -> candle_core::Result<Self> {
        let (hidden, inner, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear(hidden, inner, bias, vb.pp("gate_proj"))?,
            up_proj: linear(hidden, inner, bias, vb.pp("up_proj"))?,
            down_proj: linear(inner, hidden, bias, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?.silu()?;
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

/// Pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
#[derive(Debug, Clone)]
struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &DecoderConfig) -> candle_core::Result<Self> {
        let norm = |name| candle_nn::rms_norm(cfg.hidden_size, cfg.rms_norm_eps, vb.pp(name));
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        rotary: &RotaryTables,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let attended =
            self.self_attn
                .forward(&self.input_layernorm.forward(xs)?, rotary, mask, cache)?;
        let xs = (xs + attended)?;
        let mlp = self
            .mlp
            .forward(&self.post_attention_layernorm.forward(&xs)?)?;
        xs + mlp
    }
}

/// The blocks of one stage, built from that stage's tensors.
#[derive(Debug, Clone)]
enum Block {
    Embeddings(Embedding),
    Layer(usize, Box<DecoderLayer>),
    FinalNorm(RmsNorm),
    LmHead(Linear),
}

/// One stage of a decoder, loaded: its weights live as long as it does.
///
/// Built by [`DecoderModel::load_stage`]; dropping it releases the stage's weights.
#[derive(Debug, Clone)]
pub struct DecoderBlock {
    index: usize,
    block: Block,
}

/// A Llama-family decoder as a skeleton: its config and stages, no weights.
///
/// Build it from the config alone, list its stages, then either run it stage by stage from
/// each stage's own tensors ([`DecoderModel::pass`], [`DecoderPass::run_stage`]) or load it
/// whole ([`DecoderModel::load`], [`DecoderModel::forward_full`]). Both paths run the same
/// code on the same tensors, so their outputs are bitwise equal.
///
/// ```
/// use candle_core::{DType, Device};
/// use memwise_model::{DecoderModel, LlamaConfig};
///
/// let config: LlamaConfig = serde_json::from_str(r#"{
///     "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
///     "intermediate_size": 32, "num_hidden_layers": 2,
///     "num_attention_heads": 4, "num_key_value_heads": 2
/// }"#)?;
/// let model = DecoderModel::new(&config, DType::F32, &Device::Cpu)?;
/// assert_eq!(
///     model.layer_names().collect::<Vec<_>>(),
///     ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "lm_head"],
/// );
/// let layer = &model.stages()[1];
/// assert!(layer.tensor_names().any(|n| n == "model.layers.0.self_attn.k_proj.weight"));
/// assert_eq!(layer.tensors()[2].shape, [8, 16]); // two key/value heads of width 4
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct DecoderModel {
    cfg: DecoderConfig,
    stages: Vec<Stage>,
    dtype: DType,
    device: Device,
}

impl DecoderModel {
    /// The skeleton of the model `config` describes, computing in `dtype` on `device`.
    pub fn new(config: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let cfg = DecoderConfig::resolve(config)?;
        let mut model = Self {
            cfg,
            stages: Vec::new(),
            dtype,
            device: device.clone(),
        };
        model.stages = (0..model.stage_count())
            .map(|index| {
                Stage::trace(model.stage_name(index), dtype, |vb| {
                    model.load_block(index, vb)
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(model)
    }

    /// The stages in execution order.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// The stages' names in execution order: `model.embed_tokens`, `model.layers.{i}`,
    /// `model.norm`, `lm_head`.
    pub fn layer_names(&self) -> impl Iterator<Item = &str> {
        self.stages.iter().map(Stage::name)
    }

    /// Decoder layers.
    pub fn num_layers(&self) -> usize {
        self.cfg.sliding_windows.len()
    }

    /// Tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// The dtype the model computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the model computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn stage_count(&self) -> usize {
        self.num_layers() + 3
    }

    fn stage_name(&self, index: usize) -> String {
        let layers = self.num_layers();
        match index {
            0 => "model.embed_tokens".into(),
            i if i <= layers => format!("model.layers.{}", i - 1),
            i if i == layers + 1 => "model.norm".into(),
            _ => "lm_head".into(),
        }
    }

    /// Builds stage `index` from `vb`, a builder at the checkpoint's root yielding the
    /// model's dtype: the names it asks for are the full Hugging Face names of
    /// [`Stage::tensors`].
    pub fn load_stage(&self, index: usize, vb: VarBuilder) -> Result<DecoderBlock, ModelError> {
        let stage = stage_for(&self.stages, index, &vb, self.dtype)?;
        self.load_block(index, vb)
            .map_err(ModelError::stage(stage.name()))
    }

    fn load_block(&self, index: usize, vb: VarBuilder) -> candle_core::Result<DecoderBlock> {
        let cfg = &self.cfg;
        let layers = self.num_layers();
        let embeddings = || {
            vb.pp("model.embed_tokens")
                .get((cfg.vocab_size, cfg.hidden_size), "weight")
        };
        let block = match index {
            0 => Block::Embeddings(Embedding::new(embeddings()?, cfg.hidden_size)),
            i if i <= layers => Block::Layer(
                i - 1,
                Box::new(DecoderLayer::load(
                    vb.pp(format!("model.layers.{}", i - 1)),
                    cfg,
                )?),
            ),
            i if i == layers + 1 => Block::FinalNorm(candle_nn::rms_norm(
                cfg.hidden_size,
                cfg.rms_norm_eps,
                vb.pp("model.norm"),
            )?),
            _ if cfg.tie_word_embeddings => Block::LmHead(Linear::new(embeddings()?, None)),
            _ => Block::LmHead(candle_nn::linear_no_bias(
                cfg.hidden_size,
                cfg.vocab_size,
                vb.pp("lm_head"),
            )?),
        };
        Ok(DecoderBlock { index, block })
    }

    /// Starts a forward pass over `input_ids` (`(batch, seq_len)`, `u32`), continuing the
    /// sequences in `cache` when one is given. The sequences of a batch share their
    /// positions: there is no padding mask, so batch only sequences of equal length.
    pub fn pass<'a>(
        &'a self,
        input_ids: &Tensor,
        cache: Option<&'a mut KvCache>,
    ) -> Result<DecoderPass<'a>, ModelError> {
        let (_, seq_len) = input_ids
            .dims2()
            .map_err(|e| ModelError::Input(format!("input_ids must be (batch, seq_len): {e}")))?;
        if input_ids.dtype() != DType::U32 || seq_len == 0 {
            return Err(ModelError::Input(format!(
                "input_ids must be non-empty u32, got {:?} {:?}",
                input_ids.dtype(),
                input_ids.shape()
            )));
        }
        let offset = match &cache {
            None => 0,
            Some(cache) if cache.layers.len() == self.num_layers() => cache.seq_len,
            Some(cache) => {
                return Err(ModelError::Input(format!(
                    "KV cache has {} layers, the model {}",
                    cache.layers.len(),
                    self.num_layers()
                )))
            }
        };
        let setup = |e| ModelError::stage("pass setup")(e);
        let rotary = RotaryTables::new(
            &self.cfg.inverse_frequencies,
            offset..offset + seq_len,
            self.dtype,
            &self.device,
        )
        .map_err(setup)?;
        // One mask for each distinct window, shared by the layers that use it.
        let mut masks: Vec<(Option<usize>, Option<Tensor>)> = Vec::new();
        for &window in &self.cfg.sliding_windows {
            if masks.iter().all(|(w, _)| *w != window) {
                let mask = attention_mask(seq_len, offset, window, &self.device).map_err(setup)?;
                masks.push((window, mask));
            }
        }
        Ok(DecoderPass {
            model: self,
            input_ids: input_ids.to_device(&self.device).map_err(setup)?,
            rotary,
            masks,
            cache,
            new_tokens: seq_len,
            last_position_only: false,
            cursor: StageCursor::new(self.stages.len()),
        })
    }

    /// Loads every stage from `vb` (all the checkpoint's tensors) into a model that can run
    /// many passes.
    pub fn load(self, vb: VarBuilder) -> Result<LoadedDecoder, ModelError> {
        let blocks = (0..self.stages.len())
            .map(|index| self.load_stage(index, vb.clone()))
            .collect::<Result<_, _>>()?;
        Ok(LoadedDecoder {
            model: self,
            blocks,
        })
    }

    /// Loads the whole model from `vb` and returns the logits `(batch, seq_len, vocab)` of
    /// `input_ids`: the full-load path the streamed one is checked against.
    pub fn forward_full(&self, vb: VarBuilder, input_ids: &Tensor) -> Result<Tensor, ModelError> {
        self.clone().load(vb)?.forward(input_ids, None)
    }
}

/// One forward pass of a [`DecoderModel`], run a stage at a time.
///
/// Stages must run in order; the pass carries the hidden states from one to the next.
pub struct DecoderPass<'a> {
    model: &'a DecoderModel,
    input_ids: Tensor,
    rotary: RotaryTables,
    masks: Vec<(Option<usize>, Option<Tensor>)>,
    cache: Option<&'a mut KvCache>,
    new_tokens: usize,
    last_position_only: bool,
    cursor: StageCursor,
}

impl DecoderPass<'_> {
    /// Computes the final norm and the logits for the last position only, `(batch, 1,
    /// vocab)`: all that generation reads, without the `(batch, seq_len, vocab)` logits
    /// that for a long prompt and a large vocabulary outweigh a whole layer.
    pub fn last_position_only(mut self) -> Self {
        self.last_position_only = true;
        self
    }

    /// Index of the stage due next.
    pub fn next_stage(&self) -> usize {
        self.cursor.next
    }

    /// Builds stage `index` from `weights` (which may hold only that stage's tensors), runs
    /// it, and drops its weights.
    pub fn run_stage(&mut self, index: usize, weights: VarBuilder) -> Result<(), ModelError> {
        self.cursor.check(index)?;
        let block = self.model.load_stage(index, weights)?;
        self.run_block(&block)
    }

    /// Runs a stage that is already loaded.
    pub fn run_block(&mut self, block: &DecoderBlock) -> Result<(), ModelError> {
        self.cursor.check(block.index)?;
        let stage = self.model.stages[block.index].name();
        let hidden = self.compute(block).map_err(ModelError::stage(stage))?;
        if self.cursor.advance(hidden) {
            // The pass is complete, so every layer has appended its keys and values.
            if let Some(cache) = self.cache.as_deref_mut() {
                cache.seq_len += self.new_tokens;
            }
        }
        Ok(())
    }

    fn compute(&mut self, block: &DecoderBlock) -> candle_core::Result<Tensor> {
        match &block.block {
            Block::Embeddings(embeddings) => embeddings.forward(&self.input_ids),
            Block::Layer(layer_index, layer) => {
                let window = self.model.cfg.sliding_windows[*layer_index];
                let mask = self
                    .masks
                    .iter()
                    .find(|(w, _)| *w == window)
                    .and_then(|(_, mask)| mask.as_ref());
                let cache = self
                    .cache
                    .as_deref_mut()
                    .map(|cache| &mut cache.layers[*layer_index]);
                layer.forward(self.cursor.hidden()?, &self.rotary, mask, cache)
            }
            Block::FinalNorm(norm) => {
                let hidden = self.cursor.hidden()?;
                if self.last_position_only {
                    let last = hidden.dim(1)? - 1;
                    norm.forward(&hidden.narrow(1, last, 1)?.contiguous()?)
                } else {
                    norm.forward(hidden)
                }
            }
            Block::LmHead(head) => head.forward(self.cursor.hidden()?),
        }
    }

    /// The logits `(batch, seq_len, vocab)`, once every stage has run.
    pub fn finish(self) -> Result<Tensor, ModelError> {
        self.cursor.finish()
    }
}

/// Keys and values of the tokens seen so far, one entry per layer, so that each generated
/// token only computes attention for itself.
///
/// A pass appends to it layer by layer and counts the new tokens when its last stage has
/// run; after a pass that failed half way, [`KvCache::clear`] it before reuse.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    seq_len: usize,
}

impl KvCache {
    /// An empty cache for `model`.
    pub fn new(model: &DecoderModel) -> Self {
        Self {
            layers: vec![None; model.num_layers()],
            seq_len: 0,
        }
    }

    /// Tokens cached.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Bytes the cached keys and values take.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flatten()
            .map(|(k, v)| {
                (k.elem_count() + v.elem_count()) as u64 * k.dtype().size_in_bytes() as u64
            })
            .sum()
    }

    /// Forgets every cached token.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|layer| *layer = None);
        self.seq_len = 0;
    }
}

/// A [`DecoderModel`] with every stage loaded.
#[derive(Debug, Clone)]
pub struct LoadedDecoder {
    model: DecoderModel,
    blocks: Vec<DecoderBlock>,
}

/// What [`LoadedDecoder::generate_greedy`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// The prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    /// The KV cache's size at the end, in bytes; 0 when generating without a cache.
    pub kv_cache_bytes: u64,
}

impl LoadedDecoder {
    /// The skeleton.
    pub fn model(&self) -> &DecoderModel {
        &self.model
    }

    /// Logits `(batch, seq_len, vocab)` of `input_ids`, continuing `cache` if given.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        self.run(self.model.pass(input_ids, cache)?)
    }

    /// Logits `(batch, 1, vocab)` of the last position of `input_ids`; see
    /// [`DecoderPass::last_position_only`].
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor, ModelError> {
        self.run(self.model.pass(input_ids, cache)?.last_position_only())
    }

    fn run(&self, mut pass: DecoderPass) -> Result<Tensor, ModelError> {
        for block in &self.blocks {
            pass.run_block(block)?;
        }
        pass.finish()
    }

    /// Greedy decoding: appends the most likely token `max_new_tokens` times, or until
    /// `eos_token_id`. With `use_cache` each step feeds only the new token and reuses the
    /// cached keys and values; without, each step recomputes the whole sequence.
    pub fn generate_greedy(
        &self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos_token_id: Option<u32>,
        use_cache: bool,
    ) -> Result<Generation, ModelError> {
        let mut tokens = prompt.to_vec();
        let mut cache = use_cache.then(|| KvCache::new(&self.model));
        let input = |e| ModelError::stage("lm_head")(e);
        for _ in 0..max_new_tokens {
            let fed = match &cache {
                Some(cache) => &tokens[cache.seq_len()..],
                None => &tokens[..],
            };
            let ids = Tensor::new(fed, &self.model.device)
                .and_then(|t| t.unsqueeze(0))
                .map_err(input)?;
            let logits = self.forward_last(&ids, cache.as_mut())?;
            let next = logits
                .flatten_all()
                .and_then(|l| l.argmax(D::Minus1))
                .and_then(|t| t.to_scalar::<u32>())
                .map_err(input)?;
            tokens.push(next);
            if Some(next) == eos_token_id {
                break;
            }
        }
        Ok(Generation {
            tokens,
            kv_cache_bytes: cache.map_or(0, |c| c.bytes()),
        })
    }
}
