//! Closing finished connections' sockets on a thread of their own, at idle
//! priority.
//!
//! Closing a TCP socket is not free: its FIN, and over loopback the peer's
//! whole handling of it, run in the closing thread (about half of what a
//! disconnect costs the endpoint). When a fleet finishes together, thousands
//! of devices disconnect in the same half second while the rest are still
//! publishing; closed on the connection tasks' threads, those teardowns sat in
//! front of the publishers' acknowledgements. Handed here instead, they wait
//! for a moment the machine has nothing more urgent to do (`SCHED_IDLE` on
//! Linux), which the operating system still gives them under sustained load,
//! only slowly.
//!
//! A socket's connection slot travels with it, so open sockets never exceed
//! the connection limit however far the closer falls behind: at the limit, new
//! connections are refused until it catches up, as they would be if the
//! devices had not left.

use std::sync::mpsc;
use std::thread::JoinHandle;

/// Whatever has to be dropped to finish a connection: its socket, and what
/// it held for as long as the socket is open.
pub(crate) type Remains = Box<dyn Send>;

/// Where connection tasks leave their sockets to be closed.
pub(crate) struct Closer {
    queue: mpsc::Sender<Remains>,
}

impl Closer {
    /// Starts the closing thread. It ends when the last `Closer` is dropped
    /// and everything handed to it is closed; the handle joins it.
    pub fn start() -> (Closer, Option<JoinHandle<()>>) {
        let (queue, handed) = mpsc::channel::<Remains>();
        let thread = std::thread::Builder::new()
            .name("iotpipe-closer".into())
            .spawn(move || {
                lower_priority();
                for remains in handed {
                    drop(remains);
                }
            });
        match thread {
            Ok(thread) => (Closer { queue }, Some(thread)),
            Err(e) => {
                // The receiver went down with the closure that never ran, so
                // `close` finds the queue closed and drops in place.
                tracing::warn!(error = %e, "No thread for closing connections; they close in place.");
                (Closer { queue }, None)
            }
        }
    }

    /// Closes `remains` on the closing thread, or here if it has gone.
    pub fn close(&self, remains: Remains) {
        // A failed send hands the value back inside the error, dropped here.
        let _ = self.queue.send(remains);
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id,
    };
    let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
    if let Err(e) = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle) {
        // Still correct, only in competition with the publishers again.
        tracing::warn!(error = ?e, "The connection closer could not lower its priority.");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {
    if let Err(e) =
        thread_priority::set_current_thread_priority(thread_priority::ThreadPriority::Min)
    {
        tracing::warn!(error = ?e, "The connection closer could not lower its priority.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn everything_handed_over_is_dropped_by_the_time_the_thread_is_joined() {
        let (closer, thread) = Closer::start();
        let held = Arc::new(());
        for _ in 0..100 {
            closer.close(Box::new(held.clone()));
        }
        drop(closer);
        thread.unwrap().join().unwrap();
        assert_eq!(Arc::strong_count(&held), 1);
    }

    #[test]
    fn a_closer_whose_thread_has_gone_drops_in_place() {
        let (queue, handed) = mpsc::channel::<Remains>();
        drop(handed);
        let closer = Closer { queue };
        let held = Arc::new(());
        closer.close(Box::new(held.clone()));
        assert_eq!(Arc::strong_count(&held), 1);
    }
}
