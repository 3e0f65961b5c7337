//! The workspace: conversion, read-back through the overlay, resume after SIGKILL, and
//! checksum-detected corruption.

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::{copy_fixture, fixture, read_all};
use memwise_model::checkpoint::StoredDType;
use memwise_model::workspace::{
    ConvertEvent, ConvertOptions, Origin, TensorBytes, MANIFEST_FILE, MANIFEST_VERSION,
};
use memwise_model::{Checkpoint, Error, ReadStrategy, Workspace};

/// Every stage of `checkpoint` reads each of its tensors from a file under `dir`.
fn assert_served_from(checkpoint: &Checkpoint, dir: &Path) {
    let mut reader = checkpoint.reader(ReadStrategy::Pread);
    for stage in checkpoint.stages() {
        let data = reader.read_stage(&stage.name).unwrap();
        for tensor in data.tensors() {
            let file = &tensor.info().file;
            assert!(
                file.starts_with(dir),
                "{}: {}",
                tensor.name(),
                file.display()
            );
        }
    }
}

fn stage_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".safetensors"))
        .collect();
    names.sort();
    names
}

#[test]
fn converts_a_bin_source_and_reads_it_back() {
    let source = Checkpoint::open(fixture("tiny-llama-bin-sharded")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::new(dir.path()).unwrap();
    let report = workspace
        .convert(&source, &ConvertOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!(report.written.len(), 5);
    assert!(report.in_place.is_empty() && report.reused.is_empty());
    assert_eq!(
        stage_files(dir.path()),
        [
            "lm_head.safetensors",
            "model.embed_tokens.safetensors",
            "model.layers.0.safetensors",
            "model.layers.1.safetensors",
            "model.norm.safetensors",
        ]
    );
    let manifest = workspace.manifest().unwrap().unwrap();
    assert_eq!(manifest.format_version, MANIFEST_VERSION);
    assert_eq!(manifest.stages.len(), 5);
    assert!(manifest
        .stages
        .iter()
        .all(|s| s.checksum.starts_with("crc32:")));
    assert_eq!(manifest.source.files.len(), 2);

    let converted = workspace.checkpoint(&source).unwrap();
    assert_served_from(&converted, dir.path());
    assert_eq!(
        read_all(&converted, ReadStrategy::Pread),
        read_all(&source, ReadStrategy::Pread)
    );

    // A second run finds everything intact and writes nothing.
    let again = workspace
        .convert(&source, &ConvertOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!(again.reused.len(), 5);
    assert!(again.written.is_empty() && again.rebuilt.is_empty());
    assert_eq!(again.bytes_written, 0);
}

#[test]
fn safetensors_sources_are_never_copied() {
    let source = Checkpoint::open(fixture("tiny-llama-safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::new(dir.path()).unwrap();
    let report = workspace
        .convert(&source, &ConvertOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!(report.in_place.len(), 5);
    assert_eq!(report.bytes_written, 0);
    assert!(stage_files(dir.path()).is_empty());
    // The runner still asks the workspace, and gets the source files themselves.
    let served = workspace.checkpoint(&source).unwrap();
    assert_served_from(&served, source.folder());

    // Converting to f16 writes converted stages, and they match torch's own f16 save.
    let f16 = ConvertOptions::with_dtype(Some(StoredDType::F16));
    let report = workspace.convert(&source, &f16, &mut |_| {}).unwrap();
    assert_eq!(report.written.len(), 5);
    let converted = workspace.checkpoint(&source).unwrap();
    let torch_f16 = Checkpoint::open(fixture("tiny-llama-sharded")).unwrap();
    assert_eq!(
        read_all(&converted, ReadStrategy::Pread),
        read_all(&torch_f16, ReadStrategy::Pread)
    );
}

#[test]
fn a_corrupted_file_is_detected_by_its_checksum_and_rebuilt() {
    let source = Checkpoint::open(fixture("tiny-llama-bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::new(dir.path()).unwrap();
    workspace
        .convert(&source, &ConvertOptions::default(), &mut |_| {})
        .unwrap();
    let victim = dir.path().join("model.layers.1.safetensors");
    let mut bytes = fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40; // one bit of one weight
    fs::write(&victim, bytes).unwrap();

    let err = workspace.verify().unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("model.layers.1.safetensors"),
        "{err}"
    );

    let report = workspace
        .convert(&source, &ConvertOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!(report.rebuilt, ["model.layers.1"]);
    assert_eq!(report.reused.len(), 3);
    workspace.verify().unwrap();
    let converted = workspace.checkpoint(&source).unwrap();
    assert_eq!(
        read_all(&converted, ReadStrategy::Pread),
        read_all(&source, ReadStrategy::Pread)
    );
}

#[test]
fn hook_stages_are_served_and_kept() {
    let source = Checkpoint::open(fixture("tiny-llama-safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::new(dir.path()).unwrap();
    let options = ConvertOptions::default();
    let doubled: Vec<u8> = [2.0f32; 8].iter().flat_map(|v| v.to_le_bytes()).collect();
    let shape = [8usize];
    let tensor = TensorBytes::new("model.norm.weight", StoredDType::F32, &shape, &doubled);
    workspace
        .write_stage(&source, &options, "model.norm", &[tensor])
        .unwrap();
    let manifest = workspace.manifest().unwrap().unwrap();
    assert_eq!(manifest.stages[0].origin, Origin::Hook);

    let report = workspace.convert(&source, &options, &mut |_| {}).unwrap();
    assert_eq!(
        report.in_place.len(),
        4,
        "safetensors stages are still streamed"
    );
    assert_eq!(report.reused, ["model.norm"]);
    let served = workspace.checkpoint(&source).unwrap();
    let mut reader = served.reader(ReadStrategy::Pread);
    let norm = reader.read_stage("model.norm").unwrap();
    assert_eq!(
        norm.get("model.norm.weight").unwrap().to_f32_vec().unwrap(),
        [2.0; 8]
    );
    drop(norm);

    // A hook's output cannot be rebuilt, so corruption is reported, not overwritten.
    let path = dir.path().join("model.norm.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, bytes).unwrap();
    let err = workspace
        .convert(&source, &options, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, Error::ChecksumMismatch { .. }), "{err}");
}

#[test]
fn a_workspace_of_another_model_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let workspace = Workspace::new(dir.path()).unwrap();
    let bin = Checkpoint::open(fixture("tiny-llama-bin")).unwrap();
    workspace
        .convert(&bin, &ConvertOptions::default(), &mut |_| {})
        .unwrap();
    let other = Checkpoint::open(fixture("tiny-llama-bin-sharded")).unwrap();
    let err = workspace
        .convert(&other, &ConvertOptions::default(), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, Error::Workspace { .. }), "{err}");
    assert!(err.to_string().contains("tiny-llama-bin"), "{err}");
    assert!(workspace.checkpoint(&other).is_err());
}

#[test]
fn a_changed_source_restarts_the_conversion() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("tiny-llama-bin", dir.path());
    let workspace = Workspace::new(dir.path().join("ws")).unwrap();
    let source = Checkpoint::open(&model).unwrap();
    workspace
        .convert(&source, &ConvertOptions::default(), &mut |_| {})
        .unwrap();
    // Re-downloading rewrites the file: the old layers must not be trusted.
    let bin = model.join("pytorch_model.bin");
    let bytes = fs::read(&bin).unwrap();
    fs::remove_file(&bin).unwrap();
    fs::write(&bin, bytes).unwrap();
    let source = Checkpoint::open(&model).unwrap();
    assert!(
        workspace.checkpoint(&source).is_err(),
        "stale workspace served"
    );
    let report = workspace
        .convert(&source, &ConvertOptions::default(), &mut |_| {})
        .unwrap();
    assert_eq!(report.written.len(), 4);
    assert!(report.reused.is_empty());
}

const CHILD_ENV: &str = "MEMWISE_TEST_CONVERT_CHILD";

/// Not a test on its own: the child process of `resumes_after_sigkill`. It converts the
/// source named in its environment, printing each tensor as it goes, slowly enough to be
/// killed midway.
#[test]
#[ignore = "the child process of convert_and_kill, which runs it with --ignored"]
fn convert_child() {
    let spec = std::env::var(CHILD_ENV)
        .expect("convert_child runs only as convert_and_kill's child process");
    let (source, dir) = spec.split_once('\n').unwrap();
    let source = Checkpoint::open(source).unwrap();
    let workspace = Workspace::new(dir).unwrap();
    let mut stdout = std::io::stdout();
    workspace
        .convert(&source, &ConvertOptions::default(), &mut |p| {
            if let ConvertEvent::TensorDone(name) = &p.event {
                writeln!(stdout, "tensor {name}").unwrap();
                stdout.flush().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
        .unwrap();
}

/// Starts a conversion in a child process and SIGKILLs it after `tensors` tensors.
fn convert_and_kill(source: &Path, dir: &Path, tensors: usize) {
    let spec = format!("{}\n{}", source.display(), dir.display());
    common::run_child_and_kill("convert_child", (CHILD_ENV, spec), tensors);
}

#[test]
fn resumes_after_sigkill_and_verifies_against_the_source() {
    let source_path: PathBuf = fixture("tiny-llama-bin-sharded");
    let source = Checkpoint::open(&source_path).unwrap();
    let total_tensors = source.index().tensors().len();
    // Kill inside the first layer, between layers, and deep into the run.
    for kill_after in [1, 4, 11, total_tensors - 2] {
        let dir = tempfile::tempdir().unwrap();
        convert_and_kill(&source_path, dir.path(), kill_after);
        let workspace = Workspace::new(dir.path()).unwrap();
        let recorded = workspace.manifest().unwrap().map_or(0, |m| m.stages.len());
        assert!(
            recorded < source.stages().len(),
            "kill after {kill_after}: not midway"
        );

        let report = workspace
            .convert(&source, &ConvertOptions::default(), &mut |_| {})
            .unwrap();
        assert_eq!(report.reused.len(), recorded, "kill after {kill_after}");
        assert_eq!(
            report.reused.len() + report.written.len(),
            source.stages().len()
        );
        assert!(
            fs::read_dir(dir.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")),
            "temporaries left behind"
        );
        assert!(dir.path().join(MANIFEST_FILE).exists());
        workspace.verify().unwrap();
        let converted = workspace.checkpoint(&source).unwrap();
        assert_eq!(
            read_all(&converted, ReadStrategy::Pread),
            read_all(&source, ReadStrategy::Pread),
            "kill after {kill_after}"
        );
    }
}
