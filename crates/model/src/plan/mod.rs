//! The plan made before any weight is read: each device's predicted whole-process peak as
//! named parts, and where each stage's weights live.
//!
//! [`Plan::new`] reads only `config.json` and the checkpoint index. Its parts are the
//! runtime floor ([`RUNTIME_FLOOR`] or the caller's own baseline), resident weights, the
//! streaming window (the stage running plus those read ahead), activations, the KV cache,
//! the logits and staging buffers. The placement is the cheapest that fits the budget:
//! every stage resident; some resident and the rest streamed (a generation step re-reads
//! only those); every stage streamed. A budget nothing fits is refused
//! ([`PlanError::OverBudget`]) before a byte of weights is read. The budget is the whole
//! process's peak (`--budget`, `memory.max_memory.cpu`), not the weights alone.
//!
//! Not done here (issue 10, item 3): computing straight from mapped file pages, tensor-by-
//! tensor streaming within a stage, embedding rows only, `lm_head` in vocabulary chunks.
//!
//! ```
//! use memwise_model::plan::{Placement, Plan, Request};
//! use memwise_model::{write_synthetic_checkpoint, Architecture, Checkpoint, SynthSpec};
//!
//! let dir = tempfile::tempdir()?;
//! let folder = write_synthetic_checkpoint(&SynthSpec::tiny(Architecture::Llama), &dir.path().join("m"))?.folder;
//! let checkpoint = Checkpoint::open(&folder)?;
//! let plan = Plan::new(&checkpoint, &Request::new(16).budget(Some(256 << 20)))?;
//! assert_eq!(plan.placement(), Placement::AllResident);
//! assert!(plan.peak() <= 256 << 20);
//!
//! // A budget below the runtime floor is refused, naming what is missing.
//! let err = Plan::new(&checkpoint, &Request::new(16).budget(Some(1 << 20))).unwrap_err();
//! assert!(err.to_string().contains("short"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod placement;
mod predict;

use candle_core::DType;
use serde::Serialize;

pub use self::placement::{Placement, Residency};
pub use self::predict::RUNTIME_FLOOR;

use crate::checkpoint::Checkpoint;
use crate::models::{ModelError, Stage};

/// What a run will do: the shape of its input, how many tokens it generates, and the
/// memory it may take.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Request {
    /// Sequences run together.
    pub batch: usize,
    /// Tokens in each (the prompt).
    pub seq_len: usize,
    /// Tokens generated after it (0: one forward pass).
    pub new_tokens: usize,
    /// The compute dtype.
    pub dtype: DType,
    /// The whole process's peak, in bytes (`None`: no limit).
    pub budget: Option<u64>,
    /// Stages read ahead of the one running.
    pub prefetch_depth: usize,
    /// Bytes the process holds before the model loads ([`RUNTIME_FLOOR`] by default).
    pub runtime_floor: u64,
    /// A placement the caller insists on: `Some(Placement::Streamed)` streams every stage
    /// whatever the budget allows, `Some(Placement::AllResident)` keeps every stage or is
    /// refused; `None` takes the cheapest that fits.
    pub placement: Option<Placement>,
    /// Whether f32 matrices are computed on in their mapped files
    /// ([`crate::ReadStrategy::mmap_release`] on the CPU): a streamed stage then holds one
    /// chunk of rows at a time and an embedding table only the rows looked up.
    pub mapped: bool,
}

impl Request {
    /// One sequence of `seq_len` tokens, no generation, f32, no budget, read-ahead of one
    /// stage, the default runtime floor, the cheapest placement.
    pub fn new(seq_len: usize) -> Self {
        Request {
            batch: 1,
            seq_len,
            new_tokens: 0,
            dtype: DType::F32,
            budget: None,
            prefetch_depth: 1,
            runtime_floor: RUNTIME_FLOOR,
            placement: None,
            mapped: false,
        }
    }

    /// Sequences run together.
    pub fn batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Tokens generated after the prompt.
    pub fn new_tokens(mut self, new_tokens: usize) -> Self {
        self.new_tokens = new_tokens;
        self
    }

    /// The compute dtype.
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The whole process's peak, in bytes.
    pub fn budget(mut self, budget: Option<u64>) -> Self {
        self.budget = budget;
        self
    }

    /// Stages read ahead of the one running.
    pub fn prefetch_depth(mut self, depth: usize) -> Self {
        self.prefetch_depth = depth;
        self
    }

    /// Bytes the process holds before the model loads.
    pub fn runtime_floor(mut self, bytes: u64) -> Self {
        self.runtime_floor = bytes;
        self
    }

    /// A placement to use instead of the cheapest that fits.
    pub fn placement(mut self, placement: Option<Placement>) -> Self {
        self.placement = placement;
        self
    }

    /// Whether matrices are computed on in their mapped files.
    pub fn mapped(mut self, mapped: bool) -> Self {
        self.mapped = mapped;
        self
    }
}

/// The predicted peak of one device, part by part, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Parts {
    /// The process before the model: binary, libraries, allocator, threads.
    pub runtime_floor: u64,
    /// Weights of the stages kept resident.
    pub resident_weights: u64,
    /// Weights of streamed stages alive at once: the one running plus those read ahead
    /// (on the first pass, stages about to become resident are read through it too).
    pub streaming_window: u64,
    /// Activations inside the heaviest layer (hidden states, attention scores, MLP).
    pub activations: u64,
    /// Keys and values of every layer for the whole generation.
    pub kv_cache: u64,
    /// The output: logits over the vocabulary, or an encoder's last hidden state.
    pub logits: u64,
    /// Buffers a stage's read needs beside the stage (dtype conversion).
    pub staging: u64,
}

impl Parts {
    /// Every part with its name, in the order above.
    pub fn named(&self) -> [(&'static str, u64); 7] {
        [
            ("runtime floor", self.runtime_floor),
            ("resident weights", self.resident_weights),
            ("streaming window", self.streaming_window),
            ("activations", self.activations),
            ("KV cache", self.kv_cache),
            ("logits", self.logits),
            ("staging buffers", self.staging),
        ]
    }

    /// Their sum: the predicted peak.
    pub fn total(&self) -> u64 {
        self.named().iter().map(|(_, bytes)| bytes).sum()
    }
}

/// One device's share of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct DevicePlan {
    /// `cpu`.
    pub device: String,
    /// The predicted peak, part by part.
    pub parts: Parts,
    /// Their sum.
    pub peak: u64,
    /// The budget it was planned for.
    pub budget: Option<u64>,
}

/// One stage: its weights and where they live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StagePlan {
    /// The stage's name, e.g. `model.layers.3`.
    pub name: String,
    /// Bytes of its weights in the compute dtype.
    pub weight_bytes: u64,
    /// Bytes read from disk to load it.
    pub stored_bytes: u64,
    /// Bytes it holds in the process while it streams: its weights, or on mapped weights
    /// one chunk of rows and the copies of what is not mapped.
    pub streamed_bytes: u64,
    /// Resident or streamed.
    pub residency: Residency,
}

/// The item that weighs most in a refused plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlanItem {
    /// A stage's name (`lm_head`) or a part's (`KV cache`).
    pub name: String,
    /// Its bytes.
    pub bytes: u64,
}

/// Why no plan fits.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// Even streaming stage by stage the predicted peak passes the budget.
    #[error(
        "{device}: the run needs {need} bytes at its peak but the budget is {budget} bytes \
         ({deficit} short); the largest item is {} ({} bytes); raise --budget or \
         memory.max_memory.{device}, or shorten the input",
        largest.name, largest.bytes
    )]
    OverBudget {
        /// The device whose budget is exceeded (`cpu`).
        device: String,
        /// The smallest whole-process peak any placement reaches.
        need: u64,
        /// The budget.
        budget: u64,
        /// `need - budget`.
        deficit: u64,
        /// The largest stage or part.
        largest: PlanItem,
    },
    /// `config.json` describes no model memwise runs.
    #[error(transparent)]
    Model(Box<ModelError>),
}

impl From<ModelError> for PlanError {
    fn from(error: ModelError) -> Self {
        PlanError::Model(Box::new(error))
    }
}

/// The plan: where each stage lives and what each device's peak is predicted to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    placement: Placement,
    stages: Vec<StagePlan>,
    devices: Vec<DevicePlan>,
    /// Bytes the streamed stages' read-ahead may keep alive at once (what is left of the
    /// budget beside everything else); `None` without a budget.
    window_budget: Option<u64>,
    /// The request planned for.
    #[serde(skip)]
    request: Request,
}

impl Plan {
    /// Plans `request` on `checkpoint` from its config and index alone.
    pub fn new(checkpoint: &Checkpoint, request: &Request) -> Result<Plan, PlanError> {
        let names = checkpoint.index().tensors().iter().map(|t| t.name.as_str());
        let stages = checkpoint.architecture()?.stages(names)?;
        Self::for_stages(checkpoint, &stages, request)
    }

    /// Plans `request` for `stages` (a skeleton's, in execution order) of `checkpoint`.
    pub fn for_stages(
        checkpoint: &Checkpoint,
        stages: &[Stage],
        request: &Request,
    ) -> Result<Plan, PlanError> {
        let dims = predict::Dims::of(checkpoint.architecture()?);
        let dtype = request.dtype;
        let sizes: Vec<u64> = stages.iter().map(|s| s.weight_bytes(dtype)).collect();
        let mut parts = Parts {
            runtime_floor: request.runtime_floor,
            activations: predict::activations(&dims, request),
            kv_cache: predict::kv_cache(&dims, request),
            logits: predict::logits(&dims, request),
            staging: stages
                .iter()
                .map(|s| predict::staging(checkpoint, s, dtype))
                .max()
                .unwrap_or(0),
            ..Parts::default()
        };
        let fixed = parts.total();
        let depth = request.prefetch_depth;
        let total: u64 = sizes.iter().sum();
        let streamed = vec![Residency::Streamed; sizes.len()];

        if request.mapped {
            return Self::mapped(checkpoint, stages, request, parts, sizes);
        }
        let (placement, residency, window_budget) = match (request.budget, request.placement) {
            (None, Some(Placement::Streamed)) => (Placement::Streamed, streamed, None),
            (None, _) => (
                Placement::AllResident,
                vec![Residency::Resident; sizes.len()],
                None,
            ),
            (Some(budget), Some(Placement::AllResident)) if fixed + total > budget => {
                return Err(over_budget(&parts, stages, &sizes, fixed + total, budget));
            }
            (Some(budget), forced) => {
                let room = budget.saturating_sub(fixed);
                let auto = forced != Some(Placement::Streamed);
                if auto && total <= room {
                    (
                        Placement::AllResident,
                        vec![Residency::Resident; sizes.len()],
                        Some(room - total),
                    )
                } else if let Some(residency) =
                    auto.then(|| placement::mixed(&sizes, room)).flatten()
                {
                    let resident = resident_bytes(&sizes, &residency);
                    (Placement::Mixed, residency, Some(room - resident))
                } else {
                    let largest = sizes.iter().copied().max().unwrap_or(0);
                    let need = fixed + largest;
                    if need > budget {
                        return Err(over_budget(&parts, stages, &sizes, need, budget));
                    }
                    (Placement::Streamed, streamed, Some(room))
                }
            }
        };
        let resident = resident_bytes(&sizes, &residency);
        let weights = weights_peak(&sizes, &residency, depth, window_budget);
        parts.resident_weights = resident;
        parts.streaming_window = weights - resident;
        Ok(Self::assemble(
            checkpoint,
            stages,
            request,
            parts,
            &sizes,
            &sizes,
            placement,
            residency,
            window_budget,
        ))
    }

    /// Plans a run on mapped weights: a resident stage holds the pages its computation
    /// touches (all of a matrix, the looked-up rows of an embedding table), a streamed one
    /// a chunk of rows at a time plus the copies of what is not mapped (and, stored in half
    /// precision, the f32 buffer its chunks are widened into); read-ahead holds the copies
    /// of the stages it has read (a packed stage dequantized, say) and its 4 MiB buffer
    /// (mapped pages go into the page cache, not into the process).
    fn mapped(
        checkpoint: &Checkpoint,
        stages: &[Stage],
        request: &Request,
        mut parts: Parts,
        sizes: Vec<u64>,
    ) -> Result<Plan, PlanError> {
        let footprints: Vec<predict::MappedFootprint> = stages
            .iter()
            .enumerate()
            .map(|(i, stage)| predict::mapped_footprint(checkpoint, stage, request.dtype, i == 0))
            .collect();
        let resident_sizes: Vec<u64> = footprints.iter().map(|f| f.resident).collect();
        let streamed_sizes: Vec<u64> = footprints.iter().map(|f| f.streamed).collect();
        // Conversion staging is counted stage by stage below, not as one fixed part.
        parts.staging = 0;
        let fixed = parts.total();
        // What streaming holds at most: a stage's chunk and staging, and the widening
        // buffer, which stays once made.
        let window = |residency: &[Residency]| {
            let streamed = || {
                footprints
                    .iter()
                    .zip(residency)
                    .filter(|(_, r)| **r == Residency::Streamed)
                    .map(|(f, _)| f)
            };
            let stage = streamed().map(|f| f.streamed + f.staging_streamed).max();
            stage.unwrap_or(0) + streamed().map(|f| f.widening).max().unwrap_or(0)
        };
        let staging_kept = footprints.iter().map(|f| f.staging_resident).max();
        let all_resident = vec![Residency::Resident; stages.len()];
        let all_streamed = vec![Residency::Streamed; stages.len()];
        let auto = request.placement != Some(Placement::Streamed);
        let (placement, residency) = match request.budget {
            None if auto => (Placement::AllResident, all_resident),
            None => (Placement::Streamed, all_streamed),
            Some(budget) => {
                let room = budget.saturating_sub(fixed);
                let need = fixed + window(&all_streamed);
                let whole = resident_bytes(&resident_sizes, &all_resident);
                if auto && whole + staging_kept.unwrap_or(0) <= room {
                    (Placement::AllResident, all_resident)
                } else if request.placement == Some(Placement::AllResident) {
                    let need = fixed + whole + staging_kept.unwrap_or(0);
                    return Err(over_budget(&parts, stages, &resident_sizes, need, budget));
                } else if need > budget {
                    return Err(over_budget(&parts, stages, &streamed_sizes, need, budget));
                } else if !auto {
                    (Placement::Streamed, all_streamed)
                } else {
                    // Keep the largest stages that fit beside the stream's window: each
                    // byte kept is one a generation step does not fault in again.
                    let cap = room - window(&all_streamed);
                    let mut residency = all_streamed.clone();
                    let mut order: Vec<usize> = (0..stages.len()).collect();
                    order.sort_by_key(|&i| std::cmp::Reverse(resident_sizes[i]));
                    let mut kept = 0;
                    for i in order {
                        let reading = footprints[i].staging_resident;
                        if kept + resident_sizes[i] + reading <= cap {
                            kept += resident_sizes[i];
                            residency[i] = Residency::Resident;
                        }
                    }
                    if kept == 0 {
                        (Placement::Streamed, residency)
                    } else {
                        (Placement::Mixed, residency)
                    }
                }
            }
        };
        // The placement was chosen on every part at once (safe); the prediction is the
        // moment of the peak: each stage of the first pass holds the resident pages
        // touched so far, its own chunk if streamed (with the widening buffer made so
        // far), the staging of its read, and the activations (the last stage the output
        // instead: the layers' chunks are released by then); a generation step holds
        // every resident stage and the largest chunk.
        let (activations, output) = (parts.activations, parts.logits);
        let total = |m: &(u64, u64, u64, u64, u64)| m.0 + m.1 + m.2 + m.3 + m.4;
        // (resident, window, activations, output, staging)
        let mut peak = (0, 0, 0, 0, 0);
        // The widening and staging buffers stay once made (per thread, for the run or pass).
        let (mut touched, mut widening, mut staging) = (0, 0, 0);
        // Read-ahead holds the copies of up to `prefetch_depth` stages after the one
        // computing, while they fit the budget beside it (the runtime's byte budget).
        let base = parts.runtime_floor + parts.kv_cache;
        let copied = |j: usize| match residency[j] {
            Residency::Resident => footprints[j].copied_resident,
            Residency::Streamed => footprints[j].copied_streamed,
        };
        let ahead = |held: u64, next: &mut dyn Iterator<Item = u64>| {
            let mut ahead = 0;
            for bytes in next.take(request.prefetch_depth) {
                if request
                    .budget
                    .is_some_and(|b| base + held + ahead + bytes > b)
                {
                    break;
                }
                ahead += bytes;
            }
            ahead
        };
        for (i, footprint) in footprints.iter().enumerate() {
            let mut moment = (touched, 0, activations, 0, 0);
            match residency[i] {
                Residency::Resident => {
                    moment.0 += footprint.resident;
                    staging = staging.max(footprint.staging_resident);
                }
                Residency::Streamed => {
                    widening = widening.max(footprint.widening);
                    staging = staging.max(footprint.staging_streamed);
                }
            }
            moment.4 = staging;
            moment.1 = widening
                + match residency[i] {
                    Residency::Resident => 0,
                    Residency::Streamed => footprint.streamed,
                };
            if i + 1 == stages.len() {
                (moment.2, moment.3) = (0, output);
            }
            moment.1 += ahead(total(&moment), &mut (i + 1..stages.len()).map(copied));
            if total(&moment) > total(&peak) {
                peak = moment;
            }
            touched = moment.0;
        }
        let all_kept = resident_bytes(&resident_sizes, &residency);
        if request.new_tokens > 0 {
            // A step streams only the stages not kept, each read ahead of its turn.
            let streamed: Vec<usize> = (0..stages.len())
                .filter(|&j| residency[j] == Residency::Streamed)
                .collect();
            let mut step = all_kept + window(&residency);
            step += ahead(step, &mut streamed.iter().skip(1).map(|&j| copied(j)));
            if step > total(&peak) {
                peak = (all_kept, step - all_kept, 0, 0, 0);
            }
        }
        (
            parts.resident_weights,
            parts.streaming_window,
            parts.activations,
            parts.logits,
            parts.staging,
        ) = peak;
        let window_budget = request
            .budget
            .map(|budget| budget.saturating_sub(parts.total()) + parts.streaming_window);
        Ok(Self::assemble(
            checkpoint,
            stages,
            request,
            parts,
            &sizes,
            &streamed_sizes,
            placement,
            residency,
            window_budget,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        checkpoint: &Checkpoint,
        stages: &[Stage],
        request: &Request,
        parts: Parts,
        sizes: &[u64],
        streamed: &[u64],
        placement: Placement,
        residency: Vec<Residency>,
        window_budget: Option<u64>,
    ) -> Plan {
        let dtype = request.dtype;
        let stored = |stage: &Stage| {
            checkpoint
                .stage(stage.name())
                .map_or(stage.weight_bytes(dtype), |s| s.bytes)
        };
        let peak = parts.total();
        Plan {
            placement,
            stages: stages
                .iter()
                .zip(sizes)
                .zip(residency)
                .zip(streamed)
                .map(
                    |(((stage, &weight_bytes), residency), &streamed_bytes)| StagePlan {
                        name: stage.name().to_owned(),
                        weight_bytes,
                        stored_bytes: stored(stage),
                        streamed_bytes,
                        residency,
                    },
                )
                .collect(),
            devices: vec![DevicePlan {
                device: "cpu".into(),
                parts,
                peak,
                budget: request.budget,
            }],
            window_budget,
            request: request.clone(),
        }
    }

    /// The request planned for.
    pub fn request(&self) -> &Request {
        &self.request
    }

    /// The placement chosen.
    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Every stage, in execution order, with its bytes and residency.
    pub fn stages(&self) -> &[StagePlan] {
        &self.stages
    }

    /// Each device's predicted peak.
    pub fn devices(&self) -> &[DevicePlan] {
        &self.devices
    }

    /// The CPU's share.
    pub fn cpu(&self) -> &DevicePlan {
        &self.devices[0]
    }

    /// The CPU's predicted whole-process peak, in bytes.
    pub fn peak(&self) -> u64 {
        self.cpu().peak
    }

    /// Bytes the read-ahead of streamed stages may keep alive at once; `None` without a
    /// budget.
    pub fn window_budget(&self) -> Option<u64> {
        self.window_budget
    }

    /// Whether stage `index` stays resident after its first use.
    pub fn is_resident(&self, index: usize) -> bool {
        self.stages
            .get(index)
            .is_some_and(|s| s.residency == Residency::Resident)
    }
}

/// The refusal of a budget that not even streaming fits: the need, the deficit and the
/// largest item (a part of the peak or a stage's `sizes`).
fn over_budget(
    parts: &Parts,
    stages: &[Stage],
    sizes: &[u64],
    need: u64,
    budget: u64,
) -> PlanError {
    let mut items: Vec<PlanItem> = parts
        .named()
        .iter()
        .map(|(name, bytes)| PlanItem {
            name: (*name).to_owned(),
            bytes: *bytes,
        })
        .collect();
    items.extend(stages.iter().zip(sizes).map(|(s, &bytes)| PlanItem {
        name: format!("stage {}", s.name()),
        bytes,
    }));
    // The first of equals: `max_by_key` keeps the last.
    let largest = items
        .into_iter()
        .rev()
        .max_by_key(|item| item.bytes)
        .unwrap_or(PlanItem {
            name: "nothing".into(),
            bytes: 0,
        });
    PlanError::OverBudget {
        device: "cpu".into(),
        need,
        budget,
        deficit: need - budget,
        largest,
    }
}

fn resident_bytes(sizes: &[u64], residency: &[Residency]) -> u64 {
    sizes
        .iter()
        .zip(residency)
        .filter(|(_, r)| **r == Residency::Resident)
        .map(|(size, _)| size)
        .sum()
}

/// Weight bytes alive at once at the worst point of any pass: on the first pass, the
/// stages made resident so far plus the stream's window (every stage is read through it
/// once); on later passes, every resident stage plus the window over the streamed ones.
fn weights_peak(sizes: &[u64], residency: &[Residency], depth: usize, limit: Option<u64>) -> u64 {
    let mut first = 0;
    let mut before = 0;
    for i in 0..sizes.len() {
        first = first.max(before + placement::window_at(sizes, i, depth, limit));
        if residency[i] == Residency::Resident {
            before += sizes[i];
        }
    }
    let streamed: Vec<u64> = sizes
        .iter()
        .zip(residency)
        .filter(|(_, r)| **r == Residency::Streamed)
        .map(|(&size, _)| size)
        .collect();
    let later = resident_bytes(sizes, residency) + placement::window(&streamed, depth, limit);
    first.max(later)
}
