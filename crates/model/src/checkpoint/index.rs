//! The tensor index: every tensor's file, dtype, shape and byte range, grouped into the
//! layers a streaming runner loads one at a time.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::Serialize;

use crate::checkpoint::dtype::StoredDType;
use crate::error::{Error, Result};

/// Where one tensor's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TensorInfo {
    /// The name Hugging Face gives it, e.g. `model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// The file that holds its bytes.
    pub file: PathBuf,
    /// Its element type as stored.
    pub dtype: StoredDType,
    /// Its shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Its bytes in `file`, as absolute offsets.
    pub data: Range<u64>,
    /// For `.bin` sources, the torch storage it lives in; tensors sharing one are tied.
    pub storage: Option<String>,
    /// Set when this tensor is not stored on its own but shares another's bytes (tied
    /// embeddings): the name of the tensor it shares.
    pub tied_to: Option<String>,
}

impl TensorInfo {
    pub(crate) fn new(
        name: &str,
        file: &Path,
        dtype: StoredDType,
        shape: Vec<usize>,
        data: Range<u64>,
    ) -> TensorInfo {
        TensorInfo {
            name: name.to_owned(),
            file: file.to_owned(),
            dtype,
            shape,
            data,
            storage: None,
            tied_to: None,
        }
    }

    /// Its size in bytes.
    pub fn byte_len(&self) -> u64 {
        self.data.end - self.data.start
    }

    /// Which layer it belongs to.
    pub fn layer(&self) -> LayerId {
        LayerId::of_tensor(&self.name)
    }
}

/// A group of tensors that a streaming runner loads together.
///
/// Layers run in this order: embeddings, blocks by index, the final norm, the head, then
/// anything unrecognised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerId {
    /// Token (and position) embeddings: `model.embed_tokens`, `bert.embeddings.*`, `wte`.
    Embeddings,
    /// A repeated block: `model.layers.N`, `encoder.layer.N`, `transformer.h.N`.
    Block(usize),
    /// The norm after the last block: `model.norm`, `ln_f`.
    FinalNorm,
    /// The output head: `lm_head`, BERT's `pooler` and `cls.*`, classifiers.
    Head,
    /// Tensors no rule above claims.
    Other,
}

/// Folder names under which Hugging Face numbers repeated blocks.
const BLOCK_CONTAINERS: [&str; 5] = ["layers", "layer", "h", "blocks", "block"];
const HEAD_SEGMENTS: [&str; 6] = [
    "lm_head",
    "cls",
    "pooler",
    "classifier",
    "score",
    "qa_outputs",
];
const NORM_SEGMENTS: [&str; 5] = [
    "norm",
    "ln_f",
    "final_layer_norm",
    "final_layernorm",
    "norm_f",
];

impl LayerId {
    /// The layer a tensor name belongs to.
    ///
    /// ```
    /// use memwise_model::checkpoint::LayerId;
    ///
    /// assert_eq!(LayerId::of_tensor("model.layers.7.mlp.up_proj.weight"), LayerId::Block(7));
    /// assert_eq!(LayerId::of_tensor("bert.encoder.layer.2.output.dense.bias"), LayerId::Block(2));
    /// assert_eq!(LayerId::of_tensor("model.embed_tokens.weight"), LayerId::Embeddings);
    /// assert_eq!(LayerId::of_tensor("model.norm.weight"), LayerId::FinalNorm);
    /// assert_eq!(LayerId::of_tensor("lm_head.weight"), LayerId::Head);
    /// ```
    pub fn of_tensor(name: &str) -> LayerId {
        let segments: Vec<&str> = name.split('.').collect();
        let block = segments.windows(2).find_map(|pair| match pair {
            [container, index] if BLOCK_CONTAINERS.contains(container) => index.parse().ok(),
            _ => None,
        });
        if let Some(index) = block {
            return LayerId::Block(index);
        }
        if segments.iter().any(|s| HEAD_SEGMENTS.contains(s)) {
            return LayerId::Head;
        }
        if segments
            .iter()
            .any(|s| s.contains("embed") || matches!(*s, "wte" | "wpe"))
        {
            return LayerId::Embeddings;
        }
        if segments.iter().any(|s| NORM_SEGMENTS.contains(s)) {
            return LayerId::FinalNorm;
        }
        LayerId::Other
    }

    /// A name safe to use as a file stem, e.g. `layers.007`.
    pub fn file_stem(&self) -> String {
        match self {
            LayerId::Block(index) => format!("layers.{index:05}"),
            other => other.to_string(),
        }
    }
}

impl fmt::Display for LayerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerId::Embeddings => f.write_str("embeddings"),
            LayerId::Block(index) => write!(f, "layers.{index}"),
            LayerId::FinalNorm => f.write_str("final_norm"),
            LayerId::Head => f.write_str("head"),
            LayerId::Other => f.write_str("other"),
        }
    }
}

impl FromStr for LayerId {
    type Err = String;

    /// Parses what [`Display`](fmt::Display) and [`LayerId::file_stem`] write.
    fn from_str(s: &str) -> Result<LayerId, String> {
        match s {
            "embeddings" => Ok(LayerId::Embeddings),
            "final_norm" => Ok(LayerId::FinalNorm),
            "head" => Ok(LayerId::Head),
            "other" => Ok(LayerId::Other),
            _ => s
                .strip_prefix("layers.")
                .and_then(|n| n.parse().ok())
                .map(LayerId::Block)
                .ok_or_else(|| format!("{s:?} is not a layer name")),
        }
    }
}

impl Serialize for LayerId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// One layer: its tensors, in the order they are stored.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Layer {
    /// Which layer.
    pub id: LayerId,
    /// Its tensors' names.
    pub tensors: Vec<String>,
    /// Bytes a runner reads to load it (tied tensors included: they must be resident too).
    pub bytes: u64,
}

/// A tensor that shares another's bytes instead of being stored on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TiedWeight {
    /// The tensor that is not stored separately, e.g. `lm_head.weight`.
    pub tensor: String,
    /// The tensor whose bytes it uses, e.g. `model.embed_tokens.weight`.
    pub source: String,
}

/// Every tensor of a checkpoint, by name and by layer.
#[derive(Debug, Clone, Default)]
pub struct TensorIndex {
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    layers: Vec<Layer>,
    tied: Vec<TiedWeight>,
}

impl TensorIndex {
    /// Builds the index from each file's tensors. A name that appears in two files is
    /// refused, naming both files.
    pub(crate) fn build(per_file: Vec<Vec<TensorInfo>>) -> Result<TensorIndex> {
        let mut tensors: Vec<TensorInfo> = Vec::new();
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for tensor in per_file.into_iter().flatten() {
            if let Some(&first) = by_name.get(&tensor.name) {
                let first_file = tensors
                    .get(first)
                    .map(|t| t.file.clone())
                    .unwrap_or_default();
                return Err(Error::DuplicateTensor {
                    tensor: tensor.name,
                    first: first_file,
                    second: tensor.file,
                });
            }
            by_name.insert(tensor.name.clone(), tensors.len());
            tensors.push(tensor);
        }
        let mut index = TensorIndex {
            tensors,
            by_name,
            layers: Vec::new(),
            tied: Vec::new(),
        };
        index.mark_shared_storages();
        index.group_layers();
        Ok(index)
    }

    /// In a `.bin` file, two names on the same storage bytes are one tensor saved twice
    /// (torch keeps tied parameters as one storage).
    fn mark_shared_storages(&mut self) {
        let mut first_owner: HashMap<(PathBuf, Range<u64>), String> = HashMap::new();
        for tensor in &mut self.tensors {
            if tensor.storage.is_none() {
                continue;
            }
            let key = (tensor.file.clone(), tensor.data.clone());
            match first_owner.get(&key) {
                Some(owner) => {
                    tensor.tied_to = Some(owner.clone());
                    self.tied.push(TiedWeight {
                        tensor: tensor.name.clone(),
                        source: owner.clone(),
                    });
                }
                None => {
                    first_owner.insert(key, tensor.name.clone());
                }
            }
        }
    }

    /// Adds `alias` as a tensor that reads `source`'s bytes (a tied head that the file does
    /// not store), and regroups.
    pub(crate) fn add_alias(&mut self, alias: &str, source: &str) {
        let Some(original) = self.get(source).cloned() else {
            return;
        };
        let mut tied = original;
        tied.name = alias.to_owned();
        tied.tied_to = Some(source.to_owned());
        self.by_name.insert(alias.to_owned(), self.tensors.len());
        self.tensors.push(tied);
        self.tied.push(TiedWeight {
            tensor: alias.to_owned(),
            source: source.to_owned(),
        });
        self.group_layers();
    }

    fn group_layers(&mut self) {
        let mut groups: BTreeMap<LayerId, Layer> = BTreeMap::new();
        for tensor in &self.tensors {
            let id = tensor.layer();
            let layer = groups.entry(id.clone()).or_insert_with(|| Layer {
                id,
                tensors: Vec::new(),
                bytes: 0,
            });
            layer.tensors.push(tensor.name.clone());
            // Saturating: a hostile .bin can alias one storage from millions of names.
            layer.bytes = layer.bytes.saturating_add(tensor.byte_len());
        }
        self.layers = groups.into_values().collect();
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// The layers, in the order a forward pass runs them.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// The layer with this id.
    pub fn layer(&self, id: &LayerId) -> Option<&Layer> {
        self.layers.iter().find(|l| &l.id == id)
    }

    /// Tensors that share another tensor's bytes.
    pub fn tied(&self) -> &[TiedWeight] {
        &self.tied
    }

    /// Bytes stored on disk, each shared tensor counted once.
    pub fn stored_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .filter(|t| t.tied_to.is_none())
            .map(TensorInfo::byte_len)
            .fold(0, u64::saturating_add)
    }

    /// The layer with the most bytes.
    pub fn largest_layer(&self) -> Option<&Layer> {
        self.layers.iter().max_by_key(|l| l.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, file: &str, data: Range<u64>) -> TensorInfo {
        TensorInfo::new(name, Path::new(file), StoredDType::U8, vec![1], data)
    }

    #[test]
    fn groups_and_orders_layers() {
        let index = TensorIndex::build(vec![vec![
            tensor("lm_head.weight", "a", 0..1),
            tensor("model.layers.10.x", "a", 1..2),
            tensor("model.layers.2.x", "a", 2..3),
            tensor("model.norm.weight", "a", 3..4),
            tensor("model.embed_tokens.weight", "a", 4..5),
            tensor("rotary.inv_freq", "a", 5..6),
        ]])
        .unwrap();
        let order: Vec<String> = index.layers().iter().map(|l| l.id.to_string()).collect();
        assert_eq!(
            order,
            [
                "embeddings",
                "layers.2",
                "layers.10",
                "final_norm",
                "head",
                "other"
            ]
        );
    }

    #[test]
    fn duplicate_names_name_both_files() {
        let err = TensorIndex::build(vec![
            vec![tensor("w", "one.safetensors", 0..1)],
            vec![tensor("w", "two.safetensors", 0..1)],
        ])
        .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("one.safetensors") && message.contains("two.safetensors"));
        assert!(matches!(err, Error::DuplicateTensor { ref tensor, .. } if tensor == "w"));
    }

    #[test]
    fn layer_names_round_trip() {
        for id in [
            LayerId::Embeddings,
            LayerId::Block(12),
            LayerId::Head,
            LayerId::Other,
        ] {
            assert_eq!(id.to_string().parse::<LayerId>().unwrap(), id);
            assert_eq!(id.file_stem().parse::<LayerId>().unwrap(), id);
        }
        assert!("layers.x".parse::<LayerId>().is_err());
    }

    #[test]
    fn bert_names() {
        assert_eq!(
            LayerId::of_tensor("bert.embeddings.LayerNorm.weight"),
            LayerId::Embeddings
        );
        assert_eq!(
            LayerId::of_tensor("bert.pooler.dense.weight"),
            LayerId::Head
        );
        assert_eq!(
            LayerId::of_tensor("transformer.h.3.attn.c_attn.weight"),
            LayerId::Block(3)
        );
        assert_eq!(
            LayerId::of_tensor("transformer.ln_f.weight"),
            LayerId::FinalNorm
        );
    }
}
