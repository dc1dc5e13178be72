//! A device's status (`online`, `offline`, `stale`) from what its member row
//! and spans hold, and the time the caller says it is. `stale` is never
//! stored: it is derived here, at query time, from `last_seen`.

use schemas::PresenceEvent;
use schemas::state::PresenceMark;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Status {
    Online,
    Offline,
    Stale,
}

impl Status {
    pub const ALL: [Status; 3] = [Status::Online, Status::Offline, Status::Stale];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Online => "online",
            Status::Offline => "offline",
            Status::Stale => "stale",
        }
    }
}

schemas::named!(Status, "status");

/// The status of a device last seen (latest reading's `received_at`, 0 for
/// none) at `last_seen`, whose latest presence event is `presence`, at
/// `now`:
///
/// - `offline` if its latest presence event is a disconnect at or after its
///   latest reading (a reading after a disconnect makes it online again);
/// - else `stale` if neither a reading nor a connect came in the last
///   `stale_after_ms` (a device that just connected is online until then);
/// - else `online`.
pub fn status(
    last_seen: i64,
    presence: Option<&PresenceMark>,
    now: i64,
    stale_after_ms: i64,
) -> Status {
    let mut heard = last_seen;
    if let Some(p) = presence {
        if p.event.is_offline() && p.at >= last_seen {
            return Status::Offline;
        }
        if p.event == PresenceEvent::Connected {
            heard = heard.max(p.at);
        }
    }
    if now.saturating_sub(heard) >= stale_after_ms {
        Status::Stale
    } else {
        Status::Online
    }
}

/// Whether a device whose member row says `last_seen` may have a later
/// reading that would change its status: its row is written when it starts a
/// span, not per reading, so only a row that already reads `online` is sure.
pub fn needs_latest_reading(row_status: Status) -> bool {
    row_status != Status::Online
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn mark(at: i64, event: PresenceEvent) -> PresenceMark {
        PresenceMark { at, event }
    }

    fn lost() -> PresenceEvent {
        PresenceEvent::Disconnected {
            reason: schemas::presence::CONNECTION_LOST.into(),
        }
    }

    #[test]
    fn a_device_goes_stale_after_the_configured_time() {
        assert_eq!(status(10 * MIN, None, 14 * MIN, 5 * MIN), Status::Online);
        assert_eq!(status(10 * MIN, None, 15 * MIN, 5 * MIN), Status::Stale);
    }

    #[test]
    fn a_disconnect_after_the_last_reading_is_offline_even_when_stale() {
        let p = mark(11 * MIN, lost());
        assert_eq!(
            status(10 * MIN, Some(&p), 11 * MIN, 5 * MIN),
            Status::Offline
        );
        assert_eq!(
            status(10 * MIN, Some(&p), 99 * MIN, 5 * MIN),
            Status::Offline
        );
    }

    #[test]
    fn a_reading_after_a_disconnect_is_online_again() {
        let p = mark(11 * MIN, lost());
        assert_eq!(
            status(12 * MIN, Some(&p), 13 * MIN, 5 * MIN),
            Status::Online
        );
    }

    #[test]
    fn a_connect_counts_as_heard_and_a_takeover_is_not_offline() {
        let c = mark(20 * MIN, PresenceEvent::Connected);
        assert_eq!(
            status(10 * MIN, Some(&c), 21 * MIN, 5 * MIN),
            Status::Online
        );
        assert_eq!(status(10 * MIN, Some(&c), 25 * MIN, 5 * MIN), Status::Stale);
        let t = mark(
            20 * MIN,
            PresenceEvent::Disconnected {
                reason: schemas::presence::TAKEN_OVER.into(),
            },
        );
        assert_eq!(
            status(19 * MIN, Some(&t), 21 * MIN, 5 * MIN),
            Status::Online
        );
    }

    #[test]
    fn statuses_read_back() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
        }
        assert!("gone".parse::<Status>().is_err());
    }
}
