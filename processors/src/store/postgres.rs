//! The PostgreSQL rollup store: the logical table as one SQL table `items`,
//! keyed (pk, sk) like the SQLite and DynamoDB stores.
//!
//! - `pk` and `sk` are `text COLLATE "C"`, so that ranges and prefix scans
//!   order by bytes as the other stores do, whatever the database's locale.
//! - `version` (1 on insert, +1 per write), `expires_at` (ms since the
//!   epoch, or NULL) and `state` ([`Item::encode`]) as in SQLite.
//! - `load` reads every key in one statement (`unnest` of the keys, joined
//!   to the table); `commit` runs one transaction: each kind of conditional
//!   write of `writes`, then of `then`, as one `UPDATE … FROM unnest(…)` or
//!   `INSERT … SELECT FROM unnest(…) ON CONFLICT DO NOTHING` whose returned
//!   rows say which conditions held. A failed condition rolls the whole
//!   commit back and is [`StoreError::Conflict`], so a commit lands whole or
//!   not at all, as in SQLite.
//! - The layout is created and changed by numbered migrations (`migrate`),
//!   applied when the store opens.
//! - Window items (spans, compacted device windows, fleet parts) also carry
//!   their figures as JSON in a `windows` column, written by the same
//!   statements, which views unnest for SQL readers such as Grafana
//!   (`windows`).
//!
//! A few connections, no pool crate: [`WRITERS`] connections for commits,
//! each holding one commit at a time behind a mutex, so the processors'
//! shards (which write disjoint items) overlap their round trips; one for
//! the processors' `load`, and one for the queries, so that a busy API
//! cannot delay a batch. tokio-postgres pipelines concurrent statements on
//! each of the last two. The minutely purge and dead-letter trim open one
//! more for the call. A connection that dies is opened again by the next
//! call that needs it; that call's error has already reported the failure
//! as [`StoreError::Unavailable`], which the shard loop retries.
//!
//! Statements are planned per execution (`plan_cache_mode =
//! force_custom_plan`, see `connect`).
//!
//! No TLS: connect over a unix socket or a trusted network. A URL that asks
//! for TLS (`sslmode=require`) fails to connect and says so.

mod migrate;
mod windows;
mod write;

use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use schemas::Resolution;
use schemas::state::Item;
use tokio::sync::Mutex;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls, Statement};

use rollup::keys::ItemKey;
use rollup::{Commit, LoadedItem};

use super::{KeyedItem, Range, RollupQuery, RollupStore, Scan, StoreError};

pub use migrate::SCHEMA_VERSION;

/// How long a connection attempt may take when the URL does not say
/// (`connect_timeout`): an unreachable server is then an error, not a hang.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{what}: {e}"))
}

/// A client error with its causes: tokio-postgres's own message is only
/// the kind ("db error"), and the server's words are in its source.
fn db(what: &str, e: tokio_postgres::Error) -> StoreError {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(cause) = source {
        message = format!("{message}: {cause}");
        source = cause.source();
    }
    unavailable(what, message)
}

/// Parses a libpq connection string, as a URL
/// (`postgresql://user:password@host:port/database`) or as `key=value`
/// pairs (`host=/run/postgresql dbname=iotpipe`). The error never repeats
/// the string, which may hold a password.
pub fn parse_url(url: &str) -> Result<Config, String> {
    let mut config =
        Config::from_str(url).map_err(|e| format!("not a PostgreSQL connection string: {e}"))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    Ok(config)
}

/// Where `config` connects, for messages: hosts, ports and database, never
/// the password.
pub fn describe(config: &Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
    format!(
        "host {}, port {}, database {}",
        if hosts.is_empty() {
            "(default)".to_string()
        } else {
            hosts.join(",")
        },
        if ports.is_empty() {
            "5432".to_string()
        } else {
            ports.join(",")
        },
        config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("(default)")
    )
}

/// Loads a batch's items: the keys come as two arrays, and each row found
/// carries its key's place in them.
const LOAD: &str = "SELECT w.i, t.version, t.state
     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS w(pk, sk, i)
     JOIN items t ON t.pk = w.pk AND t.sk = w.sk";

/// The statements every connection prepares once, when it opens.
struct Statements {
    load: Statement,
    get: Statement,
    range_asc: Statement,
    range_desc: Statement,
    scan: Statement,
    /// `Condition::Version` writes: returns the keys it updated.
    update: Statement,
    /// `Condition::Absent` and `InsertOnce` writes: returns the keys it
    /// inserted.
    insert: Statement,
}

/// One open connection and its prepared statements.
struct Conn {
    client: Client,
    statements: Statements,
}

/// Opens a connection to the server `config` names.
async fn connect(config: &Config) -> Result<Client, StoreError> {
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| db(&format!("cannot connect to {}", describe(config)), e))?;
    // The connection does the socket I/O; it ends when the client is
    // dropped or the server goes away, and the client then reports itself
    // closed.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "The PostgreSQL connection closed.");
        }
    });
    // Every statement here is a key lookup joined to arrays of keys. After
    // five executions PostgreSQL caches a generic plan, costed against the
    // table as it was then: on a new database, empty, so a hash join over a
    // sequential scan, kept as the table grows to millions of rows (until
    // an ANALYZE happens to replan it), and each batch then reads the whole
    // table. A custom plan per execution sees the table's current size and
    // the arrays' lengths, and costs a fraction of a millisecond to make.
    client
        .batch_execute("SET plan_cache_mode = force_custom_plan")
        .await
        .map_err(|e| db("setting plan_cache_mode", e))?;
    Ok(client)
}

impl Conn {
    async fn open(config: &Config) -> Result<Conn, StoreError> {
        let client = connect(config).await?;
        let statements = Statements::prepare(&client).await?;
        Ok(Conn { client, statements })
    }
}

impl Statements {
    async fn prepare(client: &Client) -> Result<Statements, StoreError> {
        let prepare = |sql: &'static str| async move {
            client
                .prepare(sql)
                .await
                .map_err(|e| db("preparing a statement", e))
        };
        Ok(Statements {
            load: prepare(LOAD).await?,
            get: prepare("SELECT state FROM items WHERE pk = $1 AND sk = $2").await?,
            range_asc: prepare(
                "SELECT sk, state FROM items WHERE pk = $1 AND sk >= $2 AND sk < $3
                 ORDER BY sk ASC LIMIT $4",
            )
            .await?,
            range_desc: prepare(
                "SELECT sk, state FROM items WHERE pk = $1 AND sk >= $2 AND sk < $3
                 ORDER BY sk DESC LIMIT $4",
            )
            .await?,
            scan: prepare(
                "SELECT pk, sk, state FROM items
                 WHERE pk >= $1 AND pk < $2 AND (pk, sk) > ($3, $4)
                 ORDER BY pk, sk LIMIT $5",
            )
            .await?,
            update: prepare(
                "UPDATE items AS t
                 SET version = t.version + 1, state = w.state, expires_at = w.expires_at,
                     windows = w.windows::jsonb
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int8[], $5::int8[],
                             $6::text[])
                     AS w(pk, sk, state, expires_at, version, windows)
                 WHERE t.pk = w.pk AND t.sk = w.sk AND t.version = w.version
                 RETURNING t.pk, t.sk",
            )
            .await?,
            insert: prepare(
                "INSERT INTO items (pk, sk, version, state, expires_at, windows)
                 SELECT w.pk, w.sk, 1, w.state, w.expires_at, w.windows::jsonb
                 FROM unnest($1::text[], $2::text[], $3::bytea[], $4::int8[], $5::text[])
                     AS w(pk, sk, state, expires_at, windows)
                 ON CONFLICT (pk, sk) DO NOTHING
                 RETURNING pk, sk",
            )
            .await?,
        })
    }
}

/// Connections commits run on. Each commit holds one for its whole
/// transaction; shards write disjoint items, so their commits can overlap
/// their round trips on separate connections (a conflict, as with the
/// sweep, waits on PostgreSQL's row lock and then fails its condition).
const WRITERS: usize = 4;

pub struct PostgresStore {
    config: Config,
    /// `None` until opened (the first at open), or again after one died.
    writers: Vec<Mutex<Option<Conn>>>,
    /// Where the next commit starts looking for a free writer.
    next_writer: AtomicUsize,
    /// The connection the processors' loads run on; tokio-postgres
    /// pipelines concurrent statements on it.
    loader: Mutex<Option<Arc<Conn>>>,
    /// The connection queries run on, so that a busy dashboard or API
    /// cannot queue in front of a batch's load.
    reader: Mutex<Option<Arc<Conn>>>,
    /// The finest stored resolution: the length of a span item's windows,
    /// which the item does not say, for the `windows` column.
    finest: Resolution,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("server", &describe(&self.config))
            .finish()
    }
}

fn decode(pk: &str, sk: &str, bytes: &[u8]) -> Result<Item, StoreError> {
    Item::decode(bytes).map_err(|detail| StoreError::Corrupt {
        key: format!("{pk}/{sk}"),
        detail,
    })
}

impl PostgresStore {
    /// Connects to the database `url` names and brings its layout to
    /// [`SCHEMA_VERSION`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let config = parse_url(url).map_err(|e| unavailable("backend.postgres_url", e))?;
        Self::open(config).await
    }

    /// Sets the finest stored resolution (`AggregateConfig::finest`; 1 min
    /// unless set), which the `windows` column gives as span windows'
    /// length.
    pub fn with_finest(mut self, finest: Resolution) -> Self {
        self.finest = finest;
        self
    }

    /// [`PostgresStore::connect`] with a parsed configuration.
    pub async fn open(config: Config) -> Result<Self, StoreError> {
        let mut client = connect(&config).await?;
        // Before anything is prepared: a new database has no table yet.
        migrate::migrate(&mut client, SCHEMA_VERSION).await?;
        let statements = Statements::prepare(&client).await?;
        let mut writers: Vec<Mutex<Option<Conn>>> =
            (0..WRITERS).map(|_| Mutex::new(None)).collect();
        writers[0] = Mutex::new(Some(Conn { client, statements }));
        Ok(PostgresStore {
            config,
            writers,
            next_writer: AtomicUsize::new(0),
            loader: Mutex::new(None),
            reader: Mutex::new(None),
            finest: rollup::AggregateConfig::default().finest(),
        })
    }

    /// The connection in `slot`, opened again if it died.
    async fn shared(&self, slot: &Mutex<Option<Arc<Conn>>>) -> Result<Arc<Conn>, StoreError> {
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref().filter(|c| !c.client.is_closed()) {
            return Ok(conn.clone());
        }
        let conn = Arc::new(Conn::open(&self.config).await?);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn reader(&self) -> Result<Arc<Conn>, StoreError> {
        self.shared(&self.reader).await
    }

    /// Locks a write connection, a free one if there is one, opening it
    /// (again) if it is not open.
    async fn writer(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Conn>>, StoreError> {
        let start = self.next_writer.fetch_add(1, Ordering::Relaxed);
        let n = self.writers.len();
        let free = (0..n).find_map(|i| self.writers[(start + i) % n].try_lock().ok());
        let mut slot = match free {
            Some(slot) => slot,
            None => self.writers[start % n].lock().await,
        };
        if slot.as_ref().is_none_or(|c| c.client.is_closed()) {
            *slot = Some(Conn::open(&self.config).await?);
        }
        Ok(slot)
    }

    /// Deletes items whose retention ended before `now_ms`; returns how many.
    ///
    /// On a connection of its own, opened for the call: a long delete on
    /// the reader would hold up every load and query pipelined behind it,
    /// and on the writer every commit. It runs once a minute.
    pub async fn purge_expired(&self, now_ms: i64) -> Result<usize, StoreError> {
        let client = connect(&self.config).await?;
        let deleted = client
            .execute(
                "DELETE FROM items WHERE expires_at IS NOT NULL AND expires_at < $1",
                &[&now_ms],
            )
            .await
            .map_err(|e| db("purging expired items", e))?;
        Ok(deleted as usize)
    }

    /// Keeps at most `keep` dead letters per reason, the newest; returns how
    /// many were deleted.
    pub async fn trim_dead_letters(&self, keep: usize) -> Result<usize, StoreError> {
        // A connection of its own, as for `purge_expired`.
        let client = connect(&self.config).await?;
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let mut deleted = 0;
        for reason in schemas::RejectReason::ALL {
            let pk = rollup::keys::dead_letter_pk(reason);
            // Nothing past `keep`: the cutoff is NULL and nothing matches.
            deleted += client
                .execute(
                    "DELETE FROM items WHERE pk = $1 AND sk <= (
                         SELECT sk FROM items WHERE pk = $1 ORDER BY sk DESC LIMIT 1 OFFSET $2
                     )",
                    &[&pk, &keep],
                )
                .await
                .map_err(|e| db("trimming dead letters", e))?;
        }
        Ok(deleted as usize)
    }
}

/// Brings the database `config` names to layout `version` and no further:
/// a database as an older build left it, for a test of the migration after
/// it.
pub async fn migrate_to(config: &Config, version: i32) -> Result<(), StoreError> {
    let mut client = connect(config).await?;
    migrate::migrate(&mut client, version).await
}

/// A range bound as PostgreSQL can take it: `text` holds no NUL, yet callers
/// ask for "just after `k`" as `k` + NUL (the least string above `k`). No
/// stored key holds a NUL, so for every stored `s`, `s >= p + NUL + rest`
/// exactly when `s > p`, which is when `s >= p + U+0001` (the least NUL-free
/// string above `p`); the same holds with `<`. So the bound is cut at its
/// first NUL and U+0001 put in its place.
fn nul_free_bound(bound: &str) -> String {
    match bound.find('\0') {
        None => bound.to_string(),
        Some(i) => format!("{}\u{1}", &bound[..i]),
    }
}

/// A row's `state` column, decoded.
fn state_of(
    row: &tokio_postgres::Row,
    column: usize,
    pk: &str,
    sk: &str,
) -> Result<Item, StoreError> {
    let bytes: &[u8] = row.try_get(column).map_err(|e| db("reading a row", e))?;
    decode(pk, sk, bytes)
}

#[async_trait]
impl RollupStore for PostgresStore {
    async fn load(&self, keys: &[ItemKey]) -> Result<Vec<Option<LoadedItem>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let (pks, sks): (Vec<String>, Vec<String>) = keys.iter().map(|k| (k.pk(), k.sk())).unzip();
        let conn = self.shared(&self.loader).await?;
        let rows = conn
            .client
            .query(&conn.statements.load, &[&pks, &sks])
            .await
            .map_err(|e| db("loading items", e))?;
        let mut out: Vec<Option<LoadedItem>> = vec![None; keys.len()];
        for row in rows {
            let i: i64 = row.try_get(0).map_err(|e| db("reading a row", e))?;
            let version: i64 = row.try_get(1).map_err(|e| db("reading a row", e))?;
            // WITH ORDINALITY counts from 1.
            let i = usize::try_from(i - 1)
                .ok()
                .filter(|i| *i < keys.len())
                .ok_or_else(|| unavailable("loading items", format!("row {i} out of range")))?;
            out[i] = Some(LoadedItem {
                version: version as u64,
                item: state_of(&row, 2, &pks[i], &sks[i])?,
            });
        }
        Ok(out)
    }

    async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
        if commit.is_empty() {
            return Ok(());
        }
        let mut slot = self.writer().await?;
        let Some(Conn { client, statements }) = slot.as_mut() else {
            return Err(unavailable("commit", "no connection"));
        };
        let tx = client
            .transaction()
            .await
            .map_err(|e| db("starting a transaction", e))?;
        // `then` after `writes`, as the contract orders them; in one
        // transaction the order only matters where both touch one item.
        for phase in [&commit.writes, &commit.then] {
            // Dropping the transaction on an error rolls every write back.
            write::apply(&tx, statements, phase, self.finest).await?;
        }
        tx.commit()
            .await
            .map_err(|e| db("committing a transaction", e))
    }
}

#[async_trait]
impl RollupQuery for PostgresStore {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        let conn = self.reader().await?;
        let row = conn
            .client
            .query_opt(&conn.statements.get, &[&pk, &sk])
            .await
            .map_err(|e| db("reading an item", e))?;
        row.map(|row| state_of(&row, 0, pk, sk)).transpose()
    }

    async fn range(&self, range: Range) -> Result<Vec<(String, Item)>, StoreError> {
        let conn = self.reader().await?;
        let statement = if range.descending {
            &conn.statements.range_desc
        } else {
            &conn.statements.range_asc
        };
        let limit = i64::try_from(range.limit).unwrap_or(i64::MAX);
        let (from, to) = (nul_free_bound(&range.from), nul_free_bound(&range.to));
        let rows = conn
            .client
            .query(statement, &[&range.pk, &from, &to, &limit])
            .await
            .map_err(|e| db("reading a range", e))?;
        rows.iter()
            .map(|row| {
                let sk: String = row.try_get(0).map_err(|e| db("reading a row", e))?;
                let item = state_of(row, 1, &range.pk, &sk)?;
                Ok((sk, item))
            })
            .collect()
    }

    async fn scan_prefix(&self, scan: Scan) -> Result<Vec<KeyedItem>, StoreError> {
        let Scan {
            pk_prefix: prefix,
            after,
            limit,
        } = scan;
        // Every key character sorts below '~', so prefix + '~' bounds the prefix.
        let end = format!("{prefix}~");
        let (after_pk, after_sk) = after.unwrap_or_else(|| (prefix.clone(), String::new()));
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let conn = self.reader().await?;
        let rows = conn
            .client
            .query(
                &conn.statements.scan,
                &[&prefix, &end, &after_pk, &after_sk, &limit],
            )
            .await
            .map_err(|e| db("scanning items", e))?;
        rows.iter()
            .map(|row| {
                let pk: String = row.try_get(0).map_err(|e| db("reading a row", e))?;
                let sk: String = row.try_get(1).map_err(|e| db("reading a row", e))?;
                let item = state_of(row, 2, &pk, &sk)?;
                Ok((pk, sk, item))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan a load gets on `client` after six executions against an
    /// empty table, once the table holds 50,000 items.
    async fn load_plan_after_growth(client: &Client) -> String {
        client
            .batch_execute(&format!(
                "CREATE TABLE items (pk TEXT COLLATE \"C\" NOT NULL, sk TEXT COLLATE \"C\" NOT NULL,
                     version BIGINT NOT NULL, state BYTEA NOT NULL, PRIMARY KEY (pk, sk));
                 PREPARE load(text[], text[]) AS {LOAD};"
            ))
            .await
            .expect("create and prepare");
        // Batches of a few hundred keys, as a fleet's are: their custom
        // plans cost more than the generic one, which assumes ten rows.
        let pks: Vec<String> = (0..300).map(|i| format!("s|d{i}")).collect();
        let execute = format!(
            "EXECUTE load('{{{}}}', '{{{}}}')",
            pks.join(","),
            vec!["0"; pks.len()].join(",")
        );
        for _ in 0..6 {
            client
                .batch_execute(&execute)
                .await
                .expect("execute on the empty table");
        }
        client
            .batch_execute(
                "INSERT INTO items SELECT 's|d' || g, '0', 1, '\\x00'
                 FROM generate_series(1, 50000) g",
            )
            .await
            .expect("fill");
        let rows = client
            .query("EXPLAIN EXECUTE load('{s|d7,s|d8}', '{0,0}')", &[])
            .await
            .expect("explain");
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test]
    async fn a_load_looks_its_keys_up_by_index_on_a_table_that_grew_after_it_was_planned() {
        let db = testkit::postgres::database().await.expect("test database");
        // What a plain session does: the generic plan cached on the empty
        // table scans the whole table for every batch.
        let (plain, connection) = db.config().connect(NoTls).await.expect("connect");
        tokio::spawn(connection);
        let cached = load_plan_after_growth(&plain).await;
        assert!(cached.contains("Seq Scan on items"), "{cached}");
        plain
            .batch_execute("DROP TABLE items; DEALLOCATE load")
            .await
            .expect("reset");

        let store_session = connect(&db.config()).await.expect("connect as the store");
        let plan = load_plan_after_growth(&store_session).await;
        assert!(plan.contains("Index Scan using items_pkey"), "{plan}");
        assert!(!plan.contains("Seq Scan"), "{plan}");
    }

    #[test]
    fn a_bound_with_a_nul_keeps_its_place_among_nul_free_keys() {
        assert_eq!(nul_free_bound("abc"), "abc");
        let bound = "d1\0";
        let pg = nul_free_bound(bound);
        assert_eq!(pg, "d1\u{1}");
        for key in ["d", "d1", "d1\u{1}", "d1a", "d10", "d2", ""] {
            assert_eq!(key >= bound, key >= pg.as_str(), "{key:?} >=");
            assert_eq!(key < bound, key < pg.as_str(), "{key:?} <");
        }
        assert_eq!(nul_free_bound("a\0b\0"), "a\u{1}");
    }
}
