//! `config.json`, typed once: the architecture its `model_type` names, and the values whose
//! choices are closed (activations, RoPE kinds, end-of-sequence ids) as enums.
//!
//! A value memwise does not implement still parses (as `Other`), so the error names the
//! key and the value where the blocks are built, instead of a serde message without either.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    Architecture, BertConfig, DecoderModel, EncoderModel, Family, LlamaConfig, ModelError, Stage,
};

/// `hidden_act`: the MLP's activation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
#[non_exhaustive]
pub enum Activation {
    /// `silu` (also written `swish`).
    Silu,
    /// `gelu`: the exact, erf-based GELU.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`: the tanh approximation.
    GeluTanh(String),
    /// `relu`.
    Relu,
    /// Anything else, as written.
    Other(String),
}

impl From<String> for Activation {
    fn from(name: String) -> Self {
        match name.as_str() {
            "silu" | "swish" => Self::Silu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh(name),
            "relu" => Self::Relu,
            _ => Self::Other(name),
        }
    }
}

impl From<&str> for Activation {
    fn from(name: &str) -> Self {
        Self::from(name.to_owned())
    }
}

impl From<Activation> for String {
    fn from(activation: Activation) -> String {
        activation.to_string()
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Silu => "silu",
            Self::Gelu => "gelu",
            Self::Relu => "relu",
            Self::GeluTanh(name) | Self::Other(name) => name,
        })
    }
}

/// `rope_scaling.rope_type` (or its older key `type`): how RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
#[non_exhaustive]
pub enum RopeType {
    /// `default`: no scaling.
    Default,
    /// `linear`: every frequency divided by `factor`.
    Linear,
    /// `llama3`: long wavelengths scaled, short ones kept, a smooth blend between.
    Llama3,
    /// Anything else (`yarn`, `dynamic`, …), as written.
    Other(String),
}

impl From<String> for RopeType {
    fn from(name: String) -> Self {
        match name.as_str() {
            "default" => Self::Default,
            "linear" => Self::Linear,
            "llama3" => Self::Llama3,
            _ => Self::Other(name),
        }
    }
}

impl From<&str> for RopeType {
    fn from(name: &str) -> Self {
        Self::from(name.to_owned())
    }
}

impl From<RopeType> for String {
    fn from(kind: RopeType) -> String {
        kind.to_string()
    }
}

impl fmt::Display for RopeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Default => "default",
            Self::Linear => "linear",
            Self::Llama3 => "llama3",
            Self::Other(name) => name,
        })
    }
}

/// Token ids a config gives as one id or a list (`eos_token_id: 2` or `[128001, 128009]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "OneOrMany", into = "OneOrMany")]
pub struct TokenIds(pub Vec<u32>);

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl From<OneOrMany> for TokenIds {
    fn from(ids: OneOrMany) -> Self {
        match ids {
            OneOrMany::One(id) => TokenIds(vec![id]),
            OneOrMany::Many(ids) => TokenIds(ids),
        }
    }
}

impl From<TokenIds> for OneOrMany {
    fn from(ids: TokenIds) -> Self {
        match ids.0.as_slice() {
            [one] => OneOrMany::One(*one),
            _ => OneOrMany::Many(ids.0),
        }
    }
}

/// A `config.json` parsed for the architecture its `model_type` names, with every key the
/// blocks need typed. [`crate::Checkpoint::open`] parses it once; the runner and `inspect`
/// read the checkpoint's copy.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ArchitectureConfig {
    /// A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3 text).
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
        let origin = path.display().to_string();
        let value = serde_json::from_str(&text).map_err(|source| ModelError::ConfigParse {
            origin: origin.clone(),
            source,
        })?;
        Self::from_value(&value, &origin)
    }

    /// Parses the text of a `config.json`, choosing the architecture by its `model_type`.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let origin = "<json>";
        let value = serde_json::from_str(text).map_err(|source| ModelError::ConfigParse {
            origin: origin.to_owned(),
            source,
        })?;
        Self::from_value(&value, origin)
    }

    /// Types an already parsed `config.json`; `origin` names it in errors.
    pub fn from_value(value: &Value, origin: &str) -> Result<Self, ModelError> {
        let parse_error = |source| ModelError::ConfigParse {
            origin: origin.to_owned(),
            source,
        };
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| ModelError::unsupported("model_type", "missing"))?;
        match Architecture::from_model_type(model_type) {
            Some(Architecture::Bert) => Ok(Self::Encoder(
                BertConfig::deserialize(value).map_err(parse_error)?,
            )),
            Some(arch) => {
                let mut config = LlamaConfig::deserialize(value).map_err(parse_error)?;
                // Gemma 3 ties its head unless told otherwise; its published configs leave
                // the key out.
                if arch == Architecture::Gemma3Text && value.get("tie_word_embeddings").is_none() {
                    config.tie_word_embeddings = true;
                }
                Ok(Self::Decoder(Box::new(config)))
            }
            None => Err(ModelError::unsupported(
                "model_type",
                format!(
                    "`{model_type}` is not implemented; supported: {}",
                    Architecture::ALL.map(Architecture::model_type).join(", ")
                ),
            )),
        }
    }

    /// The stages of the model this config describes, as its blocks' load code traces them
    /// (computing in f32), for a checkpoint whose tensors are called `names` (an encoder's
    /// weights may carry a prefix such as `bert.`).
    pub fn stages<'n>(
        &self,
        names: impl IntoIterator<Item = &'n str>,
    ) -> Result<Vec<Stage>, ModelError> {
        let device = candle_core::Device::Cpu;
        Ok(match self {
            Self::Decoder(config) => DecoderModel::new(config, candle_core::DType::F32, &device)?
                .stages()
                .to_vec(),
            Self::Encoder(config) => {
                let mut model = EncoderModel::new(config, candle_core::DType::F32, &device)?;
                if let Some(prefix) = EncoderModel::detect_weight_prefix(names) {
                    model = model.with_weight_prefix(prefix)?;
                }
                model.stages().to_vec()
            }
        })
    }

    /// The architecture this config describes.
    pub fn architecture(&self) -> Result<Architecture, ModelError> {
        match self {
            Self::Decoder(config) => config.architecture(),
            Self::Encoder(_) => Ok(Architecture::Bert),
        }
    }

    /// The ids that end generation (`eos_token_id`); empty for encoders or when unset.
    pub fn eos_token_ids(&self) -> &[u32] {
        match self {
            Self::Decoder(config) => config.eos_token_id.as_ref().map_or(&[], |ids| &ids.0),
            Self::Encoder(_) => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_values_parse_to_enums_and_others_keep_their_name() {
        let parse = |v: &str| serde_json::from_str::<Activation>(v).unwrap();
        assert_eq!(parse("\"silu\""), Activation::Silu);
        assert_eq!(parse("\"gelu\""), Activation::Gelu);
        assert_eq!(parse("\"mish\""), Activation::Other("mish".into()));
        assert_eq!(parse("\"gelu_new\"").to_string(), "gelu_new");
        let kind: RopeType = serde_json::from_str("\"yarn\"").unwrap();
        assert_eq!(kind.to_string(), "yarn");
        assert_eq!(serde_json::from_str::<TokenIds>("2").unwrap().0, [2]);
        let many: TokenIds = serde_json::from_str("[128001, 128009]").unwrap();
        assert_eq!(many.0, [128001, 128009]);
        assert_eq!(serde_json::to_string(&many).unwrap(), "[128001,128009]");
        assert!(serde_json::from_str::<TokenIds>("\"x\"").is_err());
    }
}
