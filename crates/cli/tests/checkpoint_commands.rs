//! `memwise inspect`, `memwise convert` and `memwise quantize` on the model crate's fixtures.

use std::path::PathBuf;
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures")
        .join(name)
}

fn memwise(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_memwise"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn inspect_prints_stages_ties_and_memory() {
    let model = fixture("tiny-llama-bin");
    let (ok, stdout, stderr) = memwise(&["inspect", model.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    for expected in [
        "LlamaForCausalLM",
        "2 blocks",
        "model.layers.1",
        "as memwise runs them",
        "f32",
        "largest stage",
        "lm_head.weight → model.embed_tokens.weight",
        "full load needs",
        "stage by stage",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}"
        );
    }
}

#[test]
fn inspect_json_is_machine_readable() {
    let model = fixture("tiny-bert");
    let (ok, stdout, stderr) = memwise(&["inspect", model.to_str().unwrap(), "--json"]);
    assert!(ok, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["architecture"], "BertModel");
    assert_eq!(summary["block_count"], 2);
    // This config lacks keys a BERT needs (heads, sizes), so memwise could not run it: its
    // tensors are grouped by module, integers included.
    assert_eq!(summary["stage_origin"], "by_module");
    assert_eq!(summary["stages"][0]["stage"], "bert.embeddings");
    assert!(
        summary["stages"][0]["bytes_by_dtype"]["i64"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(
        summary["stage_by_stage_bytes"].as_u64().unwrap()
            < summary["full_load_bytes"].as_u64().unwrap()
    );

    // A complete config: the stages the runner streams, and what none of them reads.
    let model = fixture("reference/tiny-bert");
    let (ok, stdout, stderr) = memwise(&["inspect", model.to_str().unwrap(), "--json"]);
    assert!(ok, "{stderr}");
    let summary: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(summary["stage_origin"], "traced");
    let stages: Vec<&str> = summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["embeddings", "encoder.layer.0", "encoder.layer.1"]);
    assert_eq!(
        summary["unread_tensors"],
        serde_json::json!(["pooler.dense.bias", "pooler.dense.weight"])
    );
}

#[test]
fn inspect_reports_bad_input_as_an_error() {
    let (ok, _, stderr) = memwise(&[
        "inspect",
        fixture("tiny-llama-legacy-bin").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("legacy") && stderr.contains("pytorch_model.bin"),
        "{stderr}"
    );
}

#[test]
fn convert_writes_and_then_resumes() {
    let model = fixture("tiny-llama-bin-sharded");
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "convert",
        model.to_str().unwrap(),
        "--workspace",
        dir.path().to_str().unwrap(),
    ];
    let (ok, stdout, stderr) = memwise(&args);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("5 written, 0 rebuilt, 0 kept"),
        "{stdout}"
    );
    assert!(dir.path().join("manifest.json").exists());
    let (ok, stdout, stderr) = memwise(&args);
    assert!(ok, "{stderr}");
    assert!(
        stdout.starts_with("0 written, 0 rebuilt, 5 kept"),
        "{stdout}"
    );

    let (ok, _, stderr) = memwise(&[args[0], args[1], args[2], args[3], "--dtype", "i64"]);
    assert!(!ok);
    assert!(stderr.contains("not a float dtype"), "{stderr}");
}

#[test]
fn quantize_writes_what_auto_round_writes() {
    let dir = tempfile::tempdir().unwrap();
    for (bits, flags, expected) in [
        (
            "4",
            ["--group-size", "32", "--asym"],
            "llama-bf16.w4g32-asym",
        ),
        (
            "4",
            ["--group-size", "128", "--sym"],
            "llama-bf16.w4g128-sym",
        ),
        (
            "3",
            ["--group-size", "32", "--asym"],
            "llama-bf16.w3g32-asym",
        ),
    ] {
        let out = dir.path().join(expected);
        let model = fixture("quant/llama-bf16");
        let mut args = vec!["quantize", model.to_str().unwrap(), "--bits", bits];
        args.extend(flags);
        args.extend(["--out", out.to_str().unwrap()]);
        let (ok, stdout, stderr) = memwise(&args);
        assert!(ok, "{stderr}");
        assert!(stdout.contains("14 linear weights quantized"), "{stdout}");
        assert!(stdout.contains("planned peak "), "{stdout}");
        assert!(stdout.contains("(VmHWM)"), "{stdout}");
        // The same tensors as auto-round wrote (their bytes are compared in the model
        // crate's tests/quantize.rs).
        let tensors = |folder: PathBuf| {
            let checkpoint = memwise_model::Checkpoint::open(folder).unwrap();
            let mut list: Vec<_> = checkpoint
                .index()
                .tensors()
                .iter()
                .map(|t| (t.name.clone(), t.dtype, t.shape.clone(), t.byte_len()))
                .collect();
            list.sort();
            list
        };
        assert_eq!(
            tensors(out.clone()),
            tensors(fixture(&format!("quant/{expected}"))),
            "{expected}"
        );
        for file in ["config.json", "quantization_config.json"] {
            let read = |p: PathBuf| -> serde_json::Value {
                serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
            };
            assert_eq!(
                read(out.join(file)),
                read(fixture(&format!("quant/{expected}")).join(file)),
                "{file}"
            );
        }
    }
}

#[test]
fn bad_options_are_refused_before_the_model_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (flag, value, needle) in [
        ("--bits", "5", "bits 5"),
        ("--group-size", "0", "group size 0"),
        ("--format", "gguf", "\"gguf\""),
    ] {
        // The model folder does not exist: the option is what must be reported.
        let (ok, _, stderr) = memwise(&[
            "quantize",
            "/nonexistent/model",
            flag,
            value,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(!ok);
        assert!(stderr.contains(needle), "{stderr}");
        assert!(!stderr.contains("nonexistent"), "{stderr}");
    }
    assert!(!out.exists());
}

#[test]
fn quantize_takes_its_defaults_from_the_configuration_and_refuses_what_it_cannot_do() {
    let model = fixture("quant/llama-bf16");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("memwise.toml");
    let with_config = |toml: &str, args: &[&str]| {
        std::fs::write(&config, toml).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_memwise"))
            .arg("quantize")
            .arg(&model)
            .args(args)
            .env("MEMWISE_CONFIG", &config)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), said)
    };
    // Defaults from the file, the folder from export.export_path.
    let out = dir.path().join("w8");
    let toml = format!(
        "[quantization]\nbits = 8\nweight_dtype = \"int8\"\ngroup_size = 32\nsymmetric = false\n\
         [export]\nexport_path = {:?}\n",
        out.display().to_string()
    );
    let (ok, said) = with_config(&toml, &[]);
    assert!(ok, "{said}");
    assert!(said.contains("8 bits, group size 32, asymmetric"), "{said}");
    assert!(out.join("quantization_config.json").is_file());
    // A flag wins over the file.
    let (ok, said) = with_config(
        &toml,
        &[
            "--bits",
            "4",
            "--out",
            dir.path().join("w4").to_str().unwrap(),
        ],
    );
    assert!(ok && said.contains("4 bits, group size 32"), "{said}");

    for (toml, key) in [
        ("[quantization]\nact_bits = 8\n", "quantization.act_bits"),
        (
            "[export]\nexport_format = \"awq\"\n",
            "export.export_format",
        ),
        ("[export]\ninterleave = true\n", "export.interleave"),
        (
            "[quantization]\nweight_dtype = \"fp8\"\n",
            "quantization.weight_dtype",
        ),
    ] {
        let target = dir.path().join("refused");
        let (ok, said) = with_config(toml, &["--out", target.to_str().unwrap()]);
        assert!(!ok && said.contains(key), "{key}: {said}");
        assert!(!target.exists(), "{key}: nothing may be written");
    }
}
