//! The dashboard in headless Chromium against the whole pipeline on port 0:
//! the page's table must list exactly the windows the API holds, and its
//! overview the fleet, rejections and shards the API reports.
//!
//! Needs Debian's `chromium` (`apt-get install -y chromium`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use device_sim::plan::FaultConfig;
use device_sim::{Rate, SimConfig, Stop};
use testkit::chromium::{chromium, dump_dom};
use testkit::now_ms;

/// The `name="value"` attributes of the element whose opening tag starts at
/// `html[at..]`.
fn attributes(html: &str, at: usize) -> BTreeMap<String, String> {
    let tag = &html[at..at + html[at..].find('>').unwrap()];
    let mut out = BTreeMap::new();
    let mut rest = tag;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].rsplit([' ', '\n']).next().unwrap().to_string();
        let value_end = eq + 2 + rest[eq + 2..].find('"').unwrap();
        let value = rest[eq + 2..value_end].replace("&amp;", "&");
        out.insert(name, value);
        rest = &rest[value_end + 1..];
    }
    out
}

/// The element with `id`, from its opening tag to the end of the document.
fn element<'a>(html: &'a str, id: &str) -> (usize, &'a str) {
    let at = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the page:\n{html}"));
    let start = html[..at].rfind('<').unwrap();
    (start, &html[start..])
}

/// The `data-*` attributes of every body row of table `id`.
fn rows(html: &str, id: &str) -> Vec<BTreeMap<String, String>> {
    let (_, table) = element(html, id);
    let table = &table[..table.find("</table>").unwrap()];
    let body = &table[table.find("<tbody>").unwrap()..];
    body.match_indices("<tr")
        .map(|(i, _)| attributes(body, i))
        .filter(|a| a.keys().any(|k| k.starts_with("data-")))
        .collect()
}

/// The text of the element with `id`, which holds only text.
fn text<'a>(html: &'a str, id: &str) -> &'a str {
    let (_, el) = element(html, id);
    let open_end = el.find('>').unwrap() + 1;
    &el[open_end..open_end + el[open_end..].find('<').unwrap()]
}

fn sim(p: &iotpipe::Pipeline) -> SimConfig {
    SimConfig {
        verify_timeout: Duration::from_secs(30),
        devices: 3,
        rate: Rate::PerDevice(10.0),
        stop: Stop::Count(30),
        seed: 5,
        faults: FaultConfig {
            malformed_rate: 0.1,
            ..FaultConfig::default()
        },
        ..support::sim(p.mqtt_addr, p.http_addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_windows_the_api_holds() {
    let browser = chromium().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = support::config(dir.path());
    let shards = config.stream.shards;
    let p = iotpipe::start(&config).await.unwrap();
    let summary = device_sim::run(sim(&p)).await.unwrap();
    let verify = summary.verify.as_ref().unwrap();
    assert!(verify.ok, "the pipeline is not caught up: {verify}");

    let (device, metric) = ("sim-d00000", "temperature");
    let now = now_ms();
    let (status, api) = support::get(
        &p,
        &format!(
            "/v1/devices/{device}/metrics/{metric}?res=1m&from={}&to={}",
            now - 3_600_000,
            now + 60_000
        ),
    )
    .await;
    assert_eq!(status, 200, "{api}");
    let windows = api["windows"].as_array().unwrap();
    assert!(!windows.is_empty(), "{api}");
    let (_, stats) = support::get(&p, "/v1/stats").await;

    let url = format!(
        "http://{}/?fleet=sim&device={device}&metric={metric}&res=1m",
        p.http_addr
    );
    println!("{} --dump-dom {url}", browser.display());
    let html = dump_dom(&url).await.unwrap();

    let (at, _) = element(&html, "chart-table");
    let table = attributes(&html, at);
    assert_eq!(
        table.get("data-series").map(String::as_str),
        Some("sim-d00000|temperature|1m"),
        "{html}"
    );
    let shown = rows(&html, "chart-table");
    assert_eq!(shown.len(), windows.len(), "{html}");
    for (row, w) in shown.iter().zip(windows) {
        let num = |k: &str| row[&format!("data-{k}")].parse::<f64>().unwrap();
        assert_eq!(num("start") as i64, w["start"].as_i64().unwrap(), "{row:?}");
        assert_eq!(num("count") as u64, w["count"].as_u64().unwrap(), "{row:?}");
        for k in ["min", "avg", "max"] {
            assert_eq!(num(k), w[k].as_f64().unwrap(), "{k} of {row:?} vs {w}");
        }
    }
    let counted: u64 = shown
        .iter()
        .map(|r| r["data-count"].parse::<u64>().unwrap())
        .sum();
    assert_eq!(counted, 30, "every reading of the device is in a window");

    // The chart was drawn: a band or a dot per run of windows, and a line.
    let (_, chart) = element(&html, "chart");
    assert!(
        chart.starts_with("<div") && chart.contains("<svg"),
        "{html}"
    );
    assert!(chart.contains("class=\"avg\""), "{html}");

    // The overview and the pickers.
    assert_eq!(text(&html, "fleet-count"), "1");
    assert_eq!(text(&html, "device-count"), "3");
    let rejected: Vec<_> = rows(&html, "rejections")
        .into_iter()
        .map(|r| (r["data-reason"].clone(), r["data-count"].clone()))
        .collect();
    assert_eq!(
        rejected,
        [(
            "malformed_json".to_string(),
            stats["rejected"]["malformed_json"].to_string()
        )],
        "{stats}"
    );
    assert!(summary.malformed_sent > 0);
    let lag = rows(&html, "lag");
    assert_eq!(lag.len(), shards as usize, "{html}");
    assert!(
        lag.iter().all(|r| r["data-behind"].parse::<u64>().is_ok()),
        "{lag:?}"
    );
    // Every device said DISCONNECT at the end of the run: offline, counted
    // from /metrics.
    let statuses: Vec<_> = rows(&html, "statuses")
        .into_iter()
        .map(|r| {
            let n = |k: &str| r[&format!("data-{k}")].clone();
            (n("fleet"), n("online"), n("stale"), n("offline"))
        })
        .collect();
    assert_eq!(
        statuses,
        [("sim".into(), "0".into(), "0".into(), "3".into())],
        "{html}"
    );
    let (_, select) = element(&html, "device");
    let select = &select[..select.find("</select>").unwrap()];
    assert_eq!(select.matches("<option").count(), 3, "{select}");
    let (at, _) = element(&html, "token-form");
    assert!(attributes(&html, at).contains_key("hidden"), "{html}");
    assert!(html.contains("data-state=\"ready\""), "{html}");
    p.shutdown().await.unwrap();
}

/// Minutes 0, 1 and 4 of a device: the chart's line stops at the gap and
/// starts again after it, one run of windows each side, rather than a
/// straight line across minutes that had no readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chart_draws_a_gap_as_a_gap() {
    chromium().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = support::start(dir.path()).await;
    let m0 = now_ms().div_euclid(60_000) * 60_000 - 10 * 60_000;
    let messages: Vec<(String, Vec<u8>)> = [(0, 1.0), (1, 2.0), (4, 5.0)]
        .iter()
        .enumerate()
        .map(|(seq, (minute, t))| {
            let ts = m0 + minute * 60_000 + 5;
            let payload = serde_json::json!({"seq": seq, "ts": ts, "metrics": {"t": t}});
            (
                "dt/gaps/g1/telemetry".to_string(),
                serde_json::to_vec(&payload).unwrap(),
            )
        })
        .collect();
    support::publish_acked(&p, "g1", &messages).await;
    let path = format!(
        "/v1/devices/g1/metrics/t?res=1m&from={m0}&to={}",
        m0 + 10 * 60_000
    );
    support::wait_for(&p, &path, Duration::from_secs(20), |body| {
        body["windows"].as_array().is_some_and(|w| w.len() == 3)
    })
    .await;

    let url = format!(
        "http://{}/?fleet=gaps&device=g1&metric=t&res=1m",
        p.http_addr
    );
    let html = dump_dom(&url).await.unwrap();
    let (_, chart) = element(&html, "chart");
    let chart = &chart[..chart.find("</svg>").unwrap()];
    // Minutes 0 and 1 are a line of two points; minute 4, alone past the
    // gap, is a dot. Nothing joins minute 1 to minute 4.
    let lines: Vec<usize> = chart
        .split("<polyline")
        .skip(1)
        .filter(|l| l.contains("class=\"avg\""))
        .map(|l| {
            let points = l.split("points=\"").nth(1).unwrap();
            points[..points.find('"').unwrap()].split(' ').count()
        })
        .collect();
    assert_eq!(lines, [2], "{chart}");
    assert_eq!(chart.matches("class=\"dot\"").count(), 1, "{chart}");
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_a_token_when_the_api_wants_one() {
    chromium().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "dashboard-test-token-0001 read\n").unwrap();
    let mut config = support::config(&dir.path().join("data"));
    config.http.token_file = Some(tokens);
    let p = iotpipe::start(&config).await.unwrap();
    let (status, _) = support::get(&p, "/v1/stats").await;
    assert_eq!(status, 401);

    let html = dump_dom(&format!("http://{}/", p.http_addr)).await.unwrap();
    let (at, _) = element(&html, "token-form");
    assert!(!attributes(&html, at).contains_key("hidden"), "{html}");
    assert!(html.contains("data-state=\"needs-token\""), "{html}");
    assert_eq!(text(&html, "device-count"), "–");
    p.shutdown().await.unwrap();
}

#[test]
fn attributes_are_read_from_a_tag() {
    let html = r#"<p><tr data-start="60000" data-avg="1.5" hidden="">x</tr>"#;
    let a = attributes(html, 3);
    assert_eq!(a["data-start"], "60000");
    assert_eq!(a["data-avg"], "1.5");
    assert!(a.contains_key("hidden"));
    assert_eq!(text("<dd id=\"n\">3</dd>", "n"), "3");
}
