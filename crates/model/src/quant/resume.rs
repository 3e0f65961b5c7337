//! What makes [`quantize_checkpoint`](super::quantize_checkpoint) resumable: the progress
//! record (`quantize-manifest.json`) in the folder a run builds its output in.
//!
//! Each stage writes its tensors straight into the output's shards, at places fixed before
//! the run began (see `layout.rs`), and syncs them; the record, rewritten atomically after
//! each stage, lists every finished stage with its bytes, checksum and tensors, beside the
//! source's fingerprint and the options. A rerun with the same source and options verifies
//! the recorded stages' bytes in the shards in order and continues after the last one that
//! matches; anything else starts over, and [`Start`] says which and why.

use std::fmt;
use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Error, QuantizeOptions};
use crate::checkpoint::Checkpoint;
use crate::error::Error as ReadError;
use crate::workspace::{fingerprint, write_atomically, SourceFingerprint};

/// The progress record's file name inside the partial folder.
pub(super) const RECORD_FILE: &str = "quantize-manifest.json";
/// The record format this build writes and reads.
const RECORD_VERSION: u32 = 2;

/// How a run of [`quantize_checkpoint`](super::quantize_checkpoint) began.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Start {
    /// No interrupted run had left anything: every stage is quantized.
    Fresh,
    /// An interrupted run of the same source with the same options had finished `stages`
    /// stages, whose bytes in the shards matched their checksums; the run continued after
    /// them.
    Resumed {
        /// Stages kept from the interrupted run.
        stages: usize,
        /// Why fewer stages were kept than the interrupted run recorded (a shard missing, or
        /// a stage's bytes not matching its checksum), if so.
        note: Option<String>,
    },
    /// An interrupted run's output could not be continued (`reason`: another source, a
    /// changed one, other options, no readable record); it was removed and the run started
    /// over.
    Restarted {
        /// Why it could not be continued.
        reason: String,
    },
}

impl fmt::Display for Start {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Start::Fresh => write!(f, "starting afresh"),
            Start::Resumed { stages, note } => {
                write!(
                    f,
                    "resuming an interrupted run after its {stages} verified stage(s)"
                )?;
                match note {
                    Some(note) => write!(f, " ({note})"),
                    None => Ok(()),
                }
            }
            Start::Restarted { reason } => write!(
                f,
                "starting over: the interrupted run's output was removed because {reason}"
            ),
        }
    }
}

/// The options as recorded, to compare a rerun's with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RecordedOptions {
    bits: u8,
    group_size: i64,
    sym: bool,
    format: String,
    max_shard_bytes: u64,
}

impl RecordedOptions {
    fn of(options: &QuantizeOptions) -> RecordedOptions {
        let scheme = options.scheme();
        RecordedOptions {
            bits: scheme.bits(),
            group_size: scheme.group_size().to_auto_round(),
            sym: scheme.sym(),
            format: format!("{:?}", options.format()),
            max_shard_bytes: options.max_shard_bytes.get(),
        }
    }
}

impl fmt::Display for RecordedOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bits, group size {}, {}, {} format, shards of at most {} bytes",
            self.bits,
            self.group_size,
            if self.sym { "symmetric" } else { "asymmetric" },
            self.format,
            self.max_shard_bytes
        )
    }
}

/// One tensor a stage writes, in the order its bytes are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct WrittenTensor {
    pub name: String,
    /// As safetensors names it.
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

/// One finished stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StageRecord {
    /// The stage's name, e.g. `model.layers.3`.
    pub stage: String,
    pub bytes: u64,
    /// `crc32:xxxxxxxx` of its tensors' bytes, in order.
    pub checksum: String,
    pub tensors: Vec<WrittenTensor>,
    /// Modules whose weights were quantized.
    pub quantized: Vec<String>,
    /// Modules with a matrix kept as stored.
    pub kept_matrices: Vec<String>,
    /// Tensors kept as stored.
    pub kept: usize,
}

/// `quantize-manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Record {
    format_version: u32,
    source: SourceFingerprint,
    options: RecordedOptions,
    pub stages: Vec<StageRecord>,
}

impl Record {
    /// Writes the record atomically into `partial`.
    pub(super) fn save(&self, partial: &Path) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| ReadError::io("writing", partial.join(RECORD_FILE), e.into()))?;
        write_atomically(partial, RECORD_FILE, &[&json])?;
        Ok(())
    }
}

/// What a rerun checks an interrupted run's stages against: the stages due, in order, the
/// shard files that may stay, and how to verify a recorded stage (why it cannot be kept,
/// if so).
pub(super) struct Expected<'a> {
    pub stages: &'a [String],
    pub files: &'a [String],
    pub verify: &'a dyn Fn(usize, &StageRecord) -> Option<String>,
}

/// Makes `partial` ready for a run quantizing `checkpoint`: continues an interrupted run
/// where its record allows (removing every file but the record and the shards), or starts
/// over, and returns the record to extend and how the run began.
pub(super) fn prepare(
    partial: &Path,
    checkpoint: &Checkpoint,
    options: &QuantizeOptions,
    expected: &Expected<'_>,
) -> Result<(Record, Start), Error> {
    let mut record = Record {
        format_version: RECORD_VERSION,
        source: fingerprint(checkpoint, None)?,
        options: RecordedOptions::of(options),
        stages: Vec::new(),
    };
    let start = if partial.exists() {
        match continuable(partial, &record, expected) {
            Ok((kept, note)) => {
                record.stages = kept;
                remove_unrecorded(partial, expected.files)?;
                record.save(partial)?;
                let stages = record.stages.len();
                return Ok((record, Start::Resumed { stages, note }));
            }
            Err(reason) => {
                // Left by an interrupted run of ours: its name is ours alone.
                fs::remove_dir_all(partial).map_err(|e| ReadError::io("removing", partial, e))?;
                Start::Restarted { reason }
            }
        }
    } else {
        Start::Fresh
    };
    fs::create_dir_all(partial).map_err(|e| ReadError::io("creating", partial, e))?;
    record.save(partial)?;
    Ok((record, start))
}

/// The stages of the interrupted run in `partial` that can be kept (the longest run of
/// recorded stages, in order, whose bytes match), and why any recorded ones cannot; or why
/// nothing of it can be continued.
fn continuable(
    partial: &Path,
    fresh: &Record,
    expected: &Expected<'_>,
) -> Result<(Vec<StageRecord>, Option<String>), String> {
    let path = partial.join(RECORD_FILE);
    let bytes = fs::read(&path).map_err(|e| {
        format!(
            "its progress record {} cannot be read ({e})",
            path.display()
        )
    })?;
    let old: Record = serde_json::from_slice(&bytes)
        .map_err(|e| format!("its progress record {} is unreadable ({e})", path.display()))?;
    if old.format_version != fresh.format_version {
        return Err(format!(
            "its progress record has format version {}, not {}",
            old.format_version, fresh.format_version
        ));
    }
    if old.source.folder != fresh.source.folder {
        return Err(format!(
            "it was made from {}, not {}",
            old.source.folder.display(),
            fresh.source.folder.display()
        ));
    }
    if old.source != fresh.source {
        return Err(format!(
            "the source's weight files changed since (fingerprint {} then, {} now)",
            old.source.fingerprint, fresh.source.fingerprint
        ));
    }
    if old.options != fresh.options {
        return Err(format!(
            "it was made with other options ({}; now {})",
            old.options, fresh.options
        ));
    }
    let mut kept = Vec::with_capacity(old.stages.len());
    let mut note = None;
    for (i, stage) in old.stages.into_iter().enumerate() {
        let stages = expected.stages;
        let problem = if stages.get(i) != Some(&stage.stage) {
            Some(format!(
                "stage {} was recorded where {} is due",
                stage.stage,
                stages.get(i).map_or("nothing", String::as_str)
            ))
        } else {
            (expected.verify)(i, &stage)
        };
        if let Some(problem) = problem {
            note = Some(format!("{problem}; it and the stages after it are redone"));
            break;
        }
        kept.push(stage);
    }
    Ok((kept, note))
}

/// Removes from `partial` everything but the record and the shard files `keep`
/// (temporaries, and whatever else an interrupted run had begun to write).
fn remove_unrecorded(partial: &Path, keep: &[String]) -> Result<(), Error> {
    let entries = fs::read_dir(partial).map_err(|e| ReadError::io("listing", partial, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ReadError::io("listing", partial, e))?;
        let name = entry.file_name();
        if name == RECORD_FILE || keep.iter().any(|k| name == **k) {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| ReadError::io("removing", &path, e))?;
    }
    Ok(())
}
