//! Deterministic sensor values: every value is a function of the run's seed,
//! the device index, the metric and the reading's `seq`, so that verify can
//! regenerate exactly what was published without having stored it.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::{Deserialize, Serialize};

/// The shape of a metric's values over time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Signal {
    /// A slow sine around the metric's base, plus a little noise.
    #[default]
    Sine,
    /// A mean-reverting random walk that starts afresh at each run's first seq.
    RandomWalk,
    /// A level that jumps between two values every 50 readings.
    Step,
    /// Noise around the base with a rare large spike (1 reading in 100).
    Spike,
    /// The base value, always.
    Constant,
}

impl Signal {
    pub const ALL: [Signal; 5] = [
        Signal::Sine,
        Signal::RandomWalk,
        Signal::Step,
        Signal::Spike,
        Signal::Constant,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Sine => "sine",
            Signal::RandomWalk => "random-walk",
            Signal::Step => "step",
            Signal::Spike => "spike",
            Signal::Constant => "constant",
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Signal {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Signal::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                format!("unknown signal `{s}`; use sine, random-walk, step, spike or constant")
            })
    }
}

/// A metric the devices report and the signal its values follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricSpec {
    pub name: String,
    #[serde(default)]
    pub signal: Signal,
}

/// Readings per sine period: long enough that a 1m window sees a trend.
const SINE_PERIOD: f64 = 600.0;
/// Readings per level of the step signal.
const STEP_LEN: u64 = 50;

/// Generates one device's values for one metric in one run.
///
/// Random access by `seq` is cheap for every signal but the random walk, which
/// keeps its last position so that walking forward costs one step per reading.
#[derive(Debug, Clone)]
pub struct SignalGen {
    signal: Signal,
    /// Noise source, reseeded per (seed, device, metric) and positioned by seq,
    /// so a value never depends on which values were asked for before.
    rng: ChaCha8Rng,
    base: f64,
    amp: f64,
    /// Phase of the sine, so that devices do not move in lockstep.
    phase: f64,
    /// The random walk restarts at the run's first seq; see [`Signal::RandomWalk`].
    first_seq: u64,
    /// The walk's last (seq, unrounded value), to continue from.
    walk: Option<(u64, f64)>,
}

impl SignalGen {
    pub fn new(seed: u64, device: u32, metric: &MetricSpec, first_seq: u64) -> Self {
        let key = mix(mix(seed, u64::from(device)), name_hash(&metric.name));
        let rng = ChaCha8Rng::seed_from_u64(key);
        let (base, amp) = base_and_amplitude(&metric.name);
        let phase = unit(mix(key, 0x5eed)) * std::f64::consts::TAU;
        SignalGen {
            signal: metric.signal,
            rng,
            base,
            amp,
            phase,
            first_seq,
            walk: None,
        }
    }

    /// The value of reading `seq`, rounded to 3 decimals (finite, and printed
    /// short in JSON, and still exact after a round trip through text).
    pub fn value(&mut self, seq: u64) -> f64 {
        let raw = match self.signal {
            Signal::Sine => {
                let angle = self.phase + std::f64::consts::TAU * (seq as f64 / SINE_PERIOD);
                self.base + self.amp * angle.sin() + self.amp * 0.1 * self.noise(seq)
            }
            Signal::RandomWalk => self.walk_to(seq),
            Signal::Step => {
                let high = (seq / STEP_LEN) % 2 == 1;
                self.base + if high { self.amp } else { -self.amp }
            }
            Signal::Spike => {
                let spike = self.uniform(seq, 1) < 0.01;
                self.base
                    + self.amp * 0.1 * self.noise(seq)
                    + if spike { self.amp * 5.0 } else { 0.0 }
            }
            Signal::Constant => self.base,
        };
        (raw * 1000.0).round() / 1000.0
    }

    fn walk_to(&mut self, seq: u64) -> f64 {
        let (mut at, mut v) = match self.walk {
            Some((at, v)) if at <= seq && at >= self.first_seq => (at, v),
            _ => (
                self.first_seq,
                self.base + self.amp * 0.5 * self.noise(self.first_seq),
            ),
        };
        while at < seq {
            at += 1;
            // Mean reversion keeps the walk near its base however long it runs.
            v += (self.base - v) * 0.02 + self.amp * 0.05 * self.noise(at);
        }
        self.walk = Some((at, v));
        v
    }

    /// Uniform in [-1, 1).
    fn noise(&mut self, seq: u64) -> f64 {
        self.uniform(seq, 0) * 2.0 - 1.0
    }

    /// Uniform in [0, 1): draw `lane` (0..4) of reading `seq`.
    fn uniform(&mut self, seq: u64, lane: u128) -> f64 {
        // Each reading owns 8 words of the ChaCha stream (4 draws of 2 words).
        self.rng.set_word_pos(u128::from(seq) * 8 + lane * 2);
        unit(self.rng.next_u64())
    }
}

/// A plausible range per well-known metric name, so that numbers look like the
/// sensor they claim to be; any other name gets a range from its hash.
fn base_and_amplitude(name: &str) -> (f64, f64) {
    match name {
        "temperature" => (21.0, 4.0),
        "humidity" => (45.0, 10.0),
        "pressure" => (1013.0, 8.0),
        "voltage" => (3.3, 0.2),
        "co2" => (600.0, 150.0),
        _ => {
            let h = name_hash(name);
            let base = (h % 1000) as f64 / 10.0;
            (base, 1.0 + (h >> 20) as f64 % 20.0)
        }
    }
}

/// FNV-1a: stable across builds and platforms, unlike std's hasher.
pub fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64's finaliser over a combined key: well spread and stable.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_add(0x9e37_79b9_7f4a_7c15).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Maps 64 random bits to [0, 1) with 53 bits of precision.
pub fn unit(x: u64) -> f64 {
    (x >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(signal: Signal) -> MetricSpec {
        MetricSpec {
            name: "temperature".into(),
            signal,
        }
    }

    #[test]
    fn values_depend_only_on_seed_device_metric_and_seq() {
        for signal in Signal::ALL {
            let mut a = SignalGen::new(7, 3, &spec(signal), 0);
            let forward: Vec<f64> = (0..300).map(|s| a.value(s)).collect();
            let mut b = SignalGen::new(7, 3, &spec(signal), 0);
            let backward: Vec<f64> = (0..300).rev().map(|s| b.value(s)).collect();
            let backward: Vec<f64> = backward.into_iter().rev().collect();
            assert_eq!(forward, backward, "{signal}");
            assert!(forward.iter().all(|v| v.is_finite()), "{signal}");
        }
        let mut other_seed = SignalGen::new(8, 3, &spec(Signal::Sine), 0);
        let mut same = SignalGen::new(7, 3, &spec(Signal::Sine), 0);
        assert_ne!(other_seed.value(5), same.value(5));
        let mut other_device = SignalGen::new(7, 4, &spec(Signal::Sine), 0);
        assert_ne!(other_device.value(5), same.value(5));
    }

    #[test]
    fn values_survive_a_json_round_trip() {
        let mut g = SignalGen::new(1, 1, &spec(Signal::Sine), 0);
        for s in 0..1000 {
            let v = g.value(s);
            let text = serde_json::to_string(&v).unwrap();
            assert_eq!(serde_json::from_str::<f64>(&text).unwrap(), v);
        }
    }

    #[test]
    fn signals_have_their_shape() {
        let mut c = SignalGen::new(1, 1, &spec(Signal::Constant), 0);
        assert!((0..100).all(|s| c.value(s) == 21.0));
        let mut st = SignalGen::new(1, 1, &spec(Signal::Step), 0);
        assert_eq!(st.value(0), 17.0);
        assert_eq!(st.value(50), 25.0);
        let mut sp = SignalGen::new(1, 1, &spec(Signal::Spike), 0);
        let spikes = (0..10_000).filter(|s| sp.value(*s) > 35.0).count();
        assert!((50..200).contains(&spikes), "{spikes}");
        let mut w = SignalGen::new(1, 1, &spec(Signal::RandomWalk), 100);
        let walk: Vec<f64> = (100..5000).map(|s| w.value(s)).collect();
        assert!(
            walk.iter().all(|v| (5.0..37.0).contains(v)),
            "the walk reverts to its mean"
        );
        assert!(walk.windows(2).any(|p| p[0] != p[1]));
    }

    #[test]
    fn signal_names_parse() {
        for s in Signal::ALL {
            assert_eq!(s.as_str().parse::<Signal>().unwrap(), s);
        }
        assert!("square".parse::<Signal>().is_err());
    }
}
