//! Synthetic checkpoints: written in the Hugging Face layout, read back, run.

mod fixture_support;

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use fixture_support::*;
use memwise_model::models::{DecoderModel, EncoderModel};
use memwise_model::models::{Family, Inputs};
use memwise_model::synth::SynthError;
use memwise_model::{write_synthetic_checkpoint, Architecture, SynthSpec};

/// Every tensor of a sharded checkpoint, checking the index against the shards.
fn read_checkpoint(folder: &Path) -> HashMap<String, Tensor> {
    let index: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(folder.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let weight_map = index["weight_map"].as_object().unwrap();
    let mut tensors = HashMap::new();
    let mut shard_names: Vec<&str> = weight_map.values().map(|v| v.as_str().unwrap()).collect();
    shard_names.sort_unstable();
    shard_names.dedup();
    for shard in shard_names {
        let bytes = fs::read(folder.join(shard)).unwrap();
        // The format's own reader validates the header, offsets and alignment.
        safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, tensor) in load_tensors(&folder.join(shard)) {
            assert_eq!(weight_map[&name], shard, "index places {name} elsewhere");
            tensors.insert(name, tensor);
        }
    }
    assert_eq!(tensors.len(), weight_map.len());
    let total: u64 = tensors
        .values()
        .map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64)
        .sum();
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
    tensors
}

fn folder_bytes(folder: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = fs::read_dir(folder)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn a_sharded_llama_reads_back_and_runs_streamed_and_full() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("llama");
    let spec = SynthSpec {
        seed: 7,
        shard_bytes: 100_000,
        ..SynthSpec::tiny(Architecture::Llama)
    };
    let report = write_synthetic_checkpoint(&spec, &out).unwrap();
    assert!(report.shards.len() > 1, "{:?}", report.shards);
    assert_eq!(
        report.shards[0],
        format!("model-00001-of-{:05}.safetensors", report.shards.len())
    );
    let tensors = read_checkpoint(&out);
    assert_eq!(tensors.len(), report.tensor_count);

    let config = decoder_config(&out);
    assert_eq!(config.num_key_value_heads, Some(2));
    let model = DecoderModel::new(&config, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu).unwrap();
    let full = model
        .forward_full(full_weights(&tensors), Inputs::new(&ids))
        .unwrap();
    assert!(all_finite(&full));
    // Weights of scale 1/sqrt(fan_in) keep the logits varied, not all equal.
    assert!(max_abs(&full) > 0.1, "logits are flat");

    let mut pass = model.pass(Inputs::new(&ids)).unwrap();
    for (index, stage) in model.stages().iter().enumerate() {
        pass.run_stage(index, stage_weights(stage, &tensors))
            .unwrap();
    }
    assert!(bitwise_equal(&pass.finish().unwrap(), &full));
}

#[test]
fn the_same_seed_writes_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        seed: 11,
        shard_bytes: 150_000,
        ..SynthSpec::tiny(Architecture::Qwen2)
    };
    write_synthetic_checkpoint(&spec, &dir.path().join("a")).unwrap();
    write_synthetic_checkpoint(&spec, &dir.path().join("b")).unwrap();
    write_synthetic_checkpoint(&SynthSpec { seed: 12, ..spec }, &dir.path().join("c")).unwrap();
    let (a, b, c) = (
        folder_bytes(&dir.path().join("a")),
        folder_bytes(&dir.path().join("b")),
        folder_bytes(&dir.path().join("c")),
    );
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn the_shard_size_changes_files_not_weights() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        seed: 5,
        ..SynthSpec::tiny(Architecture::Mistral)
    };
    let one = write_synthetic_checkpoint(&spec, &dir.path().join("one")).unwrap();
    let many = write_synthetic_checkpoint(
        &SynthSpec {
            shard_bytes: 40_000,
            ..spec
        },
        &dir.path().join("many"),
    )
    .unwrap();
    assert_eq!(one.shards.len(), 1);
    assert!(many.shards.len() > 2);
    let (one, many) = (read_checkpoint(&one.folder), read_checkpoint(&many.folder));
    assert_eq!(one.len(), many.len());
    for (name, tensor) in &one {
        assert!(bitwise_equal(tensor, &many[name]), "{name}");
    }
}

#[test]
fn tied_embeddings_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        tie_word_embeddings: true,
        ..SynthSpec::tiny(Architecture::Qwen2)
    };
    let report = write_synthetic_checkpoint(&spec, &dir.path().join("qwen2")).unwrap();
    let tensors = read_checkpoint(&report.folder);
    assert!(!tensors.contains_key("lm_head.weight"));
    assert!(tensors.contains_key("model.layers.0.self_attn.k_proj.bias"));
}

#[test]
fn half_precision_checkpoints_run() {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        dtype: DType::BF16,
        ..SynthSpec::tiny(Architecture::Llama)
    };
    let report = write_synthetic_checkpoint(&spec, &dir.path().join("bf16")).unwrap();
    let tensors = read_checkpoint(&report.folder);
    assert!(tensors.values().all(|t| t.dtype() == DType::BF16));
    assert_eq!(
        report.total_size,
        spec.tensors()
            .unwrap()
            .iter()
            .map(|t| t.element_count() as u64 * 2)
            .sum::<u64>()
    );
    let config = decoder_config(&report.folder);
    assert_eq!(config.torch_dtype.as_deref(), Some("bfloat16"));
    // Computing in f32 from bf16 weights: the builder converts each tensor as it is read.
    let model = DecoderModel::new(&config, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let logits = model
        .forward_full(full_weights(&tensors), Inputs::new(&ids))
        .unwrap();
    assert!(all_finite(&logits));

    // Computing in bf16 too: the same logits up to bf16's 8 bits of mantissa.
    let half = DecoderModel::new(&config, DType::BF16, &Device::Cpu).unwrap();
    let weights = candle_nn::VarBuilder::from_tensors(tensors, DType::BF16, &Device::Cpu);
    let half_logits = half.forward_full(weights, Inputs::new(&ids)).unwrap();
    assert_eq!(half_logits.dtype(), DType::BF16);
    let half_logits = half_logits.to_dtype(DType::F32).unwrap();
    let diff = max_abs_diff(&half_logits, &logits);
    assert!(
        diff < 0.05 * max_abs(&logits),
        "bf16 vs f32 logits differ by {diff}"
    );
}

#[test]
fn a_bert_reads_back_and_runs() {
    let dir = tempfile::tempdir().unwrap();
    let report = write_synthetic_checkpoint(
        &SynthSpec::tiny(Architecture::Bert),
        &dir.path().join("bert"),
    )
    .unwrap();
    let tensors = read_checkpoint(&report.folder);
    let config = encoder_config(&report.folder);
    let model = EncoderModel::new(&config, DType::F32, &Device::Cpu).unwrap();
    let ids = Tensor::new(&[[2u32, 7, 1, 8]], &Device::Cpu).unwrap();
    let hidden = model
        .forward_full(full_weights(&tensors), Inputs::new(&ids))
        .unwrap();
    assert_eq!(hidden.dims(), [1, 4, 64]);
    assert!(all_finite(&hidden));
}

#[test]
fn a_non_empty_output_folder_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("taken");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("notes.txt"), "keep me").unwrap();
    let err = write_synthetic_checkpoint(&SynthSpec::tiny(Architecture::Llama), &out).unwrap_err();
    assert!(matches!(err, SynthError::OutputExists(_)), "{err}");
    assert_eq!(
        fs::read_to_string(out.join("notes.txt")).unwrap(),
        "keep me"
    );
    // Nothing is left beside it either.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}
