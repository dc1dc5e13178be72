//! Lateness judgement: a reading is refused by its own `received_at` when
//! planned, and by the shard's processed watermark once that is loaded.

use schemas::record::ReadingView;
use schemas::{RejectReason, Rejection};

use super::plan::{Body, Plan};
use crate::config::AggregateConfig;

/// Lateness is judged against `received_at`, stamped once at ingest, so a
/// replayed batch decides exactly as the first attempt did.
pub(super) fn judge(
    reading: &ReadingView,
    received_at: i64,
    config: &AggregateConfig,
) -> Option<Rejection> {
    let finest = config.finest();
    let end = finest.window_start(reading.ts) + finest.ms();
    let reason = config.lateness().refusal(reading.ts, end, received_at)?;
    let detail = match reason {
        RejectReason::InFuture => format!(
            "ts {} is {} ms after the reading was received (limit {} ms)",
            reading.ts,
            reading.ts - received_at,
            config.future_tolerance_ms
        ),
        _ => format!(
            "window ending {end} was final {} ms before the reading was received (allowed lateness {} ms)",
            received_at - end - config.allowed_lateness_ms,
            config.allowed_lateness_ms
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
    pub(super) fn refuse_final(&mut self, watermark: i64, config: &AggregateConfig) {
        let finest = config.finest();
        for record in &mut self.records {
            let Body::Readings {
                record: r,
                refusals,
                ..
            } = &mut record.body
            else {
                continue;
            };
            for (reading, refusal) in r.readings.iter().zip(refusals.iter_mut()) {
                let end = finest.window_start(reading.ts) + finest.ms();
                if refusal.is_none() && config.is_final(end, watermark) {
                    *refusal = Some(Rejection::new(
                        RejectReason::TooLate,
                        format!(
                            "window ending {end} was already final: every record that arrived up to {watermark} had been applied (allowed lateness {} ms)",
                            config.allowed_lateness_ms
                        ),
                    ));
                }
            }
        }
    }
}
