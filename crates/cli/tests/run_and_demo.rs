//! `memwise run` and `memwise demo` end to end: the binary's streamed logits match
//! transformers' on the reference fixture, its output file is written whole, bad requests
//! are refused with a clear message, and the demo's streamed run equals the full load.
//! `run --report DIR` writes a report folder with a slice per stage, and `report compare`
//! puts two folders side by side. `memwise plan` prints a plan and refuses a budget nothing
//! fits.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device};

fn memwise(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_memwise"))
        .args(args)
        .env_remove("MEMWISE_CONFIG")
        .output()
        .expect("the binary runs")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures/reference")
        .join(name)
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn run_streams_the_fixture_and_writes_logits_matching_transformers() {
    let folder = fixture("tiny-llama");
    let reference =
        candle_core::safetensors::load(folder.join("reference.safetensors"), &Device::Cpu).unwrap();
    // The CLI runs one sequence: the fixture's first row.
    let ids: Vec<String> = reference["input_ids"]
        .get(0)
        .and_then(|t| t.to_vec1::<i64>())
        .unwrap()
        .iter()
        .map(i64::to_string)
        .collect();
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("logits.safetensors");
    let output = memwise(&[
        "run",
        folder.to_str().unwrap(),
        "--input-ids",
        &ids.join(","),
        "--prefetch",
        "1",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    let report = text(&output);
    for layer in ["model.embed_tokens", "model.layers.1", "lm_head"] {
        assert!(
            report.contains(layer),
            "per-layer breakdown lacks {layer}:\n{report}"
        );
    }
    let written = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let expected = reference["logits"]
        .get(0)
        .and_then(|t| t.unsqueeze(0))
        .and_then(|t| t.to_dtype(DType::F32))
        .unwrap();
    let diff = (&written["output"] - &expected)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .unwrap();
    assert!(diff < 1e-4, "CLI logits differ from transformers by {diff}");
    let leftovers: Vec<_> = std::fs::read_dir(out_dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "a temporary file was left behind");
}

#[test]
fn run_refuses_bad_requests_clearly() {
    let folder = fixture("tiny-llama");
    let folder = folder.to_str().unwrap();
    let bad_output = memwise(&["run", folder, "--input-ids", "1", "--output", "x.txt"]);
    assert!(!bad_output.status.success());
    assert!(text(&bad_output).contains(".json or .safetensors"));

    let no_tokenizer = memwise(&["run", folder, "--prompt", "hello"]);
    assert!(!no_tokenizer.status.success());
    assert!(text(&no_tokenizer).contains("tokenizer.json"));

    let missing = memwise(&["run", "/nonexistent/model", "--input-ids", "1"]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("/nonexistent/model"),
        "{}",
        text(&missing)
    );

    // Refused before any stage is read, in one line, even where Rust developers have
    // backtraces on.
    let out_of_vocab = Command::new(env!("CARGO_BIN_EXE_memwise"))
        .args(["run", folder, "--input-ids", "1,2,999999"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_eq!(out_of_vocab.status.code(), Some(1), "an error, not a panic");
    let said = text(&out_of_vocab);
    assert!(
        said.contains("input_ids holds 999999, but the model's vocab_size is 128"),
        "{said}"
    );
    // stdout has the plan (every stage named); the error itself names none.
    let error = String::from_utf8_lossy(&out_of_vocab.stderr);
    assert!(
        !error.contains("backtrace") && !error.contains("model.layers"),
        "{said}"
    );

    let too_long = memwise(&[
        "run",
        folder,
        "--input-ids",
        "1,2",
        "--max-new-tokens",
        "100000",
    ]);
    assert!(!too_long.status.success());
    assert!(
        text(&too_long).contains("max_position_embeddings"),
        "{}",
        text(&too_long)
    );

    let nowhere = memwise(&[
        "run",
        folder,
        "--input-ids",
        "1",
        "--output",
        "/missing/dir/x.json",
    ]);
    assert!(!nowhere.status.success());
    assert!(
        text(&nowhere).contains("/missing/dir does not exist"),
        "{}",
        text(&nowhere)
    );
}

#[test]
fn demo_runs_and_streamed_equals_full_load() {
    // What users run, on a model of a few MiB: the two runs are child processes.
    let tmp = tempfile::tempdir().unwrap();
    let (model, reports) = (tmp.path().join("model"), tmp.path().join("reports"));
    let (model, reports) = (model.to_str().unwrap(), reports.to_str().unwrap());
    let small = [
        "demo",
        "--hidden",
        "256",
        "--intermediate",
        "704",
        "--heads",
        "8",
        "--kv-heads",
        "2",
        "--vocab",
        "4000",
        "--layers",
        "2",
        "--tokens",
        "8",
        "--budget",
        "64MiB",
        "--model",
        model,
        "--report",
        reports,
    ];
    let output = memwise(&small);
    assert!(output.status.success(), "{}", text(&output));
    let report = text(&output);
    assert!(report.contains("wrote a 2-layer Llama"), "{report}");
    assert!(report.contains("the logits are identical"), "{report}");
    assert!(report.contains("model.layers.1"), "{report}");
    for row in ["peak RSS (VmHWM)", "predicted by the plan", "file-backed"] {
        assert!(report.contains(row), "{row} missing from\n{report}");
    }
    for run in ["full", "streamed"] {
        let folder = Path::new(reports).join(run);
        for file in ["trace.json", "timeline.svg", "logits.safetensors"] {
            assert!(folder.join(file).is_file(), "{run}/{file}");
        }
    }
    // The second time the model is reused.
    let again = memwise(&small);
    assert!(again.status.success(), "{}", text(&again));
    assert!(text(&again).contains("reusing the 2-layer Llama"));

    // A folder of the user's own is never replaced.
    let mine = tmp.path().join("mine");
    std::fs::create_dir(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "keep me").unwrap();
    let mut other = small.to_vec();
    let at = other.iter().position(|a| *a == model).unwrap();
    other[at] = mine.to_str().unwrap();
    let refused = memwise(&other);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("notes.txt"), "{}", text(&refused));
    assert!(mine.join("notes.txt").is_file());
}

#[test]
fn encoder_run_prints_the_embedding() {
    let folder = fixture("tiny-bert");
    let output = memwise(&["run", folder.to_str().unwrap(), "--input-ids", "2,7,9,3"]);
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("L2 norm"));
}

#[test]
fn a_prompt_is_tokenized_with_the_models_tokenizer() {
    // A copy of the fixture with a tiny word-level tokenizer: "hello" = 1, "world" = 2.
    let dir = with_word_tokenizer("tiny-llama", serde_json::Value::Null);
    let folder = dir.path().join("tiny-llama");
    let folder = folder.to_str().unwrap();

    let generated = |output: &Output| {
        let report = text(output);
        assert!(output.status.success(), "{report}");
        report
            .lines()
            .find_map(|l| l.strip_prefix("generated token ids: ").map(str::to_owned))
            .unwrap_or_else(|| panic!("no generated ids in:\n{report}"))
    };
    let from_text = memwise(&[
        "run",
        folder,
        "--prompt",
        "hello world",
        "--max-new-tokens",
        "4",
    ]);
    let from_ids = memwise(&["run", folder, "--input-ids", "1,2", "--max-new-tokens", "4"]);
    assert_eq!(generated(&from_text), generated(&from_ids));
    assert!(
        text(&from_text).contains("generated text: "),
        "{}",
        text(&from_text)
    );
}

/// A copy of reference fixture `name` with a word-level tokenizer ("hello" = 1, "world" = 2,
/// `wN` = N) whose padding is `padding` (tokenizers' JSON, or null).
fn with_word_tokenizer(name: &str, padding: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join(name);
    std::fs::create_dir(&folder).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(name).join(file), folder.join(file)).unwrap();
    }
    let vocab: serde_json::Map<String, serde_json::Value> = (0..64u32)
        .map(|id| {
            let word = match id {
                0 => "[PAD]".to_owned(),
                1 => "hello".to_owned(),
                2 => "world".to_owned(),
                _ => format!("w{id}"),
            };
            (word, id.into())
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": padding, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[PAD]"}
    });
    std::fs::write(folder.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    dir
}

/// The tensor a `--output x.json` run wrote, as rows.
fn output_rows(path: &Path) -> Vec<Vec<f32>> {
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let shape: Vec<usize> = serde_json::from_value(json["shape"].clone()).unwrap();
    let data: Vec<f32> = serde_json::from_value(json["data"].clone()).unwrap();
    let width = data.len() / shape[0];
    data.chunks(width).map(<[f32]>::to_vec).collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn prompts_padded_by_the_tokenizer_embed_as_they_would_alone() {
    // As sentence-transformers' MiniLM ships it: every input padded to a fixed length.
    let padding = serde_json::json!({
        "strategy": {"Fixed": 12}, "direction": "Right", "pad_to_multiple_of": null,
        "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"
    });
    let dir = with_word_tokenizer("tiny-bert", padding);
    let folder = dir.path().join("tiny-bert");
    let out = |name: &str| dir.path().join(name);
    let run = |args: &[&str]| {
        let mut all = vec!["run", folder.to_str().unwrap()];
        all.extend_from_slice(args);
        let output = memwise(&all);
        assert!(output.status.success(), "{}", text(&output));
        output
    };
    let a = out("a.json");
    let b = out("b.json");
    let batch = out("batch.json");
    run(&["--prompt", "hello world", "--output", a.to_str().unwrap()]);
    run(&["--input-ids", "5,6,7,1", "--output", b.to_str().unwrap()]);
    let three = run(&[
        "--prompt",
        "hello world",
        "--prompt",
        "w5 w6 w7 hello",
        "--prompt",
        "w9",
        "--output",
        batch.to_str().unwrap(),
    ]);
    assert!(
        text(&three).contains("[prompt 3] embedding"),
        "{}",
        text(&three)
    );
    let d = out("d.json");
    run(&["--input-ids", "9", "--output", d.to_str().unwrap()]);
    run(&[
        "--input-ids",
        "1,2",
        "--output",
        out("c.json").to_str().unwrap(),
    ]);
    let (alone_a, alone_b) = (output_rows(&out("c.json")), output_rows(&b));
    // The padded prompt embeds as its two tokens alone: padding is neither attended to nor
    // pooled.
    assert!(max_diff(&output_rows(&a)[0], &alone_a[0]) < 1e-5);
    let rows = output_rows(&batch);
    assert_eq!(rows.len(), 3);
    assert!(max_diff(&rows[0], &alone_a[0]) < 1e-5);
    assert!(max_diff(&rows[1], &alone_b[0]) < 1e-5);
    assert!(max_diff(&rows[2], &output_rows(&d)[0]) < 1e-5);
}

#[test]
fn a_batch_of_prompts_of_different_lengths_runs_on_a_decoder() {
    let dir = with_word_tokenizer("tiny-llama", serde_json::Value::Null);
    let folder = dir.path().join("tiny-llama");
    let folder = folder.to_str().unwrap();
    let next = |output: &Output| -> Vec<String> {
        assert!(output.status.success(), "{}", text(output));
        text(output)
            .lines()
            .filter(|l| l.contains("next token after the input: "))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
            .collect()
    };
    let batch = memwise(&[
        "run",
        folder,
        "--prompt",
        "hello world w9 w4",
        "--prompt",
        "w7",
        "--prompt",
        "w3 w8",
    ]);
    let alone = |ids: &str| next(&memwise(&["run", folder, "--input-ids", ids]));
    assert_eq!(
        next(&batch),
        [alone("1,2,9,4"), alone("7"), alone("3,8")].concat()
    );
}

fn run_with_report(dir: &Path, extra: &[&str]) {
    let model = fixture("tiny-llama");
    let mut args = vec![
        "run",
        model.to_str().unwrap(),
        "--input-ids",
        "1,2,3",
        "--report",
        dir.to_str().unwrap(),
        "--sample-interval",
        "1",
        "--budget",
        "64MiB",
    ];
    args.extend_from_slice(extra);
    let output = memwise(&args);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains(&format!("report written to {}", dir.display())),
        "{}",
        text(&output)
    );
}

#[test]
fn run_writes_a_report_and_compare_shows_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let (streamed, full) = (tmp.path().join("streamed"), tmp.path().join("full"));
    run_with_report(&streamed, &[]);

    let trace = std::fs::read_to_string(streamed.join("trace.json")).unwrap();
    let trace: serde_json::Value = serde_json::from_str(&trace).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    for stage in [
        "model.embed_tokens",
        "model.layers.0",
        "model.layers.1",
        "lm_head",
    ] {
        assert!(
            events.iter().any(|e| e["ph"] == "X" && e["name"] == stage),
            "a slice for {stage}"
        );
    }
    for counter in ["heap", "RSS", "budget"] {
        assert!(events
            .iter()
            .any(|e| e["ph"] == "C" && e["name"] == counter));
    }
    let svg = std::fs::read_to_string(streamed.join("timeline.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("budget"));
    assert!(streamed.join("stats.json").is_file());

    let same = memwise(&[
        "report",
        "compare",
        streamed.to_str().unwrap(),
        streamed.to_str().unwrap(),
    ]);
    assert!(same.status.success(), "{}", text(&same));
    assert!(text(&same).contains("no differences"), "{}", text(&same));

    run_with_report(&full, &["--full"]);
    let drawing = tmp.path().join("compare.svg");
    let changed = memwise(&[
        "report",
        "compare",
        streamed.to_str().unwrap(),
        full.to_str().unwrap(),
        "--svg",
        drawing.to_str().unwrap(),
    ]);
    assert!(changed.status.success(), "{}", text(&changed));
    let svg = std::fs::read_to_string(&drawing).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("model.layers.0 time"),
        "{svg}"
    );
    let table = text(&changed);
    let load_all = table
        .lines()
        .find(|l| l.starts_with("load_all runs"))
        .unwrap_or_else(|| panic!("the full load's scope is listed:\n{table}"));
    assert!(load_all.contains("only one"), "{table}");
    assert!(table.contains("figures differ"), "{table}");

    let missing = memwise(&[
        "report",
        "compare",
        "/nonexistent/a",
        streamed.to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(
        text(&missing).contains("/nonexistent/a/stats.json"),
        "{}",
        text(&missing)
    );
}

#[test]
fn chat_prompts_use_the_models_template_and_draws_repeat_with_their_seed() {
    let dir = with_word_tokenizer("tiny-llama", serde_json::Value::Null);
    let folder = dir.path().join("tiny-llama");
    let template = "{% for m in messages %}w5 {{ m.content.strip() }} w6{% endfor %}\
                    {% if add_generation_prompt %} w7{% endif %}";
    let config = serde_json::json!({"chat_template": template, "eos_token": "w2"});
    std::fs::write(folder.join("tokenizer_config.json"), config.to_string()).unwrap();
    let folder = folder.to_str().unwrap();
    let ids = |output: &Output| -> String {
        assert!(output.status.success(), "{}", text(output));
        text(output)
            .lines()
            .find_map(|l| l.strip_prefix("generated token ids: ").map(str::to_owned))
            .unwrap_or_else(|| panic!("no ids in {}", text(output)))
    };
    let chat = memwise(&[
        "run",
        folder,
        "--chat",
        "--prompt",
        " hello ",
        "--max-new-tokens",
        "5",
    ]);
    let rendered = memwise(&[
        "run",
        folder,
        "--input-ids",
        "5,1,6,7",
        "--max-new-tokens",
        "5",
    ]);
    assert_eq!(ids(&chat), ids(&rendered));
    assert!(text(&chat).contains("tokens/s"), "{}", text(&chat));

    let draw = |seed: &str| {
        ids(&memwise(&[
            "run",
            folder,
            "--input-ids",
            "1,2,3",
            "--max-new-tokens",
            "12",
            "--temperature",
            "1.5",
            "--top-k",
            "20",
            "--seed",
            seed,
        ]))
    };
    assert_eq!(draw("3"), draw("3"));
    assert_ne!(draw("3"), draw("4"));

    let no_template = with_word_tokenizer("tiny-llama", serde_json::Value::Null);
    let plain = no_template.path().join("tiny-llama");
    let refused = memwise(&[
        "run",
        plain.to_str().unwrap(),
        "--chat",
        "--prompt",
        "hello",
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("tokenizer_config.json"),
        "{}",
        text(&refused)
    );
}

#[test]
fn a_report_breaks_each_stage_down_by_phase() {
    let dir = tempfile::tempdir().unwrap();
    let streamed = dir.path().join("streamed");
    run_with_report(&streamed, &["--prefetch", "1"]);
    let breakdown: serde_json::Value =
        serde_json::from_slice(&std::fs::read(streamed.join("breakdown.json")).unwrap()).unwrap();
    let rows = breakdown["stages"].as_array().unwrap();
    // Peaks per kind: the layers computed (activations), the sampler read mapped pages.
    let kinds = &breakdown["kinds"];
    assert!(kinds["activations"].as_u64().unwrap() > 0, "{kinds}");
    assert!(kinds["file_backed"].as_u64().unwrap() > 0, "{kinds}");
    for kind in ["weights", "read_ahead", "kv_cache", "other_heap"] {
        assert!(kinds[kind].is_u64(), "{kind} missing from {kinds}");
    }
    let stages: Vec<&str> = rows.iter().map(|r| r["stage"].as_str().unwrap()).collect();
    assert_eq!(
        stages,
        [
            "model.embed_tokens",
            "model.layers.0",
            "model.layers.1",
            "model.norm",
            "lm_head"
        ]
    );
    for row in rows {
        // Every streamed stage was read, built and computed once.
        for phase in ["read_ms", "build_ms", "compute_ms"] {
            assert!(row[phase].as_f64().unwrap() > 0.0, "{row}");
        }
        assert_eq!(row["runs"], 1);
    }
    let table = std::fs::read_to_string(streamed.join("breakdown.txt")).unwrap();
    assert!(table.contains("of reading overlapped compute"), "{table}");
    assert!(table.contains("peak by kind: weights"), "{table}");

    // Loaded whole first, nothing is read while the forward runs.
    let full = dir.path().join("full");
    run_with_report(&full, &["--full"]);
    let trace: serde_json::Value =
        serde_json::from_slice(&std::fs::read(full.join("trace.json")).unwrap()).unwrap();
    let events = trace["traceEvents"].as_array().unwrap();
    let named = |name: &str| events.iter().any(|e| e["name"] == name);
    assert!(named("model.layers.0:compute") && !named("model.layers.0:wait"));
}

#[test]
fn embed_writes_what_sentence_transformers_returns_for_a_file_of_texts() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../model/tests/fixtures/sentence/mean-normalize");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(folder.join("reference.json")).unwrap()).unwrap();
    let sentences: Vec<String> = serde_json::from_value(reference["sentences"].clone()).unwrap();
    let expected: Vec<Vec<f32>> = serde_json::from_value(reference["embeddings"].clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("sentences.txt");
    // Blank lines are skipped; batches of 3 leave a last batch of 1.
    std::fs::write(&list, format!("{}\n\n", sentences.join("\n"))).unwrap();
    let out = dir.path().join("embeddings.json");
    let args = [
        "embed",
        folder.to_str().unwrap(),
        "--file",
        list.to_str().unwrap(),
        "--batch-size",
        "3",
        "--output",
        out.to_str().unwrap(),
    ];
    let output = memwise(&args);
    assert!(output.status.success(), "{}", text(&output));
    assert!(
        text(&output).contains("embedded 4 texts"),
        "{}",
        text(&output)
    );
    let rows = output_rows(&out);
    assert_eq!(rows.len(), expected.len());
    for (got, want) in rows.iter().zip(&expected) {
        assert!(max_diff(got, want) < 1e-5);
    }

    let nothing = memwise(&["embed", folder.to_str().unwrap()]);
    assert!(!nothing.status.success());
    assert!(
        text(&nothing).contains("no text to embed"),
        "{}",
        text(&nothing)
    );
    let decoder = memwise(&["embed", fixture("tiny-llama").to_str().unwrap(), "hi"]);
    assert!(
        text(&decoder).contains("is a decoder"),
        "{}",
        text(&decoder)
    );
}

#[test]
fn plan_prints_parts_placement_and_stages() {
    let model = fixture("tiny-llama").to_string_lossy().into_owned();
    let args = ["plan", &model, "--budget", "400MiB", "--seq", "128"];
    let output = memwise(&[&args[..], &["--new-tokens", "16"]].concat());
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    for line in [
        "placement: all resident",
        "runtime floor",
        "KV cache",
        "streaming window",
        "model.layers.1",
    ] {
        assert!(out.contains(line), "{line:?} missing from\n{out}");
    }

    let output = memwise(&[&args[..], &["--json", "--streamed"]].concat());
    assert!(output.status.success(), "{}", text(&output));
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["placement"], "streamed");
    assert_eq!(json["request"]["seq_len"], 128);
    let device = &json["devices"][0];
    let parts = device["parts"].as_object().unwrap();
    let sum: u64 = parts.values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(device["peak"].as_u64(), Some(sum));
    assert_eq!(json["stages"].as_array().unwrap().len(), 5);
}

#[test]
fn plan_refuses_a_budget_nothing_fits_with_the_deficit() {
    let model = fixture("tiny-llama").to_string_lossy().into_owned();
    let output = memwise(&["plan", &model, "--budget", "1MiB"]);
    assert!(!output.status.success());
    let out = text(&output);
    assert!(out.contains("cpu") && out.contains("short"), "{out}");
}

/// `run --json`'s last line: predicted and measured whole-process peaks, within 5% or
/// 16 MiB of each other, whichever is larger.
fn assert_peak_predicted(model: &str, extra: &[&str]) -> serde_json::Value {
    assert_peak_predicted_over(model, 32, extra)
}

/// As [`assert_peak_predicted`], on a prompt of `tokens` ids.
fn assert_peak_predicted_over(model: &str, tokens: usize, extra: &[&str]) -> serde_json::Value {
    let ids: Vec<String> = (1..=tokens).map(|i| (i % 900).to_string()).collect();
    let ids = ids.join(",");
    let output = memwise(&[&["run", model, "--input-ids", &ids, "--json"], extra].concat());
    let out = text(&output);
    assert!(output.status.success(), "{out}");
    assert!(
        out.contains("plan used:") && out.contains("peak: predicted"),
        "{out}"
    );
    let last = String::from_utf8_lossy(&output.stdout)
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let summary: serde_json::Value = serde_json::from_str(&last).unwrap();
    let predicted = summary["predicted_peak"].as_u64().unwrap() as f64;
    let measured = summary["measured_peak"].as_u64().unwrap() as f64;
    let bound = (predicted * 0.05).max(16.0 * 1024.0 * 1024.0);
    assert!(
        (measured - predicted).abs() <= bound,
        "{model} {extra:?}: predicted {predicted}, measured {measured}"
    );
    summary
}

#[test]
fn run_json_carries_the_plan_and_a_peak_predicted_within_the_bound() {
    let fixture = fixture("tiny-llama").to_string_lossy().into_owned();
    let summary = assert_peak_predicted(&fixture, &[]);
    assert_eq!(summary["plan"]["placement"], "streamed");
    assert_eq!(summary["plan"]["request"]["seq_len"], 32);

    // A synthetic model of 80 MiB: all resident, some resident, streamed.
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("m");
    let synth = [
        "synth",
        "--hidden",
        "512",
        "--intermediate",
        "1408",
        "--layers",
        "4",
        "--heads",
        "8",
        "--vocab",
        "8000",
    ];
    let output = memwise(&[&synth[..], &[folder.to_str().unwrap()]].concat());
    assert!(output.status.success(), "{}", text(&output));
    let model = folder.to_str().unwrap();
    for (extra, placement) in [
        (&["--keep-weights"][..], "all_resident"),
        (
            &[
                "--keep-weights",
                "--budget",
                "64MiB",
                "--max-new-tokens",
                "4",
            ][..],
            "mixed",
        ),
        (&["--budget", "64MiB"][..], "streamed"),
    ] {
        let summary = assert_peak_predicted(model, extra);
        assert_eq!(summary["plan"]["placement"], placement, "{extra:?}");
    }
}

#[test]
fn bf16_and_quantized_runs_are_predicted_within_the_bound() {
    // Layers of 64 MiB in f32, so that a stage read ahead beside the one computing, or a
    // dequantization's staging, is more than the bound if the plan forgets it.
    let tmp = tempfile::tempdir().unwrap();
    let synth = |folder: &std::path::Path, dtype: &str| {
        let args = [
            "synth",
            "--hidden",
            "1024",
            "--intermediate",
            "4096",
            "--layers",
            "2",
            "--heads",
            "8",
            "--vocab",
            "2000",
            "--dtype",
            dtype,
            folder.to_str().unwrap(),
        ];
        let output = memwise(&args);
        assert!(output.status.success(), "{}", text(&output));
    };
    let bf16 = tmp.path().join("bf16");
    synth(&bf16, "bf16");
    for extra in [
        &["--budget", "96MiB"][..],
        &[
            "--budget",
            "160MiB",
            "--keep-weights",
            "--max-new-tokens",
            "2",
        ][..],
    ] {
        assert_peak_predicted(bf16.to_str().unwrap(), extra);
    }
    let f32_model = tmp.path().join("f32");
    synth(&f32_model, "f32");
    let quantized = tmp.path().join("w4");
    let output = memwise(&[
        "quantize",
        f32_model.to_str().unwrap(),
        "--bits",
        "4",
        "--group-size",
        "128",
        "--out",
        quantized.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", text(&output));
    for extra in [&["--budget", "200MiB"][..], &["--budget", "120MiB"][..]] {
        assert_peak_predicted(quantized.to_str().unwrap(), extra);
    }
}

#[test]
fn a_long_prompts_attention_is_predicted_within_the_bound() {
    // 16 heads over 1024 tokens: each `heads × seq × seq` f32 tensor is 64 MiB, so one
    // more of them alive than the plan counts (the unmasked scores kept through the
    // softmax) is far past the bound.
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("m");
    let args = [
        "synth",
        "--hidden",
        "256",
        "--intermediate",
        "512",
        "--layers",
        "1",
        "--heads",
        "16",
        "--vocab",
        "1000",
        "--max-positions",
        "2048",
        folder.to_str().unwrap(),
    ];
    let output = memwise(&args);
    assert!(output.status.success(), "{}", text(&output));
    assert_peak_predicted_over(folder.to_str().unwrap(), 1024, &[]);
}

#[test]
fn generation_flags_that_would_be_ignored_are_refused() {
    let decoder = fixture("tiny-llama");
    let encoder = fixture("tiny-bert");
    for (model, extra, says) in [
        (
            &encoder,
            &["--max-new-tokens", "3"][..],
            "--max-new-tokens is for decoders",
        ),
        (
            &encoder,
            &["--max-new-tokens", "3", "--temperature", "0.5"][..],
            "is an encoder",
        ),
        (
            &decoder,
            &["--temperature", "0.5"][..],
            "give --max-new-tokens too",
        ),
        (
            &decoder,
            &["--max-new-tokens", "3", "--top-k", "5"][..],
            "give --temperature above 0",
        ),
        (
            &decoder,
            &["--max-new-tokens", "3", "--temperature", "-1"][..],
            "temperature -1",
        ),
    ] {
        let mut args = vec!["run", model.to_str().unwrap(), "--input-ids", "1,2"];
        args.extend_from_slice(extra);
        let output = memwise(&args);
        assert!(!output.status.success(), "{extra:?}");
        assert!(text(&output).contains(says), "{extra:?}: {}", text(&output));
    }
}

#[test]
fn plan_predicts_the_weights_run_holds_mapped_or_copied() {
    let model = fixture("tiny-llama").to_string_lossy().into_owned();
    let parts = |args: &[&str]| -> serde_json::Value {
        let output = memwise(
            &[
                &["plan", &model, "--seq", "5", "--streamed", "--json"],
                args,
            ]
            .concat(),
        );
        assert!(output.status.success(), "{}", text(&output));
        let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        json["devices"][0]["parts"].clone()
    };
    let run_parts = |args: &[&str]| -> serde_json::Value {
        let output =
            memwise(&[&["run", &model, "--input-ids", "1,5,9,3,7", "--json"], args].concat());
        assert!(output.status.success(), "{}", text(&output));
        let summary = String::from_utf8_lossy(&output.stdout)
            .lines()
            .rev()
            .find_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .unwrap();
        summary["plan"]["devices"][0]["parts"].clone()
    };
    let (mapped, copied) = (parts(&[]), parts(&["--no-mmap"]));
    // Mapped, a streamed stage holds a chunk of its matrices; copied, all its weights.
    assert!(
        mapped["streaming_window"].as_u64() < copied["streaming_window"].as_u64(),
        "mapped {mapped} vs copied {copied}"
    );
    assert_eq!(
        run_parts(&[])["streaming_window"],
        mapped["streaming_window"]
    );
    assert_eq!(
        run_parts(&["--no-mmap"])["streaming_window"],
        copied["streaming_window"]
    );
}
