//! The lateness rule, in one place: the core judges every reading by it, and
//! the endpoint asks it which messages the core may refuse.
//!
//! A window is final once its end plus the allowed lateness is at or below a
//! time: at `received_at` a reading whose finest window is final there is
//! `too_late`; at the processed watermark a window can no longer change. A
//! reading more than the future tolerance after `received_at` is
//! `in_future`.

use schemas::RejectReason;

/// The bounds on a reading's time. Defaults match [`crate::AggregateConfig`]'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatenessConfig {
    /// How long after its end a window still accepts readings.
    pub allowed_lateness_ms: i64,
    /// How far past `received_at` a reading's time may lie.
    pub future_tolerance_ms: i64,
}

impl Default for LatenessConfig {
    fn default() -> Self {
        LatenessConfig {
            allowed_lateness_ms: 3_600_000,
            future_tolerance_ms: 600_000,
        }
    }
}

impl LatenessConfig {
    /// Whether a window ending at `end` is final at `at`: nothing that
    /// arrives from then on may change it.
    pub fn is_final(&self, end: i64, at: i64) -> bool {
        end.saturating_add(self.allowed_lateness_ms) <= at
    }

    /// Why a reading at `ts`, whose finest window ends at `window_end`, is
    /// refused when received at `received_at`; `None` if it is accepted.
    pub fn refusal(&self, ts: i64, window_end: i64, received_at: i64) -> Option<RejectReason> {
        if ts > received_at.saturating_add(self.future_tolerance_ms) {
            Some(RejectReason::InFuture)
        } else if self.is_final(window_end, received_at) {
            Some(RejectReason::TooLate)
        } else {
            None
        }
    }

    /// Whether a reading at `ts`, received at `received_at`, may be refused
    /// whatever the finest resolution: judged as if its window ended as early
    /// as any window holding `ts` can, just after `ts`.
    pub fn may_refuse(&self, ts: i64, received_at: i64) -> bool {
        self.refusal(ts, ts.saturating_add(1), received_at)
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_keeps_the_origin_of_every_reading_the_core_refuses() {
        let lateness = LatenessConfig {
            allowed_lateness_ms: 1_000,
            future_tolerance_ms: 500,
        };
        let received_at = 100_000;
        for window_ms in [1i64, 10, 60, 1_000] {
            for ts in 98_000i64..101_000 {
                let end = ts - ts.rem_euclid(window_ms) + window_ms;
                if lateness.refusal(ts, end, received_at).is_some() {
                    assert!(
                        lateness.may_refuse(ts, received_at),
                        "ts {ts}, window {window_ms}"
                    );
                }
            }
        }
        assert!(!lateness.may_refuse(received_at - 1_000, received_at));
        assert!(lateness.may_refuse(received_at - 1_001, received_at));
        assert!(!lateness.may_refuse(received_at + 500, received_at));
        assert!(lateness.may_refuse(received_at + 501, received_at));
    }
}
