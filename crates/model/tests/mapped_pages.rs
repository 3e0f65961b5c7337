//! A stage streamed from the mapped checkpoint holds at most one chunk of its pages in the
//! process at a time, and none once it has run: a thread watches the resident bytes of the
//! checkpoint's mappings (`/proc/self/smaps`) through three passes.

use candle_core::{DType, Device, Tensor};
use memwise_model::{
    write_synthetic_checkpoint, Architecture, ModelConverter, ReadStrategy, SynthSpec,
};

/// Resident bytes of this process's mappings of files under `folder` (`/proc/self/smaps`).
fn mapped_rss_under(folder: &std::path::Path) -> u64 {
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let folder = folder.to_str().unwrap();
    let mut inside = false;
    let mut total = 0;
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            inside = fields.last().is_some_and(|path| path.starts_with(folder));
        } else if inside && fields.first() == Some(&"Rss:") {
            total += fields[1].parse::<u64>().unwrap_or(0) << 10;
        }
    }
    total
}

#[test]
fn a_streamed_mapped_stage_never_holds_more_than_a_chunk_of_its_pages() {
    let dir = tempfile::tempdir().unwrap();
    // Layers of 52 MiB (four 4 MiB attention matrices, three 12 MiB MLP ones): several
    // chunks each, so holding a stage would show.
    let spec = SynthSpec {
        hidden_size: 1024,
        intermediate_size: 3072,
        num_layers: 3,
        num_heads: 8,
        num_kv_heads: 8,
        vocab_size: 1000,
        ..SynthSpec::tiny(Architecture::Llama)
    };
    let folder = write_synthetic_checkpoint(&spec, &dir.path().join("m"))
        .unwrap()
        .folder;
    // SAFETY: the test's own checkpoint, not written while it runs.
    let mut model = ModelConverter::new(&folder)
        .read_strategy(unsafe { ReadStrategy::mmap_release() })
        .load_model_with_hooks(true)
        .unwrap();
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9, 2, 6]], &Device::Cpu).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (done, folder) = (std::sync::Arc::clone(&done), folder.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(mapped_rss_under(&folder));
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            peak
        })
    };
    for _ in 0..3 {
        model.forward(&ids).unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = watcher.join().unwrap();
    let after = mapped_rss_under(&folder);
    let layer = model.stages()[1].weight_bytes(DType::F32);
    // One 12 MiB matrix (under a 16 MiB chunk) and the pages at its edges.
    assert!(
        peak <= (13 << 20),
        "the mapped files held {peak} bytes at once; a layer is {layer}"
    );
    // Only the pages a tensor shares with its neighbours (two per tensor at most) stay.
    assert!(
        after <= 1 << 20,
        "{after} bytes stayed mapped after the passes"
    );
    assert!(
        peak > 0,
        "the watcher saw no mapped page: is the model mapped?"
    );
}
