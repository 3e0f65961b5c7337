//! Page-cache read-ahead for weights computed on in their mapped files.
//!
//! A mapped stage costs the process nothing until its computation touches it, so reading
//! its bytes into the page cache ahead of time is not bounded by the budget (which is the
//! process's peak) the way copies are. One stage ahead, the disk idles whenever a stage
//! reads faster than the one before it computes, and that slack is lost: on a cold cache
//! the last stages then wait for reads (half a second of a 2 GB Llama's forward). This
//! thread reads every stage the pass will stream, in order, as fast as the disk gives it,
//! within a window of page cache: at least `depth` stages ahead, and further while the
//! bytes ahead of the computation fit in half the memory the kernel reports available
//! (reading further would evict pages before they are used).

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use crate::checkpoint::MappedTensor;

/// Stage indices with their mapped tensors, in the order a pass runs them.
pub(super) type MappedStages = Vec<(usize, Vec<MappedTensor>)>;

/// The stage the computation is on, and whether the pass is over.
#[derive(Default)]
struct Position {
    computing: usize,
    stopped: bool,
}

#[derive(Default)]
struct Progress {
    position: Mutex<Position>,
    moved: Condvar,
}

/// Reads a pass's mapped stages into the page cache on a thread of its own; dropping it
/// stops the thread (after the tensor it is reading) and joins it.
pub(super) struct PageCacheReadAhead {
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
}

impl PageCacheReadAhead {
    /// Starts reading `stages` (each a stage index and its mapped tensors, in the order the
    /// pass runs them): a stage once it is at most `depth` stages after the one computing,
    /// or its bytes and those of the stages before it, after the one computing, fit in
    /// `window`.
    pub(super) fn start(stages: MappedStages, depth: usize, window: u64) -> std::io::Result<Self> {
        let progress = Arc::new(Progress::default());
        let shared = Arc::clone(&progress);
        let thread = std::thread::Builder::new()
            .name("memwise-read-ahead".into())
            .spawn(move || read_in_order(&stages, depth, window, &shared))?;
        Ok(Self {
            progress,
            thread: Some(thread),
        })
    }

    /// The computation has started stage `index`: the window moves on.
    pub(super) fn computing(&self, index: usize) {
        let mut position = self.lock();
        position.computing = position.computing.max(index);
        self.progress.moved.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Position> {
        self.progress
            .position
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for PageCacheReadAhead {
    fn drop(&mut self) {
        self.lock().stopped = true;
        self.progress.moved.notify_all();
        if let Some(thread) = self.thread.take() {
            // A panic in the reader only lost read-ahead; the pass faulted pages itself.
            let _ = thread.join();
        }
    }
}

fn read_in_order(stages: &MappedStages, depth: usize, window: u64, progress: &Progress) {
    let bytes: Vec<u64> = stages
        .iter()
        .map(|(_, tensors)| tensors.iter().map(|t| t.byte_len() as u64).sum())
        .collect();
    for (k, (index, tensors)) in stages.iter().enumerate() {
        let mut position = progress
            .position
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if position.stopped {
                return;
            }
            // Bytes from the first stage after the one computing through this one.
            let ahead: u64 = stages[..=k]
                .iter()
                .zip(&bytes)
                .filter(|((i, _), _)| *i > position.computing)
                .map(|(_, b)| b)
                .sum();
            if *index <= position.computing + depth || ahead <= window {
                break;
            }
            position = progress
                .moved
                .wait(position)
                .unwrap_or_else(PoisonError::into_inner);
        }
        drop(position);
        for tensor in tensors {
            tensor.prefetch();
        }
    }
}

/// Half the memory the kernel reports available (`MemAvailable`): how much page cache
/// read-ahead may fill beyond its `depth` stages. 0 where `/proc/meminfo` cannot say.
pub(super) fn page_cache_window() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemAvailable:"))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|kib| kib.trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024 / 2)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::checkpoint::{MappedFiles, StoredDType, TensorInfo};

    /// Larger than the kernel's own read-ahead after a read (`read_ahead_kb`, 8 MiB at
    /// most on common systems), which may bring in the start of the next stage: the tests
    /// look at whole stages, whose last pages only this module's reads bring in.
    const STAGE_BYTES: u64 = 32 << 20;

    /// Three one-tensor stages (indices 1 to 3) in a file written to disk and evicted
    /// from the page cache: the stages to read ahead, and a second mapping of each to
    /// probe which are cached. `None` where the file system keeps them cached anyway.
    fn evicted_stages(dir: &std::path::Path) -> Option<(MappedStages, Vec<MappedTensor>)> {
        let path = dir.join("weights.bin");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![1u8; 3 * STAGE_BYTES as usize])
            .unwrap();
        file.sync_all().unwrap();
        // SAFETY: fadvise on an open descriptor has no memory effects.
        let advised =
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(advised, 0);
        let files = MappedFiles::default();
        let map = |k: u64| {
            let info = TensorInfo {
                name: format!("stage{}.weight", k + 1),
                file: path.clone(),
                dtype: StoredDType::F32,
                shape: vec![(STAGE_BYTES / 4 / 1024) as usize, 1024],
                data: k * STAGE_BYTES..(k + 1) * STAGE_BYTES,
                storage: None,
                tied_to: None,
            };
            // SAFETY: the file is not changed while mapped.
            unsafe { files.tensor(&info, StoredDType::F32, false, false) }
                .unwrap()
                .unwrap()
        };
        let probes: Vec<MappedTensor> = (0..3).map(map).collect();
        if probes.iter().any(MappedTensor::is_cached) {
            eprintln!("skipped: the file system kept the pages cached after DONTNEED");
            return None;
        }
        let stages = (0..3).map(|k| (k as usize + 1, vec![map(k)])).collect();
        Some((stages, probes))
    }

    fn wait_until(what: &str, done: impl Fn() -> bool) {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{what} never happened"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn stages_are_read_in_order_within_the_window_as_the_computation_moves() {
        let dir = tempfile::tempdir().unwrap();
        let Some((stages, probes)) = evicted_stages(dir.path()) else {
            return;
        };
        // No stage by depth; a window of one stage and a half.
        let read_ahead = PageCacheReadAhead::start(stages, 0, STAGE_BYTES * 3 / 2).unwrap();
        wait_until("stage 1 read", || probes[0].is_cached());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!probes[1].is_cached(), "stage 2 is beyond the window");
        read_ahead.computing(1);
        wait_until("stage 2 read", || probes[1].is_cached());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!probes[2].is_cached(), "stage 3 is beyond the window");
        drop(read_ahead); // stops the thread while it waits
        assert!(!probes[2].is_cached());
    }

    #[test]
    fn depth_reads_stages_ahead_whatever_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let Some((stages, probes)) = evicted_stages(dir.path()) else {
            return;
        };
        let read_ahead = PageCacheReadAhead::start(stages, 2, 0).unwrap();
        wait_until("stages 1 and 2 read", || {
            probes[0].is_cached() && probes[1].is_cached()
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(!probes[2].is_cached(), "stage 3 is three stages ahead");
        read_ahead.computing(1);
        wait_until("stage 3 read", || probes[2].is_cached());
    }

    #[test]
    fn the_window_is_half_of_what_the_kernel_reports_available() {
        let window = page_cache_window();
        assert!(window > 0, "/proc/meminfo has MemAvailable on Linux");
        let total_kib: u64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.trim().strip_suffix("kB"))
            .and_then(|k| k.trim().parse().ok())
            .unwrap();
        assert!(window <= total_kib * 1024 / 2);
    }
}
