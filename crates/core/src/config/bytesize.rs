//! Byte sizes written the way people write them: `"512MiB"`, `"2GB"`, `"1.5 GiB"`, `4096`.
//!
//! Binary units (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024 and decimal units (`KB`,
//! `MB`, `GB`, `TB`) powers of 1000, as IEC 80000-13 defines them; a budget of `"2GB"` is
//! therefore 2,000,000,000 bytes, 147 MB less than `"2GiB"`. Units are matched without
//! regard to case, and a bare `K`, `M`, `G` or `T` means the binary unit, as `ulimit` and
//! most ML tools read it.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A number of bytes, parsed from `"512MiB"`-style strings and written back the same way.
///
/// ```
/// use memwise::config::ByteSize;
///
/// let budget: ByteSize = "2GiB".parse().unwrap();
/// assert_eq!(budget.bytes(), 2 << 30);
/// assert_eq!("2GB".parse::<ByteSize>().unwrap().bytes(), 2_000_000_000);
/// assert_eq!(budget.to_string(), "2GiB");
/// assert!("2 gigs".parse::<ByteSize>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// Units from the largest down, so that [`ByteSize`]'s `Display` picks the largest exact one.
const UNITS: [(&str, u64); 8] = [
    ("TiB", 1 << 40),
    ("TB", 1_000_000_000_000),
    ("GiB", 1 << 30),
    ("GB", 1_000_000_000),
    ("MiB", 1 << 20),
    ("MB", 1_000_000),
    ("KiB", 1 << 10),
    ("KB", 1_000),
];

impl ByteSize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl From<u64> for ByteSize {
    fn from(bytes: u64) -> Self {
        ByteSize(bytes)
    }
}

/// Why a byte-size string was refused; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteSizeError(String);

impl fmt::Display for ByteSizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ByteSizeError {}

impl FromStr for ByteSize {
    type Err = ByteSizeError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let refuse = |why: &str| {
            ByteSizeError(format!(
                "{text:?} is not a byte size ({why}); write a number and a unit, e.g. \"512MiB\", \"2GB\" or \"1.5GiB\""
            ))
        };
        let trimmed = text.trim();
        let split = trimmed
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(trimmed.len());
        let (number, unit) = trimmed.split_at(split);
        if number.is_empty() {
            return Err(refuse("it does not start with a number"));
        }
        let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "t" | "tib" => 1 << 40,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            "tb" => 1_000_000_000_000,
            _ => return Err(refuse(&format!("unknown unit {:?}", unit.trim()))),
        };
        // Whole numbers are multiplied exactly; only fractions go through f64, where a
        // byte of rounding does not matter to a budget.
        let bytes = match number.parse::<u64>() {
            Ok(whole) => whole.checked_mul(multiplier),
            Err(_) => {
                let value: f64 = number
                    .parse()
                    .map_err(|_| refuse("the number is malformed"))?;
                let bytes = (value * multiplier as f64).round();
                (bytes < u64::MAX as f64).then_some(bytes as u64)
            }
        };
        bytes
            .map(ByteSize)
            .ok_or_else(|| refuse("it is larger than 16 EiB"))
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides the size exactly, so the text parses back to the
    /// same number of bytes: `2GiB`, `2GB`, `1536MiB`, `1KB`, `12345B` and `0B`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = UNITS
            .iter()
            .find(|(_, size)| self.0 != 0 && self.0 % size == 0);
        match unit {
            Some((name, size)) => write!(f, "{}{name}", self.0 / size),
            None => write!(f, "{}B", self.0),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Bytes(u64),
            Text(String),
        }
        match Written::deserialize(deserializer)? {
            Written::Bytes(bytes) => Ok(ByteSize(bytes)),
            Written::Text(text) => text.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<u64, ByteSizeError> {
        text.parse::<ByteSize>().map(ByteSize::bytes)
    }

    #[test]
    fn binary_and_decimal_units_differ() {
        assert_eq!(parse("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse("512MB").unwrap(), 512_000_000);
        assert_eq!(parse("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse("2 gib").unwrap(), 2 << 30);
        assert_eq!(parse("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse("4096").unwrap(), 4096);
        assert_eq!(parse("8k").unwrap(), 8192);
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        for bad in ["", "GiB", "2 gigs", "1.2.3MB", "-1GB", "99999999999TiB"] {
            let err = parse(bad).unwrap_err().to_string();
            assert!(err.contains("512MiB"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn display_parses_back_to_the_same_bytes() {
        for bytes in [0, 1, 1000, 1024, 1536 << 20, 2 << 30, 2_000_000_000, 12345] {
            let text = ByteSize(bytes).to_string();
            assert_eq!(parse(&text).unwrap(), bytes, "{text}");
        }
        assert_eq!(ByteSize(2 << 30).to_string(), "2GiB");
        assert_eq!(ByteSize(2_000_000_000).to_string(), "2GB");
    }
}
