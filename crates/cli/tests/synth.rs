//! `memwise synth` end to end: the binary writes a sharded checkpoint, the same seed the
//! same bytes, and refuses to write over files.

use std::path::Path;
use std::process::{Command, Output};

fn synth(out: &Path, seed: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memwise"))
        .args([
            "synth",
            "--arch",
            "qwen2",
            "--hidden",
            "32",
            "--intermediate",
            "64",
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--vocab",
            "64",
            "--shard-size",
            "20kB",
            "--seed",
            seed,
        ])
        .arg(out)
        .output()
        .expect("memwise runs")
}

fn files(folder: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(folder)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let name = entry.file_name().into_string().unwrap();
            (name, std::fs::read(entry.path()).unwrap())
        })
        .collect();
    files.sort();
    files
}

#[test]
fn synth_writes_a_sharded_checkpoint_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    for out in [&a, &b] {
        let output = synth(out, "9");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(String::from_utf8_lossy(&output.stdout).contains("shard(s)"));
    }
    let written = files(&a);
    let names: Vec<&str> = written.iter().map(|(name, _)| name.as_str()).collect();
    assert!(names.contains(&"config.json"));
    assert!(names.contains(&"model.safetensors.index.json"));
    let shards = names.iter().filter(|n| n.ends_with(".safetensors")).count();
    assert!(shards > 1, "20kB shards split a 2-layer model: {names:?}");
    assert_eq!(written, files(&b));

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "qwen2");
    assert_eq!(config["num_key_value_heads"], 2);
}

#[test]
fn synth_refuses_a_folder_with_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
    let output = synth(dir.path(), "1");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("exists and is not empty"), "{stderr}");
}

#[test]
fn every_new_architecture_synthesizes_and_runs_streamed_as_loaded_whole() {
    let memwise = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_memwise"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let dir = tempfile::tempdir().unwrap();
    for arch in ["qwen3", "phi3", "gemma3"] {
        let model = dir.path().join(arch);
        let model = model.to_str().unwrap();
        memwise(&["synth", "--arch", arch, "--layers", "2", model]);
        let logits = |mode: &str| {
            let out = dir.path().join(format!("{arch}-{mode}.safetensors"));
            let mut args = vec!["run", model, "--input-ids", "1,2,3,4", "--output"];
            args.push(out.to_str().unwrap());
            if mode == "full" {
                args.push("--full");
            }
            memwise(&args);
            std::fs::read(out).unwrap()
        };
        assert_eq!(logits("streamed"), logits("full"), "{arch}");
    }
}
