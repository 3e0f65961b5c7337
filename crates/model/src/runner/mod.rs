//! `ModelConverter`: the spec's layer-by-layer model, streamed through a memory budget.
//!
//! `ModelConverter::new(path).load_model_with_hooks(clean_weights)` builds a model's
//! skeleton from `config.json` and the checkpoint index without reading a weight. Its
//! forward pass then, for every stage in order (embeddings, each layer, norm, head):
//!
//! 1. takes the stage's tensors from a [`crate::LayerStream`], which reads the next stage on
//!    a background thread while this one runs (`memory.prefetch_depth` stages ahead);
//!    weights computed on in their mapped files are read into the page cache by a thread
//!    of their own, as far ahead as half the available memory allows ([`read_ahead`]);
//! 2. lets every [`LayerHook`] see and replace them, and persists replaced stages to the
//!    workspace when a hook asks;
//! 3. builds the block and runs it inside a [`memwise::MemoryTracker`] scope named after
//!    the stage, so [`memwise::get_memory_stats`] holds per-stage peaks with no extra code;
//! 4. drops the block's weights (a streamed stage) or keeps it resident for the next pass (a
//!    stage the [`crate::plan::Plan`] keeps resident).
//!
//! The loop is written once ([`streaming`]) for any [`Family`]; decoders and encoders
//! differ only in the skeleton they bring.

mod converter;
mod error;
mod hooks;
mod packed;
mod read_ahead;
mod streaming;

use candle_core::Tensor;

pub use self::converter::ModelConverter;
pub use self::error::{HookError, RunError};
pub use self::hooks::{LayerHook, LayerWeights};

pub(crate) use self::packed::packed_module;
use self::streaming::Pipeline;
use crate::checkpoint::Checkpoint;
use crate::models::{
    generate, DecoderModel, EncoderModel, Family, GenerateOptions, Generation, Inputs,
    SentencePooling, Stage,
};

/// A skeleton and the blocks kept resident between passes (when weights are not cleaned),
/// one slot per stage.
struct Resident<F: Family> {
    model: F,
    blocks: Vec<Option<F::Block>>,
}

impl<F: Family> Resident<F> {
    fn new(model: F) -> Self {
        let blocks = (0..model.stages().len()).map(|_| None).collect();
        Self { model, blocks }
    }
}

/// The model's skeleton: which family, and its resident blocks.
enum Skeleton {
    Decoder(Resident<DecoderModel>),
    Encoder(Resident<EncoderModel>),
}

impl Skeleton {
    fn stages(&self) -> &[Stage] {
        match self {
            Skeleton::Decoder(r) => r.model.stages(),
            Skeleton::Encoder(r) => r.model.stages(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Skeleton::Decoder(_) => "a decoder",
            Skeleton::Encoder(_) => "an encoder",
        }
    }
}

/// A model whose forward pass loads each stage just before it runs (see [`ModelConverter`]).
pub struct StreamedModel {
    pipeline: Pipeline,
    skeleton: Skeleton,
    /// `eos_token_id` of the config: where generation stops.
    eos_token_ids: Vec<u32>,
    /// How [`StreamedModel::embed`] pools: the folder's sentence-transformers modules, or mean.
    pooling: SentencePooling,
    /// The plan made when the model loaded.
    plan: crate::plan::Plan,
}

impl StreamedModel {
    /// The stages in execution order.
    pub fn stages(&self) -> &[Stage] {
        self.skeleton.stages()
    }

    /// Whether this is a decoder (generates tokens) rather than an encoder.
    pub fn is_decoder(&self) -> bool {
        matches!(self.skeleton, Skeleton::Decoder(_))
    }

    /// The tokens that end generation (`eos_token_id` in `config.json`; empty for
    /// encoders or when unset).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// Decoders: the positions the model was trained for (`max_position_embeddings`).
    pub fn max_positions(&self) -> Option<usize> {
        match &self.skeleton {
            Skeleton::Decoder(r) => Some(r.model.max_positions()),
            Skeleton::Encoder(_) => None,
        }
    }

    /// The plan made before any weight was read: the predicted peak and each stage's
    /// residency.
    pub fn plan(&self) -> &crate::plan::Plan {
        &self.plan
    }

    /// The checkpoint the weights come from.
    pub fn checkpoint(&self) -> &Checkpoint {
        self.pipeline.checkpoint()
    }

    /// Decoders: the logits `(batch, seq_len, vocab)` of `input_ids` (`u32`).
    /// Encoders: the last hidden state, with every token attended and of type 0.
    pub fn forward(&mut self, input_ids: &Tensor) -> Result<Tensor, RunError> {
        self.run(Inputs::new(input_ids))
    }

    /// One streamed pass over `inputs` (ids, and where the family reads them a padding
    /// mask, token types or a KV cache): logits for decoders, the last hidden state for
    /// encoders.
    pub fn run(&mut self, inputs: Inputs<'_>) -> Result<Tensor, RunError> {
        match &mut self.skeleton {
            Skeleton::Decoder(r) => self.pipeline.run(&r.model, &mut r.blocks, inputs),
            Skeleton::Encoder(r) => self.pipeline.run(&r.model, &mut r.blocks, inputs),
        }
    }

    /// Encoders: the last hidden state `(batch, seq_len, hidden)` for `input_ids`
    /// (`(batch, seq_len)`, `u32`), with optional token types (default 0) and attention mask
    /// (1 for real tokens, 0 for padding; default all 1).
    pub fn encode(
        &mut self,
        input_ids: &Tensor,
        token_type_ids: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor, RunError> {
        self.expect_encoder("encode")?;
        let mut inputs = Inputs::new(input_ids);
        inputs.token_type_ids = token_type_ids;
        inputs.attention_mask = attention_mask;
        self.run(inputs)
    }

    /// Encoders: sentence embeddings `(batch, width)`, pooled over real tokens as the
    /// folder's sentence-transformers `modules.json` says (pooling modes, normalization),
    /// or by the mean where it has none; see [`StreamedModel::pooling`].
    pub fn embed(
        &mut self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor, RunError> {
        let hidden = self.encode(input_ids, Some(token_type_ids), Some(attention_mask))?;
        Ok(self.pooling.embed(&hidden, attention_mask)?)
    }

    /// How [`StreamedModel::embed`] pools.
    pub fn pooling(&self) -> &SentencePooling {
        &self.pooling
    }

    /// Decoders: greedy decoding of up to `max_new_tokens` after `prompt`, stopping after
    /// any token of `eos` (pass [`StreamedModel::eos_token_ids`] for the model's own); see
    /// [`StreamedModel::generate_with`].
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: &[u32],
    ) -> Result<Generation, RunError> {
        let options = GenerateOptions::greedy(max_new_tokens, eos);
        self.generate_with(prompt, &options, &mut |_| {})
    }

    /// Decoders: generates after `prompt` as `options` says (greedy or a seeded draw),
    /// showing each token to `on_token` as it is chosen. Keys and values are cached, so each
    /// new token streams the model once over one position; the cache's bytes are reported
    /// in the result. A prompt and length that together pass the model's trained positions,
    /// or sampling settings out of range, are refused before anything runs.
    pub fn generate_with(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<Generation, RunError> {
        let Skeleton::Decoder(resident) = &mut self.skeleton else {
            return Err(self.wrong_family("generate", "a decoder"));
        };
        let limit = resident.model.max_positions();
        let max_new_tokens = options.max_new_tokens;
        if prompt.len().saturating_add(max_new_tokens) > limit {
            return Err(RunError::TooLong {
                prompt: prompt.len(),
                new_tokens: max_new_tokens,
                limit,
            });
        }
        let Resident { model, blocks } = resident;
        let pipeline = &self.pipeline;
        generate(model, prompt, options, true, on_token, |inputs| {
            pipeline.run(model, blocks, inputs)
        })
    }

    /// Loads every stage's weights now and keeps them resident: the full-load path, for
    /// comparison with streaming (later passes read nothing from disk).
    pub fn load_all(&mut self) -> Result<(), RunError> {
        self.pipeline.keep_weights();
        match &mut self.skeleton {
            Skeleton::Decoder(r) => self.pipeline.load_all(&r.model, &mut r.blocks),
            Skeleton::Encoder(r) => self.pipeline.load_all(&r.model, &mut r.blocks),
        }
    }

    fn expect_encoder(&self, call: &'static str) -> Result<(), RunError> {
        match self.skeleton {
            Skeleton::Encoder(_) => Ok(()),
            Skeleton::Decoder(_) => Err(self.wrong_family(call, "an encoder")),
        }
    }

    fn wrong_family(&self, call: &'static str, needs: &'static str) -> RunError {
        RunError::WrongFamily {
            call,
            needs,
            actual: self.skeleton.kind(),
        }
    }
}
