//! Reading the committed fixtures: every format, both read strategies, checked against the
//! values torch itself reported when it wrote them (`fixtures/reference.json`).

mod common;

use common::{fixture, read_all};
use memwise_model::checkpoint::{convert_into, SourceFormat, StageOrigin, StoredDType};
use memwise_model::{Checkpoint, Error, ReadStrategy};
use serde_json::Value;

/// The mapping strategy. SAFETY: nothing writes the files these tests and benches read
/// while they read them (fixtures are read-only; generated files are written before).
const MMAP: ReadStrategy = unsafe { ReadStrategy::mmap_release() };

const STRATEGIES: [ReadStrategy; 2] = [ReadStrategy::Pread, MMAP];

fn reference(model: &str) -> serde_json::Map<String, Value> {
    let text = std::fs::read(fixture("reference.json")).unwrap();
    let all: Value = serde_json::from_slice(&text).unwrap();
    all[model].as_object().unwrap().clone()
}

/// Each float tensor's first values and sum match what torch reported.
fn assert_matches_reference(checkpoint: &Checkpoint, model: &str, strategy: ReadStrategy) {
    let reference = reference(model);
    let mut reader = checkpoint.reader(strategy);
    let mut checked = 0;
    for stage in checkpoint.stages() {
        let data = reader.read_stage(&stage.name).unwrap();
        for tensor in data.tensors() {
            let Some(expected) = reference.get(tensor.name()) else {
                continue;
            };
            if !tensor.dtype().is_float() {
                continue;
            }
            let values = tensor.to_f32_vec().unwrap();
            // The reference holds exact f32 values printed as f64; comparing as f32 absorbs
            // the last-digit error of JSON float parsing.
            let want: Vec<f32> = expected["first"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(values[..want.len()], want, "{}", tensor.name());
            let sum: f64 = values.iter().map(|&v| f64::from(v)).sum();
            let want_sum = expected["sum"].as_f64().unwrap();
            assert!(
                (sum - want_sum).abs() < 1e-3,
                "{}: {sum} vs {want_sum}",
                tensor.name()
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} tensors checked");
}

#[test]
fn single_safetensors_file() {
    let checkpoint = Checkpoint::open(fixture("tiny-llama-safetensors")).unwrap();
    assert_eq!(checkpoint.format(), SourceFormat::Safetensors);
    assert_eq!(checkpoint.config().num_hidden_layers, Some(2));
    let names: Vec<&str> = checkpoint
        .stages()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "model.embed_tokens",
            "model.layers.0",
            "model.layers.1",
            "model.norm",
            "lm_head"
        ]
    );
    assert_eq!(checkpoint.stage_origin(), StageOrigin::Traced);
    let block = checkpoint.stage("model.layers.1").unwrap();
    assert_eq!(block.tensors.len(), 9);
    assert_eq!(block.bytes, 4 * (8 + 4 * 64 + 8 + 3 * 96));
    assert!(checkpoint.index().tied().is_empty());
    for strategy in STRATEGIES {
        assert_matches_reference(&checkpoint, "tiny-llama", strategy);
    }
}

#[test]
fn both_strategies_read_the_same_bytes() {
    let checkpoint = Checkpoint::open(fixture("tiny-llama-safetensors")).unwrap();
    let pread = read_all(&checkpoint, ReadStrategy::Pread);
    assert_eq!(pread.len(), checkpoint.index().tensors().len());
    assert_eq!(pread, read_all(&checkpoint, MMAP));
}

#[test]
fn sharded_f16_equals_the_f32_weights_converted() {
    let sharded = Checkpoint::open(fixture("tiny-llama-sharded")).unwrap();
    assert_eq!(sharded.format(), SourceFormat::ShardedSafetensors);
    assert_eq!(sharded.files().len(), 2);
    let single = Checkpoint::open(fixture("tiny-llama-safetensors")).unwrap();
    let halves = read_all(&sharded, ReadStrategy::Pread);
    let singles = read_all(&single, ReadStrategy::Pread);
    assert_eq!(halves.len(), singles.len());
    for (half, single) in halves.iter().zip(&singles) {
        assert_eq!(half.0, single.0);
        assert_eq!(half.1, "f16");
        let mut converted = Vec::new();
        convert_into(
            &single.0,
            &single.3,
            StoredDType::F32,
            StoredDType::F16,
            &mut converted,
        )
        .unwrap();
        // torch rounded these to f16 when it wrote the fixture; we must round identically.
        assert_eq!(converted, half.3, "{}", half.0);
    }
}

#[test]
fn bin_with_tied_embeddings_matches_the_safetensors_save() {
    let bin = Checkpoint::open(fixture("tiny-llama-bin")).unwrap();
    assert_eq!(bin.format(), SourceFormat::TorchBin);
    let tied = bin.index().tied();
    assert_eq!(tied.len(), 1);
    assert_eq!(tied[0].tensor, "lm_head.weight");
    assert_eq!(tied[0].source, "model.embed_tokens.weight");
    // Stored once on disk, though both layers need it resident.
    let embed = bin
        .index()
        .get("model.embed_tokens.weight")
        .unwrap()
        .byte_len();
    let all: u64 = bin.index().tensors().iter().map(|t| t.byte_len()).sum();
    assert_eq!(bin.index().stored_bytes(), all - embed);

    // transformers drops the tied head from safetensors; memwise restores it as an alias.
    let safetensors = Checkpoint::open(fixture("tiny-llama-tied")).unwrap();
    assert_eq!(safetensors.index().tied(), bin.index().tied());
    for strategy in STRATEGIES {
        assert_eq!(read_all(&bin, strategy), read_all(&safetensors, strategy));
    }
}

#[test]
fn sharded_bin_matches_safetensors() {
    let bin = Checkpoint::open(fixture("tiny-llama-bin-sharded")).unwrap();
    assert_eq!(bin.format(), SourceFormat::ShardedTorchBin);
    assert!(bin.index().tied().is_empty());
    let safetensors = Checkpoint::open(fixture("tiny-llama-safetensors")).unwrap();
    assert_eq!(
        read_all(&bin, ReadStrategy::Pread),
        read_all(&safetensors, ReadStrategy::Pread)
    );
    assert_matches_reference(&bin, "tiny-llama", MMAP);
}

#[test]
fn bert_stages_by_module_and_integer_passthrough() {
    let bert = Checkpoint::open(fixture("tiny-bert")).unwrap();
    let names: Vec<&str> = bert.stages().iter().map(|s| s.name.as_str()).collect();
    // The config lacks keys a BERT needs, so the tensors are grouped by module.
    assert_eq!(bert.stage_origin(), StageOrigin::ByModule);
    assert_eq!(
        names,
        [
            "bert.embeddings",
            "bert.embeddings.LayerNorm",
            "bert.embeddings.position_embeddings",
            "bert.embeddings.token_type_embeddings",
            "bert.embeddings.word_embeddings",
            "bert.pooler.dense",
            "bert.encoder.layer.0",
            "bert.encoder.layer.1"
        ]
    );
    assert!(
        bert.index().tied().is_empty(),
        "encoders have no lm_head to tie"
    );
    assert_matches_reference(&bert, "tiny-bert", ReadStrategy::Pread);

    let mut reader = bert.reader(ReadStrategy::Pread);
    // Position ids are stored, though no stage reads them (the blocks count positions).
    let embeddings = reader
        .read_tensors(
            None,
            &[
                "bert.embeddings.position_ids",
                "bert.embeddings.word_embeddings.weight",
            ],
        )
        .unwrap();
    let ids = embeddings.get("bert.embeddings.position_ids").unwrap();
    assert_eq!(ids.dtype(), StoredDType::I64);
    let positions: Vec<i64> = ids
        .bytes()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(positions, (0..8).collect::<Vec<i64>>());
    // Integers pass through a compute-dtype conversion untouched, and are never cast.
    assert_eq!(&*ids.to_dtype(StoredDType::I64).unwrap(), ids.bytes());
    let err = ids.to_dtype(StoredDType::F32).unwrap_err();
    assert!(
        err.to_string().contains("bert.embeddings.position_ids"),
        "{err}"
    );

    let word = embeddings
        .get("bert.embeddings.word_embeddings.weight")
        .unwrap();
    assert_eq!(word.dtype(), StoredDType::BF16);
    let as_f32 = word.to_dtype(StoredDType::F32).unwrap();
    assert_eq!(as_f32.len(), word.bytes().len() * 2);
}

#[test]
fn legacy_bin_is_refused_with_advice() {
    let err = Checkpoint::open(fixture("tiny-llama-legacy-bin")).unwrap_err();
    assert!(matches!(err, Error::LegacyTorchFormat { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("pytorch_model.bin") && message.contains("re-save"),
        "{message}"
    );
}

#[test]
fn unknown_stage_and_tensor_are_errors() {
    let checkpoint = Checkpoint::open(fixture("tiny-llama-safetensors")).unwrap();
    let mut reader = checkpoint.reader(ReadStrategy::Pread);
    let err = reader.read_stage("model.layers.99").err().unwrap();
    assert!(matches!(err, Error::NotFound { .. }));
    assert!(err.to_string().contains("model.layers.99"), "{err}");
    let err = reader.read_tensors(None, &["nope"]).err().unwrap();
    assert!(err.to_string().contains("nope"));
}

#[test]
fn stages_convert_to_candle_tensors() {
    let checkpoint = Checkpoint::open(fixture("tiny-llama-sharded")).unwrap();
    let mut reader = checkpoint.reader(ReadStrategy::Pread);
    let layer = reader.read_stage("model.layers.0").unwrap();
    let cpu = candle_core::Device::Cpu;
    let tensors = layer
        .to_candle_tensors(Some(StoredDType::F32), &cpu)
        .unwrap();
    assert_eq!(tensors.len(), 9);
    for view in layer.tensors() {
        let tensor = &tensors[view.name()];
        assert_eq!(tensor.dims(), view.shape());
        assert_eq!(tensor.dtype(), candle_core::DType::F32);
        let values: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(values, view.to_f32_vec().unwrap(), "{}", view.name());
    }
    let stored = layer.tensors()[0].to_candle_tensor(None, &cpu).unwrap();
    assert_eq!(stored.dtype(), candle_core::DType::F16);

    // Integers keep their dtype whatever the compute dtype.
    let bert = Checkpoint::open(fixture("tiny-bert")).unwrap();
    let mut reader = bert.reader(MMAP);
    let embeddings = reader
        .read_tensors(None, &["bert.embeddings.position_ids"])
        .unwrap();
    let ids = embeddings.get("bert.embeddings.position_ids").unwrap();
    let ids = ids.to_candle_tensor(Some(StoredDType::F16), &cpu).unwrap();
    assert_eq!(ids.dtype(), candle_core::DType::I64);
    assert_eq!(
        ids.to_vec2::<i64>().unwrap(),
        [(0..8).collect::<Vec<i64>>()]
    );
}

#[test]
fn a_converted_tensor_larger_than_the_staging_buffer_widens_exactly() {
    use memwise_model::{write_synthetic_checkpoint, Architecture, SynthSpec};
    let dir = tempfile::tempdir().unwrap();
    // A bf16 embedding of 3000 × 1024: 6 MB stored, read through the 4 MiB buffer in two
    // pieces.
    let spec = SynthSpec {
        dtype: candle_core::DType::BF16,
        vocab_size: 3000,
        hidden_size: 1024,
        intermediate_size: 64,
        num_layers: 1,
        ..SynthSpec::tiny(Architecture::Llama)
    };
    let folder = write_synthetic_checkpoint(&spec, &dir.path().join("m"))
        .unwrap()
        .folder;
    let checkpoint = Checkpoint::open(&folder).unwrap();
    let name = "model.embed_tokens.weight";
    let widened = checkpoint
        .load_candle_tensors(None, &[name], Some(StoredDType::F32))
        .unwrap()
        .remove(name)
        .unwrap();
    let mut reader = checkpoint.reader(ReadStrategy::Pread);
    let layer = reader.read_tensors(None, &[name]).unwrap();
    let stored = layer.get(name).unwrap();
    assert!(stored.bytes().len() > 4 << 20);
    let expected = stored.to_f32_vec().unwrap();
    let got: Vec<f32> = widened.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got
        .iter()
        .zip(&expected)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}
