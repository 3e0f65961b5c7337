//! The spec's "Model Inference Pipeline": load with `ModelConverter` under a
//! `MemoryTracker`, run inference under another, clean up, and print every scope.
//!
//! It runs the model `model_path` names in the configuration, or else a tiny seeded Llama it
//! writes to a temporary folder (the one `memwise synth` makes). `ModelConverter::new`
//! takes `memory.prefetch_depth`, the budget `memory.max_memory.cpu` and an existing
//! `memory.workspace_dir` from the configuration; `memory.clean_weights_after_use` decides
//! whether each layer's weights are released after it has run.
//!
//! ```sh
//! cargo run -p memwise-model --example model_pipeline
//! MEMWISE_MEMORY__CLEAN_WEIGHTS_AFTER_USE=false cargo run -p memwise-model --example model_pipeline
//! ```

// Count every heap allocation, so each scope records its true peak.
#[global_allocator]
static ALLOC: memwise::TrackingAllocator = memwise::TrackingAllocator::system();

use std::error::Error;

use candle_core::{Device, Tensor};
use memwise::config::DeviceChoice;
use memwise::{clear_memory, enable_memory_tracking, get_config, get_memory_stats, init_config};
use memwise::{track, MemoryTracker};
use memwise_model::{write_synthetic_checkpoint, Architecture, ModelConverter, SynthSpec};

fn main() -> std::process::ExitCode {
    match run() {
        Ok(lines) => {
            for line in lines {
                println!("{line}");
            }
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the pipeline and returns what it prints: one line per scope, then the totals.
pub fn run() -> Result<Vec<String>, Box<dyn Error>> {
    // A bad MEMWISE_* variable or config file is reported here, naming the key and source.
    init_config()?;
    enable_memory_tracking(true);
    let config = get_config();
    let device = match config.device {
        DeviceChoice::Auto | DeviceChoice::Cpu => Device::Cpu,
        other => {
            let why = format!("{other} is not available: this build runs on the CPU; set device = \"cpu\" or \"auto\"");
            return Err(memwise::config::refuse("device", why).into());
        }
    };
    let scratch = tempfile::tempdir()?;
    let model_path = match &config.model_path {
        Some(path) => path.clone(),
        None => {
            let spec = SynthSpec::tiny(Architecture::Llama);
            write_synthetic_checkpoint(&spec, &scratch.path().join("tiny-llama"))?.folder
        }
    };

    // Load model efficiently
    let mut model = {
        let _t = MemoryTracker::new("model_loading");
        ModelConverter::new(&model_path)
            .device(device.clone())
            .load_model_with_hooks(config.memory.clean_weights_after_use)?
    };

    // Run inference with memory tracking; each layer runs in a scope of its own
    let input_ids = Tensor::new(&[[1u32, 2, 3, 4]], &device)?;
    let shape = track("inference", || -> Result<_, Box<dyn Error>> {
        let outputs = model.forward(&input_ids)?;
        let shape = outputs.dims().to_vec(); // processed_results = post_process(outputs)
        clear_memory(outputs); // clear_memory([outputs])
        Ok(shape)
    })?;

    // Final cleanup
    let stages: Vec<String> = model.stages().iter().map(|s| s.name().to_owned()).collect();
    let freed = clear_memory(model).freed.heap.unwrap_or(0);

    let stats = get_memory_stats();
    let mut lines = vec![format!(
        "{} ({} stages), clean_weights_after_use = {}, logits {shape:?}",
        model_path.display(),
        stages.len(),
        config.memory.clean_weights_after_use
    )];
    let names = ["model_loading"]
        .into_iter()
        .chain(stages.iter().map(String::as_str))
        .chain(["inference"]);
    for name in names {
        if let Some(record) = stats.scopes_named(name).last() {
            lines.push(format!(
                "{name:<18} peak +{:>9} bytes, kept {:>9} bytes",
                record.heap_peak_delta().unwrap_or(0),
                record.heap_retained().unwrap_or(0)
            ));
        }
    }
    lines.push(format!("final cleanup freed {freed} heap bytes"));
    Ok(lines)
}
