//! The one streaming loop: stages come off disk (read ahead on a background thread, within
//! the budget), hooks see them, each runs in a scope of its name and is freed after.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use memwise::kind::Kind;
use memwise::MemoryTracker;

use super::read_ahead::{page_cache_window, PageCacheReadAhead};
use super::{LayerHook, LayerWeights, RunError};
use crate::checkpoint::{tensor_bytes, Checkpoint, MappedFiles, MappedTensor, ReadStrategy};
use crate::models::{Family, Inputs, Stage, TensorSpec, Weights};
use crate::stream::LayerStream;
use crate::workspace::{ConvertOptions, TensorBytes, Workspace};

/// Reads one stage's tensors as compute tensors. Shared with the prefetch thread.
pub(super) struct StageReader {
    /// The model folder as the user gave it.
    pub(super) source: Checkpoint,
    /// Where weights are read: `source`, or the workspace when stages were persisted.
    pub(super) checkpoint: Checkpoint,
    pub(super) stages: Vec<Stage>,
    /// Weight bytes of the repeated layer, the size the block cache is kept for.
    pub(super) layer_bytes: Option<u64>,
    pub(super) strategy: ReadStrategy,
    pub(super) dtype: DType,
    /// `dtype` as checkpoints store it.
    pub(super) stored: crate::checkpoint::StoredDType,
    /// How packed linear weights are stored, for an auto-round checkpoint.
    pub(super) quantization: Option<crate::quant::QuantScheme>,
    pub(super) device: Device,
    /// The checkpoint's files mapped once, when its f32 matrices are computed on in place
    /// (`ReadStrategy::MmapRelease` on the CPU, no hook to show copies to).
    pub(super) mapped_files: Option<MappedFiles>,
}

impl StageReader {
    /// Reads stage `index` with its bytes counted as `kind` (read-ahead on the prefetch
    /// thread, weights when loaded in place); `transient` when it is freed after this pass
    /// (its mapped pages are then released after each use). Returns the weights with the
    /// bytes the read added to the live heap, as the allocator measured them (0 while
    /// tracking is off).
    fn read(
        &self,
        index: usize,
        transient: bool,
        kind: Kind,
    ) -> Result<(LayerWeights, u64), RunError> {
        let stage = &self.stages[index];
        let phase = phase_scope(stage.name(), "read", Some(kind));
        // Half-precision matrices are widened in place only where that costs no more than
        // a copy: a stage streamed anyway, or lookups (which widen only the rows used).
        let widen = transient || index == 0;
        let mapped: HashMap<String, Arc<MappedTensor>> = self
            .map_stage(index, transient, widen)?
            .into_iter()
            .map(|tensor| (tensor.name().to_owned(), Arc::new(tensor)))
            .collect();
        if self.layer_bytes != Some(stage.weight_bytes(self.dtype)) {
            // Not a repeated layer (embeddings, head): the cached layer blocks would only
            // sit beside it, so give them back first.
            memwise::alloc::release_block_cache();
        }
        // Packed weights are dequantized on their own; the rest is read as stored.
        let (packed, names): (Vec<&TensorSpec>, Vec<&TensorSpec>) = stage
            .tensors()
            .iter()
            .filter(|t| !mapped.contains_key(&t.name))
            .partition(|t| {
                self.quantization.is_some()
                    && super::packed::packed_module(&self.checkpoint, &t.name).is_some()
            });
        let names: Vec<&str> = names.iter().map(|t| t.name.as_str()).collect();
        let compute = Some(self.stored);
        // pread straight into each tensor's storage: the stage costs its weights once. Beside
        // mapped weights too: copies converted from a mapping would keep every stored page
        // of the stage mapped until the last of them is converted.
        let pread = self.device.is_cpu()
            && (self.strategy == ReadStrategy::Pread || self.mapped_files.is_some());
        let mut tensors = if pread {
            self.checkpoint
                .load_candle_tensors(Some(stage.name()), &names, compute)?
        } else {
            let mut reader = self.checkpoint.reader(self.strategy);
            let data = reader.read_tensors(Some(stage.name()), &names)?;
            data.to_candle_tensors(compute, &self.device)?
            // `data` drops here: mapped pages are released before the stage runs.
        };
        if let Some(scheme) = &self.quantization {
            let mut reader = self.checkpoint.reader(self.strategy);
            for spec in packed {
                let tensor = super::packed::load(
                    &mut reader,
                    stage.name(),
                    &spec.name,
                    &spec.shape,
                    scheme,
                    self.dtype,
                    &self.device,
                )?;
                tensors.insert(spec.name.clone(), tensor);
            }
        }
        let weights = LayerWeights {
            name: stage.name().to_owned(),
            index,
            tensors,
            mapped,
            replaced: false,
            persist: false,
        };
        let held = phase.as_ref().and_then(MemoryTracker::kind_bytes_so_far);
        Ok((weights, held.unwrap_or(0).max(0) as u64))
    }

    /// The stage's matrices that are computed on in their mapped files (none unless the
    /// reader maps): each 2-D tensor stored in the compute dtype, or in half precision when
    /// `widen` (see [`MappedFiles::tensor`]).
    fn map_stage(
        &self,
        index: usize,
        transient: bool,
        widen: bool,
    ) -> Result<Vec<MappedTensor>, RunError> {
        let Some(files) = &self.mapped_files else {
            return Ok(Vec::new());
        };
        let stage = &self.stages[index];
        let mut mapped = Vec::new();
        for spec in stage.tensors().iter().filter(|t| t.shape.len() == 2) {
            let Some(info) = self.checkpoint.tensor_for(Some(stage.name()), &spec.name) else {
                continue;
            };
            // SAFETY: `mapped_files` is only set for `ReadStrategy::MmapRelease`, whose maker
            // promised the checkpoint's files do not change while they are mapped.
            if let Some(tensor) = unsafe { files.tensor(info, self.stored, transient, widen) }? {
                mapped.push(tensor);
            }
        }
        Ok(mapped)
    }

    /// Starts reading the mapped matrices of `stages` (a pass's stages to read, in order,
    /// each with whether it is freed after the pass) into the page cache on a thread of its
    /// own, when the reader maps and reads ahead. The first stage of every family is its
    /// embeddings, which are looked up a row at a time: reading the whole table ahead would
    /// read 250 MiB to use 1.
    fn read_ahead(&self, stages: &[(usize, bool)], depth: usize) -> Option<PageCacheReadAhead> {
        if self.mapped_files.is_none() || depth == 0 {
            return None;
        }
        let stages = stages
            .iter()
            .filter(|(index, _)| *index > 0)
            // The read-ahead's own handles never release pages the pass is using; a stage
            // that cannot be mapped now reports why when the pass reads it.
            .filter_map(|&(index, transient)| {
                Some((index, self.map_stage(index, false, transient).ok()?))
            })
            .collect();
        // Without a thread the pass still runs: its own faults read the pages.
        PageCacheReadAhead::start(stages, depth, page_cache_window()).ok()
    }

    /// Writes a stage a hook replaced to the workspace, under the stage's own name: a tied
    /// head is recorded as `lm_head`, not as the embeddings whose tensor it reads.
    fn persist(&self, workspace: &Workspace, layer: &LayerWeights) -> Result<(), RunError> {
        let mut owned = Vec::with_capacity(layer.tensors.len());
        for (name, tensor) in &layer.tensors {
            let (dtype, bytes) = tensor_bytes(name, tensor)?;
            owned.push((name.as_str(), dtype, tensor.dims().to_vec(), bytes));
        }
        let views: Vec<TensorBytes<'_>> = owned
            .iter()
            .map(|(name, dtype, shape, bytes)| TensorBytes::new(name, *dtype, shape, bytes))
            .collect();
        let options = ConvertOptions::with_dtype(Some(self.stored));
        workspace.write_stage(&self.source, &options, &layer.name, &views)?;
        Ok(())
    }
}

/// A scope for one phase of a stage (`model.layers.3:read`, `:wait`, `:build`, `:compute`,
/// `:free`), so reports show where each stage's time went and whether read-ahead kept up,
/// and what the heap holds by kind: reads count as read-ahead or weights, building and
/// freeing as weights, computing as activations. Nothing is named or allocated while
/// tracking is off.
fn phase_scope(stage: &str, phase: &str, kind: Option<Kind>) -> Option<MemoryTracker> {
    memwise::scope::memory_tracking_enabled().then(|| {
        let name = format!("{stage}:{phase}");
        match kind {
            Some(kind) => MemoryTracker::with_kind(name, kind),
            None => MemoryTracker::new(name),
        }
    })
}

/// How a [`super::StreamedModel`] gets its stages: the reader, the hooks and the settings.
pub(super) struct Pipeline {
    pub(super) reader: Arc<StageReader>,
    /// Per stage: kept resident after its first use (true) or freed after every pass.
    pub(super) keep: Vec<bool>,
    /// Per stage: the bytes it holds in the process while it streams (the plan's figure),
    /// which the read-ahead's budget counts.
    pub(super) stream_bytes: Vec<u64>,
    pub(super) prefetch_depth: usize,
    pub(super) budget: Option<u64>,
    pub(super) hooks: Vec<Arc<dyn LayerHook>>,
    pub(super) workspace: Option<Workspace>,
}

impl Pipeline {
    pub(super) fn checkpoint(&self) -> &Checkpoint {
        &self.reader.checkpoint
    }

    /// From now on, blocks stay resident after they run.
    pub(super) fn keep_weights(&mut self) {
        self.keep.iter_mut().for_each(|keep| *keep = true);
    }

    /// Lets the hooks see a stage's weights, persists them if a hook asked, and builds the
    /// stage's block from them.
    fn materialize<F: Family>(
        &self,
        model: &F,
        index: usize,
        mut weights: LayerWeights,
    ) -> Result<F::Block, RunError> {
        for hook in &self.hooks {
            hook.before_layer(&mut weights)
                .map_err(|source| RunError::Hook {
                    hook: hook.name().to_owned(),
                    stage: weights.name.clone(),
                    source,
                })?;
        }
        if weights.persist && weights.replaced {
            let Some(workspace) = &self.workspace else {
                return Err(RunError::NoWorkspace {
                    stage: weights.name,
                });
            };
            self.reader.persist(workspace, &weights)?;
        }
        let reader = &self.reader;
        let vb = VarBuilder::from_tensors(weights.tensors, reader.dtype, &reader.device);
        let weights = Weights::with_mapped(vb, weights.mapped);
        Ok(model.load_stage_from(index, weights)?)
    }

    /// Loads and builds every stage not yet resident, without running any.
    pub(super) fn load_all<F: Family>(
        &self,
        model: &F,
        resident: &mut [Option<F::Block>],
    ) -> Result<(), RunError> {
        for (index, slot) in resident.iter_mut().enumerate() {
            if slot.is_none() {
                let (weights, _) = self.reader.read(index, false, Kind::Weights)?;
                *slot = Some(self.materialize(model, index, weights)?);
            }
        }
        Ok(())
    }

    /// One pass of `model` over `inputs`: stages come from a prefetching stream (skipping
    /// resident ones), hooks see them, each runs in a scope of its name.
    pub(super) fn run<F: Family>(
        &self,
        model: &F,
        resident: &mut [Option<F::Block>],
        inputs: Inputs<'_>,
    ) -> Result<Tensor, RunError> {
        let mut pass = model.pass(inputs)?;
        let reader = &self.reader;
        let missing: Vec<usize> = (0..resident.len())
            .filter(|&i| resident[i].is_none())
            .collect();
        let budget = self.budget.map(|limit| {
            let sizes = missing.iter().map(|&i| self.stream_bytes[i]).collect();
            (limit, sizes)
        });
        let order: Vec<(usize, bool)> = missing.iter().map(|&i| (i, !self.keep[i])).collect();
        // Every stage's pages, kept ones too: after `load_all` a kept mapped stage holds no
        // page yet, and on later passes its pages are found cached at once.
        let all: Vec<(usize, bool)> = (0..resident.len()).map(|i| (i, !self.keep[i])).collect();
        let read_ahead = reader.read_ahead(&all, self.prefetch_depth);
        let stream_reader = Arc::clone(reader);
        let mut stream =
            LayerStream::with_budget(missing.len(), self.prefetch_depth, budget, move |k| {
                let (index, transient) = order[k];
                stream_reader.read(index, transient, Kind::ReadAhead)
            })
            .map_err(RunError::Prefetch)?;
        for (index, slot) in resident.iter_mut().enumerate() {
            let name = reader.stages[index].name();
            let _scope = MemoryTracker::new(name.to_owned());
            if let Some(read_ahead) = &read_ahead {
                read_ahead.computing(index);
            }
            let (fresh, lease) = match slot {
                Some(_) => (None, None),
                None => {
                    let waited = phase_scope(name, "wait", None);
                    let ((weights, read_bytes), lease) =
                        stream
                            .next_stage()
                            .ok_or_else(|| RunError::PrefetchStopped {
                                stage: name.to_owned(),
                            })??;
                    drop(waited);
                    // Read ahead until now, these are the running stage's weights.
                    memwise::kind::hand_over(Kind::ReadAhead, Kind::Weights, read_bytes);
                    let _build = phase_scope(name, "build", Some(Kind::Weights));
                    (Some(self.materialize(model, index, weights)?), Some(lease))
                }
            };
            let Some(block) = slot.as_ref().or(fresh.as_ref()) else {
                unreachable!("a stage is either resident or freshly loaded")
            };
            let computing = phase_scope(name, "compute", Some(Kind::Activations));
            pass.run_block(block)?;
            drop(computing);
            for hook in &self.hooks {
                hook.after_layer(name, index)
                    .map_err(|source| RunError::Hook {
                        hook: hook.name().to_owned(),
                        stage: name.to_owned(),
                        source,
                    })?;
            }
            if self.keep[index] && fresh.is_some() {
                *slot = fresh;
            } else {
                // The block and its weights go now, inside the stage's scope, so the scope
                // records the release; then the lease lets the budget admit the next stage.
                let _free = phase_scope(name, "free", Some(Kind::Weights));
                drop(fresh);
            }
            drop(lease);
        }
        Ok(pass.finish()?)
    }
}
