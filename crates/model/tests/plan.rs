//! The planner: the predicted parts and the deficit from the config alone, the placement
//! the budget leaves room for, and refusal before any weight is read.

mod fixture_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use fixture_support::*;
use memwise_model::plan::{Placement, Plan, PlanError, Request, Residency};
use memwise_model::{Checkpoint, HookError, LayerHook, LayerWeights, ModelConverter, RunError};

/// tiny-llama: hidden 64, 4 heads of 16, 2 KV heads, intermediate 128, vocab 128, 2 layers.
const LAYER_BYTES: u64 = 4 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 128 * 64 + 2 * 64);
const FLOOR: u64 = 1 << 20;

fn tiny() -> Checkpoint {
    Checkpoint::open(fixture("tiny-llama")).unwrap()
}

#[test]
fn parts_follow_the_config_by_hand() {
    // 4 tokens, f32: hidden 4·64·4 = 1024 (three alive), attention 4·4·16·4 = 1024 per
    // head-sized tensor (four) plus scores 4·4·4·4 = 256 (two), MLP 3 · 4·128·4 = 6144.
    let request = Request::new(4).runtime_floor(FLOOR).new_tokens(3);
    let plan = Plan::new(&tiny(), &request).unwrap();
    let parts = plan.cpu().parts;
    assert_eq!(parts.runtime_floor, FLOOR);
    assert_eq!(parts.activations, 3 * 1024 + 6144);
    // 2 · 2 layers · 2 kv heads · 16 · (4 + 3) positions · 4 bytes.
    assert_eq!(parts.kv_cache, 2 * 2 * 2 * 16 * 7 * 4);
    assert_eq!(parts.logits, 4 * 128 * 4);
    assert_eq!(parts.staging, 0, "stored as computed: read in place");
    // No budget: everything resident, nothing streamed.
    assert_eq!(plan.placement(), Placement::AllResident);
    let weights = 2 * 128 * 64 * 4 + 2 * LAYER_BYTES + 64 * 4;
    assert_eq!(parts.resident_weights, weights);
    assert_eq!(parts.streaming_window, 0);
    assert_eq!(plan.peak(), parts.total());
    let names: Vec<&str> = plan.stages().iter().map(|s| s.name.as_str()).collect();
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
    assert_eq!(plan.stages()[1].weight_bytes, LAYER_BYTES);
    assert_eq!(plan.stages()[1].stored_bytes, LAYER_BYTES);
}

#[test]
fn the_deficit_is_what_streaming_the_largest_stage_lacks() {
    // One forward of 4 tokens: activations 9216, logits 2048, the largest stage a layer.
    let need = FLOOR + 9216 + 2048 + LAYER_BYTES;
    let request = Request::new(4).runtime_floor(FLOOR);
    let fits = Plan::new(&tiny(), &request.clone().budget(Some(need))).unwrap();
    assert_eq!(fits.placement(), Placement::Streamed);
    assert!(fits.peak() <= need);

    let err = Plan::new(&tiny(), &request.budget(Some(need - 12_345))).unwrap_err();
    match err {
        PlanError::OverBudget {
            device,
            need: got,
            budget,
            deficit,
            largest,
        } => {
            assert_eq!(device, "cpu");
            assert_eq!(got, need);
            assert_eq!(budget, need - 12_345);
            assert_eq!(deficit, 12_345);
            assert_eq!(largest.name, "runtime floor");
        }
        other => panic!("expected OverBudget, got {other}"),
    }
}

#[test]
fn the_largest_item_is_named_when_a_stage_outweighs_the_rest() {
    let request = Request::new(1).runtime_floor(0).budget(Some(1000));
    let err = Plan::new(&tiny(), &request).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0") && err.contains(&LAYER_BYTES.to_string()),
        "{err}"
    );
}

#[test]
fn the_cheapest_placement_that_fits_is_chosen() {
    let checkpoint = tiny();
    let request = Request::new(4).runtime_floor(FLOOR).prefetch_depth(0);
    let all = Plan::new(&checkpoint, &request).unwrap();
    let full = all.peak();
    // Room for everything: all resident.
    let plan = Plan::new(&checkpoint, &request.clone().budget(Some(full))).unwrap();
    assert_eq!(plan.placement(), Placement::AllResident);
    assert_eq!(plan.peak(), full);
    // One embedding short: some stages stay resident, the rest stream.
    let plan = Plan::new(&checkpoint, &request.clone().budget(Some(full - 1))).unwrap();
    assert_eq!(plan.placement(), Placement::Mixed);
    assert!(plan.peak() < full, "{} >= {full}", plan.peak());
    let resident: Vec<bool> = (0..5).map(|i| plan.is_resident(i)).collect();
    assert!(
        resident.contains(&true) && resident.contains(&false),
        "{resident:?}"
    );
    // Only a layer fits beside the fixed parts: streamed stage by stage.
    let fixed = full - all.cpu().parts.resident_weights;
    let plan = Plan::new(
        &checkpoint,
        &request.clone().budget(Some(fixed + LAYER_BYTES)),
    )
    .unwrap();
    assert_eq!(plan.placement(), Placement::Streamed);
    assert!(plan
        .stages()
        .iter()
        .all(|s| s.residency == Residency::Streamed));
    assert_eq!(plan.cpu().parts.streaming_window, LAYER_BYTES);
    // Streaming asked for: streamed even with room to spare.
    let plan = Plan::new(
        &checkpoint,
        &request
            .budget(Some(full))
            .placement(Some(Placement::Streamed)),
    )
    .unwrap();
    assert_eq!(plan.placement(), Placement::Streamed);
}

#[test]
fn read_ahead_waits_for_room_in_the_window() {
    let checkpoint = tiny();
    let request = Request::new(4).runtime_floor(FLOOR).prefetch_depth(2);
    let unbounded = Plan::new(
        &checkpoint,
        &request.clone().placement(Some(Placement::Streamed)),
    )
    .unwrap();
    // The widest window: the embeddings with both layers read ahead.
    assert_eq!(
        unbounded.cpu().parts.streaming_window,
        128 * 64 * 4 + 2 * LAYER_BYTES
    );
    let fixed = unbounded.peak() - unbounded.cpu().parts.streaming_window;
    let tight = Plan::new(
        &checkpoint,
        &request
            .budget(Some(fixed + LAYER_BYTES + 1000))
            .placement(Some(Placement::Streamed)),
    )
    .unwrap();
    assert_eq!(tight.window_budget(), Some(LAYER_BYTES + 1000));
    // A layer and the norm (256 bytes) fit together; two layers do not.
    assert_eq!(tight.cpu().parts.streaming_window, LAYER_BYTES + 256);
}

/// Counts the stages the runner hands out, i.e. the stages whose weights were read.
#[derive(Clone, Default)]
struct CountReads(Arc<AtomicUsize>);

impl LayerHook for CountReads {
    fn before_layer(&self, _: &mut LayerWeights) -> Result<(), HookError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[test]
fn an_over_budget_plan_is_refused_before_any_weight_byte_is_read() {
    let folder = fixture("tiny-llama");
    let reads = CountReads::default();
    let converter = |budget| {
        ModelConverter::new(&folder)
            .device(Device::Cpu)
            .budget(Some(budget))
            .hook(reads.clone())
    };
    let err = converter(4 << 20)
        .load_model_with_hooks(true)
        .err()
        .expect("refused");
    assert!(
        matches!(&err, RunError::Plan(e) if matches!(**e, PlanError::OverBudget { .. })),
        "{err}"
    );
    assert_eq!(reads.0.load(Ordering::SeqCst), 0, "no stage was read");

    // With room the same run loads without reading, and its forward reads every stage:
    // the hook does count reads.
    let mut model = converter(256 << 20).load_model_with_hooks(true).unwrap();
    assert_eq!(reads.0.load(Ordering::SeqCst), 0);
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    model.forward(&ids).unwrap();
    assert_eq!(reads.0.load(Ordering::SeqCst), model.stages().len());
}

#[test]
fn every_placement_gives_logits_bitwise_equal_to_the_full_load() {
    for name in ["tiny-llama", "tiny-qwen2", "tiny-mistral"] {
        let folder = fixture(name);
        let reference = load_tensors(&folder.join("reference.safetensors"));
        let ids = token_ids(&reference["input_ids"]);
        let full = full_load_logits(&folder, &ids);
        let converter = || {
            ModelConverter::new(&folder)
                .device(Device::Cpu)
                .prefetch_depth(0)
        };
        let all = converter().load_model_with_hooks(false).unwrap();
        let everything = all.plan().peak();
        let cases = [
            (false, None, Placement::AllResident),
            (false, Some(everything - 1), Placement::Mixed),
            (true, Some(everything), Placement::Streamed),
        ];
        for (clean, budget, placement) in cases {
            let mut model = converter()
                .budget(budget)
                .load_model_with_hooks(clean)
                .unwrap();
            assert_eq!(model.plan().placement(), placement, "{name}");
            for pass in 0..2 {
                let logits = model.forward(&ids).unwrap();
                assert!(
                    bitwise_equal(&logits, &full),
                    "{name}: {placement:?}, pass {pass}: != full load"
                );
            }
        }
    }
}

#[test]
fn a_mixed_plan_keeps_its_resident_stages_and_reads_only_the_rest_again() {
    let (_dir, folder) = {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("m");
        std::fs::create_dir_all(&folder).unwrap();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture("tiny-llama").join(file), folder.join(file)).unwrap();
        }
        (dir, folder)
    };
    let converter = || {
        ModelConverter::new(&folder)
            .device(Device::Cpu)
            .prefetch_depth(0)
    };
    let everything = converter()
        .load_model_with_hooks(false)
        .unwrap()
        .plan()
        .peak();
    let reads = CountReads::default();
    let mut model = converter()
        .budget(Some(everything - 1))
        .hook(reads.clone())
        .load_model_with_hooks(false)
        .unwrap();
    let plan = model.plan().clone();
    assert_eq!(plan.placement(), Placement::Mixed);
    let streamed = plan
        .stages()
        .iter()
        .filter(|s| s.residency == Residency::Streamed)
        .count();
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    model.forward(&ids).unwrap();
    assert_eq!(reads.0.load(Ordering::SeqCst), plan.stages().len());
    model.forward(&ids).unwrap();
    assert_eq!(
        reads.0.load(Ordering::SeqCst),
        plan.stages().len() + streamed
    );
}

#[test]
fn mapped_half_precision_streams_widened_chunks_and_keeps_copies() {
    use memwise_model::{write_synthetic_checkpoint, Architecture, SynthSpec};
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        dtype: candle_core::DType::BF16,
        ..SynthSpec::tiny(Architecture::Llama)
    };
    let folder = write_synthetic_checkpoint(&spec, &dir.path().join("bf16"))
        .unwrap()
        .folder;
    let checkpoint = Checkpoint::open(&folder).unwrap();
    // No read-ahead: the peak is then the last stage's moment, with every kept stage.
    let request = Request::new(4).runtime_floor(FLOOR).prefetch_depth(0);
    let streamed = |mapped: bool| {
        let request = request
            .clone()
            .mapped(mapped)
            .placement(Some(Placement::Streamed));
        Plan::new(&checkpoint, &request).unwrap().cpu().parts
    };
    let (mapped, copied) = (streamed(true), streamed(false));
    // Streamed and mapped, a layer holds the stored pages of one chunk and the f32 buffer
    // it is widened into (its largest matrix here: up_proj, 128 × 64), not its copies.
    let widened = 128 * 64 * 4;
    assert!(
        mapped.streaming_window >= widened + widened / 2,
        "{mapped:?}"
    );
    assert!(
        mapped.streaming_window < copied.streaming_window,
        "mapped {mapped:?} vs copied {copied:?}"
    );
    // Kept, half-precision matrices are widened once into copies; the embedding table is
    // looked up in place.
    let kept = Plan::new(&checkpoint, &request.clone().mapped(true)).unwrap();
    let all = Plan::new(&checkpoint, &request).unwrap();
    let embedding = spec.vocab_size as u64 * spec.hidden_size as u64 * 4;
    assert_eq!(kept.placement(), Placement::AllResident);
    assert_eq!(
        kept.cpu().parts.resident_weights,
        all.cpu().parts.resident_weights - embedding
    );
}

#[test]
fn a_mapped_embedding_table_is_looked_up_not_multiplied() {
    // The table's rows are read with pread into the activations; a tied head maps it again
    // as a stage of its own. Streamed or kept, the embedding stage holds no page of it.
    let request = Request::new(4)
        .runtime_floor(FLOOR)
        .mapped(true)
        .placement(Some(Placement::Streamed));
    let plan = Plan::new(&tiny(), &request).unwrap();
    assert_eq!(plan.stages()[0].name, "model.embed_tokens");
    assert_eq!(plan.stages()[0].streamed_bytes, 0);
    // The head multiplies its table a chunk at a time: the whole 32 KiB table here.
    assert_eq!(plan.stages().last().unwrap().streamed_bytes, 128 * 64 * 4);
}

#[test]
fn a_half_precision_head_streams_in_chunks_of_half_the_rows() {
    use memwise_model::{write_synthetic_checkpoint, Architecture, SynthSpec};
    let dir = tempfile::tempdir().unwrap();
    // A bf16 head of 40000 × 256: an f32 chunk (16 MiB) is 16384 of its rows; widened
    // chunks take half as many, so its pages (4 MiB) and f32 buffer (8 MiB) together stay
    // under one f32 chunk.
    let spec = SynthSpec {
        dtype: candle_core::DType::BF16,
        hidden_size: 256,
        intermediate_size: 64,
        vocab_size: 40_000,
        num_layers: 1,
        ..SynthSpec::tiny(Architecture::Llama)
    };
    let folder = write_synthetic_checkpoint(&spec, &dir.path().join("m"))
        .unwrap()
        .folder;
    let request = Request::new(4)
        .runtime_floor(FLOOR)
        .prefetch_depth(0)
        .mapped(true)
        .placement(Some(Placement::Streamed));
    let plan = Plan::new(&Checkpoint::open(&folder).unwrap(), &request).unwrap();
    let head = plan.stages().last().unwrap();
    assert_eq!(head.name, "lm_head");
    assert_eq!(head.streamed_bytes, 8192 * 256 * 2);
    // The streaming window holds the head's pages and the widening buffer.
    assert_eq!(
        plan.cpu().parts.streaming_window,
        8192 * 256 * 2 + 8192 * 256 * 4
    );
}
