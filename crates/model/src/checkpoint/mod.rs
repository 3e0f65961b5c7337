//! Hugging Face model folders, read in place.
//!
//! [`Checkpoint::open`] reads `config.json` and the headers of the weight files (single or
//! sharded safetensors, single or sharded PyTorch `.bin`), validates every number and path
//! in them, and builds a [`TensorIndex`]. No weight is read until a [`LayerReader`] asks.

mod candle;
mod dtype;
mod index;
mod mapped;
mod pickle;
mod read;
mod safetensors;
mod stages;
mod summary;
mod torch_bin;

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

pub(crate) use self::candle::{stored_dtype, tensor_bytes, STAGING_BYTES};
pub use self::dtype::{convert_into, to_f32_vec, StoredDType};
pub use self::index::{TensorIndex, TensorInfo, TiedWeight};
pub(crate) use self::mapped::MappedFiles;
pub use self::mapped::MappedTensor;
pub use self::read::{FilesUnchanged, LayerData, LayerReader, ReadStrategy, TensorView};
pub(crate) use self::safetensors::{encode_header, read_safetensors, TensorHeader};
pub use self::safetensors::{parse_safetensors, MAX_HEADER_BYTES};
pub use self::stages::{StageOrigin, StageTensors};
pub use self::summary::{CheckpointSummary, StageSummary};
pub use self::torch_bin::parse_torch_zip;

use crate::error::{Error, Result};
use crate::models::{ArchitectureConfig, ModelError};

/// The largest `config.json` or `*.index.json` memwise reads.
const MAX_JSON_BYTES: u64 = 64 << 20;

/// How the weights of a folder are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SourceFormat {
    /// `model.safetensors`.
    Safetensors,
    /// `model.safetensors.index.json` and its shards.
    ShardedSafetensors,
    /// `pytorch_model.bin`.
    TorchBin,
    /// `pytorch_model.bin.index.json` and its shards.
    ShardedTorchBin,
}

impl SourceFormat {
    /// Whether tensors can be streamed from the files as they are. `.bin` storages can be
    /// sliced too, but a workspace copy gives checksums and a format every tool reads.
    pub fn is_safetensors(self) -> bool {
        matches!(
            self,
            SourceFormat::Safetensors | SourceFormat::ShardedSafetensors
        )
    }
}

/// What `config.json` says, the keys memwise uses typed and the rest kept as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ModelConfig {
    /// `architectures[0]`, e.g. `LlamaForCausalLM`.
    pub architecture: Option<String>,
    /// `model_type`, e.g. `llama`.
    pub model_type: Option<String>,
    /// `num_hidden_layers`.
    pub num_hidden_layers: Option<usize>,
    /// `hidden_size`.
    pub hidden_size: Option<usize>,
    /// `vocab_size`.
    pub vocab_size: Option<usize>,
    /// `tie_word_embeddings`; Hugging Face treats a missing key as true.
    pub tie_word_embeddings: Option<bool>,
    /// `torch_dtype` (or `dtype` in newer files).
    pub torch_dtype: Option<String>,
    /// The whole file.
    #[serde(skip)]
    pub raw: Value,
}

impl ModelConfig {
    /// Parses the text of a `config.json`; `file` names it in errors.
    ///
    /// ```
    /// use memwise_model::checkpoint::ModelConfig;
    ///
    /// let json = br#"{"architectures":["LlamaForCausalLM"],"num_hidden_layers":2}"#;
    /// let config = ModelConfig::parse("config.json".as_ref(), json).unwrap();
    /// assert_eq!(config.architecture.as_deref(), Some("LlamaForCausalLM"));
    ///
    /// let err = ModelConfig::parse("config.json".as_ref(), br#"{"num_hidden_layers":"2"}"#);
    /// assert!(err.unwrap_err().to_string().contains("num_hidden_layers"));
    /// ```
    pub fn parse(file: &Path, json: &[u8]) -> Result<ModelConfig> {
        let bad = |reason: String| Error::Config {
            file: file.to_owned(),
            reason,
        };
        let raw: Value =
            serde_json::from_slice(json).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let object = raw
            .as_object()
            .ok_or_else(|| bad("not a JSON object".into()))?;
        let string = |key: &str| -> Result<Option<String>> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(format!("key {key} is not a string"))),
            }
        };
        let count = |key: &str| -> Result<Option<usize>> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| bad(format!("key {key} is not a non-negative integer"))),
            }
        };
        let architecture = match object.get("architectures") {
            None | Some(Value::Null) => None,
            Some(Value::Array(names)) => match names.first() {
                None => None,
                Some(Value::String(name)) => Some(name.clone()),
                Some(_) => return Err(bad("key architectures holds a non-string".into())),
            },
            Some(_) => return Err(bad("key architectures is not a list".into())),
        };
        let tie_word_embeddings = match object.get("tie_word_embeddings") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => return Err(bad("key tie_word_embeddings is not a boolean".into())),
        };
        Ok(ModelConfig {
            architecture,
            model_type: string("model_type")?,
            num_hidden_layers: count("num_hidden_layers")?,
            hidden_size: count("hidden_size")?,
            vocab_size: count("vocab_size")?,
            tie_word_embeddings,
            torch_dtype: string("torch_dtype")?.or(string("dtype")?),
            raw,
        })
    }
}

/// A model folder: its config, its weight files, and the index of every tensor in them.
///
/// ```
/// use memwise_model::{Checkpoint, ReadStrategy};
///
/// let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama-safetensors");
/// let checkpoint = Checkpoint::open(folder)?;
/// assert_eq!(checkpoint.config().architecture.as_deref(), Some("LlamaForCausalLM"));
///
/// let mut reader = checkpoint.reader(ReadStrategy::default());
/// let layer = reader.read_stage("model.layers.0")?;
/// for tensor in layer.tensors() {
///     let values = tensor.to_f32_vec()?;
///     println!("{} {:?} {} values", tensor.name(), tensor.shape(), values.len());
/// }
/// # Ok::<(), memwise_model::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Checkpoint {
    folder: PathBuf,
    format: SourceFormat,
    config: ModelConfig,
    files: Vec<PathBuf>,
    index: TensorIndex,
    /// `config.json` typed for its family, where memwise runs the architecture.
    architecture: Option<ArchitectureConfig>,
    stages: Vec<StageTensors>,
    stage_origin: StageOrigin,
    /// Stages served from elsewhere (a workspace): each one's own tensors, by stage name.
    overrides: HashMap<String, TensorIndex>,
    /// For each tensor, the first stage that reads it: the override a read by name uses.
    owners: HashMap<String, String>,
}

impl Checkpoint {
    /// Opens the model folder at `folder` and indexes its tensors.
    pub fn open(folder: impl AsRef<Path>) -> Result<Checkpoint> {
        let folder = folder.as_ref().to_owned();
        let config_path = folder.join("config.json");
        let config_bytes = safetensors::read_small_file(&config_path, MAX_JSON_BYTES)?;
        let config = ModelConfig::parse(&config_path, &config_bytes)?;
        let Weights {
            format,
            files,
            per_file,
        } = read_weights(&folder)?;
        let mut index = TensorIndex::build(per_file)?;
        add_tied_head(&mut index, &config);
        check_layer_count(&config_path, &config, &index)?;
        let origin = config_path.display().to_string();
        let architecture = ArchitectureConfig::from_value(&config.raw, &origin).ok();
        let (stages, stage_origin) = find_stages(architecture.as_ref(), &index);
        let owners = owners(&stages);
        Ok(Checkpoint {
            folder,
            format,
            config,
            files,
            index,
            architecture,
            stages,
            stage_origin,
            overrides: HashMap::new(),
            owners,
        })
    }

    /// This checkpoint with the stages in `overrides` served from their own tensors (a
    /// workspace's files): how converted or hook-modified stages are read while the rest
    /// streams from the source. A read by stage takes that stage's own tensors; a read by
    /// tensor name takes the first stage that reads the tensor.
    pub(crate) fn with_stage_overrides(&self, overrides: HashMap<String, TensorIndex>) -> Self {
        Checkpoint {
            overrides,
            ..self.clone()
        }
    }

    /// Where tensor `name` is read from for `stage` (any stage when `None`): the stage's
    /// own override, else the override of the first stage that reads it, else the source.
    pub(crate) fn tensor_for(&self, stage: Option<&str>, name: &str) -> Option<&TensorInfo> {
        let own = stage.and_then(|s| self.overrides.get(s)?.get(name));
        let owner = || {
            let owner = self.owners.get(name)?;
            self.overrides.get(owner)?.get(name)
        };
        own.or_else(owner).or_else(|| self.index.get(name))
    }

    /// The model folder.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// How the weights are stored.
    pub fn format(&self) -> SourceFormat {
        self.format
    }

    /// The parsed `config.json`: what any architecture's config says.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The same `config.json` typed for its architecture family (parsed once, when the
    /// checkpoint was opened); for an architecture memwise cannot run, the error naming the
    /// key and value at fault.
    pub fn architecture(&self) -> std::result::Result<&ArchitectureConfig, ModelError> {
        if let Some(architecture) = &self.architecture {
            return Ok(architecture);
        }
        let origin = self.folder.join("config.json").display().to_string();
        Err(ArchitectureConfig::from_value(&self.config.raw, &origin)
            .err()
            .unwrap_or_else(|| ModelError::unsupported("model_type", "unreadable")))
    }

    /// The weight files, in the order they were indexed.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Every tensor of the source files, by name.
    pub fn index(&self) -> &TensorIndex {
        &self.index
    }

    /// The stages, in the order the runner streams them (see [`StageOrigin`]).
    pub fn stages(&self) -> &[StageTensors] {
        &self.stages
    }

    /// The stage called `name`.
    pub fn stage(&self, name: &str) -> Option<&StageTensors> {
        self.stages.iter().find(|s| s.name == name)
    }

    /// The first stage that reads tensor `name`.
    pub(crate) fn first_reader(&self, name: &str) -> Option<&str> {
        self.owners.get(name).map(String::as_str)
    }

    /// Whether [`Checkpoint::stages`] were traced from the model's blocks or grouped by
    /// module name.
    pub fn stage_origin(&self) -> StageOrigin {
        self.stage_origin
    }

    /// A reader that loads one stage at a time into reused memory.
    pub fn reader(&self, strategy: ReadStrategy) -> LayerReader<'_> {
        LayerReader::new(self, strategy)
    }
}

/// The weight files of a folder and the tensors each one holds.
struct Weights {
    format: SourceFormat,
    files: Vec<PathBuf>,
    per_file: Vec<Vec<TensorInfo>>,
}

/// Finds the weight files of `folder` and parses each one's tensor list.
fn read_weights(folder: &Path) -> Result<Weights> {
    let candidates = [
        (
            "model.safetensors.index.json",
            SourceFormat::ShardedSafetensors,
        ),
        ("model.safetensors", SourceFormat::Safetensors),
        (
            "pytorch_model.bin.index.json",
            SourceFormat::ShardedTorchBin,
        ),
        ("pytorch_model.bin", SourceFormat::TorchBin),
    ];
    let Some((name, format)) = candidates
        .into_iter()
        .find(|(name, _)| folder.join(name).exists())
    else {
        return Err(Error::NoWeights {
            folder: folder.to_owned(),
        });
    };
    let path = folder.join(name);
    let read_one = |file: &Path| match format {
        SourceFormat::Safetensors | SourceFormat::ShardedSafetensors => read_safetensors(file),
        SourceFormat::TorchBin | SourceFormat::ShardedTorchBin => torch_bin::read_torch_bin(file),
    };
    match format {
        SourceFormat::Safetensors | SourceFormat::TorchBin => {
            let tensors = read_one(&path)?;
            Ok(Weights {
                format,
                files: vec![path],
                per_file: vec![tensors],
            })
        }
        SourceFormat::ShardedSafetensors | SourceFormat::ShardedTorchBin => {
            let shards = read_shard_index(folder, &path)?;
            let mut files = Vec::with_capacity(shards.len());
            let mut per_file = Vec::with_capacity(shards.len());
            for (shard, listed) in shards {
                let tensors = read_one(&shard)?;
                check_listed_tensors_present(&path, &shard, &listed, &tensors)?;
                files.push(shard);
                per_file.push(tensors);
            }
            Ok(Weights {
                format,
                files,
                per_file,
            })
        }
    }
}

/// Parses a `*.index.json` and returns each shard's path (checked to lie inside the folder
/// and to exist) with the tensors the index places in it.
fn read_shard_index(folder: &Path, index_path: &Path) -> Result<BTreeMap<PathBuf, Vec<String>>> {
    let bytes = safetensors::read_small_file(index_path, MAX_JSON_BYTES)?;
    parse_shard_index(folder, index_path, &bytes)
}

/// Parses the text of a shard index for the model folder `folder`: the entry point the fuzz
/// target drives. Each shard name must resolve inside the folder and exist.
///
/// ```
/// use memwise_model::checkpoint::parse_shard_index;
///
/// let folder = std::env::temp_dir();
/// let json = br#"{"weight_map": {"w": "../../etc/passwd"}}"#;
/// let err = parse_shard_index(&folder, &folder.join("model.safetensors.index.json"), json);
/// assert!(err.unwrap_err().to_string().contains("outside the model folder"));
/// ```
pub fn parse_shard_index(
    folder: &Path,
    index_path: &Path,
    json: &[u8],
) -> Result<BTreeMap<PathBuf, Vec<String>>> {
    let bad = |reason: String| Error::InvalidIndex {
        file: index_path.to_owned(),
        reason,
    };
    let root: Value =
        serde_json::from_slice(json).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let weight_map = root
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("missing object key weight_map".into()))?;
    let allowed_roots = allowed_roots(folder)?;
    let mut shards: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    let mut resolved: BTreeMap<&str, PathBuf> = BTreeMap::new();
    for (tensor, shard) in weight_map {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad(format!("weight_map entry {tensor} is not a file name")))?;
        let path = match resolved.get(shard) {
            Some(path) => path.clone(),
            None => {
                let path = resolve_shard(folder, &allowed_roots, index_path, tensor, shard)?;
                resolved.insert(shard, path.clone());
                path
            }
        };
        shards.entry(path).or_default().push(tensor.clone());
    }
    if shards.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok(shards)
}

/// Folders a shard may resolve into: the model folder and, for a Hugging Face hub cache
/// snapshot (`<repo>/snapshots/<revision>`), that repository's `blobs` folder, where the
/// snapshot's symlinks point.
fn allowed_roots(folder: &Path) -> Result<Vec<PathBuf>> {
    let canonical = folder
        .canonicalize()
        .map_err(|e| Error::io("resolving", folder, e))?;
    let mut roots = vec![canonical.clone()];
    if let Some(repo) = canonical.parent().and_then(|snapshots| {
        (snapshots.file_name()? == "snapshots").then(|| snapshots.parent())?
    }) {
        roots.push(repo.join("blobs"));
    }
    Ok(roots)
}

fn resolve_shard(
    folder: &Path,
    allowed_roots: &[PathBuf],
    index: &Path,
    tensor: &str,
    shard: &str,
) -> Result<PathBuf> {
    let refuse = |reason: &'static str| Error::ShardOutsideFolder {
        index: index.to_owned(),
        tensor: tensor.to_owned(),
        shard: shard.to_owned(),
        reason,
    };
    let relative = Path::new(shard);
    if shard.is_empty() {
        return Err(refuse("empty file name"));
    }
    for component in relative.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => return Err(refuse("the path contains ..")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("the path is absolute"))
            }
        }
    }
    let path = folder.join(relative);
    let canonical = match path.canonicalize() {
        Ok(canonical) => canonical,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::MissingShard {
                index: index.to_owned(),
                tensor: tensor.to_owned(),
                shard: path,
            })
        }
        Err(e) => return Err(Error::io("resolving", path, e)),
    };
    if !allowed_roots.iter().any(|root| canonical.starts_with(root)) {
        return Err(refuse("a symlink leads out of the folder"));
    }
    Ok(path)
}

fn check_listed_tensors_present(
    index: &Path,
    shard: &Path,
    listed: &[String],
    tensors: &[TensorInfo],
) -> Result<()> {
    let present: std::collections::HashSet<&str> =
        tensors.iter().map(|t| t.name.as_str()).collect();
    match listed.iter().find(|name| !present.contains(name.as_str())) {
        Some(missing) => Err(Error::TensorNotInShard {
            index: index.to_owned(),
            tensor: missing.clone(),
            shard: shard.to_owned(),
        }),
        None => Ok(()),
    }
}

/// Names under which Hugging Face stores the input embedding a causal LM head may share.
const EMBEDDING_NAMES: [&str; 4] = [
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.decoder.embed_tokens.weight",
    "embed_tokens.weight",
];

/// A causal LM whose `lm_head.weight` was not saved uses its input embedding instead
/// (safetensors drops tied tensors). Make that explicit so a runner finds `lm_head.weight`.
/// A `config.json` that claims more layers than the checkpoint has tensors cannot describe
/// it; refusing it here keeps a bad count from building a skeleton of that size.
fn check_layer_count(file: &Path, config: &ModelConfig, index: &TensorIndex) -> Result<()> {
    match config.num_hidden_layers {
        Some(layers) if layers > index.tensors().len() => Err(Error::Config {
            file: file.to_owned(),
            reason: format!(
                "num_hidden_layers is {layers}, but the checkpoint holds only {} tensors",
                index.tensors().len()
            ),
        }),
        _ => Ok(()),
    }
}

/// The stages of the model `architecture` describes, traced from its blocks, or, for an
/// architecture memwise cannot run, every tensor grouped by module.
fn find_stages(
    architecture: Option<&ArchitectureConfig>,
    index: &TensorIndex,
) -> (Vec<StageTensors>, StageOrigin) {
    let names = index.tensors().iter().map(|t| t.name.as_str());
    let traced = architecture.and_then(|config| config.stages(names).ok());
    match traced {
        Some(model_stages) => (stages::traced(&model_stages, index), StageOrigin::Traced),
        None => (stages::by_module(index), StageOrigin::ByModule),
    }
}

/// Each tensor's first reader among `stages`.
fn owners(stages: &[StageTensors]) -> HashMap<String, String> {
    let mut owners = HashMap::new();
    for stage in stages {
        for tensor in &stage.tensors {
            owners
                .entry(tensor.clone())
                .or_insert_with(|| stage.name.clone());
        }
    }
    owners
}

fn add_tied_head(index: &mut TensorIndex, config: &ModelConfig) {
    if index.get("lm_head.weight").is_some() || config.tie_word_embeddings == Some(false) {
        return;
    }
    if let Some(source) = EMBEDDING_NAMES.into_iter().find(|n| index.get(n).is_some()) {
        index.add_alias("lm_head.weight", source);
    }
}
