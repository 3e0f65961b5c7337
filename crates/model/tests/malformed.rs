//! One test per malformed input: each must be an error that names the right file and
//! tensor, never a panic. Each corrupts a fresh copy of a committed fixture.

mod common;

use std::fs;
use std::path::Path;

use common::{copy_fixture, edit_header, edit_json};
use memwise_model::checkpoint::MAX_HEADER_BYTES;
use memwise_model::{Checkpoint, Error, ReadStrategy};
use serde_json::json;

/// The mapping strategy. SAFETY: nothing writes the files these tests and benches read
/// while they read them (fixtures are read-only; generated files are written before).
const MMAP: ReadStrategy = unsafe { ReadStrategy::mmap_release() };

const SHARD_1: &str = "model-00001-of-00002.safetensors";
const SHARD_2: &str = "model-00002-of-00002.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// Copies fixture `name`, lets `corrupt` damage the copy, and returns the error opening it.
fn open_corrupted(name: &str, corrupt: impl FnOnce(&Path)) -> Error {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture(name, dir.path());
    corrupt(&model);
    Checkpoint::open(&model).unwrap_err()
}

fn assert_names(err: &Error, file: &str, tensor: &str) {
    let message = err.to_string();
    assert!(message.contains(file), "{message:?} should name {file}");
    assert!(message.contains(tensor), "{message:?} should name {tensor}");
}

#[test]
fn header_size_is_capped() {
    let err = open_corrupted("tiny-llama-safetensors", |model| {
        let path = model.join("model.safetensors");
        let mut bytes = fs::read(&path).unwrap();
        bytes[..8].copy_from_slice(&(MAX_HEADER_BYTES + 1).to_le_bytes());
        fs::write(&path, bytes).unwrap();
    });
    assert!(matches!(err, Error::HeaderTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"));
}

#[test]
fn offsets_past_the_end_of_the_file() {
    let err = open_corrupted("tiny-llama-safetensors", |model| {
        let path = model.join("model.safetensors");
        edit_header(&path, |header| {
            // Same length, shifted a megabyte past the end of the data.
            let entry = header["model.norm.weight"].as_object_mut().unwrap();
            entry["data_offsets"] = json!([1 << 20, (1 << 20) + 32]);
        });
    });
    assert!(matches!(err, Error::Truncated { .. }), "{err}");
    assert_names(&err, "model.safetensors", "model.norm.weight");
}

#[test]
fn overlapping_tensors() {
    let err = open_corrupted("tiny-llama-safetensors", |model| {
        let path = model.join("model.safetensors");
        edit_header(&path, |header| {
            // Both norms hold 8 f32 values; move layer 1's half-way into layer 0's.
            let start = header["model.layers.0.input_layernorm.weight"]["data_offsets"][0]
                .as_u64()
                .unwrap();
            let other = header["model.layers.1.input_layernorm.weight"]
                .as_object_mut()
                .unwrap();
            other["data_offsets"] = json!([start + 16, start + 48]);
        });
    });
    assert!(matches!(err, Error::OverlappingTensors { .. }), "{err}");
    assert_names(
        &err,
        "model.safetensors",
        "model.layers.1.input_layernorm.weight",
    );
    assert_names(
        &err,
        "model.safetensors",
        "model.layers.0.input_layernorm.weight",
    );
}

#[test]
fn dtype_times_shape_must_equal_the_byte_length() {
    let with_norm_shape = |shape: serde_json::Value| {
        open_corrupted("tiny-llama-safetensors", |model| {
            edit_header(&model.join("model.safetensors"), |header| {
                header["model.norm.weight"]["shape"] = shape;
            });
        })
    };
    let err = with_norm_shape(json!([9]));
    assert!(matches!(err, Error::InvalidTensor { .. }), "{err}");
    assert_names(&err, "model.safetensors", "model.norm.weight");

    // 2^32 × 2^32 elements overflows u64 bytes: refused, not wrapped to a small number.
    let err = with_norm_shape(json!([4294967296u64, 4294967296u64]));
    assert!(err.to_string().contains("overflows"), "{err}");
    assert_names(&err, "model.safetensors", "model.norm.weight");
}

fn sharded_with_index_entry(tensor: &str, shard: &str) -> Error {
    open_corrupted("tiny-llama-sharded", |model| {
        edit_json(&model.join(INDEX), |index| {
            index["weight_map"][tensor] = json!(shard);
        });
    })
}

#[test]
fn index_paths_with_parent_components_are_refused() {
    let err = sharded_with_index_entry(
        "model.norm.weight",
        &format!("../tiny-llama-sharded/{SHARD_2}"),
    );
    assert!(matches!(err, Error::ShardOutsideFolder { .. }), "{err}");
    assert_names(&err, INDEX, "model.norm.weight");
    assert!(err.to_string().contains(".."));
}

#[test]
fn absolute_index_paths_are_refused() {
    let err = sharded_with_index_entry("model.norm.weight", "/etc/passwd");
    assert!(matches!(err, Error::ShardOutsideFolder { .. }), "{err}");
    assert_names(&err, INDEX, "model.norm.weight");
    assert!(err.to_string().contains("absolute"));
}

#[test]
fn symlinks_that_leave_the_folder_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_fixture("tiny-llama-sharded", dir.path());
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::rename(model.join(SHARD_2), outside.join(SHARD_2)).unwrap();
    std::os::unix::fs::symlink(outside.join(SHARD_2), model.join(SHARD_2)).unwrap();
    let err = Checkpoint::open(&model).unwrap_err();
    assert!(matches!(err, Error::ShardOutsideFolder { .. }), "{err}");
    assert_names(&err, INDEX, SHARD_2);
    assert!(err.to_string().contains("symlink"));

    // A symlink that stays inside the folder is fine.
    fs::remove_file(model.join(SHARD_2)).unwrap();
    fs::create_dir(model.join("blobs")).unwrap();
    fs::rename(outside.join(SHARD_2), model.join("blobs").join(SHARD_2)).unwrap();
    std::os::unix::fs::symlink(Path::new("blobs").join(SHARD_2), model.join(SHARD_2)).unwrap();
    Checkpoint::open(&model).unwrap();
}

#[test]
fn hub_cache_snapshots_may_point_into_their_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("models--tiny--llama");
    let blobs = repo.join("blobs");
    let snapshot = repo.join("snapshots").join("0123abcd");
    fs::create_dir_all(&blobs).unwrap();
    fs::create_dir_all(&snapshot).unwrap();
    let source = common::fixture("tiny-llama-sharded");
    for (i, name) in [SHARD_1, SHARD_2, INDEX, "config.json"].iter().enumerate() {
        let blob = blobs.join(format!("blob{i}"));
        fs::copy(source.join(name), &blob).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../../blobs").join(format!("blob{i}")),
            snapshot.join(name),
        )
        .unwrap();
    }
    let checkpoint = Checkpoint::open(&snapshot).unwrap();
    assert_eq!(checkpoint.files().len(), 2);
}

#[test]
fn missing_shard() {
    let err = open_corrupted("tiny-llama-sharded", |model| {
        fs::remove_file(model.join(SHARD_2)).unwrap();
    });
    assert!(matches!(err, Error::MissingShard { .. }), "{err}");
    assert_names(&err, SHARD_2, "lm_head.weight");
    assert!(err.to_string().contains(INDEX));
}

#[test]
fn truncated_shard() {
    let err = open_corrupted("tiny-llama-sharded", |model| {
        cut_last_bytes(&model.join(SHARD_2), 10);
    });
    assert!(matches!(err, Error::Truncated { .. }), "{err}");
    // The last tensor in the file is the first that no longer fits.
    assert_names(&err, SHARD_2, "model.norm.weight");
}

#[test]
fn truncated_between_stages_is_an_error_for_both_readers() {
    for strategy in [ReadStrategy::Pread, MMAP] {
        let dir = tempfile::tempdir().unwrap();
        let model = copy_fixture("tiny-llama-safetensors", dir.path());
        let checkpoint = Checkpoint::open(&model).unwrap();
        let mut reader = checkpoint.reader(strategy);
        // The file is open (and mapped) when it shrinks.
        drop(reader.read_stage("model.layers.0").unwrap());
        cut_last_bytes(&model.join("model.safetensors"), 10);
        // The final norm is the last tensor in the file: an error, not a SIGBUS.
        let err = reader.read_stage("model.norm").err().unwrap();
        assert!(
            matches!(err, Error::Truncated { .. }),
            "{strategy:?}: {err}"
        );
        assert_names(&err, "model.safetensors", "model.norm.weight");
        // Stages that still fit remain readable.
        assert!(reader.read_stage("model.layers.1").is_ok());
    }
}

#[test]
fn tensor_listed_in_the_index_but_absent_from_its_shard() {
    let err = sharded_with_index_entry("model.layers.0.extra.weight", SHARD_1);
    assert!(matches!(err, Error::TensorNotInShard { .. }), "{err}");
    assert_names(&err, SHARD_1, "model.layers.0.extra.weight");
    assert!(err.to_string().contains(INDEX));
}

#[test]
fn tensor_listed_in_a_bin_index_but_absent_from_its_shard() {
    let shard = "pytorch_model-00002-of-00002.bin";
    let err = open_corrupted("tiny-llama-bin-sharded", |model| {
        edit_json(&model.join("pytorch_model.bin.index.json"), |index| {
            index["weight_map"]["model.layers.1.extra.weight"] = json!(shard);
        });
    });
    assert!(matches!(err, Error::TensorNotInShard { .. }), "{err}");
    assert_names(&err, shard, "model.layers.1.extra.weight");
}

#[test]
fn same_tensor_in_two_shards() {
    let err = open_corrupted("tiny-llama-sharded", |model| {
        // Shard 2 now also holds a tensor that shard 1 holds.
        edit_header(&model.join(SHARD_2), |header| {
            let entry = header.remove("model.norm.weight").unwrap();
            header.insert("model.layers.0.input_layernorm.weight".into(), entry);
        });
        edit_json(&model.join(INDEX), |index| {
            index["weight_map"]
                .as_object_mut()
                .unwrap()
                .remove("model.norm.weight");
        });
    });
    assert!(matches!(err, Error::DuplicateTensor { .. }), "{err}");
    assert_names(&err, SHARD_1, "model.layers.0.input_layernorm.weight");
    assert_names(&err, SHARD_2, "model.layers.0.input_layernorm.weight");
}

#[test]
fn truncated_bin_names_the_file() {
    let err = open_corrupted("tiny-llama-bin", |model| {
        let path = model.join("pytorch_model.bin");
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    });
    assert!(matches!(err, Error::InvalidTorchArchive { .. }), "{err}");
    assert!(err.to_string().contains("pytorch_model.bin"), "{err}");
}

#[test]
fn bin_storage_shorter_than_its_tensor_names_the_tensor() {
    let err = open_corrupted("tiny-llama-bin", |model| {
        common::edit_torch_zip(&model.join("pytorch_model.bin"), |name, mut bytes| {
            if name.ends_with("data.pkl") {
                // The final norm's size (8,) is pickled as `K\x08\x85` (BININT1 8, TUPLE1)
                // after its name. Growing it to 200 elements must be refused.
                let norm = find(&bytes, b"model.norm.weight").unwrap();
                let size = find(&bytes[norm..], b"K\x08\x85").unwrap() + norm;
                bytes[size + 1] = 200;
            }
            bytes
        });
    });
    assert!(matches!(err, Error::InvalidTensor { .. }), "{err}");
    assert_names(&err, "pytorch_model.bin", "model.norm.weight");
}

#[test]
fn pickled_code_is_refused() {
    let err = open_corrupted("tiny-llama-bin", |model| {
        common::edit_torch_zip(&model.join("pytorch_model.bin"), |name, bytes| {
            if !name.ends_with("data.pkl") {
                return bytes;
            }
            // Call os.system("true") where torch would rebuild the first tensor.
            let global = b"ctorch._utils\n_rebuild_tensor_v2\n";
            let at = find(&bytes, global).unwrap();
            let mut evil = bytes[..at].to_vec();
            evil.extend_from_slice(b"cposix\nsystem\nX\x04\x00\x00\x00true\x85R.");
            evil
        });
    });
    assert!(matches!(err, Error::UnsupportedPickle { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.contains("pytorch_model.bin") && message.contains("posix.system"),
        "{message}"
    );
}

fn cut_last_bytes(path: &Path, count: u64) {
    let file = fs::File::options().write(true).open(path).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len - count).unwrap();
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
