//! Freshness: how long after a device publishes a reading the query API
//! shows it.
//!
//! Devices offer every n-th telemetry publish ([`Sample`]: device, the
//! reading's ts, when the PUBLISH was written), once its PUBACK came (or
//! its fate is otherwise known): polling before would find nothing, and
//! only load the probe. n comes from the planned
//! total ([`FreshnessSample::Auto`]: about [`TARGET_SAMPLES`] a run), and
//! each device's samples are offset so that they spread over the fleet and
//! the run.
//!
//! [`Book`] (pure) keeps, per device, the samples not yet seen; the probe
//! polls `GET /v1/devices/{id}` for every device that has some. One answer
//! settles every sample of that device whose ts the device's latest reading
//! has reached, so a device costs one request per poll interval however
//! many samples it holds. At most [`PROBES`] requests run at once; samples
//! wait their turn rather than being dropped, and how late requests went
//! out is reported beside the figures.
//!
//! A sample that was dropped (the devices' queue was full) or not seen
//! within the timeout is a miss: percentiles are taken over every sample,
//! misses counting as +∞ ([`quantile`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::processes::Recorded;

/// Samples a run aims for with [`FreshnessSample::Auto`]: enough that a
/// p99 rests on about 50 samples above it.
pub const TARGET_SAMPLES: u64 = 5000;
/// Requests the probe keeps in flight at most. At the fleet's × 2 rate an
/// answer can take 50 ms or more, and 32 slots then polled too seldom for
/// the samples waiting: requests went out seconds late.
pub const PROBES: usize = 128;
/// How long after a poll's request started the device is asked again: with
/// the request's own time, the figures' resolution.
pub const POLL: Duration = Duration::from_millis(20);
/// A device whose oldest waiting sample is older than `POLL` times this is
/// asked again after that age divided by this: the figure's resolution
/// stays within 5 % of it, and a pipeline seconds behind is not asked 50
/// times a second per device, load that would slow the very thing measured.
pub const POLL_AGE_SHARE: u32 = 20;

/// Which publishes to sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FreshnessSample {
    /// Not measured.
    Off,
    /// One in `planned / TARGET_SAMPLES` (at least one in one).
    #[default]
    Auto,
    /// One telemetry publish in this many.
    Every(u64),
}

impl FreshnessSample {
    /// One telemetry publish in how many, for a run of `planned` messages;
    /// `None`: not measured.
    pub fn every(self, planned: u64) -> Option<u64> {
        match self {
            FreshnessSample::Off | FreshnessSample::Every(0) => None,
            FreshnessSample::Auto => Some((planned / TARGET_SAMPLES).max(1)),
            FreshnessSample::Every(n) => Some(n),
        }
    }
}

impl FromStr for FreshnessSample {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(FreshnessSample::Auto),
            "off" | "0" => Ok(FreshnessSample::Off),
            n => n
                .parse::<u64>()
                .map(FreshnessSample::Every)
                .map_err(|_| format!("`{s}` is neither `auto`, `off` nor a number")),
        }
    }
}

impl fmt::Display for FreshnessSample {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FreshnessSample::Off => f.write_str("off"),
            FreshnessSample::Auto => f.write_str("auto"),
            FreshnessSample::Every(n) => write!(f, "{n}"),
        }
    }
}

/// Room in the devices' queue to the probe: every sample the plan can
/// produce, so that none is dropped unless the probe stops reading.
pub fn queue_len(every: u64, planned: u64, devices: u32) -> usize {
    let expected = planned / every.max(1) + u64::from(devices) + 16;
    expected.clamp(1024, 1 << 20) as usize
}

/// One sampled publish.
#[derive(Debug, Clone)]
pub struct Sample {
    pub device_id: String,
    /// The newest reading's ts in the message.
    pub ts: i64,
    /// When the PUBLISH was written.
    pub written: Instant,
}

/// A percentile over every sample: a time, or a miss (a dropped or
/// timed-out sample ranks there).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quantile {
    Ms(f64),
    Missed,
}

impl Quantile {
    /// The time, if the percentile was seen at all.
    pub fn ms(self) -> Option<f64> {
        match self {
            Quantile::Ms(ms) => Some(ms),
            Quantile::Missed => None,
        }
    }
}

/// A number of milliseconds, or the string `"missed"`.
impl Serialize for Quantile {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Quantile::Ms(ms) => s.serialize_f64(*ms),
            Quantile::Missed => s.serialize_str("missed"),
        }
    }
}

impl fmt::Display for Quantile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quantile::Ms(ms) => write!(f, "{ms:.0} ms"),
            Quantile::Missed => f.write_str("missed"),
        }
    }
}

/// The `q`-quantile of every sample, `missed` of them counting as +∞:
/// the value at rank ⌈q·n⌉ of n. `visible_us` is sorted ascending.
/// `None`: no samples at all.
pub fn quantile(visible_us: &[u64], missed: u64, q: f64) -> Option<Quantile> {
    let n = visible_us.len() as u64 + missed;
    if n == 0 {
        return None;
    }
    let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
    Some(match visible_us.get(rank as usize - 1) {
        Some(&us) => Quantile::Ms(us as f64 / 1000.0),
        None => Quantile::Missed,
    })
}

/// Freshness figures, in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Freshness {
    /// One telemetry publish in this many was sampled.
    pub sample_every: u64,
    /// Samples taken, dropped ones included.
    pub samples: u64,
    /// Samples seen in the API before the timeout.
    pub visible: u64,
    /// Samples without a figure: `dropped + timed_out`. Each ranks above
    /// every visible sample in the percentiles.
    pub missed: u64,
    /// Samples not visible within the timeout.
    pub timed_out: u64,
    /// Samples dropped because the queue to the probe was full.
    pub dropped: u64,
    /// Probe requests that failed (connection errors, 5xx).
    pub errors: u64,
    /// Percentiles over all samples: milliseconds, or `"missed"`; `null`
    /// without samples.
    pub p50_ms: Option<Quantile>,
    pub p90_ms: Option<Quantile>,
    pub p99_ms: Option<Quantile>,
    pub max_ms: Option<Quantile>,
    /// How often a device was polled: the figures are up to this (plus a
    /// request's time) above the true time.
    pub poll_ms: u64,
    /// How late the probe's requests went out against their schedule, p99:
    /// a probe short of slots or CPU polls late, and every figure above
    /// can be up to this much too high. `None` without polls.
    pub poll_late_p99_ms: Option<f64>,
    /// How long a sample was waited for.
    pub timeout_ms: u64,
}

/// A sample not yet seen.
#[derive(Debug)]
struct Waiting {
    ts: i64,
    written: Instant,
    deadline: Instant,
}

/// The probe's state: samples waiting per device, and what became of the
/// others. Pure: time comes in as arguments.
#[derive(Debug, Default)]
pub struct Book {
    /// Device -> samples not yet seen. A device is here exactly while a
    /// poll of it is under way or scheduled.
    waiting: HashMap<String, VecDeque<Waiting>>,
    visible_us: Vec<u64>,
    /// How late polls' requests went out against their schedule: ms ->
    /// polls. Counted, not listed: a long run makes millions of polls.
    poll_late_ms: BTreeMap<u64, u64>,
    samples: u64,
    timed_out: u64,
    errors: u64,
}

impl Book {
    /// Takes a sample, waited for until `written + timeout`; true when its
    /// device had none waiting, so a poll of it must start.
    pub fn offer(&mut self, s: Sample, timeout: Duration) -> bool {
        self.samples += 1;
        let queue = self.waiting.entry(s.device_id).or_default();
        queue.push_back(Waiting {
            ts: s.ts,
            written: s.written,
            deadline: s.written + timeout,
        });
        queue.len() == 1
    }

    /// What a poll of `device` answered at `at`: the newest ts it shows
    /// (`None`: none yet, or the request failed). Settles the samples it
    /// shows and those past their deadline; true when samples still wait,
    /// so the device must be polled again.
    pub fn answer(&mut self, device: &str, latest: Option<i64>, at: Instant) -> bool {
        let Some(queue) = self.waiting.get_mut(device) else {
            return false;
        };
        queue.retain(|w| {
            if latest.is_some_and(|l| l >= w.ts) {
                let age = at.saturating_duration_since(w.written);
                self.visible_us.push(age.as_micros() as u64);
                false
            } else if at >= w.deadline {
                self.timed_out += 1;
                false
            } else {
                true
            }
        });
        if queue.is_empty() {
            self.waiting.remove(device);
            return false;
        }
        true
    }

    /// How long after a poll of `device` sent at `sent` to ask again:
    /// [`POLL`], or a twentieth of its oldest waiting sample's age then if
    /// that is longer.
    pub fn poll_gap(&self, device: &str, sent: Instant) -> Duration {
        let oldest = self
            .waiting
            .get(device)
            .and_then(|q| q.iter().map(|w| w.written).min());
        let age = oldest.map_or(Duration::ZERO, |w| sent.saturating_duration_since(w));
        POLL.max(age / POLL_AGE_SHARE)
    }

    /// A poll due at `due` sent its request at `sent`.
    pub fn polled(&mut self, due: Instant, sent: Instant) {
        let late_ms = sent.saturating_duration_since(due).as_millis() as u64;
        *self.poll_late_ms.entry(late_ms).or_default() += 1;
    }

    /// Counts a failed probe request.
    pub fn error(&mut self) {
        self.errors += 1;
    }

    /// Samples still waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.values().map(VecDeque::len).sum()
    }

    /// The figures, with `dropped` samples the devices could not queue.
    /// Anything still waiting counts as timed out.
    pub fn figures(self, dropped: u64, every: u64, timeout: Duration) -> Freshness {
        self.tally(dropped, every).figures(timeout)
    }

    /// What the probe saw, settled: anything still waiting has timed out.
    pub fn tally(self, dropped: u64, every: u64) -> Tally {
        Tally {
            timed_out: self.timed_out + self.waiting() as u64,
            visible_us: self.visible_us,
            poll_late: Recorded(self.poll_late_ms.into_iter().collect()),
            samples: self.samples,
            errors: self.errors,
            dropped,
            every,
        }
    }
}

/// A settled probe's samples, before they become figures: what each
/// process of a run spread over several sends back, so that the
/// percentiles are taken over every sample of the run at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    /// How long each visible sample took, µs.
    pub visible_us: Vec<u64>,
    /// How late polls went out, ms, as a histogram's (value, count) pairs.
    #[serde(default)]
    pub poll_late: Recorded,
    /// Samples taken by the probe (without the dropped ones).
    pub samples: u64,
    pub timed_out: u64,
    pub errors: u64,
    /// Samples the devices could not queue to the probe.
    pub dropped: u64,
    /// One telemetry publish in `every` was sampled.
    pub every: u64,
}

impl Tally {
    pub fn merge(&mut self, other: Tally) {
        self.visible_us.extend(other.visible_us);
        self.poll_late.0.extend(other.poll_late.0);
        self.samples += other.samples;
        self.timed_out += other.timed_out;
        self.errors += other.errors;
        self.dropped += other.dropped;
        self.every = self.every.max(other.every);
    }

    /// The figures: every miss ranks above every visible sample.
    pub fn figures(mut self, timeout: Duration) -> Freshness {
        self.visible_us.sort_unstable();
        let poll_late_p99_ms = self
            .poll_late
            .histogram()
            .ok()
            .filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(0.99) as f64);
        let missed = self.dropped + self.timed_out;
        let q = |q: f64| quantile(&self.visible_us, missed, q);
        Freshness {
            sample_every: self.every,
            samples: self.samples + self.dropped,
            visible: self.visible_us.len() as u64,
            missed,
            timed_out: self.timed_out,
            dropped: self.dropped,
            errors: self.errors,
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            max_ms: q(1.0),
            poll_ms: POLL.as_millis() as u64,
            poll_late_p99_ms,
            timeout_ms: timeout.as_millis() as u64,
        }
    }
}

#[derive(Deserialize)]
struct DeviceView {
    #[serde(default)]
    metrics: std::collections::BTreeMap<String, Point>,
}

#[derive(Deserialize)]
struct Point {
    ts: i64,
}

/// One poll's answer.
struct Polled {
    device: String,
    latest: Option<i64>,
    failed: bool,
    /// When the poll was due, when its request was sent and when its
    /// answer came.
    due: Instant,
    sent: Instant,
    at: Instant,
}

/// Runs [`probe`] on a thread and runtime of its own, and hands its book
/// back when done. On the devices' runtime the probe's requests queued
/// behind thousands of device tasks: at the fleet's × 2 rate they went out
/// seconds late, and the figure measured the simulator's run queue instead
/// of the pipeline.
pub fn spawn_probe(
    base_url: String,
    rx: mpsc::Receiver<Sample>,
    timeout: Duration,
) -> oneshot::Receiver<Book> {
    let (done, book) = oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("freshness-probe".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let book = match runtime {
                Ok(runtime) => runtime.block_on(probe(base_url, rx, timeout)),
                Err(_) => unprobed(rx),
            };
            let _ = done.send(book);
        });
    // Without a thread the sender is dropped, and the run reports no
    // freshness rather than a figure it did not measure.
    drop(thread);
    book
}

/// Every sample a miss: what a probe that cannot run reports.
fn unprobed(mut rx: mpsc::Receiver<Sample>) -> Book {
    let mut book = Book::default();
    while let Some(s) = rx.blocking_recv() {
        book.offer(s, Duration::ZERO);
    }
    book
}

/// Probes samples from `rx` until it closes and every sample is settled.
pub async fn probe(base_url: String, mut rx: mpsc::Receiver<Sample>, timeout: Duration) -> Book {
    let mut book = Book::default();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(PROBES)
        .build();
    let Ok(http) = http else {
        // No client: every sample is a miss, none goes uncounted.
        while let Some(s) = rx.recv().await {
            book.offer(s, Duration::ZERO);
        }
        return book;
    };
    let base = Arc::new(base_url.trim_end_matches('/').to_string());
    let slots = Arc::new(Semaphore::new(PROBES));
    let mut polls: JoinSet<Polled> = JoinSet::new();
    let spawn = |polls: &mut JoinSet<Polled>, device: String, not_before: Instant| {
        let (http, base, slots) = (http.clone(), base.clone(), slots.clone());
        polls.spawn(async move {
            tokio::time::sleep_until(not_before).await;
            let _permit = slots.acquire_owned().await.ok();
            poll(&http, &base, device, not_before).await
        });
    };
    let mut open = true;
    while open || !polls.is_empty() {
        tokio::select! {
            sample = rx.recv(), if open => match sample {
                Some(s) => {
                    let device = s.device_id.clone();
                    if book.offer(s, timeout) {
                        spawn(&mut polls, device, Instant::now());
                    }
                }
                None => open = false,
            },
            Some(done) = polls.join_next(), if !polls.is_empty() => {
                // A poll task cannot panic short of a bug; its device's
                // samples then count as timed out in `figures`.
                let Ok(p) = done else { continue };
                book.polled(p.due, p.sent);
                if p.failed {
                    book.error();
                }
                if book.answer(&p.device, p.latest, p.at) {
                    let gap = book.poll_gap(&p.device, p.sent);
                    spawn(&mut polls, p.device, p.sent + gap);
                }
            }
        }
    }
    book
}

/// Asks the API for `device`'s latest readings once.
async fn poll(http: &reqwest::Client, base: &str, device: String, due: Instant) -> Polled {
    let url = format!("{base}/v1/devices/{device}");
    let sent = Instant::now();
    let (latest, failed) = match http.get(&url).send().await {
        Ok(resp) if resp.status().is_success() => match resp.json::<DeviceView>().await {
            Ok(view) => (view.metrics.values().map(|p| p.ts).max(), false),
            Err(_) => (None, true),
        },
        // Unknown until its first reading lands.
        Ok(resp) if resp.status() == reqwest::StatusCode::NOT_FOUND => (None, false),
        Ok(_) | Err(_) => (None, true),
    };
    Polled {
        device,
        latest,
        failed,
        due,
        sent,
        at: Instant::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_rank_misses_above_every_visible_sample() {
        let visible: Vec<u64> = (1..=98).map(|ms| ms * 1000).collect();
        // 98 seen, 2 missed: the p50 and p98 are times, the p99 a miss.
        assert_eq!(quantile(&visible, 2, 0.5), Some(Quantile::Ms(50.0)));
        assert_eq!(quantile(&visible, 2, 0.98), Some(Quantile::Ms(98.0)));
        assert_eq!(quantile(&visible, 2, 0.99), Some(Quantile::Missed));
        assert_eq!(quantile(&visible, 2, 1.0), Some(Quantile::Missed));
        // Without misses the same samples give a time throughout.
        assert_eq!(quantile(&visible, 0, 0.99), Some(Quantile::Ms(98.0)));
        // Most samples missed: even the median is a miss.
        assert_eq!(quantile(&visible[..10], 90, 0.5), Some(Quantile::Missed));
        assert_eq!(quantile(&[], 0, 0.5), None);
        assert_eq!(quantile(&[], 3, 0.5), Some(Quantile::Missed));
    }

    fn sample(device: &str, ts: i64, written: Instant) -> Sample {
        Sample {
            device_id: device.into(),
            ts,
            written,
        }
    }

    #[test]
    fn one_answer_settles_every_sample_it_shows_and_misses_are_counted() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let timeout = ms(1000);
        let mut book = Book::default();
        assert!(book.offer(sample("a", 10, t0), timeout));
        assert!(
            !book.offer(sample("a", 20, t0 + ms(5)), timeout),
            "a is polled already"
        );
        assert!(!book.offer(sample("a", 30, t0 + ms(10)), timeout));
        assert!(book.offer(sample("b", 10, t0), timeout));
        // a shows ts 20: two samples settled, one still waits.
        assert!(book.answer("a", Some(20), t0 + ms(40)));
        // b never shows anything: polled on until its deadline.
        assert!(book.answer("b", None, t0 + ms(500)));
        assert!(!book.answer("b", None, t0 + ms(1000)));
        assert!(!book.answer("a", Some(30), t0 + ms(70)));
        assert_eq!(book.waiting(), 0);
        let f = book.figures(2, 1, timeout);
        assert_eq!(
            (f.samples, f.visible, f.timed_out, f.dropped, f.missed),
            (6, 3, 1, 2, 3)
        );
        // Visible: 35, 40 and 60 ms; misses rank above them.
        assert_eq!(f.p50_ms, Some(Quantile::Ms(60.0)));
        assert_eq!(f.p99_ms, Some(Quantile::Missed));
        assert_eq!(f.max_ms, Some(Quantile::Missed));
    }

    #[test]
    fn a_device_is_polled_every_20_ms_until_its_oldest_sample_is_older_than_400_ms() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut book = Book::default();
        book.offer(sample("a", 10, t0), ms(10_000));
        book.offer(sample("a", 20, t0 + ms(900)), ms(10_000));
        assert_eq!(book.poll_gap("a", t0 + ms(100)), POLL);
        assert_eq!(book.poll_gap("a", t0 + ms(400)), POLL);
        // The oldest sample rules: a twentieth of its age.
        assert_eq!(book.poll_gap("a", t0 + ms(1000)), ms(50));
        assert_eq!(book.poll_gap("a", t0 + ms(4000)), ms(200));
        // Once it is seen, the next sample's age counts.
        book.answer("a", Some(10), t0 + ms(4000));
        assert_eq!(book.poll_gap("a", t0 + ms(4900)), ms(200));
        assert_eq!(book.poll_gap("unknown", t0), POLL);
    }

    #[test]
    fn late_polls_are_reported_so_the_probe_own_delay_is_not_taken_for_the_pipeline() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut book = Book::default();
        // 98 polls on time, two that waited 300 and 500 ms for a slot.
        for _ in 0..98 {
            book.polled(t0, t0);
        }
        book.polled(t0, t0 + ms(300));
        book.polled(t0 + ms(10), t0 + ms(510));
        // A request sent before its due time (a timer's rounding) is on time.
        book.polled(t0 + ms(5), t0);
        let f = book.figures(0, 1, ms(1000));
        assert_eq!(f.poll_late_p99_ms, Some(300.0));
        let mut other = Book::default();
        other.polled(t0, t0 + ms(900));
        let mut tally = Book::default().tally(0, 1);
        tally.merge(other.tally(0, 1));
        assert_eq!(tally.figures(ms(1000)).poll_late_p99_ms, Some(900.0));
        assert_eq!(
            Book::default().figures(0, 1, ms(1000)).poll_late_p99_ms,
            None
        );
    }

    #[test]
    fn auto_sampling_aims_at_a_few_thousand_samples() {
        assert_eq!(FreshnessSample::Auto.every(10_000_000), Some(2000));
        assert_eq!(FreshnessSample::Auto.every(200), Some(1));
        assert_eq!(FreshnessSample::Every(7).every(10_000_000), Some(7));
        assert_eq!(FreshnessSample::Off.every(10), None);
        assert_eq!("0".parse(), Ok(FreshnessSample::Off));
        assert_eq!("auto".parse(), Ok(FreshnessSample::Auto));
        assert_eq!("250".parse(), Ok(FreshnessSample::Every(250)));
        assert!("often".parse::<FreshnessSample>().is_err());
    }
}
