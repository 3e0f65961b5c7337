//! The tensor index: every tensor's file, dtype, shape and byte range.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

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

/// Every tensor of a checkpoint, by name.
#[derive(Debug, Clone, Default)]
pub struct TensorIndex {
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
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
            tied: Vec::new(),
        };
        index.mark_shared_storages();
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
    /// not store).
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
    }

    /// All tensors, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, file: &str, data: Range<u64>) -> TensorInfo {
        TensorInfo::new(name, Path::new(file), StoredDType::U8, vec![1], data)
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
}
