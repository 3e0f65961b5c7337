//! Quantizing a whole checkpoint, stage by stage, into auto-round's checkpoint format.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::{quantize_rtn, Error, GroupSize, QuantScheme};
use crate::checkpoint::{
    encode_header, Checkpoint, ReadStrategy, StoredDType as DType, TensorHeader,
};
use crate::error::Error as ReadError;

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
    max_shard_bytes: NonZeroU64,
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
/// For Llama-family decoders this is exactly what auto-round's model-free round-to-nearest
/// writes, tensor for tensor (`tests/quantize.rs` checks it against auto-round's output).
pub fn quantize_checkpoint(
    source: impl AsRef<Path>,
    out: impl AsRef<Path>,
    options: &QuantizeOptions,
) -> Result<QuantizeReport, Error> {
    let (source, out) = (source.as_ref(), out.as_ref());
    if out.exists() {
        return Err(Error::OutputExists(out.to_owned()));
    }
    let checkpoint = Checkpoint::open(source)?;
    let partial = partial_folder(out)?;
    if partial.exists() {
        // Left by an interrupted run of ours: its name is ours alone.
        fs::remove_dir_all(&partial).map_err(|e| ReadError::io("removing", &partial, e))?;
    }
    fs::create_dir_all(&partial).map_err(|e| ReadError::io("creating", &partial, e))?;

    let scheme = options.scheme;
    let mut shards = ShardWriter::new(&partial, options.max_shard_bytes.get());
    let mut quantized_layers = Vec::new();
    let mut kept_matrices = Vec::new();
    let (mut quantized, mut kept) = (0, 0);
    let mut reader = checkpoint.reader(ReadStrategy::Pread);
    for (in_block, names) in tensor_groups(&checkpoint) {
        let data = reader.read_tensors(None, &names)?;
        for tensor in data.tensors() {
            let info = tensor.info();
            if info.tied_to.is_some() {
                continue; // a tied head: the embedding is written once, as auto-round does
            }
            let name = tensor.name();
            let linear = match (name.strip_suffix(".weight"), tensor.shape()) {
                (Some(module), &[out_features, in_features])
                    if in_block && tensor.dtype().is_float() =>
                {
                    Some((module, out_features, in_features))
                }
                _ => None,
            };
            let Some((module, out_features, in_features)) = linear else {
                if tensor.shape().len() >= 2 {
                    if let Some(module) = name.strip_suffix(".weight") {
                        kept_matrices.push(module.to_owned());
                    }
                }
                shards.add(name, tensor.dtype(), tensor.shape(), tensor.bytes())?;
                kept += 1;
                continue;
            };
            let values = tensor.to_f32_vec()?;
            let packed = quantize_rtn(&values, out_features, in_features, &scheme)
                .map_err(|e| Error::in_tensor(name, e))?
                .pack();
            drop(values);
            let qweight: Vec<u8> = packed
                .qweight()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let qzeros: Vec<u8> = packed
                .qzeros()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            let scales: Vec<u8> = packed
                .scales()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            shards.add(
                &format!("{module}.qweight"),
                DType::I32,
                &packed.qweight_shape(),
                &qweight,
            )?;
            shards.add(
                &format!("{module}.qzeros"),
                DType::I32,
                &packed.qzeros_shape(),
                &qzeros,
            )?;
            shards.add(
                &format!("{module}.scales"),
                DType::F16,
                &packed.scales_shape(),
                &scales,
            )?;
            quantized_layers.push(module.to_owned());
            quantized += 1;
        }
    }
    let (shard_count, bytes) = shards.finish()?;

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
    sync_folder(&partial)?;
    fs::rename(&partial, out).map_err(|e| ReadError::io("renaming into place", out, e))?;
    if let Some(parent) = out.parent() {
        sync_folder(parent)?;
    }
    Ok(QuantizeReport {
        folder: out.to_owned(),
        quantized,
        kept,
        shards: shard_count,
        bytes,
    })
}

/// Every stored tensor once, stage by stage (each with the stage that reads it first), then
/// those no stage reads; with whether the group is a repeated block (`model.layers.3`),
/// whose linear weights are the ones quantized.
fn tensor_groups(checkpoint: &Checkpoint) -> Vec<(bool, Vec<&str>)> {
    let mut groups: Vec<(bool, Vec<&str>)> = checkpoint
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
            (in_block, own)
        })
        .collect();
    let unread = checkpoint
        .index()
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .filter(|name| checkpoint.first_reader(name).is_none())
        .collect();
    groups.push((false, unread));
    groups
}

/// The sibling folder a run builds `out` in.
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

/// Writes tensors into safetensors shards of bounded size, holding no tensor in memory: each
/// shard's data goes to a side file, and the shard is its header followed by that data.
struct ShardWriter<'a> {
    folder: &'a Path,
    max_bytes: u64,
    /// Finished shards: temporary file name and the tensors in it.
    done: Vec<(PathBuf, Vec<String>)>,
    current: Vec<(String, DType, Vec<usize>)>,
    current_bytes: u64,
    data: Option<BufWriter<File>>,
    total: u64,
}

impl<'a> ShardWriter<'a> {
    fn new(folder: &'a Path, max_bytes: u64) -> Self {
        ShardWriter {
            folder,
            max_bytes,
            done: Vec::new(),
            current: Vec::new(),
            current_bytes: 0,
            data: None,
            total: 0,
        }
    }

    fn data_path(&self) -> PathBuf {
        self.folder.join(format!("shard-{}.data", self.done.len()))
    }

    fn add(
        &mut self,
        name: &str,
        dtype: DType,
        shape: &[usize],
        bytes: &[u8],
    ) -> Result<(), Error> {
        let len = bytes.len() as u64;
        if !self.current.is_empty() && self.current_bytes.saturating_add(len) > self.max_bytes {
            self.close_shard()?;
        }
        let path = self.data_path();
        let data = match &mut self.data {
            Some(data) => data,
            None => {
                let file = File::create(&path).map_err(|e| ReadError::io("creating", &path, e))?;
                self.data.insert(BufWriter::with_capacity(1 << 20, file))
            }
        };
        data.write_all(bytes)
            .map_err(|e| ReadError::io("writing", &path, e))?;
        self.current.push((name.to_owned(), dtype, shape.to_vec()));
        self.current_bytes += len;
        self.total += len;
        Ok(())
    }

    fn close_shard(&mut self) -> Result<(), Error> {
        let data_path = self.data_path();
        let shard_path = self
            .folder
            .join(format!("shard-{}.safetensors", self.done.len()));
        if let Some(data) = self.data.take() {
            data.into_inner()
                .map_err(|e| ReadError::io("writing", &data_path, e.into_error()))?;
        }
        let headers: Vec<TensorHeader<'_>> = self
            .current
            .iter()
            .map(|(name, dtype, shape)| TensorHeader {
                name,
                dtype: *dtype,
                shape,
            })
            .collect();
        let mut shard =
            File::create(&shard_path).map_err(|e| ReadError::io("creating", &shard_path, e))?;
        shard
            .write_all(&encode_header(&headers))
            .map_err(|e| ReadError::io("writing", &shard_path, e))?;
        if !self.current.is_empty() {
            let mut data =
                File::open(&data_path).map_err(|e| ReadError::io("reading", &data_path, e))?;
            std::io::copy(&mut data, &mut shard)
                .map_err(|e| ReadError::io("writing", &shard_path, e))?;
            fs::remove_file(&data_path).map_err(|e| ReadError::io("removing", &data_path, e))?;
        }
        shard
            .sync_all()
            .map_err(|e| ReadError::io("syncing", &shard_path, e))?;
        let names = self.current.drain(..).map(|(name, _, _)| name).collect();
        self.done.push((shard_path, names));
        self.current_bytes = 0;
        Ok(())
    }

    /// Closes the last shard and gives the shards their Hugging Face names (with an index
    /// when there is more than one). Returns the shard count and the data bytes written.
    fn finish(mut self) -> Result<(usize, u64), Error> {
        if !self.current.is_empty() || self.done.is_empty() {
            self.close_shard()?;
        }
        let count = self.done.len();
        let mut weight_map = Map::new();
        for (i, (path, names)) in self.done.iter().enumerate() {
            let name = if count == 1 {
                "model.safetensors".to_owned()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
            };
            let target = self.folder.join(&name);
            fs::rename(path, &target).map_err(|e| ReadError::io("renaming", path, e))?;
            for tensor in names {
                weight_map.insert(tensor.clone(), Value::String(name.clone()));
            }
        }
        if count > 1 {
            let index = json!({
                "metadata": {"total_size": self.total},
                "weight_map": weight_map,
            });
            write_json(&self.folder.join("model.safetensors.index.json"), &index)?;
        }
        Ok((count, self.total))
    }
}
