//! Lateness judgement: a reading is refused by its own `received_at` when
//! planned, and by the shard's processed watermark once that is loaded.

use schemas::record::ReadingView;
use schemas::{RejectReason, Rejection};

use super::plan::{Body, Plan};
use crate::config::AggregateConfig;

/// Lateness is judged against `received_at`, stamped once at ingest, so a
/// replayed batch decides exactly as the first attempt did.
pub(super) fn judge(reading: &ReadingView, received_at: i64, cfg: &AggregateConfig) -> Option<Rejection> {
    let finest = cfg.finest();
    let end = finest.window_start(reading.ts) + finest.ms();
    let reason = cfg.lateness().refusal(reading.ts, end, received_at)?;
    let detail = match reason {
        RejectReason::InFuture => format!(
            "ts {} is {} ms after the reading was received (limit {} ms)",
            reading.ts,
            reading.ts - received_at,
            cfg.future_tolerance_ms
        ),
        _ => format!(
            "window ending {end} was final {} ms before the reading was received (allowed lateness {} ms)",
            received_at - end - cfg.allowed_lateness_ms,
            cfg.allowed_lateness_ms
        ),
    };
    Some(Rejection::new(reason, detail))
}

impl Plan<'_> {
    /// A reading whose window is final by the watermark is refused: a
    /// compacted window must never change. Only a record that reached the
    /// stream further out of arrival order than the watermark's slack can
    /// meet this; one that did not is already too late by its own
    /// `received_at`, so a replay decides the same.
    pub(super) fn refuse_final(&mut self, watermark: i64, cfg: &AggregateConfig) {
        let finest = cfg.finest();
        for record in &mut self.records {
            let Body::Readings {
                record: r,
                verdicts,
                ..
            } = &mut record.body
            else {
                continue;
            };
            for (reading, verdict) in r.readings.iter().zip(verdicts.iter_mut()) {
                let end = finest.window_start(reading.ts) + finest.ms();
                if verdict.is_none() && cfg.is_final(end, watermark) {
                    *verdict = Some(Rejection::new(
                        RejectReason::TooLate,
                        format!(
                            "window ending {end} was already final: every record that arrived up to {watermark} had been applied (allowed lateness {} ms)",
                            cfg.allowed_lateness_ms
                        ),
                    ));
                }
            }
        }
    }
}
