//! save / load round trips in TOML and JSON.

use memwise::config::{self, ByteSize, ExportFormat, LogLevel};
use memwise::Config;

fn changed_everywhere(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config.memory.workspace_dir = dir.join("workspace");
    config.memory.gpu_batch_size = 3;
    config.memory.empty_device_cache = false;
    config
        .memory
        .max_memory
        .insert("cpu".into(), ByteSize(3 << 30));
    config
        .memory
        .max_memory
        .insert("cuda:0".into(), ByteSize(2_000_000_000));
    config.memory.prefetch_depth = 0;
    config.memory.tracking.enabled = true;
    config.memory.tracking.record_capacity = 50;
    config.memory.trim_allocator = false;
    config.memory.pool_release_threshold = Some(ByteSize(1 << 30));
    config.quantization.bits = 2;
    config.quantization.group_size = -1;
    config.quantization.weight_dtype = "int2".into();
    config.quantization.act_bits = 8;
    config.export.export_format = ExportFormat::AutoGptq;
    config.export.export_path = Some(dir.join("export"));
    config.export.interleave = true;
    config.model_path = Some("models/tiny-llama".into());
    config.device = config::DeviceChoice::Cuda(Some(2));
    config.output_dir = dir.join("output");
    config.cache_dir = dir.join("cache");
    config.verbose = true;
    config.log_level = LogLevel::Debug;
    config
}

fn load(path: &std::path::Path) -> Config {
    let resolved = config::Builder::new()
        .env_from(std::iter::empty::<(String, String)>())
        .file(path)
        .build()
        .unwrap();
    Config::clone(resolved.config())
}

#[test]
fn toml_and_json_give_back_what_was_saved() {
    let dir = tempfile::tempdir().unwrap();
    let original = changed_everywhere(dir.path());
    for name in ["saved.toml", "saved.json"] {
        let path = dir.path().join(name);
        original.save(&path).unwrap();
        let loaded = load(&path);
        let mut expected = original.clone();
        // Loading records where the configuration came from.
        expected.config_path = Some(path.clone());
        assert_eq!(loaded, expected, "{name}");
        // And saving what was loaded writes the same text again.
        let again = dir.path().join(format!("again-{name}"));
        loaded.save(&again).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            std::fs::read_to_string(&again).unwrap()
        );
    }
}

#[test]
fn saved_toml_reads_like_the_documentation() {
    let text = Config::default().to_toml();
    assert!(text.contains("[memory]"), "{text}");
    assert!(text.contains("gpu_batch_size = 16"), "{text}");
    assert!(text.contains("[quantization]"), "{text}");
    assert!(text.contains("export_format = \"autoround\""), "{text}");
    assert!(!text.contains("config_path"), "{text}");
}

#[test]
fn saving_to_an_unknown_format_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = Config::default()
        .save(dir.path().join("c.yaml"))
        .unwrap_err();
    assert_eq!(err.kind(), config::ErrorKind::File);
    assert!(err.to_string().contains("c.yaml"), "{err}");
}
