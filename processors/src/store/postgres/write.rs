//! A commit phase's conditional writes as a few batched statements.
//!
//! Fleets commit thousands of items per batch, so writes are not sent one
//! statement each: a phase is at most two statements, one `UPDATE` for the
//! writes conditional on a version and one `INSERT` for the rest, each
//! taking its rows as arrays. Each returns the keys it changed; a key of a
//! `Version` or `Absent` write missing from them is a failed condition.
//!
//! Within one statement the rows apply in no particular order, and the
//! same key twice would be seen once; so a phase that writes a key twice
//! (which the core does not do, but the contract allows) is split into
//! runs without repeats, applied one after the other.
//!
//! Each row also carries its `windows` column (`super::windows`): one more
//! array per statement, so windows readable by SQL cost no round trip and
//! no row of their own.

use std::collections::HashSet;

use rollup::keys::ItemKey;
use rollup::{Condition, Write};
use schemas::Resolution;
use tokio_postgres::Transaction;

use super::{Statements, db, windows};
use crate::store::StoreError;

/// Applies `writes` in `tx`; on a failed condition returns
/// [`StoreError::Conflict`], and the caller drops (rolls back) `tx`.
/// `finest` is the resolution of the windows in span items.
pub(super) async fn apply(
    tx: &Transaction<'_>,
    statements: &Statements,
    writes: &[Write],
    finest: Resolution,
) -> Result<(), StoreError> {
    for run in runs(writes) {
        let rows = Rows::of(run, finest);
        if !rows.update.is_empty() {
            let c = &rows.update;
            let changed = tx
                .query(
                    &statements.update,
                    &[
                        &c.pks,
                        &c.sks,
                        &c.states,
                        &c.expires,
                        &c.versions,
                        &c.windows,
                    ],
                )
                .await
                .map_err(|e| db("updating items", e))?;
            check(c, &changed, |_| true)?;
        }
        if !rows.insert.is_empty() {
            let c = &rows.insert;
            let inserted = tx
                .query(
                    &statements.insert,
                    &[&c.pks, &c.sks, &c.states, &c.expires, &c.windows],
                )
                .await
                .map_err(|e| db("inserting items", e))?;
            // An `InsertOnce` write that found its item keeps the first.
            check(c, &inserted, |i| c.conditions[i] == Condition::Absent)?;
        }
    }
    Ok(())
}

/// Fails with the first row that had to change, per `must_change`, and is
/// not among the keys the statement returned.
fn check(
    columns: &Columns,
    changed: &[tokio_postgres::Row],
    must_change: impl Fn(usize) -> bool,
) -> Result<(), StoreError> {
    let mut keys = HashSet::with_capacity(changed.len());
    for row in changed {
        let pk: &str = row.try_get(0).map_err(|e| db("reading a row", e))?;
        let sk: &str = row.try_get(1).map_err(|e| db("reading a row", e))?;
        keys.insert((pk, sk));
    }
    match first_unchanged(columns, &keys, must_change) {
        Some(i) => Err(StoreError::Conflict(format!(
            "{}/{}",
            columns.pks[i], columns.sks[i]
        ))),
        None => Ok(()),
    }
}

/// The index of the first row that had to change and is not in `changed`.
fn first_unchanged(
    columns: &Columns,
    changed: &HashSet<(&str, &str)>,
    must_change: impl Fn(usize) -> bool,
) -> Option<usize> {
    (0..columns.len()).find(|&i| {
        must_change(i) && !changed.contains(&(columns.pks[i].as_str(), columns.sks[i].as_str()))
    })
}

/// `writes` cut into consecutive runs in which no key repeats.
fn runs(writes: &[Write]) -> Vec<&[Write]> {
    let mut out = Vec::new();
    let mut seen: HashSet<&ItemKey> = HashSet::new();
    let mut start = 0;
    for (i, w) in writes.iter().enumerate() {
        if !seen.insert(&w.key) {
            out.push(&writes[start..i]);
            start = i;
            seen.clear();
            seen.insert(&w.key);
        }
    }
    if start < writes.len() {
        out.push(&writes[start..]);
    }
    out
}

/// The array parameters of one statement, a row per write.
#[derive(Debug, Default)]
struct Columns {
    pks: Vec<String>,
    sks: Vec<String>,
    states: Vec<Vec<u8>>,
    expires: Vec<Option<i64>>,
    /// The version each `UPDATE` row must still find.
    versions: Vec<i64>,
    /// JSON, cast to `jsonb` by the statement; NULL for items that hold no
    /// window.
    windows: Vec<Option<String>>,
    conditions: Vec<Condition>,
}

impl Columns {
    fn push(&mut self, w: &Write, finest: Resolution) {
        self.pks.push(w.key.pk());
        self.sks.push(w.key.sk());
        self.states.push(w.item.encode());
        self.expires.push(w.expires_at);
        self.windows.push(windows::column(&w.key, &w.item, finest));
        if let Condition::Version(v) = w.condition {
            self.versions.push(v as i64);
        }
        self.conditions.push(w.condition);
    }

    fn len(&self) -> usize {
        self.pks.len()
    }

    fn is_empty(&self) -> bool {
        self.pks.is_empty()
    }
}

/// A run's writes, by the statement that applies them.
struct Rows {
    update: Columns,
    insert: Columns,
}

impl Rows {
    fn of(run: &[Write], finest: Resolution) -> Rows {
        let mut rows = Rows {
            update: Columns::default(),
            insert: Columns::default(),
        };
        for w in run {
            match w.condition {
                Condition::Version(_) => rows.update.push(w, finest),
                Condition::Absent | Condition::InsertOnce => rows.insert.push(w, finest),
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use schemas::state::{Item, ItemState};

    use super::*;

    fn write(name: &str, condition: Condition) -> Write {
        Write {
            key: ItemKey::Counter {
                shard: "s".into(),
                name: name.into(),
            },
            condition,
            item: Item {
                applied: Default::default(),
                state: ItemState::Counter(1),
            },
            expires_at: None,
        }
    }

    #[test]
    fn a_repeated_key_starts_a_new_run_and_order_is_kept() {
        let writes = [
            write("a", Condition::Absent),
            write("b", Condition::Absent),
            write("a", Condition::Version(1)),
            write("c", Condition::Absent),
            write("b", Condition::Version(1)),
        ];
        // a b | a c b: the second `a` starts a run, the second `b` is new
        // to it.
        let lens: Vec<usize> = runs(&writes).iter().map(|r| r.len()).collect();
        assert_eq!(lens, [2, 3]);
        assert!(runs(&[]).is_empty());
    }

    #[test]
    fn only_a_conditional_write_that_changed_nothing_is_a_conflict() {
        let writes = [
            write("a", Condition::InsertOnce),
            write("b", Condition::Absent),
            write("c", Condition::Absent),
        ];
        let rows = Rows::of(&writes, Resolution::DEFAULTS[0]);
        assert!(rows.update.is_empty());
        let c = &rows.insert;
        let absent_only = |i: usize| c.conditions[i] == Condition::Absent;
        // The write-once item existed already: not a conflict.
        let changed: HashSet<(&str, &str)> = [("c", "s|b"), ("c", "s|c")].into();
        assert_eq!(first_unchanged(c, &changed, absent_only), None);
        // An absent item that was there: the first such is named.
        let changed: HashSet<(&str, &str)> = [("c", "s|a")].into();
        assert_eq!(first_unchanged(c, &changed, absent_only), Some(1));
    }

    #[test]
    fn version_writes_carry_their_versions() {
        let writes = [
            write("a", Condition::Version(7)),
            write("b", Condition::Absent),
            write("c", Condition::Version(9)),
        ];
        let rows = Rows::of(&writes, Resolution::DEFAULTS[0]);
        assert_eq!(rows.update.versions, [7, 9]);
        assert_eq!(rows.update.len(), rows.update.versions.len());
        assert_eq!(rows.insert.len(), 1);
        // Counters hold no window: one NULL per row.
        assert_eq!(rows.update.windows, [None, None]);
    }
}
