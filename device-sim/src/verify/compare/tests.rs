use super::*;

fn agg(values: &[(i64, f64)]) -> ExpectedAgg {
    let mut a = ExpectedAgg::default();
    for (ts, v) in values {
        a.add(*ts, *v, false, false);
    }
    a
}

/// Read at the epoch, for a run that began at the epoch: every window
/// in these tests ends after it, so none is final yet.
const FIN: Finality = Finality {
    allowed_lateness_ms: 3_600_000,
    read_by_ms: 0,
    settled_ms: 0,
};

/// The window as a correct pipeline would report it: quantiles at rank
/// `floor(q·(n − 1))`.
fn view(agg: &ExpectedAgg, start: i64) -> ApiWindow {
    let e = &agg.sure;
    let n = e.count as f64;
    let q = |q: f64| e.values.at((q * (n - 1.0)).floor() as u64).unwrap();
    ApiWindow {
        start,
        end: start + 60_000,
        count: e.count,
        sum: e.sum,
        min: e.min,
        max: e.max,
        avg: e.sum / n,
        stddev: e.variance().sqrt(),
        first: ApiPoint {
            ts: e.first.0,
            value: e.first.1,
        },
        last: ApiPoint {
            ts: e.last.0,
            value: e.last.1,
        },
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        late_count: agg.late_lo as u64,
        revision: agg.late_lo as u64,
        is_final: false,
    }
}

/// 3 certain readings and one (18.0, the earliest) that may have been
/// lost, and the window a pipeline that accepted it would show.
fn uncertain() -> (ExpectedAgg, ApiWindow) {
    let mut e = agg(&[(1, 20.5), (2, 21.25), (3, 19.0)]);
    e.add(0, 18.0, false, true);
    let all = agg(&[(1, 20.5), (2, 21.25), (3, 19.0), (0, 18.0)]);
    (e, view(&all, 0))
}

fn uncertain_mismatches(got: &[ApiWindow], e: &ExpectedAgg) -> Vec<String> {
    let mut tally = Tally::default();
    compare_series("s", 60_000, [(0, e)], got, &FIN, &mut tally);
    assert_eq!((tally.windows, tally.uncertain), (0, 1));
    tally.mismatches.into_iter().map(|m| m.field).collect()
}

#[test]
fn an_uncertain_window_passes_with_or_without_its_uncertain_readings() {
    let (e, with) = uncertain();
    assert!(uncertain_mismatches(&[with], &e).is_empty());
    let without = view(&agg(&[(1, 20.5), (2, 21.25), (3, 19.0)]), 0);
    assert!(uncertain_mismatches(&[without], &e).is_empty());
    // Every reading uncertain: no window at all is possible.
    let mut all_maybe = ExpectedAgg::default();
    all_maybe.add(1, 20.0, false, true);
    assert!(uncertain_mismatches(&[], &all_maybe).is_empty());
    assert_eq!(uncertain_mismatches(&[], &e), ["window"]);
}

#[test]
fn an_uncertain_window_is_held_on_count_and_sum_bounds() {
    let (e, g) = uncertain();
    let wrong = |g: ApiWindow| uncertain_mismatches(&[g], &e);
    for count in [2, 5] {
        let avg = g.sum / count as f64;
        assert_eq!(
            wrong(ApiWindow {
                count,
                avg,
                ..g.clone()
            }),
            ["count"]
        );
    }
    // Below the certain readings' sum, or above all of them.
    assert_eq!(
        wrong(ApiWindow {
            sum: 60.0,
            avg: 15.0,
            ..g.clone()
        }),
        ["sum"]
    );
    assert_eq!(
        wrong(ApiWindow {
            sum: 79.0,
            avg: 19.75,
            ..g.clone()
        }),
        ["sum"]
    );
}

#[test]
fn an_uncertain_window_is_held_on_extremes_quantiles_and_lateness() {
    let (e, g) = uncertain();
    let wrong = |g: ApiWindow| uncertain_mismatches(&[g], &e);
    // min above the certain min; max below the certain max; either
    // outside every reading.
    assert_eq!(
        wrong(ApiWindow {
            min: 19.5,
            ..g.clone()
        }),
        ["min"]
    );
    assert_eq!(
        wrong(ApiWindow {
            min: 17.0,
            ..g.clone()
        }),
        ["min"]
    );
    assert_eq!(
        wrong(ApiWindow {
            max: 21.0,
            ..g.clone()
        }),
        ["max"]
    );
    let first = ApiPoint {
        ts: 2,
        value: 21.25,
    };
    assert_eq!(wrong(ApiWindow { first, ..g.clone() }), ["first"]);
    assert_eq!(
        wrong(ApiWindow {
            avg: 20.5,
            ..g.clone()
        }),
        ["avg"]
    );
    assert_eq!(
        wrong(ApiWindow {
            stddev: 2.0,
            ..g.clone()
        }),
        ["stddev"]
    );
    assert_eq!(
        wrong(ApiWindow {
            p99: 30.0,
            ..g.clone()
        }),
        ["p99"]
    );
    // The uncertain reading may be late: 0..=1.
    assert!(
        wrong(ApiWindow {
            late_count: 1,
            revision: 1,
            ..g.clone()
        })
        .is_empty()
    );
    assert_eq!(
        wrong(ApiWindow {
            late_count: 2,
            revision: 1,
            ..g.clone()
        }),
        ["late_count"]
    );
    assert_eq!(
        wrong(ApiWindow {
            is_final: true,
            ..g.clone()
        }),
        ["final"]
    );
}

/// Readings close together far from zero: a stddev from sums of squares
/// may land a few parts per million past half the range (a run saw
/// 0.0005000019 against 0.0005), and passes; one well past it fails.
#[test]
fn an_uncertain_windows_stddev_bound_allows_the_rounding_of_squares() {
    let mut e = agg(&[(1, 20.0), (2, 20.001)]);
    e.add(0, 20.0005, false, true);
    let g = view(&agg(&[(1, 20.0), (2, 20.001)]), 0);
    let spread = (20.001 - 20.0) / 2.0;
    assert!((spread - 0.0005f64).abs() < 1e-12);
    let at = |stddev: f64| {
        uncertain_mismatches(
            &[ApiWindow {
                stddev,
                ..g.clone()
            }],
            &e,
        )
    };
    assert!(at(spread).is_empty());
    assert!(at(0.000_500_001_9).is_empty(), "rounding past the bound");
    assert_eq!(at(0.001), ["stddev"], "twice the bound");
}

#[test]
fn a_run_fails_when_more_than_one_percent_of_its_windows_are_uncertain() {
    assert!(!too_uncertain(99, 1), "1 in 100 is within the bound");
    assert!(too_uncertain(98, 2));
    assert!(!too_uncertain(0, 0));
    assert!(too_uncertain(0, 1));
    assert!(!too_uncertain(9_900, 100));
    assert!(too_uncertain(9_899, 101));
}

#[test]
fn equal_windows_pass_and_each_field_is_named() {
    let e = agg(&[(1, 20.5), (2, 21.25), (3, 19.0)]);
    let g = view(&e, 0);
    assert!(check_window(&e, &g, 60_000, &FIN).is_empty());
    let fields = |g: &ApiWindow| -> Vec<&str> {
        check_window(&e, g, 60_000, &FIN)
            .into_iter()
            .map(|f| f.0)
            .collect()
    };
    assert_eq!(
        fields(&ApiWindow {
            count: 4,
            ..g.clone()
        }),
        ["count"]
    );
    assert_eq!(
        fields(&ApiWindow {
            min: 19.001,
            ..g.clone()
        }),
        ["min"]
    );
    assert_eq!(
        fields(&ApiWindow {
            late_count: 1,
            revision: 1,
            ..g.clone()
        }),
        ["late_count", "revision"]
    );
    assert_eq!(
        fields(&ApiWindow {
            late_count: 1,
            ..g.clone()
        }),
        ["late_count"]
    );
    assert_eq!(
        fields(&ApiWindow {
            first: ApiPoint { ts: 2, value: 20.5 },
            ..g.clone()
        }),
        ["first"]
    );
    assert_eq!(
        fields(&ApiWindow {
            sum: e.sure.sum * (1.0 + 1e-12),
            ..g.clone()
        }),
        Vec::<&str>::new()
    );
    assert_eq!(
        fields(&ApiWindow {
            sum: e.sure.sum * (1.0 + 1e-6),
            ..g.clone()
        }),
        ["sum"]
    );
    assert_eq!(
        fields(&ApiWindow {
            p99: 40.0,
            ..g.clone()
        }),
        ["p99"]
    );
    assert_eq!(
        fields(&ApiWindow {
            end: 1,
            ..g.clone()
        }),
        ["end"]
    );
}

/// 1000 readings: 0.001, 0.002, ..., 1.000 and one spike of 50.
fn spread() -> ExpectedAgg {
    let mut v: Vec<(i64, f64)> = (1..=999).map(|i| (i, i as f64 / 1000.0)).collect();
    v.push((1000, 50.0));
    agg(&v)
}

fn fields_of(e: &ExpectedAgg, g: &ApiWindow, fin: &Finality) -> Vec<&'static str> {
    check_window(e, g, 60_000, fin)
        .into_iter()
        .map(|f| f.0)
        .collect()
}

#[test]
fn verify_fails_on_a_wrong_p99() {
    let e = spread();
    let g = view(&e, 0);
    // Rank floor(0.99 * 999) = 989: the value 0.990.
    assert_eq!(g.p99, 0.99);
    assert!(fields_of(&e, &g, &FIN).is_empty());
    // Within [min, max] and in order, but the value at rank 900 or at
    // the top: not the 99th percentile.
    for p99 in [0.9, 50.0, 0.95] {
        let wrong = ApiWindow { p99, ..g.clone() };
        assert_eq!(fields_of(&e, &wrong, &FIN), ["p99"], "p99 {p99}");
    }
    // A sketch answering the minimum for every quantile.
    let floor = ApiWindow {
        p50: e.sure.min,
        p90: e.sure.min,
        p99: e.sure.min,
        ..g.clone()
    };
    assert_eq!(fields_of(&e, &floor, &FIN), ["p50", "p90", "p99"]);
}

#[test]
fn quantiles_within_the_sketch_accuracy_of_a_neighbouring_rank_pass() {
    let e = spread();
    let g = view(&e, 0);
    // The sketch's answer for 0.990 may be up to 1 % off, and rank
    // 988..=990 (0.989..=0.991) is as good as 989.
    for p99 in [0.99 * 1.0099, 0.989 * 0.9901, 0.991 * 1.0099] {
        let ok = ApiWindow { p99, ..g.clone() };
        assert!(fields_of(&e, &ok, &FIN).is_empty(), "p99 {p99}");
    }
    for p99 in [0.991 * 1.0101, 0.989 * 0.9899] {
        let off = ApiWindow { p99, ..g.clone() };
        assert_eq!(fields_of(&e, &off, &FIN), ["p99"], "p99 {p99}");
    }
    // One reading: the sketch's 21.543 for 21.5 is within 1 %, and the
    // answer clamped to [min, max] is exact.
    let one = agg(&[(1, 21.5)]);
    for q in [21.543, 21.5] {
        let g = ApiWindow {
            p50: q,
            p90: q,
            p99: q,
            ..view(&one, 0)
        };
        assert!(fields_of(&one, &g, &FIN).is_empty(), "{q}");
    }
}

#[test]
fn verify_fails_on_a_wrong_revision() {
    // One late reading: one change after the window's end.
    let mut e = agg(&[(1, 1.0), (2, 2.0)]);
    e.add(3, 3.0, true, false);
    let g = view(&e, 0);
    assert_eq!((g.late_count, g.revision), (1, 1));
    assert!(fields_of(&e, &g, &FIN).is_empty());
    for revision in [0, 2, 7] {
        let wrong = ApiWindow {
            revision,
            ..g.clone()
        };
        assert_eq!(fields_of(&e, &wrong, &FIN), ["revision"], "{revision}");
    }
    // No late reading: the window never changed after its end.
    let on_time = agg(&[(1, 1.0)]);
    let wrong = ApiWindow {
        revision: 1,
        ..view(&on_time, 0)
    };
    assert_eq!(fields_of(&on_time, &wrong, &FIN), ["revision"]);
}

#[test]
fn verify_fails_on_a_wrong_final() {
    let e = agg(&[(1, 1.0)]);
    let open = view(&e, 0);
    // Read at the epoch: end + 1 h is still ahead, so not final.
    assert!(fields_of(&e, &open, &FIN).is_empty());
    let wrong = ApiWindow {
        is_final: true,
        ..open.clone()
    };
    assert_eq!(fields_of(&e, &wrong, &FIN), ["final"]);
    // The run began two hours after the window closed: final.
    let later = Finality {
        allowed_lateness_ms: 3_600_000,
        read_by_ms: 7_300_000,
        settled_ms: 7_200_000,
    };
    assert_eq!(fields_of(&e, &open, &later), ["final"]);
    let closed = ApiWindow {
        is_final: true,
        ..open.clone()
    };
    assert!(fields_of(&e, &closed, &later).is_empty());
    // Read after end + allowed lateness, by a run that began before it:
    // either answer is right (the watermark may not have passed it).
    let between = Finality {
        allowed_lateness_ms: 3_600_000,
        read_by_ms: 3_700_000,
        settled_ms: 0,
    };
    assert!(fields_of(&e, &open, &between).is_empty());
    assert!(fields_of(&e, &closed, &between).is_empty());
}

#[test]
fn late_count_may_fall_in_a_range() {
    let mut e = agg(&[(1, 1.0)]);
    e.late_hi = 1;
    let g = view(&e, 0);
    assert!(check_window(&e, &g, 60_000, &FIN).is_empty());
    let g = ApiWindow {
        late_count: 1,
        revision: 1,
        ..g
    };
    assert!(check_window(&e, &g, 60_000, &FIN).is_empty());
    let g = ApiWindow { late_count: 2, ..g };
    assert_eq!(check_window(&e, &g, 60_000, &FIN)[0].1, "0..=1");
}

#[test]
fn missing_and_unexpected_windows_are_mismatches() {
    let a = agg(&[(1, 1.0)]);
    let b = agg(&[(60_001, 2.0)]);
    let mut t = Tally::default();
    compare_series(
        "s",
        60_000,
        [(0, &a), (60_000, &b)],
        &[view(&b, 60_000), view(&a, 120_000)],
        &FIN,
        &mut t,
    );
    assert_eq!(t.windows, 3);
    assert_eq!(t.mismatch_count, 2);
    assert_eq!(t.mismatches[0].start, 0);
    assert_eq!(t.mismatches[0].got, "no window");
    assert_eq!(t.mismatches[1].start, 120_000);
    assert_eq!(t.mismatches[1].expected, "no window");
    let mut maybe = ExpectedAgg::default();
    maybe.add(1, 1.0, false, true);
    let mut t = Tally::default();
    compare_series("s", 60_000, [(0, &maybe)], &[], &FIN, &mut t);
    assert_eq!((t.uncertain, t.mismatch_count), (1, 0));
}

#[test]
fn readings_the_runs_did_not_send_are_told_from_missing_ones() {
    let e = agg(&[(10, 1.0), (20, 2.0)]);
    let g = view(&e, 0);
    let unknown = |got: &[ApiWindow]| {
        let mut t = Tally::default();
        compare_series("s", 60_000, [(0, &e)], got, &FIN, &mut t);
        t.unknown
    };
    assert_eq!(unknown(std::slice::from_ref(&g)), 0);
    // Fewer readings: not caught up, nothing unknown.
    assert_eq!(
        unknown(&[ApiWindow {
            count: 1,
            ..g.clone()
        }]),
        0
    );
    assert_eq!(unknown(&[]), 0);
    // An earlier run's reading of the same device and seq: same value,
    // earlier timestamp; or simply more readings; or another window.
    let earlier = ApiWindow {
        first: ApiPoint { ts: 5, value: 1.0 },
        ..g.clone()
    };
    assert_eq!(unknown(&[earlier]), 1);
    assert_eq!(
        unknown(&[ApiWindow {
            count: 3,
            ..g.clone()
        }]),
        1
    );
    assert_eq!(unknown(&[g.clone(), view(&e, 60_000)]), 1);
}

#[test]
fn keeps_the_first_mismatches_and_counts_all() {
    let mut t = Tally::default();
    let empty: [(i64, &ExpectedAgg); 0] = [];
    let got: Vec<ApiWindow> = (0..50)
        .map(|i| view(&agg(&[(1, 1.0)]), i * 60_000))
        .collect();
    compare_series("s", 60_000, empty, &got, &FIN, &mut t);
    assert_eq!(t.mismatch_count, 50);
    assert_eq!(t.mismatches.len(), KEPT_MISMATCHES);
}

#[test]
fn formats_utc() {
    assert_eq!(fmt_utc(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(fmt_utc(1_764_244_859_999), "2025-11-27T12:00:59.999Z");
    assert_eq!(fmt_utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
}
