//! The workspace: per-stage files for what cannot be streamed from the source as it is.
//!
//! A safetensors source is read in place and never copied. The workspace holds only stages
//! that need rewriting: every stage of a `.bin` source, stages whose float tensors are
//! converted to another compute dtype, and stages a hook changed. Each is one safetensors
//! file named after the stage; `manifest.json` records the format version, a fingerprint of
//! the source, and each file's stage, checksum and tensors. A stage is the unit throughout:
//! a hook that changes the tied `lm_head` (which reads `model.embed_tokens.weight`) is
//! recorded for `lm_head` alone, and the embeddings keep reading the source.
//!
//! Crash safety: every file is written to a temporary name, synced, and renamed into place,
//! and the manifest is rewritten the same way after each stage, so a run killed at any point
//! leaves only whole files that the manifest vouches for (plus temporaries, which the next
//! run removes). The next run verifies the checksums of what is there, rewrites what does
//! not match, writes the rest, and verifies the whole workspace at the end.

mod files;
mod manifest;

pub use self::manifest::{
    Manifest, ManifestStage, ManifestTensor, Origin, SourceFile, SourceFingerprint,
};

pub(crate) use self::files::{checksum_file, remove_if_present, write_atomically};
pub(crate) use self::manifest::fingerprint;

use self::files::available_bytes;
use self::manifest::{check_matches_manifest, record, recorded};
use std::fs;
use std::path::{Path, PathBuf};

use crate::checkpoint::{
    encode_header, read_safetensors, Checkpoint, ReadStrategy, StageTensors, StoredDType,
    TensorHeader, TensorIndex, TensorInfo,
};
use crate::error::{Error, Result};

/// The manifest's file name inside a workspace.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The manifest format this build writes and reads.
pub const MANIFEST_VERSION: u32 = 2;
/// Suffix of files being written; whatever carries it after a crash is discarded.
pub(crate) const TEMP_SUFFIX: &str = ".tmp";
/// Header and manifest bytes reserved per stage when checking free space.
const PER_STAGE_OVERHEAD: u64 = 1 << 20;

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

/// What happened to a stage during [`Workspace::convert`], reported as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConvertEvent {
    /// A tensor was converted into the stage being written.
    TensorDone(String),
    /// The stage's file was written and recorded in the manifest.
    StageWritten,
    /// A file from an earlier run matched its checksum and was kept.
    StageReused,
    /// The stage is streamed from the source as it is (or reads only tensors an earlier
    /// stage's file holds); nothing is written.
    StageInPlace,
}

/// Progress of [`Workspace::convert`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConvertProgress {
    /// The stage.
    pub stage: String,
    /// What happened.
    pub event: ConvertEvent,
    /// Source bytes handled so far, this stage's included when it is finished.
    pub bytes_done: u64,
    /// Source bytes in all stages.
    pub bytes_total: u64,
}

/// What [`Workspace::convert`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConvertReport {
    /// Stages written in this run.
    pub written: Vec<String>,
    /// Stages from an earlier run whose checksums matched.
    pub reused: Vec<String>,
    /// Stages whose files were missing or corrupt and were written again.
    pub rebuilt: Vec<String>,
    /// Stages streamed from the source as they are.
    pub in_place: Vec<String>,
    /// Bytes written in this run.
    pub bytes_written: u64,
}

/// One tensor for [`Workspace::write_stage`].
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
/// use memwise_model::workspace::ConvertOptions;
///
/// let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama-bin");
/// let source = Checkpoint::open(folder)?;
/// let dir = tempfile::tempdir().unwrap();
/// let workspace = Workspace::new(dir.path())?;
/// let report = workspace.convert(&source, &ConvertOptions::default(), &mut |_| {})?;
/// // Every stage of a .bin source is written, except the tied head: it reads only the
/// // embeddings, which are already there.
/// assert_eq!(report.written.len(), source.stages().len() - 1);
/// assert_eq!(report.in_place, ["lm_head"]);
///
/// // The runner reads the converted stages through the same reader.
/// let converted = workspace.checkpoint(&source)?;
/// let mut reader = converted.reader(ReadStrategy::default());
/// let head = reader.read_stage("lm_head")?;
/// assert!(head.get("model.embed_tokens.weight").is_some());
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
            stages: Vec::new(),
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
                    "holds stages of {} (fingerprint {}), not {}; choose another workspace",
                    existing.source.folder.display(),
                    existing.source.fingerprint,
                    fingerprint.folder.display()
                ),
            });
        }
        // Same model folder, different files or dtype: the old stages are stale.
        for entry in &existing.stages {
            remove_if_present(&self.dir.join(&entry.file))?;
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

    /// Writes every stage of `source` that cannot be streamed as it is, resuming from and
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
            .stages()
            .iter()
            .map(|s| s.bytes)
            .fold(0, u64::saturating_add);
        let mut report = ConvertReport::default();
        let mut bytes_done = 0u64;
        let mut to_write = Vec::new();
        for stage in source.stages() {
            let name = &stage.name;
            let from_hook = recorded(&manifest, name).map(|s| s.origin) == Some(Origin::Hook);
            let event = if !from_hook && own_tensors(source, stage, options.dtype).is_empty() {
                report.in_place.push(name.clone());
                ConvertEvent::StageInPlace
            } else if self.recorded_and_intact(&manifest, name)? {
                report.reused.push(name.clone());
                ConvertEvent::StageReused
            } else {
                if recorded(&manifest, name).is_some() {
                    report.rebuilt.push(name.clone());
                }
                to_write.push(stage);
                continue;
            };
            bytes_done = bytes_done.saturating_add(stage.bytes);
            progress(&ConvertProgress {
                stage: name.clone(),
                event,
                bytes_done,
                bytes_total,
            });
        }
        self.check_free_space(source, &to_write, options.dtype)?;
        let mut reader = source.reader(options.strategy);
        for stage in to_write {
            let name = stage.name.clone();
            let own = own_tensors(source, stage, options.dtype);
            let data = reader.read_tensors(Some(&name), &own)?;
            let mut converted = Vec::with_capacity(own.len());
            let mut stage_done = 0u64;
            for tensor in data.tensors() {
                let target = target_dtype(tensor.dtype(), options.dtype);
                converted.push((target, tensor.to_dtype(target)?));
                stage_done = stage_done.saturating_add(tensor.info().byte_len());
                progress(&ConvertProgress {
                    stage: name.clone(),
                    event: ConvertEvent::TensorDone(tensor.name().to_owned()),
                    bytes_done: bytes_done.saturating_add(stage_done),
                    bytes_total,
                });
            }
            let tensors: Vec<TensorBytes<'_>> = data
                .tensors()
                .iter()
                .zip(&converted)
                .map(|(t, (dtype, bytes))| TensorBytes::new(t.name(), *dtype, t.shape(), bytes))
                .collect();
            let entry = self.write_stage_file(&name, &tensors, Origin::Source)?;
            report.bytes_written += entry.bytes;
            bytes_done = bytes_done.saturating_add(stage.bytes);
            drop(data);
            record(&mut manifest, entry);
            self.save_manifest(&manifest)?;
            if !report.rebuilt.contains(&name) {
                report.written.push(name.clone());
            }
            progress(&ConvertProgress {
                stage: name,
                event: ConvertEvent::StageWritten,
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

    /// Records stage `stage` as a hook changed it, so a runner reads that stage from here
    /// from now on (other stages that read the same tensors keep reading theirs).
    /// `options` must be those the workspace was (or will be) converted with.
    pub fn write_stage(
        &self,
        source: &Checkpoint,
        options: &ConvertOptions,
        stage: &str,
        tensors: &[TensorBytes<'_>],
    ) -> Result<()> {
        let mut manifest = self.manifest_for(source, options.dtype)?;
        let needed: u64 = tensors.iter().map(|t| t.bytes.len() as u64).sum();
        self.check_space_for(needed + PER_STAGE_OVERHEAD)?;
        let entry = self.write_stage_file(stage, tensors, Origin::Hook)?;
        record(&mut manifest, entry);
        self.save_manifest(&manifest)
    }

    fn write_stage_file(
        &self,
        stage: &str,
        tensors: &[TensorBytes<'_>],
        origin: Origin,
    ) -> Result<ManifestStage> {
        let file = format!("{}.safetensors", file_stem(stage));
        for tensor in tensors {
            let expected = tensor.dtype.byte_len(tensor.shape);
            if expected != Some(tensor.bytes.len() as u64) {
                return Err(Error::tensor(
                    self.dir.join(&file),
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
        let (bytes, checksum) = write_atomically(&self.dir, &file, &parts)?;
        Ok(ManifestStage {
            stage: stage.to_owned(),
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

    /// Checks every stage file against the manifest's checksum. The first mismatch is an
    /// [`Error::ChecksumMismatch`] naming the file.
    pub fn verify(&self) -> Result<()> {
        let Some(manifest) = self.manifest()? else {
            return Ok(());
        };
        for entry in &manifest.stages {
            let path = self.dir.join(&entry.file);
            let actual = checksum_file(&path)?;
            if actual != entry.checksum {
                return Err(Error::ChecksumMismatch {
                    file: path,
                    expected: entry.checksum.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    /// `source` as a runner should read it: stages recorded here come from the workspace,
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
        let mut overrides = std::collections::HashMap::with_capacity(manifest.stages.len());
        for entry in &manifest.stages {
            let file = self.dir.join(&entry.file);
            let tensors = read_safetensors(&file)?;
            check_matches_manifest(&path, &file, entry, &tensors)?;
            overrides.insert(entry.stage.clone(), TensorIndex::build(vec![tensors])?);
        }
        Ok(source.with_stage_overrides(overrides))
    }

    fn recorded_and_intact(&self, manifest: &Manifest, stage: &str) -> Result<bool> {
        let Some(entry) = recorded(manifest, stage) else {
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
        if entry.origin == Origin::Hook {
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
        stages: &[&StageTensors],
        dtype: Option<StoredDType>,
    ) -> Result<()> {
        let needed: u64 = stages
            .iter()
            .flat_map(|stage| own_tensors(source, stage, dtype))
            .filter_map(|name| source.index().get(name))
            .map(|t| converted_len(t, dtype))
            .fold(
                PER_STAGE_OVERHEAD * stages.len() as u64,
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

/// The tensors stage `stage` of `source` must have in its own workspace file to be run in
/// `dtype`: none when the source can be streamed as it is; otherwise the stored tensors it
/// is the first stage to read (a tied head reads the embeddings' file) and aliases aside.
fn own_tensors<'s>(
    source: &'s Checkpoint,
    stage: &'s StageTensors,
    dtype: Option<StoredDType>,
) -> Vec<&'s str> {
    let stored: Vec<&TensorInfo> = stage
        .tensors
        .iter()
        .filter(|name| source.first_reader(name) == Some(stage.name.as_str()))
        .filter_map(|name| source.index().get(name))
        .filter(|t| t.tied_to.is_none())
        .collect();
    let rewrite = !source.format().is_safetensors()
        || stored
            .iter()
            .any(|t| target_dtype(t.dtype, dtype) != t.dtype);
    if !rewrite {
        return Vec::new();
    }
    stored.iter().map(|t| t.name.as_str()).collect()
}

/// A file name for stage `stage`: its name with anything but letters, digits, `.`, `_`
/// and `-` replaced, so a name from an untrusted checkpoint cannot leave the folder.
fn file_stem(stage: &str) -> String {
    stage
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
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
