//! One record on disk: a checksummed, length-prefixed frame. Pure: bytes in,
//! bytes out, no I/O.
//!
//! ```text
//! len: u32 LE | crc: u32 LE | seq: u64 LE | arrival_ms: i64 LE | key_len: u16 LE | key | data
//!               \_____________________ crc32c covers these `len` bytes ______________________/
//! ```
//!
//! The length comes first so a scan can hop frames; the CRC covers everything
//! after it, so a torn or flipped frame is caught, and the sequence number is
//! inside the checked bytes so a frame from the wrong place is caught too.

/// Bytes before the checked body: `len` and `crc`.
pub(crate) const HEADER_LEN: usize = 8;
/// The fixed part of the body: `seq`, `arrival_ms`, `key_len`.
const FIXED_BODY_LEN: usize = 8 + 8 + 2;
/// Kinesis's limits, kept here so both backends refuse the same records.
pub(crate) const MAX_KEY_LEN: usize = 256;
pub(crate) const MAX_RECORD_LEN: usize = 1024 * 1024;
/// A body longer than this cannot have been written by [`encode`], so a length
/// field claiming more is corruption, not a large record.
const MAX_BODY_LEN: usize = FIXED_BODY_LEN + MAX_KEY_LEN + MAX_RECORD_LEN;

/// A decoded frame, borrowing from the buffer it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameRef<'a> {
    pub seq: u64,
    pub arrival_ms: i64,
    pub key: &'a str,
    pub data: &'a [u8],
}

/// What the bytes at the start of a buffer hold.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded<'a> {
    /// A whole, valid frame of `len` bytes (header included).
    Frame { frame: FrameRef<'a>, len: usize },
    /// The buffer ends inside a frame that would be `need` bytes long (or
    /// inside the header, when `need` is `HEADER_LEN`).
    Incomplete { need: usize },
    /// Not a frame [`encode`] could have written.
    Corrupt(Corruption),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Corruption {
    #[error("frame length {0} is out of range")]
    Length(u32),
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("frame key is not valid UTF-8 or overruns the frame")]
    Key,
}

/// The encoded size of a record with this key and data.
pub(crate) fn encoded_len(key: &str, data: &[u8]) -> usize {
    HEADER_LEN + FIXED_BODY_LEN + key.len() + data.len()
}

/// Whether [`encode`] accepts a record; the reason if not.
pub(crate) fn check_record(key: &str, data: &[u8]) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(format!(
            "partition key must be 1..={MAX_KEY_LEN} bytes, got {}",
            key.len()
        ));
    }
    if data.len() + key.len() > MAX_RECORD_LEN {
        return Err(format!(
            "record is {} bytes with its key, more than the {MAX_RECORD_LEN} allowed",
            data.len() + key.len()
        ));
    }
    Ok(())
}

/// Appends the frame for one record to `out`. The caller has checked the
/// record with [`check_record`].
pub(crate) fn encode(seq: u64, arrival_ms: i64, key: &str, data: &[u8], out: &mut Vec<u8>) {
    let body_len = FIXED_BODY_LEN + key.len() + data.len();
    let start = out.len();
    out.reserve(HEADER_LEN + body_len);
    // Length and checksum are filled in once the body is in place.
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&arrival_ms.to_le_bytes());
    // check_record bounds the key to MAX_KEY_LEN, far below u16::MAX.
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(data);
    let crc = crc32c::crc32c(&out[start + HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Reads the frame at the start of `buf`.
pub(crate) fn decode(buf: &[u8]) -> Decoded<'_> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Decoded::Incomplete { need: HEADER_LEN };
    };
    let body_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let len = body_len as usize;
    if !(FIXED_BODY_LEN..=MAX_BODY_LEN).contains(&len) {
        return Decoded::Corrupt(Corruption::Length(body_len));
    }
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Decoded::Incomplete {
            need: HEADER_LEN + len,
        };
    };
    if crc32c::crc32c(body) != crc {
        return Decoded::Corrupt(Corruption::Checksum);
    }
    let (fixed, rest) = body.split_at(FIXED_BODY_LEN);
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&fixed[..8]);
    let mut arrival = [0u8; 8];
    arrival.copy_from_slice(&fixed[8..16]);
    let key_len = usize::from(u16::from_le_bytes([fixed[16], fixed[17]]));
    if key_len > rest.len() {
        return Decoded::Corrupt(Corruption::Key);
    }
    let (key, data) = rest.split_at(key_len);
    let Ok(key) = std::str::from_utf8(key) else {
        return Decoded::Corrupt(Corruption::Key);
    };
    Decoded::Frame {
        frame: FrameRef {
            seq: u64::from_le_bytes(seq),
            arrival_ms: i64::from_le_bytes(arrival),
            key,
            data,
        },
        len: HEADER_LEN + len,
    }
}

/// The length a frame header claims, if the header is whole and the length
/// plausible: lets recovery count whole frames in a tail it drops.
pub(crate) fn claimed_len(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..HEADER_LEN)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    (FIXED_BODY_LEN..=MAX_BODY_LEN)
        .contains(&len)
        .then_some(HEADER_LEN + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(seq: u64, key: &str, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode(seq, 1_700_000_000_000 + seq as i64, key, data, &mut out);
        out
    }

    #[test]
    fn round_trips() {
        let mut buf = one(7, "dev-1", b"hello");
        buf.extend(one(8, "dev-2", b""));
        let Decoded::Frame { frame, len } = decode(&buf) else {
            panic!("first frame");
        };
        assert_eq!(len, encoded_len("dev-1", b"hello"));
        assert_eq!(
            frame,
            FrameRef {
                seq: 7,
                arrival_ms: 1_700_000_000_007,
                key: "dev-1",
                data: b"hello"
            }
        );
        let Decoded::Frame { frame, len: len2 } = decode(&buf[len..]) else {
            panic!("second frame");
        };
        assert_eq!((frame.seq, frame.key, frame.data), (8, "dev-2", &b""[..]));
        assert_eq!(len + len2, buf.len());
    }

    #[test]
    fn every_truncation_is_incomplete() {
        let buf = one(1, "k", b"0123456789");
        for cut in 0..buf.len() {
            assert!(
                matches!(decode(&buf[..cut]), Decoded::Incomplete { .. }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn every_flipped_body_byte_is_caught() {
        let buf = one(1, "k", b"0123456789");
        for i in HEADER_LEN..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert_eq!(
                decode(&bad),
                Decoded::Corrupt(Corruption::Checksum),
                "byte {i}"
            );
        }
    }

    #[test]
    fn zeroes_and_huge_lengths_are_corrupt() {
        assert_eq!(decode(&[0u8; 64]), Decoded::Corrupt(Corruption::Length(0)));
        let mut buf = one(1, "k", b"x");
        buf[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&buf), Decoded::Corrupt(Corruption::Length(u32::MAX)));
        assert_eq!(claimed_len(&buf), None);
    }

    #[test]
    fn limits_match_kinesis() {
        assert!(check_record("", b"x").is_err());
        assert!(check_record(&"k".repeat(257), b"x").is_err());
        assert!(check_record("k", &vec![0u8; MAX_RECORD_LEN]).is_err());
        assert!(check_record("k", &vec![0u8; MAX_RECORD_LEN - 1]).is_ok());
    }
}
