//! Round-to-nearest quantization of one linear weight.

use half::f16;

use super::{Error, QuantScheme};

/// One linear weight quantized: a code per (padded) input, a scale and a zero point per
/// group, row-major by output.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedWeight {
    scheme: QuantScheme,
    out_features: usize,
    in_features: usize,
    group_len: usize,
    /// `out_features × padded_in` codes in `0..2^bits`.
    codes: Vec<u8>,
    /// `out_features × groups` scales.
    scales: Vec<f16>,
    /// `out_features × groups` zero points, in `0..2^bits` when quantized here (a packed
    /// `auto_round:auto_gptq` zero can unpack to `2^bits`).
    zeros: Vec<u16>,
}

/// Quantizes `weight` (`out_features × in_features`, row-major, as a linear layer stores it)
/// with round-to-nearest, exactly as auto-round's model-free path does (see the
/// [module docs](super)).
pub fn quantize_rtn(
    weight: &[f32],
    out_features: usize,
    in_features: usize,
    scheme: &QuantScheme,
) -> Result<QuantizedWeight, Error> {
    if out_features == 0
        || in_features == 0
        || out_features.checked_mul(in_features) != Some(weight.len())
    {
        return Err(Error::Shape {
            len: weight.len(),
            out_features,
            in_features,
        });
    }
    let group_len = scheme.group_size.len_for(in_features);
    let groups = in_features.div_ceil(group_len);
    let padded_in = groups * group_len;
    if padded_in % scheme.pack_factor() != 0 {
        return Err(Error::Unpackable {
            padded_in,
            pack_factor: scheme.pack_factor(),
        });
    }
    let mut codes = vec![0u8; out_features * padded_in];
    let mut scales = Vec::with_capacity(out_features * groups);
    let mut zeros = Vec::with_capacity(out_features * groups);
    let mut group = vec![0f32; group_len];
    for (row, row_codes) in weight
        .chunks_exact(in_features)
        .zip(codes.chunks_exact_mut(padded_in))
    {
        for (g, group_codes) in row_codes.chunks_exact_mut(group_len).enumerate() {
            let start = g * group_len;
            let end = (start + group_len).min(in_features);
            group[..end - start].copy_from_slice(&row[start..end]);
            group[end - start..].fill(0.0);
            let (scale, zero) = quantize_group(&group, group_codes, scheme);
            scales.push(scale);
            zeros.push(zero);
        }
    }
    QuantizedWeight::from_parts(*scheme, out_features, in_features, codes, scales, zeros)
}

/// auto-round's floor on a scale's magnitude (`q_scale_thresh` for fp16 scales).
fn scale_floor() -> f16 {
    f16::from_f32(1e-5)
}

/// The zero point auto-round gives the group `x`: how it fills the padding outputs of
/// `qzeros`.
pub(super) fn group_zero(x: &[f32], codes: &mut [u8], scheme: &QuantScheme) -> u16 {
    quantize_group(x, codes, scheme).1
}

/// Quantizes one group into `codes`, returning its scale and zero point.
fn quantize_group(x: &[f32], codes: &mut [u8], scheme: &QuantScheme) -> (f16, u16) {
    // torch's min/max reductions, then clamp(max=0) / clamp(min=0).
    let lo = x.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
    let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max).max(0.0);
    let bits = u32::from(scheme.bits);
    if scheme.sym {
        let maxq = (1u32 << (bits - 1)) as f32;
        let (lo_abs, hi_abs) = (-lo, hi);
        // (2 * (hi_abs < lo_abs) - 1) * max(hi_abs, lo_abs): the larger magnitude maps to -maxq.
        let sign = if hi_abs < lo_abs { 1.0 } else { -1.0 };
        let max_v = sign * hi_abs.max(lo_abs);
        let scale = f16::from_f32(max_v / maxq);
        let floor = scale_floor();
        // torch.where(scale < 0, clamp(scale, max=-thresh), clamp(scale, min=thresh))
        let scale = if scale < f16::ZERO {
            scale.min(-floor)
        } else {
            scale.max(floor)
        };
        let s = f32::from(scale);
        for (code, &v) in codes.iter_mut().zip(x) {
            let q = (v / s).round_ties_even().clamp(-maxq, maxq - 1.0);
            *code = (q + maxq) as u8;
        }
        (scale, maxq as u16)
    } else {
        let maxq = ((1u32 << bits) - 1) as f32;
        let scale = f16::from_f32((hi - lo) / maxq).max(scale_floor());
        let s = f32::from(scale);
        let zero = (-lo / s).round_ties_even();
        for (code, &v) in codes.iter_mut().zip(x) {
            *code = ((v / s).round_ties_even() + zero).clamp(0.0, maxq) as u8;
        }
        // auto-round stores the zero point clamped to the code range.
        (scale, zero.clamp(0.0, maxq) as u16)
    }
}

impl QuantizedWeight {
    /// Puts together a weight from its parts, checking they agree: how a packed weight is
    /// unpacked.
    pub(super) fn from_parts(
        scheme: QuantScheme,
        out_features: usize,
        in_features: usize,
        codes: Vec<u8>,
        scales: Vec<f16>,
        zeros: Vec<u16>,
    ) -> Result<QuantizedWeight, Error> {
        let group_len = scheme.group_size.len_for(in_features);
        let groups = in_features.div_ceil(group_len);
        let padded_in = groups * group_len;
        if out_features == 0
            || in_features == 0
            || codes.len() != out_features * padded_in
            || scales.len() != out_features * groups
            || zeros.len() != out_features * groups
        {
            return Err(Error::Packed(format!(
                "{} codes, {} scales and {} zero points do not make a {out_features} × \
                 {in_features} weight in groups of {group_len}",
                codes.len(),
                scales.len(),
                zeros.len()
            )));
        }
        Ok(QuantizedWeight {
            scheme,
            out_features,
            in_features,
            group_len,
            codes,
            scales,
            zeros,
        })
    }

    /// The scheme it was quantized with.
    pub fn scheme(&self) -> &QuantScheme {
        &self.scheme
    }

    /// The output dimension.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The input dimension, before padding.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// The input dimension padded to whole groups.
    pub fn padded_in(&self) -> usize {
        self.groups() * self.group_len
    }

    /// Groups per output row.
    pub fn groups(&self) -> usize {
        self.in_features.div_ceil(self.group_len)
    }

    /// Inputs per group.
    pub fn group_len(&self) -> usize {
        self.group_len
    }

    /// The codes, `out_features × padded_in`, row-major.
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }

    /// The scales, `out_features × groups`, row-major.
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }

    /// The zero points, `out_features × groups`, row-major.
    pub fn zeros(&self) -> &[u16] {
        &self.zeros
    }

    /// The weight the codes stand for, `out_features × in_features` (padding dropped):
    /// `scale × (code − zero)` in `f32`.
    pub fn dequantize(&self) -> Vec<f32> {
        let padded_in = self.padded_in();
        let groups = self.groups();
        let mut out = Vec::with_capacity(self.out_features * self.in_features);
        for (r, row) in self.codes.chunks_exact(padded_in).enumerate() {
            for (i, &code) in row[..self.in_features].iter().enumerate() {
                let g = r * groups + i / self.group_len;
                let scale = f32::from(self.scales[g]);
                out.push(scale * (f32::from(code) - f32::from(self.zeros[g])));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::GroupSize;
    use std::num::NonZeroUsize;

    fn scheme(bits: u8, group: usize, sym: bool) -> QuantScheme {
        let size = GroupSize::Size(NonZeroUsize::new(group).unwrap());
        QuantScheme::new(bits, size, sym).unwrap()
    }

    #[test]
    fn symmetric_maps_the_larger_magnitude_to_minus_maxq() {
        // hi = 0.7 > |lo| = 0.35: the scale is negative and 0.7 takes code 0 (-8 + 8).
        let w = [0.7, -0.35, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5];
        let q = quantize_rtn(&w, 1, 8, &scheme(4, 8, true)).unwrap();
        assert!(q.scales()[0] < f16::ZERO);
        assert_eq!(q.codes()[0], 0);
        assert_eq!(q.zeros(), [8]);
        // |lo| larger: a positive scale, and lo takes code 0.
        let w = [-0.7, 0.35, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5];
        let q = quantize_rtn(&w, 1, 8, &scheme(4, 8, true)).unwrap();
        assert!(q.scales()[0] > f16::ZERO);
        assert_eq!(q.codes()[0], 0);
    }

    #[test]
    fn an_all_zero_group_gets_the_scale_floor() {
        let q = quantize_rtn(&[0.0; 8], 1, 8, &scheme(4, 8, false)).unwrap();
        assert_eq!(q.scales(), [f16::from_f32(1e-5)]);
        assert_eq!(q.zeros(), [0]);
        assert_eq!(q.codes(), [0; 8]);
        let q = quantize_rtn(&[0.0; 8], 1, 8, &scheme(4, 8, true)).unwrap();
        assert_eq!(q.scales(), [f16::from_f32(1e-5)]);
        assert_eq!(q.codes(), [8; 8]);
    }

    #[test]
    fn the_input_is_padded_to_whole_groups_and_dequantized_without_the_padding() {
        let w: Vec<f32> = (0..2 * 40).map(|i| (i as f32 * 0.61).cos()).collect();
        let q = quantize_rtn(&w, 2, 40, &scheme(8, 32, false)).unwrap();
        assert_eq!((q.groups(), q.padded_in(), q.codes().len()), (2, 64, 128));
        let back = q.dequantize();
        assert_eq!(back.len(), 80);
        for (g, (a, b)) in w.iter().zip(&back).enumerate() {
            let scale = f32::from(q.scales()[g / 40 * 2 + g % 40 / 32]);
            assert!((a - b).abs() <= scale / 2.0 + 1e-7, "{a} vs {b}");
        }
    }

    #[test]
    fn bad_shapes_are_refused() {
        let err = quantize_rtn(&[0.0; 7], 2, 4, &scheme(4, 4, true)).unwrap_err();
        assert!(matches!(err, Error::Shape { len: 7, .. }));
        // 4 bits, groups of 4: 4 inputs do not fill a word of 8 codes.
        let err = quantize_rtn(&[0.0; 4], 1, 4, &scheme(4, 4, true)).unwrap_err();
        assert!(err.to_string().contains("8 codes"), "{err}");
    }

    #[test]
    fn per_channel_is_one_unpadded_group_per_row() {
        let w: Vec<f32> = (0..3 * 16).map(|i| i as f32 - 20.0).collect();
        let s = QuantScheme::new(4, GroupSize::PerChannel, false).unwrap();
        let q = quantize_rtn(&w, 3, 16, &s).unwrap();
        assert_eq!((q.groups(), q.padded_in()), (1, 16));
        assert_eq!(q.scales().len(), 3);
    }
}
