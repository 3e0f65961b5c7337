//! The layers (defaults < file < environment < code), how they merge, and where each
//! value came from.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use figment::{Figment, Metadata, Profile, Provider};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use super::error::{closest, Error, ErrorKind};
use super::fields::{self, Field, MAX_MEMORY};
use super::schema::Config;

/// Environment variables that configure memwise start with this.
pub const ENV_PREFIX: &str = "MEMWISE_";

/// The environment variable naming the configuration file to load.
pub const CONFIG_FILE_VAR: &str = "MEMWISE_CONFIG";

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// memwise's built-in default.
    Default,
    /// A configuration file (TOML or JSON).
    File(PathBuf),
    /// An environment variable, by name.
    Env(String),
    /// A call to [`configure`](crate::configure) or [`configure_with`](crate::configure_with)
    /// (or [`Builder::values`]).
    Code,
}

impl Source {
    /// How `key` is written in this source, for suggestions: the environment variable's
    /// name for the environment, the dotted key elsewhere.
    fn spell(&self, key: &str) -> String {
        match self {
            Source::Env(_) => env_var_for(key),
            _ => key.to_owned(),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Env(var) => write!(f, "environment variable {var}"),
            Source::Code => f.write_str("code (configure)"),
        }
    }
}

impl Serialize for Source {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// The environment variable that sets `key`: `memory.gpu_batch_size` is
/// `MEMWISE_MEMORY__GPU_BATCH_SIZE`.
///
/// ```
/// assert_eq!(memwise::config::env_var_for("memory.gpu_batch_size"), "MEMWISE_MEMORY__GPU_BATCH_SIZE");
/// ```
pub fn env_var_for(key: &str) -> String {
    let body = key
        .replace('.', "__")
        .replace(':', "_")
        .to_ascii_uppercase();
    format!("{ENV_PREFIX}{body}")
}

/// One value from one layer, not yet checked.
#[derive(Debug, Clone)]
pub(crate) struct Raw {
    pub key: String,
    pub value: Value,
    pub source: Source,
    /// The value is environment text that may spell a number or a boolean.
    pub textual: bool,
}

/// Entries for every leaf of `table`, keys joined with dots. Keys already dotted
/// (`{"memory.gpu_batch_size": 8}`) come out the same as nested tables.
fn flatten(prefix: &str, table: &Map<String, Value>, source: &Source, out: &mut Vec<Raw>) {
    for (name, value) in table {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match value {
            Value::Object(inner) => flatten(&key, inner, source, out),
            _ => out.push(Raw {
                key,
                value: value.clone(),
                source: source.clone(),
                textual: false,
            }),
        }
    }
}

/// A table of values (nested or dotted keys) as entries from `source`.
pub(crate) fn table_entries(values: &Value, source: Source) -> Result<Vec<Raw>, Error> {
    let Value::Object(table) = values else {
        return Err(Error::new(
            ErrorKind::WrongType,
            None,
            source,
            format!("expected a table of keys and values such as {{\"memory\": {{\"gpu_batch_size\": 8}}}}, found {values}"),
        ));
    };
    let mut out = Vec::new();
    flatten("", table, &source, &mut out);
    Ok(out)
}

/// The leaves of a typed config, canonical as the checks produce them.
pub(crate) fn leaves(config: &Config) -> BTreeMap<String, Value> {
    let value = serde_json::to_value(config).expect("Config serializes to JSON");
    table_entries(&value, Source::Default)
        .expect("Config serializes to a table")
        .into_iter()
        .map(|e| (e.key, e.value))
        .collect()
}

/// Reads a TOML or JSON configuration file into entries. The file's own path becomes
/// `config_path`, unless the file sets that key itself.
pub(crate) fn read_file(path: &Path) -> Result<Vec<Raw>, Error> {
    // Absolute, so that the origin still names the file after the working folder changes.
    let path = &std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let source = Source::File(path.to_path_buf());
    let unreadable = |message: String| Error::new(ErrorKind::File, None, source.clone(), message);
    let text = std::fs::read_to_string(path)
        .map_err(|e| unreadable(format!("cannot read the file: {e}")))?;
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let table: Value = match extension.to_ascii_lowercase().as_str() {
        "toml" => toml::from_str(&text).map_err(|e| unreadable(format!("not valid TOML: {e}")))?,
        "json" => {
            serde_json::from_str(&text).map_err(|e| unreadable(format!("not valid JSON: {e}")))?
        }
        _ => {
            return Err(unreadable(
                "unknown format; name the file with a .toml or .json extension".to_owned(),
            ))
        }
    };
    let mut entries = vec![Raw {
        key: "config_path".to_owned(),
        value: Value::String(path.display().to_string()),
        source: source.clone(),
        textual: false,
    }];
    entries.extend(table_entries(&table, source)?);
    Ok(entries)
}

/// The configuration file named by `MEMWISE_CONFIG`, and an entry for every other
/// `MEMWISE_*` variable. Every such variable is configuration: a misspelt one is refused,
/// not ignored. Errors are returned beside the entries so that all are reported at once.
pub(crate) fn read_env(vars: &[(String, String)]) -> (Option<PathBuf>, Vec<Raw>, Vec<Error>) {
    let mut sorted: Vec<&(String, String)> = vars
        .iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    // Sorted by name, so the whole-map form (MEMWISE_MEMORY__MAX_MEMORY) comes before the
    // per-device form (MEMWISE_MEMORY__MAX_MEMORY__CPU) and the more specific one wins.
    sorted.sort();
    let mut file = None;
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (name, text) in sorted {
        if name == CONFIG_FILE_VAR {
            file = Some(PathBuf::from(text));
            continue;
        }
        let source = Source::Env(name.clone());
        let key = name[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
            .join(".");
        if key == MAX_MEMORY {
            // MEMWISE_MEMORY__MAX_MEMORY="cpu=2GiB,cuda:0=10GiB": device names hold a colon,
            // which a variable name cannot.
            for pair in text.split(',').filter(|p| !p.trim().is_empty()) {
                match pair.split_once('=') {
                    Some((device, size)) => entries.push(Raw {
                        key: format!("{MAX_MEMORY}.{}", device.trim()),
                        value: Value::String(size.trim().to_owned()),
                        source: source.clone(),
                        textual: true,
                    }),
                    None => errors.push(Error::new(
                        ErrorKind::InvalidValue,
                        Some(MAX_MEMORY),
                        source.clone(),
                        format!(
                            "{pair:?} is not DEVICE=SIZE; write e.g. \"cpu=2GiB,cuda:0=10GiB\""
                        ),
                    )),
                }
            }
            continue;
        }
        // MEMWISE_MEMORY__MAX_MEMORY__CUDA_0 names cuda:0.
        let key = match key.strip_prefix(MAX_MEMORY) {
            Some(device) if device.starts_with('.') => {
                format!("{MAX_MEMORY}{}", device.replace('_', ":"))
            }
            _ => key,
        };
        entries.push(Raw {
            key,
            value: Value::String(text.clone()),
            source,
            textual: true,
        });
    }
    (file, entries, errors)
}

/// The non-default layers, lowest first, as read.
#[derive(Debug, Clone, Default)]
pub(crate) struct Layers {
    pub file: Vec<Raw>,
    pub env: Vec<Raw>,
    pub code: Vec<Raw>,
}

impl Layers {
    /// Adds entries to the code layer. An earlier entry for the same key is dropped: it is
    /// overridden anyway, and a long-running program that calls `configure` in a loop
    /// should not grow its configuration without bound.
    pub fn push_code(&mut self, entries: impl IntoIterator<Item = Raw>) {
        for entry in entries {
            self.code.retain(|e| e.key != entry.key);
            self.code.push(entry);
        }
    }
}

/// One key's value and origin, as `memwise config show` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Entry {
    /// The dotted key.
    pub key: String,
    /// The value as written in TOML or JSON; `None` when the key is unset.
    pub value: Option<Value>,
    /// Where the value (or its absence) came from.
    pub origin: Source,
}

/// A configuration and, for every key, where its value came from.
///
/// ```
/// use memwise::config::{Builder, Source};
///
/// let resolved = Builder::new()
///     .env_from([("MEMWISE_QUANTIZATION__BITS", "8")])
///     .build()
///     .unwrap();
/// assert_eq!(resolved.config().quantization.bits, 8);
/// assert_eq!(
///     resolved.origin("quantization.bits"),
///     Some(&Source::Env("MEMWISE_QUANTIZATION__BITS".into()))
/// );
/// assert_eq!(resolved.origin("memory.gpu_batch_size"), Some(&Source::Default));
/// ```
#[derive(Debug, Clone)]
pub struct Resolved {
    config: Arc<Config>,
    values: BTreeMap<String, (Option<Value>, Source)>,
}

impl Resolved {
    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Where `key`'s value came from; `None` for a key no layer mentions and that has no
    /// default (an unset optional key).
    pub fn origin(&self, key: &str) -> Option<&Source> {
        self.values.get(key).map(|(_, source)| source)
    }

    /// Every key with its value and origin, in the order of the configuration's sections.
    /// Unset optional keys are listed with no value.
    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        for field in fields::FIELDS {
            let matching: Vec<_> = match field.key.strip_suffix(".*") {
                Some(map) => self
                    .values
                    .iter()
                    .filter(|(key, _)| key.strip_prefix(map).is_some_and(|r| r.starts_with('.')))
                    .collect(),
                None => self.values.get_key_value(field.key).into_iter().collect(),
            };
            if matching.is_empty() && field.optional && !field.key.ends_with(".*") {
                out.push(Entry {
                    key: field.key.to_owned(),
                    value: None,
                    origin: Source::Default,
                });
            }
            for (key, (value, origin)) in matching {
                out.push(Entry {
                    key: key.clone(),
                    value: value.clone(),
                    origin: origin.clone(),
                });
            }
        }
        out
    }
}

/// Checks every value of every layer, then lets figment merge them over the defaults, one
/// provider per value, so that figment can say for each key which layer set it. Returns
/// every problem, not only the first, so one run of `memwise config check` lists them all.
/// A value refused in a low layer is an error even when a higher layer overrides it.
pub(crate) fn resolve(layers: &Layers) -> Result<Resolved, Vec<Error>> {
    let mut stack = Stack::default();
    stack.push(Source::Default, &leaves(&Config::default()));
    let mut errors = Vec::new();
    for entry in layers.file.iter().chain(&layers.env).chain(&layers.code) {
        match check(entry) {
            Ok(value) => stack.push(
                entry.source.clone(),
                &BTreeMap::from([(entry.key.clone(), value)]),
            ),
            Err(err) => errors.push(err),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(stack.resolve())
}

/// The layers as figment providers, lowest first, and the source behind each provider's name.
#[derive(Default)]
struct Stack {
    figment: Figment,
    sources: HashMap<String, Source>,
}

impl Stack {
    /// Merges `values` (dotted keys; null unsets an optional key) as one provider from `source`.
    fn push(&mut self, source: Source, values: &BTreeMap<String, Value>) {
        let mut tree = Map::new();
        for (key, value) in values {
            insert(&mut tree, key, value.clone());
        }
        let layer = Layer {
            name: source.to_string(),
            values: serde_json::from_value(Value::Object(tree))
                .expect("JSON converts to figment values"),
        };
        self.sources.insert(layer.name.clone(), source);
        self.figment = std::mem::take(&mut self.figment).merge(layer);
    }

    fn resolve(self) -> Resolved {
        // Every leaf was checked against its key's kind, so only a disagreement between the
        // key table and the typed Config could fail here; the tests keep the two in step.
        let config: Config = self
            .figment
            .extract()
            .expect("checked values deserialize into Config");
        let merged = self
            .figment
            .data()
            .expect("layers hold data")
            .remove(&Profile::Default)
            .unwrap_or_default();
        let merged = serde_json::to_value(merged).expect("figment values convert to JSON");
        let values = table_entries(&merged, Source::Default)
            .expect("the merged layers are a table")
            .into_iter()
            .map(|leaf| {
                let source = self
                    .figment
                    .find_metadata(&leaf.key)
                    .and_then(|meta| self.sources.get(meta.name.as_ref()))
                    .cloned()
                    .unwrap_or(Source::Default);
                (
                    leaf.key,
                    ((!leaf.value.is_null()).then_some(leaf.value), source),
                )
            })
            .collect();
        Resolved {
            config: Arc::new(config),
            values,
        }
    }
}

/// Checked values from one source, as a figment provider named after the source.
struct Layer {
    name: String,
    values: figment::value::Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.name.clone())
    }

    fn data(&self) -> Result<figment::value::Map<Profile, figment::value::Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.values.clone()))
    }
}

fn check(entry: &Raw) -> Result<Value, Error> {
    let refuse =
        |kind, message: String| Error::new(kind, Some(&entry.key), entry.source.clone(), message);
    let field: &Field = fields::lookup(&entry.key).map_err(|refusal| {
        if refusal.kind != ErrorKind::UnknownKey {
            return refuse(refusal.kind, refusal.message);
        }
        if let Some((_, why)) = fields::REMOVED.iter().find(|(key, _)| *key == entry.key) {
            return refuse(ErrorKind::UnknownKey, format!("unknown key: {why}"));
        }
        let candidates = fields::suggestible_keys(&entry.key);
        let hint = match closest(&entry.key, candidates.iter().map(String::as_str)) {
            Some(key) => format!("did you mean {}?", entry.source.spell(key)),
            None => "`memwise config show` lists every key".to_owned(),
        };
        refuse(ErrorKind::UnknownKey, format!("unknown key; {hint}"))
    })?;
    let value = field
        .check(&entry.value, entry.textual)
        .map_err(|refusal| refuse(refusal.kind, refusal.message))?;
    Ok(value)
}

/// Sets `tree[a][b][c] = value` for the key `a.b.c`, creating tables on the way.
fn insert(tree: &mut Map<String, Value>, key: &str, value: Value) {
    match key.split_once('.') {
        None => {
            tree.insert(key.to_owned(), value);
        }
        Some((head, rest)) => {
            let child = tree
                .entry(head.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(child) = child {
                // Device names in budgets never hold a dot (lookup refuses them), so the
                // rest of a max_memory key is one segment.
                insert(child, rest, value);
            }
        }
    }
}

/// Builds a configuration from the layers without touching the global one: for tests, for
/// `memwise config check`, and for programs that keep their own.
///
/// By default it reads the process environment (`MEMWISE_*`) and the file `MEMWISE_CONFIG`
/// names; [`env_from`](Self::env_from) supplies the environment instead, and
/// [`file`](Self::file) names the file.
///
/// ```
/// use memwise::config::Builder;
///
/// let resolved = Builder::new()
///     .env_from([("MEMWISE_MEMORY__GPU_BATCH_SIZE", "8")])
///     .values(serde_json::json!({ "memory": { "prefetch_depth": 2 } }))
///     .build()
///     .unwrap();
/// assert_eq!(resolved.config().memory.gpu_batch_size, 8);
/// assert_eq!(resolved.config().memory.prefetch_depth, 2);
/// ```
#[derive(Debug, Clone, Default)]
pub struct Builder {
    file: Option<PathBuf>,
    env: Option<Vec<(String, String)>>,
    code: Vec<Value>,
}

impl Builder {
    /// Defaults, plus the process environment and `MEMWISE_CONFIG` when built.
    pub fn new() -> Self {
        Builder::default()
    }

    /// Loads this file (TOML or JSON, by extension) instead of the one `MEMWISE_CONFIG` names.
    pub fn file(mut self, path: impl Into<PathBuf>) -> Self {
        self.file = Some(path.into());
        self
    }

    /// Uses these variables as the environment instead of the process's. An empty list
    /// leaves the environment out.
    pub fn env_from<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.env = Some(
            vars.into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        );
        self
    }

    /// Adds values to the code layer, the highest: a table with nested or dotted keys.
    pub fn values(mut self, values: Value) -> Self {
        self.code.push(values);
        self
    }

    /// Reads the layers and builds the configuration, refusing the first bad value.
    pub fn build(&self) -> Result<Resolved, Error> {
        self.check().map_err(|mut errors| errors.remove(0))
    }

    /// Like [`build`](Self::build) but returns every problem found.
    pub fn check(&self) -> Result<Resolved, Vec<Error>> {
        resolve(&self.layers()?)
    }

    pub(crate) fn layers(&self) -> Result<Layers, Vec<Error>> {
        let vars = match &self.env {
            Some(vars) => vars.clone(),
            None => process_env(),
        };
        let (env_file, env, mut errors) = read_env(&vars);
        let mut layers = Layers {
            env,
            ..Layers::default()
        };
        if let Some(path) = self.file.as_ref().or(env_file.as_ref()) {
            match read_file(path) {
                Ok(entries) => layers.file = entries,
                Err(err) => errors.push(err),
            }
        }
        for values in &self.code {
            match table_entries(values, Source::Code) {
                Ok(entries) => layers.code.extend(entries),
                Err(err) => errors.push(err),
            }
        }
        if errors.is_empty() {
            Ok(layers)
        } else {
            Err(errors)
        }
    }
}

/// The process environment's `MEMWISE_*` variables. A value that is not UTF-8 is read
/// lossily, so the check reports it instead of it vanishing.
fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            name.starts_with(ENV_PREFIX)
                .then(|| (name, value.to_string_lossy().into_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_in_the_table_is_a_field_of_config_and_back() {
        let mut config = Config {
            model_path: Some("m".into()),
            config_path: Some("c.toml".into()),
            ..Config::default()
        };
        config.export.export_path = Some("e".into());
        config.memory.pool_release_threshold = Some(super::super::ByteSize(1 << 30));
        config
            .memory
            .max_memory
            .insert("cuda:0".into(), super::super::ByteSize(1 << 30));
        let keys = leaves(&config);
        for key in keys.keys() {
            assert!(fields::lookup(key).is_ok(), "{key} has no entry in FIELDS");
        }
        for field in fields::FIELDS {
            let present = match field.key.strip_suffix(".*") {
                Some(map) => keys.keys().any(|k| k.starts_with(map)),
                None => keys.contains_key(field.key),
            };
            assert!(present, "{} is not a field of Config", field.key);
        }
    }

    #[test]
    fn env_names_map_to_dotted_keys() {
        let vars = vec![
            ("MEMWISE_MEMORY__GPU_BATCH_SIZE".to_owned(), "8".to_owned()),
            (
                "MEMWISE_MEMORY__MAX_MEMORY".to_owned(),
                "cpu=1GiB, cuda:1=2GiB".to_owned(),
            ),
            (
                "MEMWISE_MEMORY__MAX_MEMORY__CUDA_0".to_owned(),
                "3GiB".to_owned(),
            ),
            ("MEMWISE_CONFIG".to_owned(), "/etc/memwise.toml".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        let (file, entries, errors) = read_env(&vars);
        assert!(errors.is_empty());
        assert_eq!(file, Some(PathBuf::from("/etc/memwise.toml")));
        let keys: Vec<_> = entries.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "memory.gpu_batch_size",
                "memory.max_memory.cpu",
                "memory.max_memory.cuda:1",
                "memory.max_memory.cuda:0"
            ]
        );
        assert_eq!(
            env_var_for("memory.max_memory.cuda:0"),
            "MEMWISE_MEMORY__MAX_MEMORY__CUDA_0"
        );
    }
}
