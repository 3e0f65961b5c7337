//! The BERT blocks against transformers' `BertModel` on a tiny checkpoint with two token
//! types and a padded second sequence; mean pooling against sentence-transformers' formula.

mod fixture_support;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use fixture_support::*;
use memwise_model::models::{mean_pool, EncoderModel, Family, Inputs};

struct Fixture {
    model: EncoderModel,
    weights: HashMap<String, Tensor>,
    reference: HashMap<String, Tensor>,
}

impl Fixture {
    fn load() -> Self {
        let folder = fixture("tiny-bert");
        let config = encoder_config(&folder);
        Self {
            model: EncoderModel::new(&config, DType::F32, &Device::Cpu).expect("skeleton"),
            weights: load_tensors(&folder.join("model.safetensors")),
            reference: load_tensors(&folder.join("reference.safetensors")),
        }
    }

    fn input(&self, key: &str) -> Tensor {
        token_ids(&self.reference[key])
    }

    fn full_hidden(&self) -> Tensor {
        self.model
            .forward_full(
                full_weights(&self.weights),
                Inputs::new(&self.input("input_ids"))
                    .token_type_ids(&self.input("token_type_ids"))
                    .attention_mask(&self.reference["attention_mask"]),
            )
            .expect("full-load forward runs")
    }
}

#[test]
fn full_load_hidden_states_and_pooling_match_transformers() {
    let fixture = Fixture::load();
    let hidden = fixture.full_hidden();
    let expected = &fixture.reference["last_hidden_state"];
    let diff = max_abs_diff(&hidden, expected);
    println!("tiny-bert: max |last_hidden_state - transformers| = {diff:e}");
    assert!(
        max_abs(expected) > 1.0,
        "reference hidden states too flat to test"
    );
    assert!(diff < REFERENCE_TOLERANCE, "max abs diff {diff}");

    let pooled = mean_pool(&hidden, &fixture.reference["attention_mask"]).expect("pools");
    let diff = max_abs_diff(&pooled, &fixture.reference["mean_pooled"]);
    println!("tiny-bert: max |mean_pooled - transformers| = {diff:e}");
    assert!(diff < REFERENCE_TOLERANCE, "pooled max abs diff {diff}");
}

#[test]
fn streamed_hidden_states_equal_full_load_bitwise() {
    let fixture = Fixture::load();
    let model = &fixture.model;
    let (ids, types) = (fixture.input("input_ids"), fixture.input("token_type_ids"));
    let mut pass = model
        .pass(
            Inputs::new(&ids)
                .token_type_ids(&types)
                .attention_mask(&fixture.reference["attention_mask"]),
        )
        .expect("pass starts");
    for (index, stage) in model.stages().iter().enumerate() {
        pass.run_stage(index, stage_weights(stage, &fixture.weights))
            .expect("stage runs from its own tensors");
    }
    let streamed = pass.finish().expect("all stages ran");
    assert!(bitwise_equal(&streamed, &fixture.full_hidden()));
}

#[test]
fn stages_read_everything_but_the_pooler() {
    let fixture = Fixture::load();
    let mut read: Vec<&str> = fixture
        .model
        .stages()
        .iter()
        .flat_map(|s| s.tensor_names())
        .collect();
    read.sort_unstable();
    let mut stored: Vec<&str> = fixture
        .weights
        .keys()
        .map(String::as_str)
        .filter(|name| !name.starts_with("pooler."))
        .collect();
    stored.sort_unstable();
    assert_eq!(read, stored);
    assert_eq!(
        fixture.model.layer_names().collect::<Vec<_>>(),
        ["embeddings", "encoder.layer.0", "encoder.layer.1"]
    );
}

#[test]
fn a_bert_prefixed_checkpoint_is_followed() {
    let fixture = Fixture::load();
    let prefixed: HashMap<String, Tensor> = fixture
        .weights
        .iter()
        .map(|(name, tensor)| (format!("bert.{name}"), tensor.clone()))
        .collect();
    let prefix = EncoderModel::detect_weight_prefix(prefixed.keys().map(String::as_str));
    assert_eq!(prefix, Some("bert"));
    assert_eq!(
        EncoderModel::detect_weight_prefix(fixture.weights.keys().map(String::as_str)),
        None
    );
    let model = fixture.model.clone().with_weight_prefix("bert").unwrap();
    let hidden = model
        .forward_full(
            full_weights(&prefixed),
            Inputs::new(&fixture.input("input_ids"))
                .token_type_ids(&fixture.input("token_type_ids"))
                .attention_mask(&fixture.reference["attention_mask"]),
        )
        .expect("prefixed forward runs");
    assert!(bitwise_equal(&hidden, &fixture.full_hidden()));
}
