//! `iotpipe_api_devices{fleet,status}`: every fleet's devices by status,
//! derived at scrape time with the API's clock, exactly as
//! `GET /v1/devices?status=` derives each device's (`stale` is never stored,
//! so no count kept as presence is applied could say it).
//!
//! Cost: one prefix scan of the member partitions (`m|{fleet}`), in pages of
//! [`PAGE`] rows, plus, like a listing, one latest-span read per device whose
//! member row does not already read `online`. For a 19,000-device fleet that
//! is 19 pages of small rows and at most 19,000 single-row reads per scrape
//! (fewer while devices publish: a row is rewritten as each span starts).
//! Locally that is an index range read of SQLite or PostgreSQL. On DynamoDB
//! the prefix scan would be a Scan of the whole table, so the counts are
//! served only where [`ApiState::device_counts`] says so: `iotpipe up` on a
//! local store, never the query Lambda.

use std::collections::BTreeMap;

use rollup::keys::MEMBER_PK_PREFIX;
use rollup::liveness::Status;

use super::{ApiState, Problem, device_status, member_of};
use crate::store::Scan;

/// Member rows read per page of the scan.
pub const PAGE: usize = 1000;

/// Devices per fleet, by status in [`Status::ALL`]'s order.
pub type Counts = BTreeMap<String, [u64; 3]>;

/// Every fleet's devices by status at the API's clock.
pub async fn count(s: &ApiState) -> Result<Counts, Problem> {
    let now = (s.clock)();
    let mut counts = Counts::new();
    let mut after = None;
    loop {
        let page = s
            .query
            .scan_prefix(Scan::new(MEMBER_PK_PREFIX, after.clone(), PAGE))
            .await?;
        let full = page.len() == PAGE;
        after = page.last().map(|(pk, sk, _)| (pk.clone(), sk.clone()));
        let members: Vec<(String, String, _)> = page
            .into_iter()
            .filter_map(|(pk, device, item)| {
                let fleet = pk.strip_prefix(MEMBER_PK_PREFIX)?.to_string();
                Some((fleet, device, member_of(item.state)?))
            })
            .collect();
        let statuses =
            futures::future::try_join_all(members.iter().map(|(fleet, device, m)| {
                device_status(s, device, m, now, s.stale_after.of(fleet))
            }))
            .await?;
        for ((fleet, _, _), (status, _)) in members.iter().zip(statuses) {
            counts.entry(fleet.clone()).or_default()[index(status)] += 1;
        }
        if !full {
            return Ok(counts);
        }
    }
}

fn index(status: Status) -> usize {
    Status::ALL.iter().position(|s| *s == status).unwrap_or(0)
}

/// The counts in Prometheus text format.
pub fn render(counts: &Counts, out: &mut String) {
    use std::fmt::Write;
    if counts.is_empty() {
        return;
    }
    out.push_str(
        "# HELP iotpipe_api_devices Devices per fleet by status, derived at scrape from member rows and the API's clock.\n",
    );
    out.push_str("# TYPE iotpipe_api_devices gauge\n");
    for (fleet, by_status) in counts {
        for (status, n) in Status::ALL.iter().zip(by_status) {
            // Fleet ids are `[A-Za-z0-9_.:-]`: nothing to escape.
            let _ = writeln!(
                out,
                "iotpipe_api_devices{{fleet=\"{fleet}\",status=\"{status}\"}} {n}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_one_gauge_per_fleet_and_status() {
        let mut counts = Counts::new();
        counts.insert("a".into(), [3, 1, 2]);
        let mut out = String::new();
        render(&counts, &mut out);
        assert!(out.contains("# TYPE iotpipe_api_devices gauge\n"), "{out}");
        for line in [
            "iotpipe_api_devices{fleet=\"a\",status=\"online\"} 3",
            "iotpipe_api_devices{fleet=\"a\",status=\"offline\"} 1",
            "iotpipe_api_devices{fleet=\"a\",status=\"stale\"} 2",
        ] {
            assert!(out.contains(line), "{line} in {out}");
        }
        let mut none = String::new();
        render(&Counts::new(), &mut none);
        assert!(none.is_empty());
    }
}
