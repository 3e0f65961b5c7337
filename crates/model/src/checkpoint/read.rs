//! Reading one layer at a time without keeping the model resident.
//!
//! Mapping a file is zero-copy, but every page a mapping touches stays in the process's
//! resident set until it is unmapped or released, so streaming a model through a mapping
//! ends with the whole model in RSS. memwise offers two ways out, measured in the crate
//! docs:
//!
//! - [`ReadStrategy::Pread`] (the default): `pread` each layer into one buffer that is
//!   reused for every layer. A file that shrinks while it is read gives an error, never a
//!   crash.
//! - [`ReadStrategy::mmap_release`]: map each file, fault each tensor in with
//!   `madvise(MADV_POPULATE_READ)`, hand out slices of the mapping, and release the layer's
//!   pages (`madvise(MADV_DONTNEED)`) when its [`LayerData`] drops. Zero-copy.
//!
//! Both hold the largest layer in RSS, once: on the 1 GiB benchmark both peak at the
//! largest layer plus 2 to 4 MiB. `pread` kept up with a plain sequential read from a cold
//! cache in every run; the mapping did not (see the crate docs), so `pread` is the default
//! and the mapping is the choice for checkpoints that stay in the page cache.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap, UncheckedAdvice};

use crate::checkpoint::dtype::{convert_into, to_f32_vec, StoredDType};
use crate::checkpoint::index::TensorInfo;
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};

/// Tensors closer than this on disk are read with one call, their gap read and ignored:
/// one syscall costs more than reading a few kilobytes of already-cached padding.
const COALESCE_GAP: u64 = 64 << 10;

/// How a [`LayerReader`] gets bytes off disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReadStrategy {
    /// `pread` into one buffer reused for every layer: the lowest peak RSS, at least the
    /// speed of a sequential read from a cold cache, and immune to files shrinking under it.
    #[default]
    Pread,
    /// Map the files, fault each tensor in at once, and release the layer's pages when it
    /// is dropped. Zero-copy: three to five times `Pread`'s speed from a warm page cache,
    /// but slower than it from a cold one.
    ///
    /// Made only by the `unsafe` [`ReadStrategy::mmap_release`], whose caller promises
    /// what the mapping needs (see its `# Safety`). A file found shorter than its tensors
    /// when a layer is read is an [`Error::Truncated`].
    MmapRelease(FilesUnchanged),
}

/// The promise [`ReadStrategy::mmap_release`]'s caller makes: the checkpoint's files do not
/// change while they are mapped. Only that function makes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilesUnchanged(());

impl ReadStrategy {
    /// Read through shared read-only mappings of the files: zero-copy, each tensor faulted in
    /// at once and each layer's pages released when its [`LayerData`] drops.
    ///
    /// ```
    /// use memwise_model::{Checkpoint, ReadStrategy};
    ///
    /// let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama-sharded");
    /// let checkpoint = Checkpoint::open(folder)?;
    /// // SAFETY: the fixture's files are not written while this example reads them.
    /// let mut reader = checkpoint.reader(unsafe { ReadStrategy::mmap_release() });
    /// let first = checkpoint.stages()[0].name.clone();
    /// assert!(reader.read_stage(&first)?.byte_len() > 0);
    /// # Ok::<(), memwise_model::Error>(())
    /// ```
    ///
    /// # Safety
    ///
    /// No process may truncate or rewrite the checkpoint's files while a reader with this
    /// strategy is alive. The bytes handed out are slices of the mapping: a file rewritten
    /// under them changes bytes Rust assumes immutable, and a file truncated under a layer
    /// in use makes the next access to the lost pages fault (SIGBUS). memwise checks each
    /// file's length when a layer is read, which catches a truncation between layers but not
    /// one during a layer's use.
    pub const unsafe fn mmap_release() -> Self {
        ReadStrategy::MmapRelease(FilesUnchanged(()))
    }
}

struct OpenFile {
    file: File,
    map: Option<Mmap>,
}

/// Reads the layers of a [`Checkpoint`] one at a time, reusing its memory.
pub struct LayerReader<'c> {
    checkpoint: &'c Checkpoint,
    strategy: ReadStrategy,
    files: HashMap<PathBuf, OpenFile>,
    buffer: Vec<u8>,
}

/// One contiguous read: a byte range of one file and where it lands in the buffer.
struct Run {
    file: PathBuf,
    range: Range<u64>,
    buffer_offset: usize,
    first_tensor: String,
}

impl<'c> LayerReader<'c> {
    pub(crate) fn new(checkpoint: &'c Checkpoint, strategy: ReadStrategy) -> Self {
        LayerReader {
            checkpoint,
            strategy,
            files: HashMap::new(),
            buffer: Vec::new(),
        }
    }

    /// How this reader reads.
    pub fn strategy(&self) -> ReadStrategy {
        self.strategy
    }

    /// Bytes the reader keeps between layers (its reused buffer).
    pub fn retained_bytes(&self) -> usize {
        self.buffer.capacity()
    }

    /// Reads every tensor of the stage called `stage` (see [`Checkpoint::stages`]). The
    /// bytes stay valid until the returned value is dropped; the next read reuses their
    /// memory.
    pub fn read_stage(&mut self, stage: &str) -> Result<LayerData<'_>> {
        let checkpoint = self.checkpoint;
        let found = checkpoint.stage(stage).ok_or_else(|| Error::NotFound {
            name: format!("stage {stage}"),
            folder: checkpoint.folder().to_owned(),
        })?;
        let names: Vec<&str> = found.tensors.iter().map(String::as_str).collect();
        self.read_tensors(Some(stage), &names)
    }

    /// Reads the named tensors, in the order given, as stage `stage` reads them (a stage a
    /// workspace serves reads its own copies); `None` reads each as its first stage does.
    pub fn read_tensors(&mut self, stage: Option<&str>, names: &[&str]) -> Result<LayerData<'_>> {
        let checkpoint = self.checkpoint;
        let infos = names
            .iter()
            .map(|name| {
                checkpoint
                    .tensor_for(stage, name)
                    .ok_or_else(|| Error::NotFound {
                        name: (*name).to_owned(),
                        folder: checkpoint.folder().to_owned(),
                    })
            })
            .collect::<Result<Vec<&'c TensorInfo>>>()?;
        for info in &infos {
            self.open(&info.file)?;
        }
        match self.strategy {
            ReadStrategy::Pread => self.read_pread(infos),
            ReadStrategy::MmapRelease(_) => self.read_mapped(infos),
        }
    }

    fn open(&mut self, path: &Path) -> Result<()> {
        if self.files.contains_key(path) {
            return Ok(());
        }
        let file = File::open(path).map_err(|e| Error::io("opening", path, e))?;
        let map = match self.strategy {
            ReadStrategy::Pread => None,
            ReadStrategy::MmapRelease(_) => {
                let len = file
                    .metadata()
                    .map_err(|e| Error::io("reading metadata of", path, e))?
                    .len();
                // A mapping of a file that later shrinks faults (SIGBUS) on the lost pages,
                // so refuse a file already shorter than its tensors.
                self.check_length(path, len)?;
                // SAFETY: a shared read-only mapping, owned by this reader. The strategy was
                // made by the unsafe `ReadStrategy::mmap_release`, whose caller promised the
                // file does not change while it is mapped.
                let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("mapping", path, e))?;
                Some(map)
            }
        };
        self.files.insert(path.to_owned(), OpenFile { file, map });
        Ok(())
    }

    fn check_length(&self, path: &Path, len: u64) -> Result<()> {
        let longest = self
            .checkpoint
            .index()
            .tensors()
            .iter()
            .filter(|t| t.file == path)
            .max_by_key(|t| t.data.end);
        match longest {
            Some(tensor) if tensor.data.end > len => Err(Error::Truncated {
                file: path.to_owned(),
                tensor: tensor.name.clone(),
                needed: tensor.data.end,
                actual: len,
            }),
            _ => Ok(()),
        }
    }

    fn read_pread(&mut self, infos: Vec<&'c TensorInfo>) -> Result<LayerData<'_>> {
        let (runs, total, placements) = plan_runs(&infos);
        if self.buffer.len() < total {
            self.buffer.resize(total, 0);
        }
        for run in &runs {
            let Some(open) = self.files.get(&run.file) else {
                continue;
            };
            let len = (run.range.end - run.range.start) as usize;
            let Some(target) = self
                .buffer
                .get_mut(run.buffer_offset..run.buffer_offset + len)
            else {
                continue;
            };
            open.file
                .read_exact_at(target, run.range.start)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        Error::Truncated {
                            file: run.file.clone(),
                            tensor: run.first_tensor.clone(),
                            needed: run.range.end,
                            actual: open.file.metadata().map_or(0, |m| m.len()),
                        }
                    } else {
                        Error::io("reading", &run.file, e)
                    }
                })?;
        }
        let buffer = &self.buffer;
        let tensors = infos
            .into_iter()
            .zip(placements)
            .map(|(info, offset)| TensorView {
                info,
                bytes: buffer
                    .get(offset..offset + info.byte_len() as usize)
                    .unwrap_or_default(),
            })
            .collect();
        Ok(LayerData {
            tensors,
            mapped: Vec::new(),
        })
    }

    fn read_mapped(&mut self, infos: Vec<&'c TensorInfo>) -> Result<LayerData<'_>> {
        let files = &self.files;
        let mut tensors = Vec::with_capacity(infos.len());
        let mut mapped = Vec::with_capacity(infos.len());
        let mut lengths: HashMap<&Path, u64> = HashMap::new();
        for info in infos {
            let Some(open) = files.get(&info.file) else {
                continue;
            };
            let Some(map) = open.map.as_ref() else {
                continue;
            };
            // Touching a mapped page past the end of a file that shrank since it was mapped
            // faults (SIGBUS). Check the length as each layer is read, so a file truncated
            // between layers is an error; the window left is a truncation during the
            // layer's own use, the caller's promise (`ReadStrategy::mmap_release`).
            let len = match lengths.get(info.file.as_path()) {
                Some(len) => *len,
                None => {
                    let len = open
                        .file
                        .metadata()
                        .map_err(|e| Error::io("reading metadata of", &info.file, e))?
                        .len();
                    lengths.insert(&info.file, len);
                    len
                }
            };
            let range = info.data.start as usize..info.data.end as usize;
            let bytes = map
                .get(range.clone())
                .filter(|_| info.data.end <= len)
                .ok_or_else(|| Error::Truncated {
                    file: info.file.clone(),
                    tensor: info.name.clone(),
                    needed: info.data.end,
                    actual: len,
                })?;
            // Fault the whole tensor in with one call and large I/O instead of one page
            // fault at a time. Kernels before 5.14 lack POPULATE_READ and get a read-ahead
            // hint instead.
            if map
                .advise_range(Advice::PopulateRead, range.start, range.len())
                .is_err()
            {
                let _ = map.advise_range(Advice::WillNeed, range.start, range.len());
            }
            tensors.push(TensorView { info, bytes });
            mapped.push((map, range));
        }
        Ok(LayerData { tensors, mapped })
    }
}

/// Sorts the reads by file and offset, merges neighbours into runs, and returns the runs,
/// the buffer size, and each tensor's offset in the buffer (in the order of `infos`).
fn plan_runs(infos: &[&TensorInfo]) -> (Vec<Run>, usize, Vec<usize>) {
    let mut order: Vec<usize> = (0..infos.len()).collect();
    order.sort_by(|&a, &b| {
        let (a, b) = (&infos[a], &infos[b]);
        (&a.file, a.data.start).cmp(&(&b.file, b.data.start))
    });
    let mut runs: Vec<Run> = Vec::new();
    let mut placements = vec![0usize; infos.len()];
    let mut total = 0usize;
    for i in order {
        let info = infos[i];
        let extends_last = runs.last().is_some_and(|run| {
            run.file == info.file && info.data.start <= run.range.end.saturating_add(COALESCE_GAP)
        });
        if !extends_last {
            runs.push(Run {
                file: info.file.clone(),
                range: info.data.clone(),
                buffer_offset: total,
                first_tensor: info.name.clone(),
            });
            total += info.byte_len() as usize;
        }
        if let Some(run) = runs.last_mut() {
            if info.data.end > run.range.end {
                total += (info.data.end - run.range.end) as usize;
                run.range.end = info.data.end;
            }
            placements[i] = run.buffer_offset + (info.data.start - run.range.start) as usize;
        }
    }
    (runs, total, placements)
}

/// The tensors of one layer, valid until dropped.
pub struct LayerData<'r> {
    tensors: Vec<TensorView<'r>>,
    /// Mapped ranges to release on drop (empty for `pread`).
    mapped: Vec<(&'r Mmap, Range<usize>)>,
}

impl LayerData<'_> {
    /// The tensors, in the order they were asked for.
    pub fn tensors(&self) -> &[TensorView<'_>] {
        &self.tensors
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&TensorView<'_>> {
        self.tensors.iter().find(|t| t.name() == name)
    }

    /// Total bytes of the layer's tensors.
    pub fn byte_len(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.info.byte_len())
            .fold(0, u64::saturating_add)
    }
}

impl Drop for LayerData<'_> {
    fn drop(&mut self) {
        for (map, range) in &self.mapped {
            // SAFETY: the mapping is a shared read-only file mapping and every slice into
            // this range lives in `self.tensors`, which is being dropped, so nothing borrows
            // the pages. For a file mapping DONTNEED only drops the pages from this process;
            // a later access reads the same bytes back from the file.
            let _ = unsafe {
                map.unchecked_advise_range(UncheckedAdvice::DontNeed, range.start, range.len())
            };
        }
    }
}

/// One tensor's bytes as stored, with its name, dtype and shape.
pub struct TensorView<'r> {
    info: &'r TensorInfo,
    bytes: &'r [u8],
}

impl<'r> TensorView<'r> {
    /// A view of `bytes` read for `info` outside a [`LayerReader`].
    pub(crate) fn detached(info: &'r TensorInfo, bytes: &'r [u8]) -> Self {
        TensorView { info, bytes }
    }
}

impl TensorView<'_> {
    /// Its name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Its stored dtype.
    pub fn dtype(&self) -> StoredDType {
        self.info.dtype
    }

    /// Its shape.
    pub fn shape(&self) -> &[usize] {
        &self.info.shape
    }

    /// Where it came from.
    pub fn info(&self) -> &TensorInfo {
        self.info
    }

    /// Its bytes, little-endian, as stored.
    pub fn bytes(&self) -> &[u8] {
        self.bytes
    }

    /// Its bytes in `dtype`: borrowed when it is already stored so, converted when both are
    /// floats, refused otherwise (integer tensors are passed through, never cast).
    pub fn to_dtype(&self, dtype: StoredDType) -> Result<Cow<'_, [u8]>> {
        if dtype == self.info.dtype {
            return Ok(Cow::Borrowed(self.bytes));
        }
        let mut out = Vec::new();
        convert_into(self.name(), self.bytes, self.info.dtype, dtype, &mut out)?;
        Ok(Cow::Owned(out))
    }

    /// Its values as `f32`, for float tensors.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>> {
        to_f32_vec(self.name(), self.bytes, self.info.dtype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_neighbours_and_keeps_order() {
        let a = TensorInfo::new("a", Path::new("f"), StoredDType::U8, vec![4], 100..104);
        let b = TensorInfo::new("b", Path::new("f"), StoredDType::U8, vec![4], 0..4);
        let far = TensorInfo::new(
            "c",
            Path::new("f"),
            StoredDType::U8,
            vec![4],
            1 << 30..(1 << 30) + 4,
        );
        let other = TensorInfo::new("d", Path::new("g"), StoredDType::U8, vec![4], 0..4);
        let (runs, total, placements) = plan_runs(&[&a, &b, &far, &other]);
        assert_eq!(runs.len(), 3);
        assert_eq!(runs[0].range, 0..104);
        assert_eq!(total, 104 + 4 + 4);
        assert_eq!(placements, [100, 0, 104, 108]);
    }
}
