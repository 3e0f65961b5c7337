//! The decoder's building blocks: RoPE, masks, grouped-query attention, the gated MLP and
//! the pre-norm layer that holds them.

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::RmsNorm;
use memwise::kind::Kind;

use super::config::DecoderConfig;
use crate::models::weights::{Linear, Matrix, Weights};
use crate::models::Activation;

/// An RMSNorm of width `dim`; with Gemma's norms it scales by `1 + weight`.
pub(super) fn rms_norm(
    dim: usize,
    cfg: &DecoderConfig,
    vb: Weights,
) -> candle_core::Result<RmsNorm> {
    if cfg.gemma_norms {
        let weight = (vb.get(dim, "weight")? + 1.0)?;
        Ok(RmsNorm::new(weight, cfg.rms_norm_eps))
    } else {
        Ok(RmsNorm::new(vb.get(dim, "weight")?, cfg.rms_norm_eps))
    }
}

/// `cap * tanh(xs / cap)` (Gemma's soft capping), or `xs` when `cap` is `None`.
pub(super) fn soft_cap(xs: Tensor, cap: Option<f64>) -> candle_core::Result<Tensor> {
    match cap {
        Some(cap) => (xs / cap)?.tanh()? * cap,
        None => Ok(xs),
    }
}

/// Linear layers stored as one fused weight (`(sum of out_dims, in_dim)`, no bias), split
/// by rows in the order of `out_dims` as they load, as Phi-3 stores q/k/v and gate/up.
fn split_linear(
    in_dim: usize,
    out_dims: &[usize],
    vb: Weights,
) -> candle_core::Result<Vec<Linear>> {
    let fused = vb.get((out_dims.iter().sum::<usize>(), in_dim), "weight")?;
    let mut start = 0;
    out_dims
        .iter()
        .map(|&rows| {
            let part = fused.narrow(0, start, rows)?;
            start += rows;
            Ok(Linear::new(Matrix::InMemory(part), None))
        })
        .collect()
}

/// The cos and sin tables of the positions one pass covers, each `(seq_len, head_dim / 2)`,
/// or `(batch, seq_len, head_dim / 2)` when padding gives each sequence its own positions.
pub(super) struct RotaryTables {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryTables {
    /// Tables for each sequence's own positions, `positions[b][i]` for token `i` of
    /// sequence `b` (all rows of one length).
    pub(super) fn per_sequence(
        inverse_frequencies: &[f32],
        positions: &[Vec<usize>],
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let half = inverse_frequencies.len();
        let seq_len = positions.first().map_or(0, Vec::len);
        let angles: Vec<f32> = positions
            .iter()
            .flatten()
            .flat_map(|&p| inverse_frequencies.iter().map(move |f| p as f32 * f))
            .collect();
        let angles = Tensor::from_vec(angles, (positions.len(), seq_len, half), device)?;
        Ok(Self {
            cos: angles.cos()?.to_dtype(dtype)?,
            sin: angles.sin()?.to_dtype(dtype)?,
        })
    }

    pub(super) fn new(
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

/// Additive attention mask `(batch, 1, seq_len, offset + seq_len)` for padded sequences:
/// `real[b][k]` says whether key `k` of sequence `b` is a token or padding. A token sees
/// the earlier tokens of its own sequence (within `window`), never padding; a padding
/// position sees only itself, so its row stays finite and nothing else reads it.
pub(super) fn padded_attention_mask(
    seq_len: usize,
    offset: usize,
    window: Option<usize>,
    real: &[Vec<bool>],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let total = offset + seq_len;
    let visible = |query: usize, key: usize| key <= query && window.is_none_or(|w| query - key < w);
    let mask: Vec<f32> = real
        .iter()
        .flat_map(|row| {
            (0..seq_len).flat_map(move |i| {
                let query = offset + i;
                (0..total).map(move |key| {
                    let seen = if row[query] {
                        row[key] && visible(query, key)
                    } else {
                        key == query
                    };
                    if seen {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
        })
        .collect();
    Tensor::from_vec(mask, (real.len(), 1, seq_len, total), device)
}

/// Additive attention mask `(seq_len, offset + seq_len)`: 0 where a query may look, -inf
/// elsewhere. `None` when nothing is hidden (a single new token inside its window).
pub(super) fn attention_mask(
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
    /// Qwen3: RMSNorm over each query and key head, before RoPE.
    qk_norm: Option<(RmsNorm, RmsNorm)>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn load(vb: Weights, cfg: &DecoderConfig) -> candle_core::Result<Self> {
        let (hidden, dim) = (cfg.hidden_size, cfg.head_dim);
        let (q_out, kv_out) = (cfg.num_heads * dim, cfg.num_kv_heads * dim);
        let [q_proj, k_proj, v_proj] = if cfg.fused_projections {
            let parts = split_linear(hidden, &[q_out, kv_out, kv_out], vb.pp("qkv_proj"))?;
            parts.try_into().expect("three parts")
        } else {
            let proj = |out, name| vb.pp(name).linear(hidden, out, cfg.qkv_bias);
            [
                proj(q_out, "q_proj")?,
                proj(kv_out, "k_proj")?,
                proj(kv_out, "v_proj")?,
            ]
        };
        Ok(Self {
            q_proj,
            k_proj,
            v_proj,
            o_proj: vb
                .pp("o_proj")
                .linear(cfg.num_heads * dim, hidden, cfg.o_bias)?,
            qk_norm: if cfg.qk_norm {
                let norm = |name| rms_norm(dim, cfg, vb.pp(name));
                Some((norm("q_norm")?, norm("k_norm")?))
            } else {
                None
            },
            num_heads: cfg.num_heads,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: dim,
            scale: cfg.attention_scale,
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
        let (q, k) = match &self.qk_norm {
            Some((q_norm, k_norm)) => (q_norm.forward(&q)?, k_norm.forward(&k)?),
            None => (q, k),
        };
        let q = candle_nn::rotary_emb::rope(&q, &rotary.cos, &rotary.sin)?;
        let k = candle_nn::rotary_emb::rope(&k, &rotary.cos, &rotary.sin)?;
        let (k, v) = match cache {
            None => (k, v),
            Some(slot) => {
                let (k, v) = match slot.take() {
                    None => {
                        // This pass's keys and values, made as activations, stay as the cache.
                        let bytes = (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes();
                        memwise::kind::adopt(Kind::KvCache, bytes as u64);
                        (k, v)
                    }
                    Some((past_k, past_v)) => {
                        // The grown cache is allocated, and the old one freed, as the cache.
                        let _cache = memwise::kind::enter(Kind::KvCache);
                        let grown = (
                            Tensor::cat(&[&past_k, &k], 2)?,
                            Tensor::cat(&[&past_v, &v], 2)?,
                        );
                        drop((past_k, past_v));
                        grown
                    }
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
        let scores = (q.matmul(&k.t()?)? * self.scale)?.to_dtype(DType::F32)?;
        // The unmasked scores are moved in and dropped here: a shadowed binding would keep a
        // third `heads × seq × seq` tensor alive through the softmax (32 MiB at 512 tokens).
        let scores = match (scores, mask) {
            (scores, Some(mask)) => scores.broadcast_add(mask)?,
            (scores, None) => scores,
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

/// `down(act(gate(x)) * up(x))`, `act` silu or gelu.
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    fn load(vb: Weights, cfg: &DecoderConfig) -> candle_core::Result<Self> {
        let (hidden, inner, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let [gate_proj, up_proj] = if cfg.fused_projections {
            let parts = split_linear(hidden, &[inner, inner], vb.pp("gate_up_proj"))?;
            parts.try_into().expect("two parts")
        } else {
            [
                vb.pp("gate_proj").linear(hidden, inner, bias)?,
                vb.pp("up_proj").linear(hidden, inner, bias)?,
            ]
        };
        Ok(Self {
            activation: cfg.activation.clone(),
            gate_proj,
            up_proj,
            down_proj: vb.pp("down_proj").linear(inner, hidden, bias)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.gate_proj.forward(xs)?;
        let gate = match self.activation {
            Activation::Gelu => gate.gelu_erf()?,
            Activation::GeluTanh(_) => gate.gelu()?,
            _ => gate.silu()?,
        };
        self.down_proj.forward(&(gate * self.up_proj.forward(xs)?)?)
    }
}

/// Pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`; with Gemma's
/// norms the attention and MLP outputs are normed too before they are added.
#[derive(Debug, Clone)]
pub(super) struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    /// Gemma: `pre_feedforward_layernorm` and `post_feedforward_layernorm`.
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    mlp: Mlp,
}

impl DecoderLayer {
    pub(super) fn load(vb: Weights, cfg: &DecoderConfig) -> candle_core::Result<Self> {
        let norm = |name| rms_norm(cfg.hidden_size, cfg, vb.pp(name));
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            feedforward_norms: if cfg.gemma_norms {
                Some((
                    norm("pre_feedforward_layernorm")?,
                    norm("post_feedforward_layernorm")?,
                ))
            } else {
                None
            },
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
        })
    }

    pub(super) fn forward(
        &self,
        xs: &Tensor,
        rotary: &RotaryTables,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> candle_core::Result<Tensor> {
        let attended =
            self.self_attn
                .forward(&self.input_layernorm.forward(xs)?, rotary, mask, cache)?;
        match &self.feedforward_norms {
            None => {
                let xs = (xs + attended)?;
                let mlp = self
                    .mlp
                    .forward(&self.post_attention_layernorm.forward(&xs)?)?;
                xs + mlp
            }
            Some((pre, post)) => {
                let xs = (xs + self.post_attention_layernorm.forward(&attended)?)?;
                let mlp = post.forward(&self.mlp.forward(&pre.forward(&xs)?)?)?;
                xs + mlp
            }
        }
    }
}
