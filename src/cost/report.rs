//! The bill as text: the profile, the store's pattern item by item, every
//! line, the totals per service and per million readings, and the sources.

use std::fmt::Write as _;

use super::model::{Estimate, Profile};
use super::prices::Prices;
use super::{MILLION, writes};

/// The bill as a table, with the profile's totals and the price table's date.
pub fn render(p: &Profile, prices: &Prices, e: &Estimate) -> String {
    let mut out = String::new();
    let msgs_per_s = p.devices as f64 * p.msgs_per_device_per_s;
    let _ = writeln!(
        out,
        "{} devices, {:.0} msgs/s, {} readings/msg, {} B payload{}",
        p.devices,
        msgs_per_s,
        p.readings_per_message,
        p.payload_bytes,
        if p.basic_ingest { ", Basic Ingest" } else { "" }
    );
    let _ = writeln!(
        out,
        "prices: {} list prices as of {}\n",
        prices.region, prices.as_of
    );
    let r = &p.retention;
    let kept = [("1m", r.span_s), ("1h", r.hour_s), ("1d", r.day_s)]
        .iter()
        .zip(r.forever)
        .take(p.resolutions.clamp(1, 3) as usize)
        .map(|((res, s), forever)| {
            let days = s / writes::DAY_S;
            if forever {
                format!("{res} forever (priced after {days:.0} days)")
            } else {
                format!("{res} {days:.0} days")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(out, "windows kept after their end: {kept}\n");
    render_pattern(&mut out, p, e);
    let _ = writeln!(
        out,
        "{:<9} {:<30} {:>16} {:<22} {:>12}",
        "service", "item", "quantity", "unit", "USD/month"
    );
    for l in &e.lines {
        let _ = writeln!(
            out,
            "{:<9} {:<30} {:>16.3} {:<22} {:>12.2}",
            l.service, l.item, l.quantity, l.unit, l.usd
        );
    }
    let _ = writeln!(out);
    for s in ["IoT Core", "Kinesis", "Lambda", "DynamoDB"] {
        let _ = writeln!(out, "{:<9} {:>77.2}", s, e.service(s));
    }
    let total = e.total();
    let _ = writeln!(out, "{:<9} {:>77.2}", "total", total);
    if e.readings > 0.0 {
        let naive = e.naive_usd / e.readings * MILLION;
        let _ = writeln!(
            out,
            "per million readings: ${:.4}\n\
             naive design (one raw item per message, written without a read, kept {:.0} days): \
             ${naive:.4} per million readings; this design costs {:.2}x that",
            total / e.readings * MILLION,
            p.retention.span_s / writes::DAY_S,
            total / e.naive_usd,
        );
    }
    let _ = writeln!(out, "\nsources:");
    for s in &prices.sources {
        let _ = writeln!(out, "  {s}");
    }
    out
}

/// The store's reads and writes per reading, item by item.
fn render_pattern(out: &mut String, p: &Profile, e: &Estimate) {
    let b = &e.batch;
    let how = match p.write_amplification {
        Some(_) => "given; the mix of items is modelled".to_string(),
        None => format!(
            "modelled: a shard's batch covers {:.1} s, {:.0} readings of {:.0} devices",
            b.period_s, b.readings, b.present
        ),
    };
    let _ = writeln!(
        out,
        "store per reading: {:.3} items written, {:.3} WRU, {:.3} RRU ({how})",
        e.pattern.writes(),
        e.pattern.wru(),
        e.pattern.rru(),
    );
    let _ = writeln!(
        out,
        "  {:<26} {:>10} {:>10} {:>10} {:>12}",
        "item", "writes", "WRU", "RRU", "bytes (avg)"
    );
    for i in &e.pattern.items {
        let _ = writeln!(
            out,
            "  {:<26} {:>10.4} {:>10.4} {:>10.4} {:>12.0}",
            i.item, i.writes, i.wru, i.rru, i.bytes
        );
    }
    let _ = writeln!(out);
}
