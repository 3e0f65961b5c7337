//! Writing files so a crash leaves only whole ones, checksums, and free-space checks.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::Path;

use super::TEMP_SUFFIX;
use crate::error::{Error, Result};

/// Writes `parts` to `dir/name` atomically: a temporary file, synced, renamed over the
/// target, and the folder synced so the rename itself survives a crash. Returns the size
/// and checksum of what was written.
pub(crate) fn write_atomically(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<(u64, String)> {
    let target = dir.join(name);
    let temp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    let mut file = File::create(&temp).map_err(|e| Error::io("creating", &temp, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut len = 0u64;
    for part in parts {
        file.write_all(part)
            .map_err(|e| Error::io("writing", &temp, e))?;
        hasher.update(part);
        len += part.len() as u64;
    }
    file.sync_all()
        .map_err(|e| Error::io("syncing", &temp, e))?;
    drop(file);
    fs::rename(&temp, &target).map_err(|e| Error::io("renaming", &temp, e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("syncing", dir, e))?;
    Ok((len, format!("crc32:{:08x}", hasher.finalize())))
}

/// The checksum of the file at `path`, as [`write_atomically`] reports it.
pub(crate) fn checksum_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(buffer.get(..n).unwrap_or_default());
    }
    Ok(format!("crc32:{:08x}", hasher.finalize()))
}

pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("removing", path, e)),
        _ => Ok(()),
    }
}

/// Bytes this user may still write on the file system holding `dir`.
pub(super) fn available_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| {
        Error::io(
            "checking free space on",
            dir,
            std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        )
    })?;
    let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c_path is a valid NUL-terminated string and stats points to writable memory
    // of the right type; statvfs fills it completely when it returns 0.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) };
    if rc != 0 {
        return Err(Error::io(
            "checking free space on",
            dir,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: statvfs returned 0, so it initialised the struct.
    let stats = unsafe { stats.assume_init() };
    // fsblkcnt_t and c_ulong are 32 bits on some targets, hence the casts.
    #[allow(clippy::unnecessary_cast)]
    let available = (stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64);
    Ok(available)
}
