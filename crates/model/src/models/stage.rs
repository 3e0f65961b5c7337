//! Stages: one step of a forward pass and the tensors it reads, traced from the block's own
//! load code.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::ModelError;

/// One step of a model's forward pass, and the tensors it reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Stage {
    name: String,
    tensors: Vec<TensorSpec>,
}

impl Stage {
    /// The stage's name, e.g. `model.layers.3`: the Hugging Face prefix of its tensors, but
    /// for a tied `lm_head`, which reads `model.embed_tokens.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensors this stage reads, in the order its `load` asks for them, with the shapes
    /// it expects. A stage may read a tensor another stage reads too (tied embeddings).
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// The Hugging Face names of [`Stage::tensors`].
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// Bytes this stage's weights take in `dtype`.
    pub fn weight_bytes(&self, dtype: DType) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.element_count() as u64 * dtype.size_in_bytes() as u64)
            .sum()
    }

    /// Traces `load` against a backend that records every tensor it asks for.
    pub(super) fn trace<T>(
        name: String,
        dtype: DType,
        load: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
    ) -> Result<Self, ModelError> {
        let recorder = TensorRecorder::default();
        let seen = Arc::clone(&recorder.seen);
        let vb = VarBuilder::from_backend(Box::new(recorder), dtype, Device::Cpu);
        load(vb).map_err(ModelError::stage(&name))?;
        let tensors = std::mem::take(&mut *seen.lock().unwrap_or_else(PoisonError::into_inner));
        Ok(Self { name, tensors })
    }
}

/// A tensor's Hugging Face name and the shape the blocks expect it to have.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    /// The full name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// How many elements the tensor has.
    pub fn element_count(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A candle backend that hands out weightless tensors and notes what was asked for.
///
/// The tensors it returns are one zero broadcast to the requested shape, so tracing a
/// 2 GB layer allocates nothing; `load` functions only store tensors, never compute.
#[derive(Default)]
struct TensorRecorder {
    seen: Arc<Mutex<Vec<TensorSpec>>>,
}

impl SimpleBackend for TensorRecorder {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(TensorSpec {
                name: name.to_owned(),
                shape: shape.dims().to_vec(),
            });
        Tensor::zeros((), dtype, device)?.broadcast_as(shape)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("tensor {name} was requested without a shape, so it cannot be traced")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Where a forward pass stands: the stage due next and the activations it hands on.
///
/// Every family's [`super::Pass`] keeps one, so the order rules (each stage once, in order,
/// output only after the last) are written once.
pub(super) struct StageCursor {
    next: usize,
    stage_count: usize,
    hidden: Option<Tensor>,
}

impl StageCursor {
    pub(super) fn new(stage_count: usize) -> Self {
        Self {
            next: 0,
            stage_count,
            hidden: None,
        }
    }

    /// Refuses any stage but the one due.
    pub(super) fn check(&self, index: usize) -> Result<(), ModelError> {
        if index != self.next {
            return Err(ModelError::StageOrder {
                expected: self.next,
                got: index,
                stage_count: self.stage_count,
            });
        }
        Ok(())
    }

    /// The stage due next.
    pub(super) fn next(&self) -> usize {
        self.next
    }

    /// The previous stage's output; `None` before the first stage.
    pub(super) fn hidden(&self) -> Option<&Tensor> {
        self.hidden.as_ref()
    }

    /// Records stage `next`'s output; true when it was the last stage.
    pub(super) fn advance(&mut self, hidden: Tensor) -> bool {
        self.hidden = Some(hidden);
        self.next += 1;
        self.next == self.stage_count
    }

    /// The last stage's output, or an error naming the stage still due.
    pub(super) fn finish(self) -> Result<Tensor, ModelError> {
        match self.hidden {
            Some(hidden) if self.next == self.stage_count => Ok(hidden),
            _ => Err(ModelError::StageOrder {
                expected: self.next,
                got: self.stage_count,
                stage_count: self.stage_count,
            }),
        }
    }
}

/// The stage at `index` of a model computing in `dtype`, once `weights` is known to yield
/// that dtype: candle would otherwise fail deep inside the stage on mixed dtypes.
pub(super) fn stage_for<'s>(
    stages: &'s [Stage],
    index: usize,
    weights: &VarBuilder,
    dtype: DType,
) -> Result<&'s Stage, ModelError> {
    let stage = stage_at(stages, index)?;
    if weights.dtype() != dtype {
        return Err(ModelError::Input(format!(
            "stage `{}`: the weights builder yields {:?} but the model computes in {dtype:?}",
            stage.name(),
            weights.dtype()
        )));
    }
    Ok(stage)
}

/// The stage at `index`, or an error saying how many there are.
pub(super) fn stage_at(stages: &[Stage], index: usize) -> Result<&Stage, ModelError> {
    stages.get(index).ok_or(ModelError::NoSuchStage {
        index,
        stage_count: stages.len(),
    })
}

/// The previous stage's output, which every stage but the first reads.
pub(super) fn previous_output(hidden: Option<&Tensor>) -> candle_core::Result<&Tensor> {
    hidden.ok_or_else(|| candle_core::Error::Msg("the first stage has no previous output".into()))
}
