//! Stream Hugging Face checkpoints through a memory budget, one layer at a time.
//!
//! This crate will hold the checkpoint readers, the workspace store, the planner and the
//! streaming runner described in the project's design. It builds on [`memwise`] for
//! accounting: every layer it runs is a [`memwise::MemoryTracker`] scope.
//!
//! # Model blocks
//!
//! Our own blocks on candle-nn for Llama, Mistral and Qwen2 decoders ([`DecoderModel`]) and
//! BERT-style encoders ([`EncoderModel`]). A model is first a skeleton, built from its
//! config alone; its [`Stage`]s list, in execution order, the Hugging Face names and shapes
//! of the tensors each one reads. A runner streams a model by building one stage at a time
//! from a [`candle_nn::VarBuilder`] that holds only that stage's tensors:
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::VarBuilder;
//! use memwise_model::{write_synthetic_checkpoint, Architecture, DecoderModel, ArchitectureConfig, SynthSpec};
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
//! let mut pass = model.pass(&input_ids, None)?;
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
//! The same model loaded whole ([`DecoderModel::forward_full`], [`DecoderModel::load`])
//! gives bitwise the same outputs; both match Hugging Face transformers within 1e-4 on the
//! fixtures in `tests/fixtures/reference/`.
#![deny(missing_docs)]

mod models;
mod synth;

pub use crate::models::{
    mean_pool, Architecture, ArchitectureConfig, BertConfig, DecoderBlock, DecoderModel,
    DecoderPass, EncoderBlock, EncoderModel, EncoderPass, Generation, KvCache, LlamaConfig,
    LoadedDecoder, LoadedEncoder, ModelError, RopeScaling, Stage, TensorSpec,
};
pub use crate::synth::{write_synthetic_checkpoint, SynthError, SynthReport, SynthSpec};
