//! Sentence embeddings as sentence-transformers returns them: the fixtures in
//! `fixtures/sentence/` are SentenceTransformer folders (modules.json, a Pooling config, a
//! Normalize where used, a tokenizer padding to a fixed length) with the embeddings
//! `encode` returned for a batch (made by `make_fixtures.py` there, versions pinned).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use memwise_model::models::{PoolingMode, SentencePooling};
use memwise_model::ModelConverter;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sentence")
        .join(name)
}

/// The batch the reference was computed on, tokenized as the folder's tokenizer says.
fn batch(folder: &Path) -> (Tensor, Tensor, Vec<Vec<f32>>) {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("reference.json")).unwrap()).unwrap();
    let sentences: Vec<String> = serde_json::from_value(reference["sentences"].clone()).unwrap();
    let expected: Vec<Vec<f32>> = serde_json::from_value(reference["embeddings"].clone()).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(folder.join("tokenizer.json")).unwrap();
    let encodings = tokenizer.encode_batch(sentences, true).unwrap();
    let (rows, len) = (encodings.len(), encodings[0].get_ids().len());
    let flat = |get: &dyn Fn(&tokenizers::Encoding) -> &[u32]| -> Tensor {
        let values: Vec<u32> = encodings.iter().flat_map(|e| get(e).to_vec()).collect();
        Tensor::from_vec(values, (rows, len), &Device::Cpu).unwrap()
    };
    (
        flat(&|e| e.get_ids()),
        flat(&|e| e.get_attention_mask()),
        expected,
    )
}

#[test]
fn embeddings_match_sentence_transformers_streamed() {
    for (name, modes, normalize) in [
        ("mean-normalize", vec![PoolingMode::Mean], true),
        (
            "cls-max-sqrt",
            vec![PoolingMode::Cls, PoolingMode::Max, PoolingMode::MeanSqrtLen],
            false,
        ),
    ] {
        let folder = fixture(name);
        let pooling = SentencePooling::from_folder(&folder).unwrap().unwrap();
        assert_eq!(
            (pooling.modes.clone(), pooling.normalize),
            (modes, normalize),
            "{name}"
        );
        let (ids, mask, expected) = batch(&folder);
        let mut model = ModelConverter::new(&folder)
            .load_model_with_hooks(true)
            .unwrap();
        let embeddings: Vec<Vec<f32>> = model
            .embed(&ids, &ids.zeros_like().unwrap(), &mask)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(embeddings.len(), expected.len());
        for (row, (got, want)) in embeddings.iter().zip(&expected).enumerate() {
            assert_eq!(got.len(), want.len(), "{name}: width");
            let diff = got
                .iter()
                .zip(want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-5, "{name}, sentence {row}: {diff}");
        }
    }
}

#[test]
fn a_module_memwise_cannot_run_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let modules = serde_json::json!([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    ]);
    std::fs::write(dir.path().join("modules.json"), modules.to_string()).unwrap();
    std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
    let pooling = serde_json::json!({"pooling_mode_mean_tokens": true});
    std::fs::write(
        dir.path().join("1_Pooling/config.json"),
        pooling.to_string(),
    )
    .unwrap();
    let err = SentencePooling::from_folder(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("sentence_transformers.models.Dense"), "{err}");

    // Older files name modes by flags; several flags concatenate in sentence-transformers'
    // order (CLS, max, mean).
    let modules = serde_json::json!([
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}
    ]);
    std::fs::write(dir.path().join("modules.json"), modules.to_string()).unwrap();
    let flags =
        serde_json::json!({"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": true});
    std::fs::write(dir.path().join("1_Pooling/config.json"), flags.to_string()).unwrap();
    let pooling = SentencePooling::from_folder(dir.path()).unwrap().unwrap();
    assert_eq!(pooling.modes, [PoolingMode::Cls, PoolingMode::Mean]);
}
