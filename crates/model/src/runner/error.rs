//! Why a streamed run failed.

use crate::models::ModelError;

/// What a [`super::LayerHook`] returns when it refuses a stage: any error, which the runner
/// wraps with the hook's name and the stage ([`RunError::Hook`]).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Why a streamed run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Reading the checkpoint or writing the workspace failed, or a stage reads a tensor
    /// the checkpoint does not hold ([`crate::Error::NotFound`]).
    #[error(transparent)]
    Checkpoint(Box<crate::Error>),
    /// Building or running a block failed.
    #[error(transparent)]
    Model(Box<ModelError>),
    /// A tensor could not be turned into bytes for the workspace.
    #[error("tensor {tensor}: {source}")]
    Tensor {
        /// The Hugging Face name of the tensor.
        tensor: String,
        /// candle's error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// A layer hook refused a stage.
    #[error("hook {hook} on stage {stage}: {source}")]
    Hook {
        /// The hook's [`super::LayerHook::name`].
        hook: String,
        /// The stage it ran on.
        stage: String,
        /// What the hook returned.
        #[source]
        source: HookError,
    },
    /// The memwise configuration (environment or `MEMWISE_CONFIG` file) holds a bad value.
    #[error(transparent)]
    Config(Box<memwise::config::Error>),
    /// The configured or requested device cannot be used by this build or machine.
    #[error("device {requested}: {reason}")]
    Device {
        /// The device as configured (`cuda:0`, …).
        requested: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// The compute dtype asked for is not a float dtype blocks compute in.
    #[error("cannot compute in {0:?}; use f32, f16 or bf16")]
    ComputeDtype(candle_core::DType),
    /// No placement fits the budget: the plan's refusal, made before any weight is read
    /// ([`crate::plan::PlanError::OverBudget`] names the device, need, budget, deficit and
    /// the largest item).
    #[error(transparent)]
    Plan(Box<crate::plan::PlanError>),
    /// The prefetch thread could not be started.
    #[error("starting the prefetch thread: {0}")]
    Prefetch(#[source] std::io::Error),
    /// The prefetch thread ended before handing out a stage (it panicked).
    #[error("stage {stage} was not loaded: the prefetch thread stopped")]
    PrefetchStopped {
        /// The stage that was due.
        stage: String,
    },
    /// The call needs the other kind of model (`generate` on an encoder, `embed` on a
    /// decoder).
    #[error("{call} needs {needs} model, and this is {actual}")]
    WrongFamily {
        /// The method called.
        call: &'static str,
        /// `a decoder` or `an encoder`.
        needs: &'static str,
        /// What the model is.
        actual: &'static str,
    },
    /// `quantization_config` in `config.json` describes packing memwise cannot read.
    #[error("{key}: {reason}")]
    Quantization {
        /// The key at fault, e.g. `quantization_config.quant_method`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A packed weight (`qweight`, `qzeros`, `scales`) does not fit its scheme or block.
    #[error("packed weight {tensor}: {source}")]
    Packed {
        /// The weight the block reads, e.g. `model.layers.0.mlp.up_proj.weight`.
        tensor: String,
        /// What the unpacking said.
        #[source]
        source: Box<crate::quant::Error>,
    },
    /// `config.json` describes a tensor of another shape than the checkpoint stores (its
    /// sizes disagree with the weights). Found before any weight is read.
    #[error(
        "tensor {tensor}: config.json implies shape {expected:?}, the checkpoint stores \
         {stored:?}; the config's sizes (hidden_size, intermediate_size, heads, vocab_size) \
         do not match these weights"
    )]
    ShapeMismatch {
        /// The tensor.
        tensor: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape stored.
        stored: Vec<usize>,
    },
    /// A generation would pass the positions the model was trained for.
    #[error(
        "{prompt} prompt tokens + {new_tokens} new tokens pass the model's \
         max_position_embeddings of {limit}; ask for at most {} new tokens",
        limit.saturating_sub(*prompt)
    )]
    TooLong {
        /// Tokens in the prompt.
        prompt: usize,
        /// Tokens asked for.
        new_tokens: usize,
        /// `max_position_embeddings`.
        limit: usize,
    },
    /// A hook asked to persist a stage, but the converter has no workspace.
    #[error("a hook asked to persist stage {stage}, but no workspace is set")]
    NoWorkspace {
        /// The stage to persist.
        stage: String,
    },
}

impl From<crate::Error> for RunError {
    fn from(error: crate::Error) -> Self {
        // Boxed: checkpoint errors carry paths and names, and a large error would make
        // every `Result` of the forward pass large.
        RunError::Checkpoint(Box::new(error))
    }
}

impl From<crate::plan::PlanError> for RunError {
    fn from(error: crate::plan::PlanError) -> Self {
        RunError::Plan(Box::new(error))
    }
}

impl From<ModelError> for RunError {
    fn from(error: ModelError) -> Self {
        RunError::Model(Box::new(error))
    }
}
