//! auto-round's packed layout: int32 `qweight` and `qzeros`, fp16 `scales`.

use std::fmt;
use std::ops::{BitOr, Shl, Shr};

use half::f16;

use super::rtn::QuantizedWeight;
use super::{Error, GroupSize, QuantScheme};

/// How zero points are stored, as auto-round's `packing_format` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackingFormat {
    /// `auto_round:auto_gptq`: each zero point stored minus one (clamped at 0); auto-round
    /// writes it for symmetric weights.
    AutoGptq,
    /// `auto_round`: zero points stored as they are; auto-round writes it for asymmetric
    /// weights.
    AutoRound,
}

impl PackingFormat {
    /// The name in `quantization_config.json`.
    pub fn name(self) -> &'static str {
        match self {
            PackingFormat::AutoGptq => "auto_round:auto_gptq",
            PackingFormat::AutoRound => "auto_round",
        }
    }

    /// Reads a `packing_format` value, refusing any other with an error naming it.
    pub fn parse(name: &str) -> Result<PackingFormat, Error> {
        match name {
            "auto_round:auto_gptq" => Ok(PackingFormat::AutoGptq),
            "auto_round" => Ok(PackingFormat::AutoRound),
            other => Err(Error::PackingFormat(other.to_owned())),
        }
    }

    /// The stored form of a zero point: auto-round clamps it to the code range, so an
    /// `auto_round:auto_gptq` zero of 0 is stored as 0 (and reads back as 1).
    fn store_zero(self, zero: u16, max_code: u32) -> u32 {
        match self {
            PackingFormat::AutoGptq => u32::from(zero.saturating_sub(1)).min(max_code),
            PackingFormat::AutoRound => u32::from(zero).min(max_code),
        }
    }

    fn load_zero(self, stored: u32) -> u16 {
        // `stored` holds at most 8 bits.
        let stored = stored as u16;
        match self {
            PackingFormat::AutoGptq => stored + 1,
            PackingFormat::AutoRound => stored,
        }
    }
}

impl fmt::Display for PackingFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A weight in auto-round's layout, the three tensors a checkpoint stores for a linear
/// layer `L`: `L.qweight`, `L.qzeros` and `L.scales`.
#[derive(Debug, Clone, PartialEq)]
pub struct PackedWeight {
    scheme: QuantScheme,
    out_features: usize,
    qweight: Vec<i32>,
    qzeros: Vec<i32>,
    scales: Vec<f16>,
    groups: usize,
}

/// A packing unit's bit stream, its first word the lowest: `u32` where a unit is one
/// word (2, 4 and 8 bits), `u128` for 3 bits' three.
trait Stream:
    Copy
    + Default
    + From<u32>
    + BitOr<Output = Self>
    + Shl<u32, Output = Self>
    + Shr<u32, Output = Self>
{
    /// The lowest 32 bits.
    fn low(self) -> u32;
}

impl Stream for u32 {
    fn low(self) -> u32 {
        self
    }
}

impl Stream for u128 {
    fn low(self) -> u32 {
        self as u32
    }
}

/// One packing unit's codes as a little-endian bit stream: code `j` at bit `bits * j`.
fn pack_unit<S: Stream>(codes: impl Iterator<Item = u32>, bits: u32) -> S {
    codes.enumerate().fold(S::default(), |acc, (j, c)| {
        acc | S::from(c) << (bits * j as u32)
    })
}

/// Code `j` of a packing unit's bit stream.
fn unpack_code<S: Stream>(stream: S, bits: u32, j: usize) -> u32 {
    (stream >> (bits * j as u32)).low() & ((1u32 << bits) - 1)
}

/// A packing unit's bit stream from its `words`, the first the lowest.
fn unit_stream<S: Stream>(words: impl Iterator<Item = i32>) -> S {
    words.enumerate().fold(S::default(), |acc, (k, w)| {
        acc | S::from(w as u32) << (32 * k as u32)
    })
}

/// Word `k` of a packing unit's bit stream (the int64 sum auto-round casts to int32 wraps
/// the same way).
fn stream_word<S: Stream>(stream: S, k: usize) -> i32 {
    (stream >> (32 * k as u32)).low() as i32
}

impl QuantizedWeight {
    /// Packs the weight in the layout auto-round writes for its scheme
    /// ([`QuantScheme::packing_format`]).
    pub fn pack(&self) -> PackedWeight {
        if self.scheme().unit().1 == 1 {
            self.pack_as::<u32>()
        } else {
            self.pack_as::<u128>()
        }
    }

    fn pack_as<S: Stream>(&self) -> PackedWeight {
        let scheme = *self.scheme();
        let bits = u32::from(scheme.bits());
        let (unit_codes, unit_words) = scheme.unit();
        let max_code = (1u32 << bits) - 1;
        let (out, padded_in, groups) = (self.out_features(), self.padded_in(), self.groups());
        let format = scheme.packing_format();

        // qweight[w][o]: the codes of output o's inputs as one bit stream down column o,
        // a unit of `unit_codes` inputs to every `unit_words` rows.
        let units_in = padded_in / unit_codes;
        let mut qweight = vec![0i32; units_in * unit_words * out];
        // Each worker packs a block of units (`unit_words` rows of `qweight`, every output).
        let block_units = units_in.div_ceil(super::rtn::workers(self.codes().len()));
        let codes = self.codes();
        super::rtn::parallel_chunks(
            qweight
                .chunks_mut(block_units * unit_words * out)
                .enumerate(),
            |(block, words)| {
                let first = block * block_units * unit_codes;
                let inputs = words.len() / (unit_words * out) * unit_codes;
                for (o, row) in codes.chunks_exact(padded_in).enumerate() {
                    let row = &row[first..first + inputs];
                    for (u, chunk) in row.chunks_exact(unit_codes).enumerate() {
                        let stream: S = pack_unit(chunk.iter().map(|&c| u32::from(c)), bits);
                        for k in 0..unit_words {
                            words[(u * unit_words + k) * out + o] = stream_word(stream, k);
                        }
                    }
                }
            },
        );

        // Outputs past `out` (padding to whole units) hold the zero of an all-zero group.
        let padding_zero = {
            let mut codes = vec![0u8; self.group_len()];
            let zeros = vec![0f32; self.group_len()];
            super::rtn::group_zero(&zeros, &mut codes, &scheme)
        };
        let words_out = out.div_ceil(unit_codes) * unit_words;
        let mut qzeros = vec![0i32; groups * words_out];
        let mut scales = vec![f16::ZERO; groups * out];
        for g in 0..groups {
            let row = &mut qzeros[g * words_out..(g + 1) * words_out];
            for (u, words) in row.chunks_exact_mut(unit_words).enumerate() {
                let zeros = (u * unit_codes..(u + 1) * unit_codes).map(|o| {
                    let zero = if o < out {
                        self.zeros()[o * groups + g]
                    } else {
                        padding_zero
                    };
                    format.store_zero(zero, max_code)
                });
                let stream: S = pack_unit(zeros, bits);
                for (k, word) in words.iter_mut().enumerate() {
                    *word = stream_word(stream, k);
                }
            }
            for o in 0..out {
                scales[g * out + o] = self.scales()[o * groups + g];
            }
        }
        PackedWeight {
            scheme,
            out_features: out,
            qweight,
            qzeros,
            scales,
            groups,
        }
    }
}

impl PackedWeight {
    /// Takes a packed weight as a checkpoint stores it, checking every shape against the
    /// scheme. `qweight` is `[padded_in * bits / 32, out]`, `qzeros`
    /// `[groups, ceil(out / unit) * unit * bits / 32]` (a unit is `32 / bits` outputs, or 32
    /// for 3 bits), `scales` `[groups, out]`, all row-major.
    pub fn new(
        scheme: QuantScheme,
        qweight: Vec<i32>,
        qzeros: Vec<i32>,
        scales: Vec<f16>,
        scales_shape: [usize; 2],
    ) -> Result<PackedWeight, Error> {
        let [groups, out] = scales_shape;
        let (unit_codes, unit_words) = scheme.unit();
        let bad = |what: String| Err(Error::Packed(what));
        if groups == 0 || out == 0 || scales.len() != groups * out {
            return bad(format!(
                "{} scales are not a {groups} × {out} tensor",
                scales.len()
            ));
        }
        if qweight.is_empty() || qweight.len() % (out * unit_words) != 0 {
            return bad(format!(
                "{} qweight words are not rows of {out} outputs in whole units of {unit_words}",
                qweight.len()
            ));
        }
        let padded_in = qweight.len() / out / unit_words * unit_codes;
        if let GroupSize::Size(n) = scheme.group_size() {
            if padded_in != groups * n.get() {
                return bad(format!(
                    "{padded_in} packed inputs are not {groups} groups of {n}"
                ));
            }
        } else if groups != 1 {
            return bad(format!("a per-channel weight with {groups} groups"));
        }
        let words_out = out.div_ceil(unit_codes) * unit_words;
        if qzeros.len() != groups * words_out {
            return bad(format!(
                "{} qzeros words are not {groups} × {words_out}",
                qzeros.len()
            ));
        }
        Ok(PackedWeight {
            scheme,
            out_features: out,
            qweight,
            qzeros,
            scales,
            groups,
        })
    }

    /// The scheme.
    pub fn scheme(&self) -> &QuantScheme {
        &self.scheme
    }

    /// The int32 codes, `[padded_in * bits / 32, out]` row-major.
    pub fn qweight(&self) -> &[i32] {
        &self.qweight
    }

    /// The input dimension the codes cover: the weight's, padded to whole groups.
    pub fn padded_in(&self) -> usize {
        let (unit_codes, unit_words) = self.scheme.unit();
        self.qweight.len() / self.out_features / unit_words * unit_codes
    }

    /// The shape of [`qweight`](Self::qweight).
    pub fn qweight_shape(&self) -> [usize; 2] {
        [self.qweight.len() / self.out_features, self.out_features]
    }

    /// The int32 zero points, `[groups, ceil(out / unit) * unit * bits / 32]` row-major.
    pub fn qzeros(&self) -> &[i32] {
        &self.qzeros
    }

    /// The shape of [`qzeros`](Self::qzeros).
    pub fn qzeros_shape(&self) -> [usize; 2] {
        [self.groups, self.qzeros.len() / self.groups]
    }

    /// The fp16 scales, `[groups, out]` row-major.
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }

    /// The shape of [`scales`](Self::scales).
    pub fn scales_shape(&self) -> [usize; 2] {
        [self.groups, self.out_features]
    }

    /// Unpacks the codes, scales and zero points of a weight with `in_features` inputs
    /// (the packed form keeps only the padded count).
    pub fn unpack(&self, in_features: usize) -> Result<QuantizedWeight, Error> {
        if self.scheme.unit().1 == 1 {
            self.unpack_as::<u32>(in_features)
        } else {
            self.unpack_as::<u128>(in_features)
        }
    }

    fn unpack_as<S: Stream>(&self, in_features: usize) -> Result<QuantizedWeight, Error> {
        let scheme = self.scheme;
        let bits = u32::from(scheme.bits());
        let (unit_codes, unit_words) = scheme.unit();
        let out = self.out_features;
        let groups = self.groups;
        let padded_in = self.padded_in();
        if in_features == 0
            || in_features > padded_in
            || in_features.div_ceil(groups) > padded_in / groups
        {
            return Err(Error::Packed(format!(
                "{in_features} inputs do not fit {padded_in} packed inputs in {groups} groups"
            )));
        }
        let mut codes = vec![0u8; out * padded_in];
        // Each worker unpacks the codes of a block of outputs.
        let rows = out.div_ceil(super::rtn::workers(codes.len()));
        let qweight = &self.qweight;
        super::rtn::parallel_chunks(
            codes.chunks_mut(rows * padded_in).enumerate(),
            |(block, codes)| {
                let first = block * rows;
                let outputs = first..first + codes.len() / padded_in;
                for (u, unit) in qweight.chunks_exact(unit_words * out).enumerate() {
                    for (row, o) in codes.chunks_exact_mut(padded_in).zip(outputs.clone()) {
                        let stream: S = unit_stream((0..unit_words).map(|k| unit[k * out + o]));
                        let row = &mut row[u * unit_codes..(u + 1) * unit_codes];
                        for (j, code) in row.iter_mut().enumerate() {
                            *code = unpack_code(stream, bits, j) as u8;
                        }
                    }
                }
            },
        );
        let format = scheme.packing_format();
        let words_out = out.div_ceil(unit_codes) * unit_words;
        let mut zeros = vec![0u16; out * groups];
        let mut scales = vec![f16::ZERO; out * groups];
        for g in 0..groups {
            let row = &self.qzeros[g * words_out..(g + 1) * words_out];
            for (u, words) in row.chunks_exact(unit_words).enumerate() {
                let stream: S = unit_stream(words.iter().copied());
                for j in 0..unit_codes.min(out.saturating_sub(u * unit_codes)) {
                    let o = u * unit_codes + j;
                    zeros[o * groups + g] = format.load_zero(unpack_code(stream, bits, j));
                }
            }
            for o in 0..out {
                scales[o * groups + g] = self.scales[g * out + o];
            }
        }
        QuantizedWeight::from_parts(scheme, out, in_features, codes, scales, zeros)
    }

    /// The `f32` weight, `out × in_features`: [`unpack`](Self::unpack), then
    /// [`QuantizedWeight::dequantize`].
    pub fn dequantize(&self, in_features: usize) -> Result<Vec<f32>, Error> {
        Ok(self.unpack(in_features)?.dequantize())
    }
}
