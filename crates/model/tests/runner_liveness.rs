//! With `clean_weights`, a stage's weight buffers are really freed once it has run: the
//! live heap falls back to where it was when the stage started. The tracking allocator
//! sees every byte, so a runner or hook that keeps a clone is caught. One test per file:
//! the heap counters are process-wide.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use memwise::{enable_memory_tracking, get_memory_stats, reset_memory_stats, TrackingAllocator};
use memwise_model::{
    write_synthetic_checkpoint, Architecture, HookError, LayerHook, LayerWeights, ModelConverter,
    SynthSpec,
};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

/// A hook that keeps every tensor it sees: the leak the test must be able to catch.
#[derive(Default)]
struct KeepClones(Mutex<Vec<Tensor>>);

impl LayerHook for KeepClones {
    fn before_layer(&self, layer: &mut LayerWeights) -> Result<(), HookError> {
        self.0
            .lock()
            .unwrap()
            .extend(layer.tensors().values().cloned());
        Ok(())
    }
}

/// For each decoder layer of a second forward pass: (weight bytes, retained, peak delta).
fn layer_figures(clean: bool, hook: Option<KeepClones>) -> Vec<(u64, i64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        hidden_size: 256,
        intermediate_size: 1024,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: 4,
        vocab_size: 512,
        ..SynthSpec::tiny(Architecture::Llama)
    };
    let folder = write_synthetic_checkpoint(&spec, &dir.path().join("m"))
        .unwrap()
        .folder;
    let mut converter = ModelConverter::new(&folder).prefetch_depth(0);
    if let Some(hook) = hook {
        converter = converter.hook(hook);
    }
    let mut model = converter.load_model_with_hooks(clean).unwrap();
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu).unwrap();

    enable_memory_tracking(true);
    model.forward(&ids).unwrap(); // warm up thread pools and lazily built state
    reset_memory_stats();
    model.forward(&ids).unwrap();
    let stats = get_memory_stats();
    enable_memory_tracking(false);

    model.stages()[1..=4]
        .iter()
        .map(|stage| {
            let record = stats
                .scopes_named(stage.name())
                .last()
                .expect("a scope per stage");
            (
                stage.weight_bytes(DType::F32),
                record.heap_retained().unwrap(),
                record.heap_peak_delta().unwrap(),
            )
        })
        .collect()
}

#[test]
fn clean_weights_are_freed_after_each_layer_and_a_kept_clone_is_caught() {
    // Clean: each layer loads its weights (peak) and gives them all back (retained ~ 0;
    // only the small activations of 8 tokens differ).
    for (weights, retained, peak) in layer_figures(true, None) {
        assert!(peak >= weights, "layer peak {peak} < its weights {weights}");
        assert!(
            retained.unsigned_abs() < weights / 10,
            "retained {retained} of {weights} weight bytes"
        );
    }
    // A hook that keeps clones pins every layer's weights: the same measure sees it.
    for (weights, retained, _) in layer_figures(true, Some(KeepClones::default())) {
        assert!(
            retained as u64 >= weights,
            "a kept clone went unnoticed: {retained}"
        );
    }
}
