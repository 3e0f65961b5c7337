//! Every refusal names the key, where the bad value came from, and what would be accepted.

use std::path::{Path, PathBuf};

use memwise::config;
use memwise::ErrorKind;
use serde_json::json;

fn no_env() -> config::Builder {
    config::Builder::new().env_from(std::iter::empty::<(String, String)>())
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The error from a file holding `toml`, checked to name the key and the file.
fn file_error(toml: &str, key: &str) -> config::Error {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "bad.toml", toml);
    let err = no_env().file(&file).build().unwrap_err();
    assert_eq!(err.key(), Some(key), "{err}");
    assert_eq!(err.origin(), &config::Source::File(file.clone()), "{err}");
    let text = err.to_string();
    assert!(text.contains(key), "{text}");
    assert!(text.contains(&format!("file {}", file.display())), "{text}");
    err
}

fn env_error(var: &str, value: &str, key: &str) -> config::Error {
    let err = config::Builder::new()
        .env_from([(var, value)])
        .build()
        .unwrap_err();
    assert_eq!(err.key(), Some(key), "{err}");
    assert_eq!(err.origin(), &config::Source::Env(var.to_owned()), "{err}");
    assert!(
        err.to_string()
            .contains(&format!("environment variable {var}")),
        "{err}"
    );
    err
}

fn code_error(values: serde_json::Value, key: &str) -> config::Error {
    let err = no_env().values(values).build().unwrap_err();
    assert_eq!(err.key(), Some(key), "{err}");
    assert_eq!(err.origin(), &config::Source::Code, "{err}");
    assert!(err.to_string().contains("code (configure)"), "{err}");
    err
}

#[test]
fn unknown_keys_suggest_the_closest_valid_name() {
    let err = file_error("[memory]\ngpu_bach_size = 8\n", "memory.gpu_bach_size");
    assert_eq!(err.kind(), config::ErrorKind::UnknownKey);
    assert!(
        err.message()
            .contains("did you mean memory.gpu_batch_size?"),
        "{err}"
    );

    // A key in the wrong section is found by its last segment.
    let err = file_error("gpu_batch_size = 8\n", "gpu_batch_size");
    assert!(err.message().contains("memory.gpu_batch_size"), "{err}");

    // From the environment the suggestion is the variable to set.
    let err = env_error("MEMWISE_QUANTIZATION__BTIS", "4", "quantization.btis");
    assert_eq!(err.kind(), config::ErrorKind::UnknownKey);
    assert!(
        err.message().contains("MEMWISE_QUANTIZATION__BITS"),
        "{err}"
    );

    let err = code_error(
        json!({ "memory": { "clean_weight_after_use": true } }),
        "memory.clean_weight_after_use",
    );
    assert!(
        err.message().contains("memory.clean_weights_after_use"),
        "{err}"
    );

    let err = file_error(
        "[memory.max_memroy]\ncpu = \"1GiB\"\n",
        "memory.max_memroy.cpu",
    );
    assert!(
        err.message()
            .contains("did you mean memory.max_memory.cpu?"),
        "{err}"
    );

    let err = file_error(
        "[memory.tracking]\nsample_interval = 5\n",
        "memory.tracking.sample_interval",
    );
    assert!(
        err.message()
            .contains("did you mean memory.tracking.sample_interval_ms?"),
        "{err}"
    );

    let err = code_error(json!({ "something_else": 1 }), "something_else");
    assert!(err.message().contains("memwise config show"), "{err}");
}

#[test]
fn keys_memwise_does_not_have_are_refused_with_the_reason() {
    for key in ["use_cpu_offload", "use_meta_tensors"] {
        let err = file_error(
            &format!("[memory]\n{key} = true\n"),
            &format!("memory.{key}"),
        );
        assert_eq!(err.kind(), config::ErrorKind::UnknownKey);
        assert!(err.message().contains("remove the key"), "{err}");
    }
}

#[test]
fn wrong_types_say_what_was_expected_and_found() {
    let err = file_error(
        "[memory]\ngpu_batch_size = \"eight\"\n",
        "memory.gpu_batch_size",
    );
    assert_eq!(err.kind(), config::ErrorKind::WrongType);
    assert!(
        err.message()
            .contains("expected a whole number, found string \"eight\""),
        "{err}"
    );

    let err = file_error("[memory]\ngpu_batch_size = 8.5\n", "memory.gpu_batch_size");
    assert_eq!(err.kind(), config::ErrorKind::WrongType);

    let err = env_error("MEMWISE_VERBOSE", "maybe", "verbose");
    assert_eq!(err.kind(), config::ErrorKind::WrongType);
    assert!(err.message().contains("true or false"), "{err}");

    let err = code_error(
        json!({ "quantization.symmetric": "yes" }),
        "quantization.symmetric",
    );
    assert_eq!(err.kind(), config::ErrorKind::WrongType);

    let err = code_error(json!({ "device": 0 }), "device");
    assert_eq!(err.kind(), config::ErrorKind::WrongType);
}

#[test]
fn out_of_range_values_are_refused() {
    let err = env_error(
        "MEMWISE_MEMORY__GPU_BATCH_SIZE",
        "0",
        "memory.gpu_batch_size",
    );
    assert_eq!(err.kind(), config::ErrorKind::InvalidValue);
    assert!(
        err.message().contains("at least") || err.message().contains("least allowed is 1"),
        "{err}"
    );

    for bits in [0, 1, 5, 6, 16] {
        let err = code_error(json!({ "quantization.bits": bits }), "quantization.bits");
        assert_eq!(err.kind(), config::ErrorKind::InvalidValue, "{bits}");
        assert!(err.message().contains("[2, 3, 4, 8]"), "{err}");
    }
    for bits in [2, 3, 4, 8] {
        let ok = no_env()
            .values(json!({ "quantization.bits": bits }))
            .build()
            .unwrap();
        assert_eq!(ok.config().quantization.bits, bits);
    }

    let err = file_error(
        "[quantization]\ngroup_size = 100\n",
        "quantization.group_size",
    );
    assert_eq!(err.kind(), config::ErrorKind::InvalidValue);
    assert!(err.message().contains("power of two"), "{err}");
    let err = code_error(
        json!({ "quantization.act_group_size": 0 }),
        "quantization.act_group_size",
    );
    assert_eq!(err.kind(), config::ErrorKind::InvalidValue);
    let err = file_error(
        "[memory.tracking]\nsample_interval_ms = 0\n",
        "memory.tracking.sample_interval_ms",
    );
    assert_eq!(err.kind(), config::ErrorKind::InvalidValue);
    assert!(err.message().contains("least allowed is 1"), "{err}");
    let err = env_error(
        "MEMWISE_MEMORY__TRACKING__SAMPLE_CAPACITY",
        "1",
        "memory.tracking.sample_capacity",
    );
    assert!(err.message().contains("least allowed is 2"), "{err}");
    let err = file_error(
        "[memory.tracking]\nsample_capacity = \"many\"\n",
        "memory.tracking.sample_capacity",
    );
    assert_eq!(err.kind(), config::ErrorKind::WrongType);
    let per_channel = no_env()
        .values(json!({ "quantization.group_size": -1 }))
        .build()
        .unwrap();
    assert_eq!(per_channel.config().quantization.group_size, -1);
}

#[test]
fn unknown_formats_and_devices_are_refused_with_the_choices() {
    let err = file_error(
        "[export]\nexport_format = \"autorund\"\n",
        "export.export_format",
    );
    assert_eq!(err.kind(), config::ErrorKind::InvalidValue);
    assert!(
        err.message()
            .contains("[\"autoround\", \"awq\", \"autogptq\"]"),
        "{err}"
    );
    assert!(err.message().contains("did you mean"), "{err}");

    for device in ["tpu", "cuda:x", "cuda:", "CPU"] {
        let err = env_error("MEMWISE_DEVICE", device, "device");
        assert_eq!(err.kind(), config::ErrorKind::InvalidValue, "{device}");
        assert!(err.message().contains("\"cuda:N\""), "{err}");
    }
    let err = file_error(
        "[memory.max_memory]\ngpu = \"1GiB\"\n",
        "memory.max_memory.gpu",
    );
    assert_eq!(err.kind(), config::ErrorKind::InvalidValue);

    let err = env_error("MEMWISE_LOG_LEVEL", "verbose", "log_level");
    assert_eq!(err.kind(), config::ErrorKind::InvalidValue);
}

#[test]
fn byte_sizes_parse_from_strings_and_refuse_nonsense() {
    let resolved = config::Builder::new()
        .env_from([("MEMWISE_MEMORY__MAX_MEMORY", "cpu=512MiB,cuda:0=2GB")])
        .build()
        .unwrap();
    let memory = &resolved.config().memory;
    assert_eq!(memory.budget("cpu").unwrap().bytes(), 512 << 20);
    assert_eq!(memory.budget("cuda:0").unwrap().bytes(), 2_000_000_000);

    let err = file_error(
        "[memory.max_memory]\ncpu = \"2 gigs\"\n",
        "memory.max_memory.cpu",
    );
    assert_eq!(err.kind(), config::ErrorKind::InvalidValue);
    assert!(err.message().contains("\"512MiB\""), "{err}");
    let err = file_error(
        "[memory]\npool_release_threshold = -5\n",
        "memory.pool_release_threshold",
    );
    assert_eq!(err.kind(), config::ErrorKind::InvalidValue);
    let err = env_error(
        "MEMWISE_MEMORY__MAX_MEMORY",
        "cpu:2GiB",
        "memory.max_memory",
    );
    assert!(err.message().contains("DEVICE=SIZE"), "{err}");
}

#[test]
fn folders_that_cannot_be_created_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = write(dir.path(), "a-file", "");
    let below = blocker.join("workspace");
    let toml = format!("[memory]\nworkspace_dir = {:?}\n", below.to_str().unwrap());
    let err = file_error(&toml, "memory.workspace_dir");
    assert_eq!(err.kind(), config::ErrorKind::UncreatablePath);
    assert!(err.message().contains("is a file"), "{err}");

    let err = env_error("MEMWISE_OUTPUT_DIR", below.to_str().unwrap(), "output_dir");
    assert_eq!(err.kind(), config::ErrorKind::UncreatablePath);
    let err = code_error(json!({ "export.export_path": below }), "export.export_path");
    assert_eq!(err.kind(), config::ErrorKind::UncreatablePath);
    // Checking creates nothing.
    assert!(!dir.path().join("nothing-made").exists());
    let ok = no_env()
        .values(json!({ "cache_dir": dir.path().join("nothing-made/yet") }))
        .build();
    assert!(ok.is_ok());
    assert!(!dir.path().join("nothing-made").exists());
}

#[test]
fn unreadable_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml");
    let err = no_env().file(&missing).build().unwrap_err();
    assert_eq!(err.kind(), config::ErrorKind::File);
    assert!(err.to_string().contains("missing.toml"), "{err}");

    let broken = write(dir.path(), "broken.toml", "[memory\ngpu_batch_size = 8\n");
    let err = no_env().file(&broken).build().unwrap_err();
    assert_eq!(err.kind(), config::ErrorKind::File);
    assert!(err.message().contains("not valid TOML"), "{err}");

    let yaml = write(dir.path(), "c.yaml", "memory: {}\n");
    let err = no_env().file(&yaml).build().unwrap_err();
    assert!(err.message().contains(".toml or .json"), "{err}");

    let not_a_table = write(dir.path(), "list.json", "[1, 2]");
    let err = no_env().file(&not_a_table).build().unwrap_err();
    assert_eq!(err.kind(), config::ErrorKind::WrongType);
}

#[test]
fn check_lists_every_problem_and_errors_convert_into_memwise_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "bad.toml",
        "device = \"tpu\"\n[memory]\ngpu_batch_size = 0\n[quantization]\nbits = 5\n",
    );
    let errors = no_env().file(&file).check().unwrap_err();
    let keys: Vec<_> = errors.iter().filter_map(|e| e.key()).collect();
    assert_eq!(keys.len(), 3, "{errors:?}");
    for key in ["device", "memory.gpu_batch_size", "quantization.bits"] {
        assert!(keys.contains(&key), "{key} missing from {keys:?}");
    }

    let err: memwise::Error = errors[0].clone().into();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.message().contains("bad.toml"), "{err}");
    assert!(std::error::Error::source(&err).is_some());
}
