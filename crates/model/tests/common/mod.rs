//! Helpers shared by the integration tests: fixture paths and copies to corrupt.

#![allow(dead_code)] // each test file uses its own subset

use std::fs;
use std::path::{Path, PathBuf};

use memwise_model::{Checkpoint, ReadStrategy};
use serde_json::{Map, Value};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A writable copy of fixture `name` inside `dir`.
pub fn copy_fixture(name: &str, dir: &Path) -> PathBuf {
    let target = dir.join(name);
    fs::create_dir_all(&target).unwrap();
    for entry in fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
    target
}

/// Every tensor of `checkpoint`, read stage by stage, then those no stage reads, each once:
/// name → (dtype, shape, bytes).
pub fn read_all(
    checkpoint: &Checkpoint,
    strategy: ReadStrategy,
) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let mut reader = checkpoint.reader(strategy);
    let mut out = std::collections::BTreeMap::new();
    let mut collect = |data: &memwise_model::checkpoint::LayerData<'_>| {
        for t in data.tensors() {
            let value = (
                t.dtype().to_string(),
                t.shape().to_vec(),
                t.bytes().to_vec(),
            );
            out.entry(t.name().to_owned()).or_insert(value);
        }
    };
    for stage in checkpoint.stages() {
        collect(&reader.read_stage(&stage.name).unwrap());
    }
    let unread: Vec<String> = checkpoint
        .index()
        .tensors()
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let unread: Vec<&str> = unread.iter().map(String::as_str).collect();
    collect(&reader.read_tensors(None, &unread).unwrap());
    out.into_iter()
        .map(|(name, (dtype, shape, bytes))| (name, dtype, shape, bytes))
        .collect()
}

/// Rewrites the header of a safetensors file with `edit`, keeping its data bytes.
pub fn edit_header(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let bytes = fs::read(path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    edit(&mut header);
    let json = Value::Object(header).to_string();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(&bytes[8 + len..]);
    fs::write(path, out).unwrap();
}

/// Rewrites a JSON file with `edit`.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
    edit(&mut value);
    fs::write(path, value.to_string()).unwrap();
}

/// Rewrites the PyTorch zip archive at `path`, passing each entry's name and bytes through
/// `edit`, so that a test can change `data.pkl` and still have valid CRCs.
pub fn edit_torch_zip(path: &Path, mut edit: impl FnMut(&str, Vec<u8>) -> Vec<u8>) {
    use std::io::{Read, Write};
    let mut archive = zip::ZipArchive::new(fs::File::open(path).unwrap()).unwrap();
    let mut out = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().unwrap().into_owned();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        out.start_file(name.clone(), options).unwrap();
        out.write_all(&edit(&name, bytes)).unwrap();
    }
    fs::write(path, out.finish().unwrap().into_inner()).unwrap();
}

/// Runs the `#[ignore]`d test `child` of this test binary in a child process, with `env`
/// set (which tells it what to do), and SIGKILLs it once it has printed `lines` lines
/// starting with `tensor ` (the child slows itself down after each, so that it is killed
/// midway).
pub fn run_child_and_kill(child: &str, env: (&str, String), lines: usize) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut process = Command::new(std::env::current_exe().unwrap())
        .args([
            child,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(env.0, env.1)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(process.stdout.take().unwrap());
    let mut seen = 0;
    for line in stdout.lines() {
        if line.unwrap().starts_with("tensor ") {
            seen += 1;
            if seen == lines {
                break;
            }
        }
    }
    assert_eq!(seen, lines, "the child finished before it could be killed");
    process.kill().unwrap(); // SIGKILL on Unix: no destructor, no flush, no cleanup
    let status = process.wait().unwrap();
    assert!(!status.success());
}
