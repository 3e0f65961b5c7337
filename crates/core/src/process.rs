//! What the operating system and the C allocator say about this process.
//!
//! On Linux: `/proc/self/status` for resident memory, `/proc/self/clear_refs` to restart the
//! resident high-water mark, and glibc's `mallinfo2` / `malloc_trim`. Elsewhere every figure
//! is `None` ("unavailable"), never zero.

use serde::Serialize;

/// Resident memory of this process, as `/proc/self/status` reports it, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ProcessMemory {
    /// `VmRSS`: everything resident.
    pub rss: u64,
    /// `RssAnon`: resident anonymous pages (heap, stacks, anonymous maps).
    pub rss_anon: u64,
    /// `RssFile`: resident file-backed pages (binaries, mmapped checkpoints).
    pub rss_file: u64,
    /// `VmHWM`: the resident high-water mark since start or the last
    /// [`reset_peak_memory`](crate::reset_peak_memory).
    pub rss_peak: u64,
}

impl ProcessMemory {
    /// Reads `/proc/self/status`. `None` where it does not exist or cannot be parsed.
    pub fn read() -> Option<ProcessMemory> {
        let text = std::fs::read_to_string("/proc/self/status").ok()?;
        Self::parse(&text)
    }

    /// Parses the text of a `/proc/<pid>/status` file. `None` if `VmRSS` is missing.
    pub fn parse(status: &str) -> Option<ProcessMemory> {
        let mut out = ProcessMemory::default();
        let mut saw_rss = false;
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let field = match key {
                "VmRSS" => {
                    saw_rss = true;
                    &mut out.rss
                }
                "RssAnon" => &mut out.rss_anon,
                "RssFile" => &mut out.rss_file,
                "VmHWM" => &mut out.rss_peak,
                _ => continue,
            };
            *field = parse_kib(value)?;
        }
        saw_rss.then_some(out)
    }
}

/// Parses "   1234 kB" into bytes.
fn parse_kib(value: &str) -> Option<u64> {
    let number = value.trim().strip_suffix("kB")?.trim();
    number.parse::<u64>().ok()?.checked_mul(1024)
}

/// Restarts the kernel's resident high-water mark (`VmHWM`) at the current RSS.
/// Returns false where the platform or permissions do not allow it.
pub fn reset_rss_peak() -> bool {
    // "5" resets the peak RSS counter (see proc(5), /proc/pid/clear_refs).
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Bytes the C allocator holds that are free: memory the process keeps but no one uses.
/// From glibc's `mallinfo2` (`fordblks`, free bytes in the arenas). `None` without glibc.
pub fn allocator_free_bytes() -> Option<u64> {
    imp::allocator_free_bytes()
}

/// Asks the C allocator to return free pages to the OS (`malloc_trim(0)` on glibc).
/// Returns whether the platform supports it.
pub fn trim_allocator() -> bool {
    imp::trim_allocator()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    pub fn allocator_free_bytes() -> Option<u64> {
        // SAFETY: mallinfo2 takes no arguments and returns a plain struct by value.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks as u64)
    }

    pub fn trim_allocator() -> bool {
        // SAFETY: malloc_trim only walks the allocator's own free lists; 0 means keep no pad.
        unsafe { libc::malloc_trim(0) };
        true
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub fn allocator_free_bytes() -> Option<u64> {
        None
    }

    pub fn trim_allocator() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_fields() {
        let text = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nRssAnon:\t 512 kB\nRssFile:\t 256 kB\n";
        let m = ProcessMemory::parse(text).unwrap();
        assert_eq!(m.rss, 1024 * 1024);
        assert_eq!(m.rss_anon, 512 * 1024);
        assert_eq!(m.rss_file, 256 * 1024);
        assert_eq!(m.rss_peak, 2048 * 1024);
    }

    #[test]
    fn missing_rss_is_unavailable_not_zero() {
        assert_eq!(ProcessMemory::parse("Name:\tx\n"), None);
        assert_eq!(ProcessMemory::parse("VmRSS:\tgarbage kB\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let m = ProcessMemory::read().expect("/proc/self/status");
        assert!(m.rss > 0 && m.rss_peak >= m.rss);
    }
}
