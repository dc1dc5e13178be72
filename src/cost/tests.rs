use super::*;

const DAY: f64 = 86_400.0;

fn profile() -> Profile {
    Profile {
        devices: 1000,
        msgs_per_device_per_s: 1.0,
        payload_bytes: 200,
        topic_bytes: 30,
        readings_per_message: 1,
        basic_ingest: false,
        write_amplification: Some(0.1),
        metrics_per_reading: 1,
        resolutions: 3,
        fleets: 1,
        span_s: 600.0,
        kinesis: KinesisMode::OnDemand,
        batch_size: 1000,
        batching_window_s: 1.0,
        lambda_memory_mb: 256,
        lambda_base_ms: 20.0,
        lambda_ms_per_write: 0.4,
        retention: Retention {
            span_s: 30.0 * DAY,
            hour_s: 90.0 * DAY,
            day_s: 1098.0 * DAY,
            forever: [false; 3],
        },
        reconnects_per_day: 0.0,
    }
}

/// The estimate for `p` at the default prices.
fn estimate_at(p: Profile) -> Estimate {
    estimate(&p, &Prices::default_table().unwrap())
}

fn line<'a>(e: &'a Estimate, item: &str) -> &'a Line {
    e.lines.iter().find(|l| l.item == item).unwrap()
}

#[test]
fn the_default_table_parses_and_is_dated() {
    let p = Prices::default_table().unwrap();
    assert_eq!(p.as_of.len(), 10);
    assert!(!p.sources.is_empty());
}

#[test]
fn messaging_is_metered_in_5_kb_units_and_tiered() {
    let e = estimate_at(profile());
    // 1,000 msgs/s is 2,628 M messages a month: 1,000 M at $1, the rest at $0.80.
    let m = line(&e, "messaging (5 KB units)");
    assert!((m.quantity - 2628.0).abs() < 1e-6);
    assert!((m.usd - (1000.0 + 1628.0 * 0.8)).abs() < 1e-6);

    let mut big = profile();
    big.payload_bytes = 6000;
    let e = estimate_at(big);
    assert!((line(&e, "messaging (5 KB units)").quantity - 2.0 * 2628.0).abs() < 1e-6);
    assert!((line(&e, "rules triggered").quantity - 2.0 * 2628.0).abs() < 1e-6);
}

#[test]
fn basic_ingest_drops_only_the_messaging_charge() {
    let plain = estimate_at(profile());
    let basic = estimate_at(Profile {
        basic_ingest: true,
        ..profile()
    });
    let messaging = line(&plain, "messaging (5 KB units)").usd;
    assert!((plain.total() - basic.total() - messaging).abs() < 1e-6);
}

#[test]
fn a_given_write_amplification_scales_the_modelled_units() {
    let e = estimate_at(profile());
    assert!((e.write_amplification() - 0.1).abs() < 1e-9);
    let e2 = estimate_at(Profile {
        write_amplification: Some(0.2),
        ..profile()
    });
    for item in ["write request units", "read request units"] {
        let (one, two) = (line(&e, item).quantity, line(&e2, item).quantity);
        assert!(one > 0.0 && (two - 2.0 * one).abs() < 1e-6, "{item}");
    }
    // Storage follows the items kept, not how often they are written.
    assert_eq!(line(&e, "storage").usd, line(&e2, "storage").usd);
}

#[test]
fn lambda_invocations_follow_shards_and_batches() {
    // 1,000 msgs/s over on-demand's 4 shards: one invocation per shard a second.
    let e = estimate_at(profile());
    assert!((line(&e, "requests").quantity - 4.0 * SECONDS_PER_MONTH / MILLION).abs() < 1e-6);
    // 100,000 msgs/s: 100 shards, each 1,000 records a second = one batch.
    let e = estimate_at(Profile {
        devices: 100_000,
        ..profile()
    });
    assert!((line(&e, "requests").quantity - 100.0 * SECONDS_PER_MONTH / MILLION).abs() < 1e-6);
}

/// The real fleet's shape: 10,000 devices reporting one message a
/// minute, 3 metrics, the template's batch size.
fn fleet(window: f64, batch_size: u64) -> Estimate {
    estimate_at(Profile {
        devices: 10_000,
        msgs_per_device_per_s: 1.0 / 60.0,
        metrics_per_reading: 3,
        write_amplification: None,
        batching_window_s: window,
        batch_size,
        ..profile()
    })
}

#[test]
fn a_quiet_fleet_writes_about_one_item_per_reading() {
    // One reading per device per batch: one span write each, plus its
    // share of member items, compactions, fleet windows and counters.
    let e = fleet(1.0, 1000);
    let w = e.write_amplification();
    assert!((1.0..=1.5).contains(&w), "{w}");
    let span = &e.pattern.items[0];
    assert_eq!(span.item, "span items");
    assert!((span.writes - 1.0).abs() < 0.02, "{}", span.writes);
}

#[test]
fn a_long_batching_window_shares_span_writes_between_readings() {
    // 300 s of a shard's 2,500 devices is 12,500 records; the event
    // source's largest batch (10,000) still holds 4 readings a device.
    let e = fleet(300.0, 10_000);
    let w = e.write_amplification();
    assert!(w < 1.0, "{w}");
    assert!(e.pattern.wru() < 1.0, "{}", e.pattern.wru());
}

#[test]
fn the_batch_size_cuts_a_long_batching_window_short() {
    // 1,000 records of 41.75 a second fill a batch in 24 s, long before
    // 300 s: each device is in a batch about once, as at 1 s.
    let e = fleet(300.0, 1000);
    assert!(
        (e.batch.period_s - 24.0).abs() < 0.1,
        "{}",
        e.batch.period_s
    );
    assert!(e.write_amplification() > 1.0);
    assert!(e.write_amplification() < fleet(1.0, 1000).write_amplification());
}

#[test]
fn a_chatty_fleet_writes_far_less_than_one_item_per_reading() {
    let e = estimate_at(Profile {
        devices: 200,
        msgs_per_device_per_s: 100.0,
        metrics_per_reading: 3,
        write_amplification: None,
        ..profile()
    });
    let w = e.write_amplification();
    assert!(w < 0.05, "{w}");
}

#[test]
fn items_per_reading_fall_as_the_batching_window_grows() {
    for batch_size in [1000, 10_000] {
        let mut last = f64::INFINITY;
        for window in [1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0] {
            let e = fleet(window, batch_size);
            let w = e.write_amplification();
            assert!(w <= last, "{window} s, batch {batch_size}: {w} > {last}");
            assert!(e.service("DynamoDB") > 0.0);
            last = w;
        }
    }
}

#[test]
fn a_quiet_span_item_fits_one_write_unit_when_full() {
    // 60 B + 3 x 12 B of names + 10 windows x (10 B + 3 x (1 B + 12 B))
    // = 586 B when full: every one of its ten writes takes 1 WRU.
    let e = fleet(1.0, 1000);
    let span = &e.pattern.items[0];
    assert!((span.wru / span.writes - 1.0).abs() < 0.001, "{span:?}");
    assert!(span.bytes > 300.0 && span.bytes < 400.0, "{span:?}");
}

#[test]
fn the_naive_design_pays_one_write_unit_per_message_and_no_read() {
    let prices = Prices::default_table().unwrap();
    let p = Profile {
        devices: 10_000,
        msgs_per_device_per_s: 1.0 / 60.0,
        payload_bytes: 120,
        basic_ingest: true,
        ..profile()
    };
    let e = estimate(&p, &prices);
    let msgs = 10_000.0 / 60.0 * SECONDS_PER_MONTH;
    let ingest = e.service("IoT Core") + e.service("Kinesis");
    // 120 B of payload, 80 B of keys and 100 B of overhead per
    // message, for 30 days.
    let storage = 10_000.0 / 60.0 * 30.0 * DAY * 300.0 / GB * 0.25;
    let store = e.naive_usd - ingest - e.service("Lambda");
    let wru = msgs / MILLION * 0.625;
    // The Lambda of the naive design differs only in its duration.
    assert!(
        (store - wru - storage).abs() < 0.02 * wru,
        "{store} vs {}",
        wru + storage
    );
    assert!(render(&p, &prices, &e).contains("naive design"));
}

#[test]
fn storage_keeps_each_kind_of_item_for_its_retention() {
    let e = fleet(1.0, 1000);
    // Per device, with 100 B of overhead per item: 30 days of 10-minute
    // spans (586 B), 90 days of hours (907 B), 1,098 days (1,438 B),
    // its device and member items; fleet windows add under 1 %.
    let per_device = 30.0 * 144.0 * 686.0
        + 90.0 * 24.0 * (906.9 + 100.0)
        + 1098.0 * (1437.6 + 100.0)
        + 296.0
        + 160.0;
    let expected = 10_000.0 * per_device / GB;
    let stored = line(&e, "storage").quantity;
    assert!(
        stored > expected && stored < 1.01 * expected,
        "{stored} vs {expected}"
    );
}

#[test]
fn retention_is_read_as_the_config_file_writes_it_and_forever_grows_with_the_horizon() {
    let r = Retention::parse("1m=30d,1h=400d,1d=forever", 3, 5.0 * 365.0 * DAY).unwrap();
    assert_eq!(
        (r.span_s, r.hour_s, r.day_s),
        (30.0 * DAY, 400.0 * DAY, 5.0 * 365.0 * DAY)
    );
    // Left out: the pipeline's default; not stored: nothing.
    let r = Retention::parse("1h=forever", 2, 100.0 * DAY).unwrap();
    assert_eq!((r.span_s, r.hour_s, r.day_s), (7.0 * DAY, 100.0 * DAY, 0.0));
    assert!(
        Retention::parse("1d=forever", 2, DAY)
            .unwrap_err()
            .contains("1d")
    );
    let stored_after = |years: f64| {
        let retention = Retention::parse("1d=forever", 3, years * 365.0 * DAY).unwrap();
        line(
            &estimate_at(Profile {
                retention,
                ..profile()
            }),
            "storage",
        )
        .quantity
    };
    assert!(stored_after(10.0) > stored_after(3.0));
}

#[test]
fn a_rare_reporter_pays_for_its_batches_not_for_empty_windows() {
    // One device, one message an hour: one invocation per message, its
    // batch writing the fleet windows and counters for one reading.
    let e = estimate_at(Profile {
        devices: 1,
        msgs_per_device_per_s: 1.0 / 3600.0,
        write_amplification: None,
        ..profile()
    });
    let requests = line(&e, "requests").quantity * MILLION;
    assert!((requests - HOURS_PER_MONTH).abs() < 1e-6, "{requests}");
    let w = e.write_amplification();
    assert!((5.0..12.0).contains(&w), "{w}");
}

#[test]
fn bad_tables_are_refused() {
    let text = DEFAULT_PRICES.replace("up_to_millions = inf", "up_to_millions = 9000.0");
    assert!(Prices::parse(&text).is_err());
    assert!(Prices::parse("as_of = 1").is_err());
}

#[test]
fn no_load_costs_only_fixed_charges() {
    let prices = Prices::default_table().unwrap();
    let e = estimate_at(Profile {
        msgs_per_device_per_s: 0.0,
        ..profile()
    });
    assert_eq!(e.service("Lambda"), 0.0);
    assert_eq!(e.service("DynamoDB"), 0.0);
    assert!(e.write_amplification().is_sign_positive());
    assert!(render(&profile(), &prices, &e).contains("as of 2025-01-15"));
}

#[test]
fn each_connect_and_disconnect_costs_a_rule_a_record_and_a_member_write() {
    let quiet = estimate_at(profile());
    assert!(!quiet.lines.iter().any(|l| l.item.contains("presence")));
    let p = Profile {
        reconnects_per_day: 1.0,
        ..profile()
    };
    let e = estimate_at(p.clone());
    // 1,000 devices, one connect and one disconnect a day: 60,833 records.
    let events = 1000.0 * 2.0 * HOURS_PER_MONTH / 24.0;
    let m = events / MILLION;
    for (item, quantity) in [
        ("rules triggered (presence)", m),
        ("actions executed (presence)", m),
        ("write request units (presence)", m),
        ("read request units (presence)", m),
        ("CONNECT messages (5 KB units)", m / 2.0),
        ("presence records in (1 KB)", events * 1024.0 / GB),
    ] {
        assert!((line(&e, item).quantity - quantity).abs() < 1e-9, "{item}");
    }
    // The CONNECTs are priced where the telemetry left the tiers: above
    // 1,000 M messages a month, at $0.80 a million.
    assert!((line(&e, "CONNECT messages (5 KB units)").usd - m / 2.0 * 0.8).abs() < 1e-9);
    let added = e.total() - quiet.total();
    let listed: f64 = e
        .lines
        .iter()
        .filter(|l| l.item.contains("presence") || l.item.starts_with("CONNECT"))
        .map(|l| l.usd)
        .sum();
    assert!((added - listed).abs() < 1e-9, "{added} vs {listed}");
    // Twice the reconnects, twice the presence bill; Basic Ingest still
    // pays for CONNECTs.
    let twice = estimate_at(Profile {
        reconnects_per_day: 2.0,
        ..p.clone()
    });
    assert!((twice.total() - quiet.total() - 2.0 * added).abs() < 1e-6);
    let basic = estimate_at(Profile {
        basic_ingest: true,
        ..p.clone()
    });
    assert!((line(&basic, "CONNECT messages (5 KB units)").usd - m / 2.0).abs() < 1e-9);
    let provisioned = estimate_at(Profile {
        kinesis: KinesisMode::Provisioned,
        ..p
    });
    assert!((line(&provisioned, "PUT payload units (presence)").quantity - m).abs() < 1e-9);
}

/// The write units the model gives span items of a device that publishes
/// every second, against those of the span items the core writes for such
/// devices (the same encoding every store keeps; DynamoDB bills each write
/// by the item's whole size, in KB units). One-minute spans stay inside one
/// unit; ten-minute ones grow to several KB, and there the model, which
/// gives every reading a sketch bin of its own, is an upper bound: it may
/// not claim less than the items cost, nor much more for values that
/// wander as widely as these (slowly changing sensors fill fewer bins).
#[tokio::test]
async fn span_write_units_are_those_of_the_span_items_the_core_writes() {
    use processors::store::RollupQuery;
    use processors::store::memory::MemoryStore;
    use schemas::{Metric, PackedRecord, Reading};

    const T0: i64 = 1_764_240_000_000; // A ten-minute mark.
    const DEVICES: u64 = 4;
    const SECONDS: u64 = 1200;
    // Attribute names (pk, sk, version, state, ttl) and the two numbers.
    const ATTRIBUTES_B: usize = 19 + 12;
    for span in [60_000, 600_000] {
        let cfg = rollup::AggregateConfig {
            span: Some(span),
            ..rollup::AggregateConfig::default()
        };
        let store = MemoryStore::new();
        let metrics = processors::metrics::ProcessorMetrics::default();
        let mut units = 0.0;
        for s in 0..SECONDS {
            let at = T0 + s as i64 * 1000;
            let records: Vec<_> = (0..DEVICES)
                .map(|d| {
                    // Values spread over a hundred units, close to a
                    // sketch bin a reading: the model's assumption, which
                    // `testkit`'s fleet rounds (a step a second, ever
                    // smaller against the value) come nowhere near.
                    let value = |k: u64| 20.0 + ((s * 7919 + d * 104_729 + k) % 997) as f64 / 10.0;
                    let readings = PackedRecord {
                        device_id: format!("sensor-{d}"),
                        fleet: "fleet-1".into(),
                        received_at: at + 300,
                        readings: vec![Reading {
                            seq: Some(s),
                            ts: at + d as i64,
                            metrics: ["temperature", "humidity"]
                                .iter()
                                .zip(0..)
                                .map(|(m, k)| Metric {
                                    name: m.to_string(),
                                    value: value(k),
                                })
                                .collect(),
                        }],
                    };
                    testkit::batches::packed(s * DEVICES + d + 1, readings)
                })
                .collect();
            processors::run::process_batch("shard-0000", &records, &store, &cfg, &metrics)
                .await
                .unwrap();
            for d in 0..DEVICES {
                let pk = rollup::keys::span_pk(&format!("sensor-{d}"));
                let sk = rollup::keys::time_sk(cfg.span_start(T0 + s as i64 * 1000 + d as i64));
                let item = store.get(&pk, &sk).await.unwrap().unwrap();
                let bytes = item.encode().len() + pk.len() + sk.len() + ATTRIBUTES_B;
                units += (bytes as f64 / 1024.0).ceil();
            }
        }
        let measured = units / (DEVICES * SECONDS) as f64;
        let e = estimate_at(Profile {
            devices: 19_000,
            msgs_per_device_per_s: 1.0,
            metrics_per_reading: 2,
            write_amplification: None,
            batch_size: 10_000,
            span_s: span as f64 / 1000.0,
            ..profile()
        });
        let modelled = e.pattern.items[0].wru;
        let said =
            format!("span {span} ms: {measured:.3} WRU a reading measured, {modelled:.3} modelled");
        eprintln!("{said}");
        assert!(measured <= modelled * 1.01, "{said}");
        assert!(measured >= modelled * 0.7, "{said}");
        if span == 60_000 {
            assert!(measured <= 1.01, "{said}");
        }
    }
}
