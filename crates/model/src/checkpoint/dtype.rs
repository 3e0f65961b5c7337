//! Element types as safetensors and torch name them, and conversion between the float ones.

use std::fmt;

use half::{bf16, f16};

use crate::error::{Error, Result};

/// The element type of a stored tensor.
///
/// Floats convert to a compute dtype; integer and boolean tensors (token ids, masks,
/// quantized payloads) are passed through untouched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum StoredDType {
    /// `bool`, one byte per element.
    Bool,
    /// `uint8`.
    U8,
    /// `int8`.
    I8,
    /// `int16`.
    I16,
    /// `uint16`.
    U16,
    /// `int32`.
    I32,
    /// `uint32`.
    U32,
    /// `int64`.
    I64,
    /// `uint64`.
    U64,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE single precision.
    F32,
    /// IEEE double precision.
    F64,
}

pub(super) const ALL: [StoredDType; 13] = [
    StoredDType::Bool,
    StoredDType::U8,
    StoredDType::I8,
    StoredDType::I16,
    StoredDType::U16,
    StoredDType::I32,
    StoredDType::U32,
    StoredDType::I64,
    StoredDType::U64,
    StoredDType::F16,
    StoredDType::BF16,
    StoredDType::F32,
    StoredDType::F64,
];

impl StoredDType {
    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            StoredDType::Bool | StoredDType::U8 | StoredDType::I8 => 1,
            StoredDType::I16 | StoredDType::U16 | StoredDType::F16 | StoredDType::BF16 => 2,
            StoredDType::I32 | StoredDType::U32 | StoredDType::F32 => 4,
            StoredDType::I64 | StoredDType::U64 | StoredDType::F64 => 8,
        }
    }

    /// Whether this is a floating-point type, which converts to a compute dtype.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            StoredDType::F16 | StoredDType::BF16 | StoredDType::F32 | StoredDType::F64
        )
    }

    /// The name the safetensors header uses (`"F32"`, `"BF16"`, ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            StoredDType::Bool => "BOOL",
            StoredDType::U8 => "U8",
            StoredDType::I8 => "I8",
            StoredDType::I16 => "I16",
            StoredDType::U16 => "U16",
            StoredDType::I32 => "I32",
            StoredDType::U32 => "U32",
            StoredDType::I64 => "I64",
            StoredDType::U64 => "U64",
            StoredDType::F16 => "F16",
            StoredDType::BF16 => "BF16",
            StoredDType::F32 => "F32",
            StoredDType::F64 => "F64",
        }
    }

    /// Parses a safetensors dtype name.
    pub fn from_safetensors_name(name: &str) -> Option<StoredDType> {
        ALL.into_iter().find(|d| d.safetensors_name() == name)
    }

    /// Parses a user-facing name: `f32`, `f16`, `bf16` (any case), or a safetensors name.
    pub fn parse(name: &str) -> Option<StoredDType> {
        StoredDType::from_safetensors_name(&name.to_ascii_uppercase())
    }

    /// Byte count of `shape` elements, or `None` if it overflows `u64`.
    pub fn byte_len(self, shape: &[usize]) -> Option<u64> {
        shape
            .iter()
            .try_fold(self.size_in_bytes() as u64, |acc, &dim| {
                acc.checked_mul(dim as u64)
            })
    }
}

impl fmt::Display for StoredDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.safetensors_name().to_ascii_lowercase())
    }
}

/// Converts little-endian elements of `from` into `to`, appending to `out`.
///
/// Equal dtypes copy. Floats convert between each other (rounding to nearest even when
/// narrowing). Anything else is refused: integer tensors are passed through, never cast.
pub fn convert_into(
    tensor: &str,
    bytes: &[u8],
    from: StoredDType,
    to: StoredDType,
    out: &mut Vec<u8>,
) -> Result<()> {
    if from == to {
        out.extend_from_slice(bytes);
        return Ok(());
    }
    if !from.is_float() || !to.is_float() {
        return Err(Error::Conversion {
            tensor: tensor.to_owned(),
            from: from.to_string(),
            to: to.to_string(),
        });
    }
    let (from_len, to_len) = (from.size_in_bytes(), to.size_in_bytes());
    let start = out.len();
    out.resize(start + bytes.len() / from_len * to_len, 0);
    let pairs = bytes
        .chunks_exact(from_len)
        .zip(out[start..].chunks_exact_mut(to_len));
    // The pairs a model is loaded through get loops the compiler vectorizes (a bf16 is the
    // top half of an f32); each rounds once at most, as the general path through f64 does.
    match (from, to) {
        (StoredDType::BF16, StoredDType::F32) => pairs.for_each(|(s, d)| {
            let bits = u32::from(u16::from_le_bytes([s[0], s[1]])) << 16;
            d.copy_from_slice(&bits.to_le_bytes());
        }),
        (StoredDType::F16, StoredDType::F32) => pairs.for_each(|(s, d)| {
            d.copy_from_slice(&f16::from_le_bytes([s[0], s[1]]).to_f32().to_le_bytes());
        }),
        (StoredDType::F32, StoredDType::BF16) => pairs.for_each(|(s, d)| {
            let value = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            d.copy_from_slice(&bf16::from_f32(value).to_le_bytes());
        }),
        (StoredDType::F32, StoredDType::F16) => pairs.for_each(|(s, d)| {
            let value = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            d.copy_from_slice(&f16::from_f32(value).to_le_bytes());
        }),
        // Every other pair goes through f64, exact for every source; the narrowing into
        // a half goes from f32 (exact but for an f64 source): `half`'s own f64 conversions
        // drop the low mantissa bits before rounding, and can round a value just above a
        // tie down.
        _ => pairs.for_each(|(s, d)| write_float(read_float(s, from), to, d)),
    }
    Ok(())
}

/// Decodes little-endian float elements into `f32` values.
pub fn to_f32_vec(tensor: &str, bytes: &[u8], dtype: StoredDType) -> Result<Vec<f32>> {
    if !dtype.is_float() {
        return Err(Error::Conversion {
            tensor: tensor.to_owned(),
            from: dtype.to_string(),
            to: StoredDType::F32.to_string(),
        });
    }
    let mut values = Vec::with_capacity(bytes.len() / dtype.size_in_bytes());
    extend_f32(bytes, dtype, &mut values);
    Ok(values)
}

/// Appends little-endian float elements to `out` as `f32`, straight into the vector (no
/// zeroed buffer, no second copy): a stage of a bf16 model is widened this way every time
/// it streams in. Exact for bf16 and f16 (a bf16 is the top half of an f32).
pub(crate) fn extend_f32(bytes: &[u8], dtype: StoredDType, out: &mut Vec<f32>) {
    match dtype {
        StoredDType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|s| f32::from_bits(u32::from(u16::from_le_bytes([s[0], s[1]])) << 16)),
        ),
        StoredDType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|s| f16::from_le_bytes([s[0], s[1]]).to_f32()),
        ),
        StoredDType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|s| f32::from_le_bytes([s[0], s[1], s[2], s[3]])),
        ),
        _ => out.extend(
            bytes
                .chunks_exact(dtype.size_in_bytes())
                .map(|element| read_float(element, dtype) as f32),
        ),
    }
}

fn read_float(element: &[u8], dtype: StoredDType) -> f64 {
    // `chunks_exact` hands over exactly `size_in_bytes` bytes, so one arm always matches.
    match (dtype, element) {
        (StoredDType::F16, &[a, b]) => f16::from_le_bytes([a, b]).to_f64(),
        (StoredDType::BF16, &[a, b]) => bf16::from_le_bytes([a, b]).to_f64(),
        (StoredDType::F32, &[a, b, c, d]) => f64::from(f32::from_le_bytes([a, b, c, d])),
        (StoredDType::F64, &[a, b, c, d, e, f, g, h]) => {
            f64::from_le_bytes([a, b, c, d, e, f, g, h])
        }
        _ => f64::NAN,
    }
}

/// Writes `value` into `out`, exactly `dtype`'s size.
fn write_float(value: f64, dtype: StoredDType, out: &mut [u8]) {
    match dtype {
        StoredDType::F16 => out.copy_from_slice(&f16::from_f32(value as f32).to_le_bytes()),
        StoredDType::BF16 => out.copy_from_slice(&bf16::from_f32(value as f32).to_le_bytes()),
        StoredDType::F32 => out.copy_from_slice(&(value as f32).to_le_bytes()),
        StoredDType::F64 => out.copy_from_slice(&value.to_le_bytes()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for dtype in ALL {
            assert_eq!(
                StoredDType::from_safetensors_name(dtype.safetensors_name()),
                Some(dtype)
            );
            assert_eq!(StoredDType::parse(&dtype.to_string()), Some(dtype));
        }
        assert_eq!(StoredDType::from_safetensors_name("F8_E4M3"), None);
    }

    #[test]
    fn byte_len_checks_overflow() {
        assert_eq!(StoredDType::BF16.byte_len(&[3, 4]), Some(24));
        assert_eq!(StoredDType::F32.byte_len(&[]), Some(4));
        assert_eq!(StoredDType::F64.byte_len(&[usize::MAX, 2]), None);
    }

    fn values(bytes: &[u8], dtype: StoredDType) -> Vec<f64> {
        bytes
            .chunks_exact(dtype.size_in_bytes())
            .map(|e| read_float(e, dtype))
            .collect()
    }

    fn converted(bytes: &[u8], from: StoredDType, to: StoredDType) -> Vec<f64> {
        let mut out = vec![7u8; 3]; // appended after what is there
        convert_into("w", bytes, from, to, &mut out).unwrap();
        assert_eq!(out[..3], [7, 7, 7]);
        values(&out[3..], to)
    }

    fn same(a: f64, b: f64) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// `x` rounded to nearest even with `bits` mantissa bits, for `x` normal in the target.
    fn round_to_mantissa(x: f32, bits: i32) -> f64 {
        let exponent = ((x.to_bits() >> 23) & 0xff) as i32 - 127;
        let ulp = 2f64.powi(exponent - bits);
        (f64::from(x) / ulp).round_ties_even() * ulp
    }

    #[test]
    fn every_half_widens_exactly() {
        let halves: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
        for from in [StoredDType::BF16, StoredDType::F16] {
            let widened = converted(&halves, from, StoredDType::F32);
            let exact = values(&halves, from);
            assert!(
                widened.iter().zip(&exact).all(|(a, b)| same(*a, *b)),
                "{from}"
            );
        }
    }

    #[test]
    fn floats_narrow_to_nearest_even_wherever_the_deciding_bits_lie() {
        // Ties, one above and below them (the deciding bit in the lowest of the f32's
        // mantissa, which a conversion through f64 that drops low bits misses), a sweep.
        let mut bits: Vec<u32> = (0..=u16::MAX)
            .flat_map(|h| {
                let h = u32::from(h) << 16;
                [h | 0x8000, h | 0x8001, h | 0x8005, h | 0x7fff]
            })
            .collect();
        bits.extend((0..1_000_000u32).map(|i| i.wrapping_mul(2_654_435_761)));
        let floats: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let brain = converted(&bytes, StoredDType::F32, StoredDType::BF16);
        let half = converted(&bytes, StoredDType::F32, StoredDType::F16);
        for (i, &x) in floats.iter().enumerate() {
            if x.is_finite() && x.abs() >= f32::MIN_POSITIVE && x.abs() < 3.3e38 {
                let expected = round_to_mantissa(x, 7);
                assert!(same(brain[i], expected), "bf16 of {x:e}: {}", brain[i]);
            }
            if x.is_finite() && x.abs() >= 2f32.powi(-14) && x.abs() < 65504.0 {
                let expected = round_to_mantissa(x, 10);
                assert!(same(half[i], expected), "f16 of {x:e}: {}", half[i]);
            }
        }
    }

    #[test]
    fn converts_between_floats() {
        let source: Vec<u8> = [1.5f32, -2.0, 65504.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut half = Vec::new();
        convert_into("w", &source, StoredDType::F32, StoredDType::F16, &mut half).unwrap();
        assert_eq!(
            to_f32_vec("w", &half, StoredDType::F16).unwrap(),
            [1.5, -2.0, 65504.0]
        );
        let mut brain = Vec::new();
        convert_into("w", &half, StoredDType::F16, StoredDType::BF16, &mut brain).unwrap();
        assert_eq!(
            to_f32_vec("w", &brain, StoredDType::BF16).unwrap()[..2],
            [1.5, -2.0]
        );
    }

    #[test]
    fn integers_pass_through_but_never_cast() {
        let ids = 7i64.to_le_bytes();
        let mut out = Vec::new();
        convert_into("ids", &ids, StoredDType::I64, StoredDType::I64, &mut out).unwrap();
        assert_eq!(out, ids);
        let err =
            convert_into("ids", &ids, StoredDType::I64, StoredDType::F16, &mut out).unwrap_err();
        assert!(err.to_string().contains("ids"), "{err}");
    }
}
