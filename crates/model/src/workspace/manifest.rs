//! `manifest.json`: what a workspace holds, the source it was built from, and the check
//! that a recorded layer still matches what is on disk.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, LayerId, StoredDType, TensorInfo};
use crate::error::{Error, Result};

/// What a workspace records about one source file, to notice when the source changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SourceFile {
    /// The file name, relative to the model folder.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its modification time, in nanoseconds since the Unix epoch.
    pub modified_ns: u128,
}

/// The source a workspace was built from and how it was converted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SourceFingerprint {
    /// The model folder.
    pub folder: PathBuf,
    /// Its weight files.
    pub files: Vec<SourceFile>,
    /// The compute dtype float tensors were converted to, if any.
    pub dtype: Option<String>,
    /// CRC-32 of all of the above, for quick comparison by eye.
    pub fingerprint: String,
}

/// How a workspace layer came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum LayerOrigin {
    /// Converted from the source; can be rebuilt from it.
    Source,
    /// Written by a hook; cannot be rebuilt.
    Hook,
}

/// One tensor of a workspace layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ManifestTensor {
    /// Its name.
    pub name: String,
    /// Its dtype, as safetensors names it.
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
}

/// One layer file in the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ManifestLayer {
    /// The layer, as [`LayerId`] displays it.
    pub layer: String,
    /// Its file name inside the workspace.
    pub file: String,
    /// The file's size.
    pub bytes: u64,
    /// The file's checksum, `crc32:xxxxxxxx`.
    pub checksum: String,
    /// Converted from the source, or written by a hook.
    pub origin: LayerOrigin,
    /// Its tensors.
    pub tensors: Vec<ManifestTensor>,
}

/// `manifest.json`: what the workspace holds and how to check it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Manifest {
    /// [`MANIFEST_VERSION`](super::MANIFEST_VERSION) when written.
    pub format_version: u32,
    /// The source and conversion the files come from.
    pub source: SourceFingerprint,
    /// The layer files written so far, in forward order.
    pub layers: Vec<ManifestLayer>,
}

pub(super) fn recorded<'m>(manifest: &'m Manifest, layer: &LayerId) -> Option<&'m ManifestLayer> {
    let name = layer.to_string();
    manifest.layers.iter().find(|l| l.layer == name)
}

pub(super) fn record(manifest: &mut Manifest, entry: ManifestLayer) {
    manifest.layers.retain(|l| l.layer != entry.layer);
    manifest.layers.push(entry);
    manifest
        .layers
        .sort_by_key(|l| l.layer.parse::<LayerId>().ok());
}

pub(super) fn check_matches_manifest(
    manifest: &Path,
    file: &Path,
    layer: &ManifestLayer,
    tensors: &[TensorInfo],
) -> Result<()> {
    let listed: BTreeSet<&str> = layer.tensors.iter().map(|t| t.name.as_str()).collect();
    let present: BTreeSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    if let Some(missing) = listed.difference(&present).next() {
        return Err(Error::TensorNotInShard {
            index: manifest.to_owned(),
            tensor: (*missing).to_owned(),
            shard: file.to_owned(),
        });
    }
    if let Some(extra) = present.difference(&listed).next() {
        return Err(Error::Workspace {
            manifest: manifest.to_owned(),
            reason: format!(
                "{} holds tensor {extra}, which the manifest does not list",
                file.display()
            ),
        });
    }
    Ok(())
}

/// The source's files with sizes and modification times, and the conversion dtype.
pub(super) fn fingerprint(
    source: &Checkpoint,
    dtype: Option<StoredDType>,
) -> Result<SourceFingerprint> {
    let mut files = Vec::with_capacity(source.files().len());
    let mut hasher = crc32fast::Hasher::new();
    for path in source.files() {
        let meta = fs::metadata(path).map_err(|e| Error::io("reading metadata of", path, e))?;
        let modified_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let name = path
            .strip_prefix(source.folder())
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        hasher.update(format!("{name}\0{}\0{modified_ns}\0", meta.len()).as_bytes());
        files.push(SourceFile {
            name,
            size: meta.len(),
            modified_ns,
        });
    }
    let dtype = dtype.map(|d| d.safetensors_name().to_owned());
    hasher.update(dtype.as_deref().unwrap_or("stored").as_bytes());
    let folder = source
        .folder()
        .canonicalize()
        .map_err(|e| Error::io("resolving", source.folder(), e))?;
    Ok(SourceFingerprint {
        folder,
        files,
        dtype,
        fingerprint: format!("crc32:{:08x}", hasher.finalize()),
    })
}
