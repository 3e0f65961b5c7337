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
    scheme.check_packable(padded_in)?;
    let mut codes = vec![0u8; out_features * padded_in];
    let mut scales = vec![f16::ZERO; out_features * groups];
    let mut zeros = vec![0u16; out_features * groups];
    // Rows are independent: each worker quantizes a contiguous block of them into its own
    // slices of the outputs, so the result does not depend on how many there are.
    let rows = out_features.div_ceil(workers(weight.len()));
    parallel_chunks(
        weight
            .chunks(rows * in_features)
            .zip(codes.chunks_mut(rows * padded_in))
            .zip(
                scales
                    .chunks_mut(rows * groups)
                    .zip(zeros.chunks_mut(rows * groups)),
            ),
        |((weight, codes), (scales, zeros))| {
            quantize_rows(weight, codes, scales, zeros, in_features, group_len, scheme)
        },
    );
    QuantizedWeight::from_parts(*scheme, out_features, in_features, codes, scales, zeros)
}

/// Values below which one thread does the work (spawning costs more than it saves).
const PARALLEL_MIN_VALUES: usize = 1 << 16;

/// How many threads to split `values` weights' worth of work across: one per core the
/// process may use, or one for small work.
pub(super) fn workers(values: usize) -> usize {
    if values < PARALLEL_MIN_VALUES {
        return 1;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `work` on every item, each but the first on a scoped thread of its own, the first
/// on this one; returns when all are done.
pub(super) fn parallel_chunks<I, F>(items: I, work: F)
where
    I: IntoIterator,
    I::Item: Send,
    F: Fn(I::Item) + Sync,
{
    let mut items = items.into_iter();
    let Some(first) = items.next() else { return };
    std::thread::scope(|s| {
        for item in items {
            let work = &work;
            s.spawn(move || work(item));
        }
        work(first);
    });
}

/// Quantizes whole rows of `in_features` inputs: `codes` gets `padded_in` per row,
/// `scales` and `zeros` one per group.
fn quantize_rows(
    weight: &[f32],
    codes: &mut [u8],
    scales: &mut [f16],
    zeros: &mut [u16],
    in_features: usize,
    group_len: usize,
    scheme: &QuantScheme,
) {
    let padded_in = codes.len() / (weight.len() / in_features);
    let groups = padded_in / group_len;
    let mut group = vec![0f32; group_len];
    for (((row, row_codes), row_scales), row_zeros) in weight
        .chunks_exact(in_features)
        .zip(codes.chunks_exact_mut(padded_in))
        .zip(scales.chunks_exact_mut(groups))
        .zip(zeros.chunks_exact_mut(groups))
    {
        for (g, group_codes) in row_codes.chunks_exact_mut(group_len).enumerate() {
            let start = g * group_len;
            let end = (start + group_len).min(in_features);
            // A whole group is quantized from the row itself; only the last, padded one
            // from a copy.
            let x = if end - start == group_len {
                &row[start..end]
            } else {
                group[..end - start].copy_from_slice(&row[start..end]);
                group[end - start..].fill(0.0);
                &group[..]
            };
            let (scale, zero) = quantize_group(x, group_codes, scheme);
            row_scales[g] = scale;
            row_zeros[g] = zero;
        }
    }
}

/// `x` rounded to the nearest integer, ties to even, as `torch.round` does, for every `x`
/// whose magnitude is below 2^22 (a zero's sign aside, which no code depends on); beyond that (never a code: callers clamp to at most
/// 2^8) it stays beyond it with the same sign. Adding and removing 1.5 × 2^23 leaves
/// the rounding to the FPU's default mode, round to nearest even, without the library
/// call `round_ties_even` costs on x86-64 without SSE4.1.
#[inline(always)]
fn round_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    if x.abs() < 4_194_304.0 {
        (x + MAGIC) - MAGIC
    } else {
        x
    }
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
            let q = round_even(v / s).clamp(-maxq, maxq - 1.0);
            *code = (q + maxq) as u8;
        }
        (scale, maxq as u16)
    } else {
        let maxq = ((1u32 << bits) - 1) as f32;
        let scale = f16::from_f32((hi - lo) / maxq).max(scale_floor());
        let s = f32::from(scale);
        let zero = (-lo / s).round_ties_even();
        for (code, &v) in codes.iter_mut().zip(x) {
            *code = (round_even(v / s) + zero).clamp(0.0, maxq) as u8;
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
        let (padded_in, groups, in_features) = (self.padded_in(), self.groups(), self.in_features);
        let mut out = vec![0f32; self.out_features * in_features];
        // Rows are independent: each worker dequantizes a block of them.
        let rows = self.out_features.div_ceil(workers(out.len()));
        parallel_chunks(
            out.chunks_mut(rows * in_features)
                .zip(self.codes.chunks(rows * padded_in))
                .zip(
                    self.scales
                        .chunks(rows * groups)
                        .zip(self.zeros.chunks(rows * groups)),
                ),
            |((out, codes), (scales, zeros))| {
                for (((row, codes), scales), zeros) in out
                    .chunks_exact_mut(in_features)
                    .zip(codes.chunks_exact(padded_in))
                    .zip(scales.chunks_exact(groups))
                    .zip(zeros.chunks_exact(groups))
                {
                    let groups = row
                        .chunks_mut(self.group_len)
                        .zip(codes.chunks(self.group_len));
                    for ((values, codes), (&scale, &zero)) in groups.zip(scales.iter().zip(zeros)) {
                        let (scale, zero) = (f32::from(scale), f32::from(zero));
                        for (value, &code) in values.iter_mut().zip(codes) {
                            *value = scale * (f32::from(code) - zero);
                        }
                    }
                }
            },
        );
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
    fn round_even_is_round_ties_even_wherever_a_code_can_land() {
        let mut x = -300.0f32;
        while x <= 300.0 {
            for v in [x, x + 0.5, x.next_up(), (x + 0.5).next_down()] {
                // Equal as numbers: -0.5 gives +0 here and -0 there, the same code.
                assert_eq!(round_even(v), v.round_ties_even(), "{v}");
            }
            x += 0.25;
        }
        for v in [
            -0.0,
            0.49999997,
            2.5,
            -2.5,
            4_194_303.5,
            -4_194_303.5,
            1e9,
            -1e9,
        ] {
            assert_eq!(round_even(v), v.round_ties_even(), "{v}");
        }
        assert_eq!(round_even(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn a_weight_split_across_threads_equals_its_rows_quantized_one_by_one() {
        // Large enough to be split; 37 rows do not divide evenly between workers.
        let (out, inputs) = (37, 4096);
        let w: Vec<f32> = (0..out * inputs)
            .map(|i| ((i as f32) * 0.013).sin() * (1.0 + (i % 97) as f32))
            .collect();
        for s in [
            scheme(4, 128, true),
            scheme(2, 32, false),
            scheme(8, 64, true),
        ] {
            let whole = quantize_rtn(&w, out, inputs, &s).unwrap();
            let mut codes = Vec::new();
            let (mut scales, mut zeros) = (Vec::new(), Vec::new());
            for row in w.chunks_exact(inputs) {
                let q = quantize_rtn(row, 1, inputs, &s).unwrap();
                codes.extend_from_slice(q.codes());
                scales.extend_from_slice(q.scales());
                zeros.extend_from_slice(q.zeros());
            }
            assert_eq!(whole.codes(), codes.as_slice());
            assert_eq!(whole.scales(), scales.as_slice());
            assert_eq!(whole.zeros(), zeros.as_slice());
            assert_eq!(whole.pack().unpack(inputs).unwrap(), whole);
        }
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
