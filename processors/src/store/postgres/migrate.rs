//! The store's layout as numbered SQL steps, applied when it opens.
//!
//! `schema_migrations` holds the number of every step applied. Each missing
//! step runs in a transaction of its own together with the row that records
//! it, so a step is applied once and whole: a crash halfway leaves it
//! unapplied, and the next open runs it again. Every transaction first takes
//! one advisory lock, so that processes opening the same database at once
//! apply each step once between them.
//!
//! A database holding a step this build does not know was written by a
//! newer iotpipe, and is refused: this build cannot know what that step
//! changed.
//!
//! Steps are only ever appended; a released step is never edited.

use tokio_postgres::Client;

use super::db;
use crate::store::StoreError;

/// The migrations, in order: (version, SQL). Versions count up from 1.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        // Keys sort by bytes ("C"), as in SQLite and DynamoDB, whatever the
        // database's locale: ranges and prefix scans depend on that order.
        "CREATE TABLE items (
             pk TEXT COLLATE \"C\" NOT NULL,
             sk TEXT COLLATE \"C\" NOT NULL,
             version BIGINT NOT NULL,
             expires_at BIGINT,
             state BYTEA NOT NULL,
             PRIMARY KEY (pk, sk)
         );
         CREATE INDEX items_expiry ON items (expires_at) WHERE expires_at IS NOT NULL;",
    ),
    (2, READABLE_WINDOWS),
];

/// Windows readable by SQL (`super::windows`): the JSON column the writer
/// fills for window items, and views that unnest it. A nullable column
/// without a default is added without rewriting the table, and rows written
/// before stay NULL: their state is postcard, which only Rust decodes, so
/// they are not backfilled and are absent from the views until rewritten.
///
/// The views show what the table holds, so an item past its expiry stays
/// until the minutely purge deletes it: a filter on the time would make
/// every read depend on the server's clock. They keep `pk` so that a query
/// filtering on it (`pk = 's|' || device`) reads one device's rows through
/// the primary key; `device` and `fleet` are for reading, not filtering. A
/// fleet window is the merge of its per-shard parts, done as the API does:
/// sums add, extremes compare.
const READABLE_WINDOWS: &str = "
    ALTER TABLE items ADD COLUMN windows JSONB;
    CREATE VIEW device_windows AS
    SELECT t.pk, t.sk,
           split_part(t.pk, '|', CASE WHEN t.pk LIKE 's|%' THEN 2 ELSE 3 END) AS device,
           w.metric, w.res AS res_ms, w.start AS start_ms,
           timestamptz 'epoch' + w.start * interval '1 millisecond' AS time,
           w.count, w.sum, w.min, w.max, w.avg, w.late_count, w.revision
    FROM items t,
         jsonb_to_recordset(t.windows) AS w(metric text, start int8, res int8, count int8,
             sum float8, min float8, max float8, avg float8, late_count int8, revision int8)
    WHERE t.pk LIKE 's|%' OR t.pk LIKE 'w|d|%';
    CREATE VIEW fleet_windows AS
    SELECT t.pk, split_part(t.pk, '|', 3) AS fleet,
           w.metric, w.res AS res_ms, w.start AS start_ms,
           timestamptz 'epoch' + w.start * interval '1 millisecond' AS time,
           sum(w.count)::int8 AS count, sum(w.sum) AS sum, min(w.min) AS min, max(w.max) AS max,
           sum(w.sum) / nullif(sum(w.count), 0)::float8 AS avg,
           sum(w.late_count)::int8 AS late_count, sum(w.revision)::int8 AS revision,
           count(*) AS parts
    FROM items t,
         jsonb_to_recordset(t.windows) AS w(metric text, start int8, res int8, count int8,
             sum float8, min float8, max float8, late_count int8, revision int8)
    WHERE t.pk LIKE 'w|f|%'
    GROUP BY t.pk, w.metric, w.res, w.start;";

/// The layout this build reads and writes: its last migration.
pub const SCHEMA_VERSION: i32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Any number, the same in every iotpipe process: the advisory lock that
/// serialises migrations.
const LOCK_KEY: i64 = 0x0069_6f74_7069_7065; // "iotpipe" in ASCII

/// Applies every migration up to `target` that the database lacks, each in
/// its own transaction.
pub(super) async fn migrate(client: &mut Client, target: i32) -> Result<(), StoreError> {
    loop {
        let tx = client.transaction().await.map_err(|e| db("migrating", e))?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&LOCK_KEY])
            .await
            .map_err(|e| db("migrating: taking the lock", e))?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version INTEGER PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(|e| db("migrating: creating schema_migrations", e))?;
        let applied: Vec<i32> = tx
            .query(
                "SELECT version FROM schema_migrations ORDER BY version",
                &[],
            )
            .await
            .map_err(|e| db("migrating: reading schema_migrations", e))?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(|e| db("migrating: reading schema_migrations", e))?;
        let Some((version, sql)) = next_step(&applied, target)? else {
            return tx.commit().await.map_err(|e| db("migrating", e));
        };
        tx.batch_execute(sql)
            .await
            .map_err(|e| db(&format!("migration {version}"), e))?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[&version],
        )
        .await
        .map_err(|e| db(&format!("recording migration {version}"), e))?;
        tx.commit()
            .await
            .map_err(|e| db(&format!("migration {version}"), e))?;
        tracing::info!(version, "PostgreSQL rollup store migrated.");
    }
}

/// The first step up to `target` not in `applied`, or an error if
/// `applied` holds one this build does not know.
fn next_step(applied: &[i32], target: i32) -> Result<Option<(i32, &'static str)>, StoreError> {
    if let Some(unknown) = applied
        .iter()
        .find(|v| !MIGRATIONS.iter().any(|(known, _)| known == *v))
    {
        return Err(StoreError::Corrupt {
            key: "schema_migrations".into(),
            detail: format!(
                "the database has migration {unknown}, which this build does not know (it knows 1 to \
                 {SCHEMA_VERSION}): it was written by a newer iotpipe; run that version, or use \
                 another database"
            ),
        });
    }
    Ok(MIGRATIONS
        .iter()
        .find(|(v, _)| *v <= target && !applied.contains(v))
        .map(|&(v, sql)| (v, sql)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_count_up_from_one() {
        for (i, (version, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
        }
    }

    #[test]
    fn the_next_step_is_the_first_missing_and_an_unknown_one_is_refused() {
        assert_eq!(
            next_step(&[], SCHEMA_VERSION).unwrap().map(|s| s.0),
            Some(1)
        );
        let all: Vec<i32> = (1..=SCHEMA_VERSION).collect();
        assert_eq!(next_step(&all, SCHEMA_VERSION).unwrap(), None);
        assert_eq!(
            next_step(&[1], SCHEMA_VERSION).unwrap().map(|s| s.0),
            Some(2)
        );
        assert_eq!(next_step(&[1], 1).unwrap(), None, "no step past the target");
        let err = next_step(&[1, SCHEMA_VERSION + 1], SCHEMA_VERSION).unwrap_err();
        assert!(err.to_string().contains("newer iotpipe"), "{err}");
        assert!(!err.is_retryable());
    }
}
