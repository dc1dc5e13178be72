//! The window sketch answers p50/p90/p99 within 1% relative error on a
//! million samples of very different shapes, and merging partial sketches
//! changes nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use schemas::Sketch;

const N: usize = 1_000_000;

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller: enough for a test distribution, no extra crate.
    let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn samples(shape: &str, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..N)
        .map(|_| match shape {
            "uniform" => rng.random_range(-50.0..150.0),
            "lognormal" => (1.0 + 1.5 * normal(&mut rng)).exp(),
            "bimodal" => {
                if rng.random_bool(0.7) {
                    20.0 + 2.0 * normal(&mut rng)
                } else {
                    85.0 + 5.0 * normal(&mut rng)
                }
            }
            _ => unreachable!(),
        })
        .collect()
}

/// The value at rank floor(q * (n - 1)) of the sorted samples, the rank the
/// sketch estimates.
fn exact(sorted: &[f64], q: f64) -> f64 {
    sorted[(q * (sorted.len() - 1) as f64) as usize]
}

#[test]
fn quantiles_are_within_one_percent() {
    for (seed, shape) in ["uniform", "lognormal", "bimodal"].into_iter().enumerate() {
        let mut values = samples(shape, seed as u64);
        let mut whole = Sketch::new();
        let mut parts: Vec<Sketch> = (0..10).map(|_| Sketch::new()).collect();
        for (i, v) in values.iter().enumerate() {
            whole.add(*v);
            parts[i % 10].add(*v);
        }
        let mut merged = Sketch::new();
        for p in &parts {
            merged.merge(p);
        }
        values.sort_by(f64::total_cmp);
        for q in [0.5, 0.9, 0.99] {
            let truth = exact(&values, q);
            let got = whole.quantile(q).unwrap();
            let err = ((got - truth) / truth).abs();
            println!(
                "{shape:>9} p{:<4} exact {truth:>12.6} sketch {got:>12.6} error {:.4}%",
                q * 100.0,
                err * 100.0
            );
            assert!(
                err <= 0.01,
                "{shape} p{}: sketch {got}, exact {truth}, error {err}",
                q * 100.0
            );
            assert_eq!(
                merged.quantile(q),
                whole.quantile(q),
                "{shape}: merge is not exact"
            );
        }
        let stored: Sketch = postcard::from_bytes(&postcard::to_allocvec(&whole).unwrap()).unwrap();
        assert_eq!(
            stored.quantile(0.99),
            whole.quantile(0.99),
            "{shape}: encoding loses bins"
        );
    }
}
