//! The one error type of the model blocks.

use std::path::PathBuf;

/// Why a model could not be configured, built or run.
///
/// Every message names what it is about: the config file and key, the stage, or the
/// tensor (candle's own errors already carry the tensor path, and we add the stage).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A `config.json` could not be read.
    #[error("cannot read model config {path}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
    /// A `config.json` is not the JSON this architecture expects.
    #[error("invalid model config {origin}")]
    ConfigParse {
        /// The file, or `<json>` for a config that did not come from a file.
        origin: String,
        /// What serde said, with the key and line.
        #[source]
        source: serde_json::Error,
    },
    /// The config asks for something these blocks do not implement, or holds values that
    /// cannot describe a model (zero heads, a hidden size the heads do not divide).
    #[error("model config key `{key}`: {reason}")]
    UnsupportedConfig {
        /// The `config.json` key at fault.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Building or running one stage failed in candle: a tensor was missing, had the wrong
    /// shape, or an operation failed.
    #[error("stage `{stage}`")]
    Stage {
        /// The stage's name, e.g. `model.layers.3`.
        stage: String,
        /// candle's error, which names the tensor where it is about one.
        #[source]
        source: candle_core::Error,
    },
    /// The inputs of a forward pass are unusable (wrong rank, dtype or length).
    #[error("invalid model input: {0}")]
    Input(String),
    /// A stage index past the model's last stage.
    #[error("no stage {index}: the model has {stage_count} stages")]
    NoSuchStage {
        /// The index asked for.
        index: usize,
        /// How many stages the model has.
        stage_count: usize,
    },
    /// Stages were run out of order, or the output was asked for before the last stage ran.
    #[error("stage {got} run when stage {expected} was due ({stage_count} stages)")]
    StageOrder {
        /// The stage index that was due next.
        expected: usize,
        /// The stage index that was run.
        got: usize,
        /// How many stages the model has.
        stage_count: usize,
    },
}

impl ModelError {
    /// Wraps a candle error with the stage it happened in.
    pub(crate) fn stage(stage: &str) -> impl FnOnce(candle_core::Error) -> Self + '_ {
        move |source| Self::Stage {
            stage: stage.to_owned(),
            source,
        }
    }

    pub(crate) fn unsupported(key: &str, reason: impl Into<String>) -> Self {
        Self::UnsupportedConfig {
            key: key.to_owned(),
            reason: reason.into(),
        }
    }
}
