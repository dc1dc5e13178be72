//! The live tap: clients may SUBSCRIBE and watch accepted telemetry once it is
//! durable, at QoS 0.
//!
//! The appender hands every stored, accepted message to [`TapHub::publish`],
//! which copies it into the bounded queue of each matching subscriber. A full
//! queue drops the message for that subscriber only, and counts it: a slow
//! watcher never slows ingest.
//!
//! Code elsewhere in the process publishes on the same tap through a
//! [`LiveTap`] handle given to the endpoint (the alert loop, on
//! `iotpipe/alerts/{rule}`). Such messages never reach the stream, and a
//! client cannot publish on those topics (the endpoint takes only telemetry
//! topics), so what a subscriber sees there comes from the process itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::metrics::{IngestMetrics, bump};

/// One accepted message as the device sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TapMessage {
    pub topic: Bytes,
    pub payload: Bytes,
}

/// A connection's subscriptions and the queue its messages go to.
#[derive(Debug)]
struct Subscriber {
    conn_id: u64,
    filters: Vec<String>,
    tx: mpsc::Sender<TapMessage>,
}

/// Every live subscription, shared by the connections and the appender.
#[derive(Debug, Default)]
pub(crate) struct TapHub {
    subscribers: Mutex<Vec<Subscriber>>,
    /// How many connections subscribe, read without the lock so that
    /// connections skip keeping payloads for the tap when nobody watches.
    active: AtomicUsize,
}

impl TapHub {
    pub fn has_subscribers(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }

    /// Adds filters for a connection; `tx` is its queue.
    pub fn subscribe(&self, conn_id: u64, filters: Vec<String>, tx: &mpsc::Sender<TapMessage>) {
        let mut subs = self.lock();
        match subs.iter_mut().find(|s| s.conn_id == conn_id) {
            Some(s) => {
                for f in filters {
                    if !s.filters.contains(&f) {
                        s.filters.push(f);
                    }
                }
            }
            None => subs.push(Subscriber {
                conn_id,
                filters,
                tx: tx.clone(),
            }),
        }
        self.active.store(subs.len(), Ordering::Relaxed);
    }

    pub fn unsubscribe(&self, conn_id: u64, filters: &[String]) {
        let mut subs = self.lock();
        if let Some(s) = subs.iter_mut().find(|s| s.conn_id == conn_id) {
            s.filters.retain(|f| !filters.contains(f));
        }
        subs.retain(|s| !s.filters.is_empty());
        self.active.store(subs.len(), Ordering::Relaxed);
    }

    /// Forgets a connection that closed.
    pub fn remove(&self, conn_id: u64) {
        let mut subs = self.lock();
        subs.retain(|s| s.conn_id != conn_id);
        self.active.store(subs.len(), Ordering::Relaxed);
    }

    /// Offers durable messages to every matching subscriber, once each.
    pub fn publish(&self, messages: &[TapMessage], metrics: &IngestMetrics) {
        if messages.is_empty() || !self.has_subscribers() {
            return;
        }
        let subs = self.lock();
        for m in messages {
            let Ok(topic) = std::str::from_utf8(&m.topic) else {
                continue;
            };
            for s in subs.iter() {
                if !s.filters.iter().any(|f| matches(topic, f)) {
                    continue;
                }
                match s.tx.try_send(m.clone()) {
                    Ok(()) => bump(&metrics.tap_delivered),
                    // A closed queue belongs to a connection about to remove
                    // itself; the message is as lost to it as a dropped one.
                    Err(_) => bump(&metrics.tap_dropped),
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Subscriber>> {
        // The lock guards plain data; a panic elsewhere cannot leave it torn.
        self.subscribers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A handle on the endpoint's live tap, for messages the process itself
/// publishes to subscribers: give a clone to the endpoint in
/// [`EndpointConfig::tap`](crate::EndpointConfig::tap) and publish on the
/// other. QoS 0 like the rest of the tap: a subscriber that is not connected,
/// or whose queue is full, misses the message.
#[derive(Debug, Clone, Default)]
pub struct LiveTap {
    hub: Arc<TapHub>,
}

impl LiveTap {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn hub(&self) -> Arc<TapHub> {
        self.hub.clone()
    }

    /// Offers one message to every subscriber whose filter matches `topic`,
    /// counted with the tap's other messages in `metrics`.
    pub fn publish(&self, topic: &str, payload: &[u8], metrics: &IngestMetrics) {
        let message = TapMessage {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::copy_from_slice(payload),
        };
        self.hub.publish(std::slice::from_ref(&message), metrics);
    }
}

/// Whether `filter` is a valid MQTT topic filter: `#` only as the whole last
/// level, `+` only as a whole level.
pub(crate) fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains(['#', '+']),
    })
}

/// Whether `topic` matches `filter`. Topics starting with `$` match no
/// wildcard at their first level, as MQTT requires.
pub(crate) fn matches(topic: &str, filter: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match topic_levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_mqtt() {
        let t = "dt/f1/dev-1/telemetry";
        for yes in [
            "#",
            "dt/#",
            "dt/+/dev-1/telemetry",
            "dt/+/+/+",
            t,
            "dt/f1/dev-1/telemetry/#",
        ] {
            assert!(matches(t, yes), "{yes}");
        }
        for no in [
            "dt/+",
            "dt/f2/#",
            "dt/+/dev-2/telemetry",
            "dt/f1/dev-1",
            "dt/f1/dev-1/telemetry/x",
            "+/+/+",
        ] {
            assert!(!matches(t, no), "{no}");
        }
        assert!(!matches("$SYS/x", "#"));
        assert!(matches("$SYS/x", "$SYS/#"));
    }

    #[test]
    fn validates_filters() {
        for ok in ["#", "+", "dt/+/x/telemetry", "dt/#", "a//b", "/"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "dt/#/x", "dt/a#", "dt/a+/b", "a\0b", "dt/##"] {
            assert!(!valid_filter(bad), "{bad}");
        }
    }

    fn message(topic: &'static str) -> TapMessage {
        TapMessage {
            topic: Bytes::from_static(topic.as_bytes()),
            payload: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn a_full_queue_drops_for_that_subscriber_only() {
        let hub = TapHub::default();
        let metrics = IngestMetrics::new();
        let (slow_tx, mut slow_rx) = mpsc::channel(1);
        let (fast_tx, mut fast_rx) = mpsc::channel(10);
        hub.subscribe(1, vec!["dt/#".into()], &slow_tx);
        hub.subscribe(2, vec!["dt/+/d1/telemetry".into()], &fast_tx);
        assert!(hub.has_subscribers());
        let msgs = [
            message("dt/f/d1/telemetry"),
            message("dt/f/d2/telemetry"),
            message("dt/f/d1/telemetry"),
        ];
        hub.publish(&msgs, &metrics);
        assert_eq!(slow_rx.try_recv().unwrap(), msgs[0]);
        assert!(slow_rx.try_recv().is_err());
        assert_eq!(fast_rx.try_recv().unwrap(), msgs[0]);
        assert_eq!(fast_rx.try_recv().unwrap(), msgs[2]);
        assert!(fast_rx.try_recv().is_err());
        let s = metrics.snapshot();
        assert_eq!((s.tap_delivered, s.tap_dropped), (3, 2));

        hub.unsubscribe(2, &["dt/+/d1/telemetry".into()]);
        hub.remove(1);
        assert!(!hub.has_subscribers());
        hub.publish(&msgs, &metrics);
        assert_eq!(metrics.snapshot().tap_delivered, 3);
    }

    #[test]
    fn the_process_publishes_on_the_tap_to_matching_subscribers_only() {
        let tap = LiveTap::new();
        let hub = tap.hub();
        let metrics = IngestMetrics::new();
        let (alerts_tx, mut alerts_rx) = mpsc::channel(10);
        let (fleet_tx, mut fleet_rx) = mpsc::channel(10);
        hub.subscribe(1, vec!["iotpipe/alerts/#".into()], &alerts_tx);
        hub.subscribe(2, vec!["dt/#".into()], &fleet_tx);
        tap.publish("iotpipe/alerts/hot", b"{\"rule\":\"hot\"}", &metrics);
        assert_eq!(
            alerts_rx.try_recv().unwrap(),
            TapMessage {
                topic: Bytes::from_static(b"iotpipe/alerts/hot"),
                payload: Bytes::from_static(b"{\"rule\":\"hot\"}"),
            }
        );
        assert!(alerts_rx.try_recv().is_err());
        assert!(fleet_rx.try_recv().is_err());
        assert_eq!(metrics.snapshot().tap_delivered, 1);
    }
}
