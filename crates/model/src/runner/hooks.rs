//! Code that runs around every stage: the spec's "hooks that load each layer just before it
//! runs and free it after", open to users.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::Tensor;

use super::HookError;
use crate::checkpoint::MappedTensor;

/// One stage's weights, as a hook sees them before the stage runs.
#[derive(Debug)]
pub struct LayerWeights {
    pub(super) name: String,
    pub(super) index: usize,
    pub(super) tensors: HashMap<String, Tensor>,
    /// Matrices computed on in their mapped files; empty whenever hooks run (they see
    /// every tensor in `tensors`).
    pub(super) mapped: HashMap<String, Arc<MappedTensor>>,
    pub(super) replaced: bool,
    pub(super) persist: bool,
}

impl LayerWeights {
    /// The stage's name, e.g. `model.layers.3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stage's position in the forward pass.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The tensors by Hugging Face name.
    pub fn tensors(&self) -> &HashMap<String, Tensor> {
        &self.tensors
    }

    /// Replaces a tensor (same name; the block checks its shape when it is built). A name
    /// the stage does not read is an error naming it.
    pub fn replace(&mut self, name: &str, tensor: Tensor) -> Result<(), HookError> {
        match self.tensors.get_mut(name) {
            Some(slot) => {
                *slot = tensor;
                self.replaced = true;
                Ok(())
            }
            None => Err(format!("stage {} reads no tensor {name}", self.name).into()),
        }
    }

    /// Whether a hook replaced any tensor.
    pub fn is_replaced(&self) -> bool {
        self.replaced
    }

    /// Asks the runner to write this stage, as replaced, to the workspace, so later runs
    /// read it from there instead of recomputing the replacement.
    pub fn persist(&mut self) {
        self.persist = true;
    }
}

/// Code that runs before and after every stage. Both methods default to doing nothing; an
/// error either returns reaches the caller as [`super::RunError::Hook`], with the hook's
/// [`LayerHook::name`] and the stage.
///
/// ```
/// use memwise_model::{HookError, LayerHook, LayerWeights};
///
/// /// Counts the parameters each layer reads, and refuses empty ones.
/// struct CountParameters;
///
/// impl LayerHook for CountParameters {
///     fn name(&self) -> &str {
///         "count-parameters"
///     }
///
///     fn before_layer(&self, layer: &mut LayerWeights) -> Result<(), HookError> {
///         let count: usize = layer.tensors().values().map(|t| t.elem_count()).sum();
///         if count == 0 {
///             return Err("no parameters".into());
///         }
///         println!("{}: {count} parameters", layer.name());
///         Ok(())
///     }
/// }
/// ```
pub trait LayerHook: Send + Sync {
    /// The hook's name, used in errors; the type's name by default.
    fn name(&self) -> &str {
        std::any::type_name::<Self>()
    }

    /// Sees (and may replace) a stage's weights before its block is built.
    fn before_layer(&self, layer: &mut LayerWeights) -> Result<(), HookError> {
        let _ = layer;
        Ok(())
    }

    /// Runs after the stage named `name` ran.
    fn after_layer(&self, name: &str, index: usize) -> Result<(), HookError> {
        let _ = (name, index);
        Ok(())
    }
}
