//! The one trait every architecture family implements, and the pass and full load written
//! once on top of it.
//!
//! A family says how to build one stage's block from that stage's tensors, what a pass keeps
//! between stages (rotary tables, masks, the KV cache) and how a block turns the previous
//! stage's output into its own. The order rules (each stage once, in order, output only
//! after the last), the dtype check and the full load are [`Pass`] and [`Loaded`], shared
//! by every family; the streaming runner drives the same trait.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::stage::{stage_for, StageCursor};
use super::weights::Weights;
use super::{KvCache, ModelError, Stage};

/// What one forward pass reads: token ids and, where the family uses them, a padding mask,
/// token types and a KV cache.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use memwise_model::models::Inputs;
///
/// let ids = Tensor::new(&[[1u32, 5, 9]], &Device::Cpu)?;
/// let mask = Tensor::new(&[[1u32, 1, 0]], &Device::Cpu)?;
/// let inputs = Inputs::new(&ids).attention_mask(&mask);
/// assert!(inputs.attention_mask.is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct Inputs<'a> {
    /// Token ids `(batch, seq_len)`, `u32`.
    pub input_ids: &'a Tensor,
    /// `(batch, seq_len)`, 1 for real tokens and 0 for padding; all ones when absent.
    pub attention_mask: Option<&'a Tensor>,
    /// Encoders: segment ids `(batch, seq_len)`; all 0 when absent.
    pub token_type_ids: Option<&'a Tensor>,
    /// Decoders: the keys and values of earlier tokens, continued by this pass.
    pub cache: Option<&'a mut KvCache>,
    /// Decoders: compute the final norm and logits for the last position only.
    pub last_position_only: bool,
}

impl<'a> Inputs<'a> {
    /// Inputs of `input_ids` alone.
    pub fn new(input_ids: &'a Tensor) -> Self {
        Self {
            input_ids,
            attention_mask: None,
            token_type_ids: None,
            cache: None,
            last_position_only: false,
        }
    }

    /// Adds a padding mask.
    pub fn attention_mask(mut self, mask: &'a Tensor) -> Self {
        self.attention_mask = Some(mask);
        self
    }

    /// Adds token types (encoders).
    pub fn token_type_ids(mut self, ids: &'a Tensor) -> Self {
        self.token_type_ids = Some(ids);
        self
    }

    /// Continues `cache` (decoders).
    pub fn cache(mut self, cache: &'a mut KvCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Only the last position's logits, `(batch, 1, vocab)` (decoders): all generation
    /// reads, without logits that for a long prompt outweigh a whole layer.
    pub fn last_position_only(mut self) -> Self {
        self.last_position_only = true;
        self
    }

    /// Refuses any id at or above `limit` (the config's `key`) before a stage is read:
    /// candle would fail deep inside the embedding lookup instead.
    pub(crate) fn check_ids_below(&self, limit: usize, key: &str) -> Result<(), ModelError> {
        check_ids_below(self.input_ids, limit, "input_ids", key)
    }

    /// The padding mask as `real[b][k]` (true for a token), checked to be
    /// `(batch, len)`; `None` when absent or all ones (nothing is hidden).
    pub(crate) fn padding(
        &self,
        batch: usize,
        len: usize,
    ) -> Result<Option<Vec<Vec<bool>>>, ModelError> {
        let Some(mask) = self.attention_mask else {
            return Ok(None);
        };
        if mask.dims() != [batch, len] {
            return Err(ModelError::Input(format!(
                "attention_mask is {:?}; it must be (batch, cached + new tokens) = ({batch}, {len})",
                mask.dims()
            )));
        }
        let values = mask
            .to_dtype(DType::F32)
            .and_then(|m| m.to_vec2::<f32>())
            .map_err(|e| ModelError::Input(format!("attention_mask: {e}")))?;
        let real: Vec<Vec<bool>> = values
            .iter()
            .map(|row| row.iter().map(|&v| v != 0.0).collect())
            .collect();
        if let Some(b) = real.iter().position(|row| !row.contains(&true)) {
            return Err(ModelError::Input(format!(
                "attention_mask: sequence {b} has no token, only padding"
            )));
        }
        Ok(Some(real).filter(|real| real.iter().flatten().any(|&r| !r)))
    }

    /// The ids as `(batch, seq_len)`, checked to be non-empty `u32`.
    pub(crate) fn dims(&self) -> Result<(usize, usize), ModelError> {
        let ids = self.input_ids;
        let dims = ids
            .dims2()
            .map_err(|e| ModelError::Input(format!("input_ids must be (batch, seq_len): {e}")))?;
        if ids.dtype() != DType::U32 || dims.1 == 0 {
            return Err(ModelError::Input(format!(
                "input_ids must be non-empty u32, got {:?} {:?}",
                ids.dtype(),
                ids.shape()
            )));
        }
        Ok(dims)
    }
}

/// Refuses any value of `ids` (named `what`) at or above `limit` (the config's `key`).
pub(crate) fn check_ids_below(
    ids: &Tensor,
    limit: usize,
    what: &str,
    key: &str,
) -> Result<(), ModelError> {
    let largest = ids
        .flatten_all()
        .and_then(|ids| ids.max(0))
        .and_then(|max| max.to_dtype(DType::U32))
        .and_then(|max| max.to_scalar::<u32>())
        .map_err(|e| ModelError::Input(format!("{what}: {e}")))?;
    if largest as usize >= limit {
        return Err(ModelError::Input(format!(
            "{what} holds {largest}, but the model's {key} is {limit} (ids 0 to {})",
            limit.saturating_sub(1)
        )));
    }
    Ok(())
}

/// An architecture family: a skeleton built from `config.json` alone whose [`Stage`]s load
/// one at a time and run in order. Decoders ([`super::DecoderModel`]) and encoders
/// ([`super::EncoderModel`]) implement it; the runner streams any implementation.
pub trait Family: Clone + Send + Sync + 'static {
    /// One stage, loaded: its weights live as long as it does.
    type Block: Send + Sync + 'static;
    /// What a pass keeps from one stage to the next, besides the hidden states.
    type State<'a>;

    /// The stages in execution order.
    fn stages(&self) -> &[Stage];

    /// The dtype the model computes in.
    fn dtype(&self) -> DType;

    /// The device the model computes on.
    fn device(&self) -> &Device;

    /// Builds stage `index` from `weights`, at the checkpoint's root. Its requests are what
    /// [`Stage::tensors`] records, so this is the only list of a stage's tensors.
    fn build_block(&self, index: usize, weights: Weights) -> candle_core::Result<Self::Block>;

    /// The index of the stage `block` was built for.
    fn block_index(block: &Self::Block) -> usize;

    /// Checks `inputs` and prepares what every stage of the pass shares.
    fn begin<'a>(&'a self, inputs: Inputs<'a>) -> Result<Self::State<'a>, ModelError>;

    /// Runs stage `index`'s block on the previous stage's output (`None` for the first).
    fn run_block(
        &self,
        state: &mut Self::State<'_>,
        index: usize,
        block: &Self::Block,
        hidden: Option<&Tensor>,
    ) -> candle_core::Result<Tensor>;

    /// Called once the last stage has run (a decoder counts the cached tokens here).
    fn complete(&self, state: &mut Self::State<'_>) {
        let _ = state;
    }

    /// Builds stage `index` from `vb`, checking that `vb` yields the model's dtype and
    /// naming the stage in any error.
    fn load_stage(&self, index: usize, vb: VarBuilder) -> Result<Self::Block, ModelError> {
        self.load_stage_from(index, Weights::from(vb))
    }

    /// [`Family::load_stage`] from [`Weights`], which may compute on mapped tensors.
    fn load_stage_from(&self, index: usize, weights: Weights) -> Result<Self::Block, ModelError> {
        let stage = stage_for(self.stages(), index, weights.vb(), self.dtype())?;
        self.build_block(index, weights)
            .map_err(ModelError::stage(stage.name()))
    }

    /// Starts a forward pass over `inputs`, run a stage at a time.
    fn pass<'a>(&'a self, inputs: Inputs<'a>) -> Result<Pass<'a, Self>, ModelError> {
        Ok(Pass {
            model: self,
            state: self.begin(inputs)?,
            cursor: StageCursor::new(self.stages().len()),
        })
    }

    /// Loads every stage from `vb` (all the checkpoint's tensors) into a model that can run
    /// many passes.
    fn load(self, vb: VarBuilder) -> Result<Loaded<Self>, ModelError> {
        let blocks = (0..self.stages().len())
            .map(|index| self.load_stage(index, vb.clone()))
            .collect::<Result<_, _>>()?;
        Ok(Loaded {
            model: self,
            blocks,
        })
    }

    /// Loads the whole model from `vb` and runs one pass: the full-load path the streamed
    /// one is checked against.
    fn forward_full(&self, vb: VarBuilder, inputs: Inputs<'_>) -> Result<Tensor, ModelError> {
        self.clone().load(vb)?.forward(inputs)
    }

    /// Traces every stage's tensors from `build_block` (see [`Stage::tensors`]).
    #[doc(hidden)]
    fn trace_stages(&self, names: impl Iterator<Item = String>) -> Result<Vec<Stage>, ModelError> {
        names
            .enumerate()
            .map(|(index, name)| {
                Stage::trace(name, self.dtype(), |vb| self.build_block(index, vb.into()))
            })
            .collect()
    }
}

/// One forward pass of a [`Family`], run a stage at a time, in order.
pub struct Pass<'a, M: Family> {
    model: &'a M,
    state: M::State<'a>,
    cursor: StageCursor,
}

impl<M: Family> Pass<'_, M> {
    /// Index of the stage due next.
    pub fn next_stage(&self) -> usize {
        self.cursor.next()
    }

    /// Builds stage `index` from `weights` (which may hold only that stage's tensors), runs
    /// it, and drops its weights.
    pub fn run_stage(&mut self, index: usize, weights: VarBuilder) -> Result<(), ModelError> {
        self.cursor.check(index)?;
        let block = self.model.load_stage(index, weights)?;
        self.run_block(&block)
    }

    /// Runs a stage whose block is already loaded.
    pub fn run_block(&mut self, block: &M::Block) -> Result<(), ModelError> {
        let index = M::block_index(block);
        self.cursor.check(index)?;
        let stage = self.model.stages()[index].name();
        let previous = self.cursor.hidden();
        let hidden = self
            .model
            .run_block(&mut self.state, index, block, previous)
            .map_err(ModelError::stage(stage))?;
        if self.cursor.advance(hidden) {
            self.model.complete(&mut self.state);
        }
        Ok(())
    }

    /// The last stage's output, once every stage has run: logits `(batch, seq_len, vocab)`
    /// for decoders, the last hidden states `(batch, seq_len, hidden)` for encoders.
    pub fn finish(self) -> Result<Tensor, ModelError> {
        self.cursor.finish()
    }
}

/// A [`Family`] with every stage loaded.
#[derive(Debug, Clone)]
pub struct Loaded<M: Family> {
    model: M,
    blocks: Vec<M::Block>,
}

impl<M: Family> Loaded<M> {
    /// The skeleton.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// One forward pass over `inputs`.
    pub fn forward(&self, inputs: Inputs<'_>) -> Result<Tensor, ModelError> {
        let mut pass = self.model.pass(inputs)?;
        for block in &self.blocks {
            pass.run_block(block)?;
        }
        pass.finish()
    }
}
