//! Kinesis sequence numbers, decimal strings, as [`SeqNo`]s.
//!
//! The conversion is exact or fails: a sequence number that does not fit is
//! an error, never a rounded or truncated value, because applied marks and
//! checkpoints compare these numbers and a wrong order would skip or repeat
//! records silently.

use crate::SeqNo;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeqError {
    #[error("`{0}` is not a decimal sequence number")]
    NotDecimal(String),
    /// AWS documents sequence numbers of up to 129 digits; [`SeqNo`] holds 39.
    #[error("sequence number `{0}` does not fit in 128 bits")]
    TooLarge(String),
}

/// Parses a sequence number as Kinesis writes it.
pub fn parse(seq: &str) -> Result<SeqNo, SeqError> {
    if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SeqError::NotDecimal(seq.to_string()));
    }
    seq.parse::<SeqNo>()
        .map_err(|_| SeqError::TooLarge(seq.to_string()))
}

/// The decimal string Kinesis expects back, e.g. in AFTER_SEQUENCE_NUMBER.
pub fn format(seq: SeqNo) -> String {
    seq.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_what_does_not_fit() {
        assert_eq!(parse("0"), Ok(0));
        assert_eq!(
            parse("49590338271490256608559692538361571095"),
            Ok(49590338271490256608559692538361571095)
        );
        assert_eq!(format(parse("17").unwrap()), "17");
        assert_eq!(parse(&u128::MAX.to_string()), Ok(u128::MAX));
        // A real stream's sequence numbers are 56 digits long.
        let real = "49590338271490256608559692538361571095921575989136588898";
        assert_eq!(parse(real), Err(SeqError::TooLarge(real.to_string())));
        assert!(matches!(parse(""), Err(SeqError::NotDecimal(_))));
        assert!(matches!(parse("-1"), Err(SeqError::NotDecimal(_))));
        assert!(matches!(parse("+1"), Err(SeqError::NotDecimal(_))));
    }
}
