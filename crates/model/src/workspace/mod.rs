//! The workspace: per-layer files for what cannot be streamed from the source as it is.
//!
//! A safetensors source is read in place and never copied. The workspace holds only layers
//! that need rewriting: every layer of a `.bin` source, layers whose float tensors are
//! converted to another compute dtype, and layers a hook changed. Each is one safetensors
//! file; `manifest.json` records the format version, a fingerprint of the source, and each
//! file's checksum and tensors.
//!
//! Crash safety: every file is written to a temporary name, synced, and renamed into place,
//! and the manifest is rewritten the same way after each layer, so a run killed at any point
//! leaves only whole files that the manifest vouches for (plus temporaries, which the next
//! run removes). The next run verifies the checksums of what is there, rewrites what does
//! not match, writes the rest, and verifies the whole workspace at the end.

mod files;
mod manifest;

pub use self::manifest::{
    LayerOrigin, Manifest, ManifestLayer, ManifestTensor, SourceFile, SourceFingerprint,
};

use self::files::{available_bytes, checksum_file, remove_if_present, write_atomically};
use self::manifest::{check_matches_manifest, fingerprint, record, recorded};
use std::fs;
use std::path::{Path, PathBuf};

use crate::checkpoint::{
    encode_header, read_safetensors, Checkpoint, LayerId, ReadStrategy, StoredDType, TensorHeader,
    TensorInfo,
};
use crate::error::{Error, Result};

/// The manifest's file name inside a workspace.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// Suffix of files being written; whatever carries it after a crash is discarded.
pub(crate) const TEMP_SUFFIX: &str = ".tmp";
/// Header and manifest bytes reserved per layer when checking free space.
const PER_LAYER_OVERHEAD: u64 = 1 << 20;

/// Options for [`Workspace::convert`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConvertOptions {
    /// Convert float tensors to this compute dtype. `None` keeps stored dtypes.
    pub dtype: Option<StoredDType>,
    /// How to read the source.
    pub strategy: ReadStrategy,
}

impl ConvertOptions {
    /// Options converting floats to `dtype`.
    pub fn with_dtype(dtype: Option<StoredDType>) -> ConvertOptions {
        ConvertOptions {
            dtype,
            ..ConvertOptions::default()
        }
    }
}

/// What happened to a layer during [`Workspace::convert`], reported as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConvertEvent {
    /// A tensor was converted into the layer being written.
    TensorDone(String),
    /// The layer's file was written and recorded in the manifest.
    LayerWritten,
    /// A file from an earlier run matched its checksum and was kept.
    LayerReused,
    /// The layer is streamed from the source as it is; nothing is written.
    LayerInPlace,
}

/// Progress of [`Workspace::convert`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConvertProgress {
    /// The layer.
    pub layer: LayerId,
    /// What happened.
    pub event: ConvertEvent,
    /// Source bytes handled so far, this layer's included when it is finished.
    pub bytes_done: u64,
    /// Source bytes in all layers.
    pub bytes_total: u64,
}

/// What [`Workspace::convert`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConvertReport {
    /// Layers written in this run.
    pub written: Vec<LayerId>,
    /// Layers from an earlier run whose checksums matched.
    pub reused: Vec<LayerId>,
    /// Layers whose files were missing or corrupt and were written again.
    pub rebuilt: Vec<LayerId>,
    /// Layers streamed from the source as they are.
    pub in_place: Vec<LayerId>,
    /// Bytes written in this run.
    pub bytes_written: u64,
}

/// One tensor for [`Workspace::write_layer`].
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct TensorBytes<'a> {
    /// Its name.
    pub name: &'a str,
    /// Its dtype.
    pub dtype: StoredDType,
    /// Its shape.
    pub shape: &'a [usize],
    /// Its bytes, little-endian.
    pub bytes: &'a [u8],
}

impl<'a> TensorBytes<'a> {
    /// A tensor to write.
    pub fn new(name: &'a str, dtype: StoredDType, shape: &'a [usize], bytes: &'a [u8]) -> Self {
        TensorBytes {
            name,
            dtype,
            shape,
            bytes,
        }
    }
}

/// A workspace folder (`config.memory.workspace_dir`).
///
/// ```
/// use memwise_model::{Checkpoint, ReadStrategy, Workspace};
/// use memwise_model::checkpoint::LayerId;
/// use memwise_model::workspace::ConvertOptions;
///
/// let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama-bin");
/// let source = Checkpoint::open(folder)?;
/// let dir = tempfile::tempdir().unwrap();
/// let workspace = Workspace::new(dir.path())?;
/// let report = workspace.convert(&source, &ConvertOptions::default(), &mut |_| {})?;
/// // Every layer of a .bin source is written, except the head: its only tensor is tied to
/// // the embeddings, which are already there.
/// assert_eq!(report.written.len(), source.layers().len() - 1);
/// assert_eq!(report.in_place, [LayerId::Head]);
///
/// // The runner reads the converted layers through the same reader.
/// let converted = workspace.checkpoint(&source)?;
/// let mut reader = converted.reader(ReadStrategy::default());
/// let head = reader.read_layer(&LayerId::Head)?;
/// assert!(head.get("lm_head.weight").is_some());
/// # Ok::<(), memwise_model::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct Workspace {
    dir: PathBuf,
}

impl Workspace {
    /// Opens (creating if needed) the workspace folder `dir`.
    pub fn new(dir: impl AsRef<Path>) -> Result<Workspace> {
        let dir = dir.as_ref().to_owned();
        fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        Ok(Workspace { dir })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn manifest_path(&self) -> PathBuf {
        self.dir.join(MANIFEST_FILE)
    }

    /// The manifest, or `None` if nothing was written yet.
    pub fn manifest(&self) -> Result<Option<Manifest>> {
        let path = self.manifest_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading", &path, e)),
        };
        let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Workspace {
            manifest: path.clone(),
            reason: format!("unreadable manifest: {e}"),
        })?;
        if manifest.format_version != MANIFEST_VERSION {
            return Err(Error::Workspace {
                manifest: path,
                reason: format!(
                    "format version {} is not {MANIFEST_VERSION}; remove the workspace to rebuild it",
                    manifest.format_version
                ),
            });
        }
        Ok(Some(manifest))
    }

    /// The manifest for `source` and `options`: the existing one if it was built from the
    /// same source and conversion, a fresh one (old layer files removed) if the same folder
    /// changed since, and an error if it belongs to another model.
    fn manifest_for(&self, source: &Checkpoint, dtype: Option<StoredDType>) -> Result<Manifest> {
        let fingerprint = fingerprint(source, dtype)?;
        let fresh = Manifest {
            format_version: MANIFEST_VERSION,
            source: fingerprint.clone(),
            layers: Vec::new(),
        };
        let Some(existing) = self.manifest()? else {
            return Ok(fresh);
        };
        if existing.source == fingerprint {
            return Ok(existing);
        }
        if existing.source.folder != fingerprint.folder {
            return Err(Error::Workspace {
                manifest: self.manifest_path(),
                reason: format!(
                    "holds layers of {} (fingerprint {}), not {}; choose another workspace",
                    existing.source.folder.display(),
                    existing.source.fingerprint,
                    fingerprint.folder.display()
                ),
            });
        }
        // Same model folder, different files or dtype: the old layers are stale.
        for layer in &existing.layers {
            remove_if_present(&self.dir.join(&layer.file))?;
        }
        self.save_manifest(&fresh)?;
        Ok(fresh)
    }

    fn save_manifest(&self, manifest: &Manifest) -> Result<()> {
        let json = serde_json::to_vec_pretty(manifest).map_err(|e| Error::Workspace {
            manifest: self.manifest_path(),
            reason: format!("cannot encode manifest: {e}"),
        })?;
        write_atomically(&self.dir, MANIFEST_FILE, &[&json]).map(|_| ())
    }

    /// Writes every layer of `source` that cannot be streamed as it is, resuming from and
    /// verifying any earlier run, then verifies the whole workspace.
    pub fn convert(
        &self,
        source: &Checkpoint,
        options: &ConvertOptions,
        progress: &mut dyn FnMut(&ConvertProgress),
    ) -> Result<ConvertReport> {
        let mut manifest = self.manifest_for(source, options.dtype)?;
        self.remove_temporaries()?;
        let bytes_total = source
            .layers()
            .iter()
            .map(|l| l.bytes)
            .fold(0, u64::saturating_add);
        let mut report = ConvertReport::default();
        let mut bytes_done = 0u64;
        let mut to_write = Vec::new();
        for layer in source.layers() {
            let from_hook =
                recorded(&manifest, &layer.id).map(|l| l.origin) == Some(LayerOrigin::Hook);
            let event = if !from_hook && !needs_workspace(source, &layer.id, options.dtype) {
                report.in_place.push(layer.id.clone());
                ConvertEvent::LayerInPlace
            } else if self.recorded_and_intact(&manifest, &layer.id)? {
                report.reused.push(layer.id.clone());
                ConvertEvent::LayerReused
            } else {
                if recorded(&manifest, &layer.id).is_some() {
                    report.rebuilt.push(layer.id.clone());
                }
                to_write.push(layer.id.clone());
                continue;
            };
            bytes_done = bytes_done.saturating_add(layer.bytes);
            progress(&ConvertProgress {
                layer: layer.id.clone(),
                event,
                bytes_done,
                bytes_total,
            });
        }
        self.check_free_space(source, &to_write, options.dtype)?;
        let mut reader = source.reader(options.strategy);
        for id in to_write {
            let data = reader.read_layer(&id)?;
            // Tied tensors are not stored; the overlay re-derives them from their source.
            let stored: Vec<_> = data
                .tensors()
                .iter()
                .filter(|t| t.info().tied_to.is_none())
                .collect();
            let mut converted = Vec::with_capacity(stored.len());
            let mut layer_done = 0u64;
            for tensor in &stored {
                let target = target_dtype(tensor.dtype(), options.dtype);
                converted.push((target, tensor.to_dtype(target)?));
                layer_done = layer_done.saturating_add(tensor.info().byte_len());
                progress(&ConvertProgress {
                    layer: id.clone(),
                    event: ConvertEvent::TensorDone(tensor.name().to_owned()),
                    bytes_done: bytes_done.saturating_add(layer_done),
                    bytes_total,
                });
            }
            let tensors: Vec<TensorBytes<'_>> = stored
                .iter()
                .zip(&converted)
                .map(|(t, (dtype, bytes))| TensorBytes::new(t.name(), *dtype, t.shape(), bytes))
                .collect();
            let entry = self.write_layer_file(&id, &tensors, LayerOrigin::Source)?;
            report.bytes_written += entry.bytes;
            bytes_done = bytes_done.saturating_add(data.byte_len());
            drop(data);
            record(&mut manifest, entry);
            self.save_manifest(&manifest)?;
            if !report.rebuilt.contains(&id) {
                report.written.push(id.clone());
            }
            progress(&ConvertProgress {
                layer: id,
                event: ConvertEvent::LayerWritten,
                bytes_done,
                bytes_total,
            });
        }
        // Recorded even when nothing was written, so a runner can always ask this
        // workspace for the checkpoint to read.
        self.save_manifest(&manifest)?;
        self.verify()?;
        Ok(report)
    }

    /// Records a layer that a hook changed, so a runner reads it from here from now on.
    /// `options` must be those the workspace was (or will be) converted with.
    pub fn write_layer(
        &self,
        source: &Checkpoint,
        options: &ConvertOptions,
        layer: &LayerId,
        tensors: &[TensorBytes<'_>],
    ) -> Result<()> {
        let mut manifest = self.manifest_for(source, options.dtype)?;
        let needed: u64 = tensors.iter().map(|t| t.bytes.len() as u64).sum();
        self.check_space_for(needed + PER_LAYER_OVERHEAD)?;
        let entry = self.write_layer_file(layer, tensors, LayerOrigin::Hook)?;
        record(&mut manifest, entry);
        self.save_manifest(&manifest)
    }

    fn write_layer_file(
        &self,
        layer: &LayerId,
        tensors: &[TensorBytes<'_>],
        origin: LayerOrigin,
    ) -> Result<ManifestLayer> {
        for tensor in tensors {
            let expected = tensor.dtype.byte_len(tensor.shape);
            if expected != Some(tensor.bytes.len() as u64) {
                return Err(Error::tensor(
                    self.dir.join(layer.file_stem()),
                    tensor.name,
                    format!(
                        "shape {:?} of {} does not match its {} bytes",
                        tensor.shape,
                        tensor.dtype,
                        tensor.bytes.len()
                    ),
                ));
            }
        }
        let headers: Vec<TensorHeader<'_>> = tensors
            .iter()
            .map(|t| TensorHeader {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
            })
            .collect();
        let header = encode_header(&headers);
        let mut parts: Vec<&[u8]> = vec![&header];
        parts.extend(tensors.iter().map(|t| t.bytes));
        let file = format!("{}.safetensors", layer.file_stem());
        let (bytes, checksum) = write_atomically(&self.dir, &file, &parts)?;
        Ok(ManifestLayer {
            layer: layer.to_string(),
            file,
            bytes,
            checksum,
            origin,
            tensors: tensors
                .iter()
                .map(|t| ManifestTensor {
                    name: t.name.to_owned(),
                    dtype: t.dtype.safetensors_name().to_owned(),
                    shape: t.shape.to_vec(),
                })
                .collect(),
        })
    }

    /// Checks every layer file against the manifest's checksum. The first mismatch is an
    /// [`Error::ChecksumMismatch`] naming the file.
    pub fn verify(&self) -> Result<()> {
        let Some(manifest) = self.manifest()? else {
            return Ok(());
        };
        for layer in &manifest.layers {
            let path = self.dir.join(&layer.file);
            let actual = checksum_file(&path)?;
            if actual != layer.checksum {
                return Err(Error::ChecksumMismatch {
                    file: path,
                    expected: layer.checksum.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// `source` as a runner should read it: layers recorded here come from the workspace,
    /// the rest from the source files.
    pub fn checkpoint(&self, source: &Checkpoint) -> Result<Checkpoint> {
        let path = self.manifest_path();
        let manifest = self.manifest()?.ok_or_else(|| Error::Workspace {
            manifest: path.clone(),
            reason: "no manifest: the workspace was never converted".into(),
        })?;
        let dtype = manifest
            .source
            .dtype
            .as_deref()
            .and_then(StoredDType::from_safetensors_name);
        if manifest.source != fingerprint(source, dtype)? {
            return Err(Error::Workspace {
                manifest: path,
                reason: format!(
                    "was built from another version of {}; convert again",
                    manifest.source.folder.display()
                ),
            });
        }
        let mut overrides = Vec::with_capacity(manifest.layers.len());
        for layer in &manifest.layers {
            let file = self.dir.join(&layer.file);
            let tensors = read_safetensors(&file)?;
            check_matches_manifest(&path, &file, layer, &tensors)?;
            overrides.push(tensors);
        }
        source.with_layer_overrides(overrides)
    }

    fn recorded_and_intact(&self, manifest: &Manifest, layer: &LayerId) -> Result<bool> {
        let Some(entry) = recorded(manifest, layer) else {
            return Ok(false);
        };
        let path = self.dir.join(&entry.file);
        let actual = match checksum_file(&path) {
            Ok(actual) => actual,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        if actual == entry.checksum {
            return Ok(true);
        }
        if entry.origin == LayerOrigin::Hook {
            // A hook's output cannot be rebuilt from the source: report, don't overwrite.
            return Err(Error::ChecksumMismatch {
                file: path,
                expected: entry.checksum.clone(),
                actual,
            });
        }
        Ok(false)
    }

    fn remove_temporaries(&self) -> Result<()> {
        let entries = fs::read_dir(&self.dir).map_err(|e| Error::io("listing", &self.dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("listing", &self.dir, e))?;
            if entry.file_name().to_string_lossy().ends_with(TEMP_SUFFIX) {
                remove_if_present(&entry.path())?;
            }
        }
        Ok(())
    }

    fn check_free_space(
        &self,
        source: &Checkpoint,
        layers: &[LayerId],
        dtype: Option<StoredDType>,
    ) -> Result<()> {
        let needed: u64 = layers
            .iter()
            .filter_map(|id| source.index().layer(id))
            .flat_map(|layer| &layer.tensors)
            .filter_map(|name| source.index().get(name))
            .filter(|t| t.tied_to.is_none())
            .map(|t| converted_len(t, dtype))
            .fold(
                PER_LAYER_OVERHEAD * layers.len() as u64,
                u64::saturating_add,
            );
        self.check_space_for(needed)
    }

    fn check_space_for(&self, needed: u64) -> Result<()> {
        refuse_shortfall(&self.dir, needed, available_bytes(&self.dir)?)
    }
}

/// A write of `needed` bytes into `dir` with `available` free is refused before it starts:
/// a half-written layer on a full disk is how corrupt checkpoints are born.
fn refuse_shortfall(dir: &Path, needed: u64, available: u64) -> Result<()> {
    if needed > available {
        return Err(Error::InsufficientDisk {
            dir: dir.to_owned(),
            needed,
            available,
        });
    }
    Ok(())
}

/// Whether layer `id` of `source` must be written to a workspace to be run in `dtype`.
pub fn needs_workspace(source: &Checkpoint, id: &LayerId, dtype: Option<StoredDType>) -> bool {
    let Some(layer) = source.index().layer(id) else {
        return false;
    };
    let stored: Vec<&TensorInfo> = layer
        .tensors
        .iter()
        .filter_map(|name| source.index().get(name))
        .filter(|t| t.tied_to.is_none())
        .collect();
    if stored.is_empty() {
        return false;
    }
    !source.format().is_safetensors()
        || stored
            .iter()
            .any(|t| target_dtype(t.dtype, dtype) != t.dtype)
}

fn target_dtype(stored: StoredDType, compute: Option<StoredDType>) -> StoredDType {
    match compute {
        Some(compute) if stored.is_float() && compute.is_float() => compute,
        _ => stored,
    }
}

fn converted_len(tensor: &TensorInfo, dtype: Option<StoredDType>) -> u64 {
    let target = target_dtype(tensor.dtype, dtype);
    target.byte_len(&tensor.shape).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shortfall_is_refused_with_both_figures() {
        let dir = Path::new("/data/ws");
        let err = refuse_shortfall(dir, 10 << 30, 3 << 30).unwrap_err();
        assert!(matches!(err, Error::InsufficientDisk { .. }));
        assert_eq!(
            err.to_string(),
            "not enough disk space in /data/ws: 10737418240 bytes needed, 3221225472 available"
        );
        refuse_shortfall(dir, 3 << 30, 3 << 30).unwrap();
    }

    #[test]
    fn reads_free_space() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available_bytes(dir.path()).unwrap() > 0);
        assert!(available_bytes(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn atomic_writes_leave_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let (len, checksum) = write_atomically(dir.path(), "f", &[b"ab", b"c"]).unwrap();
        assert_eq!(len, 3);
        assert_eq!(checksum, checksum_file(&dir.path().join("f")).unwrap());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
