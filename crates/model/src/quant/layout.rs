//! Where every output tensor of [`quantize_checkpoint`](super::quantize_checkpoint) goes,
//! decided before any weight is read: the shapes of the packed tensors follow from the
//! stored ones and the scheme, so the shards, their headers and each tensor's offset are
//! known up front, and each stage writes its bytes straight into the shards once (no
//! second copy when the run finishes).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::resume::WrittenTensor;
use super::Error;
use crate::checkpoint::{encode_header, StoredDType as DType, TensorHeader};
use crate::error::Error as ReadError;

/// One shard file.
pub(super) struct ShardPlan {
    /// Its name in the output folder.
    pub name: String,
    header: Vec<u8>,
    /// Its full length: header and data.
    len: u64,
}

/// A tensor's place: its shard and its byte offset in that file.
struct Placed {
    shard: usize,
    offset: u64,
}

/// The output's shards and where each stage's tensors go.
pub(super) struct Layout {
    pub shards: Vec<ShardPlan>,
    /// Per stage, its tensors in the order written.
    pub stages: Vec<Vec<WrittenTensor>>,
    places: Vec<Vec<Placed>>,
    total: u64,
}

impl Layout {
    /// Splits the tensors of every stage, in order, into shards of at most `max_bytes` of
    /// data (a larger tensor gets a shard of its own), named as Hugging Face names them.
    pub(super) fn new(stages: Vec<Vec<WrittenTensor>>, max_bytes: u64) -> Result<Layout, Error> {
        // (stage, tensor) of each shard's tensors.
        let mut members: Vec<Vec<(usize, usize)>> = Vec::new();
        let (mut current, mut current_bytes) = (Vec::new(), 0u64);
        for (s, tensors) in stages.iter().enumerate() {
            for (t, tensor) in tensors.iter().enumerate() {
                if !current.is_empty() && current_bytes.saturating_add(tensor.bytes) > max_bytes {
                    members.push(std::mem::take(&mut current));
                    current_bytes = 0;
                }
                current.push((s, t));
                current_bytes = current_bytes.saturating_add(tensor.bytes);
            }
        }
        if !current.is_empty() || members.is_empty() {
            members.push(current);
        }
        let count = members.len();
        let mut places: Vec<Vec<Placed>> = stages.iter().map(|_| Vec::new()).collect();
        let mut shards = Vec::with_capacity(count);
        let mut total = 0u64;
        for (i, shard) in members.iter().enumerate() {
            let mut headers = Vec::with_capacity(shard.len());
            for &(s, t) in shard {
                let tensor = &stages[s][t];
                let dtype = DType::parse(&tensor.dtype).ok_or_else(|| {
                    Error::Packed(format!(
                        "unknown dtype {:?} of {}",
                        tensor.dtype, tensor.name
                    ))
                })?;
                headers.push(TensorHeader {
                    name: &tensor.name,
                    dtype,
                    shape: &tensor.shape,
                });
            }
            let header = encode_header(&headers);
            let mut offset = header.len() as u64;
            for &(s, t) in shard {
                places[s].push(Placed { shard: i, offset });
                offset += stages[s][t].bytes;
                total += stages[s][t].bytes;
            }
            let name = if count == 1 {
                "model.safetensors".to_owned()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
            };
            shards.push(ShardPlan {
                name,
                header,
                len: offset,
            });
        }
        Ok(Layout {
            shards,
            stages,
            places,
            total,
        })
    }

    /// Bytes of tensor data in all shards.
    pub(super) fn data_bytes(&self) -> u64 {
        self.total
    }

    /// Opens every shard in `partial` for writing, creating those not there, with its header
    /// written and its full length set (a stage found short or damaged was already set to
    /// be redone, so nothing recorded is overwritten with other bytes).
    pub(super) fn open(&self, partial: &Path) -> Result<Vec<File>, Error> {
        self.shards
            .iter()
            .map(|shard| {
                let path = partial.join(&shard.name);
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| ReadError::io("creating", &path, e))?;
                file.write_all_at(&shard.header, 0)
                    .and_then(|()| file.set_len(shard.len))
                    .map_err(|e| ReadError::io("writing", &path, e))?;
                Ok(file)
            })
            .collect()
    }

    /// Writes stage `stage`'s tensors (`parts`, described by `written`, which must be what
    /// the layout planned) at their places, and syncs them to disk; returns their bytes and
    /// checksum.
    pub(super) fn write_stage(
        &self,
        partial: &Path,
        files: &[File],
        stage: usize,
        written: &[WrittenTensor],
        parts: &[&[u8]],
    ) -> Result<(u64, String), Error> {
        let planned = &self.stages[stage];
        if written != planned.as_slice() {
            let first = written
                .iter()
                .zip(planned)
                .find(|(a, b)| a != b)
                .map_or("a tensor".to_owned(), |(a, _)| a.name.clone());
            return Err(Error::Packed(format!(
                "{first} was not written as planned (its dtype, shape or order)"
            )));
        }
        let mut hasher = crc32fast::Hasher::new();
        let mut len = 0u64;
        let mut touched = Vec::new();
        for (part, place) in parts.iter().zip(&self.places[stage]) {
            let path = || partial.join(&self.shards[place.shard].name);
            files[place.shard]
                .write_all_at(part, place.offset)
                .map_err(|e| ReadError::io("writing", path(), e))?;
            hasher.update(part);
            len += part.len() as u64;
            if !touched.contains(&place.shard) {
                touched.push(place.shard);
            }
        }
        for shard in touched {
            let path = partial.join(&self.shards[shard].name);
            files[shard]
                .sync_data()
                .map_err(|e| ReadError::io("syncing", &path, e))?;
        }
        Ok((len, format!("crc32:{:08x}", hasher.finalize())))
    }

    /// The bytes and checksum of what stage `stage` left in the shards in `partial`, or why
    /// they cannot be read.
    pub(super) fn checksum_stage(
        &self,
        partial: &Path,
        stage: usize,
    ) -> Result<(u64, String), String> {
        let mut hasher = crc32fast::Hasher::new();
        let mut buffer = vec![0u8; 1 << 20];
        let mut len = 0u64;
        let mut open: Option<(usize, File)> = None;
        for (tensor, place) in self.stages[stage].iter().zip(&self.places[stage]) {
            let name = &self.shards[place.shard].name;
            let file = match &open {
                Some((shard, file)) if *shard == place.shard => file,
                _ => {
                    let file = File::open(partial.join(name))
                        .map_err(|e| format!("{name} cannot be opened ({e})"))?;
                    &open.insert((place.shard, file)).1
                }
            };
            let mut done = 0u64;
            while done < tensor.bytes {
                let n = (tensor.bytes - done).min(buffer.len() as u64) as usize;
                file.read_exact_at(&mut buffer[..n], place.offset + done)
                    .map_err(|_| format!("{name} is missing or cut short"))?;
                hasher.update(&buffer[..n]);
                done += n as u64;
            }
            len += tensor.bytes;
        }
        Ok((len, format!("crc32:{:08x}", hasher.finalize())))
    }

    /// `model.safetensors.index.json` when there is more than one shard.
    pub(super) fn index(&self) -> Option<Value> {
        if self.shards.len() < 2 {
            return None;
        }
        let mut weight_map = Map::new();
        for (tensors, places) in self.stages.iter().zip(&self.places) {
            for (tensor, place) in tensors.iter().zip(places) {
                let shard = &self.shards[place.shard].name;
                weight_map.insert(tensor.name.clone(), Value::String(shard.clone()));
            }
        }
        Some(json!({
            "metadata": {"total_size": self.total},
            "weight_map": weight_map,
        }))
    }
}
