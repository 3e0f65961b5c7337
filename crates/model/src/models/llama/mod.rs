//! Llama-family decoders: Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma 3 text.
//!
//! Grouped-query attention with rotary position embeddings (`rope_theta`, and the `linear`
//! and `llama3` kinds of `rope_scaling`), RMSNorm, a SiLU-gated MLP, and tied or untied
//! embeddings. Qwen2 differs only by biases on q/k/v, Qwen3 by an RMSNorm over each query
//! and key head before RoPE, Phi-3 by fused `qkv_proj` and `gate_up_proj` weights (split
//! as they load), Gemma 3 by `(1 + weight)` norms also after attention and around the MLP,
//! q/k norms, embeddings scaled by `sqrt(hidden_size)`, a gelu MLP, `query_pre_attn_scalar`,
//! optional final logit soft capping, and sliding layers with their own RoPE base; Mistral (and Phi-3) (and Qwen2 when it asks for
//! it) by a sliding attention window. The stages run in the order of
//! [`DecoderModel::layer_names`]: `model.embed_tokens`, `model.layers.0` …
//! `model.layers.{N-1}`, `model.norm`, `lm_head`.

mod config;
mod layers;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::RmsNorm;

pub use config::{DecoderExtras, LlamaConfig, RopeScaling};

use self::config::DecoderConfig;
use self::layers::{
    attention_mask, padded_attention_mask, rms_norm, soft_cap, DecoderLayer, RotaryTables,
};
use super::stage::previous_output;
use super::weights::{Embedding, Linear, Weights};
use super::{Family, Inputs, ModelError, Stage};

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
/// Built by [`Family::load_stage`]; dropping it releases the stage's weights.
#[derive(Debug, Clone)]
pub struct DecoderBlock {
    index: usize,
    block: Block,
}

/// A Llama-family decoder as a skeleton: its config and stages, no weights.
///
/// Build it from the config alone, list its stages, then either run it stage by stage from
/// each stage's own tensors ([`Family::pass`], [`super::Pass::run_stage`]) or load it whole
/// ([`Family::load`], [`Family::forward_full`]). Both paths run the same code on the same
/// tensors, so their outputs are bitwise equal.
///
/// ```
/// use candle_core::{DType, Device};
/// use memwise_model::models::{DecoderModel, Family, LlamaConfig};
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
        let mut model = Self {
            cfg: DecoderConfig::resolve(config)?,
            stages: Vec::new(),
            dtype,
            device: device.clone(),
        };
        let layers = model.num_layers();
        let names = (0..layers + 3).map(|index| match index {
            0 => "model.embed_tokens".to_owned(),
            i if i <= layers => format!("model.layers.{}", i - 1),
            i if i == layers + 1 => "model.norm".to_owned(),
            _ => "lm_head".to_owned(),
        });
        model.stages = model.trace_stages(names)?;
        Ok(model)
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

    /// Positions the model was trained for (`max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
}

/// What a decoder pass carries from one stage to the next: the ids, the rotary tables and
/// masks of the positions it covers, and the cache it continues.
pub struct DecoderState<'a> {
    input_ids: Tensor,
    rotary: RotaryTables,
    /// Gemma 3: the sliding layers' own tables.
    local_rotary: Option<RotaryTables>,
    /// One mask for each distinct window, shared by the layers that use it.
    masks: Vec<(Option<usize>, Option<Tensor>)>,
    cache: Option<&'a mut KvCache>,
    new_tokens: usize,
    last_position_only: bool,
    /// With padding: each sequence's last real position among the new tokens, which is
    /// where its next-token logits are.
    last_real: Option<Vec<usize>>,
}

impl Family for DecoderModel {
    type Block = DecoderBlock;
    type State<'a> = DecoderState<'a>;

    fn stages(&self) -> &[Stage] {
        &self.stages
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn build_block(&self, index: usize, vb: Weights) -> candle_core::Result<DecoderBlock> {
        let cfg = &self.cfg;
        let layers = self.num_layers();
        let embeddings = || {
            vb.pp("model.embed_tokens")
                .embedding(cfg.vocab_size, cfg.hidden_size)
        };
        let block = match index {
            0 => Block::Embeddings(embeddings()?),
            i if i <= layers => Block::Layer(
                i - 1,
                Box::new(DecoderLayer::load(
                    vb.pp(format!("model.layers.{}", i - 1)),
                    cfg,
                )?),
            ),
            i if i == layers + 1 => {
                Block::FinalNorm(rms_norm(cfg.hidden_size, cfg, vb.pp("model.norm"))?)
            }
            _ if cfg.tie_word_embeddings => Block::LmHead(embeddings()?.as_linear()),
            _ => Block::LmHead(
                vb.pp("lm_head")
                    .linear(cfg.hidden_size, cfg.vocab_size, false)?,
            ),
        };
        Ok(DecoderBlock { index, block })
    }

    fn block_index(block: &DecoderBlock) -> usize {
        block.index
    }

    /// A padding mask (`(batch, cached + new)`, 1 for tokens, 0 for padding, left or right)
    /// gives each sequence its own positions and hides the padding, so each sequence of a
    /// batch gets what it would alone.
    fn begin<'a>(&'a self, inputs: Inputs<'a>) -> Result<DecoderState<'a>, ModelError> {
        let (batch, seq_len) = inputs.dims()?;
        if inputs.token_type_ids.is_some() {
            return Err(ModelError::Input(
                "token_type_ids are not read by a decoder".into(),
            ));
        }
        inputs.check_ids_below(self.cfg.vocab_size, "vocab_size")?;
        let cached = inputs.cache.as_ref().map(|cache| cache.seq_len);
        let real = inputs.padding(batch, cached.unwrap_or(0) + seq_len)?;
        let cache = inputs.cache;
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
        let tables = |frequencies: &[f32]| match &real {
            None => RotaryTables::new(
                frequencies,
                offset..offset + seq_len,
                self.dtype,
                &self.device,
            ),
            Some(real) => {
                // Each token's position counts the real tokens before it, as transformers
                // derives positions from the mask; padding takes position 0.
                let positions: Vec<Vec<usize>> = real
                    .iter()
                    .map(|row| {
                        let mut seen = 0usize;
                        let all: Vec<usize> = row
                            .iter()
                            .map(|&is_real| {
                                seen += usize::from(is_real);
                                seen.saturating_sub(1)
                            })
                            .collect();
                        all[offset..].to_vec()
                    })
                    .collect();
                RotaryTables::per_sequence(frequencies, &positions, self.dtype, &self.device)
            }
        };
        let rotary = tables(&self.cfg.inverse_frequencies).map_err(setup)?;
        let local_rotary = self
            .cfg
            .local_inverse_frequencies
            .as_deref()
            .map(tables)
            .transpose()
            .map_err(setup)?;
        let mut masks: Vec<(Option<usize>, Option<Tensor>)> = Vec::new();
        for &window in &self.cfg.sliding_windows {
            if masks.iter().all(|(w, _)| *w != window) {
                let mask = match &real {
                    None => attention_mask(seq_len, offset, window, &self.device),
                    Some(real) => {
                        padded_attention_mask(seq_len, offset, window, real, &self.device).map(Some)
                    }
                }
                .map_err(setup)?;
                masks.push((window, mask));
            }
        }
        let last_real = real.as_ref().map(|real| {
            real.iter()
                .map(|row| {
                    (offset..offset + seq_len)
                        .rev()
                        .find(|&i| row[i])
                        .map_or(seq_len - 1, |i| i - offset)
                })
                .collect()
        });
        Ok(DecoderState {
            input_ids: inputs.input_ids.to_device(&self.device).map_err(setup)?,
            rotary,
            local_rotary,
            masks,
            cache,
            new_tokens: seq_len,
            last_position_only: inputs.last_position_only,
            last_real,
        })
    }

    fn run_block(
        &self,
        state: &mut DecoderState<'_>,
        _index: usize,
        block: &DecoderBlock,
        hidden: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        match &block.block {
            Block::Embeddings(embeddings) => {
                let embedded = embeddings.forward(&state.input_ids)?;
                match self.cfg.embed_scale {
                    Some(scale) => embedded * scale,
                    None => Ok(embedded),
                }
            }
            Block::Layer(layer_index, layer) => {
                let window = self.cfg.sliding_windows[*layer_index];
                let mask = state
                    .masks
                    .iter()
                    .find(|(w, _)| *w == window)
                    .and_then(|(_, mask)| mask.as_ref());
                let cache = state
                    .cache
                    .as_deref_mut()
                    .map(|cache| &mut cache.layers[*layer_index]);
                let rotary = match &state.local_rotary {
                    Some(local) if window.is_some() => local,
                    _ => &state.rotary,
                };
                layer.forward(previous_output(hidden)?, rotary, mask, cache)
            }
            Block::FinalNorm(norm) => {
                let hidden = previous_output(hidden)?;
                if !state.last_position_only {
                    return norm.forward(hidden);
                }
                let last = match &state.last_real {
                    // Right padding: each sequence's last token is at its own place.
                    Some(last_real) => {
                        let rows = last_real
                            .iter()
                            .enumerate()
                            .map(|(b, &i)| hidden.narrow(0, b, 1)?.narrow(1, i, 1))
                            .collect::<candle_core::Result<Vec<_>>>()?;
                        Tensor::cat(&rows, 0)?
                    }
                    None => hidden.narrow(1, hidden.dim(1)? - 1, 1)?,
                };
                norm.forward(&last.contiguous()?)
            }
            Block::LmHead(head) => soft_cap(
                head.forward(previous_output(hidden)?)?,
                self.cfg.final_logit_softcapping,
            ),
        }
    }

    fn complete(&self, state: &mut DecoderState<'_>) {
        // Every layer has appended its keys and values: count the tokens they cover.
        if let Some(cache) = state.cache.as_deref_mut() {
            cache.seq_len += state.new_tokens;
        }
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
        let _cache = memwise::kind::enter(memwise::kind::Kind::KvCache);
        self.layers.iter_mut().for_each(|layer| *layer = None);
        self.seq_len = 0;
    }
}

impl Drop for KvCache {
    /// The cached keys and values leave the heap's KV cache share (see [`memwise::kind`]).
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
impl KvCache {
    /// Counts `tokens` as cached, standing in for a pass in tests of the generation loop.
    pub(crate) fn advance_for_test(&mut self, tokens: usize) {
        self.seq_len += tokens;
    }
}
