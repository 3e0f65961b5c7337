//! The spec's "Model Inference Pipeline", driven by the configuration: load under a
//! `MemoryTracker`, run inference under another, clean up, and report.
//!
//! The spec loads through `ModelConverter`, which arrives with `memwise-model` (streaming
//! Hugging Face checkpoints with candle). Until then this example runs a small candle-free
//! MLP whose layers come from a deterministic stand-in for a checkpoint, so the parts this
//! crate owns are real: the configuration decides whether weights are released after use
//! (`memory.clean_weights_after_use`), whether scopes are recorded and how cleanup runs
//! (`optimize_memory_usage`), and the scopes measure the difference.
//!
//! ```sh
//! cargo run -p memwise --example model_pipeline
//! MEMWISE_MEMORY__CLEAN_WEIGHTS_AFTER_USE=false cargo run -p memwise --example model_pipeline
//! ```

#[global_allocator]
static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();

use memwise::{
    clear_memory, configure, get_config, get_memory_stats, init_config, optimize_memory_usage,
    MemoryTracker,
};
use serde_json::json;

const WIDTH: usize = 512;
const LAYERS: usize = 8;

/// One dense layer, `WIDTH x WIDTH`, 1 MiB of weights.
struct Layer {
    weights: Vec<f32>,
}

impl Layer {
    /// Reads layer `index` from the "checkpoint": deterministic values standing in for a
    /// safetensors slice.
    fn load(index: usize) -> Layer {
        let weights = (0..WIDTH * WIDTH)
            .map(|i| (((i * 31 + index * 17) % 97) as f32 - 48.0) / (97.0 * WIDTH as f32))
            .collect();
        Layer { weights }
    }

    fn forward(&self, input: &[f32]) -> Vec<f32> {
        self.weights
            .chunks_exact(WIDTH)
            .map(|row| {
                row.iter()
                    .zip(input)
                    .map(|(w, x)| w * x)
                    .sum::<f32>()
                    .max(0.0)
                    + 0.01
            })
            .collect()
    }
}

/// Keeps every layer resident, or only knows how to load each one when it is needed.
enum Model {
    Resident(Vec<Layer>),
    Streamed,
}

impl Model {
    fn load(clean_weights: bool) -> Model {
        if clean_weights {
            Model::Streamed
        } else {
            Model::Resident((0..LAYERS).map(Layer::load).collect())
        }
    }

    fn forward(&self, input: Vec<f32>) -> Vec<f32> {
        let mut hidden = input;
        for index in 0..LAYERS {
            let _layer_scope = MemoryTracker::new(format!("layer_{index}"));
            hidden = match self {
                Model::Resident(layers) => layers[index].forward(&hidden),
                // Materialized just before use and dropped right after (clean_weights).
                Model::Streamed => Layer::load(index).forward(&hidden),
            };
        }
        hidden
    }
}

fn main() -> Result<(), memwise::Error> {
    init_config()?;
    // The spec's configure(memory={...}); the environment or a file may also set these.
    configure(json!({ "memory": { "tracking": { "enabled": true } } }))?;
    let report = optimize_memory_usage();
    print!("optimize_memory_usage:\n{report}");

    let config = get_config();
    println!(
        "device {} (this example runs on the CPU), clean_weights_after_use = {}",
        config.device, config.memory.clean_weights_after_use
    );

    let model = {
        let _scope = MemoryTracker::new("model_loading");
        Model::load(config.memory.clean_weights_after_use)
    };

    let inputs: Vec<f32> = (0..WIDTH).map(|i| (i % 7) as f32 / 7.0).collect();
    let processed = {
        let _scope = MemoryTracker::new("inference");
        let outputs = model.forward(inputs);
        let processed: f32 = outputs.iter().sum(); // post_process(outputs)
        clear_memory(outputs); // clear_memory([outputs])
        processed
    };
    println!("output sum {processed:.4}");

    let final_cleanup = clear_memory(model); // clear_memory()
    println!(
        "final cleanup freed {:?} heap bytes",
        final_cleanup.freed.heap
    );

    let stats = get_memory_stats();
    for name in ["model_loading", "inference"] {
        if let Some(record) = stats.scopes_named(name).last() {
            println!(
                "{name:<14} peak +{:>9} bytes, kept {:>9} bytes",
                record.heap_peak_delta().unwrap_or(0),
                record.heap_retained().unwrap_or(0)
            );
        }
    }
    Ok(())
}
