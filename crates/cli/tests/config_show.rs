//! `memwise config show --origin` and `memwise config check`, run as a user would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch folder for this test process, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("memwise-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `memwise` with no MEMWISE_* variables from the test's own environment.
fn memwise(cwd: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_memwise"));
    command.current_dir(cwd);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("MEMWISE_") {
            command.env_remove(name);
        }
    }
    command
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

/// The line for `key`, checked to end with `# origin`.
fn line_for<'a>(text: &'a str, key: &str, origin: &str) -> &'a str {
    let line = text
        .lines()
        .find(|l| l.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no line for {key} in\n{text}"));
    assert!(line.ends_with(&format!("# {origin}")), "{line}");
    line
}

#[test]
fn show_origin_names_the_file_the_variable_and_the_defaults() {
    let scratch = Scratch::new("config-show");
    let file = scratch.write(
        "memwise.toml",
        "device = \"cuda:0\"\n[memory]\ngpu_batch_size = 32\n[memory.max_memory]\ncpu = \"2GiB\"\n[quantization]\nbits = 8\n",
    );
    let output = memwise(&scratch.0)
        .args(["config", "show", "--origin"])
        .env("MEMWISE_CONFIG", "memwise.toml")
        .env("MEMWISE_MEMORY__GPU_BATCH_SIZE", "8")
        .output()
        .unwrap();
    let text = stdout(&output);
    // The file is named relative to the working folder, which the process sees resolved.
    let from_file = format!("file {}", file.canonicalize().unwrap().display());
    let line = line_for(
        &text,
        "memory.gpu_batch_size",
        "environment variable MEMWISE_MEMORY__GPU_BATCH_SIZE",
    );
    assert!(line.contains("= 8 "), "{line}");
    line_for(&text, "quantization.bits", &from_file);
    line_for(&text, "memory.max_memory.cpu", &from_file);
    line_for(&text, "device", &from_file);
    line_for(&text, "memory.trim_allocator", "default");
    line_for(&text, "export.export_format", "default");

    let json = memwise(&scratch.0)
        .args([
            "config",
            "show",
            "--origin",
            "--json",
            "--file",
            "memwise.toml",
        ])
        .output()
        .unwrap();
    let entries: serde_json::Value = serde_json::from_str(&stdout(&json)).unwrap();
    let bits = entries
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "quantization.bits")
        .unwrap();
    assert_eq!(bits["value"], 8);
    assert_eq!(bits["origin"], from_file.as_str());
}

#[test]
fn show_refuses_a_bad_variable_and_check_lists_every_problem_in_a_file() {
    let scratch = Scratch::new("config-check");
    let output = memwise(&scratch.0)
        .args(["config", "show"])
        .env("MEMWISE_QUANTIZATION__BITS", "5")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("quantization.bits (from environment variable MEMWISE_QUANTIZATION__BITS)"),
        "{stderr}"
    );

    let bad = scratch.write(
        "bad.toml",
        "[memory]\ngpu_bach_size = 8\n[export]\nexport_format = \"gguf\"\n",
    );
    let output = memwise(&scratch.0)
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("did you mean memory.gpu_batch_size?"),
        "{stderr}"
    );
    assert!(stderr.contains("export.export_format"), "{stderr}");
    assert!(stderr.contains("2 problem(s)"), "{stderr}");

    let good = scratch.write("good.json", r#"{"memory": {"gpu_batch_size": 4}}"#);
    let output = memwise(&scratch.0)
        .args(["config", "check"])
        .arg(&good)
        .output()
        .unwrap();
    let text = stdout(&output);
    assert!(text.contains("ok (1 key(s) set)"), "{text}");
}

#[test]
fn show_lists_the_report_samplers_keys_and_run_refuses_a_bad_one() {
    let scratch = Scratch::new("config-sampler");
    scratch.write("memwise.toml", "[memory.tracking]\nsample_capacity = 512\n");
    let output = memwise(&scratch.0)
        .args(["config", "show", "--origin"])
        .env("MEMWISE_CONFIG", "memwise.toml")
        .env("MEMWISE_MEMORY__TRACKING__SAMPLE_INTERVAL_MS", "25")
        .output()
        .unwrap();
    let text = stdout(&output);
    let line = line_for(
        &text,
        "memory.tracking.sample_interval_ms",
        "environment variable MEMWISE_MEMORY__TRACKING__SAMPLE_INTERVAL_MS",
    );
    assert!(line.contains("= 25 "), "{line}");
    let file = scratch.0.join("memwise.toml").canonicalize().unwrap();
    let line = line_for(
        &text,
        "memory.tracking.sample_capacity",
        &format!("file {}", file.display()),
    );
    assert!(line.contains("= 512 "), "{line}");

    // `memwise run --report` reads them, so a bad one stops it before any work, by name.
    let output = memwise(&scratch.0)
        .args(["run", "no-such-model", "--input-ids", "1", "--report", "r"])
        .env("MEMWISE_MEMORY__TRACKING__SAMPLE_INTERVAL_MS", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("memory.tracking.sample_interval_ms"),
        "{stderr}"
    );
}
