//! Computing on the mapped checkpoint (`ReadStrategy::mmap_release`): the logits and
//! generated tokens are those of weights read into memory, for every placement, and the
//! weights never pass through the heap, stored as f32 (multiplied in place) or as bf16
//! (each chunk widened into one reused buffer). One test per file: the heap counters are
//! process-wide.

use candle_core::{DType, Device, Tensor};
use memwise::{enable_memory_tracking, get_memory_stats, reset_memory_stats, TrackingAllocator};
use memwise_model::{
    write_synthetic_checkpoint, Architecture, ModelConverter, ReadStrategy, StreamedModel,
    SynthSpec,
};

#[global_allocator]
static ALLOC: TrackingAllocator = TrackingAllocator::system();

#[derive(Clone, Copy, Debug)]
enum Placement {
    Streamed,
    /// A budget that keeps some stages resident and streams the rest.
    Mixed,
    Full,
}

fn load(
    folder: &std::path::Path,
    mapped: bool,
    placement: Placement,
    depth: usize,
) -> StreamedModel {
    let mut converter = ModelConverter::new(folder).prefetch_depth(depth);
    if mapped {
        // SAFETY: the test's own checkpoint, not written while it runs.
        converter = converter.read_strategy(unsafe { ReadStrategy::mmap_release() });
    }
    if let Placement::Mixed = placement {
        converter = converter.budget(Some(30 << 20));
    }
    let mut model = converter
        .load_model_with_hooks(matches!(placement, Placement::Streamed))
        .unwrap();
    if let Placement::Full = placement {
        model.load_all().unwrap();
    }
    model
}

fn bits(tensor: &Tensor) -> Vec<u32> {
    let values: Vec<f32> = tensor.flatten_all().unwrap().to_vec1().unwrap();
    values.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn mapped_weights_give_the_logits_and_tokens_of_copies_without_touching_the_heap() {
    for dtype in [DType::F32, DType::BF16] {
        check(dtype);
    }
}

fn check(dtype: DType) {
    let dir = tempfile::tempdir().unwrap();
    let spec = SynthSpec {
        dtype,
        hidden_size: 256,
        intermediate_size: 1024,
        num_layers: 4,
        num_heads: 8,
        num_kv_heads: 4,
        vocab_size: 3000, // a head wider than one chunk of rows, with a partial last chunk
        ..SynthSpec::tiny(Architecture::Llama)
    };
    let folder = write_synthetic_checkpoint(&spec, &dir.path().join("m"))
        .unwrap()
        .folder;
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu).unwrap();
    let prompt = [3u32, 1, 4, 1, 5];

    let mut copied = load(&folder, false, Placement::Full, 1);
    let expected = bits(&copied.forward(&ids).unwrap());
    let expected_tokens = copied.generate(&prompt, 6, &[]).unwrap().tokens;
    drop(copied);
    let mut full_mapped_tokens = None;
    for placement in [Placement::Full, Placement::Streamed, Placement::Mixed] {
        let mut model = load(&folder, true, placement, 1);
        let logits = model.forward(&ids).unwrap();
        assert_eq!(
            bits(&logits),
            expected,
            "{dtype:?} {placement:?}: logits differ from a copy's"
        );
        // Generation multiplies one token at a time, where the chunked head may round
        // differently from the copy (see `models::weights`): placements agree to the bit.
        let tokens = model.generate(&prompt, 6, &[]).unwrap().tokens;
        match &full_mapped_tokens {
            None => full_mapped_tokens = Some(tokens.clone()),
            Some(full) => assert_eq!(&tokens, full, "{dtype:?} {placement:?}: tokens differ"),
        }
        assert_eq!(
            tokens, expected_tokens,
            "{dtype:?} {placement:?}: greedy tokens differ"
        );
    }

    // The heap never holds a mapped layer's weights: a copying run allocates each layer's
    // weights inside its scope (read on the caller's thread: no read-ahead), a mapped run
    // only activations.
    let layer_peaks = |mapped: bool| -> Vec<(u64, u64)> {
        let mut model = load(&folder, mapped, Placement::Streamed, 0);
        enable_memory_tracking(true);
        model.forward(&ids).unwrap();
        reset_memory_stats();
        model.forward(&ids).unwrap();
        let stats = get_memory_stats();
        enable_memory_tracking(false);
        model.stages()[1..=4]
            .iter()
            .map(|stage| {
                let record = stats.scopes_named(stage.name()).last().unwrap();
                (
                    stage.weight_bytes(DType::F32),
                    record.heap_peak_delta().unwrap(),
                )
            })
            .collect()
    };
    for (weights, peak) in layer_peaks(false) {
        assert!(
            peak >= weights,
            "{dtype:?}: a copied layer peaked at {peak} < {weights}"
        );
    }
    for (weights, peak) in layer_peaks(true) {
        assert!(
            peak < weights / 4,
            "{dtype:?}: a mapped layer allocated {peak} of {weights}"
        );
    }
}
