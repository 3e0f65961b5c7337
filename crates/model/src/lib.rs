//! Stream Hugging Face checkpoints through a memory budget, one layer at a time.
//!
//! This crate reads Hugging Face model folders in place (`config.json` with single or
//! sharded safetensors, or single or sharded PyTorch `.bin`), indexes every tensor, groups
//! them into the stages a streaming runner loads one at a time (traced from the model's own
//! blocks: `model.embed_tokens`, `model.layers.0`, …, `model.norm`, `lm_head`), and reads a
//! stage without keeping the model resident. Every byte of input is untrusted: headers, offsets, shapes,
//! shard paths and pickles are validated, and bad input is an [`Error`] naming the file and
//! tensor, never a panic. No pickled code ever runs.
//!
//! # Reading a stage
//!
//! ```
//! use memwise_model::checkpoint::StoredDType;
//! use memwise_model::{Checkpoint, ReadStrategy};
//!
//! let folder = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama-sharded");
//! let checkpoint = Checkpoint::open(folder)?;
//! let mut reader = checkpoint.reader(ReadStrategy::Pread);
//! for stage in checkpoint.stages() {
//!     let data = reader.read_stage(&stage.name)?; // this stage's bytes, in a reused buffer
//!     for tensor in data.tensors() {
//!         let compute = tensor.to_dtype(StoredDType::F32)?; // f16 on disk, f32 to compute
//!         assert_eq!(compute.len() as u64, StoredDType::F32.byte_len(tensor.shape()).unwrap());
//!     }
//! } // dropping `data` releases the stage before the next is read
//! # Ok::<(), memwise_model::Error>(())
//! ```
//!
//! [`TensorView::to_candle_tensor`](checkpoint::TensorView::to_candle_tensor) (and [`LayerData::to_candle_tensors`](checkpoint::LayerData::to_candle_tensors), the map
//! candle-nn's `VarBuilder::from_tensors` takes) hand a stage to candle, converting floats
//! to the compute dtype on the way; [`TensorView::bytes`](checkpoint::TensorView::bytes), [`TensorView::dtype`](checkpoint::TensorView::dtype) and
//! [`TensorView::shape`](checkpoint::TensorView::shape) serve any other backend.
//!
//! # Reading without pinning memory
//!
//! A mapped file is zero-copy, but every page it touches stays in RSS until released, so a
//! plain mapping streams the whole model into RSS. [`ReadStrategy`] offers two ways out:
//! a mapping whose layer pages are faulted in at once (`MADV_POPULATE_READ`) and released
//! when the layer drops (`MADV_DONTNEED`), and `pread` into one reused buffer (the
//! default). Measured side by side by `cargo bench -p memwise-model --bench layer_stream`
//! (figures in that bench's docs and the README).
//!
//! # Computing on the mapped files
//!
//! The runner goes further with [`ReadStrategy::mmap_release`] on the CPU (what `memwise
//! run` does unless `--no-mmap`): an f32 matrix stored as f32 is not read at all. Its
//! [`models::Linear`] multiplies the mapped slice with the same `gemm` call candle makes
//! for a tensor in memory, 16 MiB of rows at a time, and a stage that is not kept releases
//! each chunk's pages from the process (`MADV_DONTNEED`, the bytes stay in the page cache)
//! as soon as it is multiplied; an [`models::Embedding`] copies out only the rows looked up.
//! So a streamed stage holds one chunk at a time, a generation step faults cached pages in
//! instead of copying 2 GB, and the full load maps instead of copying. Read-ahead reads the
//! next stage's missing pages into the page cache through a 4 MiB buffer (as large
//! folios, which later passes map cheaply), not into the process. The [`plan::Plan`] predicts these footprints. Hand-written because candle's
//! CPU tensors own their storage: there is no tensor over borrowed, mapped memory.
//!
//! # Untrusted input
//!
//! Safetensors headers are capped at [`checkpoint::MAX_HEADER_BYTES`]; offsets must lie inside the
//! file, in order, without overlap; dtype × shape must equal the byte length (checked
//! multiplication). Shard names must resolve inside the model folder (no `..`, no absolute
//! paths, no symlink leading out; a hub-cache snapshot may point into its own `blobs`).
//! PyTorch files are read through a pickle reader that knows only what `torch.save` writes
//! for a state dict and runs nothing. The parsers behind [`checkpoint::parse_safetensors`],
//! [`checkpoint::parse_shard_index`] and [`checkpoint::parse_torch_zip`] are fuzzed (`fuzz/`
//! in the repository).
//!
//! # The workspace
//!
//! Safetensors sources are streamed in place and never copied. Where a source cannot be
//! streamed as it is (a `.bin` source, a conversion to another compute dtype, a layer a
//! hook changed), a [`Workspace`] keeps one safetensors file per stage with a checksummed
//! manifest, written atomically and resumable after a crash; [`Workspace::checkpoint`]
//! serves those stages through the same [`LayerReader`](checkpoint::LayerReader).
//!
//! # Model blocks
//!
//! Our own blocks on candle-nn for Llama, Mistral and Qwen2 decoders ([`DecoderModel`](models::DecoderModel)) and
//! BERT-style encoders ([`EncoderModel`](models::EncoderModel)). A model is first a skeleton, built from its
//! config alone; its [`Stage`](models::Stage)s list, in execution order, the Hugging Face names and shapes
//! of the tensors each one reads. A runner streams a model by building one stage at a time
//! from a [`candle_nn::VarBuilder`] that holds only that stage's tensors:
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::VarBuilder;
//! use memwise_model::models::{DecoderModel, Family, Inputs};
//! use memwise_model::models::ArchitectureConfig;
//! use memwise_model::{write_synthetic_checkpoint, Architecture, SynthSpec};
//!
//! // A seeded random-weight checkpoint in the Hugging Face layout.
//! let dir = tempfile::tempdir()?;
//! let folder = write_synthetic_checkpoint(&SynthSpec::tiny(Architecture::Llama), &dir.path().join("m"))?.folder;
//! let ArchitectureConfig::Decoder(config) = ArchitectureConfig::from_file(&folder)? else { unreachable!() };
//! let shard = folder.join("model-00001-of-00001.safetensors");
//!
//! let model = DecoderModel::new(&config, DType::F32, &Device::Cpu)?;
//! let input_ids = Tensor::new(&[[1u32, 5, 9]], &Device::Cpu)?;
//! let checkpoint = candle_core::safetensors::BufferedSafetensors::new(std::fs::read(&shard)?)?;
//! let mut pass = model.pass(Inputs::new(&input_ids))?;
//! for (index, stage) in model.stages().iter().enumerate() {
//!     // Only this stage's tensors are read, and they are dropped once it has run.
//!     let tensors = stage
//!         .tensor_names()
//!         .map(|name| Ok((name.to_owned(), checkpoint.load(name, &Device::Cpu)?)))
//!         .collect::<candle_core::Result<_>>()?;
//!     pass.run_stage(index, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))?;
//! }
//! let logits = pass.finish()?;
//! assert_eq!(logits.dims(), [1, 3, 128]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The same model loaded whole ([`Family::forward_full`], [`Family::load`])
//! gives bitwise the same outputs; both match Hugging Face transformers within 1e-4 on the
//! fixtures in `tests/fixtures/reference/`.
//!
//! # Streaming a model
//!
//! [`ModelConverter`] builds the skeleton from `config.json` and the index, then streams
//! each stage in just before it runs and frees it right after, reading the next stage on a
//! background thread within a byte budget. Tensors are read with `pread` straight into their
//! own storage ([`Checkpoint::load_candle_tensors`]), and a [`memwise::BlockCache`] hands
//! each layer the resident blocks the previous one freed instead of fresh pages.
//! `cargo bench -p memwise-model --bench streaming` measures it against a full load, whole
//! process (figures in that bench's docs and the README).
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod checkpoint;
mod error;
pub mod models;
pub mod plan;
pub mod quant;
mod runner;
pub mod stream;
pub mod synth;
pub mod workspace;

pub use crate::checkpoint::{Checkpoint, ReadStrategy};
pub use crate::error::{Error, Result};
pub use crate::models::{Architecture, Family, Inputs, ModelError};
pub use crate::plan::{Plan, PlanError, Request};
pub use crate::runner::{
    HookError, LayerHook, LayerWeights, ModelConverter, RunError, StreamedModel,
};
pub use crate::synth::{write_synthetic_checkpoint, SynthSpec};
pub use crate::workspace::Workspace;
