//! Layer order and provenance, through `config::Builder` with an explicit environment, so no
//! test here touches the process-wide configuration or environment.

use std::path::{Path, PathBuf};

use memwise::config::{self, ByteSize};
use serde_json::json;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn no_env() -> config::Builder {
    config::Builder::new().env_from(std::iter::empty::<(String, String)>())
}

#[test]
fn each_layer_overrides_the_ones_below() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.toml", "[memory]\ngpu_batch_size = 32\n");
    let env = [("MEMWISE_MEMORY__GPU_BATCH_SIZE", "8")];
    let code = json!({ "memory.gpu_batch_size": 4 });

    let batch = |builder: config::Builder| builder.build().unwrap().config().memory.gpu_batch_size;
    assert_eq!(batch(no_env()), 16);
    assert_eq!(batch(no_env().file(&file)), 32);
    assert_eq!(batch(config::Builder::new().env_from(env).file(&file)), 8);
    assert_eq!(
        batch(
            config::Builder::new()
                .env_from(env)
                .file(&file)
                .values(code.clone())
        ),
        4
    );
    // Code beats the environment even without a file, and the environment beats defaults.
    assert_eq!(batch(config::Builder::new().env_from(env).values(code)), 4);
    assert_eq!(batch(config::Builder::new().env_from(env)), 8);
}

#[test]
fn every_value_says_where_it_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        "device = \"cuda:1\"\n[quantization]\nbits = 8\n",
    );
    let resolved = config::Builder::new()
        .env_from([(
            "MEMWISE_OUTPUT_DIR",
            dir.path().join("out").to_str().unwrap(),
        )])
        .file(&file)
        .values(json!({ "export": { "export_format": "awq" } }))
        .build()
        .unwrap();
    let config = resolved.config();
    assert_eq!(config.device, memwise::config::DeviceChoice::Cuda(Some(1)));
    assert_eq!(config.quantization.bits, 8);
    assert_eq!(
        config.export.export_format,
        memwise::config::ExportFormat::Awq
    );
    assert_eq!(config.output_dir, dir.path().join("out"));

    let from_file = config::Source::File(file.clone());
    assert_eq!(resolved.origin("device"), Some(&from_file));
    assert_eq!(resolved.origin("quantization.bits"), Some(&from_file));
    assert_eq!(resolved.origin("config_path"), Some(&from_file));
    assert_eq!(config.config_path.as_deref(), Some(file.as_path()));
    assert_eq!(
        resolved.origin("output_dir"),
        Some(&config::Source::Env("MEMWISE_OUTPUT_DIR".into()))
    );
    assert_eq!(
        resolved.origin("export.export_format"),
        Some(&config::Source::Code)
    );
    assert_eq!(
        resolved.origin("memory.gpu_batch_size"),
        Some(&config::Source::Default)
    );

    // entries() lists every key once, sources included, in section order.
    let entries = resolved.entries();
    let first = &entries[0];
    assert_eq!(first.key, "memory.workspace_dir");
    let origin_of = |key: &str| {
        entries
            .iter()
            .find(|e| e.key == key)
            .unwrap()
            .origin
            .clone()
    };
    assert_eq!(origin_of("quantization.bits"), from_file);
    assert_eq!(origin_of("export.export_format"), config::Source::Code);
    let unset = entries.iter().find(|e| e.key == "model_path").unwrap();
    assert_eq!(unset.value, None);
}

#[test]
fn memwise_config_names_the_file_and_an_explicit_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    let named = write(
        dir.path(),
        "named.json",
        r#"{"memory": {"prefetch_depth": 3}}"#,
    );
    let explicit = write(
        dir.path(),
        "explicit.toml",
        "[memory]\nprefetch_depth = 5\n",
    );
    let env = [("MEMWISE_CONFIG", named.to_str().unwrap())];

    let resolved = config::Builder::new().env_from(env).build().unwrap();
    assert_eq!(resolved.config().memory.prefetch_depth, 3);
    assert_eq!(
        resolved.origin("memory.prefetch_depth"),
        Some(&config::Source::File(named.clone()))
    );
    let resolved = config::Builder::new()
        .env_from(env)
        .file(&explicit)
        .build()
        .unwrap();
    assert_eq!(resolved.config().memory.prefetch_depth, 5);
}

#[test]
fn budgets_merge_per_device_across_layers() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "c.toml",
        "[memory.max_memory]\ncpu = \"2GiB\"\n\"cuda:0\" = \"10GiB\"\n",
    );
    let resolved = config::Builder::new()
        .env_from([("MEMWISE_MEMORY__MAX_MEMORY__CPU", "512MiB")])
        .file(&file)
        .values(json!({ "memory": { "max_memory": { "cuda:1": 4_000_000_000u64 } } }))
        .build()
        .unwrap();
    let memory = &resolved.config().memory;
    assert_eq!(memory.budget("cpu"), Some(ByteSize(512 << 20)));
    assert_eq!(memory.budget("cuda:0"), Some(ByteSize(10 << 30)));
    assert_eq!(memory.budget("cuda:1"), Some(ByteSize(4_000_000_000)));
    assert_eq!(
        resolved.origin("memory.max_memory.cpu"),
        Some(&config::Source::Env(
            "MEMWISE_MEMORY__MAX_MEMORY__CPU".into()
        ))
    );
    assert_eq!(
        resolved.origin("memory.max_memory.cuda:0"),
        Some(&config::Source::File(file))
    );
    assert_eq!(
        resolved.origin("memory.max_memory.cuda:1"),
        Some(&config::Source::Code)
    );
}

#[test]
fn nested_and_dotted_code_values_are_the_same() {
    let nested = no_env()
        .values(json!({ "memory": { "tracking": { "record_capacity": 7 } } }))
        .build()
        .unwrap();
    let dotted = no_env()
        .values(json!({ "memory.tracking.record_capacity": 7 }))
        .build()
        .unwrap();
    assert_eq!(nested.config(), dotted.config());
    assert_eq!(nested.config().memory.tracking.record_capacity, 7);
}

#[test]
fn the_cache_dir_comes_from_memwise_cache_dir_else_the_platform() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let resolved = config::Builder::new()
        .env_from([("MEMWISE_CACHE_DIR", cache.to_str().unwrap())])
        .build()
        .unwrap();
    assert_eq!(resolved.config().cache_dir, cache);
    let default = no_env().build().unwrap();
    assert_eq!(default.config().cache_dir.file_name().unwrap(), "memwise");
    assert_eq!(default.origin("cache_dir"), Some(&config::Source::Default));
}

#[test]
fn null_unsets_an_optional_key_set_below() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "c.toml", "model_path = \"models/llama\"\n");
    let set = no_env().file(&file).build().unwrap();
    assert_eq!(
        set.config().model_path.as_deref(),
        Some(Path::new("models/llama"))
    );
    let unset = no_env()
        .file(&file)
        .values(json!({ "model_path": null }))
        .build()
        .unwrap();
    assert_eq!(unset.config().model_path, None);
    assert_eq!(unset.origin("model_path"), Some(&config::Source::Code));
}
