//! BERT-style encoders, the family of sentence-embedding models such as MiniLM.
//!
//! Word, position and token-type embeddings summed and normalized, then post-LayerNorm
//! blocks (`norm(x + attn(x))`, `norm(x + mlp(x))`) with a GELU MLP. The stages run in the
//! order `embeddings`, `encoder.layer.0` … `encoder.layer.{N-1}`; checkpoints saved from a
//! task model put `bert.` in front of every name, which [`EncoderModel::with_weight_prefix`]
//! follows. The pooler is not a stage: sentence-embedding models pool with
//! [`mean_pool`] over the last hidden states instead.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::LayerNorm;

use super::weights::{Embedding, Linear, Weights};
use serde::{Deserialize, Serialize};

use super::stage::previous_output;
use super::{head_dim, Family, Inputs, ModelError, Stage};

/// `config.json` of a BERT-style encoder, with Hugging Face's keys and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// `bert`.
    pub model_type: String,
    /// The Hugging Face classes this checkpoint was saved from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of the MLP's inner layer.
    pub intermediate_size: usize,
    /// The MLP's activation: `gelu` (exact), `gelu_new` / `gelu_pytorch_tanh` (tanh
    /// approximation) or `relu`.
    #[serde(default = "default_hidden_act")]
    pub hidden_act: super::Activation,
    /// Positions the position embeddings cover.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Token types (segments) the token-type embeddings cover.
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// LayerNorm's epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// The padding token.
    #[serde(default)]
    pub pad_token_id: u32,
    /// Only `absolute` is implemented.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// The dtype the weights were saved in (older releases' key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

fn default_hidden_act() -> super::Activation {
    super::Activation::Gelu
}

fn default_max_position_embeddings() -> usize {
    512
}

fn default_type_vocab_size() -> usize {
    2
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}

fn default_position_embedding_type() -> String {
    "absolute".into()
}

/// The MLP activations BERT checkpoints use.
#[derive(Debug, Clone, Copy)]
enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
}

impl Activation {
    fn forward(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::GeluErf => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
        }
    }
}

/// What the blocks need, resolved and checked once from a [`BertConfig`].
#[derive(Debug, Clone)]
struct EncoderConfig {
    vocab_size: usize,
    hidden_size: usize,
    num_layers: usize,
    num_heads: usize,
    head_dim: usize,
    intermediate_size: usize,
    activation: Activation,
    max_position_embeddings: usize,
    type_vocab_size: usize,
    layer_norm_eps: f64,
}

impl EncoderConfig {
    fn resolve(config: &BertConfig) -> Result<Self, ModelError> {
        if config.model_type != "bert" {
            return Err(ModelError::unsupported(
                "model_type",
                format!("`{}` is not a BERT encoder", config.model_type),
            ));
        }
        let activation = match &config.hidden_act {
            super::Activation::Gelu => Activation::GeluErf,
            super::Activation::GeluTanh(_) => Activation::GeluTanh,
            super::Activation::Relu => Activation::Relu,
            other => {
                return Err(ModelError::unsupported(
                    "hidden_act",
                    format!(
                        "`{other}` is not implemented (gelu, gelu_new, gelu_pytorch_tanh, relu)"
                    ),
                ))
            }
        };
        if config.position_embedding_type != "absolute" {
            return Err(ModelError::unsupported(
                "position_embedding_type",
                format!(
                    "`{}` is not implemented (only absolute)",
                    config.position_embedding_type
                ),
            ));
        }
        Ok(Self {
            vocab_size: config.vocab_size,
            hidden_size: config.hidden_size,
            num_layers: config.num_hidden_layers,
            num_heads: config.num_attention_heads,
            head_dim: head_dim(
                config.hidden_size,
                "hidden_size",
                config.num_attention_heads,
                "num_attention_heads",
            )?,
            intermediate_size: config.intermediate_size,
            activation,
            max_position_embeddings: config.max_position_embeddings,
            type_vocab_size: config.type_vocab_size,
            layer_norm_eps: config.layer_norm_eps,
        })
    }

    /// Norm weights are vectors, never mapped: the builder has them, under either of the
    /// names BERT checkpoints use (`weight`/`bias` or `gamma`/`beta`).
    fn layer_norm(&self, vb: &Weights) -> candle_core::Result<LayerNorm> {
        candle_nn::layer_norm(self.hidden_size, self.layer_norm_eps, vb.vb().clone())
    }
}

/// Word + position + token-type embeddings, then LayerNorm.
#[derive(Debug, Clone)]
struct BertEmbeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
}

impl BertEmbeddings {
    fn load(vb: Weights, cfg: &EncoderConfig) -> candle_core::Result<Self> {
        let hidden = cfg.hidden_size;
        Ok(Self {
            word_embeddings: vb.pp("word_embeddings").embedding(cfg.vocab_size, hidden)?,
            position_embeddings: vb
                .pp("position_embeddings")
                .embedding(cfg.max_position_embeddings, hidden)?,
            token_type_embeddings: vb
                .pp("token_type_embeddings")
                .embedding(cfg.type_vocab_size, hidden)?,
            layer_norm: cfg.layer_norm(&vb.pp("LayerNorm"))?,
        })
    }

    fn forward(&self, input_ids: &Tensor, token_type_ids: &Tensor) -> candle_core::Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let positions = Tensor::arange(0u32, seq_len as u32, input_ids.device())?;
        let words = self.word_embeddings.forward(input_ids)?;
        let types = self.token_type_embeddings.forward(token_type_ids)?;
        let positions = self.position_embeddings.forward(&positions)?;
        let summed = (words + types)?.broadcast_add(&positions)?;
        self.layer_norm.forward(&summed)
    }
}

/// Multi-head self-attention followed by its output projection, residual and LayerNorm.
#[derive(Debug, Clone)]
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    output: Linear,
    output_norm: LayerNorm,
    num_heads: usize,
    head_dim: usize,
}

impl BertAttention {
    fn load(vb: Weights, cfg: &EncoderConfig) -> candle_core::Result<Self> {
        let hidden = cfg.hidden_size;
        let attention = vb.pp("self");
        Ok(Self {
            query: attention.pp("query").linear(hidden, hidden, true)?,
            key: attention.pp("key").linear(hidden, hidden, true)?,
            value: attention.pp("value").linear(hidden, hidden, true)?,
            output: vb.pp("output.dense").linear(hidden, hidden, true)?,
            output_norm: cfg.layer_norm(&vb.pp("output.LayerNorm"))?,
            num_heads: cfg.num_heads,
            head_dim: cfg.head_dim,
        })
    }

    /// `mask` is additive, `(batch, 1, 1, seq_len)`.
    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, seq_len, hidden) = xs.dims3()?;
        let heads = |proj: &Linear| -> candle_core::Result<Tensor> {
            proj.forward(xs)?
                .reshape((batch, seq_len, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(&self.query)?, heads(&self.key)?, heads(&self.value)?);
        let dtype = q.dtype();
        // Softmax in f32 whatever the weights' dtype, as transformers does.
        let scores = (q.matmul(&k.t()?)? * (1.0 / (self.head_dim as f64).sqrt()))?
            .to_dtype(DType::F32)?
            .broadcast_add(mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let context = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq_len, hidden))?;
        self.output_norm
            .forward(&(self.output.forward(&context)? + xs)?)
    }
}

/// Post-LayerNorm encoder layer: attention, then `norm(x + down(act(up(x))))`.
#[derive(Debug, Clone)]
struct BertLayer {
    attention: BertAttention,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    activation: Activation,
}

impl BertLayer {
    fn load(vb: Weights, cfg: &EncoderConfig) -> candle_core::Result<Self> {
        let (hidden, inner) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            attention: BertAttention::load(vb.pp("attention"), cfg)?,
            intermediate: vb.pp("intermediate.dense").linear(hidden, inner, true)?,
            output: vb.pp("output.dense").linear(inner, hidden, true)?,
            output_norm: cfg.layer_norm(&vb.pp("output.LayerNorm"))?,
            activation: cfg.activation,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let attended = self.attention.forward(xs, mask)?;
        let inner = self
            .activation
            .forward(&self.intermediate.forward(&attended)?)?;
        self.output_norm
            .forward(&(self.output.forward(&inner)? + attended)?)
    }
}

#[derive(Debug, Clone)]
enum Block {
    Embeddings(BertEmbeddings),
    Layer(Box<BertLayer>),
}

/// One stage of an encoder, loaded: its weights live as long as it does.
#[derive(Debug, Clone)]
pub struct EncoderBlock {
    index: usize,
    block: Block,
}

/// A BERT-style encoder as a skeleton: its config and stages, no weights.
///
/// Like [`super::DecoderModel`], it runs stage by stage from each stage's own tensors
/// ([`Family::pass`]) or loaded whole ([`Family::forward_full`]), with bitwise
/// equal results.
///
/// ```
/// use candle_core::{DType, Device};
/// use memwise_model::models::{BertConfig, EncoderModel, Family};
///
/// let config: BertConfig = serde_json::from_str(r#"{
///     "model_type": "bert", "vocab_size": 30, "hidden_size": 8,
///     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16
/// }"#)?;
/// let model = EncoderModel::new(&config, DType::F32, &Device::Cpu)?.with_weight_prefix("bert")?;
/// assert_eq!(model.layer_names().collect::<Vec<_>>(), ["bert.embeddings", "bert.encoder.layer.0"]);
/// assert!(model.stages()[1]
///     .tensor_names()
///     .any(|n| n == "bert.encoder.layer.0.attention.self.query.weight"));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct EncoderModel {
    cfg: EncoderConfig,
    prefix: Option<String>,
    stages: Vec<Stage>,
    dtype: DType,
    device: Device,
}

impl EncoderModel {
    /// The skeleton of the model `config` describes, computing in `dtype` on `device`, with
    /// tensors named as `BertModel` saves them (no prefix).
    pub fn new(config: &BertConfig, dtype: DType, device: &Device) -> Result<Self, ModelError> {
        let mut model = Self {
            cfg: EncoderConfig::resolve(config)?,
            prefix: None,
            stages: Vec::new(),
            dtype,
            device: device.clone(),
        };
        model.retrace()?;
        Ok(model)
    }

    /// Names every tensor `{prefix}.…`, as checkpoints saved from a task model
    /// (`BertForMaskedLM`, …) do with `bert`. See [`EncoderModel::detect_weight_prefix`].
    pub fn with_weight_prefix(mut self, prefix: &str) -> Result<Self, ModelError> {
        self.prefix = Some(prefix.to_owned()).filter(|p| !p.is_empty());
        self.retrace()?;
        Ok(self)
    }

    /// The prefix a checkpoint's tensor names use: `Some("bert")` when its embeddings are
    /// `bert.embeddings.…`, `None` when they are `embeddings.…`.
    pub fn detect_weight_prefix<'n>(
        names: impl IntoIterator<Item = &'n str>,
    ) -> Option<&'static str> {
        names
            .into_iter()
            .any(|name| name.starts_with("bert.embeddings."))
            .then_some("bert")
    }

    fn retrace(&mut self) -> Result<(), ModelError> {
        let names = (0..=self.cfg.num_layers).map(|index| self.stage_name(index));
        self.stages = self.trace_stages(names)?;
        Ok(())
    }

    /// The stages' names in execution order: `embeddings`, `encoder.layer.{i}`, each after
    /// the weight prefix if there is one.
    pub fn layer_names(&self) -> impl Iterator<Item = &str> {
        self.stages.iter().map(Stage::name)
    }

    fn stage_name(&self, index: usize) -> String {
        let local = match index {
            0 => "embeddings".to_owned(),
            i => format!("encoder.layer.{}", i - 1),
        };
        match &self.prefix {
            Some(prefix) => format!("{prefix}.{local}"),
            None => local,
        }
    }
}

/// What an encoder pass carries from one stage to the next: the ids, token types and the
/// additive padding mask.
pub struct EncoderState {
    input_ids: Tensor,
    token_type_ids: Tensor,
    mask: Tensor,
}

impl Family for EncoderModel {
    type Block = EncoderBlock;
    type State<'a> = EncoderState;

    fn stages(&self) -> &[Stage] {
        &self.stages
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn build_block(&self, index: usize, vb: Weights) -> candle_core::Result<EncoderBlock> {
        let vb = vb.pp(self.stage_name(index));
        let block = match index {
            0 => Block::Embeddings(BertEmbeddings::load(vb, &self.cfg)?),
            _ => Block::Layer(Box::new(BertLayer::load(vb, &self.cfg)?)),
        };
        Ok(EncoderBlock { index, block })
    }

    fn block_index(block: &EncoderBlock) -> usize {
        block.index
    }

    /// `token_type_ids` default to 0; `attention_mask` (1 for tokens, 0 for padding, any
    /// dtype) to all ones.
    fn begin<'a>(&'a self, inputs: Inputs<'a>) -> Result<EncoderState, ModelError> {
        let input_ids = inputs.input_ids;
        let dims = inputs.dims()?;
        if inputs.cache.is_some() || inputs.last_position_only {
            return Err(ModelError::Input(
                "an encoder pass takes no KV cache and returns every position".into(),
            ));
        }
        if dims.1 > self.cfg.max_position_embeddings {
            return Err(ModelError::Input(format!(
                "{} tokens, but max_position_embeddings is {}",
                dims.1, self.cfg.max_position_embeddings
            )));
        }
        for (name, tensor) in [
            ("token_type_ids", inputs.token_type_ids),
            ("attention_mask", inputs.attention_mask),
        ] {
            if let Some(tensor) = tensor {
                if tensor.dims() != [dims.0, dims.1] {
                    return Err(ModelError::Input(format!(
                        "{name} is {:?}, input_ids {:?}",
                        tensor.shape(),
                        input_ids.shape()
                    )));
                }
            }
        }
        inputs.check_ids_below(self.cfg.vocab_size, "vocab_size")?;
        if let Some(types) = inputs.token_type_ids {
            super::family::check_ids_below(
                types,
                self.cfg.type_vocab_size,
                "token_type_ids",
                "type_vocab_size",
            )?;
        }
        let setup = |e| ModelError::stage("pass setup")(e);
        let device = &self.device;
        let token_type_ids = match inputs.token_type_ids {
            Some(ids) => ids.to_device(device).and_then(|t| t.to_dtype(DType::U32)),
            None => Tensor::zeros(dims, DType::U32, device),
        }
        .map_err(setup)?;
        // Padding gets the most negative f32 added to its scores, as transformers does.
        let mask = match inputs.attention_mask {
            Some(mask) => mask
                .to_device(device)
                .and_then(|m| m.to_dtype(DType::F32))
                .and_then(|m| (m.ones_like()? - m)? * f64::from(f32::MIN))
                .and_then(|m| m.reshape((dims.0, 1, 1, dims.1))),
            None => Tensor::zeros((dims.0, 1, 1, dims.1), DType::F32, device),
        }
        .map_err(setup)?;
        Ok(EncoderState {
            input_ids: input_ids.to_device(device).map_err(setup)?,
            token_type_ids,
            mask,
        })
    }

    fn run_block(
        &self,
        state: &mut EncoderState,
        _index: usize,
        block: &EncoderBlock,
        hidden: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match &block.block {
            Block::Embeddings(embeddings) => {
                embeddings.forward(&state.input_ids, &state.token_type_ids)
            }
            Block::Layer(layer) => layer.forward(previous_output(hidden)?, &state.mask),
        }
    }
}

/// Sentence embeddings `(batch, hidden)`: the mean of each sequence's hidden states over
/// its tokens (`attention_mask` 1), as sentence-transformers pools MiniLM and its kin.
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError> {
    super::SentencePooling::default().embed(hidden, attention_mask)
}
