//! Every configuration key, what its value must be, and the check that refuses the rest.
//!
//! Values arrive as JSON-shaped leaves from files, the environment and code. Each is
//! checked here against its key's [`Kind`] and brought to the canonical form that the
//! typed [`Config`](super::Config) deserializes, so building the typed config from checked
//! leaves cannot fail and every refusal can name its key and source.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::bytesize::ByteSize;
use super::error::ErrorKind;
use super::schema::DeviceChoice;

/// What a key accepts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Bool,
    /// A whole number of at least `min`.
    Count {
        min: u64,
    },
    /// One of these bit widths.
    Bits(&'static [u64]),
    /// A power of two, or -1 for one group per channel.
    GroupSize,
    /// Any non-empty text.
    Text,
    /// One of these words.
    Choice(&'static [&'static str]),
    DeviceChoice,
    ByteSize,
    /// A folder memwise creates: its nearest existing ancestor must be a writable folder.
    CreatableDir,
    /// A path memwise only reads or records; whether it exists is checked where it is used.
    Path,
}

/// One configuration key.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Field {
    /// The dotted key. A key ending in `.*` is a map: any one further segment, which for
    /// `memory.max_memory.*` must name a device.
    pub key: &'static str,
    pub kind: Kind,
    /// Whether the key may be unset (written as `null` to unset it).
    pub optional: bool,
}

const fn field(key: &'static str, kind: Kind) -> Field {
    Field {
        key,
        kind,
        optional: false,
    }
}

const fn optional(key: &'static str, kind: Kind) -> Field {
    Field {
        key,
        kind,
        optional: true,
    }
}

/// The map of per-device budgets; its entries are keys of their own.
pub(crate) const MAX_MEMORY: &str = "memory.max_memory";

const WEIGHT_BITS: &[u64] = &[2, 3, 4, 8];
// 16 and 32 leave activations unquantized, as AutoRound spells it.
const ACTIVATION_BITS: &[u64] = &[2, 3, 4, 8, 16, 32];

/// Every key, in the order `memwise config show` prints them.
pub(crate) const FIELDS: &[Field] = &[
    field("memory.workspace_dir", Kind::CreatableDir),
    field("memory.clean_weights_after_use", Kind::Bool),
    field("memory.gpu_batch_size", Kind::Count { min: 1 }),
    optional("memory.max_memory.*", Kind::ByteSize),
    field("memory.prefetch_depth", Kind::Count { min: 0 }),
    field("memory.tracking.enabled", Kind::Bool),
    field("memory.tracking.record_capacity", Kind::Count { min: 0 }),
    field("memory.tracking.sample_interval_ms", Kind::Count { min: 1 }),
    field("memory.tracking.sample_capacity", Kind::Count { min: 2 }),
    field("memory.trim_allocator", Kind::Bool),
    field("memory.empty_device_cache", Kind::Bool),
    optional("memory.pool_release_threshold", Kind::ByteSize),
    field("quantization.bits", Kind::Bits(WEIGHT_BITS)),
    field("quantization.group_size", Kind::GroupSize),
    field("quantization.symmetric", Kind::Bool),
    field("quantization.weight_dtype", Kind::Text),
    field("quantization.act_bits", Kind::Bits(ACTIVATION_BITS)),
    field("quantization.act_group_size", Kind::GroupSize),
    field("quantization.act_symmetric", Kind::Bool),
    field(
        "export.export_format",
        Kind::Choice(&["autoround", "awq", "autogptq"]),
    ),
    optional("export.export_path", Kind::CreatableDir),
    field("export.mixed_precision", Kind::Bool),
    field("export.interleave", Kind::Bool),
    optional("model_path", Kind::Path),
    field("device", Kind::DeviceChoice),
    optional("config_path", Kind::Path),
    field("output_dir", Kind::CreatableDir),
    field("cache_dir", Kind::CreatableDir),
    field("verbose", Kind::Bool),
    field(
        "log_level",
        Kind::Choice(&["error", "warn", "info", "debug", "trace"]),
    ),
];

/// Keys of the original `config_manager` that memwise does not have, and why: a file that
/// sets one is refused like any unknown key, with this reason instead of a guess.
pub(crate) const REMOVED: &[(&str, &str)] = &[
    (
        "memory.use_cpu_offload",
        "memwise always keeps weights on the host and streams each stage to where it runs; remove the key",
    ),
    (
        "memory.use_meta_tensors",
        "memwise never allocates a model's weights before a stage needs them; remove the key",
    ),
];

/// The field `key` belongs to, or why it belongs to none.
pub(crate) fn lookup(key: &str) -> Result<&'static Field, Refusal> {
    if let Some(found) = FIELDS.iter().find(|f| f.key == key) {
        return Ok(found);
    }
    let Some(device) = key
        .strip_prefix(MAX_MEMORY)
        .and_then(|rest| rest.strip_prefix('.'))
    else {
        return Err(Refusal::new(ErrorKind::UnknownKey, "unknown key"));
    };
    match device.parse::<DeviceChoice>() {
        Ok(DeviceChoice::Auto) | Err(_) => Err(Refusal::new(
            ErrorKind::InvalidValue,
            format!("{device:?} is not a device a budget can apply to; use \"cpu\", \"cuda\" or \"cuda:N\""),
        )),
        Ok(_) => Ok(FIELDS
            .iter()
            .find(|f| f.key.strip_suffix(".*") == Some(MAX_MEMORY))
            .expect("FIELDS lists memory.max_memory.*")),
    }
}

/// The keys a misspelt `key` may have meant. When `key` ends in a device name, the budget
/// map stands in with it, so `memory.max_memroy.cpu` can be matched to
/// `memory.max_memory.cpu`.
pub(crate) fn suggestible_keys(key: &str) -> Vec<String> {
    let last = key.rsplit('.').next().unwrap_or(key);
    let names_a_device = matches!(last.parse::<DeviceChoice>(), Ok(d) if d != DeviceChoice::Auto);
    FIELDS
        .iter()
        .filter_map(|f| match f.key.strip_suffix('*') {
            Some(map) => names_a_device.then(|| format!("{map}{last}")),
            None => Some(f.key.to_owned()),
        })
        .collect()
}

/// Why a value was refused, before the key and source are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

impl Refusal {
    fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Refusal {
            kind,
            message: message.into(),
        }
    }

    fn wrong_type(expected: &str, found: &Value) -> Self {
        Refusal::new(
            ErrorKind::WrongType,
            format!("expected {expected}, found {}", describe(found)),
        )
    }

    fn invalid(message: impl Into<String>) -> Self {
        Refusal::new(ErrorKind::InvalidValue, message)
    }
}

/// `string "abc"`, `number 3`, ... for messages.
fn describe(value: &Value) -> String {
    match value {
        Value::Null => "nothing (null)".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {s:?}"),
        Value::Array(_) => format!("list {value}"),
        Value::Object(_) => format!("table {value}"),
    }
}

impl Field {
    /// Checks `value` and returns it in canonical form. `textual` says the value came as
    /// text that may spell another type (an environment variable's `"8"` or `"true"`).
    pub(crate) fn check(&self, value: &Value, textual: bool) -> Result<Value, Refusal> {
        // Text from the environment is read as the type the key wants.
        let value = match (value, textual) {
            (Value::String(text), true) => self.kind.read_text(text),
            _ => value.clone(),
        };
        if value.is_null() {
            return if self.optional {
                Ok(Value::Null)
            } else {
                Err(Refusal::invalid(
                    "this key must have a value; remove the line to use the default",
                ))
            };
        }
        self.kind.check(value)
    }
}

impl Kind {
    /// Reads environment text as this kind's type; what does not read stays text, so the
    /// check reports it as the wrong type with the text quoted.
    fn read_text(&self, text: &str) -> Value {
        let trimmed = text.trim();
        match self {
            Kind::Bool => match trimmed.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Value::Bool(true),
                "false" | "0" | "no" | "off" => Value::Bool(false),
                _ => Value::String(text.to_owned()),
            },
            Kind::Count { .. } | Kind::Bits(_) | Kind::GroupSize => match trimmed.parse::<i64>() {
                Ok(n) => Value::from(n),
                Err(_) => Value::String(text.to_owned()),
            },
            _ => Value::String(text.to_owned()),
        }
    }

    fn check(&self, value: Value) -> Result<Value, Refusal> {
        match self {
            Kind::Bool => match value {
                Value::Bool(_) => Ok(value),
                _ => Err(Refusal::wrong_type("true or false", &value)),
            },
            Kind::Count { min } => {
                let n = whole_number(&value)?;
                if n < *min as i64 {
                    return Err(Refusal::invalid(format!(
                        "{n} is too small; the least allowed is {min}"
                    )));
                }
                Ok(value)
            }
            Kind::Bits(allowed) => {
                let n = whole_number(&value)?;
                if !allowed.iter().any(|&a| a as i64 == n) {
                    return Err(Refusal::invalid(format!(
                        "{n} bits is not supported; use one of {allowed:?}"
                    )));
                }
                Ok(value)
            }
            Kind::GroupSize => {
                let n = whole_number(&value)?;
                if n != -1 && !(n > 0 && (n as u64).is_power_of_two()) {
                    return Err(Refusal::invalid(format!(
                        "{n} is not a group size; use a power of two (32, 64, 128, ...) or -1 for one group per channel"
                    )));
                }
                Ok(value)
            }
            Kind::Text => match &value {
                Value::String(s) if !s.trim().is_empty() => Ok(value),
                Value::String(_) => Err(Refusal::invalid("the text is empty")),
                _ => Err(Refusal::wrong_type("text", &value)),
            },
            Kind::Choice(choices) => {
                let Value::String(word) = &value else {
                    return Err(Refusal::wrong_type(&format!("one of {choices:?}"), &value));
                };
                if choices.contains(&word.as_str()) {
                    return Ok(value);
                }
                let hint = super::error::closest(word, choices.iter().copied())
                    .map(|c| format!(" (did you mean {c:?}?)"))
                    .unwrap_or_default();
                Err(Refusal::invalid(format!(
                    "{word:?} is not one of {choices:?}{hint}"
                )))
            }
            Kind::DeviceChoice => {
                let Value::String(text) = &value else {
                    return Err(Refusal::wrong_type(
                        "a device name such as \"cuda:0\"",
                        &value,
                    ));
                };
                text.parse::<DeviceChoice>().map_err(Refusal::invalid)?;
                Ok(value)
            }
            Kind::ByteSize => {
                let size: ByteSize = match &value {
                    Value::Number(n) => n.as_u64().map(ByteSize).ok_or_else(|| {
                        Refusal::invalid(format!(
                            "{n} is not a byte count; write a whole number of bytes or a size such as \"512MiB\""
                        ))
                    })?,
                    Value::String(text) => text
                        .parse()
                        .map_err(|e: super::bytesize::ByteSizeError| Refusal::invalid(e.to_string()))?,
                    _ => {
                        return Err(Refusal::wrong_type(
                            "a byte size such as \"512MiB\" or \"2GB\"",
                            &value,
                        ))
                    }
                };
                Ok(Value::String(size.to_string()))
            }
            Kind::CreatableDir | Kind::Path => {
                let Value::String(text) = &value else {
                    return Err(Refusal::wrong_type("a path", &value));
                };
                if text.trim().is_empty() {
                    return Err(Refusal::invalid("the path is empty"));
                }
                if matches!(self, Kind::CreatableDir) {
                    creatable(Path::new(text))
                        .map_err(|why| Refusal::new(ErrorKind::UncreatablePath, why))?;
                }
                Ok(value)
            }
        }
    }
}

fn whole_number(value: &Value) -> Result<i64, Refusal> {
    match value {
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| Refusal::wrong_type("a whole number", value)),
        _ => Err(Refusal::wrong_type("a whole number", value)),
    }
}

/// Whether `dir` exists as a folder or could be created: its nearest existing ancestor
/// must be a folder we may write in. Nothing is created here: checking a configuration
/// must not leave folders behind.
fn creatable(dir: &Path) -> Result<(), String> {
    let mut ancestor: PathBuf = dir.to_path_buf();
    loop {
        match std::fs::metadata(&ancestor) {
            Ok(meta) if meta.is_dir() => {
                return if ancestor == dir || writable(&ancestor) {
                    Ok(())
                } else {
                    Err(format!(
                        "cannot create {}: {} is not writable",
                        dir.display(),
                        ancestor.display()
                    ))
                };
            }
            Ok(_) => {
                return Err(format!(
                    "cannot create {}: {} is a file, not a folder",
                    dir.display(),
                    ancestor.display()
                ))
            }
            Err(_) => {}
        }
        // A relative path with no existing ancestor is created under the working folder.
        let parent = match ancestor.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if parent == ancestor {
            return Err(format!(
                "cannot create {}: no part of it exists",
                dir.display()
            ));
        }
        ancestor = parent;
    }
}

#[cfg(unix)]
fn writable(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call; access(2)
    // only reads it. It answers for the real user, who is the one creating the folder.
    unsafe { libc::access(path.as_ptr(), libc::W_OK) == 0 }
}

#[cfg(not(unix))]
fn writable(dir: &Path) -> bool {
    std::fs::metadata(dir).is_ok_and(|m| !m.permissions().readonly())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(key: &str, value: Value) -> Result<Value, Refusal> {
        lookup(key)?.check(&value, false)
    }

    #[test]
    fn group_sizes_are_powers_of_two_or_minus_one() {
        for ok in [-1, 1, 32, 128, 4096] {
            assert!(check("quantization.group_size", ok.into()).is_ok(), "{ok}");
        }
        for bad in [0, -2, 100, 3] {
            let err = check("quantization.group_size", bad.into()).unwrap_err();
            assert_eq!(err.kind, ErrorKind::InvalidValue, "{bad}");
        }
    }

    #[test]
    fn environment_text_reads_as_the_keys_type() {
        let batch = lookup("memory.gpu_batch_size").unwrap();
        assert_eq!(batch.check(&"8".into(), true).unwrap(), Value::from(8));
        assert_eq!(
            batch.check(&"eight".into(), true).unwrap_err().kind,
            ErrorKind::WrongType
        );
        let flag = lookup("verbose").unwrap();
        assert_eq!(flag.check(&"yes".into(), true).unwrap(), Value::Bool(true));
        // From a file, "8" is text and stays wrong for a number.
        assert_eq!(
            batch.check(&"8".into(), false).unwrap_err().kind,
            ErrorKind::WrongType
        );
    }

    #[test]
    fn budgets_apply_to_devices_only() {
        assert!(lookup("memory.max_memory.cpu").is_ok());
        assert!(lookup("memory.max_memory.cuda:1").is_ok());
        let err = lookup("memory.max_memory.auto").unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidValue);
        assert_eq!(
            lookup("memory.max_memory.gpu").unwrap_err().kind,
            ErrorKind::InvalidValue
        );
        assert_eq!(
            lookup("memory.nope").unwrap_err().kind,
            ErrorKind::UnknownKey
        );
    }

    #[test]
    fn byte_sizes_become_canonical_text() {
        assert_eq!(
            check("memory.max_memory.cpu", "2048MiB".into()).unwrap(),
            Value::from("2GiB")
        );
        assert_eq!(
            check("memory.max_memory.cpu", 1024.into()).unwrap(),
            Value::from("1KiB")
        );
    }

    #[test]
    fn folders_under_a_file_cannot_be_created() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let below = file.path().join("workspace");
        let err = check("memory.workspace_dir", below.to_str().unwrap().into()).unwrap_err();
        assert_eq!(err.kind, ErrorKind::UncreatablePath);
        assert!(err.message.contains("is a file"), "{}", err.message);
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b/c");
        assert!(check("output_dir", nested.to_str().unwrap().into()).is_ok());
    }
}
