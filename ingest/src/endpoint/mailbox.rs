//! What reaches a connection from outside its task: the fate of its records
//! (from the appender), a kick (another connection claimed its client id),
//! a shutdown (from the accept loop).
//!
//! Each used to be a channel of its own and an arm of the connection's
//! `select!`: a channel of completions, a oneshot receiver, a child
//! cancellation token. A connection polls every arm on every wake, and at
//! fleet shape it wakes twice a message (the read, then the record made
//! durable) for tens of thousands of connections: each wake locked the
//! token's mutex and its notifier's, read the oneshot's state and popped the
//! channel, and each channel's first block of slots (about 1.6 KiB) was held
//! by every connection whether it was chatty or not. A mailbox is one word
//! of reasons, one waker slot and the outcomes waiting, owned by one
//! connection: raising sets a bit and wakes, polling is a load and a waker
//! registration, and outcomes move by swapping two vectors that keep their
//! capacity.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

/// Why a mailbox is raised; bits of one word, so a poll can wait for any of
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reasons(u8);

impl Reasons {
    #[cfg(test)]
    pub const NONE: Reasons = Reasons(0);
    /// Outcomes of records are waiting: [`Mailbox::take`] them.
    pub const DURABLE: Reasons = Reasons(1);
    /// Another connection claimed this one's client id.
    pub const KICKED: Reasons = Reasons(2);
    /// The endpoint is shutting down.
    pub const SHUTDOWN: Reasons = Reasons(4);

    /// Whether every one of `other` is here (and `other` is not empty).
    pub fn contains(self, other: Reasons) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub fn with(self, other: Reasons) -> Reasons {
        Reasons(self.0 | other.0)
    }

    pub fn without(self, other: Reasons) -> Reasons {
        Reasons(self.0 & !other.0)
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }
}

/// What became of some of one connection's records.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Completion {
    pub stored: Vec<u64>,
    /// Given up on: the stream refused them for good or shutdown ran out of
    /// time. They must never be acknowledged.
    pub failed: Vec<u64>,
}

impl Completion {
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.stored.is_empty() && self.failed.is_empty()
    }

    pub fn clear(&mut self) {
        self.stored.clear();
        self.failed.clear();
    }
}

/// One connection's mailbox; shared by the connection (which waits on it)
/// and whoever writes to it (the appender, the client-id registry, the
/// accept loop). A mailbox whose connection is gone takes what is written
/// and nobody reads it.
#[derive(Debug, Default)]
pub(crate) struct Mailbox {
    raised: AtomicU8,
    waker: AtomicWaker,
    outcomes: Mutex<Completion>,
}

impl Mailbox {
    pub fn new() -> Arc<Mailbox> {
        Arc::new(Mailbox::default())
    }

    /// Raises `reasons`; the connection's next poll sees them, and a
    /// connection waiting is woken.
    pub fn raise(&self, reasons: Reasons) {
        // Release: what the raiser wrote before (outcomes) is visible to the
        // connection that sees the bit.
        self.raised.fetch_or(reasons.0, Ordering::Release);
        self.waker.wake();
    }

    /// What is raised now.
    pub fn raised(&self) -> Reasons {
        Reasons(self.raised.load(Ordering::Acquire))
    }

    /// Outcomes to add to; [`Reasons::DURABLE`] is to be raised once the
    /// guard is dropped.
    pub fn outcomes(&self) -> MutexGuard<'_, Completion> {
        // Outcomes are plain vectors pushed to whole: a panic elsewhere
        // cannot leave one half written.
        self.outcomes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves the waiting outcomes into `into` (emptied first, so that its
    /// vectors' capacity serves the next delivery) and lowers
    /// [`Reasons::DURABLE`]. Outcomes delivered meanwhile raise it again.
    pub fn take(&self, into: &mut Completion) {
        into.clear();
        self.raised
            .fetch_and(!Reasons::DURABLE.0, Ordering::Acquire);
        std::mem::swap(&mut *self.outcomes(), into);
    }

    /// Ready with whichever of `wanted` are raised; registers the task to be
    /// woken otherwise. Kicks and shutdowns stay raised: the caller stops
    /// asking for one it has dealt with.
    pub fn poll_raised(&self, cx: &mut Context<'_>, wanted: Reasons) -> Poll<Reasons> {
        let seen = Reasons(self.raised().0 & wanted.0);
        if !seen.is_empty() {
            return Poll::Ready(seen);
        }
        self.waker.register(cx.waker());
        // A raise between the load above and the registration woke nobody;
        // look again now that a wake would reach this task.
        let seen = Reasons(self.raised().0 & wanted.0);
        if seen.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(seen)
        }
    }

    /// Waits until one of `wanted` is raised; never, if `wanted` is empty.
    pub async fn wait(&self, wanted: Reasons) -> Reasons {
        std::future::poll_fn(|cx| self.poll_raised(cx, wanted)).await
    }

    /// Waits for outcomes and takes them.
    #[cfg(test)]
    pub async fn next(&self) -> Completion {
        self.wait(Reasons::DURABLE).await;
        let mut c = Completion::default();
        self.take(&mut c);
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use futures::task::ArcWake;
    use std::sync::atomic::AtomicUsize;

    struct Wakes(AtomicUsize);

    impl ArcWake for Wakes {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Wakes>, std::task::Waker) {
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let waker = futures::task::waker(wakes.clone());
        (wakes, waker)
    }

    #[test]
    fn a_raise_wakes_a_waiter_and_stays_raised() {
        let mailbox = Mailbox::new();
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let both = Reasons::KICKED.with(Reasons::SHUTDOWN);
        assert_eq!(mailbox.poll_raised(&mut cx, both), Poll::Pending);
        mailbox.raise(Reasons::SHUTDOWN);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(
            mailbox.poll_raised(&mut cx, both),
            Poll::Ready(Reasons::SHUTDOWN)
        );
        // Still raised for the next poll, and only what is asked for shows.
        assert_eq!(
            mailbox.wait(Reasons::SHUTDOWN).now_or_never(),
            Some(Reasons::SHUTDOWN)
        );
        assert_eq!(mailbox.poll_raised(&mut cx, Reasons::KICKED), Poll::Pending);
        mailbox.raise(Reasons::KICKED);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        assert_eq!(
            mailbox.wait(Reasons::KICKED).now_or_never(),
            Some(Reasons::KICKED)
        );
        assert!(mailbox.raised().contains(both));
    }

    #[test]
    fn outcomes_are_taken_once_and_a_later_delivery_raises_again() {
        let mailbox = Mailbox::new();
        let (wakes, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        assert_eq!(
            mailbox.poll_raised(&mut cx, Reasons::DURABLE),
            Poll::Pending
        );
        {
            let mut outcomes = mailbox.outcomes();
            outcomes.stored.extend([1, 2]);
            outcomes.failed.push(3);
        }
        mailbox.raise(Reasons::DURABLE);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        let mut taken = Completion {
            stored: vec![99],
            failed: Vec::new(),
        };
        mailbox.take(&mut taken);
        assert_eq!(taken.stored, vec![1, 2]);
        assert_eq!(taken.failed, vec![3]);
        // Taken: nothing raised, nothing left.
        assert_eq!(
            mailbox.poll_raised(&mut cx, Reasons::DURABLE),
            Poll::Pending
        );
        mailbox.take(&mut taken);
        assert!(taken.is_empty());
        mailbox.outcomes().stored.push(4);
        mailbox.raise(Reasons::DURABLE);
        assert_eq!(
            mailbox.next().now_or_never().map(|c| c.stored),
            Some(vec![4])
        );
    }

    #[test]
    fn nothing_wanted_is_never_ready() {
        let mailbox = Mailbox::new();
        mailbox.raise(Reasons::KICKED.with(Reasons::SHUTDOWN));
        assert_eq!(mailbox.wait(Reasons::NONE).now_or_never(), None);
        assert_eq!(
            Reasons::KICKED
                .with(Reasons::SHUTDOWN)
                .without(Reasons::KICKED),
            Reasons::SHUTDOWN
        );
        assert!(!Reasons::SHUTDOWN.contains(Reasons::NONE));
    }
}
