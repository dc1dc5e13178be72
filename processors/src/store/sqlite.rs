//! The embedded rollup store: one SQLite table keyed like the DynamoDB design.
//!
//! WAL mode lets the query API read while processors write. Writes go through
//! one connection (SQLite has one writer anyway) with `synchronous=FULL`: in
//! WAL mode that syncs the log at every commit, so a commit (the write-behind
//! cache's flush) is durable when it returns, with one sync; `NORMAL` would
//! sync only at checkpoints, and a power cut could then lose a rollup whose
//! stream records the shard has already checkpointed past.
//!
//! The table's layout has a version, kept in `PRAGMA user_version`, so that a
//! later layout can migrate the items of an earlier one when it opens them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, OptionalExtension, params};
use schemas::state::Item;

use rollup::{Commit, Condition, LoadedItem};

use super::{KeyedItem, Range, RollupQuery, RollupStore, Scan, StoreError};
use rollup::keys::ItemKey;

/// The layout this build writes: items keyed by (pk, sk) in a clustered
/// B-tree, so that a point write or a range of one partition touches only the
/// pages holding it. Version 2 holds a device's readings in span items
/// (stored item version 2); the table is version 1's. Databases from before
/// layouts had versions hold version 1's table at version 0.
const SCHEMA_VERSION: i64 = 2;

/// Page size of a new database. Flushes rewrite rows spread over the whole
/// table, and SQLite writes a changed page whole (to the log, then to the
/// database at the checkpoint), so bigger pages write more bytes per row.
/// Existing databases keep theirs: changing it would need a rewrite.
const PAGE_SIZE: u32 = 4096;

/// The writer's page cache, in KiB. A flush at a fleet's shape touches
/// every device's rows, so the B-tree's interior pages and as many leaves as
/// fit should stay parsed in memory between flushes rather than be read back
/// from the OS.
const WRITER_CACHE_KIB: i64 = 64 * 1024;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS items (
    pk TEXT NOT NULL,
    sk TEXT NOT NULL,
    version INTEGER NOT NULL,
    expires_at INTEGER,
    state BLOB NOT NULL,
    PRIMARY KEY (pk, sk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS items_expiry ON items (expires_at) WHERE expires_at IS NOT NULL;
";

/// Readers kept open for the query API; more are opened on demand.
const IDLE_READERS: usize = 8;

pub struct SqliteStore {
    path: PathBuf,
    writer: Arc<Mutex<Connection>>,
    /// Idle read connections; WAL readers never block the writer.
    readers: Arc<Mutex<Vec<Connection>>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

const RANGE_ASCENDING: &str =
    "SELECT sk, state FROM items WHERE pk = ?1 AND sk >= ?2 AND sk < ?3 ORDER BY sk ASC LIMIT ?4";
const RANGE_DESCENDING: &str =
    "SELECT sk, state FROM items WHERE pk = ?1 AND sk >= ?2 AND sk < ?3 ORDER BY sk DESC LIMIT ?4";

/// Plans a cached statement once, whatever is bound to it later. By default
/// SQLite may plan around a bound value, and then re-prepares (parses and
/// plans again) on the first step after that parameter is bound anew: the
/// `LIMIT ?` of every range query made each query, dashboards and the
/// simulator's freshness probe among them, compile its statement again.
/// Every statement here is a key lookup or a key range, whose plan does not
/// depend on the values.
fn stable_plans(conn: &Connection) -> Result<(), StoreError> {
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map(drop)
        .map_err(unavailable)
}

impl SqliteStore {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        let mut conn = Connection::open(path).map_err(unavailable)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(unavailable)?;
        stable_plans(&conn)?;
        // Only takes effect on a database with no tables yet, and only
        // before it turns to WAL mode.
        conn.pragma_update(None, "page_size", PAGE_SIZE)
            .map_err(unavailable)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unavailable)?;
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
            .map_err(unavailable)?;
        migrate(&mut conn)?;
        Ok(SqliteStore {
            path: path.to_path_buf(),
            writer: Arc::new(Mutex::new(conn)),
            readers: Arc::new(Mutex::new(Vec::new())),
        })
    }

    fn open_reader(path: &Path) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(unavailable)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(unavailable)?;
        stable_plans(&conn)?;
        Ok(conn)
    }

    /// Runs `f` on a read connection on the blocking pool.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let pooled = readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => Self::open_reader(&path)?,
            };
            let out = f(&conn);
            let mut idle = readers.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < IDLE_READERS {
                idle.push(conn);
            }
            out
        })
        .await
        .map_err(unavailable)?
    }

    /// Runs `f` on the write connection on the blocking pool.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut conn)
        })
        .await
        .map_err(unavailable)?
    }

    /// Deletes items whose retention ended before `now_ms`; returns how many.
    pub async fn purge_expired(&self, now_ms: i64) -> Result<usize, StoreError> {
        self.write(move |conn| {
            conn.execute(
                "DELETE FROM items WHERE expires_at IS NOT NULL AND expires_at < ?1",
                params![now_ms],
            )
            .map_err(unavailable)
        })
        .await
    }

    /// Keeps at most `keep` dead letters per reason, the newest; returns how
    /// many were deleted.
    pub async fn trim_dead_letters(&self, keep: usize) -> Result<usize, StoreError> {
        self.write(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            let mut deleted = 0;
            for reason in schemas::RejectReason::ALL {
                let pk = rollup::keys::dead_letter_pk(reason);
                let cutoff: Option<String> = tx
                    .query_row(
                        "SELECT sk FROM items WHERE pk = ?1 ORDER BY sk DESC LIMIT 1 OFFSET ?2",
                        params![pk, keep as i64],
                        |row| row.get(0),
                    )
                    .optional()
                    .map_err(unavailable)?;
                if let Some(cutoff) = cutoff {
                    deleted += tx
                        .execute(
                            "DELETE FROM items WHERE pk = ?1 AND sk <= ?2",
                            params![pk, cutoff],
                        )
                        .map_err(unavailable)?;
                }
            }
            tx.commit().map_err(unavailable)?;
            Ok(deleted)
        })
        .await
    }
}

/// Brings the database to [`SCHEMA_VERSION`] in one transaction: a crash
/// halfway leaves the old layout, which the next open migrates again.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(unavailable)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Corrupt {
            key: "PRAGMA user_version".into(),
            detail: format!(
                "the rollup store has layout {version}; this build reads up to {SCHEMA_VERSION}"
            ),
        });
    }
    // Version 0 (a database from before layouts had versions, or a new one)
    // already is version 1's table, or none: creating what is missing is
    // the whole migration.
    tx.execute_batch(SCHEMA).map_err(unavailable)?;
    // Version 1's items are one per metric, resolution and window; this
    // build cannot read them, and says so rather than answer from half a
    // store. An empty one is simply upgraded.
    let items: i64 = tx
        .query_row(
            "SELECT count(*) FROM (SELECT 1 FROM items LIMIT 1)",
            [],
            |row| row.get(0),
        )
        .map_err(unavailable)?;
    if version < 2 && items > 0 {
        return Err(StoreError::Corrupt {
            key: "PRAGMA user_version".into(),
            detail: format!(
                "the rollup store has layout {version}, whose per-metric items this build does not read; \
                 start with an empty data directory (or another --data-dir) and replay the stream into it"
            ),
        });
    }
    if version < SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(unavailable)?;
    }
    tx.commit().map_err(unavailable)
}

fn decode(pk: &str, sk: &str, bytes: &[u8]) -> Result<Item, StoreError> {
    Item::decode(bytes).map_err(|detail| StoreError::Corrupt {
        key: format!("{pk}/{sk}"),
        detail,
    })
}

#[async_trait]
impl RollupStore for SqliteStore {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        let ids: Vec<(String, String)> = keys.iter().map(|k| (k.pk(), k.sk())).collect();
        self.read(move |conn| {
            // One read transaction for every key: each statement outside one
            // is a transaction of its own, and a WAL reader takes and drops a
            // lock (a system call each way) per transaction. A batch's first
            // readings of a fleet's devices miss the cache by the thousand.
            // It also reads every key from the same snapshot.
            let tx = conn.unchecked_transaction().map_err(unavailable)?;
            let mut stmt = tx
                .prepare_cached("SELECT version, state FROM items WHERE pk = ?1 AND sk = ?2")
                .map_err(unavailable)?;
            let mut out = Vec::with_capacity(ids.len());
            for (pk, sk) in &ids {
                let row: Option<(i64, Vec<u8>)> = stmt
                    .query_row(params![pk, sk], |row| Ok((row.get(0)?, row.get(1)?)))
                    .optional()
                    .map_err(unavailable)?;
                out.push(match row {
                    Some((version, bytes)) => Some(LoadedItem {
                        version: version as u64,
                        item: decode(pk, sk, &bytes)?,
                    }),
                    None => None,
                });
            }
            drop(stmt);
            // Nothing was written: ending it either way lets the snapshot go.
            tx.rollback().map_err(unavailable)?;
            Ok(out)
        })
        .await
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        if commit.is_empty() {
            return Ok(());
        }
        self.write(move |conn| {
            let tx = conn.transaction().map_err(unavailable)?;
            {
                // An item's expiry follows from its key, so it almost never
                // changes: an UPDATE that does not name `expires_at` leaves
                // the expiry index alone (SQLite maintains only the indexes
                // whose columns an UPDATE sets), and costs one B-tree write
                // a row instead of three. Where the expiry did change (the
                // retention was reconfigured), the second statement sets it.
                let mut update = tx
                    .prepare_cached(
                        "UPDATE items SET version = version + 1, state = ?3
                         WHERE pk = ?1 AND sk = ?2 AND version = ?5 AND expires_at IS ?4",
                    )
                    .map_err(unavailable)?;
                let mut update_expiry = tx
                    .prepare_cached(
                        "UPDATE items SET version = version + 1, state = ?3, expires_at = ?4
                         WHERE pk = ?1 AND sk = ?2 AND version = ?5",
                    )
                    .map_err(unavailable)?;
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO items (pk, sk, version, state, expires_at) VALUES (?1, ?2, 1, ?3, ?4)
                         ON CONFLICT DO NOTHING",
                    )
                    .map_err(unavailable)?;
                for w in commit.writes.iter().chain(&commit.then) {
                    let (pk, sk) = (w.key.pk(), w.key.sk());
                    let state = w.item.encode();
                    let changed = match w.condition {
                        Condition::Version(v) => {
                            let p = params![pk, sk, state, w.expires_at, v as i64];
                            match update.execute(p).map_err(unavailable)? {
                                0 => update_expiry.execute(p).map_err(unavailable)?,
                                n => n,
                            }
                        }
                        Condition::Absent | Condition::InsertOnce => insert
                            .execute(params![pk, sk, state, w.expires_at])
                            .map_err(unavailable)?,
                    };
                    if changed == 0 && w.condition != Condition::InsertOnce {
                        // Dropping the transaction rolls every write back.
                        return Err(StoreError::Conflict(format!("{pk}/{sk}")));
                    }
                }
            }
            tx.commit().map_err(unavailable)
        })
        .await
    }
}

#[async_trait]
impl RollupQuery for SqliteStore {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        let (pk, sk) = (pk.to_string(), sk.to_string());
        self.read(move |conn| {
            let bytes: Option<Vec<u8>> = conn
                .prepare_cached("SELECT state FROM items WHERE pk = ?1 AND sk = ?2")
                .and_then(|mut s| s.query_row(params![pk, sk], |row| row.get(0)).optional())
                .map_err(unavailable)?;
            bytes.map(|b| decode(&pk, &sk, &b)).transpose()
        })
        .await
    }

    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError> {
        self.read(move |conn| {
            let sql = if range.descending {
                RANGE_DESCENDING
            } else {
                RANGE_ASCENDING
            };
            let mut stmt = conn.prepare_cached(sql).map_err(unavailable)?;
            let rows = stmt
                .query_map(
                    params![range.pk, range.from, range.to, range.limit as i64],
                    |row| Ok((row.get::<_, String>(0)?, row.get::<_, Vec<u8>>(1)?)),
                )
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for row in rows {
                let (sk, bytes) = row.map_err(unavailable)?;
                let item = decode(&range.pk, &sk, &bytes)?;
                out.push((sk, item));
            }
            Ok(out)
        })
        .await
    }

    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError> {
        let Scan {
            pk_prefix: prefix,
            after,
            limit,
        } = scan;
        self.read(move |conn| {
            // Every key character sorts below '~', so prefix + '~' bounds the prefix.
            let end = format!("{prefix}~");
            let (after_pk, after_sk) = after.unwrap_or_else(|| (prefix.clone(), String::new()));
            let mut stmt = conn
                .prepare_cached(
                    "SELECT pk, sk, state FROM items
                     WHERE pk >= ?1 AND pk < ?2 AND (pk, sk) > (?3, ?4)
                     ORDER BY pk, sk LIMIT ?5",
                )
                .map_err(unavailable)?;
            let rows = stmt
                .query_map(
                    params![prefix, end, after_pk, after_sk, limit as i64],
                    |row| {
                        Ok((
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, Vec<u8>>(2)?,
                        ))
                    },
                )
                .map_err(unavailable)?;
            let mut out = Vec::new();
            for row in rows {
                let (pk, sk, bytes) = row.map_err(unavailable)?;
                let item = decode(&pk, &sk, &bytes)?;
                out.push((pk, sk, item));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::store::test_items::{counter_key, write};
    use crate::store::{Range, RollupQuery};
    use rollup::Write;
    use rusqlite::StatementStatus;

    #[tokio::test]
    async fn range_queries_bound_anew_are_not_compiled_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("rollups.db")).unwrap();
        for (limit, descending) in [(1, false), (5, false), (9, false), (1, true), (5, true)] {
            let range = Range {
                pk: "device#d1".into(),
                from: "a".into(),
                to: "z".into(),
                limit,
                descending,
            };
            store.range(range).await.unwrap();
        }
        // Sequential reads take turns on the same pooled connection, whose
        // statement cache holds what they ran.
        let conn = store.readers.lock().unwrap().pop().unwrap();
        for sql in [RANGE_ASCENDING, RANGE_DESCENDING] {
            let stmt = conn.prepare_cached(sql).unwrap();
            assert_eq!(stmt.get_status(StatementStatus::RePrepare), 0, "{sql}");
            assert!(stmt.get_status(StatementStatus::Run) >= 2, "{sql}");
        }
    }

    /// An update that keeps an item's expiry (the statement that leaves the
    /// expiry index alone) and one that changes it (the statement behind
    /// it) both land, the moved expiry where the purge looks; a stale
    /// version is refused whichever statement it meets.
    #[tokio::test]
    async fn an_update_keeps_or_moves_the_expiry_and_checks_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("rollups.db")).unwrap();
        let key = counter_key;
        let at = |name: &str, condition, n, expires_at| Commit {
            writes: vec![Write {
                expires_at,
                ..write(key(name), condition, n)
            }],
            then: vec![],
        };
        for name in ["kept", "moved"] {
            store
                .commit(at(name, Condition::Absent, 1, Some(100)))
                .await
                .unwrap();
        }
        store
            .commit(at("kept", Condition::Version(1), 2, Some(100)))
            .await
            .unwrap();
        store
            .commit(at("moved", Condition::Version(1), 2, Some(300)))
            .await
            .unwrap();
        for name in ["kept", "moved"] {
            let loaded = store.load(&[key(name)]).await.unwrap();
            assert_eq!(loaded[0].as_ref().map(|l| l.version), Some(2), "{name}");
            for expiry in [Some(100), Some(300), None] {
                let stale = store
                    .commit(at(name, Condition::Version(1), 3, expiry))
                    .await;
                assert!(
                    matches!(stale, Err(StoreError::Conflict(_))),
                    "{name}: {stale:?}"
                );
            }
        }
        assert_eq!(
            store.purge_expired(200).await.unwrap(),
            1,
            "only kept's expiry was due"
        );
        for (name, held) in [("kept", false), ("moved", true)] {
            let item = store.get(&key(name).pk(), &key(name).sk()).await.unwrap();
            assert_eq!(item.is_some(), held, "{name}");
        }
        assert_eq!(store.purge_expired(400).await.unwrap(), 1);
    }

    fn user_version(path: &Path) -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .unwrap()
    }

    /// A database of the per-metric layout (version 0 or 1) with items is
    /// refused with what to do, not read as if it were empty; an empty one
    /// is upgraded, and reopening changes nothing.
    #[tokio::test]
    async fn a_database_of_the_per_metric_layout_is_refused_unless_empty() {
        let dir = tempfile::tempdir().unwrap();
        for (version, with_items) in [(0, true), (1, true), (1, false)] {
            let path = dir
                .path()
                .join(format!("rollups-{version}-{with_items}.db"));
            {
                let old = Connection::open(&path).unwrap();
                old.pragma_update(None, "journal_mode", "WAL").unwrap();
                old.execute_batch(SCHEMA).unwrap();
                old.pragma_update(None, "user_version", version).unwrap();
                if with_items {
                    old.execute(
                        "INSERT INTO items (pk, sk, version, state) VALUES ('w|d|d|t|1m', '0', 1, x'01')",
                        [],
                    )
                    .unwrap();
                }
            }
            match SqliteStore::open(&path) {
                Err(e) if with_items => {
                    assert!(e.to_string().contains("empty data directory"), "{e}");
                    assert_eq!(user_version(&path), version, "left as it was");
                }
                Ok(store) if !with_items => {
                    assert_eq!(user_version(&path), SCHEMA_VERSION);
                    drop(store);
                    SqliteStore::open(&path).unwrap();
                    assert_eq!(user_version(&path), SCHEMA_VERSION);
                }
                Err(e) => panic!("version {version}: {e}"),
                Ok(_) => panic!("version {version} with items opened"),
            }
        }
    }

    #[test]
    fn a_database_from_a_newer_build_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rollups.db");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("layout 3"), "{err}");
    }
}
