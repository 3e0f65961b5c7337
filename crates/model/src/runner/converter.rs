//! [`ModelConverter`]: the builder that turns a model folder into a [`StreamedModel`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use super::streaming::{Pipeline, StageReader};
use super::{LayerHook, Resident, RunError, Skeleton, StreamedModel};
use crate::checkpoint::{stored_dtype, Checkpoint, MappedFiles, ReadStrategy};
use crate::models::{ArchitectureConfig, DecoderModel, EncoderModel, SentencePooling, Stage};
use crate::plan::{Placement, Plan, Request};
use crate::workspace::Workspace;

/// Builds a model whose forward pass streams its weights (the spec's `ModelConverter`).
///
/// Defaults come from a memwise [`memwise::Config`] ([`ModelConverter::new`] reads the
/// global one, [`ModelConverter::from_config`] takes one); every builder call overrides
/// the configured value.
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
    /// The configured device, or why it cannot be used (reported when the model loads).
    device: Result<Device, RunError>,
    dtype: DType,
    workspace: Option<PathBuf>,
    prefetch_depth: usize,
    budget: Option<u64>,
    clean_weights: bool,
    strategy: ReadStrategy,
    hooks: Vec<Arc<dyn LayerHook>>,
    /// The run the plan is made for (its shape; dtype, budget, read-ahead and placement
    /// come from the converter).
    request: Request,
    /// Why the configuration could not be read, reported when the model is loaded.
    config_error: Option<memwise::config::Error>,
}

impl ModelConverter {
    /// A converter for the Hugging Face model folder at `path`, with defaults from the
    /// global [`memwise::get_config`] (see [`ModelConverter::from_config`]).
    ///
    /// A bad value in the environment or `MEMWISE_CONFIG` does not panic here: it is
    /// returned, naming the key and its source, by [`ModelConverter::load_model_with_hooks`].
    pub fn new(path: impl AsRef<Path>) -> Self {
        match memwise::init_config() {
            Ok(config) => Self::from_config(path, &config),
            Err(error) => {
                let mut converter = Self::from_config(path, &memwise::Config::default());
                converter.config_error = Some(error);
                converter
            }
        }
    }

    /// A converter for the model folder at `path` with defaults from `config`:
    /// `device`, `memory.prefetch_depth`, the budget `memory.max_memory.cpu`,
    /// `memory.clean_weights_after_use`, and the workspace `memory.workspace_dir` when it
    /// already exists. Computes in f32.
    ///
    /// `device = "auto"` picks the first CUDA device where this build and machine have one,
    /// else the CPU; a CUDA device this build cannot use is refused when the model loads.
    pub fn from_config(path: impl AsRef<Path>, config: &memwise::Config) -> Self {
        let memory = &config.memory;
        ModelConverter {
            path: path.as_ref().to_owned(),
            device: configured_device(&config.device),
            dtype: DType::F32,
            workspace: Some(memory.workspace_dir.clone()).filter(|dir| dir.is_dir()),
            prefetch_depth: memory.prefetch_depth,
            budget: memory.budget("cpu").map(|b| b.bytes()),
            clean_weights: memory.clean_weights_after_use,
            strategy: ReadStrategy::default(),
            hooks: Vec::new(),
            request: Request::new(1),
            config_error: None,
        }
    }

    /// The device to compute on, overriding the configured `device`. Weights stream from
    /// disk through host memory to it.
    pub fn device(mut self, device: Device) -> Self {
        self.device = Ok(device);
        self
    }

    /// The dtype to compute in (f32, f16 or bf16); stored floats are converted per layer.
    pub fn dtype(mut self, dtype: DType) -> Self {
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

    /// The whole process's peak, in bytes (`None`: no limit): the [`Plan`] made when the
    /// model loads keeps its predicted peak within it, read-ahead waits while the next stage
    /// would not fit in what the plan leaves for streamed weights, and a budget no placement
    /// fits is refused before any weight is read ([`RunError::Plan`]).
    pub fn budget(mut self, bytes: Option<u64>) -> Self {
        self.budget = bytes;
        self
    }

    /// Whether each stage's weights are freed right after it runs (true: every stage
    /// streamed) or the plan chooses (false): every stage resident after the first pass when
    /// the budget allows (or there is none), else the stages it keeps resident, the rest
    /// streamed. The configured `memory.clean_weights_after_use` by default.
    pub fn clean_weights(mut self, clean: bool) -> Self {
        self.clean_weights = clean;
        self
    }

    /// How bytes come off disk. With [`ReadStrategy::mmap_release`] on the CPU and no hook,
    /// f32 matrices stored as f32 are not read at all: matmuls and embedding lookups compute
    /// on the mapped file, a stage that is not kept drops its pages from the process as each
    /// matrix is done, and the full load maps instead of copying.
    pub fn read_strategy(mut self, strategy: ReadStrategy) -> Self {
        self.strategy = strategy;
        self
    }

    /// The run to plan for: batch, sequence length and new tokens (one token by default).
    /// Its dtype, budget, read-ahead and placement are replaced by the converter's.
    pub fn request(mut self, request: Request) -> Self {
        self.request = request;
        self
    }

    /// Adds a hook that runs before and after every stage.
    pub fn hook(mut self, hook: impl LayerHook + 'static) -> Self {
        self.hooks.push(Arc::new(hook));
        self
    }

    /// The spec's call: [`ModelConverter::clean_weights`]`(clean_weights)`, then
    /// [`ModelConverter::load`].
    pub fn load_model_with_hooks(self, clean_weights: bool) -> Result<StreamedModel, RunError> {
        self.clean_weights(clean_weights).load()
    }

    /// Builds the model's skeleton from `config.json` and the checkpoint index, reading no
    /// weight, and checks before anything is read that every tensor a stage reads is in the
    /// checkpoint and that a [`Plan`] fits the budget; the plan's placement decides which
    /// stages stay resident after their first use.
    ///
    /// Where the program installed a [`memwise::BlockCache`], this raises its capacity to
    /// one repeated layer (plus a quarter), so each layer reuses the blocks the previous one
    /// freed; up to that much freed memory stays resident until
    /// [`memwise::clear_memory`] or [`memwise::alloc::set_block_cache_capacity`]`(0)`.
    pub fn load(self) -> Result<StreamedModel, RunError> {
        if let Some(error) = self.config_error {
            return Err(RunError::Config(Box::new(error)));
        }
        let device = self.device?;
        let compute = stored_dtype(self.dtype)
            .filter(|d| d.is_float())
            .ok_or(RunError::ComputeDtype(self.dtype))?;
        let source = Checkpoint::open(&self.path)?;
        let workspace = self.workspace.as_deref().map(Workspace::new).transpose()?;
        // Layers a hook persisted earlier are read from the workspace.
        let checkpoint = match &workspace {
            Some(ws) if ws.manifest()?.is_some() => ws.checkpoint(&source)?,
            _ => source.clone(),
        };
        let architecture = source.architecture()?.clone();
        let eos_token_ids =
            generation_eos(&self.path)?.unwrap_or_else(|| architecture.eos_token_ids().to_vec());
        let skeleton = match architecture {
            ArchitectureConfig::Decoder(cfg) => {
                Skeleton::Decoder(Resident::new(DecoderModel::new(&cfg, self.dtype, &device)?))
            }
            ArchitectureConfig::Encoder(cfg) => {
                let names = checkpoint.index().tensors().iter().map(|t| t.name.as_str());
                let mut model = EncoderModel::new(&cfg, self.dtype, &device)?;
                if let Some(prefix) = EncoderModel::detect_weight_prefix(names) {
                    model = model.with_weight_prefix(prefix)?;
                }
                Skeleton::Encoder(Resident::new(model))
            }
        };
        let stages = skeleton.stages().to_vec();
        let quantization = super::packed::scheme(&source)?;
        let pooling = SentencePooling::from_folder(&self.path)?.unwrap_or_default();
        for stage in &stages {
            if let Some(missing) = stage.tensor_names().find(|name| {
                checkpoint.index().get(name).is_none()
                    && (quantization.is_none()
                        || super::packed::packed_module(&checkpoint, name).is_none())
            }) {
                return Err(crate::Error::NotFound {
                    name: missing.to_owned(),
                    folder: self.path.clone(),
                }
                .into());
            }
            // A config.json whose sizes disagree with the weights would fail only once the
            // stage's bytes were read: compare the shapes now.
            let stored = stage
                .tensors()
                .iter()
                .filter_map(|spec| Some((spec, checkpoint.index().get(&spec.name)?)));
            if let Some((spec, info)) = stored
                .into_iter()
                .find(|(spec, info)| spec.shape != info.shape)
            {
                return Err(RunError::ShapeMismatch {
                    tensor: spec.name.clone(),
                    expected: spec.shape.clone(),
                    stored: info.shape.clone(),
                });
            }
        }
        // The plan, from the config and the index alone: a budget nothing fits is refused
        // here, before any weight is read.
        let mapped_files = maps_weights(self.strategy, &device, &self.hooks);
        let forced = self.request.placement;
        let request = self
            .request
            .mapped(mapped_files.is_some())
            .dtype(self.dtype)
            .budget(self.budget)
            .prefetch_depth(self.prefetch_depth)
            .placement(if self.clean_weights {
                Some(Placement::Streamed)
            } else {
                forced
            });
        let plan = Plan::for_stages(&checkpoint, &stages, &request)?;
        let layer_bytes = repeated_stage_bytes(&stages, self.dtype);
        let stages_len = stages.len();
        if mapped_files.is_none() {
            // Mapped weights are not allocated: a cache the size of a layer would only keep
            // freed activations resident.
            reserve_block_cache(layer_bytes);
        }
        Ok(StreamedModel {
            pipeline: Pipeline {
                reader: Arc::new(StageReader {
                    source,
                    checkpoint,
                    stages,
                    layer_bytes,
                    strategy: self.strategy,
                    dtype: self.dtype,
                    stored: compute,
                    mapped_files,
                    quantization,
                    device,
                }),
                keep: (0..stages_len).map(|i| plan.is_resident(i)).collect(),
                stream_bytes: plan.stages().iter().map(|s| s.streamed_bytes).collect(),
                prefetch_depth: self.prefetch_depth,
                budget: plan.window_budget(),
                hooks: self.hooks,
                workspace,
            },
            skeleton,
            eos_token_ids,
            pooling,
            plan,
        })
    }
}

/// The file mappings to compute on, when a converter computes on mapped weights: only the
/// CPU multiplies a mapped slice, and hooks see every tensor as a copy.
fn maps_weights(
    strategy: ReadStrategy,
    device: &Device,
    hooks: &[Arc<dyn LayerHook>],
) -> Option<MappedFiles> {
    let mapped =
        matches!(strategy, ReadStrategy::MmapRelease(_)) && device.is_cpu() && hooks.is_empty();
    mapped.then(MappedFiles::default)
}

/// The candle device `device` names, or why this build or machine cannot use it.
fn configured_device(device: &memwise::config::DeviceChoice) -> Result<Device, RunError> {
    let refused = |reason: String| RunError::Device {
        requested: device.to_string(),
        reason,
    };
    match device {
        memwise::config::DeviceChoice::Cpu => Ok(Device::Cpu),
        memwise::config::DeviceChoice::Auto if candle_core::utils::cuda_is_available() => {
            Device::new_cuda(0).map_err(|e| refused(e.to_string()))
        }
        memwise::config::DeviceChoice::Auto => Ok(Device::Cpu),
        memwise::config::DeviceChoice::Cuda(index) if candle_core::utils::cuda_is_available() => {
            Device::new_cuda(index.unwrap_or(0) as usize).map_err(|e| refused(e.to_string()))
        }
        memwise::config::DeviceChoice::Cuda(_) => Err(refused(
            "this build of memwise has no CUDA support; set device = \"cpu\" or \"auto\"".into(),
        )),
        _ => Err(refused("this kind of device is not supported".into())),
    }
}

/// `eos_token_id` of the folder's `generation_config.json`, which transformers' `generate`
/// stops at (it may list more ids than `config.json`, as instruct models' end-of-turn).
fn generation_eos(folder: &Path) -> Result<Option<Vec<u32>>, RunError> {
    let path = folder.join("generation_config.json");
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(crate::Error::io("reading", &path, e).into()),
    };
    #[derive(serde::Deserialize)]
    struct GenerationConfig {
        eos_token_id: Option<crate::models::TokenIds>,
    }
    let config: GenerationConfig =
        serde_json::from_str(&text).map_err(|e| crate::Error::Config {
            file: path.clone(),
            reason: format!("eos_token_id: {e}"),
        })?;
    Ok(config.eos_token_id.map(|ids| ids.0))
}

/// The weight bytes of the stage that repeats most (the decoder or encoder layer; the larger
/// on a tie), if any stage repeats.
fn repeated_stage_bytes(stages: &[Stage], dtype: DType) -> Option<u64> {
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
