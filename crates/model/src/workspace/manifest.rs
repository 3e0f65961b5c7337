//! `manifest.json`: what a workspace holds, the source it was built from, and the check
//! that a recorded stage still matches what is on disk.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, StoredDType, TensorInfo};
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

/// How a workspace stage came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Origin {
    /// Converted from the source; can be rebuilt from it.
    Source,
    /// Written by a hook; cannot be rebuilt.
    Hook,
}

/// One tensor of a workspace stage.
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

/// One stage's file in the workspace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ManifestStage {
    /// The stage's name, e.g. `model.layers.3` (see [`Checkpoint::stages`]).
    pub stage: String,
    /// Its file name inside the workspace.
    pub file: String,
    /// The file's size.
    pub bytes: u64,
    /// The file's checksum, `crc32:xxxxxxxx`.
    pub checksum: String,
    /// Converted from the source, or written by a hook.
    pub origin: Origin,
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
    /// The stage files written so far, in the order written.
    pub stages: Vec<ManifestStage>,
}

pub(super) fn recorded<'m>(manifest: &'m Manifest, stage: &str) -> Option<&'m ManifestStage> {
    manifest.stages.iter().find(|s| s.stage == stage)
}

pub(super) fn record(manifest: &mut Manifest, entry: ManifestStage) {
    manifest.stages.retain(|s| s.stage != entry.stage);
    manifest.stages.push(entry);
}

pub(super) fn check_matches_manifest(
    manifest: &Path,
    file: &Path,
    entry: &ManifestStage,
    tensors: &[TensorInfo],
) -> Result<()> {
    let listed: BTreeSet<&str> = entry.tensors.iter().map(|t| t.name.as_str()).collect();
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
pub(crate) fn fingerprint(
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
