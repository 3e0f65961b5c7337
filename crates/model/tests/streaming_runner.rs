//! `ModelConverter` end to end on the transformers fixtures: streamed output equals the
//! full load bit for bit at every prefetch depth and matches transformers; resident weights
//! are not read again; hooks can replace and persist layers; generation streams with a
//! KV cache.

mod fixture_support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use fixture_support::*;
use memwise_model::models::{DecoderModel, EncoderModel, Family, Inputs};
use memwise_model::{HookError, LayerHook, LayerWeights, ModelConverter, RunError};

const DECODERS: [&str; 6] = [
    "tiny-llama",
    "tiny-qwen2",
    "tiny-mistral",
    "tiny-qwen3",
    "tiny-phi3",
    "tiny-gemma3",
];

fn reference(folder: &Path) -> HashMap<String, Tensor> {
    load_tensors(&folder.join("reference.safetensors"))
}

fn converter(folder: &Path, depth: usize) -> ModelConverter {
    ModelConverter::new(folder)
        .device(Device::Cpu)
        .prefetch_depth(depth)
}

#[test]
fn streamed_decoders_equal_full_load_and_match_transformers() {
    for name in DECODERS {
        let folder = fixture(name);
        let reference = reference(&folder);
        let ids = token_ids(&reference["input_ids"]);
        let full = full_load_logits(&folder, &ids);
        for depth in [0, 1, 2] {
            for clean in [true, false] {
                let mut model = converter(&folder, depth)
                    .load_model_with_hooks(clean)
                    .unwrap();
                for pass in 0..2 {
                    let logits = model.forward(&ids).unwrap();
                    assert!(
                        bitwise_equal(&logits, &full),
                        "{name}: depth {depth}, clean {clean}, pass {pass}: streamed != full load"
                    );
                }
            }
        }
        let diff = max_abs_diff(&full, &reference["logits"]);
        assert!(
            diff < REFERENCE_TOLERANCE,
            "{name}: {diff} from transformers"
        );
    }
}

#[test]
fn streamed_encoder_matches_transformers() {
    let folder = fixture("tiny-bert");
    let reference = reference(&folder);
    let ids = token_ids(&reference["input_ids"]);
    let types = token_ids(&reference["token_type_ids"]);
    let mask = &reference["attention_mask"];
    let full = EncoderModel::new(&encoder_config(&folder), DType::F32, &Device::Cpu)
        .unwrap()
        .forward_full(
            full_weights(&load_tensors(&folder.join("model.safetensors"))),
            Inputs::new(&ids)
                .token_type_ids(&types)
                .attention_mask(mask),
        )
        .unwrap();
    let mut model = converter(&folder, 1).load_model_with_hooks(true).unwrap();
    assert!(!model.is_decoder());
    let hidden = model.encode(&ids, Some(&types), Some(mask)).unwrap();
    assert!(bitwise_equal(&hidden, &full));
    assert!(max_abs_diff(&hidden, &reference["last_hidden_state"]) < REFERENCE_TOLERANCE);
    let pooled = model.embed(&ids, &types, mask).unwrap();
    assert!(max_abs_diff(&pooled, &reference["mean_pooled"]) < REFERENCE_TOLERANCE);
}

/// A copy of a fixture whose weight file a test may delete.
fn scratch_copy(name: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join(name);
    std::fs::create_dir_all(&target).unwrap();
    for file in ["config.json", "model.safetensors", "reference.safetensors"] {
        std::fs::copy(fixture(name).join(file), target.join(file)).unwrap();
    }
    (dir, target)
}

#[test]
fn resident_weights_are_not_read_again_and_clean_ones_are() {
    let (_dir, folder) = scratch_copy("tiny-llama");
    let ids = token_ids(&reference(&folder)["input_ids"]);
    let mut resident = converter(&folder, 1).load_model_with_hooks(false).unwrap();
    let mut streamed = converter(&folder, 1).load_model_with_hooks(true).unwrap();
    let first = resident.forward(&ids).unwrap();
    streamed.forward(&ids).unwrap();

    // Empty the weights file: a model that streams must now fail, naming the file.
    std::fs::write(folder.join("model.safetensors"), b"").unwrap();
    let again = resident.forward(&ids).unwrap();
    assert!(bitwise_equal(&first, &again));
    let err = streamed.forward(&ids).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

/// Scales one tensor of one layer, and asks for the result to be persisted.
struct ScaleLayer {
    tensor: &'static str,
    factor: f64,
    persist: bool,
    seen: Mutex<Vec<String>>,
}

impl LayerHook for ScaleLayer {
    fn before_layer(&self, layer: &mut LayerWeights) -> Result<(), HookError> {
        self.seen.lock().unwrap().push(layer.name().to_owned());
        if let Some(t) = layer.tensors().get(self.tensor) {
            let scaled = (t * self.factor).unwrap();
            layer.replace(self.tensor, scaled)?;
            if self.persist {
                layer.persist();
            }
        }
        Ok(())
    }
}

#[test]
fn hooks_see_every_stage_and_replaced_layers_persist_to_the_workspace() {
    let folder = fixture("tiny-llama");
    let ids = token_ids(&reference(&folder)["input_ids"]);
    let plain = converter(&folder, 1)
        .load_model_with_hooks(true)
        .unwrap()
        .forward(&ids)
        .unwrap();

    let workspace = tempfile::tempdir().unwrap();
    let hook = Arc::new(ScaleLayer {
        tensor: "model.layers.1.mlp.down_proj.weight",
        factor: 0.5,
        persist: true,
        seen: Mutex::new(Vec::new()),
    });
    struct Shared(Arc<ScaleLayer>);
    impl LayerHook for Shared {
        fn before_layer(&self, layer: &mut LayerWeights) -> Result<(), HookError> {
            self.0.before_layer(layer)
        }
    }
    let mut hooked = converter(&folder, 1)
        .workspace(workspace.path())
        .hook(Shared(hook.clone()))
        .load_model_with_hooks(true)
        .unwrap();
    let changed = hooked.forward(&ids).unwrap();
    assert!(
        !bitwise_equal(&plain, &changed),
        "the hook's change had no effect"
    );
    let names: Vec<String> = hooked
        .stages()
        .iter()
        .map(|s| s.name().to_owned())
        .collect();
    assert_eq!(
        *hook.seen.lock().unwrap(),
        names,
        "the hook saw every stage in order"
    );

    // A new model over the same workspace and no hook reads the persisted layer.
    let mut reloaded = converter(&folder, 0)
        .workspace(workspace.path())
        .load_model_with_hooks(true)
        .unwrap();
    assert!(bitwise_equal(&reloaded.forward(&ids).unwrap(), &changed));
}

#[test]
fn a_tied_head_changed_by_a_hook_is_persisted_as_the_head_stage() {
    /// Scales the embedding matrix as the tied head reads it, and only there.
    struct ScaleHead;
    impl LayerHook for ScaleHead {
        fn before_layer(&self, layer: &mut LayerWeights) -> Result<(), HookError> {
            if layer.name() == "lm_head" {
                let name = "model.embed_tokens.weight";
                let scaled = (&layer.tensors()[name] * 0.5)?;
                layer.replace(name, scaled)?;
                layer.persist();
            }
            Ok(())
        }
    }
    let folder = fixture("tiny-qwen2"); // tie_word_embeddings: true
    let ids = token_ids(&reference(&folder)["input_ids"]);
    let plain = converter(&folder, 1)
        .load_model_with_hooks(true)
        .unwrap()
        .forward(&ids)
        .unwrap();
    let workspace = tempfile::tempdir().unwrap();
    let hooked = converter(&folder, 1)
        .workspace(workspace.path())
        .hook(ScaleHead)
        .load_model_with_hooks(true)
        .unwrap()
        .forward(&ids)
        .unwrap();
    assert!(!bitwise_equal(&plain, &hooked), "the hook had no effect");

    let manifest = memwise_model::Workspace::new(workspace.path())
        .unwrap()
        .manifest()
        .unwrap()
        .unwrap();
    let stages: Vec<&str> = manifest.stages.iter().map(|s| s.stage.as_str()).collect();
    assert_eq!(stages, ["lm_head"]);
    // Read back without the hook: the head is the persisted one and the embeddings are
    // the source's, so the logits are the hooked run's exactly.
    let reloaded = converter(&folder, 0)
        .workspace(workspace.path())
        .load_model_with_hooks(true)
        .unwrap()
        .forward(&ids)
        .unwrap();
    assert!(bitwise_equal(&reloaded, &hooked));
}

#[test]
fn a_failing_hook_reaches_the_caller_with_hook_and_stage_named() {
    /// Refuses one stage before it runs, or after, saying only why.
    struct Refuse {
        after: bool,
    }
    impl LayerHook for Refuse {
        fn name(&self) -> &str {
            "refuse"
        }
        fn before_layer(&self, layer: &mut LayerWeights) -> Result<(), HookError> {
            if !self.after && layer.name() == "model.layers.1" {
                return Err("not today".into());
            }
            Ok(())
        }
        fn after_layer(&self, name: &str, _index: usize) -> Result<(), HookError> {
            if self.after && name == "model.norm" {
                return Err("not now".into());
            }
            Ok(())
        }
    }
    let folder = fixture("tiny-llama");
    let ids = token_ids(&reference(&folder)["input_ids"]);
    for (after, stage, why) in [
        (false, "model.layers.1", "not today"),
        (true, "model.norm", "not now"),
    ] {
        let mut model = converter(&folder, 2)
            .hook(Refuse { after })
            .load_model_with_hooks(true)
            .unwrap();
        let err = model.forward(&ids).unwrap_err();
        // The hook said only why: the runner adds which hook and which stage.
        assert_eq!(
            err.to_string(),
            format!("hook refuse on stage {stage}: {why}")
        );
        let RunError::Hook {
            hook, stage: at, ..
        } = &err
        else {
            panic!("not a hook error: {err:?}")
        };
        assert_eq!((hook.as_str(), at.as_str()), ("refuse", stage));
    }
}

#[test]
fn streamed_generation_matches_transformers() {
    for name in DECODERS {
        let folder = fixture(name);
        let reference = reference(&folder);
        let prompt: Vec<u32> = token_ids(&reference["generate_prompt"])
            .squeeze(0)
            .and_then(|t| t.to_vec1())
            .unwrap();
        let expected: Vec<u32> = token_ids(&reference["generate_output"])
            .squeeze(0)
            .and_then(|t| t.to_vec1())
            .unwrap();
        let eos = reference["generate_eos_token_id"].to_vec1::<i64>().unwrap()[0];
        let new_tokens = expected.len() - prompt.len();
        let mut model = converter(&folder, 1).load_model_with_hooks(true).unwrap();
        let out = model
            .generate(&prompt, new_tokens, &Vec::from_iter(u32::try_from(eos)))
            .unwrap();
        assert_eq!(out.tokens, expected[prompt.len()..], "{name}");
        assert!(out.kv_cache_bytes > 0);
    }
}

#[test]
fn a_missing_tensor_is_refused_before_any_weight_is_read() {
    let (_dir, folder) = scratch_copy("tiny-llama");
    // Claim more layers than the checkpoint holds.
    let config = folder.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json["num_hidden_layers"] = 3.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let err = converter(&folder, 1)
        .load_model_with_hooks(true)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.layers.2."), "{err}");
}

#[test]
fn a_budget_keeps_results_exact_and_refuses_a_stage_that_cannot_fit() {
    let folder = fixture("tiny-llama");
    let ids = token_ids(&reference(&folder)["input_ids"]);
    let mut unbounded = converter(&folder, 2).load_model_with_hooks(true).unwrap();
    let expected = unbounded.forward(&ids).unwrap();
    let largest = unbounded
        .stages()
        .iter()
        .map(|s| s.weight_bytes(DType::F32))
        .max()
        .unwrap();
    // The budget is the whole process: everything the plan predicts but the weights, plus
    // the largest stage.
    let plan = unbounded.plan().cpu();
    let fixed = plan.peak - plan.parts.streaming_window - plan.parts.resident_weights;

    // Room for the largest stage alone: read-ahead waits, results do not change.
    let mut tight = converter(&folder, 2)
        .budget(Some(fixed + largest))
        .load_model_with_hooks(true)
        .unwrap();
    assert!(bitwise_equal(&tight.forward(&ids).unwrap(), &expected));

    let err = converter(&folder, 1)
        .budget(Some(fixed + largest - 1))
        .load_model_with_hooks(true)
        .err()
        .expect("a stage larger than what the budget leaves is refused");
    let message = err.to_string();
    assert!(
        message.contains("cpu") && message.contains("1 short"),
        "{message}"
    );
}

#[test]
fn a_seeded_draw_is_the_same_streamed_and_loaded_and_temperature_zero_is_greedy() {
    use memwise_model::models::{GenerateOptions, Sampling};
    let folder = fixture("tiny-llama");
    let prompt = [1u32, 5, 9];
    let loaded = DecoderModel::new(&decoder_config(&folder), DType::F32, &Device::Cpu)
        .unwrap()
        .load(full_weights(&load_tensors(
            &folder.join("model.safetensors"),
        )))
        .unwrap();
    let mut streamed = converter(&folder, 1).load_model_with_hooks(true).unwrap();
    let drawn = GenerateOptions::greedy(12, &[]).sampling(Sampling::new(1.5).top_k(20).seed(9));
    let mut seen = Vec::new();
    let a = streamed
        .generate_with(&prompt, &drawn, &mut |t| seen.push(t))
        .unwrap();
    let b = loaded.generate(&prompt, &drawn, true).unwrap();
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(seen, a.tokens, "each token was shown as it was chosen");
    let greedy = streamed.generate(&prompt, 12, &[]).unwrap();
    assert_ne!(
        a.tokens, greedy.tokens,
        "a hot draw that equals greedy tests nothing"
    );
    let cold = GenerateOptions::greedy(12, &[]).sampling(Sampling::new(0.0).seed(9));
    let cold = streamed.generate_with(&prompt, &cold, &mut |_| {}).unwrap();
    assert_eq!(cold.tokens, greedy.tokens);
}

#[test]
fn a_config_whose_sizes_disagree_with_the_weights_is_refused_before_any_read() {
    let (_dir, folder) = scratch_copy("tiny-llama");
    let config = folder.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    json["intermediate_size"] = (json["intermediate_size"].as_u64().unwrap() * 2).into();
    std::fs::write(&config, json.to_string()).unwrap();
    // Loading reads no weight: the refusal comes from the shapes in the index alone.
    let err = converter(&folder, 1)
        .load_model_with_hooks(true)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("mlp.gate_proj.weight") && err.contains("intermediate_size"),
        "{err}"
    );
}
