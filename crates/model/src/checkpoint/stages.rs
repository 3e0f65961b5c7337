//! A checkpoint's stages: the groups of tensors a runner loads together, named as the
//! model's own stages are (`model.embed_tokens`, `model.layers.3`, `model.norm`, `lm_head`).
//!
//! For an architecture memwise runs, the stages are traced from its blocks' load code
//! ([`crate::models::Stage`]): the same list, in the same order, as the runner streams, so a
//! tied `lm_head` reads `model.embed_tokens.weight` as its own stage. For any other
//! architecture (which `inspect` and `convert` still serve) tensors are grouped by module:
//! the name up to its first numeric segment (`transformer.h.3`), else the name without its
//! parameter (`transformer.wte`); that list is not an execution order.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::checkpoint::index::{TensorIndex, TensorInfo};
use crate::models::Stage;

/// One stage of a checkpoint: the tensors it reads and the bytes they take as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StageTensors {
    /// The stage's name, e.g. `model.layers.3`.
    pub name: String,
    /// The names of the tensors it reads, in the order its block loads them.
    pub tensors: Vec<String>,
    /// Bytes a runner reads to load it: every tensor it reads, shared ones included (they
    /// must be resident too).
    pub bytes: u64,
}

/// How a checkpoint's stages were found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StageOrigin {
    /// Traced from the blocks memwise runs this architecture with: the runner's order.
    Traced,
    /// Grouped by module name, for an architecture memwise has no blocks for.
    ByModule,
}

/// The checkpoint's view of the model's traced `stages`.
pub(crate) fn traced(stages: &[Stage], index: &TensorIndex) -> Vec<StageTensors> {
    stages
        .iter()
        .map(|stage| {
            let tensors: Vec<String> = stage.tensor_names().map(str::to_owned).collect();
            let bytes = tensors
                .iter()
                .flat_map(|name| stored_parts(index, name))
                .map(|t| t.byte_len())
                .fold(0, u64::saturating_add);
            StageTensors {
                name: stage.name().to_owned(),
                tensors,
                bytes,
            }
        })
        .collect()
}

/// What tensor `name` is stored as: itself, or for a linear weight a quantized checkpoint
/// stores packed (`X.weight` as `X.qweight`, `X.qzeros`, `X.scales`, `X.g_idx`), its parts.
pub(crate) fn stored_parts<'i>(index: &'i TensorIndex, name: &str) -> Vec<&'i TensorInfo> {
    if let Some(tensor) = index.get(name) {
        return vec![tensor];
    }
    let Some(module) = name.strip_suffix(".weight") else {
        return Vec::new();
    };
    ["qweight", "qzeros", "scales", "g_idx"]
        .iter()
        .filter_map(|part| index.get(&format!("{module}.{part}")))
        .collect()
}

/// Every tensor of `index` grouped by module, repeated blocks last in numeric order.
pub(crate) fn by_module(index: &TensorIndex) -> Vec<StageTensors> {
    let mut groups: BTreeMap<(Option<usize>, String), StageTensors> = BTreeMap::new();
    for tensor in index.tensors() {
        let (block, name) = module_of(&tensor.name);
        let stage = groups
            .entry((block, name.clone()))
            .or_insert_with(|| StageTensors {
                name,
                tensors: Vec::new(),
                bytes: 0,
            });
        stage.tensors.push(tensor.name.clone());
        // Saturating: a hostile .bin can alias one storage from millions of names.
        stage.bytes = stage.bytes.saturating_add(tensor.byte_len());
    }
    groups.into_values().collect()
}

/// The module a tensor belongs to, and the index of the repeated block it is in.
fn module_of(tensor: &str) -> (Option<usize>, String) {
    let segments: Vec<&str> = tensor.split('.').collect();
    if let Some((at, block)) = segments
        .iter()
        .enumerate()
        .skip(1)
        .find_map(|(at, s)| s.parse::<usize>().ok().map(|n| (at, n)))
    {
        return (Some(block), segments[..=at].join("."));
    }
    let module = match segments.split_last() {
        Some((_, [])) | None => tensor.to_owned(),
        Some((_, module)) => module.join("."),
    };
    (None, module)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::checkpoint::StoredDType;

    #[test]
    fn modules_group_blocks_by_number_and_the_rest_by_module() {
        let names = [
            "transformer.h.10.attn.c_attn.weight",
            "transformer.h.2.mlp.c_fc.weight",
            "transformer.h.2.ln_1.weight",
            "transformer.wte.weight",
            "transformer.ln_f.weight",
            "transformer.ln_f.bias",
            "lm_head",
        ];
        let tensors = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let at = i as u64;
                TensorInfo::new(n, Path::new("f"), StoredDType::U8, vec![1], at..at + 1)
            })
            .collect();
        let index = TensorIndex::build(vec![tensors]).unwrap();
        let stages: Vec<(String, usize)> = by_module(&index)
            .into_iter()
            .map(|s| (s.name, s.tensors.len()))
            .collect();
        assert_eq!(
            stages,
            [
                ("lm_head".to_owned(), 1),
                ("transformer.ln_f".to_owned(), 2),
                ("transformer.wte".to_owned(), 1),
                ("transformer.h.2".to_owned(), 2),
                ("transformer.h.10".to_owned(), 1),
            ]
        );
    }
}
