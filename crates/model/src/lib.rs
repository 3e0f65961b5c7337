//! Stream Hugging Face checkpoints through a memory budget, one layer at a time.
//!
//! This crate will hold the checkpoint readers, the workspace store, the planner and the
//! streaming runner described in the project's design. It builds on [`memwise`] for
//! accounting: every layer it runs is a [`memwise::MemoryTracker`] scope.
#![deny(missing_docs)]

mod stream;

pub use crate::stream::LayerStream;
