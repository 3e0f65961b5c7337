//! The typed configuration and its defaults.
//!
//! Sections and defaults follow the original `config_manager` (`memory`, `quantization`,
//! `export`, and the general keys at the top level), plus what memwise's runner needs:
//! per-device budgets, prefetch depth, tracking and cleanup policy.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::bytesize::ByteSize;
use crate::ClearOptions;

/// Everything memwise can be configured with. Read it with [`get_config`](crate::get_config);
/// change it with [`configure`](crate::configure) or [`configure_with`](crate::configure_with).
///
/// ```
/// let config = memwise::Config::default();
/// assert_eq!(config.memory.gpu_batch_size, 16);
/// assert_eq!(config.quantization.bits, 4);
/// assert_eq!(config.export.export_format, memwise::config::ExportFormat::AutoRound);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Memory management: workspace, offloading, batch size, budgets, tracking, cleanup.
    pub memory: MemoryConfig,
    /// Weight and activation quantization.
    pub quantization: QuantizationConfig,
    /// How and where a converted model is written.
    pub export: ExportConfig,
    /// The model to load (a Hugging Face folder). Unset by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_path: Option<PathBuf>,
    /// Where the model runs. Default `auto`.
    pub device: DeviceChoice,
    /// The configuration file in force: set to the file [`load_config`](crate::load_config)
    /// or `MEMWISE_CONFIG` read, and where [`save_config`](crate::config::save_config) writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_path: Option<PathBuf>,
    /// Where results are written. Default `output`.
    pub output_dir: PathBuf,
    /// Where downloads and converted layers are cached. Default: the platform cache folder
    /// plus `memwise` (`~/.cache/memwise` on Linux); `MEMWISE_CACHE_DIR` overrides it.
    pub cache_dir: PathBuf,
    /// Print more about what is happening. Default false.
    pub verbose: bool,
    /// The most detailed log level shown. Default `info`.
    pub log_level: LogLevel,
}

/// The `memory` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Folder for per-layer files when a model must be converted before streaming.
    /// Default `layer_wise_quantize_workspace`.
    pub workspace_dir: PathBuf,
    /// Release each layer's weights right after it has run. Default true.
    pub clean_weights_after_use: bool,
    /// Samples per batch on an accelerator. Default 16; at least 1.
    pub gpu_batch_size: usize,
    /// Memory budget per device (`cpu`, `cuda:0`, ...). Empty by default: no budget.
    #[serde(default)]
    pub max_memory: BTreeMap<String, ByteSize>,
    /// Layers read ahead of the one running. Default 1; 0 turns prefetching off. Weights
    /// computed on in their mapped files are read into the page cache further ahead while
    /// they fit in half the memory the kernel reports available (they are not the
    /// process's memory).
    pub prefetch_depth: usize,
    /// Scope tracking, applied by [`optimize_memory_usage`](crate::optimize_memory_usage).
    pub tracking: TrackingConfig,
    /// Return free heap pages to the OS at each cleanup (glibc `malloc_trim`). Default true.
    pub trim_allocator: bool,
    /// Return cached device blocks to the driver at each cleanup. Default true.
    pub empty_device_cache: bool,
    /// How much a device pool may keep cached before it returns memory to the driver on its
    /// own (CUDA's release threshold). Unset: the backend's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_release_threshold: Option<ByteSize>,
}

impl MemoryConfig {
    /// The budget for `device` (`"cpu"`, `"cuda:0"`), if one is set.
    pub fn budget(&self, device: &str) -> Option<ByteSize> {
        self.max_memory.get(device).copied()
    }

    /// The cleanup this configuration asks for between batches and in
    /// [`optimize_memory_usage`](crate::optimize_memory_usage).
    pub fn clear_options(&self) -> ClearOptions {
        ClearOptions {
            run_reclaim_hooks: true,
            trim_allocator: self.trim_allocator,
            empty_device_cache: self.empty_device_cache,
            keep_block_cache: false,
        }
    }
}

/// The `memory.tracking` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TrackingConfig {
    /// Record [`MemoryTracker`](crate::MemoryTracker) scopes. Default false: off costs
    /// nothing, so it is opt-in.
    pub enabled: bool,
    /// How many finished scope records are kept. Default
    /// [`DEFAULT_RECORD_CAPACITY`](crate::scope::DEFAULT_RECORD_CAPACITY).
    pub record_capacity: usize,
    /// Milliseconds between the readings a report [`Sampler`](crate::report::Sampler)
    /// takes. Default 10; at least 1.
    pub sample_interval_ms: u64,
    /// The most readings a report [`Sampler`](crate::report::Sampler) keeps; a longer run
    /// keeps them at a coarser spacing. Default
    /// [`DEFAULT_CAPACITY`](crate::report::DEFAULT_CAPACITY); at least 2.
    pub sample_capacity: usize,
}

impl TrackingConfig {
    /// The interval a report sampler reads at (`sample_interval_ms`).
    pub fn sample_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.sample_interval_ms)
    }
}

/// The `quantization` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct QuantizationConfig {
    /// Bits per weight: 2, 3, 4 or 8. Default 4.
    pub bits: u8,
    /// Weights sharing one scale: a power of two, or -1 for one group per channel.
    /// Default 128.
    pub group_size: i64,
    /// Symmetric weight quantization (no zero point). Default true, as auto-round's.
    pub symmetric: bool,
    /// The weight data type name. Default `int4`.
    pub weight_dtype: String,
    /// Bits per activation: 2, 3, 4 or 8, or 16 / 32 to leave activations unquantized.
    /// Default 16: weights only (W4A16), as auto-round's default scheme.
    pub act_bits: u8,
    /// Activations sharing one scale, as `group_size`. Default 128.
    pub act_group_size: i64,
    /// Symmetric activation quantization. Default true.
    pub act_symmetric: bool,
}

/// The `export` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ExportConfig {
    /// The format written. Default `autoround`.
    pub export_format: ExportFormat,
    /// Where the exported model goes. Unset: under `output_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_path: Option<PathBuf>,
    /// Keep some layers at higher precision. Default false.
    pub mixed_precision: bool,
    /// Interleave packed weights for faster kernels. Default false.
    pub interleave: bool,
}

/// A quantized-model format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ExportFormat {
    /// AutoRound's own format.
    AutoRound,
    /// AWQ (`autoawq` checkpoints).
    Awq,
    /// GPTQ as AutoGPTQ writes it.
    AutoGptq,
}

/// How much is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LogLevel {
    /// Errors only.
    Error,
    /// Errors and warnings.
    Warn,
    /// What a user wants to see.
    Info,
    /// What a developer wants to see.
    Debug,
    /// Everything.
    Trace,
}

/// Where work runs: `auto`, `cpu`, `cuda` or `cuda:N`.
///
/// ```
/// use memwise::config::DeviceChoice;
///
/// assert_eq!("cuda:1".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(Some(1)));
/// assert_eq!(DeviceChoice::Cuda(Some(1)).to_string(), "cuda:1");
/// assert!("tpu".parse::<DeviceChoice>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeviceChoice {
    /// The first CUDA device if the build has one, else the CPU.
    Auto,
    /// The host.
    Cpu,
    /// A CUDA device; `None` is the current (first) one.
    Cuda(Option<u32>),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => return Ok(DeviceChoice::Auto),
            "cpu" => return Ok(DeviceChoice::Cpu),
            "cuda" => return Ok(DeviceChoice::Cuda(None)),
            _ => {}
        }
        text.strip_prefix("cuda:")
            .and_then(|index| index.parse().ok())
            .map(|index| DeviceChoice::Cuda(Some(index)))
            .ok_or_else(|| {
                format!("{text:?} is not a device; use \"auto\", \"cpu\", \"cuda\" or \"cuda:N\" (e.g. \"cuda:0\")")
            })
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(None) => f.write_str("cuda"),
            DeviceChoice::Cuda(Some(index)) => write!(f, "cuda:{index}"),
        }
    }
}

impl Serialize for DeviceChoice {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            memory: MemoryConfig::default(),
            quantization: QuantizationConfig::default(),
            export: ExportConfig::default(),
            model_path: None,
            device: DeviceChoice::Auto,
            config_path: None,
            output_dir: PathBuf::from("output"),
            cache_dir: default_cache_dir(),
            verbose: false,
            log_level: LogLevel::Info,
        }
    }
}

/// The platform cache folder plus `memwise`. Where the platform has none (no home folder),
/// the temporary folder: a cache must live somewhere writable, and it may be rebuilt.
fn default_cache_dir() -> PathBuf {
    dirs::cache_dir()
        .unwrap_or_else(std::env::temp_dir)
        .join("memwise")
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            workspace_dir: PathBuf::from("layer_wise_quantize_workspace"),
            clean_weights_after_use: true,
            gpu_batch_size: 16,
            max_memory: BTreeMap::new(),
            prefetch_depth: 1,
            tracking: TrackingConfig::default(),
            trim_allocator: true,
            empty_device_cache: true,
            pool_release_threshold: None,
        }
    }
}

impl Default for TrackingConfig {
    fn default() -> Self {
        TrackingConfig {
            enabled: false,
            record_capacity: crate::scope::DEFAULT_RECORD_CAPACITY,
            sample_interval_ms: crate::report::DEFAULT_INTERVAL.as_millis() as u64,
            sample_capacity: crate::report::DEFAULT_CAPACITY,
        }
    }
}

impl Default for QuantizationConfig {
    fn default() -> Self {
        QuantizationConfig {
            bits: 4,
            group_size: 128,
            symmetric: true,
            weight_dtype: "int4".to_owned(),
            act_bits: 16,
            act_group_size: 128,
            act_symmetric: true,
        }
    }
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            export_format: ExportFormat::AutoRound,
            export_path: None,
            mixed_precision: false,
            interleave: false,
        }
    }
}
