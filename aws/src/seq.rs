//! Kinesis sequence numbers, decimal strings, as [`SeqNo`]s.
//!
//! The conversion is exact or fails: a sequence number that does not fit is
//! an error, never a rounded or truncated value, because applied marks and
//! checkpoints compare these numbers and a wrong order would skip or repeat
//! records silently.

use schemas::SeqNo;

pub use schemas::seq::SeqNoError as SeqError;

/// Parses a sequence number as Kinesis writes it.
pub fn parse(seq: &str) -> Result<SeqNo, SeqError> {
    seq.parse::<SeqNo>()
}

/// The decimal string Kinesis expects back, e.g. in AFTER_SEQUENCE_NUMBER.
pub fn format(seq: SeqNo) -> String {
    seq.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_real_sequence_numbers() {
        assert_eq!(parse("0"), Ok(SeqNo::ZERO));
        assert_eq!(format(parse("17").unwrap()), "17");
        // A real stream's sequence numbers are 56 digits long.
        let real = "49590338271490256608559692538361571095921575989136588898";
        assert_eq!(format(parse(real).unwrap()), real);
        assert!(matches!(parse(""), Err(SeqError::NotDecimal(_))));
        assert!(matches!(parse("-1"), Err(SeqError::NotDecimal(_))));
        assert!(matches!(parse("+1"), Err(SeqError::NotDecimal(_))));
        assert!(matches!(parse(&"9".repeat(80)), Err(SeqError::TooLarge(_))));
    }
}
