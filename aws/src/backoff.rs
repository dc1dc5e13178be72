//! Exponential backoff with full jitter, shared by the AWS backends.
//!
//! Full jitter (a delay drawn uniformly from zero to the exponential cap)
//! spreads retries of many clients that failed together, which plain
//! doubling would keep in lockstep against a throttled shard or table.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The cap of the first retry's delay.
    pub initial: Duration,
    /// No delay exceeds this, however many attempts failed.
    pub max: Duration,
}

impl Backoff {
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max }
    }

    /// The cap for the delay after `failures` failed attempts (1 = the first
    /// failure): `initial * 2^(failures - 1)`, at most `max`.
    pub fn cap(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(20);
        self.initial.saturating_mul(1 << doublings).min(self.max)
    }

    /// A delay drawn uniformly from `[0, cap(failures)]`.
    pub fn delay(&self, failures: u32, rng: &mut impl Rng) -> Duration {
        let cap = self.cap(failures).as_micros() as u64;
        Duration::from_micros(rng.random_range(0..=cap))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn caps_double_up_to_the_max() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        let caps: Vec<u128> = (1..=6).map(|n| b.cap(n).as_millis()).collect();
        assert_eq!(caps, [10, 20, 40, 80, 100, 100]);
        assert_eq!(b.cap(u32::MAX), Duration::from_millis(100));
    }

    #[test]
    fn delays_stay_under_the_cap_and_spread() {
        let b = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        let mut rng = StdRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..100).map(|_| b.delay(4, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(80)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 50, "jitter should spread delays");
    }
}
