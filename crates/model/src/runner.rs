//! `ModelConverter`: the spec's layer-by-layer model, streamed through a memory budget.
//!
//! `ModelConverter::new(path).load_model_with_hooks(clean_weights)` builds a model's
//! skeleton from `config.json` and the checkpoint index without reading a weight. Its
//! forward pass then, for every stage in order (embeddings, each layer, norm, head):
//!
//! 1. takes the stage's tensors from a [`LayerStream`], which reads the next stage on a
//!    background thread while this one runs (`memory.prefetch_depth` stages ahead);
//! 2. lets every [`LayerHook`] see and replace them, and persists replaced layers to the
//!    workspace when a hook asks;
//! 3. builds the block and runs it inside a [`MemoryTracker`] scope named after the stage,
//!    so [`memwise::get_memory_stats`] holds per-layer peaks with no extra code;
//! 4. drops the block's weights (`clean_weights`) or keeps it resident for the next pass.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType as CandleDType, Device, Tensor};
use candle_nn::VarBuilder;
use memwise::MemoryTracker;

use crate::checkpoint::{Checkpoint, DType, LayerId, ReadStrategy};
use crate::models::{
    ArchitectureConfig, DecoderBlock, DecoderModel, EncoderBlock, EncoderModel, KvCache,
    ModelError, Stage,
};
use crate::stream::LayerStream;
use crate::workspace::{ConvertOptions, TensorBytes, Workspace};

/// Why a streamed run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Reading the checkpoint or writing the workspace failed.
    #[error(transparent)]
    Checkpoint(Box<crate::Error>),
    /// Building or running a block failed.
    #[error(transparent)]
    Model(Box<ModelError>),
    /// A tensor could not be turned into a compute tensor.
    #[error("tensor {tensor}: {source}")]
    Tensor {
        /// The Hugging Face name of the tensor.
        tensor: String,
        /// candle's error.
        #[source]
        source: Box<candle_core::Error>,
    },
    /// A layer hook refused the layer.
    #[error("hook {hook} on layer {layer}: {message}")]
    Hook {
        /// The hook's name.
        hook: String,
        /// The stage it ran on.
        layer: String,
        /// What it said.
        message: String,
    },
    /// The memwise configuration (environment or `MEMWISE_CONFIG` file) holds a bad value.
    #[error(transparent)]
    Config(Box<memwise::config::Error>),
    /// A single stage needs more memory than the budget allows, so the model cannot run
    /// within it. Found before any weight is read.
    #[error(
        "{device}: stage {stage} needs {need} bytes of weights but the budget is {budget} \
         bytes ({deficit} short); raise memory.max_memory.{device} or use a smaller dtype"
    )]
    OverBudget {
        /// The device whose budget is exceeded (`cpu`).
        device: String,
        /// The stage that does not fit.
        stage: String,
        /// Bytes it needs.
        need: u64,
        /// The budget.
        budget: u64,
        /// `need - budget`.
        deficit: u64,
    },
    /// The prefetch thread could not be started.
    #[error("starting the prefetch thread: {0}")]
    Prefetch(#[source] std::io::Error),
    /// The call does not fit this model (e.g. `generate` on an encoder).
    #[error("{0}")]
    Usage(String),
}

impl From<crate::Error> for RunError {
    fn from(error: crate::Error) -> Self {
        // Boxed: checkpoint errors carry paths and names, and a large error would make
        // every `Result` of the forward pass large.
        RunError::Checkpoint(Box::new(error))
    }
}

impl From<ModelError> for RunError {
    fn from(error: ModelError) -> Self {
        RunError::Model(Box::new(error))
    }
}

/// One stage's weights, as a hook sees them before the stage runs.
#[derive(Debug)]
pub struct LayerWeights {
    name: String,
    index: usize,
    tensors: HashMap<String, Tensor>,
    replaced: bool,
    persist: bool,
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

    /// Replaces a tensor (same name; the block checks its shape when it is built).
    pub fn replace(&mut self, name: &str, tensor: Tensor) -> Result<(), RunError> {
        match self.tensors.get_mut(name) {
            Some(slot) => {
                *slot = tensor;
                self.replaced = true;
                Ok(())
            }
            None => Err(RunError::Usage(format!(
                "layer {} has no tensor {name} to replace",
                self.name
            ))),
        }
    }

    /// Whether a hook replaced any tensor.
    pub fn is_replaced(&self) -> bool {
        self.replaced
    }

    /// Asks the runner to write this layer, as replaced, to the workspace, so later runs read
    /// it from there instead of recomputing the replacement.
    pub fn persist(&mut self) {
        self.persist = true;
    }
}

/// Code that runs before and after every stage. Both methods default to doing nothing.
///
/// ```
/// use memwise_model::{LayerHook, LayerWeights, RunError};
///
/// /// Counts the parameters each layer reads.
/// struct CountParameters;
///
/// impl LayerHook for CountParameters {
///     fn before_layer(&self, layer: &mut LayerWeights) -> Result<(), RunError> {
///         let count: usize = layer.tensors().values().map(|t| t.elem_count()).sum();
///         println!("{}: {count} parameters", layer.name());
///         Ok(())
///     }
/// }
/// ```
pub trait LayerHook: Send + Sync {
    /// The hook's name, used in errors.
    fn name(&self) -> &str {
        std::any::type_name::<Self>()
    }

    /// Sees (and may replace) a stage's weights before its block is built.
    fn before_layer(&self, layer: &mut LayerWeights) -> Result<(), RunError> {
        let _ = layer;
        Ok(())
    }

    /// Runs after the stage named `name` ran.
    fn after_layer(&self, name: &str, index: usize) -> Result<(), RunError> {
        let _ = (name, index);
        Ok(())
    }
}

/// Builds a model whose forward pass streams its weights (the spec's `ModelConverter`).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use memwise_model::{write_synthetic_checkpoint, Architecture, ModelConverter, SynthSpec};
///
/// let dir = tempfile::tempdir()?;
/// let folder = write_synthetic_checkpoint(&SynthSpec::tiny(Architecture::Llama), &dir.path().join("m"))?.folder;
///
/// let mut model = ModelConverter::new(&folder)
///     .device(Device::Cpu)
///     .load_model_with_hooks(true)?; // clean weights after use
/// let input_ids = Tensor::new(&[[1u32, 5, 9]], &Device::Cpu)?;
/// let logits = model.forward(&input_ids)?;
/// assert_eq!(logits.dims(), [1, 3, 128]);
///
/// // Every stage ran inside a MemoryTracker scope of its name.
/// memwise::enable_memory_tracking(true);
/// model.forward(&input_ids)?;
/// let stats = memwise::get_memory_stats();
/// assert!(stats.scopes_named("model.layers.0").count() >= 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct ModelConverter {
    path: PathBuf,
    device: Device,
    dtype: CandleDType,
    workspace: Option<PathBuf>,
    prefetch_depth: usize,
    budget: Option<u64>,
    strategy: ReadStrategy,
    hooks: Vec<Arc<dyn LayerHook>>,
    /// Why the configuration could not be read, reported when the model is loaded.
    config_error: Option<memwise::config::Error>,
}

impl ModelConverter {
    /// A converter for the Hugging Face model folder at `path`, with defaults from
    /// [`memwise::get_config`]: `memory.prefetch_depth`, the budget `memory.max_memory.cpu`,
    /// and the workspace `memory.workspace_dir` when it already exists. Computes on the CPU
    /// in f32.
    ///
    /// A bad value in the environment or `MEMWISE_CONFIG` does not panic here: it is
    /// returned, naming the key and its source, by [`ModelConverter::load_model_with_hooks`].
    pub fn new(path: impl AsRef<Path>) -> Self {
        let (config, config_error) = match memwise::init_config() {
            Ok(config) => (config, None),
            Err(error) => (Arc::new(memwise::Config::default()), Some(error)),
        };
        let workspace = Some(config.memory.workspace_dir.clone()).filter(|dir| dir.is_dir());
        ModelConverter {
            path: path.as_ref().to_owned(),
            device: Device::Cpu,
            dtype: CandleDType::F32,
            workspace,
            prefetch_depth: config.memory.prefetch_depth,
            budget: config.memory.budget("cpu").map(|b| b.bytes()),
            strategy: ReadStrategy::default(),
            hooks: Vec::new(),
            config_error,
        }
    }

    /// The device to compute on. Weights stream from disk through host memory to it; on a
    /// GPU with `memory.use_cpu_offload`, host memory holds only the stages in flight.
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// The dtype to compute in (f32, f16 or bf16); stored floats are converted per layer.
    pub fn dtype(mut self, dtype: CandleDType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The workspace where hook-replaced layers are persisted and read back from (the
    /// spec's `save_path`).
    pub fn workspace(mut self, dir: impl AsRef<Path>) -> Self {
        self.workspace = Some(dir.as_ref().to_owned());
        self
    }

    /// Stages read ahead on a background thread; 0 reads each stage when it is due.
    pub fn prefetch_depth(mut self, depth: usize) -> Self {
        self.prefetch_depth = depth;
        self
    }

    /// Bytes the weights of the stages in memory at once may take (`None`: no limit). Read-
    /// ahead waits while the next stage would not fit beside the current one, and a model
    /// with a stage larger than the budget is refused before any weight is read.
    pub fn budget(mut self, bytes: Option<u64>) -> Self {
        self.budget = bytes;
        self
    }

    /// How bytes come off disk.
    pub fn read_strategy(mut self, strategy: ReadStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// Adds a hook that runs before and after every stage.
    pub fn hook(mut self, hook: impl LayerHook + 'static) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// Builds the model's skeleton from `config.json` and the checkpoint index, reading no
    /// weight. With `clean_weights`, each stage's weights are freed right after it runs;
    /// without, they stay resident after the first pass.
    ///
    /// Where the program installed a [`memwise::BlockCache`], this raises its capacity to
    /// one repeated layer (plus a quarter), so each layer reuses the blocks the previous one
    /// freed; up to that much freed memory stays resident until
    /// [`memwise::clear_memory`] or [`memwise::alloc::set_block_cache_capacity`]`(0)`.
    pub fn load_model_with_hooks(self, clean_weights: bool) -> Result<StreamedModel, RunError> {
        if let Some(error) = self.config_error {
            return Err(RunError::Config(Box::new(error)));
        }
        let source = Checkpoint::open(&self.path)?;
        let workspace = self.workspace.as_deref().map(Workspace::new).transpose()?;
        // Layers a hook persisted earlier are read from the workspace.
        let checkpoint = match &workspace {
            Some(ws) if ws.manifest()?.is_some() => ws.checkpoint(&source)?,
            _ => source.clone(),
        };
        let arch = ArchitectureConfig::from_file(&self.path)?;
        let names = checkpoint.index().tensors().iter().map(|t| t.name.as_str());
        let model = match arch {
            ArchitectureConfig::Decoder(cfg) => {
                let model = DecoderModel::new(&cfg, self.dtype, &self.device)?;
                let resident = vec![None; model.stages().len()];
                Staged::Decoder(model, resident)
            }
            ArchitectureConfig::Encoder(cfg) => {
                let mut model = EncoderModel::new(&cfg, self.dtype, &self.device)?;
                if let Some(prefix) = EncoderModel::detect_weight_prefix(names) {
                    model = model.with_weight_prefix(prefix);
                }
                let resident = vec![None; model.stages().len()];
                Staged::Encoder(model, resident)
            }
        };
        let stages = model.stages().to_vec();
        for stage in &stages {
            for name in stage.tensor_names() {
                if checkpoint.index().get(name).is_none() {
                    return Err(RunError::Usage(format!(
                        "{}: tensor {name} (stage {}) is not in the checkpoint",
                        self.path.display(),
                        stage.name()
                    )));
                }
            }
        }
        if let Some(budget) = self.budget {
            if let Some(stage) = stages.iter().max_by_key(|s| s.weight_bytes(self.dtype)) {
                let need = stage.weight_bytes(self.dtype);
                if need > budget {
                    return Err(RunError::OverBudget {
                        device: "cpu".into(),
                        stage: stage.name().to_owned(),
                        need,
                        budget,
                        deficit: need - budget,
                    });
                }
            }
        }
        let layer_bytes = repeated_stage_bytes(&stages, self.dtype);
        reserve_block_cache(layer_bytes);
        Ok(StreamedModel {
            streamer: Streamer {
                loader: Arc::new(StageLoader {
                    source,
                    checkpoint,
                    stages,
                    layer_bytes,
                    strategy: self.strategy,
                    dtype: self.dtype,
                    device: self.device,
                }),
                clean_weights,
                prefetch_depth: self.prefetch_depth,
                budget: self.budget,
                hooks: self.hooks,
                workspace,
            },
            model,
        })
    }
}

/// The weight bytes of the stage that repeats most (the decoder or encoder layer; the larger
/// on a tie), if any stage repeats.
fn repeated_stage_bytes(stages: &[Stage], dtype: CandleDType) -> Option<u64> {
    let sizes: Vec<u64> = stages.iter().map(|s| s.weight_bytes(dtype)).collect();
    sizes
        .iter()
        .map(|&b| (sizes.iter().filter(|&&o| o == b).count(), b))
        .filter(|&(count, _)| count > 1)
        .max()
        .map(|(_, bytes)| bytes)
}

/// Repeated layers allocate the same tensor sizes one after another: let a
/// [`memwise::BlockCache`] (where the program installed one) keep one layer's blocks, plus a
/// quarter for activations, so the next layer reuses resident memory instead of faulting in
/// fresh pages.
fn reserve_block_cache(layer_bytes: Option<u64>) {
    if let Some(bytes) = layer_bytes {
        let wanted = usize::try_from(bytes + bytes / 4).unwrap_or(usize::MAX);
        if memwise::alloc::block_cache_capacity() < wanted {
            memwise::alloc::set_block_cache_capacity(wanted);
        }
    }
}

/// The model's skeleton, with one slot per stage for the blocks kept resident between
/// passes (when weights are not cleaned).
enum Staged {
    Decoder(DecoderModel, Vec<Option<DecoderBlock>>),
    Encoder(EncoderModel, Vec<Option<EncoderBlock>>),
}

impl Staged {
    fn stages(&self) -> &[Stage] {
        match self {
            Staged::Decoder(m, _) => m.stages(),
            Staged::Encoder(m, _) => m.stages(),
        }
    }
}

/// Reads one stage's tensors as compute tensors. Shared with the prefetch thread.
struct StageLoader {
    source: Checkpoint,
    checkpoint: Checkpoint,
    stages: Vec<Stage>,
    /// Weight bytes of the repeated layer, the size the block cache is kept for.
    layer_bytes: Option<u64>,
    strategy: ReadStrategy,
    dtype: CandleDType,
    device: Device,
}

impl StageLoader {
    fn load(&self, index: usize) -> Result<LayerWeights, RunError> {
        let stage = &self.stages[index];
        if self.layer_bytes != Some(stage.weight_bytes(self.dtype)) {
            // Not a repeated layer (embeddings, head): the cached layer blocks would only
            // sit beside it, so give them back first.
            memwise::alloc::release_block_cache();
        }
        let names: Vec<&str> = stage.tensor_names().collect();
        let compute = Some(stored_dtype(self.dtype));
        let tensors = match (self.strategy, &self.device) {
            // pread straight into each tensor's storage: the stage costs its weights once.
            (ReadStrategy::Pread, Device::Cpu) => {
                self.checkpoint.load_candle_tensors(&names, compute)?
            }
            _ => {
                let mut reader = self.checkpoint.reader(self.strategy);
                let data = reader.read_tensors(&names)?;
                data.to_candle_tensors(compute, &self.device)?
                // `data` drops here: mapped pages are released before the stage runs.
            }
        };
        Ok(LayerWeights {
            name: stage.name().to_owned(),
            index,
            tensors,
            replaced: false,
            persist: false,
        })
    }

    fn persist(&self, workspace: &Workspace, layer: &LayerWeights) -> Result<(), RunError> {
        let mut owned = Vec::with_capacity(layer.tensors.len());
        for (name, tensor) in &layer.tensors {
            let bytes = tensor_bytes(tensor).map_err(|source| RunError::Tensor {
                tensor: name.clone(),
                source: Box::new(source),
            })?;
            owned.push((name.as_str(), tensor.dims().to_vec(), bytes));
        }
        let views: Vec<TensorBytes<'_>> = owned
            .iter()
            .map(|(name, shape, bytes)| {
                TensorBytes::new(name, stored_dtype(self.dtype), shape, bytes)
            })
            .collect();
        let first = layer.tensors.keys().next().map_or("", String::as_str);
        let options = ConvertOptions::with_dtype(Some(stored_dtype(self.dtype)));
        workspace.write_layer(&self.source, &options, &LayerId::of_tensor(first), &views)?;
        Ok(())
    }
}

fn stored_dtype(dtype: CandleDType) -> DType {
    match dtype {
        CandleDType::F16 => DType::F16,
        CandleDType::BF16 => DType::BF16,
        CandleDType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// The tensor's elements as little-endian bytes.
fn tensor_bytes(tensor: &Tensor) -> candle_core::Result<Vec<u8>> {
    let flat = tensor.flatten_all()?;
    Ok(match tensor.dtype() {
        CandleDType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        CandleDType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        CandleDType::F64 => flat
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        _ => flat
            .to_dtype(CandleDType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    })
}

/// A model whose forward pass loads each stage just before it runs (see [`ModelConverter`]).
pub struct StreamedModel {
    streamer: Streamer,
    model: Staged,
}

impl StreamedModel {
    /// The stages in execution order.
    pub fn stages(&self) -> &[Stage] {
        &self.streamer.loader.stages
    }

    /// Whether this is a decoder (generates tokens) rather than an encoder.
    pub fn is_decoder(&self) -> bool {
        matches!(self.model, Staged::Decoder(..))
    }

    /// The checkpoint the weights come from.
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.streamer.loader.checkpoint
    }

    /// Decoders: the logits `(batch, seq_len, vocab)` of `input_ids` (`u32`).
    /// Encoders: the last hidden state, with every token attended and of type 0.
    pub fn forward(&mut self, input_ids: &Tensor) -> Result<Tensor, RunError> {
        match &self.model {
            Staged::Decoder(..) => self.decode(input_ids, None, false),
            Staged::Encoder(..) => self.encode(input_ids, None, None),
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
        let Staged::Encoder(model, resident) = &mut self.model else {
            return Err(RunError::Usage("encode needs an encoder model".into()));
        };
        let model = &*model;
        let mut pass = model.pass(input_ids, token_type_ids, attention_mask)?;
        self.streamer.run_stages(
            resident,
            |i, vb| model.load_stage(i, vb),
            |block| pass.run_block(block),
        )?;
        Ok(pass.finish()?)
    }

    /// Encoders: mean-pooled sentence embeddings `(batch, hidden)`.
    pub fn embed(
        &mut self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor, RunError> {
        let hidden = self.encode(input_ids, Some(token_type_ids), Some(attention_mask))?;
        Ok(crate::models::mean_pool(&hidden, attention_mask)?)
    }

    /// Decoders: greedy decoding of up to `max_new_tokens` after `prompt` (`(1, len)`,
    /// `u32`), stopping at `eos`. Keys and values are cached, so each new token streams the
    /// model once over one position; the cache's bytes are reported in the result.
    pub fn generate(
        &mut self,
        prompt: &Tensor,
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<Generated, RunError> {
        let Staged::Decoder(model, _) = &self.model else {
            return Err(RunError::Usage("generate needs a decoder model".into()));
        };
        let mut cache = KvCache::new(model);
        let mut tokens = Vec::new();
        let mut input = prompt.clone();
        let mut last_logits = None;
        for _ in 0..max_new_tokens {
            let logits = self.decode(&input, Some(&mut cache), true)?;
            let next = logits
                .squeeze(0)
                .and_then(|l| l.squeeze(0))
                .and_then(|l| l.argmax(0))
                .and_then(|t| t.to_scalar::<u32>())
                .map_err(candle_input)?;
            last_logits = Some(logits);
            tokens.push(next);
            if Some(next) == eos {
                break;
            }
            input = Tensor::new(&[[next]], prompt.device()).map_err(candle_input)?;
        }
        Ok(Generated {
            tokens,
            kv_cache_bytes: cache.bytes(),
            last_logits,
        })
    }

    /// Loads every stage's weights now and keeps them resident: the full-load path, for
    /// comparison with streaming (later passes read nothing from disk).
    pub fn load_all(&mut self) -> Result<(), RunError> {
        self.streamer.clean_weights = false;
        match &mut self.model {
            Staged::Decoder(model, resident) => {
                let model = &*model;
                self.streamer
                    .load_all(resident, |i, vb| model.load_stage(i, vb))
            }
            Staged::Encoder(model, resident) => {
                let model = &*model;
                self.streamer
                    .load_all(resident, |i, vb| model.load_stage(i, vb))
            }
        }
    }

    fn decode(
        &mut self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
        last_only: bool,
    ) -> Result<Tensor, RunError> {
        let Staged::Decoder(model, resident) = &mut self.model else {
            return Err(RunError::Usage("decoding needs a decoder model".into()));
        };
        let model = &*model;
        let mut pass = model.pass(input_ids, cache)?;
        if last_only {
            pass = pass.last_position_only();
        }
        self.streamer.run_stages(
            resident,
            |i, vb| model.load_stage(i, vb),
            |block| pass.run_block(block),
        )?;
        Ok(pass.finish()?)
    }
}

/// What [`StreamedModel::generate`] produced.
#[derive(Debug)]
#[non_exhaustive]
pub struct Generated {
    /// The new tokens, in order.
    pub tokens: Vec<u32>,
    /// Bytes the KV cache held at the end.
    pub kv_cache_bytes: u64,
    /// The logits `(1, 1, vocab)` that chose the last token.
    pub last_logits: Option<Tensor>,
}

fn candle_input(source: candle_core::Error) -> RunError {
    RunError::Tensor {
        tensor: "input_ids".into(),
        source: Box::new(source),
    }
}

/// How a [`StreamedModel`] gets its stages: the loader, the hooks and the settings.
struct Streamer {
    loader: Arc<StageLoader>,
    clean_weights: bool,
    prefetch_depth: usize,
    budget: Option<u64>,
    hooks: Vec<Arc<dyn LayerHook>>,
    workspace: Option<Workspace>,
}

impl Streamer {
    /// Lets the hooks see a stage's loaded weights, persists them if a hook asked, and
    /// builds the stage's block from them.
    fn materialize<B>(
        &self,
        index: usize,
        mut weights: LayerWeights,
        build: &mut impl FnMut(usize, VarBuilder<'static>) -> Result<B, ModelError>,
    ) -> Result<B, RunError> {
        for hook in &self.hooks {
            hook.before_layer(&mut weights)?;
        }
        if weights.persist && weights.replaced {
            let Some(workspace) = &self.workspace else {
                return Err(RunError::Usage(format!(
                    "a hook asked to persist {}, but no workspace is set",
                    weights.name
                )));
            };
            self.loader.persist(workspace, &weights)?;
        }
        let loader = &self.loader;
        let vb = VarBuilder::from_tensors(weights.tensors, loader.dtype, &loader.device);
        Ok(build(index, vb)?)
    }

    /// Loads and builds every stage not yet resident, without running any: the full-load
    /// path, for comparison with streaming.
    fn load_all<B>(
        &self,
        resident: &mut [Option<B>],
        mut build: impl FnMut(usize, VarBuilder<'static>) -> Result<B, ModelError>,
    ) -> Result<(), RunError> {
        for (index, slot) in resident.iter_mut().enumerate() {
            if slot.is_none() {
                let weights = self.loader.load(index)?;
                *slot = Some(self.materialize(index, weights, &mut build)?);
            }
        }
        Ok(())
    }

    /// The streaming loop shared by every architecture: stages come from a prefetching
    /// stream (skipping resident ones), hooks see them, each runs in a scope of its name.
    fn run_stages<B>(
        &self,
        resident: &mut [Option<B>],
        mut build: impl FnMut(usize, VarBuilder<'static>) -> Result<B, ModelError>,
        mut run: impl FnMut(&B) -> Result<(), ModelError>,
    ) -> Result<(), RunError> {
        let (loader, hooks) = (&self.loader, &self.hooks);
        let missing: Vec<usize> = (0..resident.len())
            .filter(|&i| resident[i].is_none())
            .collect();
        let stream_loader = Arc::clone(loader);
        let order = missing.clone();
        let budget = self.budget.map(|limit| {
            let sizes = missing
                .iter()
                .map(|&i| loader.stages[i].weight_bytes(loader.dtype))
                .collect();
            (limit, sizes)
        });
        let mut stream =
            LayerStream::with_budget(missing.len(), self.prefetch_depth, budget, move |k| {
                stream_loader.load(order[k])
            })
            .map_err(RunError::Prefetch)?;
        let mut streamed = 0;

        for (index, slot) in resident.iter_mut().enumerate() {
            let name = loader.stages[index].name().to_owned();
            let _scope = MemoryTracker::new(name.clone());
            let fresh = match slot {
                Some(_) => None,
                None => {
                    let weights = match stream.next_stage() {
                        Some(loaded) => loaded?,
                        None => {
                            return Err(RunError::Usage(format!(
                                "stage {name} was not loaded (the prefetch thread stopped)"
                            )))
                        }
                    };
                    Some(self.materialize(index, weights, &mut build)?)
                }
            };
            let Some(block) = slot.as_ref().or(fresh.as_ref()) else {
                unreachable!("a stage is either resident or freshly loaded")
            };
            run(block)?;
            for hook in hooks {
                hook.after_layer(&name, index)?;
            }
            if fresh.is_some() {
                if !self.clean_weights {
                    *slot = fresh;
                } else {
                    // The block and its weights go now, inside the stage's scope, so the
                    // scope records the release and the budget can admit the next stage.
                    drop(fresh);
                }
                stream.release(streamed);
                streamed += 1;
            }
        }
        Ok(())
    }
}
