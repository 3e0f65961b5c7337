//! The decoder blocks against transformers: tiny Llama (untied, GQA, RoPE scalings), tiny
//! Qwen2 (q/k/v biases, tied embeddings), tiny Mistral (sliding window of 4 over 10
//! tokens), tiny Qwen3 (q/k norms, head_dim 24 from the config), tiny Phi-3 (fused
//! qkv and gate/up weights, a window of 4) and tiny Gemma 3 text (a sliding layer with its
//! own RoPE base and a global one, query_pre_attn_scalar, soft capping, the keys of older
//! releases). Fixtures and their generator live in `tests/fixtures/reference/`.

mod fixture_support;

use std::collections::{HashMap, HashSet};

use candle_core::{DType, Device, Tensor};
use fixture_support::*;
use memwise_model::models::{DecoderModel, Family, Inputs, KvCache, LlamaConfig, Loaded};

struct Fixture {
    name: &'static str,
    config: LlamaConfig,
    weights: HashMap<String, Tensor>,
    reference: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(name: &'static str) -> Self {
        let folder = fixture(name);
        Self {
            name,
            config: decoder_config(&folder),
            weights: load_tensors(&folder.join("model.safetensors")),
            reference: load_tensors(&folder.join("reference.safetensors")),
        }
    }

    fn model(&self) -> DecoderModel {
        DecoderModel::new(&self.config, DType::F32, &Device::Cpu).expect("skeleton builds")
    }

    /// The model with every stage loaded from the fixture's weights.
    fn loaded(&self) -> Loaded<DecoderModel> {
        self.model()
            .load(full_weights(&self.weights))
            .expect("loads")
    }

    fn reference(&self, key: &str) -> &Tensor {
        self.reference
            .get(key)
            .unwrap_or_else(|| panic!("{}: reference.safetensors has no {key}", self.name))
    }

    fn input_ids(&self) -> Tensor {
        token_ids(self.reference("input_ids"))
    }

    fn full_logits(&self) -> Tensor {
        self.model()
            .forward_full(full_weights(&self.weights), Inputs::new(&self.input_ids()))
            .expect("full-load forward runs")
    }

    fn streamed_logits(&self) -> Tensor {
        let model = self.model();
        let ids = self.input_ids();
        let mut pass = model.pass(Inputs::new(&ids)).expect("pass starts");
        for (index, stage) in model.stages().iter().enumerate() {
            pass.run_stage(index, stage_weights(stage, &self.weights))
                .expect("stage runs from its own tensors");
        }
        pass.finish().expect("all stages ran")
    }
}

const FIXTURES: [&str; 6] = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-mistral",
    "tiny-qwen3",
    "tiny-phi3",
    "tiny-gemma3",
];

#[test]
fn full_load_logits_match_transformers() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let expected = fixture.reference("logits");
        let diff = max_abs_diff(&fixture.full_logits(), expected);
        println!("{name}: max |logits - transformers| = {diff:e}");
        // The reference spans far more than the tolerance, so a wrong block cannot pass.
        assert!(
            max_abs(expected) > 1.0,
            "{name}: reference logits too flat to test"
        );
        assert!(diff < REFERENCE_TOLERANCE, "{name}: max abs diff {diff}");
    }
}

#[test]
fn streamed_logits_equal_full_load_bitwise() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        assert!(
            bitwise_equal(&fixture.streamed_logits(), &fixture.full_logits()),
            "{name}: stage-by-stage logits differ from the full-load ones"
        );
    }
}

#[test]
fn stages_read_every_checkpoint_tensor_with_its_shape() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let model = fixture.model();
        let mut read = HashSet::new();
        for spec in model.stages().iter().flat_map(|s| s.tensors()) {
            let tensor = &fixture.weights[&spec.name];
            assert_eq!(tensor.dims(), spec.shape, "{name}: {}", spec.name);
            read.insert(spec.name.as_str());
        }
        let stored: HashSet<&str> = fixture.weights.keys().map(String::as_str).collect();
        assert_eq!(read, stored, "{name}: tensors read vs stored");
    }
}

#[test]
fn stage_names_follow_execution_order() {
    let model = Fixture::load("tiny-qwen2").model();
    let names: Vec<&str> = model.layer_names().collect();
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
    let layer: Vec<&str> = model.stages()[1].tensor_names().collect();
    assert!(layer.contains(&"model.layers.0.self_attn.q_proj.bias"));
    assert!(!layer.contains(&"model.layers.0.self_attn.o_proj.bias"));
    // Tied: the head reads the input embeddings.
    let head: Vec<&str> = model.stages()[4].tensor_names().collect();
    assert_eq!(head, ["model.embed_tokens.weight"]);
}

/// The same config written with the keys of older transformers releases: `rope_theta` and
/// `rope_scaling` (with its legacy `type`) instead of `rope_parameters`, and no
/// `layer_types`, so the windows follow from `use_sliding_window` and `max_window_layers`.
fn with_classic_keys(mut config: LlamaConfig) -> LlamaConfig {
    if let Some(mut rope) = config.rope_parameters.take() {
        config.rope_theta = rope.rope_theta.take();
        rope.legacy_type = rope.rope_type.clone();
        config.rope_scaling = Some(rope);
    }
    config.layer_types = None;
    config
}

#[test]
fn config_variants_match_transformers() {
    let variants = [
        ("tiny-llama", "rope-linear"),
        ("tiny-llama", "rope-llama3"),
        ("tiny-qwen2", "sliding"),
        ("tiny-gemma3", "softcap"),
    ];
    for (name, kind) in variants {
        let fixture = Fixture::load(name);
        let config =
            decoder_config(&fixture_support::fixture(name).join(format!("config-{kind}.json")));
        let logits_of = |config: &LlamaConfig| {
            DecoderModel::new(config, DType::F32, &Device::Cpu)
                .expect("skeleton")
                .forward_full(
                    full_weights(&fixture.weights),
                    Inputs::new(&fixture.input_ids()),
                )
                .expect("forward")
        };
        let logits = logits_of(&config);
        let expected = fixture.reference(&format!("logits_{kind}"));
        let diff = max_abs_diff(&logits, expected);
        println!("{name} {kind}: max |logits - transformers| = {diff:e}");
        assert!(
            diff < REFERENCE_TOLERANCE,
            "{name} {kind}: max abs diff {diff}"
        );
        // The variant changed the outputs, so matching them says it is implemented right.
        assert!(max_abs_diff(expected, fixture.reference("logits")) > 1e-3);

        // Gemma 3's older keys have their own test.
        if name == "tiny-gemma3" {
            continue;
        }
        let classic = logits_of(&with_classic_keys(config));
        assert!(
            bitwise_equal(&classic, &logits),
            "{name} {kind}: classic keys"
        );
    }
}

#[test]
fn gemma3_keys_of_older_releases_describe_the_same_model() {
    // `sliding_window_pattern`, `rope_theta` and `rope_local_base_freq` instead of
    // `layer_types` and per-type `rope_parameters`; no `tie_word_embeddings` (tied).
    let fixture = Fixture::load("tiny-gemma3");
    let folder = fixture_support::fixture("tiny-gemma3");
    let mut value: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("config-classic.json")).unwrap())
            .unwrap();
    value.as_object_mut().unwrap().remove("tie_word_embeddings");
    let config = match memwise_model::models::ArchitectureConfig::from_value(&value, "classic") {
        Ok(memwise_model::models::ArchitectureConfig::Decoder(config)) => config,
        other => panic!("{other:?}"),
    };
    assert!(config.tie_word_embeddings);
    let logits = DecoderModel::new(&config, DType::F32, &Device::Cpu)
        .unwrap()
        .forward_full(
            full_weights(&fixture.weights),
            Inputs::new(&fixture.input_ids()),
        )
        .unwrap();
    assert!(bitwise_equal(&logits, &fixture.full_logits()));

    value["use_bidirectional_attention"] = serde_json::Value::Bool(true);
    let memwise_model::models::ArchitectureConfig::Decoder(config) =
        memwise_model::models::ArchitectureConfig::from_value(&value, "bidirectional").unwrap()
    else {
        panic!("a decoder")
    };
    let err = DecoderModel::new(&config, DType::F32, &Device::Cpu).unwrap_err();
    assert!(
        err.to_string().contains("`use_bidirectional_attention`"),
        "{err}"
    );
}

#[test]
fn unsupported_rope_scaling_is_a_clear_error() {
    let mut config = Fixture::load("tiny-llama").config;
    config.rope_parameters = None;
    config.rope_scaling = Some(memwise_model::models::RopeScaling {
        rope_type: Some("yarn".into()),
        factor: Some(4.0),
        ..Default::default()
    });
    let err = DecoderModel::new(&config, DType::F32, &Device::Cpu).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("rope_scaling") && message.contains("yarn"),
        "{message}"
    );
}

#[test]
fn phi3_long_rope_is_refused_by_its_key() {
    let config = |extra: &str| {
        let mut value: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_support::fixture("tiny-phi3").join("config.json"))
                .unwrap(),
        )
        .unwrap();
        value.as_object_mut().unwrap().remove("rope_parameters");
        let extra: serde_json::Value = serde_json::from_str(extra).unwrap();
        value
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let config = match memwise_model::models::ArchitectureConfig::from_value(&value, "phi3") {
            Ok(memwise_model::models::ArchitectureConfig::Decoder(config)) => config,
            other => panic!("{other:?}"),
        };
        DecoderModel::new(&config, DType::F32, &Device::Cpu).map(|_| ())
    };
    // Phi-3-mini-128k as published: the legacy `type` key, `su`.
    let err =
        config(r#"{"rope_scaling": {"type": "su", "long_factor": [1.0], "short_factor": [1.0]}}"#)
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("`rope_scaling.type`") && err.contains("`su`"),
        "{err}"
    );
    let err = config(r#"{"rope_scaling": {"rope_type": "longrope", "factor": 32.0}}"#)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`rope_scaling.rope_type`") && err.contains("`longrope`"),
        "{err}"
    );
    let err = config(r#"{"partial_rotary_factor": 0.75}"#)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`partial_rotary_factor`"), "{err}");
    // No scaling, as Phi-3-mini-4k publishes it: supported.
    config(r#"{"rope_scaling": null, "rope_theta": 10000.0}"#).unwrap();
}

#[test]
fn greedy_generation_matches_transformers_with_and_without_cache() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let prompt: Vec<u32> = token_ids(fixture.reference("generate_prompt"))
            .squeeze(0)
            .and_then(|t| t.to_vec1())
            .expect("prompt");
        let expected: Vec<u32> = token_ids(fixture.reference("generate_output"))
            .squeeze(0)
            .and_then(|t| t.to_vec1())
            .expect("output");
        let eos = fixture
            .reference("generate_eos_token_id")
            .to_vec1::<i64>()
            .expect("eos")[0];
        let eos: Vec<u32> = u32::try_from(eos).into_iter().collect();
        let new_tokens = expected.len() - prompt.len();
        let model = fixture.loaded();

        let cached = model
            .generate_greedy(&prompt, new_tokens, &eos, true)
            .expect("generates with cache");
        let recomputed = model
            .generate_greedy(&prompt, new_tokens, &eos, false)
            .expect("generates without cache");
        assert_eq!(
            cached.tokens,
            expected[prompt.len()..],
            "{name}: cached generation vs transformers"
        );
        assert_eq!(
            recomputed.tokens,
            expected[prompt.len()..],
            "{name}: recomputed generation vs transformers"
        );

        // Keys and values of every token but the last, which was never fed back.
        let cfg = &fixture.config;
        let kv_heads = cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads);
        let head_dim = cfg
            .head_dim
            .unwrap_or(cfg.hidden_size / cfg.num_attention_heads);
        let per_token = 2 * cfg.num_hidden_layers * kv_heads * head_dim * 4;
        assert_eq!(
            cached.kv_cache_bytes,
            ((expected.len() - 1) * per_token) as u64
        );
        assert_eq!(recomputed.kv_cache_bytes, 0);
    }
}

#[test]
fn cached_logits_equal_recomputed_logits() {
    let fixture = Fixture::load("tiny-mistral");
    let model = fixture.loaded();
    let ids = fixture.input_ids();
    let full = model.forward(Inputs::new(&ids)).expect("forward");
    // Feed the same tokens in two chunks through a cache: the window mask must follow.
    let mut cache = KvCache::new(model.model());
    let first = model
        .forward(Inputs::new(&ids.narrow(1, 0, 7).unwrap()).cache(&mut cache))
        .unwrap();
    let second = model
        .forward(Inputs::new(&ids.narrow(1, 7, 3).unwrap()).cache(&mut cache))
        .unwrap();
    assert_eq!(cache.seq_len(), 10);
    let chunked = Tensor::cat(&[&first, &second], 1).unwrap();
    let diff = max_abs_diff(&chunked, &full);
    assert!(diff < 1e-5, "cached vs recomputed logits differ by {diff}");
}

#[test]
fn stages_run_out_of_order_are_refused() {
    let fixture = Fixture::load("tiny-llama");
    let model = fixture.model();
    let ids = fixture.input_ids();
    let mut pass = model.pass(Inputs::new(&ids)).unwrap();
    let layer = &model.stages()[1];
    let err = pass
        .run_stage(1, stage_weights(layer, &fixture.weights))
        .unwrap_err();
    assert!(
        err.to_string().contains("stage 1 run when stage 0 was due"),
        "{err}"
    );
}

#[test]
fn a_missing_tensor_names_its_stage_and_path() {
    let fixture = Fixture::load("tiny-llama");
    let model = fixture.model();
    let mut weights = fixture.weights.clone();
    weights.remove("model.layers.1.mlp.up_proj.weight");
    let err = model
        .forward_full(full_weights(&weights), Inputs::new(&fixture.input_ids()))
        .unwrap_err();
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains("model.layers.1"), "{chain}");
    assert!(
        chain.contains("model.layers.1.mlp.up_proj.weight"),
        "{chain}"
    );
}

#[test]
fn streamed_generation_steps_fill_the_cache_like_full_load() {
    // The streaming runner will generate by running every stage per token; the cache it
    // fills must give the same logits as the loaded model's.
    let fixture = Fixture::load("tiny-qwen2");
    let model = fixture.model();
    let loaded = model
        .clone()
        .load(full_weights(&fixture.weights))
        .expect("loads");
    let ids = fixture.input_ids();
    let (mut streamed_cache, mut full_cache) = (KvCache::new(&model), KvCache::new(&model));
    for (start, len) in [(0, 6), (6, 1), (7, 3)] {
        let chunk = ids.narrow(1, start, len).unwrap();
        let mut pass = model
            .pass(Inputs::new(&chunk).cache(&mut streamed_cache))
            .unwrap();
        for (index, stage) in model.stages().iter().enumerate() {
            pass.run_stage(index, stage_weights(stage, &fixture.weights))
                .unwrap();
        }
        let streamed = pass.finish().unwrap();
        let full = loaded
            .forward(Inputs::new(&chunk).cache(&mut full_cache))
            .unwrap();
        assert!(bitwise_equal(&streamed, &full), "chunk at {start}");
    }
    assert_eq!(streamed_cache.seq_len(), 10);
    assert_eq!(streamed_cache.bytes(), full_cache.bytes());
}

#[test]
fn a_stage_past_the_last_is_refused() {
    let fixture = Fixture::load("tiny-llama");
    let model = fixture.model();
    let err = model
        .load_stage(model.stages().len(), full_weights(&fixture.weights))
        .unwrap_err();
    assert_eq!(err.to_string(), "no stage 5: the model has 5 stages");
}

#[test]
fn weights_of_another_dtype_are_refused_by_name() {
    let fixture = Fixture::load("tiny-llama");
    let model = fixture.model();
    let weights =
        candle_nn::VarBuilder::from_tensors(fixture.weights.clone(), DType::F16, &Device::Cpu);
    let err = model.load_stage(1, weights).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid model input: stage `model.layers.0`: the weights builder yields F16 but the model computes in F32"
    );
}

#[test]
fn last_position_logits_are_the_last_row_of_all_logits() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let model = fixture.loaded();
        let ids = fixture.input_ids();
        let all = model.forward(Inputs::new(&ids)).expect("forward");
        let last = model
            .forward(Inputs::new(&ids).last_position_only())
            .expect("last position");
        let seq_len = ids.dim(1).unwrap();
        assert_eq!(last.dims(), [2, 1, model.model().vocab_size()]);
        let diff = max_abs_diff(&last, &all.narrow(1, seq_len - 1, 1).unwrap());
        // The head's matmul has one row instead of many, so its sums may round
        // differently: a few f32 ulps of the largest logit.
        assert!(diff <= 1e-6 * max_abs(&all), "{name}: {diff}");
    }
}

/// `rows` padded to one length on the left or the right with id 0, and their mask.
fn pad_batch(rows: &[&[u32]], left: bool) -> (Tensor, Tensor) {
    let len = rows.iter().map(|r| r.len()).max().unwrap();
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for row in rows {
        let pad = len - row.len();
        let (real, padding) = (row.iter().copied(), std::iter::repeat_n(0u32, pad));
        let ones = std::iter::repeat_n(1u32, row.len());
        let zeros = std::iter::repeat_n(0u32, pad);
        if left {
            ids.extend(padding.chain(real));
            mask.extend(zeros.chain(ones));
        } else {
            ids.extend(real.chain(padding));
            mask.extend(ones.chain(zeros));
        }
    }
    let shape = (rows.len(), len);
    (
        Tensor::from_vec(ids, shape, &Device::Cpu).unwrap(),
        Tensor::from_vec(mask, shape, &Device::Cpu).unwrap(),
    )
}

#[test]
fn a_padded_batch_gives_each_sequence_what_it_gives_alone() {
    for name in FIXTURES {
        let fixture = Fixture::load(name);
        let model = fixture.loaded();
        let ids: Vec<Vec<u32>> = fixture.input_ids().to_vec2().unwrap();
        let long = ids[0].as_slice();
        let short = &ids[1][..ids[1].len() - 4];
        let alone = |seq: &[u32], last: bool| {
            let ids = Tensor::new(seq, &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let inputs = Inputs::new(&ids);
            let inputs = if last {
                inputs.last_position_only()
            } else {
                inputs
            };
            model.forward(inputs).unwrap().squeeze(0).unwrap()
        };
        for left in [true, false] {
            let side = if left { "left" } else { "right" };
            let (batch, mask) = pad_batch(&[long, short], left);
            let all = model
                .forward(Inputs::new(&batch).attention_mask(&mask))
                .unwrap();
            let expected = alone(long, false);
            // 1e-5, or a few f32 ulps where logits are larger than 10: a padded matmul sums
            // in another order.
            let tolerance = 1e-5 * (max_abs(&expected) / 10.0).max(1.0);
            let diff = max_abs_diff(&all.get(0).unwrap(), &expected);
            assert!(diff < tolerance, "{name}, {side} padding, full row: {diff}");
            let start = if left { long.len() - short.len() } else { 0 };
            let short_rows = all.get(1).unwrap().narrow(0, start, short.len()).unwrap();
            let diff = max_abs_diff(&short_rows, &alone(short, false));
            println!("{name}, {side} padding: the padded sequence differs by {diff:e}");
            assert!(
                diff < tolerance,
                "{name}, {side} padding, padded row: {diff}"
            );

            // Only the last token's logits: each sequence's own last token.
            let last = model
                .forward(
                    Inputs::new(&batch)
                        .attention_mask(&mask)
                        .last_position_only(),
                )
                .unwrap();
            for (row, seq) in [long, short].into_iter().enumerate() {
                let got = last.get(row).unwrap();
                let diff = max_abs_diff(&got, &alone(seq, true));
                assert!(
                    diff < tolerance,
                    "{name}, {side} padding, last of row {row}: {diff}"
                );
            }
        }
    }
}

#[test]
fn ids_past_the_vocabulary_and_bad_masks_are_refused_before_any_stage_runs() {
    let fixture = Fixture::load("tiny-llama");
    let model = fixture.model();
    let vocab = model.vocab_size() as u32;
    let ids = Tensor::new(&[[1u32, vocab]], &Device::Cpu).unwrap();
    let err = model.pass(Inputs::new(&ids)).err().unwrap().to_string();
    assert!(
        err.contains(&format!("holds {vocab}")) && err.contains("vocab_size"),
        "{err}"
    );

    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let short_mask = Tensor::new(&[[1u32, 1]], &Device::Cpu).unwrap();
    let err = model
        .pass(Inputs::new(&ids).attention_mask(&short_mask))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("attention_mask"), "{err}");
    let empty = Tensor::new(&[[0u32, 0, 0]], &Device::Cpu).unwrap();
    let err = model
        .pass(Inputs::new(&ids).attention_mask(&empty))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("only padding"), "{err}");
}
