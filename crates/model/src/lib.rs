//! Stream Hugging Face checkpoints through a memory budget, one layer at a time.
//!
//! This crate reads Hugging Face model folders in place (`config.json` with single or
//! sharded safetensors, or single or sharded PyTorch `.bin`), indexes every tensor, groups
//! them into the layers a streaming runner loads one at a time, and reads a layer without
//! keeping the model resident. Every byte of input is untrusted: headers, offsets, shapes,
//! shard paths and pickles are validated, and bad input is an [`Error`] naming the file and
//! tensor, never a panic. No pickled code ever runs.
//!
//! # Reading a layer
//!
//! ```
//! use memwise_model::{Checkpoint, DType, LayerId, ReadStrategy};
//!
//! let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama-sharded");
//! let checkpoint = Checkpoint::open(folder)?;
//! let mut reader = checkpoint.reader(ReadStrategy::Pread);
//! for layer in checkpoint.layers() {
//!     let data = reader.read_layer(&layer.id)?; // this layer's bytes, in a reused buffer
//!     for tensor in data.tensors() {
//!         let compute = tensor.to_dtype(DType::F32)?; // f16 on disk, f32 to compute
//!         assert_eq!(compute.len() as u64, DType::F32.byte_len(tensor.shape()).unwrap());
//!     }
//! } // dropping `data` releases the layer before the next is read
//! # Ok::<(), memwise_model::Error>(())
//! ```
//!
//! # The workspace
//!
//! Safetensors sources are streamed in place and never copied. Where a source cannot be
//! streamed as it is (a `.bin` source, a conversion to another compute dtype, a layer a
//! hook changed), a [`Workspace`] keeps one safetensors file per layer with a checksummed
//! manifest, written atomically and resumable after a crash; [`Workspace::checkpoint`]
//! serves those layers through the same [`LayerReader`].
#![deny(missing_docs)]

mod checkpoint;
mod error;
mod workspace;

pub use crate::checkpoint::{
    convert_into, parse_safetensors, parse_shard_index, parse_torch_zip, to_f32_vec, Checkpoint,
    CheckpointSummary, DType, Layer, LayerData, LayerId, LayerReader, LayerSummary, ModelConfig,
    ReadStrategy, SourceFormat, TensorIndex, TensorInfo, TensorView, TiedWeight, MAX_HEADER_BYTES,
};
pub use crate::error::{Error, Result};
pub use crate::workspace::{
    needs_workspace, ConvertEvent, ConvertOptions, ConvertProgress, ConvertReport, LayerOrigin,
    Manifest, ManifestLayer, ManifestTensor, SourceFile, SourceFingerprint, TensorBytes, Workspace,
    MANIFEST_FILE, MANIFEST_VERSION,
};
