//! The quantile sketch every window carries: DDSketch's logarithmic mapping
//! (Masson, Rim and Lee, VLDB 2019) over sparse bins.
//!
//! A value `v > 0` falls in bin `ceil(ln v / ln γ)` with `γ = (1 + α) / (1 − α)`;
//! every value in a bin is within relative error `α` of the bin's
//! representative `2γᵏ / (γ + 1)`, so any quantile read back is within `α` of
//! the true value at that rank. Negative values use the same mapping on
//! their magnitude; values too close to zero share a zero bin.
//!
//! The bins are kept sparse (sorted `(key, count)` pairs) rather than in
//! DDSketch's usual dense arrays: a window of a slowly changing sensor
//! touches a handful of bins, and iotpipe keeps millions of windows, each
//! decoded, merged and re-encoded on every update. Merging adds counts bin by
//! bin, so it is exact: a merged sketch is the sketch of the union.

use serde::{Deserialize, Serialize};

/// Relative accuracy of every quantile.
pub const SKETCH_ALPHA: f64 = 0.01;
/// Magnitudes at or below this count as zero.
const MIN_VALUE: f64 = 1e-9;
/// Bins per sign before the lowest ones are collapsed together. 2048 bins
/// at 1% cover magnitudes from 1e-9 to 1e9; beyond that, accuracy is kept
/// for the larger values, as DDSketch's collapsing-lowest store does.
const MAX_BINS: usize = 2048;

fn gamma_ln() -> f64 {
    ((1.0 + SKETCH_ALPHA) / (1.0 - SKETCH_ALPHA)).ln()
}

/// Where a value lands: computed once per value, then added to any number
/// of sketches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinKey {
    Negative(i32),
    Zero,
    Positive(i32),
}

impl BinKey {
    pub fn of(v: f64) -> BinKey {
        let magnitude = v.abs();
        // NaN lands here too; validation keeps it out anyway.
        if magnitude.is_nan() || magnitude <= MIN_VALUE {
            return BinKey::Zero;
        }
        let key = (magnitude.ln() / gamma_ln()).ceil();
        let key = key.clamp(i32::MIN as f64, i32::MAX as f64) as i32;
        if v < 0.0 {
            BinKey::Negative(key)
        } else {
            BinKey::Positive(key)
        }
    }
}

fn representative(key: i32) -> f64 {
    let g = gamma_ln();
    2.0 * (g * key as f64).exp() / (g.exp() + 1.0)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sketch {
    /// Sorted by key; keys of magnitudes.
    negative: Vec<(i32, u64)>,
    zero: u64,
    positive: Vec<(i32, u64)>,
}

fn add_to(bins: &mut Vec<(i32, u64)>, key: i32, n: u64) {
    match bins.binary_search_by_key(&key, |(k, _)| *k) {
        Ok(i) => bins[i].1 += n,
        Err(i) => {
            bins.insert(i, (key, n));
            if bins.len() > MAX_BINS {
                let (_, lowest) = bins.remove(0);
                bins[0].1 += lowest;
            }
        }
    }
}

fn merge_into(bins: &mut Vec<(i32, u64)>, other: &[(i32, u64)]) {
    if other.is_empty() {
        return;
    }
    if bins.is_empty() {
        bins.extend_from_slice(other);
        return;
    }
    // A few bins (the usual cell of a batch) go in place, without a new Vec.
    if other.len() <= 4 {
        for (key, n) in other {
            add_to(bins, *key, *n);
        }
        return;
    }
    let mut merged = Vec::with_capacity(bins.len() + other.len());
    let (mut a, mut b) = (bins.iter().peekable(), other.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.0 == y.0 => {
                merged.push((x.0, x.1 + y.1));
                a.next();
                b.next();
            }
            (Some(x), Some(y)) if x.0 < y.0 => {
                merged.push(**x);
                a.next();
            }
            (Some(_), Some(y)) => {
                merged.push(**y);
                b.next();
            }
            (Some(x), None) => {
                merged.push(**x);
                a.next();
            }
            (None, Some(y)) => {
                merged.push(**y);
                b.next();
            }
            (None, None) => break,
        }
    }
    if merged.len() > MAX_BINS {
        let excess = merged.len() - MAX_BINS;
        let collapsed: u64 = merged[..=excess].iter().map(|(_, n)| n).sum();
        merged.drain(..excess);
        merged[0].1 = collapsed;
    }
    *bins = merged;
}

impl Sketch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, v: f64) {
        self.add_key(BinKey::of(v), 1);
    }

    pub fn add_key(&mut self, key: BinKey, n: u64) {
        match key {
            BinKey::Negative(k) => add_to(&mut self.negative, k, n),
            BinKey::Zero => self.zero += n,
            BinKey::Positive(k) => add_to(&mut self.positive, k, n),
        }
    }

    pub fn merge(&mut self, other: &Sketch) {
        merge_into(&mut self.negative, &other.negative);
        self.zero += other.zero;
        merge_into(&mut self.positive, &other.positive);
    }

    pub fn count(&self) -> u64 {
        let side = |bins: &[(i32, u64)]| bins.iter().map(|(_, n)| n).sum::<u64>();
        side(&self.negative) + self.zero + side(&self.positive)
    }

    /// The value at rank `floor(q · (n − 1))`, within relative error α.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.count();
        if n == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = (q * (n - 1) as f64) as u64;
        let mut seen = 0u64;
        // Most negative first: the largest magnitudes of the negative side.
        for (key, count) in self.negative.iter().rev() {
            seen += count;
            if seen > rank {
                return Some(-representative(*key));
            }
        }
        seen += self.zero;
        if seen > rank {
            return Some(0.0);
        }
        for (key, count) in &self.positive {
            seen += count;
            if seen > rank {
                return Some(representative(*key));
            }
        }
        self.positive.last().map(|(k, _)| representative(*k))
    }

    /// Bins in use, for the cost of storing it.
    pub fn bins(&self) -> usize {
        self.negative.len() + self.positive.len() + usize::from(self.zero > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_reads_back_within_alpha() {
        for v in [
            1e-6,
            0.5,
            1.0,
            21.5,
            1e3,
            123_456.789,
            1e9,
            -0.25,
            -40.0,
            -1e7,
        ] {
            let mut s = Sketch::new();
            s.add(v);
            let got = s.quantile(0.5).unwrap();
            assert!(
                ((got - v) / v).abs() <= SKETCH_ALPHA,
                "{v} read back as {got}"
            );
        }
        let mut z = Sketch::new();
        z.add(0.0);
        assert_eq!(z.quantile(0.5), Some(0.0));
    }

    #[test]
    fn ranks_run_from_negative_to_positive() {
        let mut s = Sketch::new();
        for v in [-10.0, -1.0, 0.0, 1.0, 10.0] {
            s.add(v);
        }
        let q = |q| s.quantile(q).unwrap();
        assert!(q(0.0) < -9.0 && q(0.25) > -1.1 && q(0.25) < -0.9);
        assert_eq!(q(0.5), 0.0);
        assert!(q(1.0) > 9.0);
        assert_eq!(s.count(), 5);
    }

    #[test]
    fn merge_is_the_sketch_of_the_union() {
        let (mut a, mut b, mut all) = (Sketch::new(), Sketch::new(), Sketch::new());
        for i in 0..500 {
            let v = (i as f64 * 0.37).sin() * 100.0;
            if i % 3 == 0 {
                a.add(v)
            } else {
                b.add(v)
            }
            all.add(v);
        }
        a.merge(&b);
        assert_eq!(a, all);
    }

    #[test]
    fn bins_stay_bounded() {
        let mut s = Sketch::new();
        let mut v = 1e-8;
        while v < 1e12 {
            s.add(v);
            v *= 1.005;
        }
        assert!(s.bins() <= MAX_BINS);
        let top = s.quantile(1.0).unwrap();
        assert!((top / 1e12 - 1.0).abs() < 0.02, "{top}");
    }
}
