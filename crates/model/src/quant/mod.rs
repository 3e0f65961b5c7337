//! Round-to-nearest weight quantization, bit for bit as auto-round does it, in auto-round's
//! checkpoint format.
//!
//! [`quantize_rtn`] turns one linear weight (`out × in`, in `f32`) into integer codes with
//! one fp16 scale and one zero point per group of `group_size` inputs;
//! [`QuantizedWeight::pack`] lays them out as auto-round writes them (int32 `qweight` and
//! `qzeros`, fp16 `scales`), and [`PackedWeight::dequantize`] turns a packed weight back
//! into `f32` values to compute with.
//!
//! ```
//! use memwise_model::quant::{quantize_rtn, GroupSize, QuantScheme};
//!
//! let (out_features, in_features) = (8, 40); // 40 inputs: two groups of 32, the last padded
//! let weight: Vec<f32> = (0..out_features * in_features).map(|i| (i as f32 * 0.37).sin()).collect();
//! let scheme = QuantScheme::new(4, GroupSize::from_auto_round(32)?, true)?;
//! let quantized = quantize_rtn(&weight, out_features, in_features, &scheme)?;
//! let packed = quantized.pack();
//! assert_eq!(packed.qweight_shape(), [64 / 8, 8]); // 8 four-bit codes per int32
//! assert_eq!(packed.scales_shape(), [2, 8]);
//! let restored = packed.dequantize(in_features)?;
//! for (w, r) in weight.iter().zip(&restored) {
//!     assert!((w - r).abs() <= 0.15); // within one quantization step
//! }
//! # Ok::<(), memwise_model::quant::Error>(())
//! ```
//!
//! [`quantize_checkpoint`] does this for a whole model folder, one stage at a time, and
//! writes what auto-round writes: the packed decoder linears, every other tensor as
//! stored, `config.json` with a `quantization_config`, and `quantization_config.json`.
//! It is resumable: a run killed midway leaves its finished stages, checksummed and
//! recorded, and a rerun with the same source and options continues after them
//! ([`Start`] says whether it did, and why not).
//!
//! ```
//! use memwise_model::quant::{quantize_checkpoint, QuantizeOptions};
//!
//! let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/quant/llama-bf16");
//! let out = tempfile::tempdir()?.keep().join("llama-bf16-w4g32");
//! let options = QuantizeOptions::from_values(4, 32, true, "auto_round")?;
//! let report = quantize_checkpoint(source, &out, &options)?;
//! assert_eq!(report.quantized, 14); // 7 linears in each of 2 blocks
//! assert!(out.join("quantization_config.json").is_file());
//! # std::fs::remove_dir_all(out.parent().unwrap())?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Which auto-round this matches
//!
//! auto-round (0.16.1) has two round-to-nearest paths (iters 0, optimized RTN off), and
//! they disagree on a small fraction of codes, by one step, and on scales:
//!
//! - the **model-free** path (`auto_round.utils.model_free_utils.quantize_weight_rtn`) reads
//!   each weight from its safetensors shard, casts it to `f32` (exact for bf16, fp16 and
//!   f32), computes scales and zero points and rounds the codes once, in `f32`;
//! - the **model** path loads the model into torch and, on the CPU, casts it to bf16 first
//!   (`ModelContext._set_amp_dtype`: amp is on and the CPU prefers bf16, so even an f32
//!   model is quantized as bf16). Its quantizer then runs in bf16: the weights are rounded
//!   to bf16, and for asymmetric schemes `(hi - lo) / maxq` is rounded to bf16 before the
//!   fp16 cast. It keeps a dequantized weight (again bf16), and its exporter recomputes the
//!   codes from that weight and the scale, which can land one step away. On the f32
//!   fixture at group size -1, 4 bits, auto-round's own `quant_tensor_sym` /
//!   `quant_tensor_asym` on the bf16-cast weight reproduce every one of the model path's
//!   384 scales, where the model-free `f32` arithmetic differs on 340 (sym) and 343 (asym);
//!   for sym, recomputing the codes from the bf16 dequantized weight reproduces all its
//!   24 576 codes. (That path also leaves every linear whose dimensions are not multiples of
//!   32 unquantized, and writes asymmetric weights in `auto_round:auto_awq` packing.)
//!
//! memwise matches the model-free path exactly. It is the path that works the way memwise
//! does (tensor by tensor from the checkpoint's own bytes, never holding a model), it is
//! auto-round's low-memory path, and its codes depend only on the stored weight, not on
//! which dtype a model was loaded in. The fixtures in `tests/fixtures/quant/` were made by
//! it (`make_fixtures.py` there pins the versions). For what that path refuses or fails
//! on, 3 bits and group size -1, the fixtures come from the same compressor run with its
//! own functions (`make_fixtures.py`'s `extended_model_free`): group size -1 is
//! `quantize_weight_rtn` with one group as wide as the row (what auto-round's quantizer
//! makes of -1), and 3 bits are that arithmetic packed by auto-round's own 3-bit packer,
//! `QuantLinear.pack_3bits` of `auto_round_extension`.
//!
//! # The arithmetic, as auto-round does it
//!
//! The input dimension is zero-padded to whole groups (zeros never move a group's
//! clamped minimum or maximum). For each group `x`, with `lo = min(min(x), 0)` and
//! `hi = max(max(x), 0)` in `f32`:
//!
//! - **symmetric** (`maxq = 2^(bits-1)`): the larger magnitude `m` of `lo` and `hi` maps to
//!   `-maxq`: `scale = fp16(±m / maxq)`, negative when `hi >= -lo`; its magnitude is at
//!   least `fp16(1e-5)`. Codes are `clamp(round(x / scale), -maxq, maxq - 1) + maxq`, the
//!   zero point is `maxq`.
//! - **asymmetric** (`maxq = 2^bits - 1`): `scale = max(fp16((hi - lo) / maxq), fp16(1e-5))`,
//!   `zero = round(-lo / scale)`, codes `clamp(round(x / scale) + zero, 0, maxq)`.
//!
//! Every division is in `f32` (the fp16 scale widened), every rounding is to nearest with
//! ties to even (`torch.round`), and the fp16 conversion rounds to nearest even.
//! [`GroupSize::PerChannel`] (auto-round's `-1`) makes each row one group, unpadded, as
//! auto-round's quantizer functions do (its model-free compressor itself asks for
//! `in / -1` groups and keeps such weights unquantized). A group holding NaN is not
//! reproduced (torch's min and max propagate NaN; these skip it).
//!
//! # Packing
//!
//! Codes are packed in units: the fewest codes that fill whole int32 words, `32 / bits`
//! codes in one word for 2, 4 and 8 bits, 32 codes in 3 words for 3 bits (GPTQ's layout,
//! as auto-round's `pack_3bits` writes it). A unit is one little-endian bit stream, code `j`
//! at bit `bits * j`, so a 3-bit code can start in one word and end in the next (codes 10
//! and 21 of each unit do).
//!
//! `qweight` is `[padded_in * bits / 32, out]`: the inputs of output `o` are a stream down
//! column `o`, input `i` at bit `bits * i`. `qzeros` is `[groups, units_out * words]`, the
//! zero points of each group packed the same way along the outputs, the output dimension
//! padded to whole units with the zero point of an all-zero group (as the model-free path
//! pads outputs to whole words), and `scales` is `[groups, out]` fp16. The padded input
//! dimension must fill whole units (a multiple of 32 for 3 bits); one that does not is
//! refused ([`Error::Unpackable`]). Symmetric weights use auto-round's
//! `auto_round:auto_gptq` packing, which stores each zero point minus one (its kernels add
//! the one back); asymmetric weights use `auto_round`, which stores the zero point as it is.

mod layout;
mod pack;
mod resume;
mod rtn;
mod writer;

pub use self::pack::{PackedWeight, PackingFormat};
pub use self::resume::Start;
pub use self::rtn::{quantize_rtn, QuantizedWeight};
pub use self::writer::{
    plan_quantization, quantize_checkpoint, quantize_checkpoint_with, ExportFormat, QuantizeEvent,
    QuantizeOptions, QuantizePlan, QuantizeProgress, QuantizeReport, AUTO_ROUND_VERSION,
};

use std::fmt;
use std::num::NonZeroUsize;
use std::path::PathBuf;

/// The number of inputs that share one scale and zero point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupSize {
    /// One group per output row (auto-round's `group_size: -1`).
    PerChannel,
    /// Groups of this many inputs; the input dimension is zero-padded to whole groups.
    Size(NonZeroUsize),
}

impl GroupSize {
    /// Reads auto-round's convention: `-1` is per channel, a positive number is a group size,
    /// anything else is refused with an error naming it.
    pub fn from_auto_round(value: i64) -> Result<GroupSize, Error> {
        match value {
            -1 => Ok(GroupSize::PerChannel),
            v if v > 0 => usize::try_from(v)
                .ok()
                .and_then(NonZeroUsize::new)
                .map(GroupSize::Size)
                .ok_or(Error::GroupSize(value)),
            _ => Err(Error::GroupSize(value)),
        }
    }

    /// The value auto-round writes in `quantization_config.json`.
    pub fn to_auto_round(self) -> i64 {
        match self {
            GroupSize::PerChannel => -1,
            GroupSize::Size(n) => i64::try_from(n.get()).unwrap_or(i64::MAX),
        }
    }

    /// The group length for a row of `in_features` inputs.
    fn len_for(self, in_features: usize) -> usize {
        match self {
            GroupSize::PerChannel => in_features,
            GroupSize::Size(n) => n.get(),
        }
    }
}

impl fmt::Display for GroupSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_auto_round())
    }
}

/// How to quantize: bits per weight, group size, symmetric or not. Built only through
/// [`QuantScheme::new`], so every scheme in hand is one memwise can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantScheme {
    bits: u8,
    group_size: GroupSize,
    sym: bool,
}

impl QuantScheme {
    /// The bit widths memwise writes.
    pub const SUPPORTED_BITS: [u8; 4] = [2, 3, 4, 8];

    /// A scheme of `bits` (2, 3, 4 or 8) per weight; anything else is refused with an error
    /// naming the value.
    ///
    /// ```
    /// use memwise_model::quant::{GroupSize, QuantScheme};
    ///
    /// let err = QuantScheme::new(5, GroupSize::PerChannel, true).unwrap_err();
    /// assert!(err.to_string().contains("5"));
    /// ```
    pub fn new(bits: u8, group_size: GroupSize, sym: bool) -> Result<QuantScheme, Error> {
        if !Self::SUPPORTED_BITS.contains(&bits) {
            return Err(Error::Bits(bits));
        }
        Ok(QuantScheme {
            bits,
            group_size,
            sym,
        })
    }

    /// Bits per weight.
    pub fn bits(&self) -> u8 {
        self.bits
    }

    /// Inputs per scale and zero point.
    pub fn group_size(&self) -> GroupSize {
        self.group_size
    }

    /// Whether the zero point is fixed at the middle of the code range.
    pub fn sym(&self) -> bool {
        self.sym
    }

    /// The packing auto-round records for this scheme.
    pub fn packing_format(&self) -> PackingFormat {
        if self.sym {
            PackingFormat::AutoGptq
        } else {
            PackingFormat::AutoRound
        }
    }

    /// A packing unit: the fewest codes that fill whole int32 words, and those words
    /// (`32 / bits` codes in one word for 2, 4 and 8 bits; 32 codes in 3 words for 3 bits).
    fn unit(&self) -> (usize, usize) {
        let bits = usize::from(self.bits);
        let common = gcd(bits, 32);
        (32 / common, bits / common)
    }

    /// The input dimension padded to whole groups, as [`quantize_rtn`] pads it.
    fn padded_in(&self, in_features: usize) -> usize {
        let group = self.group_size.len_for(in_features);
        in_features.div_ceil(group) * group
    }

    /// Refuses a padded input dimension that does not fill whole packing units.
    fn check_packable(&self, padded_in: usize) -> Result<(), Error> {
        let (codes, _) = self.unit();
        if padded_in % codes != 0 {
            return Err(Error::Unpackable {
                padded_in,
                pack_factor: codes,
            });
        }
        Ok(())
    }

    /// The shapes of `qweight`, `qzeros` and `scales` of an `out_features × in_features`
    /// weight packed with this scheme (see [Packing](self#packing)).
    fn packed_shapes(
        &self,
        out_features: usize,
        in_features: usize,
    ) -> Result<[[usize; 2]; 3], Error> {
        let padded_in = self.padded_in(in_features);
        self.check_packable(padded_in)?;
        let (codes, words) = self.unit();
        let groups = padded_in / self.group_size.len_for(in_features);
        Ok([
            [padded_in / codes * words, out_features],
            [groups, out_features.div_ceil(codes) * words],
            [groups, out_features],
        ])
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// What can go wrong while quantizing, packing or unpacking a weight, or writing a
/// quantized checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A bit width memwise does not write.
    #[error("bits {0} is not supported: memwise quantizes to 2, 3, 4 or 8 bits")]
    Bits(u8),
    /// A group size that is neither -1 nor positive.
    #[error("group size {0} is not valid: use -1 (per channel) or a positive number")]
    GroupSize(i64),
    /// A packing format auto-round does not write for integer weights.
    #[error("packing format {0:?} is not supported: use auto_round:auto_gptq (symmetric) or auto_round (asymmetric)")]
    PackingFormat(String),
    /// The weight's length is not `out_features × in_features`, or a dimension is zero.
    #[error("a weight of {len} values is not {out_features} × {in_features} (both non-zero)")]
    Shape {
        /// The values given.
        len: usize,
        /// The output dimension given.
        out_features: usize,
        /// The input dimension given.
        in_features: usize,
    },
    /// The padded input dimension does not fill whole packing units of int32 words.
    #[error("{padded_in} inputs (after padding to whole groups) do not fill whole packing units of {pack_factor} codes")]
    Unpackable {
        /// The input dimension after padding to whole groups.
        padded_in: usize,
        /// Codes per packing unit: `32 / bits` in one int32 word, or 32 three-bit codes in
        /// three words.
        pack_factor: usize,
    },
    /// A packed weight's tensors disagree with each other or with the scheme.
    #[error("packed weight is inconsistent: {0}")]
    Packed(String),
    /// An export format memwise does not write.
    #[error("export format {0:?} is not implemented: memwise writes auto_round")]
    ExportFormat(String),
    /// The output folder exists already.
    #[error("{} exists already: quantize into a new folder", .0.display())]
    OutputExists(PathBuf),
    /// The output path has no usable folder name.
    #[error("{} does not name a folder", .0.display())]
    OutputName(PathBuf),
    /// Quantizing one tensor of a checkpoint failed.
    #[error("{tensor}: {source}")]
    Tensor {
        /// The tensor.
        tensor: String,
        /// What went wrong.
        #[source]
        source: Box<Error>,
    },
    /// Reading the source checkpoint or writing the output failed.
    #[error(transparent)]
    Checkpoint(#[from] crate::error::Error),
}

impl Error {
    fn in_tensor(tensor: &str, source: Error) -> Error {
        Error::Tensor {
            tensor: tensor.to_owned(),
            source: Box::new(source),
        }
    }
}
