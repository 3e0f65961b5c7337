//! Helpers shared by the integration tests: fixture loading and tensor comparison.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use memwise_model::models::{BertConfig, LlamaConfig, Stage};

/// Tolerance against transformers' outputs: both compute in f32, in different orders.
pub const REFERENCE_TOLERANCE: f32 = 1e-4;

/// A fixture folder under `tests/fixtures/reference/`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/reference")
        .join(name)
}

/// Every tensor of a safetensors file, on the CPU.
pub fn load_tensors(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// A builder over all of `tensors`, as the full-load path sees the checkpoint.
pub fn full_weights(tensors: &HashMap<String, Tensor>) -> VarBuilder<'static> {
    VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu)
}

/// A builder holding only the tensors `stage` lists, as the streaming runner will hand it.
pub fn stage_weights(stage: &Stage, tensors: &HashMap<String, Tensor>) -> VarBuilder<'static> {
    let own = stage
        .tensor_names()
        .map(|name| {
            let tensor = tensors.get(name).unwrap_or_else(|| {
                panic!(
                    "stage {} lists {name}, absent from the checkpoint",
                    stage.name()
                )
            });
            (name.to_owned(), tensor.clone())
        })
        .collect();
    VarBuilder::from_tensors(own, DType::F32, &Device::Cpu)
}

/// `ids` as the `u32` tensor the models take (fixtures store them as i64, like torch).
pub fn token_ids(ids: &Tensor) -> Tensor {
    ids.to_dtype(DType::U32).expect("ids convert to u32")
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors compare")
}

/// Largest absolute value: the scale a tolerance is measured against.
pub fn max_abs(a: &Tensor) -> f32 {
    max_abs_diff(a, &a.zeros_like().expect("zeros"))
}

/// Whether two tensors hold the same bits.
pub fn bitwise_equal(a: &Tensor, b: &Tensor) -> bool {
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32 tensor")
            .into_iter()
            .map(f32::to_bits)
            .collect()
    };
    a.shape() == b.shape() && bits(a) == bits(b)
}

/// The decoder config of a model folder or config file.
pub fn decoder_config(path: &Path) -> LlamaConfig {
    match memwise_model::models::ArchitectureConfig::from_file(path).expect("config parses") {
        memwise_model::models::ArchitectureConfig::Decoder(config) => *config,
        other => panic!("{} is not a decoder: {other:?}", path.display()),
    }
}

/// The encoder config of a model folder or config file.
pub fn encoder_config(path: &Path) -> BertConfig {
    match memwise_model::models::ArchitectureConfig::from_file(path).expect("config parses") {
        memwise_model::models::ArchitectureConfig::Encoder(config) => config,
        other => panic!("{} is not an encoder: {other:?}", path.display()),
    }
}

/// Whether every value is finite (no NaN, no infinity).
pub fn all_finite(t: &Tensor) -> bool {
    t.flatten_all()
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.to_vec1::<f32>())
        .expect("float tensor")
        .iter()
        .all(|v| v.is_finite())
}

/// The logits of decoder fixture `folder` for `ids`, every weight loaded at once (the
/// full-load path streamed runs are compared with).
pub fn full_load_logits(folder: &Path, ids: &Tensor) -> Tensor {
    use memwise_model::models::{DecoderModel, Family, Inputs};
    DecoderModel::new(&decoder_config(folder), DType::F32, &Device::Cpu)
        .unwrap()
        .forward_full(
            full_weights(&load_tensors(&folder.join("model.safetensors"))),
            Inputs::new(ids),
        )
        .unwrap()
}
