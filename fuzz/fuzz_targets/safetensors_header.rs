//! Safetensors headers, shard indexes and config.json: any bytes must give Ok or Err,
//! never a panic, an abort, or an allocation the input did not pay for.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use memwise_model::checkpoint::{parse_safetensors, parse_shard_index, ModelConfig};

fuzz_target!(|data: &[u8]| {
    let file = Path::new("fuzz.safetensors");
    // As a whole file, and as the head of a file that claims to be much longer (the reader
    // checks offsets against the real length, which it takes from the file system).
    let _ = parse_safetensors(file, data, data.len() as u64);
    let _ = parse_safetensors(file, data, u64::MAX);
    // Shard names resolve against a real folder: the committed sharded fixture.
    let folder = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crates/model/tests/fixtures/tiny-llama-sharded"
    ));
    let _ = parse_shard_index(folder, &folder.join("model.safetensors.index.json"), data);
    let _ = ModelConfig::parse(Path::new("config.json"), data);
});
