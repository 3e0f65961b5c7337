//! PyTorch `.bin` files (`torch.save` since 1.6): a zip archive holding `data.pkl`, which
//! describes the state dict, and one stored (uncompressed) entry `data/<key>` per storage.
//!
//! memwise reads `data.pkl` with a non-executing pickle reader, then locates each tensor as
//! a byte range inside its storage entry, so tensors are read one at a time straight from
//! the file without unpacking the archive and without running any pickled code.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::Path;

use zip::{CompressionMethod, ZipArchive};

use crate::checkpoint::index::TensorInfo;
use crate::checkpoint::pickle::{self, TensorRef};
use crate::error::{Error, Result};

/// The largest `data.pkl` memwise reads. A state dict's pickle holds names and shapes only;
/// even a 400-billion-parameter model's is a few megabytes.
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Reads the tensor index of the `.bin` file at `path`.
pub(crate) fn read_torch_bin(path: &Path) -> Result<Vec<TensorInfo>> {
    let mut file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut magic = [0u8; 4];
    let got = file
        .read(&mut magic)
        .map_err(|e| Error::io("reading", path, e))?;
    file.rewind().map_err(|e| Error::io("reading", path, e))?;
    check_magic(path, magic.get(..got).unwrap_or_default())?;
    parse_torch_zip(path, BufReader::new(file))
}

fn check_magic(path: &Path, magic: &[u8]) -> Result<()> {
    match magic {
        [b'P', b'K', 3, 4] => Ok(()),
        // The legacy format starts with a pickle (PROTO opcode) holding a magic number;
        // the even older one is a tar archive.
        [0x80, ..] => Err(Error::LegacyTorchFormat {
            file: path.to_owned(),
        }),
        _ => Err(Error::InvalidTorchArchive {
            file: path.to_owned(),
            reason: "not a PyTorch zip archive (no PK header)".into(),
        }),
    }
}

/// Parses a PyTorch zip archive read from `reader`, named `path` in errors: the entry point
/// the fuzz target drives.
///
/// ```
/// use std::io::Cursor;
/// use memwise_model::checkpoint::parse_torch_zip;
///
/// let err = parse_torch_zip("bad.bin".as_ref(), Cursor::new(b"PK\x03\x04junk")).unwrap_err();
/// assert!(err.to_string().contains("bad.bin"));
/// ```
pub fn parse_torch_zip<R: Read + Seek>(path: &Path, reader: R) -> Result<Vec<TensorInfo>> {
    let invalid = |reason: String| Error::InvalidTorchArchive {
        file: path.to_owned(),
        reason,
    };
    let mut reader = reader;
    let file_len = reader
        .seek(std::io::SeekFrom::End(0))
        .map_err(|e| Error::io("reading", path, e))?;
    let mut archive =
        ZipArchive::new(reader).map_err(|e| invalid(format!("unreadable zip archive: {e}")))?;
    let prefix = archive_prefix(&archive).map_err(&invalid)?;
    check_byte_order(&mut archive, &prefix).map_err(&invalid)?;
    let pickle_bytes = read_entry(
        &mut archive,
        &format!("{prefix}/data.pkl"),
        MAX_PICKLE_BYTES,
    )
    .map_err(&invalid)?;
    let state_dict =
        pickle::read_state_dict(&pickle_bytes).map_err(|e| Error::UnsupportedPickle {
            file: path.to_owned(),
            offset: e.offset,
            reason: e.reason,
        })?;
    let mut storages: HashMap<String, StoredEntry> = HashMap::new();
    let mut tensors = Vec::with_capacity(state_dict.len());
    for (name, tensor) in state_dict {
        let key = &tensor.storage.key;
        let entry = match storages.get(key) {
            Some(entry) => *entry,
            None => {
                let entry = stored_entry(&mut archive, &prefix, key).map_err(|reason| {
                    Error::tensor(path, &name, format!("storage {key}: {reason}"))
                })?;
                storages.insert(key.clone(), entry);
                entry
            }
        };
        tensors.push(locate(path, &name, &tensor, entry, file_len)?);
    }
    Ok(tensors)
}

/// Every entry lives under one top folder (torch names it after the file, or `archive`).
fn archive_prefix<R: Read + Seek>(archive: &ZipArchive<R>) -> Result<String, String> {
    let mut prefixes = archive.file_names().filter_map(|name| {
        let name = name.ok()?;
        let prefix = name.strip_suffix("/data.pkl")?;
        (!prefix.contains('/')).then(|| prefix.to_owned())
    });
    let prefix = prefixes
        .next()
        .ok_or_else(|| "no <archive>/data.pkl entry".to_owned())?;
    if prefixes.next().is_some() {
        return Err("more than one data.pkl entry".into());
    }
    Ok(prefix)
}

fn check_byte_order<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    prefix: &str,
) -> Result<(), String> {
    let name = format!("{prefix}/byteorder");
    // Files from torch before 1.10 have no byteorder entry and are little-endian.
    if archive.index_for_name(&name).is_none() {
        return Ok(());
    }
    let order = read_entry(archive, &name, 16)?;
    match order.as_slice() {
        b"little" => Ok(()),
        other => Err(format!(
            "byte order {:?} is unsupported; only little-endian files are read",
            String::from_utf8_lossy(other)
        )),
    }
}

fn read_entry<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, String> {
    let entry = archive
        .by_name(name)
        .map_err(|e| format!("entry {name}: {e}"))?;
    if entry.size() > limit {
        return Err(format!(
            "entry {name} is {} bytes, over the {limit}-byte limit",
            entry.size()
        ));
    }
    let mut bytes = Vec::new();
    entry
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("entry {name}: {e}"))?;
    Ok(bytes)
}

/// Where one storage's bytes sit in the file.
#[derive(Debug, Clone, Copy)]
struct StoredEntry {
    start: u64,
    len: u64,
}

fn stored_entry<R: Read + Seek>(
    archive: &mut ZipArchive<R>,
    prefix: &str,
    key: &str,
) -> Result<StoredEntry, String> {
    let name = format!("{prefix}/data/{key}");
    let index = archive
        .index_for_name(&name)
        .ok_or_else(|| format!("entry {name} is missing"))?;
    let entry = archive
        .by_index_raw(index)
        .map_err(|e| format!("entry {name}: {e}"))?;
    // torch writes storages uncompressed so they can be mapped; a compressed one cannot be
    // sliced in place.
    if entry.compression() != CompressionMethod::Stored || entry.size() != entry.compressed_size() {
        return Err(format!(
            "entry {name} is compressed; re-save the file with torch.save"
        ));
    }
    let start = entry
        .data_start()
        .ok_or_else(|| format!("entry {name} has no data offset"))?;
    Ok(StoredEntry {
        start,
        len: entry.size(),
    })
}

/// The byte range of `tensor` inside its storage entry. Only contiguous (row-major) tensors
/// can be read as one range; torch saves state-dict tensors that way.
fn locate(
    path: &Path,
    name: &str,
    tensor: &TensorRef,
    entry: StoredEntry,
    file_len: u64,
) -> Result<TensorInfo> {
    let bad = |reason: String| Error::tensor(path, name, reason);
    let entry_end = entry.start.saturating_add(entry.len);
    if entry_end > file_len {
        return Err(Error::Truncated {
            file: path.to_owned(),
            tensor: name.to_owned(),
            needed: entry_end,
            actual: file_len,
        });
    }
    let dtype = tensor.storage.dtype;
    let element_size = dtype.size_in_bytes() as u64;
    let storage_bytes = tensor
        .storage
        .element_count
        .checked_mul(element_size)
        .ok_or_else(|| bad("storage size overflows".into()))?;
    if storage_bytes > entry.len {
        return Err(bad(format!(
            "storage {} declares {storage_bytes} bytes, its zip entry holds {}",
            tensor.storage.key, entry.len
        )));
    }
    if !is_contiguous(&tensor.shape, &tensor.stride) {
        return Err(bad(format!(
            "stride {:?} for shape {:?} is not contiguous; save tensor.contiguous()",
            tensor.stride, tensor.shape
        )));
    }
    let len = dtype
        .byte_len(&tensor.shape)
        .ok_or_else(|| bad(format!("shape {:?} × {dtype} overflows", tensor.shape)))?;
    let begin = tensor
        .storage_offset
        .checked_mul(element_size)
        .filter(|&b| b.checked_add(len).is_some_and(|end| end <= storage_bytes))
        .ok_or_else(|| {
            bad(format!(
                "offset {} + {len} bytes runs past storage {} ({storage_bytes} bytes)",
                tensor.storage_offset, tensor.storage.key
            ))
        })?;
    // Both stay within the entry, which was checked to lie inside the file.
    let start = entry.start + begin;
    let mut info = TensorInfo::new(name, path, dtype, tensor.shape.clone(), start..start + len);
    info.storage = Some(tensor.storage.key.clone());
    Ok(info)
}

fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1usize;
    for (&dim, &step) in shape.iter().zip(stride).rev() {
        // A dimension of size 1 is never stepped over, so its stride is irrelevant.
        if dim != 1 && step != expected {
            return false;
        }
        expected = match expected.checked_mul(dim) {
            Some(next) => next,
            None => return false,
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguity() {
        assert!(is_contiguous(&[2, 3], &[3, 1]));
        assert!(is_contiguous(&[1, 3], &[99, 1]));
        assert!(is_contiguous(&[], &[]));
        assert!(!is_contiguous(&[2, 3], &[1, 2]));
    }

    #[test]
    fn tells_legacy_from_junk() {
        let path = Path::new("m.bin");
        assert!(matches!(
            check_magic(path, &[0x80, 2, 0x8a, 0x0a]),
            Err(Error::LegacyTorchFormat { .. })
        ));
        assert!(matches!(
            check_magic(path, b"GGUF"),
            Err(Error::InvalidTorchArchive { .. })
        ));
        assert!(check_magic(path, b"PK\x03\x04").is_ok());
    }
}
