//! What the whole-process benchmarks share: running this binary again as a measuring child,
//! evicting files from the page cache or warming them into it, and folding bytes into a
//! checksum.
//!
//! Each bench includes it with `mod common;`; a folder below `benches/` is not a bench of
//! its own.

#![allow(dead_code)] // each bench uses its own subset

use std::fs::File;
use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: f64 = (1u64 << 20) as f64;

/// Runs `child` with the arguments after `--child` when this process is a child, and
/// `orchestrate` when `cargo bench` started it. `cargo test --benches` passes neither flag,
/// and only the bench's name is printed.
pub fn dispatch(name: &str, child: fn(&[String]), orchestrate: fn()) {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&args[i + 1..]);
    } else if args.iter().any(|a| a == "--bench") {
        orchestrate();
    } else {
        println!("{name}: run with `cargo bench -p memwise-model --bench {name}`");
    }
}

/// Runs this binary again with `--child` and `args` in a fresh process (so its `VmHWM` is
/// its own) and returns the first line of its output that is a JSON object.
///
/// The bench's own `MEMWISE_BENCH_*` variables are not passed on: memwise reads every
/// `MEMWISE_*` variable as configuration and refuses keys it does not know.
pub fn run_child(args: &[&str]) -> serde_json::Value {
    let mut command = Command::new(std::env::current_exe().unwrap());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MEMWISE_BENCH_") {
            command.env_remove(key);
        }
    }
    let out = command.arg("--child").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "child {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let line = stdout.lines().find(|l| l.starts_with('{')).unwrap();
    serde_json::from_str(line).unwrap()
}

/// Drops the files' clean pages from the page cache, so the next read comes from disk.
/// Dirty pages cannot be dropped, so everything is written back (`sync`) first.
pub fn evict(files: &[PathBuf]) {
    // SAFETY: `sync` takes no arguments and cannot fail.
    unsafe { libc::sync() };
    for path in files {
        let file = File::open(path).unwrap();
        // SAFETY: a valid open descriptor; offset 0 and length 0 mean the whole file.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// Reads the files front to back through one 8 MiB buffer, handing each chunk to `each`;
/// returns the bytes read. Reading them all is also how a bench warms the page cache.
pub fn read_files(files: &[PathBuf], mut each: impl FnMut(&[u8])) -> u64 {
    let mut buffer = vec![0u8; 8 << 20];
    let mut bytes = 0;
    for path in files {
        let mut file = File::open(path).unwrap();
        loop {
            let n = file.read(&mut buffer).unwrap();
            if n == 0 {
                break;
            }
            each(&buffer[..n]);
            bytes += n as u64;
        }
    }
    bytes
}

/// Folds bytes into a checksum so every byte is really read (and every mapped page touched).
pub fn fold(bytes: &[u8], mut acc: u64) -> u64 {
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        acc = acc.rotate_left(5) ^ u64::from_le_bytes(word.try_into().unwrap());
    }
    for &b in words.remainder() {
        acc = acc.rotate_left(5) ^ u64::from(b);
    }
    acc
}

/// The 2.11 GB fp32 Llama of issue 5 (hidden 2048, intermediate 5632, 9 layers, 32 heads /
/// 4 key-value heads, vocab 32000, untied, in 500 MB shards), or with `small` one a few MiB
/// in size, of the same shape, for smoke runs.
pub fn synthetic_llama(small: bool) -> memwise_model::SynthSpec {
    use memwise_model::{Architecture, SynthSpec};
    let full = SynthSpec {
        arch: Architecture::Llama,
        hidden_size: 2048,
        intermediate_size: 5632,
        num_layers: 9,
        num_heads: 32,
        num_kv_heads: 4,
        vocab_size: 32000,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
        seed: 0,
        shard_bytes: 500_000_000,
        dtype: candle_core::DType::F32,
    };
    if small {
        SynthSpec {
            hidden_size: 256,
            intermediate_size: 704,
            num_layers: 3,
            num_heads: 8,
            num_kv_heads: 2,
            vocab_size: 4000,
            shard_bytes: 4_000_000,
            ..full
        }
    } else {
        full
    }
}

/// The checkpoint's folder under `$MEMWISE_BENCH_DIR` (default: `memwise-bench/` in the
/// cargo target folder): reused when its config is the spec's and it opens, otherwise
/// (re)written.
pub fn prepare_checkpoint(spec: &memwise_model::SynthSpec) -> PathBuf {
    use memwise_model::{write_synthetic_checkpoint, Checkpoint};
    let folder = bench_dir().join(format!(
        "llama-h{}-i{}-l{}-v{}-seed{}",
        spec.hidden_size, spec.intermediate_size, spec.num_layers, spec.vocab_size, spec.seed
    ));
    let config = spec.config_json().unwrap();
    let elements: usize = spec
        .tensors()
        .unwrap()
        .iter()
        .map(|t| t.element_count())
        .sum();
    let expected_bytes = (elements * spec.dtype.size_in_bytes()) as u64;
    let valid = std::fs::read_to_string(folder.join("config.json")).is_ok_and(|c| c == config)
        && Checkpoint::open(&folder).is_ok_and(|c| {
            c.index().stored_bytes() == expected_bytes
                && c.files().iter().all(|f| f.metadata().is_ok())
        });
    if valid {
        println!("reusing {}", folder.display());
        return folder;
    }
    if folder.exists() {
        std::fs::remove_dir_all(&folder).unwrap();
    }
    std::fs::create_dir_all(bench_dir()).unwrap();
    let started = std::time::Instant::now();
    let report = write_synthetic_checkpoint(spec, &folder).unwrap();
    println!(
        "generated {} ({:.0} MiB in {} shards) in {:.1}s",
        folder.display(),
        report.total_size as f64 / (1u64 << 20) as f64,
        report.shards.len(),
        started.elapsed().as_secs_f64()
    );
    folder
}

/// Where benches keep what they generate: `$MEMWISE_BENCH_DIR`, or `memwise-bench/` in the
/// cargo target folder.
pub fn bench_dir() -> PathBuf {
    std::env::var_os("MEMWISE_BENCH_DIR").map_or_else(
        || {
            // The bench binary lives in `<target>/<profile>/deps/`.
            let exe = std::env::current_exe().unwrap();
            exe.ancestors().nth(3).unwrap().join("memwise-bench")
        },
        PathBuf::from,
    )
}

/// What one child process measured.
pub struct Measured {
    pub wall_s: f64,
    /// Bytes it read through system calls (`rchar` of `/proc/PID/io`, read as it exits):
    /// from the page cache or the disk alike; pages of a mapped file are not counted.
    pub read_bytes: u64,
    /// The process's own peak (`ru_maxrss`). Linux carries the spawning process's peak
    /// into it across the exec (the child starts as a vfork sharing the parent's memory),
    /// so a bench that grew large itself should use the peak the child reports.
    pub own_peak: f64,
    /// The sampled peak of the sum over the process and its descendants.
    pub tree_peak: f64,
    /// What it wrote to stdout.
    pub stdout: String,
}

impl Measured {
    /// The larger of its own peak and its process tree's, in MiB.
    pub fn peak(&self) -> f64 {
        self.own_peak.max(self.tree_peak)
    }
}

/// Runs `command` to completion, timing it from spawn to exit, sampling the RSS of its
/// process tree and keeping its stdout.
pub fn measure(mut command: Command) -> Measured {
    without_bench_vars(&mut command, &["MEMWISE_AUTOROUND_PYTHON"]);
    command.stdout(std::process::Stdio::piped());
    let started = Instant::now();
    let mut child = command.spawn().unwrap();
    let pid = child.id() as i32;
    let mut pipe = child.stdout.take().unwrap();
    let stdout = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            let mut peak = 0u64;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(tree_rss(pid));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    // Wait for the exit without reaping, so that its /proc entry (and I/O counts) remain.
    // SAFETY: an all-zero siginfo_t is a valid value; waitid fills it for our own child.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet waited for; info is writable.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT,
        )
    };
    assert_eq!(rc, 0, "waitid failed");
    let read_bytes = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("rchar: ")?.trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    let own_peak = wait_for_peak(pid, &command);
    let wall_s = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let tree_peak = sampler.join().unwrap();
    drop(child);
    Measured {
        wall_s,
        read_bytes,
        own_peak: own_peak as f64 / MIB,
        tree_peak: tree_peak as f64 / MIB,
        stdout: stdout.join().unwrap(),
    }
}

/// The resident bytes of `root` and every process descending from it.
fn tree_rss(root: i32) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    let mut parents = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces, so split after its `)`.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parents.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut grew = true;
    while grew {
        grew = false;
        for &(pid, ppid) in &parents {
            if tree.contains(&ppid) && !tree.contains(&pid) {
                tree.push(pid);
                grew = true;
            }
        }
    }
    tree.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/statm")).ok())
        .filter_map(|statm| statm.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * page)
        .sum()
}

/// Waits for our child `pid` and returns its own peak RSS in bytes (`ru_maxrss` from
/// `wait4`, the kernel's `VmHWM` for it), panicking unless it exited with status 0.
pub fn wait_for_peak(pid: i32, what: &dyn std::fmt::Debug) -> u64 {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet waited for; status and usage are writable.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{what:?} failed (status {status})"
    );
    usage.ru_maxrss as u64 * 1024
}

/// Removes the bench's own `MEMWISE_BENCH_*` variables (and any others named) from a child's
/// environment: memwise reads every `MEMWISE_*` variable as configuration and refuses keys
/// it does not know.
pub fn without_bench_vars(command: &mut Command, also: &[&str]) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("MEMWISE_BENCH_") || also.contains(&key.as_str()) {
            command.env_remove(key);
        }
    }
}

/// The release `memwise` binary: `$MEMWISE_BENCH_BIN`, or `release/memwise` in the cargo
/// target folder.
pub fn release_binary() -> PathBuf {
    std::env::var_os("MEMWISE_BENCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().unwrap();
            exe.ancestors().nth(3).unwrap().join("release/memwise")
        })
}

/// The one-line JSON summary `memwise run --json` ends with, from its stdout.
pub fn run_summary(stdout: &str) -> Option<serde_json::Value> {
    stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
}
