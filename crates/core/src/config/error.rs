//! Configuration errors: each names the key, the value's source, and what to write instead.

use std::fmt;

use super::layers::Source;

/// What kind of configuration problem this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The key does not exist (the error suggests the closest one that does).
    UnknownKey,
    /// The value has the wrong type, e.g. a string where a number belongs.
    WrongType,
    /// The value has the right type but is not allowed: out of range, not one of the
    /// choices, or a malformed byte size or device.
    InvalidValue,
    /// A folder memwise would create cannot be created there.
    UncreatablePath,
    /// A configuration file could not be read, parsed or written.
    File,
}

/// A refused configuration value, with the key, where the value came from, and why.
///
/// ```
/// use memwise::config::{Builder, ErrorKind};
///
/// let err = Builder::new()
///     .env_from([("MEMWISE_MEMORY__GPU_BATCH_SIZE", "0")])
///     .build()
///     .unwrap_err();
/// assert_eq!(err.kind(), ErrorKind::InvalidValue);
/// assert_eq!(err.key(), Some("memory.gpu_batch_size"));
/// assert!(err.to_string().contains("environment variable MEMWISE_MEMORY__GPU_BATCH_SIZE"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    kind: ErrorKind,
    key: Option<String>,
    origin: Source,
    message: String,
}

impl Error {
    pub(crate) fn new(
        kind: ErrorKind,
        key: Option<&str>,
        origin: Source,
        message: impl Into<String>,
    ) -> Self {
        Error {
            kind,
            key: key.map(str::to_owned),
            origin,
            message: message.into(),
        }
    }

    /// What kind of problem it is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The dotted key (`memory.gpu_batch_size`); `None` when a whole file is unreadable.
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// Where the refused value came from.
    pub fn origin(&self) -> &Source {
        &self.origin
    }

    /// Why it was refused and what would be accepted, without the key and source.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{key} (from {}): {}", self.origin, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

impl std::error::Error for Error {}

impl From<Error> for crate::Error {
    fn from(err: Error) -> Self {
        crate::Error::new(crate::ErrorKind::Config, err.to_string()).with_source(err)
    }
}

/// The candidate closest to `wanted` by edit distance, if it is close enough to be what
/// was meant; otherwise one whose last segment is exactly `wanted`'s last segment (a key
/// written in the wrong section: `gpu_batch_size` for `memory.gpu_batch_size`).
pub(crate) fn closest<'a>(
    wanted: &str,
    candidates: impl IntoIterator<Item = &'a str> + Clone,
) -> Option<&'a str> {
    let best = candidates
        .clone()
        .into_iter()
        .map(|c| (edit_distance(wanted, c), c))
        .min();
    // A third of the length tolerates a typo or two without suggesting unrelated keys.
    let tolerance = (wanted.chars().count() / 3).max(2);
    if let Some((distance, candidate)) = best {
        if distance <= tolerance {
            return Some(candidate);
        }
    }
    let leaf = |key: &str| key.rsplit('.').next().unwrap_or(key).to_owned();
    let wanted_leaf = leaf(wanted);
    candidates.into_iter().find(|c| leaf(c) == wanted_leaf)
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("gpu_batch_size", "gpu_batch_size"), 0);
        assert_eq!(edit_distance("gpu_bach_size", "gpu_batch_size"), 1);
        assert_eq!(edit_distance("bits", "bist"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn suggests_close_keys_and_keys_in_the_wrong_section() {
        let keys = ["memory.gpu_batch_size", "quantization.bits", "device"];
        assert_eq!(
            closest("memory.gpu_bach_size", keys),
            Some("memory.gpu_batch_size")
        );
        assert_eq!(
            closest("gpu_batch_size", keys),
            Some("memory.gpu_batch_size")
        );
        assert_eq!(closest("completely.unrelated", keys), None);
    }
}
