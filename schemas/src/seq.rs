//! Stream positions.
//!
//! A Kinesis sequence number is a decimal string that real streams make 56
//! digits long (about 186 bits), and the API allows more; the embedded log
//! counts from 1. [`SeqNo`] is an unsigned 256-bit number (77 digits): `Copy`,
//! compared numerically, and refused with an error when it does not fit,
//! because applied marks and checkpoints compare positions, and a wrong order
//! would skip or repeat records silently.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A position in a shard. Limbs are most significant first, so the derived
/// order is numeric order.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SeqNo([u64; 4]);

/// Digits of the largest [`SeqNo`], the width of its zero-padded form.
pub const SEQ_DIGITS: usize = 78;

impl SeqNo {
    pub const ZERO: SeqNo = SeqNo([0; 4]);
    pub const MAX: SeqNo = SeqNo([u64::MAX; 4]);

    /// The value if it fits in a u64, as the embedded log's positions do.
    pub fn to_u64(self) -> Option<u64> {
        match self.0 {
            [0, 0, 0, v] => Some(v),
            _ => None,
        }
    }

    /// Decimal, zero-padded to [`SEQ_DIGITS`], so that string order is
    /// numeric order (sort keys).
    pub fn padded(self) -> String {
        format!("{:0>width$}", self.to_string(), width = SEQ_DIGITS)
    }

    fn mul_add(self, mul: u64, add: u64) -> Option<SeqNo> {
        let mut limbs = self.0;
        let mut carry = u128::from(add);
        for limb in limbs.iter_mut().rev() {
            let v = u128::from(*limb) * u128::from(mul) + carry;
            *limb = v as u64;
            carry = v >> 64;
        }
        (carry == 0).then_some(SeqNo(limbs))
    }

    fn div_rem(self, div: u64) -> (SeqNo, u64) {
        let mut limbs = self.0;
        let mut rem: u128 = 0;
        for limb in limbs.iter_mut() {
            let v = (rem << 64) | u128::from(*limb);
            *limb = (v / u128::from(div)) as u64;
            rem = v % u128::from(div);
        }
        (SeqNo(limbs), rem as u64)
    }
}

impl From<u64> for SeqNo {
    fn from(v: u64) -> Self {
        SeqNo([0, 0, 0, v])
    }
}

impl From<u128> for SeqNo {
    fn from(v: u128) -> Self {
        SeqNo([0, 0, (v >> 64) as u64, v as u64])
    }
}

impl From<u32> for SeqNo {
    fn from(v: u32) -> Self {
        SeqNo::from(u64::from(v))
    }
}

impl From<i32> for SeqNo {
    /// For literals in tests; negative values become zero.
    fn from(v: i32) -> Self {
        SeqNo::from(u64::try_from(v).unwrap_or(0))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeqNoError {
    #[error("`{0}` is not a decimal sequence number")]
    NotDecimal(String),
    #[error("sequence number `{0}` has more than {SEQ_DIGITS} digits' worth of bits (256)")]
    TooLarge(String),
}

impl FromStr for SeqNo {
    type Err = SeqNoError;

    fn from_str(s: &str) -> Result<SeqNo, SeqNoError> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SeqNoError::NotDecimal(s.chars().take(140).collect()));
        }
        let mut v = SeqNo::ZERO;
        // Nineteen digits at a time fit a u64.
        for chunk in s.as_bytes().chunks(19) {
            let mut part = 0u64;
            for b in chunk {
                part = part * 10 + u64::from(b - b'0');
            }
            v = v
                .mul_add(10u64.pow(chunk.len() as u32), part)
                .ok_or_else(|| SeqNoError::TooLarge(s.chars().take(140).collect()))?;
        }
        Ok(v)
    }
}

impl fmt::Display for SeqNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const CHUNK: u64 = 10_000_000_000_000_000_000; // 10^19
        let mut parts = Vec::new();
        let mut v = *self;
        loop {
            let (q, r) = v.div_rem(CHUNK);
            parts.push(r);
            if q == SeqNo::ZERO {
                break;
            }
            v = q;
        }
        let mut out = String::with_capacity(parts.len() * 19);
        for (i, p) in parts.iter().rev().enumerate() {
            if i == 0 {
                out.push_str(&p.to_string());
            } else {
                out.push_str(&format!("{p:019}"));
            }
        }
        f.pad(&out)
    }
}

impl fmt::Debug for SeqNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SeqNo({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_kinesis_numbers_round_trip_and_order() {
        let a: SeqNo = "49590338271490256608559692538361571095921575989136588898"
            .parse()
            .unwrap();
        let b: SeqNo = "49590338271490256608559692538361571095921575989136588899"
            .parse()
            .unwrap();
        let c: SeqNo = "9959033827149025660855969253836157109592157598913658889"
            .parse()
            .unwrap();
        assert!(a < b && c < a);
        assert_eq!(
            a.to_string(),
            "49590338271490256608559692538361571095921575989136588898"
        );
        assert_eq!(a.padded().len(), SEQ_DIGITS);
        assert!(c.padded() < a.padded());
        assert_eq!(SeqNo::MAX.to_string().parse::<SeqNo>(), Ok(SeqNo::MAX));
        assert_eq!(SeqNo::MAX.to_string().len(), SEQ_DIGITS);
    }

    #[test]
    fn small_numbers_behave_like_integers() {
        assert_eq!("0".parse::<SeqNo>(), Ok(SeqNo::ZERO));
        assert_eq!(SeqNo::from(17u64).to_string(), "17");
        assert_eq!(SeqNo::from(u128::MAX).to_string(), u128::MAX.to_string());
        assert_eq!(SeqNo::from(5u64).to_u64(), Some(5));
        assert_eq!(SeqNo::from(u128::MAX).to_u64(), None);
        assert!(SeqNo::from(9u64) < SeqNo::from(10u64));
        assert_eq!(format!("{:>4}", SeqNo::from(7u64)), "   7");
    }

    #[test]
    fn refuses_what_is_not_a_sequence_number() {
        for bad in ["", "-1", "+1", "1.5", "12a"] {
            assert!(
                matches!(bad.parse::<SeqNo>(), Err(SeqNoError::NotDecimal(_))),
                "{bad}"
            );
        }
        let huge = "9".repeat(80);
        assert!(matches!(
            huge.parse::<SeqNo>(),
            Err(SeqNoError::TooLarge(_))
        ));
    }
}
