//! The alert loop's wiring: on a stream shared by leases, it runs the rules
//! only while this process holds the `alerts` lease in the stream's lease
//! table, so that several `iotpipe process` instances deliver each alert
//! once between them; on the embedded log this process is the only one.

use std::sync::Arc;

use processors::alerts::{AlertContext, AlertLease, AlertWorker};
use tokio_util::sync::CancellationToken;

use super::now_ms;
use super::stages::Wiring;
use crate::backends::{Store, Stream};

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
        Some(processors::alerts::run(
            worker,
            stop.clone().cancelled_owned(),
        ))
    }
}
