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
    out.reserve(bytes.len() / from.size_in_bytes() * to.size_in_bytes());
    // Going through f64 is exact for every source type here, so each pair needs one
    // rounding step at most: the narrowing into `to`.
    for element in bytes.chunks_exact(from.size_in_bytes()) {
        let value = read_float(element, from);
        write_float(value, to, out);
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
    Ok(bytes
        .chunks_exact(dtype.size_in_bytes())
        .map(|element| read_float(element, dtype) as f32)
        .collect())
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

fn write_float(value: f64, dtype: StoredDType, out: &mut Vec<u8>) {
    match dtype {
        StoredDType::F16 => out.extend_from_slice(&f16::from_f64(value).to_le_bytes()),
        StoredDType::BF16 => out.extend_from_slice(&bf16::from_f64(value).to_le_bytes()),
        StoredDType::F32 => out.extend_from_slice(&(value as f32).to_le_bytes()),
        StoredDType::F64 => out.extend_from_slice(&value.to_le_bytes()),
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
