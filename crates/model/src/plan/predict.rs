//! The parts of a run's predicted peak that do not depend on where the weights live:
//! activations, KV cache, logits and staging buffers, from the typed `config.json`.

use candle_core::DType;

use crate::checkpoint::Checkpoint;
use crate::models::{ArchitectureConfig, Stage};

use super::Request;

/// Whole-process bytes a memwise run holds before any model is loaded: the binary, its
/// libraries, the allocator's arenas, thread stacks (the prefetch thread, candle's worker
/// pool) and the tracking tables.
///
/// Measured as `VmHWM` of `memwise run` on the 2-layer `tiny-llama` fixture (weights and
/// activations under 1 MiB) on x86-64 Linux, glibc, release and debug builds: 16–22 MiB;
/// the constant takes the larger. A caller that knows its own baseline (the CLI reads its
/// RSS before loading) passes it in [`Request::runtime_floor`].
pub const RUNTIME_FLOOR: u64 = 22 << 20;

/// The dimensions the activation estimates need, from the typed config.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dims {
    hidden: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    intermediate: u64,
    vocab: u64,
    layers: u64,
    /// Decoders produce logits over the vocabulary and keep a KV cache; encoders neither.
    decoder: bool,
}

impl Dims {
    pub(super) fn of(config: &ArchitectureConfig) -> Self {
        match config {
            ArchitectureConfig::Decoder(c) => {
                let kv_heads = c.num_key_value_heads.unwrap_or(c.num_attention_heads);
                let head_dim = c
                    .head_dim
                    .unwrap_or(c.hidden_size / c.num_attention_heads.max(1));
                Dims {
                    hidden: c.hidden_size as u64,
                    heads: c.num_attention_heads as u64,
                    kv_heads: kv_heads as u64,
                    head_dim: head_dim as u64,
                    intermediate: c.intermediate_size as u64,
                    vocab: c.vocab_size as u64,
                    layers: c.num_hidden_layers as u64,
                    decoder: true,
                }
            }
            ArchitectureConfig::Encoder(c) => Dims {
                hidden: c.hidden_size as u64,
                heads: c.num_attention_heads as u64,
                kv_heads: c.num_attention_heads as u64,
                head_dim: (c.hidden_size / c.num_attention_heads.max(1)) as u64,
                intermediate: c.intermediate_size as u64,
                vocab: c.vocab_size as u64,
                layers: c.num_hidden_layers as u64,
                decoder: false,
            },
        }
    }
}

/// Bytes one element of `dtype` takes.
fn size(dtype: DType) -> u64 {
    dtype.size_in_bytes() as u64
}

/// Activations alive at once inside the heaviest layer, for the prompt pass (the widest):
/// three hidden-state tensors (the residual, its normed copy, the block's output), then the
/// larger of attention (queries, keys and values expanded to every head and their
/// transposed copies, four head-sized tensors, plus the scores and their softmax,
/// `batch × heads × seq × (past + seq)` in f32) and the MLP (gate, up and their product,
/// `batch × seq × intermediate` each).
pub(super) fn activations(dims: &Dims, request: &Request) -> u64 {
    let e = size(request.dtype);
    let (b, s) = (request.batch as u64, request.seq_len as u64);
    let hidden = b * s * dims.hidden * e;
    // The prompt pass sees no past; later steps see one query over the whole past, which is
    // smaller than seq × seq for any prompt of more than one token.
    let past = if request.seq_len > 1 {
        0
    } else {
        request.new_tokens as u64
    };
    let scores = b * dims.heads * s * (past + s) * 4;
    let attention = 4 * b * s * dims.heads * dims.head_dim * e + 2 * scores;
    let mlp = 3 * b * s * dims.intermediate * e;
    3 * hidden + attention.max(mlp)
}

/// Keys and values of every layer for the whole generation:
/// `2 × layers × kv_heads × head_dim × (seq + new) × batch × dtype`; none for a single
/// forward (no cache is kept) or an encoder.
pub(super) fn kv_cache(dims: &Dims, request: &Request) -> u64 {
    if !dims.decoder || request.new_tokens == 0 {
        return 0;
    }
    let positions = (request.seq_len + request.new_tokens) as u64;
    2 * dims.layers
        * dims.kv_heads
        * dims.head_dim
        * positions
        * request.batch as u64
        * size(request.dtype)
}

/// The output: decoder logits `batch × seq × vocab` in f32 (the prompt pass returns every
/// position; later steps one), or an encoder's last hidden state.
pub(super) fn logits(dims: &Dims, request: &Request) -> u64 {
    let (b, s) = (request.batch as u64, request.seq_len as u64);
    if dims.decoder {
        b * s * dims.vocab * 4
    } else {
        b * s * dims.hidden * 4
    }
}

/// Bytes a stage's read needs beside the stage itself: tensors stored in another dtype than
/// the compute dtype are read through a buffer of `STAGING_BYTES` into f32 (or whole, then
/// converted, into another compute dtype), so that buffer or the largest such tensor's
/// stored bytes; tensors stored as computed are read straight into their own storage
/// (none).
pub(super) fn staging(checkpoint: &Checkpoint, stage: &Stage, dtype: DType) -> u64 {
    stage
        .tensors()
        .iter()
        .filter_map(|t| checkpoint.index().get(&t.name))
        .filter(|info| crate::checkpoint::stored_dtype(dtype) != Some(info.dtype))
        .map(|info| staged(info.byte_len(), dtype))
        .max()
        .unwrap_or(0)
}

/// What dequantizing packed weight `name` (auto-round's `qweight`, `qzeros`, `scales`)
/// holds beside its result: the packed words as read and as copied, and one byte of code
/// per element. `None` when `name` is not packed.
fn packed_staging(checkpoint: &Checkpoint, name: &str, elements: usize) -> Option<u64> {
    let module = crate::runner::packed_module(checkpoint, name)?;
    let words: u64 = ["qweight", "qzeros", "scales"]
        .iter()
        .filter_map(|part| checkpoint.index().get(&format!("{module}.{part}")))
        .map(|info| info.byte_len())
        .sum();
    Some(2 * words + elements as u64)
}

/// The staging a converted tensor of `stored` bytes needs: read into f32 through a buffer
/// of `STAGING_BYTES`, else whole.
fn staged(stored: u64, dtype: DType) -> u64 {
    if dtype == DType::F32 {
        stored.min(crate::checkpoint::STAGING_BYTES as u64)
    } else {
        stored
    }
}

/// What a stage holds in the process on mapped weights, kept or streamed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct MappedFootprint {
    /// Kept: the pages its products touch, and its copies.
    pub resident: u64,
    /// Streamed: one chunk of a mapped matrix's pages, and its copies.
    pub streamed: u64,
    /// While it is read kept: the stored bytes of its largest converted copy.
    pub staging_resident: u64,
    /// While it is read streamed: the same, for what is still copied.
    pub staging_streamed: u64,
    /// Streamed: the buffer its half-precision chunks are widened into, which the
    /// computing thread keeps for the rest of the run.
    pub widening: u64,
    /// The copies its read makes, kept and streamed: what a stage read ahead holds while
    /// the one before it computes (mapped pages are touched only by the computation).
    pub copied_resident: u64,
    pub copied_streamed: u64,
}

/// What stage `stage` holds on mapped weights. A matrix stored as f32 is mapped: kept, it
/// holds every page its products touch, or for `lookups` (the embedding stage) nothing
/// (rows are read with `pread`); streamed, one chunk of rows at a time
/// (`models::weights::CHUNK_BYTES`). A matrix stored as bf16 or f16 is mapped when
/// streamed (its chunk's pages and an f32 chunk it is widened into) or looked up, and
/// copied when kept. Anything else is copied and holds its bytes in the compute dtype.
pub(super) fn mapped_footprint(
    checkpoint: &Checkpoint,
    stage: &Stage,
    dtype: DType,
    lookups: bool,
) -> MappedFootprint {
    use crate::checkpoint::StoredDType;
    let mut footprint = MappedFootprint::default();
    let (mut copies, mut chunk) = (0u64, 0u64);
    for spec in stage.tensors() {
        let bytes = spec.element_count() as u64 * size(dtype);
        let info = checkpoint.index().get(&spec.name);
        let stored = info.map(|info| info.dtype);
        let stored_bytes = match packed_staging(checkpoint, &spec.name, spec.element_count()) {
            Some(staging) => staging,
            None => staged(info.map_or(bytes, |info| info.byte_len()), dtype),
        };
        let converted = crate::checkpoint::stored_dtype(dtype) != stored;
        let half = matches!(stored, Some(StoredDType::BF16 | StoredDType::F16));
        let matrix = spec.shape.len() == 2 && dtype == DType::F32;
        let copy = |footprint: &mut MappedFootprint, streamed: bool| {
            footprint.resident += bytes;
            footprint.copied_resident += bytes;
            if converted {
                footprint.staging_resident = footprint.staging_resident.max(stored_bytes);
                if streamed {
                    footprint.staging_streamed = footprint.staging_streamed.max(stored_bytes);
                }
            }
        };
        if !matrix || !(stored == Some(StoredDType::F32) || half) {
            copies += bytes;
            copy(&mut footprint, true);
            continue;
        }
        let row = spec.shape[1] as u64 * size(dtype);
        let rows = crate::models::rows_per_chunk(spec.shape[1], half) as u64 * row;
        let rows = bytes.min(rows);
        if lookups {
            // Rows looked up are read with `pread` into the activations, not mapped, and
            // never multiplied (a tied head maps the table again as a stage of its own).
            continue;
        }
        if half {
            copy(&mut footprint, false);
            // The chunk's stored pages, widened into a buffer of its f32 size.
            chunk = chunk.max(rows / 2);
            footprint.widening = footprint.widening.max(rows);
        } else {
            footprint.resident += bytes;
            chunk = chunk.max(rows);
        }
    }
    footprint.streamed = copies + chunk;
    footprint.copied_streamed = copies;
    footprint
}
