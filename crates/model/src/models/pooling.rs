//! Sentence embeddings as sentence-transformers makes them: its `modules.json` pipeline of a
//! Transformer, a Pooling module (mean, CLS, max, mean/√len or last token, as that module's
//! `config.json` says) and an optional Normalize.

use std::path::Path;

use candle_core::{DType, Tensor, D};
use serde::Deserialize;

use super::ModelError;

/// One way the Pooling module reduces token states (`pooling_mode` in its config, or the
/// `pooling_mode_*` flags of older files).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolingMode {
    /// `cls`: the first real token's state.
    Cls,
    /// `max`: the elementwise max over real tokens.
    Max,
    /// `mean`: the mean over real tokens.
    Mean,
    /// `mean_sqrt_len_tokens`: the sum over real tokens divided by the root of their count.
    MeanSqrtLen,
    /// `weightedmean`: the mean weighted by position (1 for the first real token, 2 for the
    /// next, ...).
    WeightedMean,
    /// `lasttoken`: the last real token's state.
    LastToken,
}

impl PoolingMode {
    /// Every mode with its name, in the order the older flags concatenate them.
    const NAMED: [(&'static str, &'static str, PoolingMode); 6] = [
        ("cls", "pooling_mode_cls_token", PoolingMode::Cls),
        ("max", "pooling_mode_max_tokens", PoolingMode::Max),
        ("mean", "pooling_mode_mean_tokens", PoolingMode::Mean),
        (
            "mean_sqrt_len_tokens",
            "pooling_mode_mean_sqrt_len_tokens",
            PoolingMode::MeanSqrtLen,
        ),
        (
            "weightedmean",
            "pooling_mode_weightedmean_tokens",
            PoolingMode::WeightedMean,
        ),
        (
            "lasttoken",
            "pooling_mode_lasttoken",
            PoolingMode::LastToken,
        ),
    ];

    fn from_name(name: &str) -> Result<Self, ModelError> {
        Self::NAMED
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, mode)| *mode)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::NAMED.iter().map(|(n, _, _)| *n).collect();
                ModelError::unsupported(
                    "pooling_mode",
                    format!("`{name}` is not a pooling mode ({})", known.join(", ")),
                )
            })
    }
}

/// The pipeline after the transformer: pooling modes, then L2 normalization or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentencePooling {
    /// The modes, concatenated in this order.
    pub modes: Vec<PoolingMode>,
    /// Whether a Normalize module follows (unit L2 norm).
    pub normalize: bool,
}

impl Default for SentencePooling {
    /// Mean pooling without normalization: what memwise does for a folder without
    /// `modules.json`.
    fn default() -> Self {
        Self {
            modes: vec![PoolingMode::Mean],
            normalize: false,
        }
    }
}

#[derive(Deserialize)]
struct Module {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// `pooling_mode`: one name or a list.
#[derive(Deserialize)]
#[serde(untagged)]
enum ModeNames {
    One(String),
    Many(Vec<String>),
}

impl SentencePooling {
    /// The pipeline `folder/modules.json` describes, or `None` for a folder without one. A
    /// module memwise cannot run (a Dense layer, weighted-mean pooling) is an error naming
    /// it, never skipped: skipping it would return a different embedding without a word.
    pub fn from_folder(folder: &Path) -> Result<Option<Self>, ModelError> {
        let path = folder.join("modules.json");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ModelError::ConfigRead { path, source }),
        };
        let origin = path.display().to_string();
        let parse = |source| ModelError::ConfigParse {
            origin: origin.clone(),
            source,
        };
        let modules: Vec<Module> = serde_json::from_str(&text).map_err(parse)?;
        let mut pooling = None;
        let mut normalize = false;
        for module in &modules {
            match module.kind.rsplit('.').next().unwrap_or_default() {
                "Transformer" => {}
                "Pooling" => {
                    let path = folder.join(&module.path).join("config.json");
                    let text = std::fs::read_to_string(&path).map_err(|source| {
                        ModelError::ConfigRead {
                            path: path.clone(),
                            source,
                        }
                    })?;
                    let config: serde_json::Value =
                        serde_json::from_str(&text).map_err(|source| ModelError::ConfigParse {
                            origin: path.display().to_string(),
                            source,
                        })?;
                    pooling = Some(Self::modes(&config, &path)?);
                }
                "Normalize" => normalize = true,
                _ => {
                    return Err(ModelError::unsupported(
                        "modules.json",
                        format!(
                            "module `{}` is not implemented (Transformer, Pooling, Normalize)",
                            module.kind
                        ),
                    ))
                }
            }
        }
        let modes = pooling.ok_or_else(|| {
            ModelError::unsupported("modules.json", "no Pooling module to make one embedding")
        })?;
        Ok(Some(Self { modes, normalize }))
    }

    /// The modes a Pooling `config.json` turns on, concatenated in this order: the
    /// `pooling_mode` list as written, or the older flags in sentence-transformers' order.
    fn modes(config: &serde_json::Value, path: &Path) -> Result<Vec<PoolingMode>, ModelError> {
        if let Some(names) = config.get("pooling_mode") {
            let names =
                ModeNames::deserialize(names).map_err(|source| ModelError::ConfigParse {
                    origin: path.display().to_string(),
                    source,
                })?;
            return match names {
                ModeNames::One(name) => Ok(vec![PoolingMode::from_name(&name)?]),
                ModeNames::Many(names) => names.iter().map(|n| PoolingMode::from_name(n)).collect(),
            };
        }
        let on = |flag: &str| config.get(flag).and_then(serde_json::Value::as_bool) == Some(true);
        let modes: Vec<PoolingMode> = PoolingMode::NAMED
            .iter()
            .filter(|(_, flag, _)| on(flag))
            .map(|(_, _, mode)| *mode)
            .collect();
        // sentence-transformers means when no flag is on.
        Ok(if modes.is_empty() {
            vec![PoolingMode::Mean]
        } else {
            modes
        })
    }

    /// Sentence embeddings `(batch, width)` from the last hidden states `(batch, seq, hidden)`
    /// and the padding mask `(batch, seq)` (1 for tokens): padding is neither averaged,
    /// maxed nor taken as a first or last token.
    pub fn embed(&self, hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor, ModelError> {
        let pooled = || -> candle_core::Result<Tensor> {
            let mask = attention_mask.to_dtype(hidden.dtype())?;
            let expanded = mask.unsqueeze(D::Minus1)?;
            let summed = hidden.broadcast_mul(&expanded)?.sum(1)?;
            let counts = mask.sum_keepdim(1)?.clamp(1e-9, f64::INFINITY)?;
            let real: Vec<Vec<f32>> = mask.to_dtype(DType::F32)?.to_vec2()?;
            // One row per sequence, the state at `pick(row of its mask)`.
            let token_at = |pick: &dyn Fn(&[f32]) -> usize| -> candle_core::Result<Tensor> {
                let rows = real
                    .iter()
                    .enumerate()
                    .map(|(b, row)| hidden.get(b)?.get(pick(row)))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::stack(&rows, 0)
            };
            let mut parts = Vec::with_capacity(self.modes.len());
            for mode in &self.modes {
                parts.push(match mode {
                    PoolingMode::Cls => {
                        token_at(&|row| row.iter().position(|&m| m != 0.0).unwrap_or(0))?
                    }
                    PoolingMode::LastToken => token_at(&|row| {
                        row.iter().rposition(|&m| m != 0.0).unwrap_or(row.len() - 1)
                    })?,
                    PoolingMode::Mean => summed.broadcast_div(&counts)?,
                    PoolingMode::MeanSqrtLen => summed.broadcast_div(&counts.sqrt()?)?,
                    PoolingMode::Max => {
                        // Padding can never be the max: sentence-transformers fills it with -inf.
                        let real = expanded.broadcast_as(hidden.shape())?.ne(0.0)?;
                        let never =
                            Tensor::full(f32::NEG_INFINITY, hidden.shape(), hidden.device())?
                                .to_dtype(hidden.dtype())?;
                        real.where_cond(hidden, &never)?.max(1)?
                    }
                    PoolingMode::WeightedMean => {
                        let weights: Vec<f32> = real
                            .iter()
                            .flat_map(|row| {
                                let first = row.iter().position(|&m| m != 0.0).unwrap_or(0);
                                row.iter()
                                    .enumerate()
                                    .map(move |(j, &m)| m * (j + 1).saturating_sub(first) as f32)
                            })
                            .collect();
                        let weights = Tensor::from_vec(weights, mask.shape(), hidden.device())?
                            .to_dtype(hidden.dtype())?;
                        let total = weights.sum_keepdim(1)?.clamp(1e-9, f64::INFINITY)?;
                        hidden
                            .broadcast_mul(&weights.unsqueeze(D::Minus1)?)?
                            .sum(1)?
                            .broadcast_div(&total)?
                    }
                });
            }
            let embedding = Tensor::cat(&parts, D::Minus1)?;
            if !self.normalize {
                return Ok(embedding);
            }
            let norm = embedding
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-12, f64::INFINITY)?;
            embedding.broadcast_div(&norm)
        };
        pooled().map_err(ModelError::stage("pooling"))
    }
}
