//! What `memwise inspect` prints: the shape of a checkpoint and the memory it needs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::checkpoint::index::{LayerId, TiedWeight};
use crate::checkpoint::{Checkpoint, SourceFormat};

/// One layer's size, by dtype.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LayerSummary {
    /// The layer.
    pub layer: LayerId,
    /// How many tensors it has.
    pub tensors: usize,
    /// Bytes it occupies when loaded.
    pub bytes: u64,
    /// Its bytes per stored dtype (`"bf16" → bytes`).
    pub bytes_by_dtype: BTreeMap<String, u64>,
}

/// A checkpoint at a glance: architecture, layers, sizes, ties, and memory needs.
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
    /// Repeated blocks found in the weights.
    pub block_count: usize,
    /// Tensors in the index (tied aliases included).
    pub tensor_count: usize,
    /// Every layer, in forward order.
    pub layers: Vec<LayerSummary>,
    /// The layer with the most bytes.
    pub largest_layer: Option<LayerSummary>,
    /// Bytes stored, each tied tensor counted once.
    pub total_bytes: u64,
    /// Tensors that share another tensor's bytes.
    pub tied: Vec<TiedWeight>,
    /// Weight memory to load the whole model at once: every stored byte.
    pub full_load_bytes: u64,
    /// Weight memory to run layer by layer: the largest pair of neighbouring layers, since a
    /// streaming runner holds the running layer while it prefetches the next.
    pub layer_by_layer_bytes: u64,
}

impl Checkpoint {
    /// Summarises the checkpoint for `memwise inspect`.
    ///
    /// ```
    /// use memwise_model::Checkpoint;
    /// use memwise_model::checkpoint::LayerId;
    ///
    /// let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama-tied");
    /// let summary = Checkpoint::open(folder)?.summary();
    /// assert_eq!(summary.block_count, 2);
    /// assert_eq!(summary.tied[0].tensor, "lm_head.weight");
    /// assert!(summary.layer_by_layer_bytes < summary.full_load_bytes);
    /// # Ok::<(), memwise_model::Error>(())
    /// ```
    pub fn summary(&self) -> CheckpointSummary {
        let index = self.index();
        let layers: Vec<LayerSummary> = index
            .layers()
            .iter()
            .map(|layer| {
                let mut bytes_by_dtype = BTreeMap::new();
                for tensor in layer.tensors.iter().filter_map(|n| index.get(n)) {
                    let bytes = bytes_by_dtype
                        .entry(tensor.dtype.to_string())
                        .or_insert(0u64);
                    *bytes = bytes.saturating_add(tensor.byte_len());
                }
                LayerSummary {
                    layer: layer.id.clone(),
                    tensors: layer.tensors.len(),
                    bytes: layer.bytes,
                    bytes_by_dtype,
                }
            })
            .collect();
        let layer_by_layer_bytes = match layers.as_slice() {
            [only] => only.bytes,
            _ => layers
                .windows(2)
                .map(|pair| pair.iter().map(|l| l.bytes).fold(0, u64::saturating_add))
                .max()
                .unwrap_or(0),
        };
        let largest_layer = layers.iter().max_by_key(|l| l.bytes).cloned();
        CheckpointSummary {
            folder: self.folder().to_owned(),
            format: self.format(),
            architecture: self.config().architecture.clone(),
            model_type: self.config().model_type.clone(),
            block_count: layers
                .iter()
                .filter(|l| matches!(l.layer, LayerId::Block(_)))
                .count(),
            tensor_count: index.tensors().len(),
            largest_layer,
            total_bytes: index.stored_bytes(),
            tied: index.tied().to_vec(),
            full_load_bytes: index.stored_bytes(),
            layer_by_layer_bytes,
            layers,
        }
    }
}
