//! `--hold-connections`: devices that have published everything and have
//! their PUBACKs stay connected until every device of the process has, then
//! all disconnect. A fleet stays connected; a run whose devices left one by
//! one as they finished would put 19,000 DISCONNECTs and closes into the
//! last second of publishing, on the same machine as the broker, and the
//! PUBACKs of that second would measure the storm rather than the fleet.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::Notify;

/// Counts the devices still publishing, and releases the finished ones once
/// none is.
#[derive(Debug)]
pub struct Finishing {
    remaining: AtomicU32,
    notify: Notify,
}

impl Finishing {
    pub fn new(devices: u32) -> Arc<Finishing> {
        Arc::new(Finishing {
            remaining: AtomicU32::new(devices),
            notify: Notify::new(),
        })
    }

    fn arrive(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.notify.notify_waiters();
        }
    }

    /// Resolves once every device has arrived.
    pub async fn released(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a release between the
            // two still wakes this waiter.
            notified.as_mut().enable();
            if self.remaining.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// One device's place in [`Finishing`]: it arrives once, when it has
/// finished publishing, or when it is dropped, so that a device whose run
/// ends any other way cannot hold the others.
pub struct Arrival(Option<Arc<Finishing>>);

impl Arrival {
    pub fn new(finishing: Option<Arc<Finishing>>) -> Arrival {
        Arrival(finishing)
    }

    /// Arrives, and returns what to wait on before disconnecting, if the
    /// run holds connections.
    pub fn arrive(&mut self) -> Option<Arc<Finishing>> {
        let f = self.0.take()?;
        f.arrive();
        Some(f)
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            f.arrive();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn finished_devices_wait_for_the_last_one() {
        let f = Finishing::new(3);
        let mut a = Arrival::new(Some(f.clone()));
        let mut b = Arrival::new(Some(f.clone()));
        let c = Arrival::new(Some(f.clone()));
        let held = a.arrive().expect("the run holds connections");
        assert!(held.released().now_or_never().is_none());
        assert!(b.arrive().is_some());
        assert!(held.released().now_or_never().is_none());
        // The last device's run ended without arriving (it failed): its drop
        // counts, so the others are not held forever.
        let waiting = tokio::spawn({
            let f = f.clone();
            async move { f.released().await }
        });
        drop(c);
        waiting
            .await
            .expect("the waiter ends once all have arrived");
        assert!(held.released().now_or_never().is_some());
    }

    #[test]
    fn arriving_twice_counts_once_and_without_holding_nothing_waits() {
        let f = Finishing::new(2);
        let mut a = Arrival::new(Some(f.clone()));
        assert!(a.arrive().is_some());
        assert!(a.arrive().is_none());
        drop(a);
        assert!(f.released().now_or_never().is_none());
        assert!(Arrival::new(None).arrive().is_none());
        assert!(Finishing::new(0).released().now_or_never().is_some());
    }
}
