//! Round-to-nearest quantization against auto-round, bit for bit.
//!
//! `tests/fixtures/quant/make_fixtures.py` quantized two tiny Llama checkpoints (tied
//! embeddings in f32; untied in bf16) with auto-round's model-free round-to-nearest into
//! `<input>.<scheme>/` folders; every packed tensor memwise makes from the same input
//! weight must equal auto-round's byte for byte.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memwise_model::quant::{
    quantize_checkpoint, quantize_rtn, Error, GroupSize, PackedWeight, PackingFormat, QuantScheme,
    QuantizeEvent, QuantizeOptions, Start,
};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quant")
}

/// The quantized folders, each with the input folder it was made from.
fn quantized_folders() -> Vec<(PathBuf, PathBuf)> {
    let mut found: Vec<(PathBuf, PathBuf)> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_owned();
            let (input, _scheme) = name.split_once('.')?;
            Some((fixtures().join(input), path))
        })
        .filter(|(_, path)| path.is_dir())
        .collect();
    found.sort();
    found
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn to_f32(name: &str, view: &safetensors::tensor::TensorView<'_>) -> Vec<f32> {
    let data = view.data();
    match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => panic!("{name}: unexpected dtype {other:?}"),
    }
}

fn i32s(view: &safetensors::tensor::TensorView<'_>) -> Vec<i32> {
    assert_eq!(view.dtype(), Dtype::I32);
    view.data()
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn f16s(view: &safetensors::tensor::TensorView<'_>) -> Vec<f16> {
    assert_eq!(view.dtype(), Dtype::F16);
    view.data()
        .chunks_exact(2)
        .map(|b| f16::from_le_bytes([b[0], b[1]]))
        .collect()
}

fn scheme_of(config: &Value) -> QuantScheme {
    let bits = config["bits"].as_u64().unwrap() as u8;
    let group = GroupSize::from_auto_round(config["group_size"].as_i64().unwrap()).unwrap();
    QuantScheme::new(bits, group, config["sym"].as_bool().unwrap()).unwrap()
}

/// A packed layer checked: its input width and the dtype its weight was stored in.
struct Checked {
    in_features: usize,
    dtype: Dtype,
}

/// Quantizes every weight `output` (auto-round's) holds packed from its stored form in
/// `input` and asserts that ours packs to the same bytes and that theirs reads back as ours.
fn check_packed_layers(input: &Path, output: &Path) -> Vec<Checked> {
    let config = read_json(&output.join("quantization_config.json"));
    let scheme = scheme_of(&config);
    assert_eq!(
        config["packing_format"].as_str().unwrap(),
        scheme.packing_format().name(),
        "{}",
        output.display()
    );
    let in_bytes = std::fs::read(input.join("model.safetensors")).unwrap();
    let out_bytes = std::fs::read(output.join("model.safetensors")).unwrap();
    let source = SafeTensors::deserialize(&in_bytes).unwrap();
    let quantized = SafeTensors::deserialize(&out_bytes).unwrap();
    let mut checked = Vec::new();
    for name in quantized.names() {
        let Some(layer) = name.strip_suffix(".qweight") else {
            continue;
        };
        let weight_name = format!("{layer}.weight");
        let weight = source.tensor(&weight_name).unwrap();
        let &[out_features, in_features] = weight.shape() else {
            panic!("{weight_name} is not 2-D")
        };
        let values = to_f32(&weight_name, &weight);
        let ours = quantize_rtn(&values, out_features, in_features, &scheme)
            .unwrap()
            .pack();

        let what = format!("{} {layer}", output.display());
        let qweight = quantized.tensor(name).unwrap();
        let qzeros = quantized.tensor(&format!("{layer}.qzeros")).unwrap();
        let scales = quantized.tensor(&format!("{layer}.scales")).unwrap();
        assert_eq!(
            qweight.shape(),
            ours.qweight_shape(),
            "{what} qweight shape"
        );
        assert_eq!(qzeros.shape(), ours.qzeros_shape(), "{what} qzeros shape");
        assert_eq!(scales.shape(), ours.scales_shape(), "{what} scales shape");
        let theirs_scales = f16s(&scales);
        let mismatched_scales = ours
            .scales()
            .iter()
            .zip(&theirs_scales)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(mismatched_scales, 0, "{what}: scales differ");
        assert_eq!(ours.qzeros(), i32s(&qzeros), "{what}: qzeros differ");
        let theirs_qweight = i32s(&qweight);
        let mismatched_words = ours
            .qweight()
            .iter()
            .zip(&theirs_qweight)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(mismatched_words, 0, "{what}: qweight words differ");

        // Their packed weight reads back as ours does.
        let theirs = PackedWeight::new(
            scheme,
            theirs_qweight,
            i32s(&qzeros),
            theirs_scales,
            [scales.shape()[0], scales.shape()[1]],
        )
        .unwrap();
        assert_eq!(
            theirs.dequantize(in_features).unwrap(),
            ours.dequantize(in_features).unwrap()
        );
        checked.push(Checked {
            in_features,
            dtype: weight.dtype(),
        });
    }
    checked
}

#[test]
fn every_packed_tensor_equals_auto_round_bit_for_bit() {
    let folders = quantized_folders();
    let mut covered = BTreeMap::<&str, usize>::new();
    let mut layers_checked = 0;
    for (input, output) in &folders {
        let scheme = scheme_of(&read_json(&output.join("quantization_config.json")));
        for layer in check_packed_layers(input, output) {
            layers_checked += 1;
            *covered
                .entry(if scheme.sym() { "sym" } else { "asym" })
                .or_default() += 1;
            *covered
                .entry(if layer.dtype == Dtype::BF16 {
                    "bf16"
                } else {
                    "f32"
                })
                .or_default() += 1;
            match scheme.group_size() {
                GroupSize::Size(g) => {
                    if layer.in_features % g.get() != 0 {
                        *covered.entry("padded").or_default() += 1;
                    }
                    *covered
                        .entry(if g.get() == 32 { "g32" } else { "g128" })
                        .or_default() += 1;
                }
                GroupSize::PerChannel => {
                    *covered
                        .entry(if scheme.sym() { "g-1 sym" } else { "g-1 asym" })
                        .or_default() += 1;
                }
            }
            if scheme.bits() == 3 {
                let key = match (scheme.sym(), layer.dtype) {
                    (true, _) => "3-bit sym",
                    (false, Dtype::BF16) => "3-bit asym bf16",
                    (false, _) => "3-bit asym f32",
                };
                *covered.entry(key).or_default() += 1;
                if layer.in_features % 32 != 0 {
                    *covered.entry("3-bit padded").or_default() += 1;
                }
            }
        }
    }
    // The fixtures hold what the issue asks for; a missing folder fails here, not silently.
    assert!(folders.len() >= 15, "{folders:?}");
    for needed in [
        "sym",
        "asym",
        "bf16",
        "f32",
        "padded",
        "g32",
        "g128",
        "g-1 sym",
        "g-1 asym",
        "3-bit sym",
        "3-bit asym f32",
        "3-bit asym bf16",
        "3-bit padded",
    ] {
        assert!(
            covered.get(needed).copied().unwrap_or(0) > 0,
            "no {needed} layer: {covered:?}"
        );
    }
    assert_eq!(layers_checked, folders.len() * 14);
}

#[test]
fn auto_round_quantizes_the_decoder_linears_and_keeps_the_rest() {
    for (input, output) in quantized_folders() {
        let in_bytes = std::fs::read(input.join("model.safetensors")).unwrap();
        let out_bytes = std::fs::read(output.join("model.safetensors")).unwrap();
        let source = SafeTensors::deserialize(&in_bytes).unwrap();
        let quantized = SafeTensors::deserialize(&out_bytes).unwrap();
        for (name, tensor) in source.tensors() {
            let linear = name.starts_with("model.layers.") && tensor.shape().len() == 2;
            match quantized.tensor(&name) {
                Ok(kept) => {
                    assert!(!linear, "{name} kept in {}", output.display());
                    assert_eq!(kept.data(), tensor.data(), "{name} changed");
                    assert_eq!(kept.dtype(), tensor.dtype(), "{name} dtype changed");
                }
                Err(_) => {
                    assert!(linear, "{name} dropped from {}", output.display());
                    let layer = name.strip_suffix(".weight").unwrap();
                    assert!(quantized.tensor(&format!("{layer}.qweight")).is_ok());
                }
            }
        }
    }
}

#[test]
fn bad_schemes_are_refused_naming_the_value() {
    let err = QuantScheme::new(5, GroupSize::PerChannel, true).unwrap_err();
    assert!(err.to_string().contains("bits 5"), "{err}");
    let err = QuantScheme::new(16, GroupSize::PerChannel, true).unwrap_err();
    assert!(err.to_string().contains("bits 16"), "{err}");
    let err = GroupSize::from_auto_round(0).unwrap_err();
    assert!(err.to_string().contains("group size 0"), "{err}");
    let err = GroupSize::from_auto_round(-2).unwrap_err();
    assert!(err.to_string().contains("group size -2"), "{err}");
    let err = PackingFormat::parse("auto_round:auto_awq").unwrap_err();
    assert!(err.to_string().contains("auto_round:auto_awq"), "{err}");
    assert_eq!(
        PackingFormat::parse("auto_round:auto_gptq").unwrap(),
        PackingFormat::AutoGptq
    );
}

#[test]
fn packing_round_trips_for_every_scheme() {
    let (out_features, in_features) = (20, 72);
    let weight: Vec<f32> = (0..out_features * in_features)
        .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    for bits in QuantScheme::SUPPORTED_BITS {
        for group in [-1, 16, 64] {
            for sym in [true, false] {
                let group = GroupSize::from_auto_round(group).unwrap();
                let scheme = QuantScheme::new(bits, group, sym).unwrap();
                let quantized = match quantize_rtn(&weight, out_features, in_features, &scheme) {
                    Ok(q) => q,
                    // 72 inputs per channel do not fill 16 two-bit codes per word, nor 72
                    // or 80 (groups of 16) whole units of 32 three-bit codes.
                    Err(e) => {
                        let expected = match (bits, group) {
                            (2, GroupSize::PerChannel) => Some(72),
                            (3, GroupSize::PerChannel) => Some(72),
                            (3, GroupSize::Size(g)) if g.get() == 16 => Some(80),
                            _ => None,
                        };
                        assert!(
                            matches!(e, Error::Unpackable { padded_in, .. } if Some(padded_in) == expected),
                            "{scheme:?}: {e}"
                        );
                        continue;
                    }
                };
                let packed = quantized.pack();
                assert_eq!(packed.unpack(in_features).unwrap(), quantized, "{scheme:?}");
                let restored = packed.dequantize(in_features).unwrap();
                let steps = if sym {
                    1u32 << (bits - 1)
                } else {
                    (1u32 << bits) - 1
                };
                let tolerance = 2.0 / steps as f32;
                for (w, r) in weight.iter().zip(&restored) {
                    assert!((w - r).abs() <= tolerance, "{scheme:?}: {w} vs {r}");
                }
            }
        }
    }
}

/// 3 bits pack 32 codes into 3 int32 words as one bit stream, code `i` at bit `3 i`: the
/// codes at 10 and 21 cross from one word into the next. The expected words are what
/// auto-round's own packer (`QuantLinear.pack_3bits`, 0.16.1) makes of the same codes.
#[test]
fn three_bit_codes_cross_word_boundaries_as_auto_round_packs_them() {
    // Output 0: codes i % 8; output 1: 7 at inputs 10 and 21, 0 elsewhere. Each row spans
    // 0..=7, so its asymmetric scale is 1 and its zero point 0: the codes are the values.
    let mut weight: Vec<f32> = (0..32).map(|i| (i % 8) as f32).collect();
    weight.resize(2 * 32, 0.0);
    weight[32 + 10] = 7.0;
    weight[32 + 21] = 7.0;
    let group = GroupSize::from_auto_round(32).unwrap();
    let scheme = QuantScheme::new(3, group, false).unwrap();
    let quantized = quantize_rtn(&weight, 2, 32, &scheme).unwrap();
    let packed = quantized.pack();
    assert_eq!(packed.qweight_shape(), [3, 2]);
    let words: Vec<u32> = packed.qweight().iter().map(|&w| w as u32).collect();
    // qweight is [3, 2]: word k of output o at k * 2 + o.
    assert_eq!(
        [words[0], words[2], words[4]],
        [0x88fa_c688, 0xc688_fac6, 0xfac6_88fa]
    );
    assert_eq!(
        [words[1], words[3], words[5]],
        [0xc000_0000, 0x8000_0001, 0x3]
    );
    // Two outputs, padded to a unit of 32 zero points in 3 words, all zero here.
    assert_eq!(packed.qzeros_shape(), [1, 3]);
    assert_eq!(packed.qzeros(), [0, 0, 0]);
    assert_eq!(packed.unpack(32).unwrap(), quantized);
    assert_eq!(packed.dequantize(32).unwrap(), weight);

    // Symmetric: zero point 4 stored as 3 in every one of the 32 slots, padding included.
    let scheme = QuantScheme::new(3, group, true).unwrap();
    let packed = quantize_rtn(&weight, 2, 32, &scheme).unwrap().pack();
    let threes = (0..32).fold(0u128, |acc, j| acc | 3u128 << (3 * j));
    let expected: Vec<i32> = (0..3).map(|k| (threes >> (32 * k)) as u32 as i32).collect();
    assert_eq!(packed.qzeros(), expected.as_slice());
}

fn options_of(config: &Value) -> QuantizeOptions {
    QuantizeOptions::from_values(
        config["bits"].as_u64().unwrap() as u8,
        config["group_size"].as_i64().unwrap(),
        config["sym"].as_bool().unwrap(),
        "auto_round",
    )
    .unwrap()
}

/// Every tensor of a model folder (single file or shards): name → (dtype, shape, bytes).
fn all_tensors(folder: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    let mut tensors = BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        for (name, view) in SafeTensors::deserialize(&bytes).unwrap().tensors() {
            let entry = (view.dtype(), view.shape().to_vec(), view.data().to_vec());
            assert!(
                tensors.insert(name.clone(), entry).is_none(),
                "{name} twice"
            );
        }
    }
    tensors
}

#[test]
fn a_quantized_checkpoint_equals_auto_round_tensor_for_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for (input, expected) in quantized_folders() {
        let config = read_json(&expected.join("quantization_config.json"));
        let out = dir.path().join(expected.file_name().unwrap());
        let report = quantize_checkpoint(&input, &out, &options_of(&config)).unwrap();
        assert_eq!(
            (report.quantized, report.shards),
            (14, 1),
            "{}",
            out.display()
        );

        let ours = all_tensors(&out);
        let theirs = all_tensors(&expected);
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{}",
            expected.display()
        );
        for (name, tensor) in &theirs {
            assert!(
                ours[name] == *tensor,
                "{} {name} differs",
                expected.display()
            );
        }
        for file in ["config.json", "quantization_config.json"] {
            assert_eq!(
                read_json(&out.join(file)),
                read_json(&expected.join(file)),
                "{} {file}",
                expected.display()
            );
        }
    }
}

#[test]
fn shards_an_index_and_copied_files_make_a_folder_that_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source");
    let input = fixtures().join("llama-bf16");
    std::fs::create_dir(&source).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(input.join(file), source.join(file)).unwrap();
    }
    std::fs::write(source.join("tokenizer.json"), b"{\"version\":\"1.0\"}").unwrap();
    std::fs::write(source.join("generation_config.json"), b"{}").unwrap();

    let expected = fixtures().join("llama-bf16.w4g32-asym");
    let options = options_of(&read_json(&expected.join("quantization_config.json")))
        .max_shard_bytes(std::num::NonZeroU64::new(20_000).unwrap());
    let out = dir.path().join("out");
    let report = quantize_checkpoint(&source, &out, &options).unwrap();
    assert!(report.shards > 2, "{report:?}");
    assert_eq!(all_tensors(&out), all_tensors(&expected));
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"{\"version\":\"1.0\"}"
    );
    assert!(out.join("generation_config.json").is_file());
    // The index is one the checkpoint reader accepts, and it lists every tensor.
    let checkpoint = memwise_model::Checkpoint::open(&out).unwrap();
    assert_eq!(checkpoint.files().len(), report.shards);
    let index = read_json(&out.join("model.safetensors.index.json"));
    assert_eq!(
        index["weight_map"].as_object().unwrap().len(),
        all_tensors(&expected).len()
    );
    // Nothing but the finished folder is left beside it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // A second run refuses to overwrite it.
    let err = quantize_checkpoint(&source, &out, &options).unwrap_err();
    assert!(matches!(err, Error::OutputExists(_)), "{err}");
    assert!(err.to_string().contains("out"), "{err}");
}

#[test]
fn bad_options_are_refused_naming_the_value() {
    for (bits, group, format, needle) in [
        (5, 128, "auto_round", "bits 5"),
        (4, 0, "auto_round", "group size 0"),
        (4, 128, "gguf:q4_k_m", "gguf:q4_k_m"),
    ] {
        let err = QuantizeOptions::from_values(bits, group, true, format).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(needle), "{message}");
        assert!(!message.contains('\n'), "{message}");
    }
}

/// `folder` (auto-round's own output) with every packed weight dequantized to an f32
/// `weight` and every other tensor as f32, without `quantization_config`: what the packed
/// checkpoint means, written as a plain one.
fn dequantized_copy(folder: &Path, into: &Path) {
    let bytes = std::fs::read(folder.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut config = read_json(&folder.join("config.json"));
    let scheme = scheme_of(&config["quantization_config"]);
    config
        .as_object_mut()
        .unwrap()
        .remove("quantization_config");
    let mut out = std::collections::HashMap::new();
    let device = candle_core::Device::Cpu;
    for (name, view) in st.tensors() {
        if let Some(module) = name.strip_suffix(".qweight") {
            let scales = st.tensor(&format!("{module}.scales")).unwrap();
            let [groups, outs] = [scales.shape()[0], scales.shape()[1]];
            let qzeros = st.tensor(&format!("{module}.qzeros")).unwrap();
            let packed = PackedWeight::new(
                scheme,
                i32s(&view),
                i32s(&qzeros),
                f16s(&scales),
                [groups, outs],
            )
            .unwrap();
            // The block's weight is (out, in); its in is the config's width of this input.
            let in_features = in_features_of(&config, module).min(packed.padded_in());
            let values = packed.dequantize(in_features).unwrap();
            let weight = candle_core::Tensor::from_vec(values, (outs, in_features), &device);
            out.insert(format!("{module}.weight"), weight.unwrap());
        } else if !name.ends_with(".qzeros") && !name.ends_with(".scales") {
            let values = to_f32(&name, &view);
            let tensor = candle_core::Tensor::from_vec(values, view.shape(), &device).unwrap();
            out.insert(name, tensor);
        }
    }
    std::fs::create_dir_all(into).unwrap();
    candle_core::safetensors::save(&out, into.join("model.safetensors")).unwrap();
    std::fs::write(into.join("config.json"), config.to_string()).unwrap();
}

/// The input width of a Llama linear: the MLP's inner width for `down_proj`, the hidden
/// width (or heads × head width for `o_proj`) otherwise.
fn in_features_of(config: &Value, module: &str) -> usize {
    let get = |key: &str| config[key].as_u64().unwrap() as usize;
    if module.ends_with("down_proj") {
        get("intermediate_size")
    } else if module.ends_with("o_proj") {
        get("num_attention_heads")
            * config["head_dim"]
                .as_u64()
                .map_or(get("hidden_size") / get("num_attention_heads"), |d| {
                    d as usize
                })
    } else {
        get("hidden_size")
    }
}

#[test]
fn auto_round_checkpoints_run_streamed_and_full_as_their_dequantized_weights() {
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 3, 7, 2, 11, 4]], &candle_core::Device::Cpu)
        .unwrap();
    let scratch = tempfile::tempdir().unwrap();
    for (_, folder) in quantized_folders() {
        let name = folder.file_name().unwrap().to_str().unwrap().to_owned();
        let plain = scratch.path().join(&name);
        dequantized_copy(&folder, &plain);
        let expected = memwise_model::ModelConverter::new(&plain)
            .load_model_with_hooks(true)
            .unwrap()
            .forward(&ids)
            .unwrap();
        let mut streamed = memwise_model::ModelConverter::new(&folder)
            .load_model_with_hooks(true)
            .unwrap();
        let logits = streamed.forward(&ids).unwrap();
        let same = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
            let (a, b): (Vec<f32>, Vec<f32>) = (
                a.flatten_all().unwrap().to_vec1().unwrap(),
                b.flatten_all().unwrap().to_vec1().unwrap(),
            );
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        assert!(
            same(&logits, &expected),
            "{name}: streamed from the packed weights"
        );
        streamed.load_all().unwrap();
        assert!(
            same(&streamed.forward(&ids).unwrap(), &expected),
            "{name}: full load"
        );
    }
}

/// The numbers of a JSON array.
fn numbers(array: &Value) -> impl Iterator<Item = f64> + '_ {
    array
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
}

/// `tests/fixtures/quant/reference_logits.json`: for every quantized fixture, the logits
/// transformers computes in f32 from its weights as auto-round's kernel dequantizes them
/// (unpacked in Python by `make_fixtures.py`, independently of memwise).
#[test]
fn quantized_fixtures_run_streamed_and_full_within_1e_4_of_transformers() {
    let reference = read_json(&fixtures().join("reference_logits.json"));
    let ids: Vec<u32> = numbers(&reference["input_ids"]).map(|v| v as u32).collect();
    let ids = candle_core::Tensor::new(ids.as_slice(), &candle_core::Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let folders = quantized_folders();
    let entries = reference["folders"].as_object().unwrap();
    assert_eq!(
        entries.len(),
        folders.len(),
        "a reference for every fixture"
    );
    for (_, folder) in folders {
        let name = folder.file_name().unwrap().to_str().unwrap().to_owned();
        let entry = &entries[&name];
        let expected: Vec<f32> = numbers(&entry["logits"]).map(|v| v as f32).collect();
        let check = |logits: candle_core::Tensor, how: &str| {
            let shape: Vec<usize> = numbers(&entry["shape"]).map(|v| v as usize).collect();
            assert_eq!(logits.dims(), shape.as_slice(), "{name} {how}");
            let got: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
            let worst = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst <= 1e-4, "{name} {how}: off by {worst}");
        };
        // Copied (pread) and mapped: the packed tensors are read either way.
        // SAFETY: the committed fixtures do not change while the test maps them.
        let mapped = unsafe { memwise_model::ReadStrategy::mmap_release() };
        for (strategy, read) in [
            (memwise_model::ReadStrategy::Pread, "copied"),
            (mapped, "mapped"),
        ] {
            let mut model = memwise_model::ModelConverter::new(&folder)
                .read_strategy(strategy)
                .load_model_with_hooks(true)
                .unwrap();
            check(model.forward(&ids).unwrap(), &format!("{read}, streamed"));
            model.load_all().unwrap();
            check(model.forward(&ids).unwrap(), &format!("{read}, full"));
        }
    }
}

#[test]
fn a_quantization_config_memwise_cannot_read_is_refused_naming_the_key() {
    let scratch = tempfile::tempdir().unwrap();
    let folder = fixtures().join("llama-bf16.w4g32-sym");
    let copy = scratch.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    std::fs::copy(
        folder.join("model.safetensors"),
        copy.join("model.safetensors"),
    )
    .unwrap();
    let mut config = read_json(&folder.join("config.json"));
    config["quantization_config"]["quant_method"] = "gptq".into();
    std::fs::write(copy.join("config.json"), config.to_string()).unwrap();
    let err = memwise_model::ModelConverter::new(&copy)
        .load_model_with_hooks(true)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("quantization_config.quant_method"), "{err}");
}

const CHILD_ENV: &str = "MEMWISE_TEST_QUANTIZE_CHILD";

/// The options the SIGKILL tests quantize with: 4 bits, groups of 32, symmetric, in shards
/// of 20 kB (so that a shard spans stages); asymmetric when `asym`.
fn kill_test_options(asym: bool) -> QuantizeOptions {
    QuantizeOptions::from_values(4, 32, !asym, "auto_round")
        .unwrap()
        .max_shard_bytes(std::num::NonZeroU64::new(20_000).unwrap())
}

/// Not a test on its own: the child process of `quantize_and_kill`. It quantizes the source
/// named in its environment into the folder named there, printing each tensor as it goes and
/// sleeping after each, slowly enough to be killed midway.
#[test]
#[ignore = "the child process of quantize_and_kill, which runs it with --ignored"]
fn quantize_child() {
    let spec = std::env::var(CHILD_ENV)
        .expect("quantize_child runs only as quantize_and_kill's child process");
    let (source, out) = spec.split_once('\n').unwrap();
    let mut stdout = std::io::stdout();
    memwise_model::quant::quantize_checkpoint_with(
        source,
        out,
        &kill_test_options(false),
        &mut |p| {
            use std::io::Write;
            if let QuantizeEvent::TensorDone(name) = &p.event {
                writeln!(stdout, "tensor {name}").unwrap();
                stdout.flush().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(30));
            }
        },
    )
    .unwrap();
}

/// Starts quantizing `source` into `out` in a child process and SIGKILLs it after `tensors`
/// tensors.
fn quantize_and_kill(source: &Path, out: &Path, tensors: usize) {
    let spec = format!("{}\n{}", source.display(), out.display());
    common::run_child_and_kill("quantize_child", (CHILD_ENV, spec), tensors);
}

/// Every file of a folder, by name, with its bytes.
fn folder_bytes(folder: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(folder)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// The folder a run builds `out` in (named as `quantize_checkpoint` names it).
fn partial_of(out: &Path) -> PathBuf {
    let name = out.file_name().unwrap().to_str().unwrap();
    out.with_file_name(format!(".{name}.memwise-partial"))
}

#[test]
fn a_run_killed_midway_resumes_and_ends_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("llama-bf16");
    let reference = dir.path().join("reference");
    let options = kill_test_options(false);
    let uninterrupted = quantize_checkpoint(&source, &reference, &options).unwrap();
    assert_eq!(uninterrupted.start, Start::Fresh);
    assert!(uninterrupted.shards > 2, "{uninterrupted:?}");
    let expected = folder_bytes(&reference);
    let total = memwise_model::Checkpoint::open(&source)
        .unwrap()
        .index()
        .tensors()
        .len();
    // Inside the first stage, inside a block, and the last stage.
    for kill_after in [1, 6, total - 1] {
        let out = dir.path().join(format!("killed-{kill_after}"));
        quantize_and_kill(&source, &out, kill_after);
        assert!(!out.exists(), "kill after {kill_after}: out was renamed");
        assert!(partial_of(&out).join("quantize-manifest.json").is_file());

        let mut reused = 0;
        let report =
            memwise_model::quant::quantize_checkpoint_with(&source, &out, &options, &mut |p| {
                if p.event == QuantizeEvent::StageReused {
                    reused += 1;
                }
            })
            .unwrap();
        let Start::Resumed { stages, note } = &report.start else {
            panic!("kill after {kill_after}: {:?}", report.start);
        };
        assert_eq!(*stages, reused, "kill after {kill_after}");
        assert_eq!(*note, None, "kill after {kill_after}");
        if kill_after > 1 {
            assert!(*stages > 0, "kill after {kill_after}: nothing kept");
        }
        assert_eq!(folder_bytes(&out), expected, "kill after {kill_after}");
        assert!(!partial_of(&out).exists());
    }
}

/// Flips the first data byte of `tensor` in whichever shard of `folder` holds it.
fn flip_first_byte_of(folder: &Path, tensor: &str) {
    for entry in std::fs::read_dir(folder).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let mut bytes = std::fs::read(&path).unwrap();
        let (header, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        if let Some(info) = metadata.info(tensor) {
            bytes[8 + header + info.data_offsets.0] ^= 1;
            std::fs::write(&path, bytes).unwrap();
            return;
        }
    }
    panic!("no shard in {} holds {tensor}", folder.display());
}

#[test]
fn a_damaged_stage_is_redone_and_other_options_start_over() {
    let dir = tempfile::tempdir().unwrap();
    let source = fixtures().join("llama-bf16");
    let total = memwise_model::Checkpoint::open(&source)
        .unwrap()
        .index()
        .tensors()
        .len();

    // A finished stage whose bytes in the shards no longer match its checksum is redone,
    // with the ones after it.
    let out = dir.path().join("damaged");
    quantize_and_kill(&source, &out, total - 1);
    let manifest = read_json(&partial_of(&out).join("quantize-manifest.json"));
    let stage = manifest["stages"][1]["stage"].as_str().unwrap().to_owned();
    let first = manifest["stages"][1]["tensors"][0]["name"]
        .as_str()
        .unwrap();
    flip_first_byte_of(&partial_of(&out), first);
    let report = quantize_checkpoint(&source, &out, &kill_test_options(false)).unwrap();
    let Start::Resumed { stages, note } = &report.start else {
        panic!("{:?}", report.start);
    };
    assert_eq!(*stages, 1);
    let note = note.as_deref().unwrap();
    assert!(
        note.contains(&format!("stage {stage}'s bytes do not match its checksum")),
        "{note}"
    );
    let reference = dir.path().join("reference-sym");
    quantize_checkpoint(&source, &reference, &kill_test_options(false)).unwrap();
    assert_eq!(folder_bytes(&out), folder_bytes(&reference));

    // Other options: the interrupted run is removed, and the run says why.
    let out = dir.path().join("other-options");
    quantize_and_kill(&source, &out, total - 1);
    let report = quantize_checkpoint(&source, &out, &kill_test_options(true)).unwrap();
    let Start::Restarted { reason } = &report.start else {
        panic!("{:?}", report.start);
    };
    assert!(reason.contains("other options"), "{reason}");
    assert!(reason.contains("asymmetric"), "{reason}");
    let reference = dir.path().join("reference-asym");
    quantize_checkpoint(&source, &reference, &kill_test_options(true)).unwrap();
    assert_eq!(folder_bytes(&out), folder_bytes(&reference));

    // A changed source: the same, naming the change.
    let copy = dir.path().join("source");
    std::fs::create_dir(&copy).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(source.join(file), copy.join(file)).unwrap();
    }
    let out = dir.path().join("changed-source");
    quantize_and_kill(&copy, &out, total - 1);
    let weights = std::fs::OpenOptions::new()
        .append(true)
        .open(copy.join("model.safetensors"))
        .unwrap();
    weights
        .set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
        .unwrap();
    drop(weights);
    let report = quantize_checkpoint(&copy, &out, &kill_test_options(false)).unwrap();
    let Start::Restarted { reason } = &report.start else {
        panic!("{:?}", report.start);
    };
    assert!(reason.contains("changed"), "{reason}");
    assert_eq!(
        folder_bytes(&out),
        folder_bytes(&dir.path().join("reference-sym"))
    );
}
