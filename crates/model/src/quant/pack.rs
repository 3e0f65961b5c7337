//! auto-round's packed layout: int32 `qweight` and `qzeros`, fp16 `scales`.

use std::fmt;

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

impl QuantizedWeight {
    /// Packs the weight in the layout auto-round writes for its scheme
    /// ([`QuantScheme::packing_format`]).
    pub fn pack(&self) -> PackedWeight {
        let scheme = *self.scheme();
        let bits = u32::from(scheme.bits());
        let pack = scheme.pack_factor();
        let max_code = (1u32 << bits) - 1;
        let (out, padded_in, groups) = (self.out_features(), self.padded_in(), self.groups());
        let format = scheme.packing_format();

        // qweight[w][o]: codes of inputs w*pack .. w*pack+pack of output o, low bits first.
        let words_in = padded_in / pack;
        let mut qweight = vec![0i32; words_in * out];
        // Each worker packs a block of word rows (`qweight[w]`, every output).
        let word_rows = words_in.div_ceil(super::rtn::workers(self.codes().len()));
        let codes = self.codes();
        super::rtn::parallel_chunks(
            qweight.chunks_mut(word_rows * out).enumerate(),
            |(block, words)| {
                let first = block * word_rows * pack;
                let inputs = words.len() / out * pack;
                for (o, row) in codes.chunks_exact(padded_in).enumerate() {
                    let row = &row[first..first + inputs];
                    for (w, chunk) in row.chunks_exact(pack).enumerate() {
                        let word = chunk
                            .iter()
                            .enumerate()
                            .fold(0u32, |acc, (j, &c)| acc | u32::from(c) << (bits * j as u32));
                        // The int64 sum auto-round casts to int32 wraps the same way.
                        words[w * out + o] = word as i32;
                    }
                }
            },
        );

        // Outputs past `out` (padding to whole words) hold the zero of an all-zero group.
        let padding_zero = {
            let mut codes = vec![0u8; self.group_len()];
            let zeros = vec![0f32; self.group_len()];
            super::rtn::group_zero(&zeros, &mut codes, &scheme)
        };
        let words_out = out.div_ceil(pack);
        let mut qzeros = vec![0i32; groups * words_out];
        let mut scales = vec![f16::ZERO; groups * out];
        for g in 0..groups {
            for w in 0..words_out {
                let mut word = 0u32;
                for j in 0..pack {
                    let o = w * pack + j;
                    let zero = if o < out {
                        self.zeros()[o * groups + g]
                    } else {
                        padding_zero
                    };
                    word |= format.store_zero(zero, max_code) << (bits * j as u32);
                }
                qzeros[g * words_out + w] = word as i32;
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
    /// scheme. `qweight` is `[padded_in / (32 / bits), out]`, `qzeros`
    /// `[groups, ceil(out / (32 / bits))]`, `scales` `[groups, out]`, all row-major.
    pub fn new(
        scheme: QuantScheme,
        qweight: Vec<i32>,
        qzeros: Vec<i32>,
        scales: Vec<f16>,
        scales_shape: [usize; 2],
    ) -> Result<PackedWeight, Error> {
        let [groups, out] = scales_shape;
        let pack = scheme.pack_factor();
        let bad = |what: String| Err(Error::Packed(what));
        if groups == 0 || out == 0 || scales.len() != groups * out {
            return bad(format!(
                "{} scales are not a {groups} × {out} tensor",
                scales.len()
            ));
        }
        if qweight.is_empty() || qweight.len() % out != 0 {
            return bad(format!(
                "{} qweight words are not rows of {out} outputs",
                qweight.len()
            ));
        }
        let padded_in = qweight.len() / out * pack;
        if scheme.group_size() != GroupSize::PerChannel && padded_in % groups != 0 {
            return bad(format!(
                "{padded_in} packed inputs do not split into {groups} groups"
            ));
        }
        if let GroupSize::Size(n) = scheme.group_size() {
            if padded_in != groups * n.get() {
                return bad(format!(
                    "{padded_in} packed inputs are not {groups} groups of {n}"
                ));
            }
        } else if groups != 1 {
            return bad(format!("a per-channel weight with {groups} groups"));
        }
        if qzeros.len() != groups * out.div_ceil(pack) {
            return bad(format!(
                "{} qzeros words are not {groups} × {}",
                qzeros.len(),
                out.div_ceil(pack)
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

    /// The int32 codes, `[padded_in / (32 / bits), out]` row-major.
    pub fn qweight(&self) -> &[i32] {
        &self.qweight
    }

    /// The shape of [`qweight`](Self::qweight).
    pub fn qweight_shape(&self) -> [usize; 2] {
        [self.qweight.len() / self.out_features, self.out_features]
    }

    /// The int32 zero points, `[groups, ceil(out / (32 / bits))]` row-major.
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
        let scheme = self.scheme;
        let bits = u32::from(scheme.bits());
        let pack = scheme.pack_factor();
        let mask = (1u32 << bits) - 1;
        let out = self.out_features;
        let groups = self.groups;
        let padded_in = self.qweight.len() / out * pack;
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
                for (w, words) in qweight.chunks_exact(out).enumerate() {
                    let words = &words[first..first + codes.len() / padded_in];
                    for (row, &word) in codes.chunks_exact_mut(padded_in).zip(words) {
                        for (j, code) in row[w * pack..(w + 1) * pack].iter_mut().enumerate() {
                            *code = ((word as u32 >> (bits * j as u32)) & mask) as u8;
                        }
                    }
                }
            },
        );
        let format = scheme.packing_format();
        let words_out = out.div_ceil(pack);
        let mut zeros = vec![0u16; out * groups];
        let mut scales = vec![f16::ZERO; out * groups];
        for g in 0..groups {
            for o in 0..out {
                let word = self.qzeros[g * words_out + o / pack] as u32;
                let stored = (word >> (bits * (o % pack) as u32)) & mask;
                zeros[o * groups + g] = format.load_zero(stored);
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
