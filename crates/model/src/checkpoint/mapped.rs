//! Tensors computed on where they lie: slices of read-only file mappings that matmuls and
//! embedding lookups read in place, instead of copies.
//!
//! A copy costs its bytes twice (the page cache and the process's own pages) and, for a
//! stage streamed again at every generated token, fresh page faults each time. A mapped
//! tensor costs only the page-table entries of the pages a computation touches; those of a
//! stage that is not kept are dropped from the process again ([`MappedTensor::release`])
//! as soon as it has used them, so the resident set holds about one tensor of it at a time
//! while the bytes stay in the page cache for the next pass.

use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use memmap2::{Mmap, UncheckedAdvice};

use crate::checkpoint::dtype::{extend_f32, StoredDType};
use crate::checkpoint::index::TensorInfo;
use crate::error::{Error, Result};

/// Read-ahead checks one page in this many bytes to tell whether a tensor is cached.
const CACHE_PROBE_STRIDE: usize = 1 << 20;

/// Bytes of the buffer read-ahead reads through, per thread.
const PREFETCH_SCRATCH: usize = 4 << 20;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One read-only mapping per file, made when a tensor of that file is first asked for and
/// shared by every tensor mapped from it. Reused across stages and passes.
#[derive(Debug, Default)]
pub(crate) struct MappedFiles {
    maps: Mutex<HashMap<PathBuf, Arc<MappedFile>>>,
}

#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    file: File,
    map: Mmap,
}

impl MappedFiles {
    /// `info`'s bytes as a mapped tensor when they can be computed on in place: the compute
    /// dtype is f32 (the one dtype candle's CPU matmul and memwise's mapped matmul share),
    /// stored as f32, or as bf16 or f16 where `widen` says so (each chunk of rows is then
    /// widened into a reused buffer as it is multiplied: worth it for a stage streamed
    /// anyway, not for one kept, whose copy is widened once), and aligned for its element.
    /// `None` means "read a copy instead".
    ///
    /// # Safety
    ///
    /// The file must not be truncated or rewritten while any tensor mapped from it is alive
    /// (see [`crate::ReadStrategy::mmap_release`], whose promise the runner holds).
    pub(crate) unsafe fn tensor(
        &self,
        info: &TensorInfo,
        compute: StoredDType,
        transient: bool,
        widen: bool,
    ) -> Result<Option<MappedTensor>> {
        let mappable = match info.dtype {
            StoredDType::F32 => true,
            StoredDType::BF16 | StoredDType::F16 => widen,
            _ => false,
        };
        let aligned = info.data.start % info.dtype.size_in_bytes() as u64 == 0;
        if compute != StoredDType::F32 || !mappable || !aligned {
            return Ok(None);
        }
        let file = {
            let mut maps = self.maps.lock().unwrap_or_else(|e| e.into_inner());
            match maps.get(&info.file) {
                Some(file) => Arc::clone(file),
                None => {
                    // SAFETY: forwarded from this function's contract.
                    let file = Arc::new(unsafe { MappedFile::open(&info.file)? });
                    maps.insert(info.file.clone(), Arc::clone(&file));
                    file
                }
            }
        };
        // A page past the end of a file that shrank since it was mapped faults (SIGBUS):
        // check the length each time a tensor is handed out, so a truncation between
        // stages is an error rather than a crash.
        let len = file
            .file
            .metadata()
            .map_err(|e| Error::io("reading metadata of", &file.path, e))?
            .len();
        if info.data.end > len || info.data.end as usize > file.map.len() {
            return Err(Error::Truncated {
                file: file.path.clone(),
                tensor: info.name.clone(),
                needed: info.data.end,
                actual: len,
            });
        }
        Ok(Some(MappedTensor {
            file,
            range: info.data.start as usize..info.data.end as usize,
            shape: info.shape.clone(),
            name: info.name.clone(),
            dtype: info.dtype,
            transient,
        }))
    }
}

impl MappedFile {
    /// # Safety
    ///
    /// As [`MappedFiles::tensor`].
    unsafe fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        // SAFETY: a shared read-only mapping; the caller promised the file does not change
        // while it is mapped.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("mapping", path, e))?;
        Ok(Self {
            path: path.to_owned(),
            file,
            map,
        })
    }
}

/// A tensor computed on as f32 that stays in its file: a slice of a shared read-only
/// mapping, stored as f32 (used in place) or as bf16 or f16 (widened a chunk at a time).
///
/// `transient` tensors belong to a stage that is not kept: [`MappedTensor::release`] drops
/// their pages from the process after each use, and dropping the tensor does too.
#[derive(Debug)]
pub struct MappedTensor {
    file: Arc<MappedFile>,
    range: Range<usize>,
    shape: Vec<usize>,
    name: String,
    dtype: StoredDType,
    transient: bool,
}

impl MappedTensor {
    /// The tensor's Hugging Face name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The dtype it is stored in.
    pub fn dtype(&self) -> StoredDType {
        self.dtype
    }

    /// The elements read in place, for a tensor stored as f32 (`None` otherwise): touching
    /// them faults the pages in from the page cache.
    pub fn as_f32(&self) -> Option<&[f32]> {
        if self.dtype != StoredDType::F32 {
            return None;
        }
        let bytes = &self.file.map[self.range.clone()];
        // SAFETY: the range starts 4-byte aligned in a page-aligned mapping (checked when
        // the tensor was made) and holds `len / 4` initialised f32 values; every bit
        // pattern is a valid f32.
        Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) })
    }

    /// Rows `rows` of the tensor seen as a `(shape[0], rest)` matrix, as f32: in place when
    /// stored as f32, else widened into `scratch` (reused, so a pass faults no fresh pages).
    pub fn rows<'a>(&'a self, rows: Range<usize>, scratch: &'a mut Vec<f32>) -> &'a [f32] {
        let width = self.row_len();
        if let Some(values) = self.as_f32() {
            return &values[rows.start * width..rows.end * width];
        }
        let (start, len) = self.byte_span(rows);
        scratch.clear();
        extend_f32(&self.file.map[start..start + len], self.dtype, scratch);
        scratch
    }

    /// Every element as f32, in a new vector.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.as_f32() {
            Some(values) => values.to_vec(),
            None => {
                let mut values = Vec::new();
                extend_f32(&self.file.map[self.range.clone()], self.dtype, &mut values);
                values
            }
        }
    }

    /// Rows `rows` read with `pread` into a new vector: a lookup of a few rows reads them
    /// from the page cache without mapping anything. (A fault in a file read cold maps the
    /// whole large folio the kernel's read-around made, up to 2 MiB per row looked up.)
    pub fn read_rows(&self, rows: Range<usize>) -> std::io::Result<Vec<f32>> {
        let (start, len) = self.byte_span(rows);
        if self.dtype != StoredDType::F32 {
            let mut bytes = vec![0u8; len];
            self.file.file.read_exact_at(&mut bytes, start as u64)?;
            let mut values = Vec::with_capacity(len / self.dtype.size_in_bytes());
            extend_f32(&bytes, self.dtype, &mut values);
            return Ok(values);
        }
        let mut values = vec![0f32; len / 4];
        // SAFETY: the f32 buffer viewed as its bytes; any bytes are a valid f32.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(values.as_mut_ptr().cast::<u8>(), values.len() * 4)
        };
        self.file.file.read_exact_at(bytes, start as u64)?;
        // Safetensors stores little-endian values: already native on the CPUs memwise
        // maps for (a big-endian host reads each value swapped).
        if cfg!(target_endian = "big") {
            values
                .iter_mut()
                .for_each(|v| *v = f32::from_bits(v.to_bits().swap_bytes()));
        }
        Ok(values)
    }

    /// The tensor's bytes in its file.
    pub(crate) fn byte_len(&self) -> usize {
        self.range.len()
    }

    /// Elements per row of the `(shape[0], rest)` matrix.
    pub fn row_len(&self) -> usize {
        self.shape.iter().skip(1).product()
    }

    /// Reads the tensor's bytes into the page cache if some are not there yet, with large
    /// reads into a small reused buffer, so a stage streamed ahead of its turn is not read a
    /// page fault at a time while it computes. Reading (not mapping) keeps the pages out of
    /// the process: read-ahead costs a 4 MiB buffer, not a stage. `read` rather than
    /// `posix_fadvise(WILLNEED)`: the kernel caches what `read` brings in as large folios,
    /// which later passes map 2 MiB at a time, but what WILLNEED brings in as 4 KiB pages,
    /// mapped 64 KiB per fault — measured on the 2 GB Llama, 16 tokens at 400 MiB faulted
    /// 97,000 times after these reads and 450,000 times after WILLNEED or reads of one page
    /// per MiB (2.2 s against 5.1 s).
    pub fn prefetch(&self) {
        if self.is_cached() {
            return;
        }
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            scratch.resize(PREFETCH_SCRATCH, 0);
            let mut offset = self.range.start;
            while offset < self.range.end {
                let len = (self.range.end - offset).min(PREFETCH_SCRATCH);
                match self.file.file.read_at(&mut scratch[..len], offset as u64) {
                    Ok(0) | Err(_) => break, // the compute's own faults will report it
                    Ok(read) => offset += read,
                }
            }
        });
    }

    /// Whether the tensor's pages are in the page cache, judged by one page in every
    /// [`CACHE_PROBE_STRIDE`] bytes (`mincore`): checking all of a 2 GB model's pages at
    /// every generated token cost a tenth of the run. A file is cached or evicted in runs
    /// of pages, and a tensor judged cached whose gap was missed is faulted in by its
    /// compute as it would have been without read-ahead.
    pub(crate) fn is_cached(&self) -> bool {
        let page = page_size();
        let first = self.range.start / page * page;
        let mut resident = [0u8; 1];
        (first..self.range.end)
            .step_by(CACHE_PROBE_STRIDE.max(page))
            .chain(std::iter::once((self.range.end - 1) / page * page))
            .all(|offset| {
                // SAFETY: `offset` is page-aligned inside the mapping, one page long, and
                // `resident` has the one byte mincore writes for it.
                let done = unsafe {
                    libc::mincore(
                        self.file.map.as_ptr().add(offset).cast_mut().cast(),
                        1,
                        resident.as_mut_ptr(),
                    )
                };
                done == 0 && resident[0] & 1 == 1
            })
    }

    /// Drops the pages of `rows` from the process (not from the page cache) if the tensor
    /// is transient; a resident tensor keeps them.
    pub fn release(&self, rows: Range<usize>) {
        if !self.transient {
            return;
        }
        let (start, len) = self.byte_span(rows);
        // Only whole pages inside the span: a page shared with a neighbouring tensor of a
        // resident stage stays, so releasing never makes a kept stage fault again.
        let page = page_size();
        let first = start.div_ceil(page) * page;
        let end = (start + len) / page * page;
        if end > first {
            // SAFETY: a shared read-only file mapping: DONTNEED only drops the pages from
            // this process, and a later access reads the same bytes back from the file, so
            // slices into the range stay valid.
            let _ = unsafe {
                self.file
                    .map
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, first, end - first)
            };
        }
    }

    /// The byte offset in the mapping and length of `rows`.
    fn byte_span(&self, rows: Range<usize>) -> (usize, usize) {
        let row_bytes = self.row_len() * self.dtype.size_in_bytes();
        (
            self.range.start + rows.start * row_bytes,
            rows.len() * row_bytes,
        )
    }

    /// All rows.
    pub fn all_rows(&self) -> Range<usize> {
        0..self.shape.first().copied().unwrap_or(1)
    }
}

impl Drop for MappedTensor {
    fn drop(&mut self) {
        self.release(self.all_rows());
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(1)
}
