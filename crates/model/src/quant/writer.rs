//! Quantizing a whole checkpoint, stage by stage, into auto-round's checkpoint format.

use std::borrow::Cow;
use std::fs::{self, File};
use std::io::Write;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use half::f16;
use serde_json::{json, Map, Value};

use super::layout::Layout;
use super::resume::{self, StageRecord, Start, WrittenTensor};
use super::{quantize_rtn, Error, GroupSize, QuantScheme};
use crate::checkpoint::{Checkpoint, LayerReader, ReadStrategy, StoredDType as DType, TensorInfo};
use crate::error::Error as ReadError;
use crate::plan::RUNTIME_FLOOR;
use crate::workspace::remove_if_present;

/// The auto-round release whose model-free round-to-nearest output memwise reproduces bit for
/// bit; written as `autoround_version`, so that readers pick the layout it stands for.
pub const AUTO_ROUND_VERSION: &str = "0.16.1";

/// Checkpoint formats memwise can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExportFormat {
    /// auto-round's own format (`quant_method: auto-round`): `auto_round:auto_gptq` packing
    /// for symmetric schemes, `auto_round` for asymmetric ones.
    AutoRound,
}

impl ExportFormat {
    /// Reads a format name, refusing any memwise does not write with an error naming it.
    pub fn parse(name: &str) -> Result<ExportFormat, Error> {
        match name {
            "auto_round" => Ok(ExportFormat::AutoRound),
            other => Err(Error::ExportFormat(other.to_owned())),
        }
    }
}

/// What [`quantize_checkpoint`] writes. Every value in it is valid by construction, so a
/// bad option is refused before any file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeOptions {
    scheme: QuantScheme,
    format: ExportFormat,
    pub(super) max_shard_bytes: NonZeroU64,
}

impl QuantizeOptions {
    /// The shard size Hugging Face writes by default (5 GB).
    pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

    /// Options for `scheme` in auto-round's format, in shards of at most 5 GB.
    pub fn new(scheme: QuantScheme) -> QuantizeOptions {
        QuantizeOptions {
            scheme,
            format: ExportFormat::AutoRound,
            max_shard_bytes: NonZeroU64::new(Self::DEFAULT_MAX_SHARD_BYTES)
                .unwrap_or(NonZeroU64::MIN),
        }
    }

    /// Options from the values a user types: `bits`, auto-round's `group_size` (-1 per
    /// channel) and an export format name. The first bad value is refused with an error
    /// naming it.
    ///
    /// ```
    /// use memwise_model::quant::QuantizeOptions;
    ///
    /// assert!(QuantizeOptions::from_values(4, 128, true, "auto_round").is_ok());
    /// let err = QuantizeOptions::from_values(5, 128, true, "auto_round").unwrap_err();
    /// assert!(err.to_string().contains("bits 5"));
    /// let err = QuantizeOptions::from_values(4, 0, true, "auto_round").unwrap_err();
    /// assert!(err.to_string().contains("group size 0"));
    /// let err = QuantizeOptions::from_values(4, 128, true, "gguf").unwrap_err();
    /// assert!(err.to_string().contains("gguf"));
    /// ```
    pub fn from_values(
        bits: u8,
        group_size: i64,
        sym: bool,
        format: &str,
    ) -> Result<QuantizeOptions, Error> {
        let scheme = QuantScheme::new(bits, GroupSize::from_auto_round(group_size)?, sym)?;
        let format = ExportFormat::parse(format)?;
        Ok(QuantizeOptions {
            format,
            ..QuantizeOptions::new(scheme)
        })
    }

    /// Splits the weights into shards of at most this many bytes (a tensor larger than that
    /// gets a shard of its own).
    pub fn max_shard_bytes(mut self, bytes: NonZeroU64) -> QuantizeOptions {
        self.max_shard_bytes = bytes;
        self
    }

    /// The scheme.
    pub fn scheme(&self) -> &QuantScheme {
        &self.scheme
    }

    /// The export format.
    pub fn format(&self) -> ExportFormat {
        self.format
    }
}

/// What [`quantize_checkpoint`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuantizeReport {
    /// The finished model folder.
    pub folder: PathBuf,
    /// Linear weights quantized (each written as `qweight`, `qzeros` and `scales`).
    pub quantized: usize,
    /// Tensors written as they were stored (embeddings, norms, `lm_head`, ...).
    pub kept: usize,
    /// Weight files written.
    pub shards: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Whether an interrupted run was continued, and how many of its stages were kept.
    pub start: Start,
}

/// What happened, reported to [`quantize_checkpoint_with`]'s callback as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuantizeEvent {
    /// The run began, afresh or continuing an interrupted one (first event, once).
    Started(Start),
    /// A stage finished by an interrupted run was verified and kept.
    StageReused,
    /// A tensor of the stage being quantized was quantized or kept.
    TensorDone(String),
    /// The stage's file was written and recorded.
    StageWritten,
    /// Every stage is done; the shards, index and configs are being written.
    Finishing,
}

/// Progress of [`quantize_checkpoint_with`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuantizeProgress {
    /// The stage (`model.layers.3`; empty for [`QuantizeEvent::Started`] and
    /// [`QuantizeEvent::Finishing`]).
    pub stage: String,
    /// What happened.
    pub event: QuantizeEvent,
    /// Stages finished so far.
    pub stages_done: usize,
    /// Stages in all.
    pub stages_total: usize,
    /// Source bytes handled so far.
    pub bytes_done: u64,
    /// Source bytes in all stages.
    pub bytes_total: u64,
}

/// Quantizes the model folder `source` into a new folder `out`, reading one stage at a time.
///
/// The linear weights of the decoder blocks (2-D float `*.weight` tensors in a block stage)
/// are quantized with [`quantize_rtn`] and packed as auto-round packs them; every other
/// tensor (embeddings, norms, `lm_head`) is written as stored, and a head tied to the
/// embeddings stays tied (not written). The folder gets the weights (`model.safetensors`,
/// or shards and `model.safetensors.index.json`), `config.json` with a
/// `quantization_config`, `quantization_config.json`, and a copy of every other file of
/// `source` (tokenizer, generation config, ...). It is built in a sibling folder and renamed
/// into place when complete, so `out` either does not exist or is whole; an existing `out`
/// is refused.
///
/// Every output tensor's shard and offset follow from the stored shapes and the scheme, so
/// they are fixed before any weight is read: each stage writes its tensors once, straight
/// into the shards in the sibling folder, and syncs them. The linears are quantized,
/// packed and dequantized on every core the process may use, rows split between threads
/// (the result does not depend on how many).
///
/// Resumable: a progress record beside the shards (rewritten atomically after each stage)
/// lists every finished stage with the checksum of its bytes, the source's fingerprint and
/// the options. After
/// a crash, a run with the same source and options verifies the finished stages and
/// continues after the last good one; another source, a changed one or other options start
/// over. [`QuantizeReport::start`] says which. The output is the same, byte for byte, either
/// way.
///
/// For Llama-family decoders this is exactly what auto-round's model-free round-to-nearest
/// writes, tensor for tensor (`tests/quantize.rs` checks it against auto-round's output).
pub fn quantize_checkpoint(
    source: impl AsRef<Path>,
    out: impl AsRef<Path>,
    options: &QuantizeOptions,
) -> Result<QuantizeReport, Error> {
    quantize_checkpoint_with(source, out, options, &mut |_| {})
}

/// [`quantize_checkpoint`], calling `progress` as each tensor and stage is done.
///
/// ```
/// use memwise_model::quant::{quantize_checkpoint_with, QuantizeEvent, QuantizeOptions, Start};
///
/// let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/quant/llama-bf16");
/// let out = tempfile::tempdir()?.keep().join("llama-bf16-w4g32");
/// let options = QuantizeOptions::from_values(4, 32, true, "auto_round")?;
/// let mut written = 0;
/// let report = quantize_checkpoint_with(source, &out, &options, &mut |p| {
///     if p.event == QuantizeEvent::StageWritten {
///         written += 1;
///         assert_eq!(p.stages_done, written);
///     }
/// })?;
/// assert_eq!(report.start, Start::Fresh);
/// assert!(written > 2);
/// # std::fs::remove_dir_all(out.parent().unwrap())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn quantize_checkpoint_with(
    source: impl AsRef<Path>,
    out: impl AsRef<Path>,
    options: &QuantizeOptions,
    progress: &mut dyn FnMut(&QuantizeProgress),
) -> Result<QuantizeReport, Error> {
    let (source, out) = (source.as_ref(), out.as_ref());
    if out.exists() {
        return Err(Error::OutputExists(out.to_owned()));
    }
    let checkpoint = Checkpoint::open(source)?;
    let partial = partial_folder(out)?;
    let groups = tensor_groups(&checkpoint);
    let names: Vec<String> = groups.iter().map(|g| g.stage.clone()).collect();
    let planned = groups
        .iter()
        .map(|g| planned_tensors(g, &options.scheme))
        .collect::<Result<Vec<_>, Error>>()?;
    let layout = Layout::new(planned, options.max_shard_bytes.get())?;
    let shard_names: Vec<String> = layout.shards.iter().map(|s| s.name.clone()).collect();
    let verify = |i: usize, stage: &StageRecord| {
        if stage.tensors != layout.stages[i] {
            return Some(format!(
                "stage {} was recorded with other tensors",
                stage.stage
            ));
        }
        match layout.checksum_stage(&partial, i) {
            Ok(found) if found == (stage.bytes, stage.checksum.clone()) => None,
            Ok(_) => Some(format!(
                "stage {}'s bytes do not match its checksum",
                stage.stage
            )),
            Err(problem) => Some(problem),
        }
    };
    let expected = resume::Expected {
        stages: &names,
        files: &shard_names,
        verify: &verify,
    };
    let (mut record, start) = resume::prepare(&partial, &checkpoint, options, &expected)?;
    let files = layout.open(&partial)?;

    let mut state = QuantizeProgress {
        stage: String::new(),
        event: QuantizeEvent::Started(start.clone()),
        stages_done: 0,
        stages_total: groups.len(),
        bytes_done: 0,
        bytes_total: groups.iter().map(|g| g.bytes).fold(0, u64::saturating_add),
    };
    progress(&state);
    for group in groups.iter().take(record.stages.len()) {
        state.stage.clone_from(&group.stage);
        state.event = QuantizeEvent::StageReused;
        state.stages_done += 1;
        state.bytes_done = state.bytes_done.saturating_add(group.bytes);
        progress(&state);
    }
    let mut reader = checkpoint.reader(ReadStrategy::Pread);
    let target = StageTarget {
        partial: &partial,
        layout: &layout,
        files: &files,
    };
    for (i, group) in groups.iter().enumerate().skip(record.stages.len()) {
        state.stage.clone_from(&group.stage);
        let stage_start = state.bytes_done;
        let entry = quantize_stage(
            &mut reader,
            i,
            group,
            &options.scheme,
            &target,
            &mut |name, done| {
                state.event = QuantizeEvent::TensorDone(name.to_owned());
                state.bytes_done = stage_start.saturating_add(done);
                progress(&state);
            },
        )?;
        record.stages.push(entry);
        record.save(&partial)?;
        state.event = QuantizeEvent::StageWritten;
        state.stages_done += 1;
        state.bytes_done = stage_start.saturating_add(group.bytes);
        progress(&state);
    }
    drop(files);
    state.stage.clear();
    state.event = QuantizeEvent::Finishing;
    progress(&state);

    if let Some(index) = layout.index() {
        write_json(&partial.join("model.safetensors.index.json"), &index)?;
    }
    let (shard_count, bytes) = (layout.shards.len(), layout.data_bytes());
    let quantized_layers: Vec<String> = record
        .stages
        .iter()
        .flat_map(|s| s.quantized.iter().cloned())
        .collect();
    let kept_matrices: Vec<String> = record
        .stages
        .iter()
        .flat_map(|s| s.kept_matrices.iter().cloned())
        .collect();
    let quantization_config = quantization_config(options, &quantized_layers, &kept_matrices);
    let mut config = checkpoint.config().raw.clone();
    if let Some(object) = config.as_object_mut() {
        object.insert("quantization_config".into(), quantization_config.clone());
    }
    write_json(&partial.join("config.json"), &config)?;
    write_json(
        &partial.join("quantization_config.json"),
        &quantization_config,
    )?;
    copy_other_files(source, &partial)?;
    remove_if_present(&partial.join(resume::RECORD_FILE))?;
    sync_folder(&partial)?;
    fs::rename(&partial, out).map_err(|e| ReadError::io("renaming into place", out, e))?;
    if let Some(parent) = out.parent() {
        sync_folder(parent)?;
    }
    Ok(QuantizeReport {
        folder: out.to_owned(),
        quantized: quantized_layers.len(),
        kept: record.stages.iter().map(|s| s.kept).sum(),
        shards: shard_count,
        bytes,
        start,
    })
}

/// The tensors one stage reads first, quantized or written as stored in the order read.
struct Group<'c> {
    /// The stage's name (`model.layers.3`), or `(not read by any stage)`.
    stage: String,
    /// Whether the stage is a repeated block, whose linear weights are quantized.
    in_block: bool,
    tensors: Vec<&'c TensorInfo>,
    /// Source bytes of those tensors.
    bytes: u64,
}

/// Every stored tensor once, stage by stage (each with the stage that reads it first), then
/// those no stage reads.
fn tensor_groups(checkpoint: &Checkpoint) -> Vec<Group<'_>> {
    let index = checkpoint.index();
    let group = |stage: String, in_block: bool, names: Vec<&str>| {
        let tensors: Vec<&TensorInfo> = names.iter().filter_map(|n| index.get(n)).collect();
        let bytes = tensors.iter().map(|t| t.byte_len()).sum();
        Group {
            stage,
            in_block,
            tensors,
            bytes,
        }
    };
    let mut groups: Vec<Group<'_>> = checkpoint
        .stages()
        .iter()
        .map(|stage| {
            let in_block = stage
                .name
                .split('.')
                .any(|part| part.parse::<usize>().is_ok());
            let own = stage
                .tensors
                .iter()
                .map(String::as_str)
                .filter(|name| checkpoint.first_reader(name) == Some(stage.name.as_str()))
                .collect();
            group(stage.name.clone(), in_block, own)
        })
        .collect();
    let unread = index
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|name| checkpoint.first_reader(name).is_none())
        .collect();
    groups.push(group("(not read by any stage)".to_owned(), false, unread));
    groups
}

/// The output and input dimensions of a tensor that is quantized: a 2-D float `*.weight` of
/// a block stage.
fn linear_dims(in_block: bool, info: &TensorInfo) -> Option<(&str, usize, usize)> {
    match (info.name.strip_suffix(".weight"), info.shape.as_slice()) {
        (Some(module), &[out_features, in_features]) if in_block && info.dtype.is_float() => {
            Some((module, out_features, in_features))
        }
        _ => None,
    }
}

/// Where a stage's output goes: the shard files open in `partial`, laid out by `layout`.
struct StageTarget<'a> {
    partial: &'a Path,
    layout: &'a Layout,
    files: &'a [File],
}

/// The tensors stage `group` will write, in order: what [`quantize_stage`] writes, known from
/// the stored shapes alone (a linear that cannot be packed is refused here, before any
/// weight is read).
fn planned_tensors(group: &Group<'_>, scheme: &QuantScheme) -> Result<Vec<WrittenTensor>, Error> {
    let mut planned = Vec::new();
    for info in group.tensors.iter().filter(|t| t.tied_to.is_none()) {
        let Some((module, out_features, in_features)) = linear_dims(group.in_block, info) else {
            planned.push(WrittenTensor {
                name: info.name.clone(),
                dtype: info.dtype.safetensors_name().to_owned(),
                shape: info.shape.clone(),
                bytes: info.byte_len(),
            });
            continue;
        };
        let [qweight, qzeros, scales] = scheme
            .packed_shapes(out_features, in_features)
            .map_err(|source| Error::in_tensor(&info.name, source))?;
        for (suffix, dtype, shape) in [
            ("qweight", DType::I32, qweight),
            ("qzeros", DType::I32, qzeros),
            ("scales", DType::F16, scales),
        ] {
            planned.push(WrittenTensor {
                name: format!("{module}.{suffix}"),
                dtype: dtype.safetensors_name().to_owned(),
                shape: shape.to_vec(),
                bytes: dtype.byte_len(&shape).unwrap_or(u64::MAX),
            });
        }
    }
    Ok(planned)
}

/// Reads the tensors of `group`, quantizes its linears, and writes the result into the
/// shards at the places the layout gave them, synced; `done` is told each tensor's name and
/// the source bytes of the stage handled so far.
fn quantize_stage(
    reader: &mut LayerReader<'_>,
    index: usize,
    group: &Group<'_>,
    scheme: &QuantScheme,
    target: &StageTarget<'_>,
    done: &mut dyn FnMut(&str, u64),
) -> Result<StageRecord, Error> {
    let names: Vec<&str> = group.tensors.iter().map(|t| t.name.as_str()).collect();
    let data = reader.read_tensors(None, &names)?;
    let mut parts: Vec<Cow<'_, [u8]>> = Vec::new();
    let mut tensors = Vec::new();
    let (mut quantized, mut kept_matrices, mut kept) = (Vec::new(), Vec::new(), 0);
    let mut bytes_done = 0u64;
    for tensor in data.tensors() {
        let info = tensor.info();
        bytes_done = bytes_done.saturating_add(info.byte_len());
        if info.tied_to.is_some() {
            continue; // a tied head: the embedding is written once, as auto-round does
        }
        let name = tensor.name();
        let Some((module, out_features, in_features)) = linear_dims(group.in_block, info) else {
            if tensor.shape().len() >= 2 {
                if let Some(module) = name.strip_suffix(".weight") {
                    kept_matrices.push(module.to_owned());
                }
            }
            let (dtype, shape) = (tensor.dtype(), tensor.shape().to_vec());
            let bytes = Cow::Borrowed(tensor.bytes());
            add(
                &mut parts,
                &mut tensors,
                name.to_owned(),
                dtype,
                shape,
                bytes,
            );
            kept += 1;
            done(name, bytes_done);
            continue;
        };
        let values = f32_values(tensor)?;
        let packed = quantize_rtn(&values, out_features, in_features, scheme)
            .map_err(|e| Error::in_tensor(name, e))?
            .pack();
        drop(values);
        let qweight = le_bytes(packed.qweight(), i32::to_le_bytes);
        let qzeros = le_bytes(packed.qzeros(), i32::to_le_bytes);
        let scales = le_bytes(packed.scales(), f16::to_le_bytes);
        for (suffix, dtype, shape, bytes) in [
            ("qweight", DType::I32, packed.qweight_shape(), qweight),
            ("qzeros", DType::I32, packed.qzeros_shape(), qzeros),
            ("scales", DType::F16, packed.scales_shape(), scales),
        ] {
            let name = format!("{module}.{suffix}");
            add(
                &mut parts,
                &mut tensors,
                name,
                dtype,
                shape.to_vec(),
                Cow::Owned(bytes),
            );
        }
        quantized.push(module.to_owned());
        done(name, bytes_done);
    }
    let slices: Vec<&[u8]> = parts.iter().map(|p| p.as_ref()).collect();
    let (bytes, checksum) =
        target
            .layout
            .write_stage(target.partial, target.files, index, &tensors, &slices)?;
    Ok(StageRecord {
        stage: group.stage.clone(),
        bytes,
        checksum,
        tensors,
        quantized,
        kept_matrices,
        kept,
    })
}

/// Adds a tensor's bytes to a stage's parts and its description to the stage's record.
fn add<'d>(
    parts: &mut Vec<Cow<'d, [u8]>>,
    tensors: &mut Vec<WrittenTensor>,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: Cow<'d, [u8]>,
) {
    tensors.push(WrittenTensor {
        name,
        dtype: dtype.safetensors_name().to_owned(),
        shape,
        bytes: bytes.len() as u64,
    });
    parts.push(bytes);
}

fn le_bytes<T: Copy, const N: usize>(values: &[T], to_bytes: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| to_bytes(v)).collect()
}

/// The memory [`quantize_checkpoint`] is planned to need at its peak: the stage whose
/// tensors as read, quantized output and working copies add up to the most, plus the
/// runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QuantizePlan {
    /// The stage at which the peak falls.
    pub stage: String,
    /// Its tensors as read from the source, held until its file is written (kept tensors
    /// are written straight from them).
    pub read_bytes: u64,
    /// Its quantized output (`qweight`, `qzeros`, `scales`), held until its file is written.
    pub output_bytes: u64,
    /// While its largest linear is quantized: the `f32` copy of the weight, one byte per
    /// code (input padded to whole groups), the packed weight and its bytes being copied
    /// out.
    pub working_bytes: u64,
    /// The process before any weight is read ([`RUNTIME_FLOOR`]).
    pub runtime_bytes: u64,
    /// The sum of the above.
    pub peak_bytes: u64,
}

/// Plans the peak memory of quantizing `source` with `options` (see [`QuantizePlan`]),
/// reading only the checkpoint's headers.
///
/// ```
/// use memwise_model::quant::{plan_quantization, QuantizeOptions};
///
/// let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/quant/llama-bf16");
/// let options = QuantizeOptions::from_values(4, 32, true, "auto_round")?;
/// let plan = plan_quantization(source, &options)?;
/// assert!(plan.read_bytes > 0);
/// assert_eq!(
///     plan.peak_bytes,
///     plan.read_bytes + plan.output_bytes + plan.working_bytes + plan.runtime_bytes
/// );
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn plan_quantization(
    source: impl AsRef<Path>,
    options: &QuantizeOptions,
) -> Result<QuantizePlan, Error> {
    let checkpoint = Checkpoint::open(source)?;
    let scheme = options.scheme;
    let mut best: Option<QuantizePlan> = None;
    for group in tensor_groups(&checkpoint) {
        let (mut output, mut working) = (0u64, 0u64);
        for info in group.tensors.iter().filter(|t| t.tied_to.is_none()) {
            if let Some((_, out_features, in_features)) = linear_dims(group.in_block, info) {
                let packed = packed_bytes(&scheme, out_features, in_features)
                    .map_err(|source| Error::in_tensor(&info.name, source))?;
                let padded_in = scheme.padded_in(in_features) as u64;
                let values = 4 * out_features as u64 * in_features as u64;
                let codes = out_features as u64 * padded_in;
                output += packed;
                working = working.max(values + codes + 2 * packed);
            }
        }
        let plan = QuantizePlan {
            stage: group.stage,
            read_bytes: group.bytes,
            output_bytes: output,
            working_bytes: working,
            runtime_bytes: RUNTIME_FLOOR,
            peak_bytes: group.bytes + output + working + RUNTIME_FLOOR,
        };
        if best.as_ref().is_none_or(|b| plan.peak_bytes > b.peak_bytes) {
            best = Some(plan);
        }
    }
    Ok(best.unwrap_or(QuantizePlan {
        stage: String::new(),
        read_bytes: 0,
        output_bytes: 0,
        working_bytes: 0,
        runtime_bytes: RUNTIME_FLOOR,
        peak_bytes: RUNTIME_FLOOR,
    }))
}

/// Bytes of a packed `out_features × in_features` weight: `qweight`, `qzeros` and `scales`.
fn packed_bytes(
    scheme: &QuantScheme,
    out_features: usize,
    in_features: usize,
) -> Result<u64, Error> {
    let [qweight, qzeros, scales] = scheme.packed_shapes(out_features, in_features)?;
    let elements = |[rows, cols]: [usize; 2]| rows as u64 * cols as u64;
    Ok(4 * elements(qweight) + 4 * elements(qzeros) + 2 * elements(scales))
}

/// The sibling folder a run builds `out` in.
/// A float weight's values as f32: the stored bytes themselves for an f32 tensor whose
/// bytes are aligned (no copy of the largest linear beside the stage already read), a
/// converted copy otherwise.
fn f32_values<'t>(
    tensor: &'t crate::checkpoint::TensorView<'_>,
) -> Result<std::borrow::Cow<'t, [f32]>, Error> {
    if cfg!(target_endian = "little") && tensor.dtype() == crate::checkpoint::StoredDType::F32 {
        // SAFETY: every bit pattern is a valid f32, and `align_to` only returns a middle
        // slice of correctly aligned, whole f32s; the bytes are little-endian f32 as stored.
        let (head, values, tail) = unsafe { tensor.bytes().align_to::<f32>() };
        if head.is_empty() && tail.is_empty() {
            return Ok(std::borrow::Cow::Borrowed(values));
        }
    }
    Ok(std::borrow::Cow::Owned(tensor.to_f32_vec()?))
}

fn partial_folder(out: &Path) -> Result<PathBuf, Error> {
    let name = out
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::OutputName(out.to_owned()))?;
    Ok(out.with_file_name(format!(".{name}.memwise-partial")))
}

/// auto-round's `quantization_config` for a model-free round-to-nearest run.
fn quantization_config(options: &QuantizeOptions, quantized: &[String], kept: &[String]) -> Value {
    let scheme = options.scheme;
    let mut config = json!({
        "quant_method": "auto-round",
        "packing_format": scheme.packing_format().name(),
        "bits": scheme.bits(),
        "group_size": scheme.group_size().to_auto_round(),
        "sym": scheme.sym(),
        "data_type": "int",
        "iters": 0,
        "model_free": true,
        "autoround_version": AUTO_ROUND_VERSION,
    });
    // The block prefixes: the name up to the first numeric part ("model.layers").
    let mut blocks: Vec<String> = Vec::new();
    for layer in quantized {
        let parts: Vec<&str> = layer.split('.').collect();
        if let Some(i) = (1..parts.len())
            .find(|&i| parts[i].bytes().all(|b| b.is_ascii_digit()) && !parts[i].is_empty())
        {
            let prefix = parts[..i].join(".");
            if !blocks.contains(&prefix) {
                blocks.push(prefix);
            }
        }
    }
    let mut extra = Map::new();
    for layer in kept {
        // auto-round lists kept matrices as full precision, except embeddings and convolutions.
        if !layer.contains("embed") && !layer.contains("conv") {
            extra.insert(layer.clone(), json!({"bits": 16, "data_type": "float"}));
        }
    }
    if let Some(object) = config.as_object_mut() {
        if !blocks.is_empty() {
            object.insert(
                "block_name_to_quantize".into(),
                Value::String(blocks.join(",")),
            );
        }
        if !extra.is_empty() {
            object.insert("extra_config".into(), Value::Object(extra));
        }
    }
    config
}

fn write_json(path: &Path, value: &Value) -> Result<(), Error> {
    let mut text =
        serde_json::to_vec_pretty(value).map_err(|e| ReadError::io("writing", path, e.into()))?;
    text.push(b'\n');
    write_file(path, &text)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut file = File::create(path).map_err(|e| ReadError::io("creating", path, e))?;
    file.write_all(bytes)
        .map_err(|e| ReadError::io("writing", path, e))?;
    file.sync_all()
        .map_err(|e| ReadError::io("syncing", path, e))?;
    Ok(())
}

fn sync_folder(folder: &Path) -> Result<(), Error> {
    File::open(folder)
        .and_then(|f| f.sync_all())
        .map_err(|e| ReadError::io("syncing", folder, e).into())
}

/// Files of `source` the quantized folder keeps as they are: everything but the weights
/// and the configs memwise rewrites (sub-folders are not copied).
fn copy_other_files(source: &Path, dest: &Path) -> Result<(), Error> {
    let entries = fs::read_dir(source).map_err(|e| ReadError::io("listing", source, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| ReadError::io("listing", source, e))?;
        let name = entry.file_name();
        let Some(text) = name.to_str() else { continue };
        let weights = [".safetensors", ".bin", ".pt", ".pth", ".index.json"]
            .iter()
            .any(|suffix| text.ends_with(suffix));
        let rewritten = matches!(
            text,
            "config.json" | "quantization_config.json" | "quant_config.json"
        );
        let path = entry.path();
        if weights || rewritten || !path.is_file() {
            continue;
        }
        let target = dest.join(&name);
        fs::copy(&path, &target).map_err(|e| ReadError::io("copying", &path, e))?;
    }
    Ok(())
}
