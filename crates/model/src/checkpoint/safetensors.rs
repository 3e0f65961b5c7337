//! A small, validating safetensors header parser and writer.
//!
//! The format: an 8-byte little-endian header length `n`, `n` bytes of JSON mapping each
//! tensor name to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the end
//! of the header), then the data. Every number in the header is untrusted: the length is
//! capped, offsets must lie inside the file and not overlap, and `dtype × shape` must equal
//! the byte length, with checked multiplication.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::{Map, Value};

use crate::checkpoint::dtype::StoredDType;
use crate::checkpoint::index::TensorInfo;
use crate::error::{Error, Result};

/// The largest header memwise reads, as the reference implementation caps it (100 MB).
/// Real headers are kilobytes; a bigger value is a corrupt or hostile file.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The key safetensors reserves for free-form string metadata.
const METADATA_KEY: &str = "__metadata__";

/// Reads and validates the header of the safetensors file at `path`.
pub(crate) fn read_safetensors(path: &Path) -> Result<Vec<TensorInfo>> {
    let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| Error::io("reading metadata of", path, e))?
        .len();
    let mut len_bytes = [0u8; 8];
    read_exact_at(&file, path, &mut len_bytes, 0, "header length")?;
    let header_len = checked_header_len(path, u64::from_le_bytes(len_bytes), file_len)?;
    // checked_header_len bounded it by MAX_HEADER_BYTES, so it fits in memory and usize.
    let mut header = vec![0u8; header_len as usize];
    read_exact_at(&file, path, &mut header, 8, "header")?;
    parse_header(path, &header, file_len)
}

/// Parses a whole safetensors file held in memory (or its first bytes, with the real length
/// in `file_len`): the entry point the fuzz target drives.
///
/// ```
/// use memwise_model::checkpoint::parse_safetensors;
///
/// let header = br#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
/// let mut file = (header.len() as u64).to_le_bytes().to_vec();
/// file.extend_from_slice(header);
/// file.extend_from_slice(&[0u8; 8]);
/// let tensors = parse_safetensors("w.safetensors".as_ref(), &file, file.len() as u64).unwrap();
/// assert_eq!(tensors[0].shape, [2]);
///
/// let short = &file[..file.len() - 1];
/// let err = parse_safetensors("w.safetensors".as_ref(), short, short.len() as u64).unwrap_err();
/// assert!(err.to_string().contains("truncated"));
/// ```
pub fn parse_safetensors(path: &Path, bytes: &[u8], file_len: u64) -> Result<Vec<TensorInfo>> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::InvalidHeader {
            file: path.to_owned(),
            reason: "file is shorter than the 8-byte header length".into(),
        })?;
    let header_len = checked_header_len(path, u64::from_le_bytes(len_bytes), file_len)?;
    let header = bytes
        .get(8..)
        .and_then(|rest| rest.get(..usize::try_from(header_len).ok()?))
        .ok_or_else(|| Error::InvalidHeader {
            file: path.to_owned(),
            reason: format!("header of {header_len} bytes runs past the bytes given"),
        })?;
    parse_header(path, header, file_len)
}

fn read_exact_at(file: &File, path: &Path, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::InvalidHeader {
                file: path.to_owned(),
                reason: format!("file ends inside the {what}"),
            }
        } else {
            Error::io("reading", path, e)
        }
    })
}

fn checked_header_len(path: &Path, header_len: u64, file_len: u64) -> Result<u64> {
    if header_len > MAX_HEADER_BYTES {
        return Err(Error::HeaderTooLarge {
            file: path.to_owned(),
            size: header_len,
            limit: MAX_HEADER_BYTES,
        });
    }
    if header_len.saturating_add(8) > file_len {
        return Err(Error::InvalidHeader {
            file: path.to_owned(),
            reason: format!("header of {header_len} bytes is longer than the {file_len}-byte file"),
        });
    }
    Ok(header_len)
}

/// Validates the header JSON of a file `file_len` bytes long and returns its tensors with
/// absolute byte ranges, sorted by offset.
fn parse_header(path: &Path, header: &[u8], file_len: u64) -> Result<Vec<TensorInfo>> {
    let invalid = |reason: String| Error::InvalidHeader {
        file: path.to_owned(),
        reason,
    };
    let map: Map<String, Value> =
        serde_json::from_slice(header).map_err(|e| invalid(format!("not a JSON object: {e}")))?;
    // The data starts right after the length prefix and the header.
    let data_start = 8 + header.len() as u64;
    let mut tensors = Vec::with_capacity(map.len());
    for (name, entry) in &map {
        if name == METADATA_KEY {
            check_metadata(path, entry)?;
            continue;
        }
        tensors.push(parse_entry(path, name, entry, data_start, file_len)?);
    }
    tensors.sort_by_key(|t| (t.data.start, t.data.end));
    check_no_overlap(path, &tensors)?;
    Ok(tensors)
}

fn check_metadata(path: &Path, entry: &Value) -> Result<()> {
    let ok = entry
        .as_object()
        .is_some_and(|m| m.values().all(Value::is_string));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidHeader {
            file: path.to_owned(),
            reason: format!("{METADATA_KEY} must map strings to strings"),
        })
    }
}

fn parse_entry(
    path: &Path,
    name: &str,
    entry: &Value,
    data_start: u64,
    file_len: u64,
) -> Result<TensorInfo> {
    let bad = |reason: String| Error::tensor(path, name, reason);
    let fields = entry
        .as_object()
        .ok_or_else(|| bad("entry is not an object".into()))?;
    if let Some(key) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(bad(format!("unknown key {key:?}")));
    }
    let dtype_name = fields
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("missing string key \"dtype\"".into()))?;
    let dtype = StoredDType::from_safetensors_name(dtype_name)
        .ok_or_else(|| bad(format!("unsupported dtype {dtype_name:?}")))?;
    let shape = fields
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing array key \"shape\"".into()))?
        .iter()
        .map(|dim| dim.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("shape holds a value that is not a non-negative integer".into()))?;
    let offsets = fields
        .get("data_offsets")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("missing array key \"data_offsets\"".into()))?;
    let (begin, end) = match offsets.as_slice() {
        [b, e] => b.as_u64().zip(e.as_u64()),
        _ => None,
    }
    .ok_or_else(|| bad("data_offsets must be two non-negative integers".into()))?;
    if begin > end {
        return Err(bad(format!(
            "data_offsets [{begin}, {end}] end before they begin"
        )));
    }
    let expected = dtype
        .byte_len(&shape)
        .ok_or_else(|| bad(format!("shape {shape:?} × {dtype} overflows")))?;
    if end - begin != expected {
        return Err(bad(format!(
            "shape {shape:?} of {dtype} needs {expected} bytes, data_offsets [{begin}, {end}] hold {}",
            end - begin
        )));
    }
    let absolute_end = data_start.saturating_add(end);
    if absolute_end > file_len {
        return Err(Error::Truncated {
            file: path.to_owned(),
            tensor: name.to_owned(),
            needed: absolute_end,
            actual: file_len,
        });
    }
    Ok(TensorInfo::new(
        name,
        path,
        dtype,
        shape,
        data_start + begin..absolute_end,
    ))
}

/// `tensors` must be sorted by offset; a tensor may not start before the previous ends.
fn check_no_overlap(path: &Path, tensors: &[TensorInfo]) -> Result<()> {
    for pair in tensors.windows(2) {
        if let [previous, next] = pair {
            // Zero-length tensors occupy no bytes, so they cannot overlap anything.
            if next.data.start < previous.data.end && !next.data.is_empty() {
                return Err(Error::OverlappingTensors {
                    file: path.to_owned(),
                    tensor: next.name.clone(),
                    other: previous.name.clone(),
                });
            }
        }
    }
    Ok(())
}

/// One tensor to be written: its name, dtype and shape. Its bytes follow in the same order.
pub(crate) struct TensorHeader<'a> {
    pub name: &'a str,
    pub dtype: StoredDType,
    pub shape: &'a [usize],
}

/// Encodes the length prefix and header for `tensors`, laid out back to back in the given
/// order. The header is padded with spaces to a multiple of 8 bytes, as the reference
/// writer does, so that data offsets stay aligned.
pub(crate) fn encode_header(tensors: &[TensorHeader<'_>]) -> Vec<u8> {
    let mut map = Map::new();
    let mut offset = 0u64;
    for tensor in tensors {
        // Callers pass shapes of tensors that already exist in memory or on disk, so the
        // product fits; saturating keeps a bogus one from wrapping silently.
        let len = tensor.dtype.byte_len(tensor.shape).unwrap_or(u64::MAX);
        let end = offset.saturating_add(len);
        map.insert(
            tensor.name.to_owned(),
            serde_json::json!({
                "dtype": tensor.dtype.safetensors_name(),
                "shape": tensor.shape,
                "data_offsets": [offset, end],
            }),
        );
        offset = end;
    }
    let mut json = Value::Object(map).to_string().into_bytes();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

/// Reads a whole file whose size is bounded by `limit`, for small JSON files.
pub(crate) fn read_small_file(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io("reading", path, e))?;
    if bytes.len() as u64 > limit {
        let too_big = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("file is larger than the {limit}-byte limit"),
        );
        return Err(Error::io("reading", path, too_big));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(header: &str, data_len: usize) -> Vec<u8> {
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header.as_bytes());
        file.resize(file.len() + data_len, 0);
        file
    }

    fn parse(header: &str, data_len: usize) -> Result<Vec<TensorInfo>> {
        let file = file_with(header, data_len);
        parse_safetensors(Path::new("x.safetensors"), &file, file.len() as u64)
    }

    #[test]
    fn round_trips_what_it_writes() {
        let shape_a = [2usize, 3];
        let shape_b = [4usize];
        let header = encode_header(&[
            TensorHeader {
                name: "a",
                dtype: StoredDType::BF16,
                shape: &shape_a,
            },
            TensorHeader {
                name: "b",
                dtype: StoredDType::I64,
                shape: &shape_b,
            },
        ]);
        assert_eq!(header.len() % 8, 0);
        let mut file = header.clone();
        file.resize(header.len() + 12 + 32, 7);
        let tensors = parse_safetensors(Path::new("x"), &file, file.len() as u64).unwrap();
        assert_eq!(tensors.len(), 2);
        assert_eq!(tensors[0].name, "a");
        assert_eq!(
            tensors[0].data,
            header.len() as u64..header.len() as u64 + 12
        );
        assert_eq!(tensors[1].dtype, StoredDType::I64);
    }

    #[test]
    fn refuses_each_malformed_entry_naming_the_tensor() {
        let cases = [
            (
                r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                "needs 12 bytes",
            ),
            (
                r#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
                "unsupported dtype",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                "non-negative",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                "end before",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}}"#,
                "two non-negative",
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}"#,
                "unknown key",
            ),
            (
                r#"{"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}}"#,
                "overflows",
            ),
            (r#"{"w":[]}"#, "not an object"),
        ];
        for (header, expected) in cases {
            let err = parse(header, 16).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, Error::InvalidTensor { ref tensor, .. } if tensor == "w"),
                "{header}: {message}"
            );
            assert!(message.contains(expected), "{header}: {message}");
            assert!(message.contains("x.safetensors"), "{message}");
        }
    }

    #[test]
    fn refuses_overlap_and_out_of_file_offsets() {
        let overlap = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                          "b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        let err = parse(overlap, 8).unwrap_err();
        assert!(
            matches!(err, Error::OverlappingTensors { ref tensor, ref other, .. }
            if tensor == "b" && other == "a")
        );
        let past_end = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}}"#;
        let err = parse(past_end, 6).unwrap_err();
        assert!(matches!(err, Error::Truncated { ref tensor, .. } if tensor == "a"));
    }

    #[test]
    fn caps_the_header_and_refuses_junk() {
        let mut file = (MAX_HEADER_BYTES + 1).to_le_bytes().to_vec();
        file.extend_from_slice(b"{}");
        let err = parse_safetensors(Path::new("x"), &file, u64::MAX).unwrap_err();
        assert!(matches!(err, Error::HeaderTooLarge { .. }));
        assert!(matches!(
            parse("[1,2]", 0).unwrap_err(),
            Error::InvalidHeader { .. }
        ));
        assert!(matches!(
            parse_safetensors(Path::new("x"), b"abc", 3).unwrap_err(),
            Error::InvalidHeader { .. }
        ));
        assert!(parse(r#"{"__metadata__":{"format":"pt"}}"#, 0)
            .unwrap()
            .is_empty());
        assert!(parse(r#"{"__metadata__":{"n":1}}"#, 0).is_err());
    }
}
