//! Kinesis's partitioning rule: the MD5 of the partition key, read as a 128-bit
//! big-endian number, falls into exactly one shard's hash-key range.

use md5::{Digest, Md5};

/// The 128-bit hash key Kinesis derives from a partition key.
pub fn hash_key(partition_key: &str) -> u128 {
    let digest = Md5::digest(partition_key.as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest);
    u128::from_be_bytes(bytes)
}

/// The inclusive hash-key ranges of `n` shards, split evenly as Kinesis's
/// CreateStream splits them.
pub fn even_ranges(n: u32) -> Vec<(u128, u128)> {
    let width = width(n);
    let n = u128::from(n.max(1));
    (0..n)
        .map(|i| {
            let start = i * width;
            let end = if i == n - 1 {
                u128::MAX
            } else {
                (i + 1) * width - 1
            };
            (start, end)
        })
        .collect()
}

/// floor(2^128 / n), the width Kinesis gives each of `n` new shards.
fn width(n: u32) -> u128 {
    let n = u128::from(n.max(1));
    if n == 1 {
        return u128::MAX;
    }
    u128::MAX / n + (u128::MAX % n + 1) / n
}

/// The index of the shard (of `n`, evenly split) that `partition_key` maps to.
pub fn shard_for(partition_key: &str, n: u32) -> u32 {
    let n = n.max(1);
    let index = hash_key(partition_key) / width(n);
    // The last shard also takes the remainder of the division.
    index.min(u128::from(n - 1)) as u32
}

/// [`shard_for`] of `partition_key` in a put, given the key and shard of
/// the record before it: a busy device's records come in runs, and hashing
/// each key again was about 5 % of iotpipe's user-space CPU at the
/// 200-device shape.
pub fn shard_after(partition_key: &str, previous: Option<(&str, u32)>, n: u32) -> u32 {
    match previous {
        Some((key, shard)) if key == partition_key => shard,
        _ => shard_for(partition_key, n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_is_read_big_endian() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(hash_key(""), 0xd41d8cd98f00b204e9800998ecf8427e);
    }

    #[test]
    fn ranges_match_kinesis_create_stream() {
        assert_eq!(even_ranges(2)[1].0, 170141183460469231731687303715884105728);
        assert_eq!(even_ranges(3)[1].0, 113427455640312821154458202477256070485);
        assert_eq!(even_ranges(3)[2].0, 226854911280625642308916404954512140970);
    }

    #[test]
    fn ranges_cover_the_space_without_gaps() {
        for n in [1, 2, 3, 4, 7, 16] {
            let r = even_ranges(n);
            assert_eq!(r.len(), n as usize);
            assert_eq!(r[0].0, 0);
            assert_eq!(r[r.len() - 1].1, u128::MAX);
            for w in r.windows(2) {
                assert_eq!(w[0].1 + 1, w[1].0);
            }
        }
    }

    #[test]
    fn a_run_of_one_key_keeps_its_shard_and_another_key_is_hashed() {
        let n = 4;
        let (a, b) = ("dev-1", "dev-2");
        let sa = shard_for(a, n);
        assert_eq!(shard_after(a, None, n), sa);
        assert_eq!(shard_after(a, Some((a, sa)), n), sa);
        // Another key is hashed, whatever shard came before.
        assert_eq!(
            shard_after(b, Some((a, n - 1 - shard_for(b, n))), n),
            shard_for(b, n)
        );
    }

    #[test]
    fn shard_for_agrees_with_the_ranges() {
        for n in [1, 2, 4, 5] {
            let ranges = even_ranges(n);
            for i in 0..2000 {
                let key = format!("dev-{i}");
                let h = hash_key(&key);
                let s = shard_for(&key, n) as usize;
                assert!(ranges[s].0 <= h && h <= ranges[s].1, "{key} n={n}");
            }
        }
    }

    #[test]
    fn keys_spread_over_shards() {
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[shard_for(&format!("dev-{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
