//! The configuration: one typed source of truth, layered, checked, and able to say where
//! every value came from.
//!
//! Layers, lowest first: the defaults, a configuration file (TOML or JSON, named by
//! `MEMWISE_CONFIG` or loaded with [`load_config`]), the environment
//! (`MEMWISE_MEMORY__GPU_BATCH_SIZE=8`: `MEMWISE_`, then the key with `__` between
//! sections), and code ([`configure`], [`configure_with`]). Every value is checked against
//! its key before it is accepted; a refused update leaves the previous configuration in
//! force. Readers get an immutable snapshot ([`get_config`]), so a reader never sees half
//! an update.
//!
//! [figment](https://docs.rs/figment) merges the layers and remembers which one set each key
//! (what `memwise config show --origin` prints). What figment does not do is ours: the key
//! table with every key's check, the suggestion for a misspelt key, reporting every bad value
//! at once (figment's `extract` stops at the first, without naming its source), refusing a bad
//! value even in a layer that a higher one overrides, environment text read as the key's type
//! (`yes`, `on`), and the budget forms `MEMWISE_MEMORY__MAX_MEMORY="cpu=2GiB,cuda:0=10GiB"`
//! and `MEMWISE_MEMORY__MAX_MEMORY__CUDA_0`, which figment's `Env` cannot spell. The
//! environment is read as a list of variables, so [`Builder::env_from`] can supply one.

mod bytesize;
mod error;
mod fields;
mod layers;
mod optimize;
mod schema;

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::marker::PhantomData;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde_json::Value;

pub use self::bytesize::{ByteSize, ByteSizeError};
pub use self::error::{Error, ErrorKind};
pub use self::layers::{
    env_var_for, Builder, Entry, Resolved, Source, CONFIG_FILE_VAR, ENV_PREFIX,
};
pub use self::optimize::{optimize_memory_usage, optimize_memory_usage_with, OptimizeReport};
pub use self::schema::{
    Config, DeviceChoice, ExportConfig, ExportFormat, LogLevel, MemoryConfig, QuantizationConfig,
    TrackingConfig,
};

use self::layers::{leaves, read_file, resolve, Layers, Raw};

/// The process-wide configuration: the layers it was built from, and the result.
struct GlobalConfig {
    layers: Layers,
    resolved: Arc<Resolved>,
}

static GLOBAL: RwLock<Option<GlobalConfig>> = RwLock::new(None);

fn read_global() -> std::sync::RwLockReadGuard<'static, Option<GlobalConfig>> {
    // The lock guards a value that is replaced whole, never left half-written, so a panic
    // elsewhere while holding it leaves nothing to repair.
    GLOBAL.read().unwrap_or_else(|e| e.into_inner())
}

/// Builds the process-wide configuration from the defaults, `MEMWISE_CONFIG` and the
/// `MEMWISE_*` environment, unless that was done already. Call it at start-up to handle a
/// bad environment as an error instead of the panic in [`get_config`].
///
/// Inside [`with_config`] (or while an [`override_config`] guard lives) on this thread it
/// returns that configuration and reads nothing.
pub fn init_config() -> Result<Arc<Config>, Error> {
    if let Some(config) = overridden() {
        return Ok(config);
    }
    update(|layers| Ok(layers.clone())).map(|resolved| resolved.config().clone())
}

/// The configuration in force: a cheap shared snapshot (the spec's `get_config()`). On a
/// thread inside [`with_config`], that configuration; otherwise the process-wide one.
///
/// ```
/// let config = memwise::get_config();
/// let batch_size = config.memory.gpu_batch_size;
/// assert!(batch_size >= 1);
/// ```
///
/// # Panics
///
/// On first use it reads the environment and `MEMWISE_CONFIG`; if they hold a bad value
/// it panics with the error, which names the key and the variable or file. Call
/// [`init_config`] first to handle that as an error.
pub fn get_config() -> Arc<Config> {
    overridden().unwrap_or_else(|| get_config_origins().config().clone())
}

thread_local! {
    /// This thread's overrides, innermost last.
    static OVERRIDES: RefCell<Vec<Arc<Config>>> = const { RefCell::new(Vec::new()) };
}

fn overridden() -> Option<Arc<Config>> {
    OVERRIDES.with(|stack| stack.borrow().last().cloned())
}

/// Runs `work` with `config` as the configuration [`get_config`] (and every memwise call
/// that reads it: [`batches`](crate::batches), [`optimize_memory_usage`], a model
/// converter) sees on this thread. Other threads, and this one afterwards, see what they
/// saw before; nothing global changes, so tests with different configurations can run in
/// parallel without a lock. Overrides nest; the origins ([`get_config_origins`]) stay
/// those of the process-wide configuration.
///
/// ```
/// use memwise::{config, get_config, Config};
///
/// let mut small = Config::default();
/// small.memory.gpu_batch_size = 2;
/// let seen = config::with_config(small, || get_config().memory.gpu_batch_size);
/// assert_eq!(seen, 2);
/// assert_eq!(get_config().memory.gpu_batch_size, Config::default().memory.gpu_batch_size);
/// ```
pub fn with_config<R>(config: impl Into<Arc<Config>>, work: impl FnOnce() -> R) -> R {
    let _guard = override_config(config);
    work()
}

/// Makes `config` the configuration this thread sees until the guard is dropped (the guard
/// form of [`with_config`]). The guard cannot leave its thread.
pub fn override_config(config: impl Into<Arc<Config>>) -> OverrideGuard {
    let depth = OVERRIDES.with(|stack| {
        let mut stack = stack.borrow_mut();
        stack.push(config.into());
        stack.len() - 1
    });
    OverrideGuard {
        depth,
        _thread_bound: PhantomData,
    }
}

/// Ends an [`override_config`] when dropped, unwinding included: the thread sees the
/// configuration it saw before (and inner overrides still open end with it).
#[derive(Debug)]
#[must_use = "the override ends when the guard is dropped"]
pub struct OverrideGuard {
    depth: usize,
    _thread_bound: PhantomData<*const ()>,
}

impl Drop for OverrideGuard {
    fn drop(&mut self) {
        let _ = OVERRIDES.try_with(|stack| stack.borrow_mut().truncate(self.depth));
    }
}

/// The configuration in force with the origin of every value (what `memwise config show
/// --origin` prints).
///
/// # Panics
///
/// As [`get_config`].
pub fn get_config_origins() -> Arc<Resolved> {
    if let Some(global) = read_global().as_ref() {
        return global.resolved.clone();
    }
    match update(|layers| Ok(layers.clone())) {
        Ok(resolved) => resolved,
        Err(err) => panic!("memwise configuration: {err}"),
    }
}

/// Sets values in the code layer, the highest (the spec's `configure(memory={...})`).
/// Keys may be nested or dotted. All values are checked first; if any is refused,
/// nothing changes and the error names the key.
///
/// ```
/// use memwise::{configure, get_config};
/// use serde_json::json;
///
/// configure(json!({
///     "memory": {
///         "clean_weights_after_use": true,
///         "gpu_batch_size": 8
///     }
/// }))
/// .unwrap();
/// assert_eq!(get_config().memory.gpu_batch_size, 8);
///
/// configure(json!({ "quantization.bits": 8 })).unwrap();
/// assert!(configure(json!({ "memory.gpu_batch_size": 0 })).is_err());
/// assert_eq!(get_config().memory.gpu_batch_size, 8); // the refused update changed nothing
/// ```
pub fn configure(values: Value) -> Result<Arc<Config>, Error> {
    let entries = layers::table_entries(&values, Source::Code)?;
    update(|layers| {
        let mut next = layers.clone();
        next.push_code(entries);
        Ok(next)
    })
    .map(|resolved| resolved.config().clone())
}

/// Changes the configuration through its typed fields. The keys whose values change join
/// the code layer; the result is checked like any other update, and a refused one
/// changes nothing.
///
/// ```
/// use memwise::{configure_with, get_config};
///
/// configure_with(|config| config.memory.prefetch_depth = 3).unwrap();
/// assert_eq!(get_config().memory.prefetch_depth, 3);
/// assert!(configure_with(|config| config.quantization.bits = 5).is_err());
/// assert_eq!(get_config().quantization.bits, 4);
/// ```
pub fn configure_with(change: impl FnOnce(&mut Config)) -> Result<Arc<Config>, Error> {
    update(|layers| {
        let current = resolve(layers).map_err(|mut errors| errors.remove(0))?;
        let before = leaves(current.config());
        let mut changed = Config::clone(current.config());
        change(&mut changed);
        let after = leaves(&changed);
        let keys = before.keys().chain(after.keys()).collect::<BTreeSet<_>>();
        let changed = keys
            .into_iter()
            .filter(|key| before.get(*key) != after.get(*key))
            .map(|key| Raw {
                key: key.clone(),
                // A key that disappeared was unset: null unsets an optional key.
                value: after.get(key).cloned().unwrap_or(Value::Null),
                source: Source::Code,
                textual: false,
            });
        let mut next = layers.clone();
        next.push_code(changed);
        Ok(next)
    })
    .map(|resolved| resolved.config().clone())
}

/// Loads a configuration file (TOML or JSON, by extension) as the file layer, replacing
/// the one `MEMWISE_CONFIG` named. The environment and earlier [`configure`] calls still
/// sit above it. A bad file changes nothing.
pub fn load_config(path: impl AsRef<Path>) -> Result<Arc<Config>, Error> {
    let entries = read_file(path.as_ref())?;
    update(|layers| {
        let mut next = layers.clone();
        next.file = entries;
        Ok(next)
    })
    .map(|resolved| resolved.config().clone())
}

/// An error refusing the value `key` has in the configuration in force, naming the key and
/// where its value came from: for code that reads a key and cannot do what it asks (a
/// `device` this build cannot run on). Inside [`with_config`] the origin is code.
///
/// ```
/// use memwise::config::{refuse, ErrorKind};
///
/// let err = refuse("device", "this build runs on the CPU; set device = \"cpu\" or \"auto\"");
/// assert_eq!(err.kind(), ErrorKind::InvalidValue);
/// assert!(err.to_string().starts_with("device (from default): this build runs on the CPU"));
/// ```
pub fn refuse(key: &str, message: impl Into<String>) -> Error {
    let origin = match overridden() {
        Some(_) => Source::Code,
        None => get_config_origins()
            .origin(key)
            .cloned()
            .unwrap_or(Source::Default),
    };
    Error::new(ErrorKind::InvalidValue, Some(key), origin, message)
}

/// Writes the configuration in force to `path`, as TOML or JSON by its extension.
pub fn save_config(path: impl AsRef<Path>) -> Result<(), Error> {
    get_config().save(path)
}

/// Forgets every [`configure`] and [`load_config`] and rebuilds from the defaults,
/// `MEMWISE_CONFIG` and the environment as they are now.
pub fn reset_config() -> Result<Arc<Config>, Error> {
    let layers = Builder::new()
        .layers()
        .map_err(|mut errors| errors.remove(0))?;
    update(|_| Ok(layers)).map(|resolved| resolved.config().clone())
}

/// Computes new layers from the current ones (built from the environment on first use),
/// resolves them, and installs the result only if every value passed. The write lock is
/// held throughout, so concurrent updates apply one after the other and none is lost.
fn update(next: impl FnOnce(&Layers) -> Result<Layers, Error>) -> Result<Arc<Resolved>, Error> {
    let mut global = GLOBAL.write().unwrap_or_else(|e| e.into_inner());
    let current = match global.as_ref() {
        Some(global) => global.layers.clone(),
        None => Builder::new()
            .layers()
            .map_err(|mut errors| errors.remove(0))?,
    };
    let layers = next(&current)?;
    let resolved = Arc::new(resolve(&layers).map_err(|mut errors| errors.remove(0))?);
    *global = Some(GlobalConfig {
        layers,
        resolved: resolved.clone(),
    });
    Ok(resolved)
}

impl Config {
    /// The configuration as TOML. `config_path` is left out: it records where a file was
    /// loaded from, which loading the written file sets again.
    ///
    /// ```
    /// let text = memwise::Config::default().to_toml();
    /// assert!(text.contains("gpu_batch_size = 16"));
    /// ```
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.without_config_path()).expect("Config serializes to TOML")
    }

    /// The configuration as pretty JSON, without `config_path` (see [`to_toml`](Self::to_toml)).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.without_config_path())
            .expect("Config serializes to JSON")
    }

    fn without_config_path(&self) -> Config {
        Config {
            config_path: None,
            ..self.clone()
        }
    }

    /// Writes the configuration to `path`, as TOML or JSON by its extension. Loading the
    /// file gives back the same configuration, with `config_path` set to `path`.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<(), Error> {
        let path = path.as_ref();
        let source = Source::File(path.to_path_buf());
        let failed = |message: String| Error::new(ErrorKind::File, None, source.clone(), message);
        let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let text = match extension.to_ascii_lowercase().as_str() {
            "toml" => self.to_toml(),
            "json" => self.to_json(),
            _ => {
                return Err(failed(
                    "unknown format; name the file with a .toml or .json extension".to_owned(),
                ))
            }
        };
        std::fs::write(path, text).map_err(|e| failed(format!("cannot write the file: {e}")))
    }
}
