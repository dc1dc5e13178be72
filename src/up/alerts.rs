//! The alert loop's wiring: on a stream shared by leases, it runs the rules
//! only while this process holds the `alerts` lease in the stream's lease
//! table, so that several `iotpipe process` instances deliver each alert
//! once between them; on the embedded log this process is the only one.
//! With the endpoint in the same process (`iotpipe up`), each alert is also
//! published on its live tap, on `iotpipe/alerts/{rule}`, as it fires;
//! `iotpipe ingest` on its own reads them from the store for its tap
//! ([`processors::alerts::AlertRelay`]).

use std::sync::Arc;

use processors::alerts::{AlertContext, AlertFeed, AlertLease, AlertRelay, AlertWorker, webhook};
use schemas::state::AlertState;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ingest::{IngestMetrics, LiveTap};

use super::stages::Wiring;
use super::{Roles, now_ms};
use crate::backends::{Store, Stream};

/// The endpoint's live tap and its counters, with the ingest role: alerts
/// fired or relayed in this process are published on it.
pub(super) fn live_tap(
    roles: Roles,
    metrics: &Arc<IngestMetrics>,
) -> Option<(LiveTap, Arc<IngestMetrics>)> {
    roles.ingest.then(|| (LiveTap::new(), metrics.clone()))
}

impl Wiring<'_> {
    /// The alert rules' evaluation and notifications, stopping with `stop`;
    /// `None` without rules.
    pub(super) fn alert_loop(
        &self,
        stream: &Stream,
        store: &Store,
        stop: &CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let setup = self.alerts.clone()?;
        let ctx = AlertContext {
            setup,
            store: store.writer(),
            query: store.query(),
            aggregate: self.aggregate.clone(),
            metrics: self.alert_metrics.clone(),
            clock: Arc::new(now_ms),
        };
        let mut worker = AlertWorker::new(ctx);
        if let Some(shared) = stream.leased() {
            let owner = crate::leased::owner_id();
            let lease_duration = self.config.backend.lease_duration;
            worker = worker.with_lease(AlertLease::new(
                shared.lease_store(),
                &owner,
                lease_duration,
            ));
        }
        if let Some(feed) = self.tap_feed() {
            worker = worker.with_feed(feed);
        }
        Some(processors::alerts::run(
            worker,
            stop.clone().cancelled_owned(),
        ))
    }

    /// The ingest role without the process role: the alerts the process
    /// role fires, read from the store and published on this endpoint's
    /// tap. `None` in any other role, or without rules.
    pub(super) fn start_alert_relay(
        &self,
        roles: Roles,
        store: Option<&Store>,
        stop: &CancellationToken,
    ) -> Option<JoinHandle<()>> {
        if !roles.relays_alerts(self.config) {
            return None;
        }
        let (setup, store) = (self.alerts.clone()?, store?);
        let feed = self.tap_feed()?;
        let relay = AlertRelay::new(store.query(), &setup, &self.aggregate, now_ms());
        Some(tokio::spawn(processors::alerts::relay(
            relay,
            setup.evaluate_every,
            Arc::new(now_ms),
            feed,
            stop.clone().cancelled_owned(),
        )))
    }

    /// Publishes an alert on this process's live tap, if it runs the
    /// endpoint.
    fn tap_feed(&self) -> Option<AlertFeed> {
        let (tap, metrics) = self.tap.clone()?;
        Some(Arc::new(move |alert: &AlertState| {
            let topic = processors::alerts::tap_topic(&alert.rule);
            tap.publish(&topic, &webhook::body(alert), &metrics);
        }))
    }
}
