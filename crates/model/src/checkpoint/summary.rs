//! What `memwise inspect` prints: the shape of a checkpoint and the memory it needs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::checkpoint::index::TiedWeight;
use crate::checkpoint::{stages, Checkpoint, SourceFormat, StageOrigin};

/// One stage's size, by dtype.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StageSummary {
    /// The stage's name, e.g. `model.layers.3`.
    pub stage: String,
    /// How many tensors it has.
    pub tensors: usize,
    /// Bytes it occupies when loaded.
    pub bytes: u64,
    /// Its bytes per stored dtype (`"bf16" → bytes`).
    pub bytes_by_dtype: BTreeMap<String, u64>,
}

/// A checkpoint at a glance: architecture, stages, sizes, ties, and memory needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CheckpointSummary {
    /// The model folder.
    pub folder: PathBuf,
    /// How its weights are stored.
    pub format: SourceFormat,
    /// `architectures[0]` from `config.json`.
    pub architecture: Option<String>,
    /// `model_type` from `config.json`.
    pub model_type: Option<String>,
    /// Whether the stages were traced from the model's blocks or grouped by module.
    pub stage_origin: StageOrigin,
    /// Stages that repeat (decoder or encoder layers): those with a numbered name.
    pub block_count: usize,
    /// Tensors in the index (tied aliases included).
    pub tensor_count: usize,
    /// Every stage, in the order the runner streams them.
    pub stages: Vec<StageSummary>,
    /// The stage with the most bytes.
    pub largest_stage: Option<StageSummary>,
    /// Bytes stored, each tied tensor counted once.
    pub total_bytes: u64,
    /// Tensors that share another tensor's bytes.
    pub tied: Vec<TiedWeight>,
    /// Stored tensors that no stage reads (buffers such as position ids, a pooler the
    /// model does not run), in file order.
    pub unread_tensors: Vec<String>,
    /// Weight memory to load the whole model at once: every stored byte.
    pub full_load_bytes: u64,
    /// Weight memory to run stage by stage: the largest pair of neighbouring stages, since a
    /// streaming runner holds the running stage while it prefetches the next.
    pub stage_by_stage_bytes: u64,
}

impl Checkpoint {
    /// Summarises the checkpoint for `memwise inspect`.
    ///
    /// ```
    /// use memwise_model::Checkpoint;
    ///
    /// let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama-tied");
    /// let summary = Checkpoint::open(folder)?.summary();
    /// assert_eq!(summary.block_count, 2);
    /// assert_eq!(summary.tied[0].tensor, "lm_head.weight");
    /// assert!(summary.stage_by_stage_bytes < summary.full_load_bytes);
    /// # Ok::<(), memwise_model::Error>(())
    /// ```
    pub fn summary(&self) -> CheckpointSummary {
        let index = self.index();
        let stages: Vec<StageSummary> = self
            .stages()
            .iter()
            .map(|stage| {
                let mut bytes_by_dtype = BTreeMap::new();
                let stored = stage
                    .tensors
                    .iter()
                    .flat_map(|n| stages::stored_parts(index, n));
                for tensor in stored {
                    let bytes = bytes_by_dtype
                        .entry(tensor.dtype.to_string())
                        .or_insert(0u64);
                    *bytes = bytes.saturating_add(tensor.byte_len());
                }
                StageSummary {
                    stage: stage.name.clone(),
                    tensors: stage.tensors.len(),
                    bytes: stage.bytes,
                    bytes_by_dtype,
                }
            })
            .collect();
        let stage_by_stage_bytes = match stages.as_slice() {
            [only] => only.bytes,
            _ => stages
                .windows(2)
                .map(|pair| pair.iter().map(|l| l.bytes).fold(0, u64::saturating_add))
                .max()
                .unwrap_or(0),
        };
        let largest_stage = stages.iter().max_by_key(|l| l.bytes).cloned();
        CheckpointSummary {
            folder: self.folder().to_owned(),
            format: self.format(),
            architecture: self.config().architecture.clone(),
            model_type: self.config().model_type.clone(),
            stage_origin: self.stage_origin(),
            block_count: stages
                .iter()
                .filter(|s| s.stage.split('.').any(|part| part.parse::<usize>().is_ok()))
                .count(),
            tensor_count: index.tensors().len(),
            largest_stage,
            total_bytes: index.stored_bytes(),
            tied: index.tied().to_vec(),
            unread_tensors: index
                .tensors()
                .iter()
                .filter(|t| t.tied_to.is_none() && self.first_reader(&t.name).is_none())
                .map(|t| t.name.clone())
                .collect(),
            full_load_bytes: index.stored_bytes(),
            stage_by_stage_bytes,
            stages,
        }
    }
}
