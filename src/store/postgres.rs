//! The PostgreSQL store, for several Wardroom nodes sharing one database.
//!
//! Selected by `[store] url = "postgres://…"`; it behaves like the embedded
//! [SQLite store](super::sqlite) (same tables, same answers, acks after
//! commit), so the hub cannot tell them apart.
//!
//! # Threads and connections
//!
//! The trait is synchronous and is called from tokio runtime threads, where
//! the blocking `postgres` client may not run (it drives its connection with
//! a runtime of its own). So, as for SQLite, connections live on dedicated
//! threads and callers talk to them over channels:
//!
//! - **The writer thread** owns one connection. [`Store::write`] sends the
//!   batch with the sender half of its [`Commit`] and returns at once. The
//!   writer blocks for the first batch, drains whatever else is queued (up to
//!   [`MAX_GROUP_WRITES`](super::MAX_GROUP_WRITES) writes), runs the whole group in one transaction
//!   and only after `COMMIT` returns resolves each batch, in queue order
//!   (group commit). Consecutive messages of a group go in as one
//!   `INSERT … SELECT FROM unnest(…)`, so a group of a thousand single-message
//!   batches costs a handful of round trips and one WAL flush. If one batch
//!   fails, the group is rolled back and run again with a savepoint around
//!   every batch, so only that batch gets the error.
//! - **Reader threads** ([`READERS`]) each own a connection and serve the
//!   read methods; the caller blocks until its answer comes back, as it
//!   would on an SQLite read. Reads are short indexed queries; a read issued
//!   after a [`Commit`] resolved sees its writes.
//!
//! # Losing the database
//!
//! When a connection breaks, the writer drops it and connects again; a group
//! that failed before its `COMMIT` was sent (nothing of it is committed) is
//! run again once on the new connection, so a connection killed while idle
//! costs nothing. While the database cannot be reached, every write fails at
//! once with [`StoreError::Unavailable`], reads fail the same way,
//! [`Store::is_healthy`] is `false` (`/readyz` answers 503), and the writer
//! tries again with backoff (at most every [`RECONNECT_MAX`]); an idle writer
//! checks its connection every [`PING_IDLE`], so the health follows the
//! database even without traffic. A group whose `COMMIT` itself was cut off
//! may or may not be committed: its batches get an error saying so (never an
//! ack). Nothing panics.
//!
//! # Several nodes, one database
//!
//! - Message ids are assigned by the caller (the hub, or the cluster's
//!   sequence) and stored as given: the database never renumbers them, and a
//!   duplicate `(room, id)` fails its batch. The per-room high-water mark
//!   (`rooms_seq`) is raised with `GREATEST`, so nodes can write the same
//!   room in any order. Rows of `rooms_seq` are locked in room-name order by
//!   every transaction that touches several.
//! - Mutes, strikes and room settings are upserts; the same ban (same user
//!   or address, actor and creation time) written by two nodes is one row
//!   (`INSERT … ON CONFLICT`), and both get its id.
//! - Ids of bans, review items and audit entries come from a counter row per
//!   table, taken inside the writing transaction: they are gapless like
//!   SQLite's `AUTOINCREMENT` (a rolled-back batch uses none), never reused,
//!   and increase in commit order across nodes. A group locks the counters
//!   it needs first, in name order, and the `rooms_seq` rows last, so two
//!   nodes' groups never wait for each other in a cycle.
//! - Migrations run under an advisory lock, so nodes
//!   starting at once migrate exactly once; retention runs under a
//!   `pg_try_advisory_xact_lock`, one node at a time. Both locks are keyed by
//!   the schema (`current_schema()`), so deployments in different schemas of
//!   one database do not wait for each other.
//!
//! # Schema
//!
//! Tables live in the connection's current schema (set it with the URL's
//! `options=-csearch_path%3D…`). The version is the highest row of
//! `wardroom_schema`; a database with a version newer than
//! [`SCHEMA_VERSION`] is refused with [`StoreError::TooNew`] before anything
//! is written to it. The audit log is append-only: triggers refuse
//! `UPDATE`, `DELETE` and `TRUNCATE`.
//!
//! # Retention
//!
//! As for SQLite: every [`PRUNE_INTERVAL`], between commit groups, messages
//! older than `retain_for` and those beyond the newest `retain_per_room` of
//! each room are deleted, at most [`PRUNE_CHUNK`] per transaction.
//!
//! # Durability
//!
//! With `synchronous = "full"` (the default) commits follow the server's
//! `synchronous_commit` (normally `on`: flushed before `COMMIT` returns).
//! With `"normal"` the writer's session sets `synchronous_commit = off`: a
//! commit survives Wardroom being killed but maybe not a crash of the
//! database server.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ::postgres::config::{Host, SslMode};
use ::postgres::error::SqlState;
use ::postgres::types::ToSql;
use ::postgres::{Client, GenericClient, IsolationLevel, NoTls, Row, Statement, Transaction};
use tokio::sync::oneshot;

use super::queue::{Job, Pending, Queue, gather, unavailable};
use super::{
    AuditEntry, AuditQuery, Ban, Commit, Committed, Mute, ReviewItem, ReviewKind, ReviewStatus, RoomSettings,
    SCHEMA_VERSION, Snapshot, Store, StoreError, StoreStats, StoredMessage, Strikes, Write, Written, stored_time,
};
use crate::config::{StoreConfig, Synchronous};
use crate::lock;
use crate::protocol::now_ms;

/// How often retention runs (between commit groups).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(5);

/// Delay before the first retention pass after opening.
const FIRST_PRUNE: Duration = Duration::from_secs(1);

/// Most message rows deleted by retention in one transaction.
pub const PRUNE_CHUNK: usize = 500;

/// Least message rows deleted by retention in one transaction (while there
/// are that many to delete).
const PRUNE_CHUNK_MIN: usize = 100;

/// Reader threads, each with its own connection.
pub const READERS: usize = 2;

/// An idle writer checks its connection this often.
pub const PING_IDLE: Duration = Duration::from_secs(1);

/// How long that check may take before the connection counts as lost.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// First wait before connecting again after a failed attempt; doubled while
/// attempts keep failing, up to [`RECONNECT_MAX`].
const RECONNECT_MIN: Duration = Duration::from_millis(100);

/// Longest wait between two attempts to connect.
pub const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// Connection timeout when the URL sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// TCP user timeout (unacknowledged data) when the URL sets none: a database
/// that vanished without closing the connection is noticed after this.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(15);

/// `application_name` when the URL sets none.
const APPLICATION_NAME: &str = "wardroom";

/// First key of the advisory locks (the second is the schema's hash):
/// "Wr" for migrations, "Wr" + 1 for retention.
const MIGRATION_LOCK: i32 = 0x5772_0000;
const RETENTION_LOCK: i32 = 0x5772_0001;

/// Schema migrations, oldest first: entry `n` takes the database from
/// version `n` to `n + 1`. A later schema change is one more entry (and a
/// bump of [`SCHEMA_VERSION`]).
pub const MIGRATIONS: &[&str] = &[MIGRATION_1, MIGRATION_2];

// A new SCHEMA_VERSION needs its migration, and the reverse.
const _: () = assert!(MIGRATIONS.len() == SCHEMA_VERSION as usize);

/// Version 2: staff names seen (as in the SQLite store).
const MIGRATION_2: &str = "
CREATE TABLE staff_names (
    look TEXT NOT NULL PRIMARY KEY,
    seen_at BIGINT NOT NULL
);
";

/// Version 1: the tables of the SQLite store, in PostgreSQL's types.
const MIGRATION_1: &str = r#"
CREATE TABLE messages (
    room TEXT NOT NULL,
    id BIGINT NOT NULL,
    user_id TEXT NOT NULL,
    json TEXT NOT NULL,
    ts BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (room, id)
);
CREATE INDEX messages_by_ts ON messages (ts);

-- Per-room high-water mark of message ids (never lowered) and the number
-- of message rows (for retention).
CREATE TABLE rooms_seq (
    room TEXT NOT NULL PRIMARY KEY,
    last_id BIGINT NOT NULL,
    msg_count BIGINT NOT NULL DEFAULT 0
);

-- The last id given to a row of each table that has store-assigned ids:
-- taken inside the writing transaction, so ids are gapless and follow
-- commit order.
CREATE TABLE id_counters (
    name TEXT NOT NULL PRIMARY KEY,
    last BIGINT NOT NULL
);
INSERT INTO id_counters (name, last) VALUES ('bans', 0), ('review_items', 0), ('audit', 0);

CREATE TABLE bans (
    id BIGINT PRIMARY KEY,
    user_id TEXT,
    cidr TEXT,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    lifted_at BIGINT
);
CREATE INDEX bans_by_expiry ON bans (expires_at);
-- The same ban written by two nodes is one row.
CREATE UNIQUE INDEX bans_same ON bans ((coalesce(user_id, '')), (coalesce(cidr, '')), actor, created_at);

CREATE TABLE mutes (
    user_id TEXT NOT NULL PRIMARY KEY,
    until BIGINT NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE strikes (
    user_id TEXT NOT NULL PRIMARY KEY,
    points DOUBLE PRECISION NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE review_items (
    id BIGINT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('held', 'report')),
    room TEXT NOT NULL,
    message_id BIGINT,
    user_id TEXT NOT NULL,
    nick TEXT NOT NULL,
    content TEXT NOT NULL,
    reason TEXT NOT NULL,
    filter TEXT,
    reporter TEXT,
    ts BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied')),
    decided_by TEXT,
    decided_at BIGINT
);
CREATE INDEX review_items_by_status ON review_items (status, id);

CREATE TABLE room_settings (
    room TEXT NOT NULL PRIMARY KEY,
    slow_mode_secs BIGINT NOT NULL,
    locked BOOLEAN NOT NULL
);

CREATE TABLE audit (
    id BIGINT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    room TEXT,
    reason TEXT NOT NULL,
    rule TEXT,
    details TEXT
);
CREATE INDEX audit_by_actor ON audit (actor, id);
CREATE INDEX audit_by_target ON audit (target, id);
CREATE INDEX audit_by_room ON audit (room, id);
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
CREATE TRIGGER audit_no_change BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
"#;

/// Checks a `[store] url` and turns it into a connection config, with
/// Wardroom's defaults for what the URL leaves out (`application_name`,
/// connect and TCP timeouts). The error says what is wrong, for the config
/// problem list.
pub fn parse_url(url: &str) -> Result<::postgres::Config, String> {
    let Some((scheme, _)) = url.split_once("://") else {
        return Err("must be a URL such as \"postgres://user@host:5432/dbname\"".to_owned());
    };
    if scheme != "postgres" && scheme != "postgresql" {
        return Err(format!("must be a postgres:// or postgresql:// URL, not {scheme}://"));
    }
    let mut config: ::postgres::Config =
        url.parse().map_err(|e| format!("is not a valid PostgreSQL URL: {}", error_text(&e)))?;
    if config.get_hosts().is_empty() {
        return Err("names no host: use \"postgres://user@host:5432/dbname\"".to_owned());
    }
    if !matches!(config.get_ssl_mode(), SslMode::Disable | SslMode::Prefer) {
        return Err(
            "asks for TLS, which this build does not support: connect over a local socket, a private network or a tunnel, without `sslmode=require`"
                .to_owned(),
        );
    }
    if config.get_application_name().is_none() {
        config.application_name(APPLICATION_NAME);
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    Ok(config)
}

/// Where a config connects, without its password: `user@host:port/dbname`.
fn describe(config: &::postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => String::new(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    format!("{user}{host}:{port}/{}", config.get_dbname().unwrap_or(""))
}

/// The PostgreSQL implementation of [`Store`]; see the [module docs](self).
pub struct PostgresStore {
    target: String,
    jobs: Sender<Job>,
    /// Taken on drop, so that the reader threads end.
    reads: Option<Sender<ReadJob>>,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Vec<JoinHandle<()>>,
}

/// State the writer thread shares with the handle.
#[derive(Debug, Default)]
struct Shared {
    /// Connected, and the last commit did not fail as a whole.
    healthy: AtomicBool,
    /// Closed flag, counters and the ids still queued.
    queue: Queue,
}

/// A read, run by a reader thread with its connection.
type ReadJob = Box<dyn FnOnce(&mut Reader) + Send>;

/// An error of this module: the database's, or a value that does not fit.
#[derive(Debug)]
enum PgError {
    Sql(::postgres::Error),
    Value(String),
}

impl From<::postgres::Error> for PgError {
    fn from(e: ::postgres::Error) -> Self {
        PgError::Sql(e)
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgError::Sql(e) => f.write_str(&error_text(e)),
            PgError::Value(message) => f.write_str(message),
        }
    }
}

/// A client error with what the server said (`postgres::Error` displays
/// only its kind, e.g. "db error").
fn error_text(e: &::postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            format!("{}: {}", db.severity(), db.message()) + &db.detail().map(|d| format!(" ({d})")).unwrap_or_default()
        }
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

impl PgError {
    /// Whether the connection is gone, rather than a statement refused.
    fn is_connection(&self) -> bool {
        let PgError::Sql(e) = self else { return false };
        if e.is_closed() {
            return true;
        }
        match e.code() {
            Some(code) => {
                code.code().starts_with("08")
                    || [SqlState::ADMIN_SHUTDOWN, SqlState::CRASH_SHUTDOWN, SqlState::CANNOT_CONNECT_NOW].contains(code)
            }
            // No SQLSTATE: the socket or the protocol failed.
            None => std::error::Error::source(e).is_some_and(|source| source.is::<std::io::Error>()),
        }
    }
}

/// A connection and its prepared statements.
struct Conn {
    client: Client,
    statements: HashMap<String, Statement>,
}

impl Conn {
    fn open(config: &::postgres::Config, synchronous: Synchronous) -> Result<Conn, PgError> {
        let mut config = config.clone();
        // Notices (e.g. "relation exists, skipping") are not worth a log line.
        config.notice_callback(|notice| tracing::debug!(%notice, "postgres notice"));
        let mut client = config.connect(NoTls)?;
        if synchronous == Synchronous::Normal {
            client.batch_execute("SET synchronous_commit = off")?;
        }
        Ok(Conn { client, statements: HashMap::new() })
    }
}

/// The statement for `sql`, prepared once per connection.
fn prepared(
    client: &mut impl GenericClient,
    cache: &mut HashMap<String, Statement>,
    sql: &str,
) -> Result<Statement, ::postgres::Error> {
    if let Some(statement) = cache.get(sql) {
        return Ok(statement.clone());
    }
    let statement = client.prepare(sql)?;
    cache.insert(sql.to_owned(), statement.clone());
    Ok(statement)
}

impl PostgresStore {
    /// Connects to the database at `config.url`, migrates its schema and
    /// starts the writer and reader threads. Blocks until connected (or
    /// failed); safe to call from async code.
    ///
    /// Fails with [`StoreError::TooNew`] (leaving the database untouched)
    /// when the schema comes from a newer Wardroom, and with
    /// [`StoreError::Unavailable`] when the database cannot be reached.
    pub fn open(config: &StoreConfig) -> Result<PostgresStore, StoreError> {
        let url = config.url.as_deref().ok_or_else(|| StoreError::Database("[store] has no url".to_owned()))?;
        let pg = parse_url(url).map_err(|e| StoreError::Database(format!("[store] url {e}")))?;
        let target = describe(&pg);
        let shared = Arc::new(Shared::default());

        // The first connection and the migrations run on the writer thread:
        // the blocking client must not run on this (maybe async) thread.
        let (jobs, receiver) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let writer = {
            let (pg, shared) = (pg.clone(), Arc::clone(&shared));
            let synchronous = config.synchronous;
            let (retain_per_room, retain_for) = (config.retain_per_room, config.retain_for);
            std::thread::Builder::new()
                .name("wardroom-store-pg".into())
                .spawn(move || {
                    let conn = Conn::open(&pg, synchronous)
                        .map_err(|e| StoreError::Unavailable(format!("cannot connect to the database: {e}")))
                        .and_then(|mut conn| migrate(&mut conn.client).map(|()| conn));
                    let conn = match conn {
                        Ok(conn) => conn,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    shared.healthy.store(true, Ordering::SeqCst);
                    let _ = ready_tx.send(Ok(()));
                    let now = Instant::now();
                    Writer {
                        pg,
                        synchronous,
                        conn: Some(conn),
                        jobs: receiver,
                        shared,
                        retain_per_room,
                        retain_for,
                        pruning: false,
                        next_prune: now + FIRST_PRUNE,
                        pass_deleted: 0,
                        last_group_writes: 0,
                        prune_waiters: Vec::new(),
                        last_used: now,
                        next_connect: now,
                        backoff: Duration::ZERO,
                        last_error: String::new(),
                    }
                    .run();
                })
                .map_err(|e| StoreError::Unavailable(format!("cannot start the store thread: {e}")))?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = writer.join();
                return Err(e);
            }
            Err(_) => {
                let _ = writer.join();
                return Err(StoreError::Unavailable("the store thread stopped while opening".into()));
            }
        }

        let (reads, read_receiver) = mpsc::channel::<ReadJob>();
        let read_receiver = Arc::new(Mutex::new(read_receiver));
        let mut readers = Vec::with_capacity(READERS);
        for n in 0..READERS {
            let receiver = Arc::clone(&read_receiver);
            let reader = Reader::new(pg.clone(), Arc::clone(&shared));
            match std::thread::Builder::new()
                .name(format!("wardroom-store-pg-read{n}"))
                .spawn(move || reader.run(&receiver))
            {
                Ok(handle) => readers.push(handle),
                Err(e) => {
                    shared.queue.closed.store(true, Ordering::SeqCst);
                    let _ = jobs.send(Job::Shutdown);
                    let _ = writer.join();
                    return Err(StoreError::Unavailable(format!("cannot start a store reader thread: {e}")));
                }
            }
        }
        tracing::info!(database = %target, "store: PostgreSQL");
        Ok(PostgresStore { target, jobs, reads: Some(reads), shared, writer: Mutex::new(Some(writer)), readers })
    }

    /// Where the store connects, without the password.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Commits everything queued so far and stops the writer thread. Later
    /// writes fail with [`StoreError::Unavailable`]; reads keep working.
    /// Idempotent; also run on drop.
    pub fn close(&self) {
        if !self.shared.queue.closed.swap(true, Ordering::SeqCst) {
            let _ = self.jobs.send(Job::Shutdown);
        }
        let writer = lock(&self.writer).take();
        if writer.is_some_and(|writer| writer.join().is_err()) {
            tracing::error!("the store writer thread panicked");
        }
    }

    /// Runs retention now instead of waiting for the next periodic pass, and
    /// returns how many messages it deleted (0 while another node holds the
    /// retention lock). Blocks: call it outside async code.
    pub fn run_retention(&self) -> Result<u64, StoreError> {
        self.shared.queue.run_retention(&self.jobs)
    }

    /// Counters of the writer thread.
    pub fn stats(&self) -> StoreStats {
        self.shared.queue.stats()
    }

    /// Runs `read` on a reader thread's connection and waits for it. A read
    /// cut off by a lost connection is tried once more on a new one.
    fn read<T: Send + 'static>(
        &self,
        mut read: impl FnMut(&mut Conn) -> Result<T, PgError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let Some(reads) = &self.reads else { return Err(unavailable()) };
        let (tx, rx) = mpsc::sync_channel(1);
        let job: ReadJob = Box::new(move |reader: &mut Reader| {
            let _ = tx.send(reader.with_conn(&mut read));
        });
        reads.send(job).map_err(|_| unavailable())?;
        rx.recv().unwrap_or_else(|_| Err(StoreError::Unavailable("the store reader stopped".into())))
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        self.close();
        self.reads = None;
        for reader in self.readers.drain(..) {
            if reader.join().is_err() {
                tracing::error!("a store reader thread panicked");
            }
        }
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .field("healthy", &self.shared.healthy.load(Ordering::Relaxed))
            .field("closed", &self.shared.queue.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

const HISTORY_SQL: &str = "SELECT room, id, user_id, json, ts FROM messages
     WHERE room = $1 AND id < $2 AND NOT deleted ORDER BY id DESC LIMIT $3";
const LAST_ID_SQL: &str = "SELECT last_id FROM rooms_seq WHERE room = $1";
const MESSAGE_SQL: &str =
    "SELECT room, id, user_id, json, ts FROM messages WHERE room = $1 AND id = $2 AND NOT deleted";
const MUTES_SQL: &str = "SELECT user_id, until, reason, actor, created_at FROM mutes
     WHERE until > $1 ORDER BY user_id COLLATE \"C\"";
const STRIKES_SQL: &str =
    "SELECT user_id, points, updated_at FROM strikes WHERE points > 0 ORDER BY user_id COLLATE \"C\"";
const STAFF_NAMES_SQL: &str = "SELECT look FROM staff_names ORDER BY look COLLATE \"C\"";
const ROOMS_SQL: &str = "SELECT room, slow_mode_secs, locked FROM room_settings
     WHERE slow_mode_secs <> 0 OR locked ORDER BY room COLLATE \"C\"";
const BANS_SQL: &str = "SELECT id, user_id, cidr, reason, actor, created_at, expires_at FROM bans ORDER BY id DESC";
const ACTIVE_BANS_SQL: &str = "SELECT id, user_id, cidr, reason, actor, created_at, expires_at FROM bans
     WHERE expires_at IS NULL OR expires_at > $1 ORDER BY id DESC";
const REVIEW_SELECT: &str = "SELECT id, kind, room, message_id, user_id, nick, content, reason, filter, reporter,
     ts, created_at, status, decided_by, decided_at FROM review_items";

impl Store for PostgresStore {
    fn write(&self, writes: Vec<Write>) -> Commit {
        self.shared.queue.write(&self.jobs, writes)
    }

    fn history(&self, room: &str, before: Option<u64>, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Ids above i64::MAX cannot be stored, so such a bound means "latest".
        let before = before.and_then(|b| i64::try_from(b).ok()).unwrap_or(i64::MAX);
        let (room, limit) = (room.to_owned(), count(limit));
        self.read(move |conn| {
            let statement = prepared(&mut conn.client, &mut conn.statements, HISTORY_SQL)?;
            let rows = conn.client.query(&statement, &[&room, &before, &limit])?;
            let mut messages = rows.iter().map(read_message).collect::<Result<Vec<_>, _>>()?;
            messages.reverse();
            Ok(messages)
        })
    }

    fn last_message_id(&self, room: &str) -> Result<u64, StoreError> {
        let queued = self.shared.queue.queued_id(room);
        let room = room.to_owned();
        let stored = self.read(move |conn| {
            let statement = prepared(&mut conn.client, &mut conn.statements, LAST_ID_SQL)?;
            match conn.client.query_opt(&statement, &[&room])? {
                Some(row) => get_u64(&row, 0),
                None => Ok(0),
            }
        })?;
        Ok(stored.max(queued))
    }

    fn snapshot(&self, now: u64) -> Result<Snapshot, StoreError> {
        let now = stored_time(now);
        self.read(move |conn| {
            let Conn { client, statements } = conn;
            // One read-only snapshot: the four parts are from the same commit.
            let mut tx =
                client.build_transaction().isolation_level(IsolationLevel::RepeatableRead).read_only(true).start()?;
            let bans = query_bans(&mut tx, statements, Some(now))?;
            let statement = prepared(&mut tx, statements, MUTES_SQL)?;
            let mutes = tx
                .query(&statement, &[&now])?
                .iter()
                .map(|row| {
                    Ok(Mute {
                        user_id: row.try_get(0)?,
                        until: get_u64(row, 1)?,
                        reason: row.try_get(2)?,
                        actor: row.try_get(3)?,
                        created_at: get_u64(row, 4)?,
                    })
                })
                .collect::<Result<Vec<_>, PgError>>()?;
            let statement = prepared(&mut tx, statements, STRIKES_SQL)?;
            let strikes = tx
                .query(&statement, &[])?
                .iter()
                .map(|row| Ok((row.try_get(0)?, Strikes { points: row.try_get(1)?, updated_at: get_u64(row, 2)? })))
                .collect::<Result<Vec<_>, PgError>>()?;
            let statement = prepared(&mut tx, statements, ROOMS_SQL)?;
            let rooms = tx
                .query(&statement, &[])?
                .iter()
                .map(|row| {
                    let slow: i64 = row.try_get(1)?;
                    Ok(RoomSettings {
                        room: row.try_get(0)?,
                        slow_mode_secs: u32::try_from(slow)
                            .map_err(|_| PgError::Value(format!("slow_mode_secs {slow} is out of range")))?,
                        locked: row.try_get(2)?,
                    })
                })
                .collect::<Result<Vec<_>, PgError>>()?;
            let statement = prepared(&mut tx, statements, STAFF_NAMES_SQL)?;
            let staff_names =
                tx.query(&statement, &[])?.iter().map(|row| row.try_get(0)).collect::<Result<Vec<String>, _>>()?;
            tx.commit()?;
            Ok(Snapshot { bans, mutes, strikes, rooms, staff_names })
        })
    }

    fn bans(&self, active_at: Option<u64>) -> Result<Vec<Ban>, StoreError> {
        let active_at = active_at.map(stored_time);
        self.read(move |conn| query_bans(&mut conn.client, &mut conn.statements, active_at))
    }

    fn review_items(&self, status: Option<ReviewStatus>) -> Result<Vec<ReviewItem>, StoreError> {
        self.read(move |conn| {
            let rows = match status {
                Some(status) => {
                    let sql = format!("{REVIEW_SELECT} WHERE status = $1 ORDER BY id");
                    let statement = prepared(&mut conn.client, &mut conn.statements, &sql)?;
                    conn.client.query(&statement, &[&status.as_str()])?
                }
                None => {
                    let sql = format!("{REVIEW_SELECT} ORDER BY id");
                    let statement = prepared(&mut conn.client, &mut conn.statements, &sql)?;
                    conn.client.query(&statement, &[])?
                }
            };
            rows.iter().map(read_review).collect()
        })
    }

    fn review_item(&self, id: i64) -> Result<Option<ReviewItem>, StoreError> {
        self.read(move |conn| {
            let sql = format!("{REVIEW_SELECT} WHERE id = $1");
            let statement = prepared(&mut conn.client, &mut conn.statements, &sql)?;
            conn.client.query_opt(&statement, &[&id])?.as_ref().map(read_review).transpose()
        })
    }

    fn message(&self, room: &str, id: u64) -> Result<Option<StoredMessage>, StoreError> {
        let Ok(id) = i64::try_from(id) else { return Ok(None) };
        let room = room.to_owned();
        self.read(move |conn| {
            let statement = prepared(&mut conn.client, &mut conn.statements, MESSAGE_SQL)?;
            conn.client.query_opt(&statement, &[&room, &id])?.as_ref().map(read_message).transpose()
        })
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        // Only the filters in use appear in the SQL, so the planner can pick
        // the matching index; each of the few shapes is prepared once.
        let mut sql =
            String::from("SELECT id, at, actor, action, target, room, reason, rule, details FROM audit WHERE true");
        let mut texts: Vec<String> = Vec::with_capacity(3);
        for (column, value) in [("actor", &query.actor), ("target", &query.target), ("room", &query.room)] {
            if let Some(value) = value {
                texts.push(value.clone());
                sql.push_str(&format!(" AND {column} = ${}", texts.len()));
            }
        }
        let mut next = texts.len() + 1;
        let before = query.before;
        if before.is_some() {
            sql.push_str(&format!(" AND id < ${next}"));
            next += 1;
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${next}"));
        let limit = count(query.limit);
        self.read(move |conn| {
            let statement = prepared(&mut conn.client, &mut conn.statements, &sql)?;
            let mut params: Vec<&(dyn ToSql + Sync)> = texts.iter().map(|t| t as &(dyn ToSql + Sync)).collect();
            if let Some(before) = &before {
                params.push(before);
            }
            params.push(&limit);
            conn.client
                .query(&statement, &params)?
                .iter()
                .map(|row| {
                    Ok(AuditEntry {
                        id: row.try_get(0)?,
                        at: get_u64(row, 1)?,
                        actor: row.try_get(2)?,
                        action: row.try_get(3)?,
                        target: row.try_get(4)?,
                        room: row.try_get(5)?,
                        reason: row.try_get(6)?,
                        rule: row.try_get(7)?,
                        details: row.try_get(8)?,
                    })
                })
                .collect()
        })
    }

    fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst) && !self.shared.queue.closed.load(Ordering::SeqCst)
    }
}

/// The schema version in the database, read without writing anything
/// (0 when there is no version table yet).
fn schema_version(client: &mut impl GenericClient) -> Result<u32, StoreError> {
    let database =
        |e: ::postgres::Error| StoreError::Database(format!("cannot read the schema version: {}", error_text(&e)));
    let exists: bool =
        client.query_one("SELECT to_regclass('wardroom_schema') IS NOT NULL", &[]).map_err(database)?.get(0);
    if !exists {
        return Ok(0);
    }
    let version: Option<i32> =
        client.query_one("SELECT max(version) FROM wardroom_schema", &[]).map_err(database)?.get(0);
    // Negative versions are nonsense: treat them as too new.
    Ok(version.map_or(0, |v| u32::try_from(v).unwrap_or(u32::MAX)))
}

fn check_version(client: &mut impl GenericClient) -> Result<u32, StoreError> {
    let found = schema_version(client)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew { found, supported: SCHEMA_VERSION });
    }
    Ok(found)
}

/// Runs the missing migrations in one transaction, under an advisory lock,
/// so that nodes starting at once migrate exactly once.
fn migrate(client: &mut Client) -> Result<(), StoreError> {
    // Nothing is written to a database that is too new, nor locked for one
    // that is up to date.
    if check_version(client)? == SCHEMA_VERSION {
        return Ok(());
    }
    let failed = |e: ::postgres::Error| StoreError::Database(format!("cannot migrate the schema: {}", error_text(&e)));
    // A session lock taken before the transaction begins: a transaction
    // that began before another node's migration committed would still see
    // its tables as missing (the catalog caches of a backend catch up at
    // the start of a transaction, not when an advisory lock is granted).
    client.execute("SELECT pg_advisory_lock($1, hashtext(current_schema()))", &[&MIGRATION_LOCK]).map_err(failed)?;
    let migrated = migrate_locked(client);
    // (A broken connection releases the lock by itself.)
    let unlocked =
        client.execute("SELECT pg_advisory_unlock($1, hashtext(current_schema()))", &[&MIGRATION_LOCK]).map_err(failed);
    migrated.and(unlocked.map(drop))
}

/// [`migrate`]'s transaction, run under the migration lock.
fn migrate_locked(client: &mut Client) -> Result<(), StoreError> {
    let failed = |e: ::postgres::Error| StoreError::Database(format!("cannot migrate the schema: {}", error_text(&e)));
    let mut tx = client.transaction().map_err(failed)?;
    // Again under the lock: another node may have migrated since.
    let found = check_version(&mut tx)?;
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS wardroom_schema (
             version INTEGER NOT NULL PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .map_err(failed)?;
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let to = i32::try_from(from + 1).unwrap_or(i32::MAX);
        tx.batch_execute(sql)
            .map_err(|e| StoreError::Database(format!("migration to version {to}: {}", error_text(&e))))?;
        tx.execute("INSERT INTO wardroom_schema (version) VALUES ($1)", &[&to]).map_err(failed)?;
    }
    tx.commit().map_err(failed)?;
    tracing::info!(from = found, to = SCHEMA_VERSION, "migrated the store schema");
    Ok(())
}

/// A reader thread's connection (opened when first needed, and again after
/// it is lost).
struct Reader {
    pg: ::postgres::Config,
    conn: Option<Conn>,
    /// No attempt to connect before this, unless the writer is connected.
    next_connect: Instant,
    backoff: Duration,
    shared: Arc<Shared>,
}

impl Reader {
    fn new(pg: ::postgres::Config, shared: Arc<Shared>) -> Reader {
        Reader { pg, conn: None, next_connect: Instant::now(), backoff: Duration::ZERO, shared }
    }

    fn run(mut self, jobs: &Mutex<Receiver<ReadJob>>) {
        loop {
            // The lock is held only while waiting; the job runs without it.
            let job = lock(jobs).recv();
            match job {
                Ok(job) => job(&mut self),
                Err(_) => break,
            }
        }
    }

    /// Runs `read`, connecting first if needed; once more on a new
    /// connection if the connection was lost under it.
    fn with_conn<T>(&mut self, read: &mut dyn FnMut(&mut Conn) -> Result<T, PgError>) -> Result<T, StoreError> {
        let mut retried = false;
        loop {
            let conn = match &mut self.conn {
                Some(conn) => conn,
                None => {
                    // The writer got through: the database is back.
                    let back = self.shared.healthy.load(Ordering::SeqCst);
                    if Instant::now() < self.next_connect && !back {
                        return Err(StoreError::Unavailable("the database is unreachable".into()));
                    }
                    match Conn::open(&self.pg, Synchronous::Full) {
                        Ok(conn) => {
                            self.backoff = Duration::ZERO;
                            self.conn.insert(conn)
                        }
                        Err(e) => {
                            self.backoff = (self.backoff * 2).clamp(RECONNECT_MIN, RECONNECT_MAX);
                            self.next_connect = Instant::now() + self.backoff;
                            return Err(StoreError::Unavailable(format!("cannot connect to the database: {e}")));
                        }
                    }
                }
            };
            match read(conn) {
                Ok(value) => return Ok(value),
                Err(e) if e.is_connection() || conn.client.is_closed() => {
                    self.conn = None;
                    if retried {
                        return Err(StoreError::Unavailable(format!("the database connection was lost: {e}")));
                    }
                    retried = true;
                }
                Err(e) => return Err(StoreError::Database(e.to_string())),
            }
        }
    }
}

/// The writer thread's state.
struct Writer {
    pg: ::postgres::Config,
    synchronous: Synchronous,
    /// `None` while the database cannot be reached.
    conn: Option<Conn>,
    jobs: Receiver<Job>,
    shared: Arc<Shared>,
    retain_per_room: u64,
    retain_for: Option<Duration>,
    /// A retention pass is under way (more chunks to go).
    pruning: bool,
    /// When the next pass starts.
    next_prune: Instant,
    /// Deleted so far in the current pass.
    pass_deleted: u64,
    /// Writes in the group committed since the last retention chunk.
    last_group_writes: usize,
    /// Callers of [`PostgresStore::run_retention`] waiting for the pass.
    prune_waiters: Vec<oneshot::Sender<Result<u64, StoreError>>>,
    /// When the connection last answered.
    last_used: Instant,
    /// No attempt to connect before this.
    next_connect: Instant,
    /// The wait after the last failed attempt.
    backoff: Duration,
    /// Why the database is unreachable, while it is.
    last_error: String,
}

/// Marks the store unhealthy when the writer thread ends, even by a panic.
struct UnhealthyOnExit(Arc<Shared>);

impl Drop for UnhealthyOnExit {
    fn drop(&mut self) {
        self.0.healthy.store(false, Ordering::SeqCst);
    }
}

/// Where a group failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// A write of the group (retry with a savepoint per batch).
    Write,
    /// Before `COMMIT` was sent, outside the writes: nothing is committed.
    Other,
    /// `COMMIT` itself.
    Commit,
}

/// Why a group did not commit.
struct Failure {
    stage: Stage,
    error: PgError,
}

fn at(stage: Stage) -> impl Fn(::postgres::Error) -> Failure {
    move |e| Failure { stage, error: PgError::Sql(e) }
}

impl Writer {
    fn run(mut self) {
        let _guard = UnhealthyOnExit(Arc::clone(&self.shared));
        loop {
            let now = Instant::now();
            let job = if self.prune_due(now) {
                match self.jobs.try_recv() {
                    Ok(job) => Some(job),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match self.jobs.recv_timeout(self.next_wake().saturating_duration_since(now)) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            };
            if job.is_some_and(|job| !self.handle(job)) {
                break;
            }
            if self.prune_due(Instant::now()) {
                self.prune_step();
            }
            self.keep_alive();
        }
        // Commit whatever was queued before the shutdown was noticed.
        while let Ok(job) = self.jobs.try_recv() {
            self.handle(job);
        }
        for waiter in self.prune_waiters.drain(..) {
            let _ = waiter.send(Err(unavailable()));
        }
    }

    fn retention_enabled(&self) -> bool {
        self.retain_per_room > 0 || self.retain_for.is_some()
    }

    /// A retention chunk should run now (and can: connected).
    fn prune_due(&self, now: Instant) -> bool {
        self.retention_enabled() && self.conn.is_some() && (self.pruning || now >= self.next_prune)
    }

    /// When to wake without a job: for the next connection check or attempt,
    /// or the next retention pass.
    fn next_wake(&self) -> Instant {
        let check = match self.conn {
            Some(_) => self.last_used + PING_IDLE,
            None => self.next_connect,
        };
        if self.retention_enabled() && self.conn.is_some() { check.min(self.next_prune) } else { check }
    }

    /// Connects if not connected and it is time to try; whether connected.
    fn ensure_connected(&mut self) -> bool {
        if self.conn.is_none() && Instant::now() >= self.next_connect {
            self.connect();
        }
        self.conn.is_some()
    }

    fn connect(&mut self) {
        match Conn::open(&self.pg, self.synchronous) {
            Ok(conn) => {
                if !self.last_error.is_empty() {
                    tracing::info!("store: connected to the database again");
                }
                self.conn = Some(conn);
                self.last_error.clear();
                self.backoff = Duration::ZERO;
                self.last_used = Instant::now();
                self.shared.healthy.store(true, Ordering::SeqCst);
            }
            Err(e) => {
                self.shared.healthy.store(false, Ordering::SeqCst);
                self.backoff = (self.backoff * 2).clamp(RECONNECT_MIN, RECONNECT_MAX);
                self.next_connect = Instant::now() + self.backoff;
                let error = e.to_string();
                if error != self.last_error {
                    tracing::warn!(%error, retry_in = ?self.backoff, "store: cannot connect to the database");
                    self.last_error = error;
                }
            }
        }
    }

    /// Forgets a broken connection; the next attempt is at once.
    fn lose(&mut self, error: &PgError) {
        tracing::warn!(%error, "store: lost the database connection");
        self.conn = None;
        self.shared.healthy.store(false, Ordering::SeqCst);
        self.last_error = error.to_string();
        self.next_connect = Instant::now();
    }

    /// Checks an idle connection, and reconnects when it is time.
    fn keep_alive(&mut self) {
        let now = Instant::now();
        let check = match &mut self.conn {
            None => {
                if now >= self.next_connect {
                    self.connect();
                }
                return;
            }
            Some(_) if now < self.last_used + PING_IDLE => return,
            Some(conn) => conn.client.is_valid(PING_TIMEOUT),
        };
        match check {
            Ok(()) => self.last_used = now,
            Err(e) => {
                self.lose(&PgError::Sql(e));
                self.connect();
            }
        }
    }

    /// Handles a job (and the group it starts); false when told to stop.
    fn handle(&mut self, first: Job) -> bool {
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Batch(pending) => {
                    let (group, after) = gather(pending, &self.jobs);
                    next = after;
                    self.commit_group(group);
                }
                Job::Prune(reply) => {
                    if !self.retention_enabled() {
                        let _ = reply.send(Ok(0));
                    } else if !self.ensure_connected() {
                        let _ = reply.send(Err(self.unreachable()));
                    } else {
                        self.prune_waiters.push(reply);
                        if !self.pruning {
                            self.next_prune = Instant::now();
                        }
                    }
                }
                Job::Shutdown => return false,
            }
        }
        true
    }

    fn unreachable(&self) -> StoreError {
        StoreError::Unavailable(if self.last_error.is_empty() {
            "the database is unreachable".to_owned()
        } else {
            format!("the database is unreachable: {}", self.last_error)
        })
    }

    /// Commits a group and resolves its batches in order, then forgets the
    /// queued message ids the database now holds (or never will).
    fn commit_group(&mut self, group: Vec<Pending>) {
        match self.run_group(&group) {
            Ok(results) => {
                self.last_used = Instant::now();
                self.shared.healthy.store(true, Ordering::SeqCst);
                let writes = self.shared.queue.committed(&group, &results);
                self.last_group_writes = self.last_group_writes.saturating_add(writes as usize);
                for (pending, result) in group.into_iter().zip(results) {
                    let _ = pending.reply.send(result);
                }
            }
            Err(error) => {
                self.shared.queue.failed(&group);
                tracing::error!(%error, batches = group.len(), "store commit failed");
                for pending in group {
                    let _ = pending.reply.send(Err(match &error {
                        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
                        other => StoreError::Database(other.to_string()),
                    }));
                }
            }
        }
    }

    /// Runs a group: whole, then (if a write failed) with a savepoint per
    /// batch; once more on a new connection if the connection was lost
    /// before `COMMIT`.
    fn run_group(&mut self, group: &[Pending]) -> Result<Vec<Committed>, StoreError> {
        let mut isolated = false;
        let mut reconnected = false;
        loop {
            if !self.ensure_connected() {
                return Err(self.unreachable());
            }
            let Some(conn) = self.conn.as_mut() else { return Err(self.unreachable()) };
            let failure = match apply_group(conn, group, isolated) {
                Ok(results) => return Ok(results),
                Err(failure) => failure,
            };
            if failure.error.is_connection() || conn.client.is_closed() {
                self.lose(&failure.error);
                if failure.stage == Stage::Commit {
                    return Err(StoreError::Unavailable(format!(
                        "the database connection was lost during the commit, which may or may not have happened: {}",
                        failure.error
                    )));
                }
                if !reconnected {
                    // Nothing of the group was committed: run it again.
                    reconnected = true;
                    continue;
                }
                return Err(StoreError::Unavailable(format!("the database connection was lost: {}", failure.error)));
            }
            if failure.stage == Stage::Write && !isolated {
                isolated = true;
                continue;
            }
            self.shared.healthy.store(false, Ordering::SeqCst);
            return Err(StoreError::Database(failure.error.to_string()));
        }
    }

    /// One chunk of retention, bookkeeping for the pass it belongs to.
    fn prune_step(&mut self) {
        if !self.pruning {
            self.pruning = true;
            self.pass_deleted = 0;
        }
        let budget = match std::mem::take(&mut self.last_group_writes) {
            0 => PRUNE_CHUNK,
            writes => writes.saturating_mul(2).clamp(PRUNE_CHUNK_MIN, PRUNE_CHUNK),
        };
        let result = match self.conn.as_mut() {
            Some(conn) => prune_chunk(conn, self.retain_for, self.retain_per_room, now_ms(), budget),
            None => Err(PgError::Value("the database is unreachable".into())),
        };
        self.last_used = Instant::now();
        let outcome = match result {
            Ok((deleted, more)) => {
                self.pass_deleted += deleted;
                self.shared.queue.pruned(deleted);
                if more {
                    return;
                }
                Ok(self.pass_deleted)
            }
            Err(e) => {
                tracing::warn!(error = %e, "store retention failed");
                if self.conn.as_ref().is_some_and(|conn| e.is_connection() || conn.client.is_closed()) {
                    self.lose(&e);
                }
                Err(e.to_string())
            }
        };
        self.pruning = false;
        self.next_prune = Instant::now() + PRUNE_INTERVAL;
        for waiter in self.prune_waiters.drain(..) {
            let _ = waiter.send(outcome.clone().map_err(StoreError::Database));
        }
    }
}

/// Runs every batch of the group in one transaction. With `isolated`,
/// each batch gets a savepoint and a failing one is rolled back alone.
fn apply_group(conn: &mut Conn, group: &[Pending], isolated: bool) -> Result<Vec<Committed>, Failure> {
    let Conn { client, statements } = conn;
    let mut tx = client.transaction().map_err(at(Stage::Other))?;
    // The id counters this group takes, locked first and in name order, so
    // that two nodes' groups never wait for each other in a cycle.
    let counters: BTreeSet<&str> = group
        .iter()
        .flat_map(|p| &p.writes)
        .filter_map(|write| match write {
            Write::Ban(_) => Some("bans"),
            Write::Review(_) => Some("review_items"),
            Write::Audit(_) => Some("audit"),
            _ => None,
        })
        .collect();
    if !counters.is_empty() {
        let names: Vec<&str> = counters.into_iter().collect();
        let statement = prepared(
            &mut tx,
            statements,
            "SELECT 1 FROM id_counters WHERE name = ANY($1) ORDER BY name COLLATE \"C\" FOR UPDATE",
        )
        .map_err(at(Stage::Other))?;
        tx.execute(&statement, &[&names]).map_err(at(Stage::Other))?;
    }
    let mut results: Vec<Committed> = Vec::with_capacity(group.len());
    if isolated {
        for pending in group {
            let mut savepoint = tx.savepoint("batch").map_err(at(Stage::Other))?;
            let writes: Vec<&Write> = pending.writes.iter().collect();
            match apply_writes(&mut savepoint, statements, &writes) {
                Ok(written) => {
                    savepoint.commit().map_err(at(Stage::Other))?;
                    results.push(Ok(written));
                }
                Err(e) => {
                    if e.is_connection() {
                        return Err(Failure { stage: Stage::Other, error: e });
                    }
                    savepoint.rollback().map_err(at(Stage::Other))?;
                    results.push(Err(StoreError::Database(e.to_string())));
                }
            }
        }
    } else {
        let writes: Vec<&Write> = group.iter().flat_map(|p| &p.writes).collect();
        let mut written =
            apply_writes(&mut tx, statements, &writes).map_err(|error| Failure { stage: Stage::Write, error })?;
        // Split the results by batch, in order.
        let mut rest = written.drain(..);
        for pending in group {
            results.push(Ok(rest.by_ref().take(pending.writes.len()).collect()));
        }
    }

    // Per room: highest message id and messages inserted, in room order
    // (every transaction locks rooms_seq rows in this order).
    let mut rooms: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for (pending, result) in group.iter().zip(&results) {
        if result.is_err() {
            continue;
        }
        for write in &pending.writes {
            if let Write::Message(m) = write {
                // In range: the insert succeeded.
                let id = i64::try_from(m.id).unwrap_or(i64::MAX);
                let entry = rooms.entry(&*m.room).or_insert((id, 0));
                entry.0 = entry.0.max(id);
                entry.1 += 1;
            }
        }
    }
    if !rooms.is_empty() {
        let names: Vec<&str> = rooms.keys().copied().collect();
        let last_ids: Vec<i64> = rooms.values().map(|(id, _)| *id).collect();
        let added: Vec<i64> = rooms.values().map(|(_, n)| *n).collect();
        let statement = prepared(
            &mut tx,
            statements,
            "INSERT INTO rooms_seq (room, last_id, msg_count)
             SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[])
             ON CONFLICT (room) DO UPDATE SET last_id = GREATEST(rooms_seq.last_id, EXCLUDED.last_id),
             msg_count = rooms_seq.msg_count + EXCLUDED.msg_count",
        )
        .map_err(at(Stage::Other))?;
        tx.execute(&statement, &[&names, &last_ids, &added]).map_err(at(Stage::Other))?;
    }
    tx.commit().map_err(at(Stage::Commit))?;
    Ok(results)
}

/// Applies writes in order; consecutive messages go in as one statement.
/// The results are in the order of the writes.
fn apply_writes(
    tx: &mut Transaction<'_>,
    statements: &mut HashMap<String, Statement>,
    writes: &[&Write],
) -> Result<Vec<Written>, PgError> {
    let mut out = Vec::with_capacity(writes.len());
    let mut i = 0;
    while i < writes.len() {
        if let Write::Message(_) = writes[i] {
            let run: Vec<&StoredMessage> = writes[i..]
                .iter()
                .map_while(|w| match w {
                    Write::Message(m) => Some(m),
                    _ => None,
                })
                .collect();
            insert_messages(tx, statements, &run)?;
            out.extend(std::iter::repeat_n(Written::Done, run.len()));
            i += run.len();
            continue;
        }
        out.push(apply_write(tx, statements, writes[i])?);
        i += 1;
    }
    Ok(out)
}

fn insert_messages(
    tx: &mut Transaction<'_>,
    statements: &mut HashMap<String, Statement>,
    messages: &[&StoredMessage],
) -> Result<(), PgError> {
    let rooms: Vec<&str> = messages.iter().map(|m| &*m.room).collect();
    let ids = messages.iter().map(|m| id_param(m.id)).collect::<Result<Vec<i64>, _>>()?;
    let users: Vec<&str> = messages.iter().map(|m| &*m.user_id).collect();
    let jsons: Vec<&str> = messages.iter().map(|m| m.json.as_str()).collect();
    let times: Vec<i64> = messages.iter().map(|m| stored_time(m.ts)).collect();
    let statement = prepared(
        tx,
        statements,
        "INSERT INTO messages (room, id, user_id, json, ts)
         SELECT * FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[], $5::bigint[])",
    )?;
    tx.execute(&statement, &[&rooms, &ids, &users, &jsons, &times])?;
    Ok(())
}

/// Applies one write other than a message.
fn apply_write(
    tx: &mut Transaction<'_>,
    statements: &mut HashMap<String, Statement>,
    write: &Write,
) -> Result<Written, PgError> {
    let mut run = |sql: &str, params: &[&(dyn ToSql + Sync)]| -> Result<u64, PgError> {
        let statement = prepared(tx, statements, sql)?;
        Ok(tx.execute(&statement, params)?)
    };
    let written = match write {
        Write::Message(m) => {
            insert_messages(tx, statements, &[m])?;
            Written::Done
        }
        Write::DeleteMessage { room, id } => {
            // An id that cannot be stored cannot be deleted either.
            if let Ok(id) = i64::try_from(*id) {
                run("UPDATE messages SET deleted = true WHERE room = $1 AND id = $2", &[room, &id])?;
            }
            Written::Done
        }
        Write::Ban(ban) => {
            let statement = prepared(
                tx,
                statements,
                "WITH next AS (UPDATE id_counters SET last = last + 1 WHERE name = 'bans' RETURNING last)
                 INSERT INTO bans (id, user_id, cidr, reason, actor, created_at, expires_at)
                 SELECT last, $1::text, $2::text, $3::text, $4::text, $5::bigint, $6::bigint FROM next
                 ON CONFLICT ((coalesce(user_id, '')), (coalesce(cidr, '')), actor, created_at)
                 DO UPDATE SET actor = EXCLUDED.actor
                 RETURNING id",
            )?;
            let row = tx.query_one(
                &statement,
                &[
                    &ban.user_id,
                    &ban.cidr,
                    &ban.reason,
                    &ban.actor,
                    &stored_time(ban.created_at),
                    &ban.expires_at.map(stored_time),
                ],
            )?;
            Written::Id(row.try_get(0)?)
        }
        Write::LiftBan { id, at } => {
            // The ban now ends at `at` (if it would have ended later).
            run(
                "UPDATE bans SET lifted_at = $2,
                 expires_at = CASE WHEN expires_at IS NULL OR expires_at > $2 THEN $2 ELSE expires_at END
                 WHERE id = $1 AND lifted_at IS NULL",
                &[id, &stored_time(*at)],
            )?;
            Written::Done
        }
        Write::Mute(mute) => {
            run(
                "INSERT INTO mutes (user_id, until, reason, actor, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id) DO UPDATE SET until = EXCLUDED.until, reason = EXCLUDED.reason,
                 actor = EXCLUDED.actor, created_at = EXCLUDED.created_at",
                &[&mute.user_id, &stored_time(mute.until), &mute.reason, &mute.actor, &stored_time(mute.created_at)],
            )?;
            Written::Done
        }
        Write::Unmute { user_id } => {
            run("DELETE FROM mutes WHERE user_id = $1", &[user_id])?;
            Written::Done
        }
        Write::Strikes { user_id, strikes } => {
            // Zero, negative or NaN points clear them.
            if strikes.points > 0.0 {
                run(
                    "INSERT INTO strikes (user_id, points, updated_at) VALUES ($1, $2, $3)
                     ON CONFLICT (user_id) DO UPDATE SET points = EXCLUDED.points, updated_at = EXCLUDED.updated_at",
                    &[user_id, &strikes.points, &stored_time(strikes.updated_at)],
                )?;
            } else {
                run("DELETE FROM strikes WHERE user_id = $1", &[user_id])?;
            }
            Written::Done
        }
        Write::Review(item) => {
            let message_id = item.message_id.map(id_param).transpose()?;
            let statement = prepared(
                tx,
                statements,
                "WITH next AS (UPDATE id_counters SET last = last + 1 WHERE name = 'review_items' RETURNING last)
                 INSERT INTO review_items (id, kind, room, message_id, user_id, nick, content, reason, filter,
                 reporter, ts, created_at, status, decided_by, decided_at)
                 SELECT last, $1::text, $2::text, $3::bigint, $4::text, $5::text, $6::text, $7::text, $8::text,
                 $9::text, $10::bigint, $11::bigint, $12::text, $13::text, $14::bigint FROM next
                 RETURNING id",
            )?;
            let row = tx.query_one(
                &statement,
                &[
                    &item.kind.as_str(),
                    &item.room,
                    &message_id,
                    &item.user_id,
                    &item.nick,
                    &item.content,
                    &item.reason,
                    &item.filter,
                    &item.reporter,
                    &stored_time(item.ts),
                    &stored_time(item.created_at),
                    &item.status.as_str(),
                    &item.decided_by,
                    &item.decided_at.map(stored_time),
                ],
            )?;
            Written::Id(row.try_get(0)?)
        }
        Write::Decide { id, status, by, at } => {
            run(
                "UPDATE review_items SET status = $2, decided_by = $3, decided_at = $4 WHERE id = $1",
                &[id, &status.as_str(), by, &stored_time(*at)],
            )?;
            Written::Done
        }
        Write::StaffName { looks, at } => {
            for look in looks {
                run(
                    "INSERT INTO staff_names (look, seen_at) VALUES ($1, $2)
                     ON CONFLICT (look) DO UPDATE SET seen_at = EXCLUDED.seen_at",
                    &[look, &stored_time(*at)],
                )?;
            }
            Written::Done
        }
        Write::RoomSettings(settings) => {
            run(
                "INSERT INTO room_settings (room, slow_mode_secs, locked) VALUES ($1, $2, $3)
                 ON CONFLICT (room) DO UPDATE SET slow_mode_secs = EXCLUDED.slow_mode_secs,
                 locked = EXCLUDED.locked",
                &[&settings.room, &i64::from(settings.slow_mode_secs), &settings.locked],
            )?;
            Written::Done
        }
        Write::Audit(entry) => {
            let statement = prepared(
                tx,
                statements,
                "WITH next AS (UPDATE id_counters SET last = last + 1 WHERE name = 'audit' RETURNING last)
                 INSERT INTO audit (id, at, actor, action, target, room, reason, rule, details)
                 SELECT last, $1::bigint, $2::text, $3::text, $4::text, $5::text, $6::text, $7::text, $8::text
                 FROM next RETURNING id",
            )?;
            let row = tx.query_one(
                &statement,
                &[
                    &stored_time(entry.at),
                    &entry.actor,
                    &entry.action,
                    &entry.target,
                    &entry.room,
                    &entry.reason,
                    &entry.rule,
                    &entry.details,
                ],
            )?;
            Written::Id(row.try_get(0)?)
        }
    };
    Ok(written)
}

/// Deletes up to `budget` expired messages in one transaction; returns how
/// many, and whether there may be more. Does nothing while another node
/// holds the retention lock.
fn prune_chunk(
    conn: &mut Conn,
    retain_for: Option<Duration>,
    retain_per_room: u64,
    now_ms: u64,
    budget: usize,
) -> Result<(u64, bool), PgError> {
    let Conn { client, statements } = conn;
    let mut tx = client.transaction()?;
    let locked: bool = tx
        .query_one("SELECT pg_try_advisory_xact_lock($1, hashtext(current_schema()))", &[&RETENTION_LOCK])?
        .try_get(0)?;
    if !locked {
        tx.commit()?;
        return Ok((0, false));
    }
    let mut budget = budget;
    let mut deleted = 0u64;

    if let Some(age) = retain_for {
        let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        let cutoff = stored_time(now_ms.saturating_sub(age));
        let statement = prepared(
            &mut tx,
            statements,
            "WITH doomed AS (SELECT room, id FROM messages WHERE ts < $1 ORDER BY ts LIMIT $2)
             DELETE FROM messages m USING doomed d WHERE m.room = d.room AND m.id = d.id RETURNING m.room",
        )?;
        let mut per_room: BTreeMap<String, i64> = BTreeMap::new();
        for row in tx.query(&statement, &[&cutoff, &count(budget)])? {
            *per_room.entry(row.try_get(0)?).or_default() += 1;
            deleted += 1;
            budget = budget.saturating_sub(1);
        }
        let statement = prepared(
            &mut tx,
            statements,
            "UPDATE rooms_seq SET msg_count = GREATEST(msg_count - $2, 0) WHERE room = $1",
        )?;
        for (room, n) in &per_room {
            tx.execute(&statement, &[room, n])?;
        }
    }

    let mut more = budget == 0;
    if retain_per_room > 0 && budget > 0 {
        let keep = i64::try_from(retain_per_room).unwrap_or(i64::MAX);
        let statement = prepared(
            &mut tx,
            statements,
            "SELECT room, msg_count - $1 FROM rooms_seq WHERE msg_count > $1 ORDER BY msg_count DESC LIMIT $2",
        )?;
        let mut over: Vec<(String, i64)> = tx
            .query(&statement, &[&keep, &count(budget)])?
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, PgError>>()?;
        // Rows of rooms_seq are locked in room order, as by the writers.
        over.sort_by(|a, b| a.0.cmp(&b.0));
        // The budget is shared in proportion to each room's excess, so that
        // a chunk deletes about the oldest rows of all those rooms together.
        let total: i128 = over.iter().map(|(_, excess)| i128::from(*excess)).sum();
        let chunk = budget as i128;
        let share_of = |excess: i64| {
            let share = i128::from(excess) * chunk / total.max(1);
            i64::try_from(share).unwrap_or(i64::MAX).clamp(1, excess)
        };
        let proportional = total > chunk;
        more |= proportional;
        for (room, excess) in over {
            if budget == 0 {
                break;
            }
            let n = if proportional { share_of(excess) } else { excess }.min(count(budget));
            let statement = prepared(
                &mut tx,
                statements,
                "DELETE FROM messages WHERE room = $1 AND id IN
                 (SELECT id FROM messages WHERE room = $1 ORDER BY id LIMIT $2)",
            )?;
            let removed = tx.execute(&statement, &[&room, &n])?;
            let removed_i64 = i64::try_from(removed).unwrap_or(i64::MAX);
            if removed_i64 < n {
                // The count had drifted: recount from the rows.
                let statement = prepared(
                    &mut tx,
                    statements,
                    "UPDATE rooms_seq SET msg_count = (SELECT count(*) FROM messages WHERE room = $1) WHERE room = $1",
                )?;
                tx.execute(&statement, &[&room])?;
            } else {
                let statement = prepared(
                    &mut tx,
                    statements,
                    "UPDATE rooms_seq SET msg_count = GREATEST(msg_count - $2, 0) WHERE room = $1",
                )?;
                tx.execute(&statement, &[&room, &removed_i64])?;
            }
            deleted += removed;
            budget = budget.saturating_sub(usize::try_from(removed).unwrap_or(usize::MAX).max(1));
        }
    }
    tx.commit()?;
    // Nothing deleted means nothing to delete (or counts to fix, done).
    Ok((deleted, more && deleted > 0))
}

fn query_bans(
    client: &mut impl GenericClient,
    statements: &mut HashMap<String, Statement>,
    active_at: Option<i64>,
) -> Result<Vec<Ban>, PgError> {
    let rows = match active_at {
        // A lifted ban's expires_at was moved to when it was lifted.
        Some(at) => {
            let statement = prepared(client, statements, ACTIVE_BANS_SQL)?;
            client.query(&statement, &[&at])?
        }
        None => {
            let statement = prepared(client, statements, BANS_SQL)?;
            client.query(&statement, &[])?
        }
    };
    rows.iter()
        .map(|row| {
            Ok(Ban {
                id: row.try_get(0)?,
                user_id: row.try_get(1)?,
                cidr: row.try_get(2)?,
                reason: row.try_get(3)?,
                actor: row.try_get(4)?,
                created_at: get_u64(row, 5)?,
                expires_at: get_opt_u64(row, 6)?,
            })
        })
        .collect()
}

fn read_review(row: &Row) -> Result<ReviewItem, PgError> {
    let kind: String = row.try_get(1)?;
    let status: String = row.try_get(12)?;
    Ok(ReviewItem {
        id: row.try_get(0)?,
        kind: match ReviewKind::parse(&kind) {
            Some(kind) => kind,
            None => return Err(PgError::Value(format!("unknown review kind {kind:?}"))),
        },
        room: row.try_get(2)?,
        message_id: get_opt_u64(row, 3)?,
        user_id: row.try_get(4)?,
        nick: row.try_get(5)?,
        content: row.try_get(6)?,
        reason: row.try_get(7)?,
        filter: row.try_get(8)?,
        reporter: row.try_get(9)?,
        ts: get_u64(row, 10)?,
        created_at: get_u64(row, 11)?,
        status: match ReviewStatus::parse(&status) {
            Some(status) => status,
            None => return Err(PgError::Value(format!("unknown review status {status:?}"))),
        },
        decided_by: row.try_get(13)?,
        decided_at: get_opt_u64(row, 14)?,
    })
}

fn read_message(row: &Row) -> Result<StoredMessage, PgError> {
    Ok(StoredMessage {
        room: row.try_get::<_, String>(0)?.into(),
        id: get_u64(row, 1)?,
        user_id: row.try_get::<_, String>(2)?.into(),
        json: row.try_get::<_, String>(3)?.into(),
        ts: get_u64(row, 4)?,
    })
}

/// A message id as stored; one past `i64::MAX` is an error for its batch.
fn id_param(id: u64) -> Result<i64, PgError> {
    i64::try_from(id).map_err(|_| PgError::Value(format!("message id {id} is out of range")))
}

/// A count or limit as an SQL integer.
fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn get_u64(row: &Row, idx: usize) -> Result<u64, PgError> {
    let v: i64 = row.try_get(idx)?;
    u64::try_from(v).map_err(|_| PgError::Value(format!("column {idx}: {v} is negative")))
}

fn get_opt_u64(row: &Row, idx: usize) -> Result<Option<u64>, PgError> {
    let v: Option<i64> = row.try_get(idx)?;
    v.map(|v| u64::try_from(v).map_err(|_| PgError::Value(format!("column {idx}: {v} is negative")))).transpose()
}
