//! The embedded SQLite store.
//!
//! # Threads and connections
//!
//! A [`SqliteStore`] owns a writer thread, a checkpointer thread and a small
//! pool of read-only connections, all on one database file in WAL mode:
//!
//! - **Writes** never touch the database on the caller's thread.
//!   [`Store::write`] sends the batch, with the sender half of its
//!   [`Commit`], over a `std::sync::mpsc` channel and returns at once.
//! - **The writer thread** owns the only read-write connection. It blocks for
//!   the first batch; if the previous commit began less than
//!   [`COMMIT_PACE`] ago, it waits out the rest of that time (so under load
//!   a group gathers for up to a millisecond instead of committing each
//!   batch on its own, which cost a WAL write of several pages and a thread
//!   wake-up per message, and an acknowledgement write per sender per
//!   commit on the runtime's side); then it drains whatever else is queued (up to
//!   [`MAX_GROUP_WRITES`](super::MAX_GROUP_WRITES) writes) and runs the whole group in *one*
//!   transaction: one commit, so one `fsync` with `synchronous = FULL`, no
//!   matter how many batches rode along (group commit). Only after `COMMIT`
//!   returns does it resolve each batch's [`Commit`], in queue order, with the
//!   [`Written`] results of its writes. Batches are applied in the order they
//!   were queued, so order across batches is preserved.
//! - If one batch fails (a duplicate message id, a value out of range), the
//!   group is rolled back and run again with a savepoint around every batch,
//!   so only the faulty batch gets its error and the others still commit. If
//!   the commit itself fails (disk full, I/O error), every batch of the group
//!   gets the error and [`Store::is_healthy`] says `false` until a later
//!   commit succeeds.
//! - **Reads** use read-only connections, each behind a `std::sync::Mutex`.
//!   In WAL mode a reader sees the last committed state and never waits for
//!   the writer, so a read issued after a [`Commit`] resolved sees its writes.
//! - **The checkpointer thread** has its own connection and copies committed
//!   pages from the WAL back into the database file (a passive checkpoint,
//!   at most every few tens of milliseconds), so that no commit pays for it
//!   (SQLite's automatic checkpoint is off). A WAL only starts over from its
//!   beginning once it is wholly checkpointed, which never quite happens
//!   while commits keep coming; so when the WAL passes 64 MiB, the
//!   checkpointer catches up and the writer checkpoints the last few pages
//!   itself, a pause of a few milliseconds (see `Writer::maybe_restart_wal`).
//!
//! Commits are durable when resolved: with `synchronous = FULL` the WAL is
//! synced at every commit; with `NORMAL` only at checkpoints, so a commit
//! survives the process being killed but maybe not a power loss.
//!
//! # Retention
//!
//! Every [`PRUNE_INTERVAL`], and between commit groups, the writer thread
//! deletes messages older than `retain_for` and those beyond the newest
//! `retain_per_room` of each room, at most [`PRUNE_CHUNK`] rows per
//! transaction (after a group, about twice the group's writes), with the
//! queued writes committed between chunks: a large prune never holds
//! commits back by more than one small chunk. The count limit is checked
//! against a per-room row count kept in the same transactions as the
//! inserts and deletes, and each chunk deletes from every room over the
//! limit in proportion to its excess, so it removes about the oldest rows
//! overall, which share pages.
//!
//! Message ids are assigned by the hub from [`Store::last_message_id`],
//! which reads a per-room high-water mark (`rooms_seq`) that pruning never
//! lowers, so ids are not reused after a prune or a restart. Bans, review
//! items and audit entries use `AUTOINCREMENT` ids, never reused either.
//!
//! # Schema
//!
//! The schema version lives in `PRAGMA user_version`. Start-up runs the
//! missing entries of [`MIGRATIONS`] in one transaction; a database with a
//! version newer than [`SCHEMA_VERSION`] is refused with
//! [`StoreError::TooNew`] before anything is written to it.
//!
//! Messages are a rowid table (insertion order) with `(room, id)` as its
//! primary key index, rather than a table clustered by room: the rows of one
//! commit then share a few pages, and the WAL written per message was about
//! half in the benchmark (`tests/store.rs`). The audit log is append-only: no code path updates or
//! deletes it, and triggers refuse both.
//!
//! # Shutdown
//!
//! [`SqliteStore::close`] (also run on drop) commits everything queued before
//! it, checkpoints and truncates the WAL and joins both threads. Writes
//! queued after that resolve with [`StoreError::Unavailable`]; reads still
//! work.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use rusqlite::ToSql;
use rusqlite::types::{ToSqlOutput, Type, Value, ValueRef};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, TransactionBehavior, params, params_from_iter};
use tokio::sync::oneshot;

use super::queue::{Job, Pending, Queue, gather, unavailable};
use super::{
    AuditEntry, AuditQuery, Ban, Commit, Committed, Json, Mute, ReviewItem, ReviewKind, ReviewStatus, RoomSettings,
    SCHEMA_VERSION, Snapshot, Store, StoreError, StoreStats, StoredMessage, Strikes, Write, Written, stored_time,
};
use crate::config::{StoreConfig, Synchronous};
use crate::protocol::now_ms;

/// Least time from the start of one commit to the start of the next. A
/// batch that arrives after a quiet spell is committed at once; under load,
/// batches gather for the rest of this time and share one commit.
pub const COMMIT_PACE: Duration = Duration::from_millis(1);

/// How often retention runs (between commit groups).
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(5);

/// Delay before the first retention pass after opening.
const FIRST_PRUNE: Duration = Duration::from_secs(1);

/// Most message rows deleted by retention in one transaction.
pub const PRUNE_CHUNK: usize = 500;

/// Least message rows deleted by retention in one transaction (while there
/// are that many to delete).
const PRUNE_CHUNK_MIN: usize = 100;

/// WAL size, in pages (64 MiB of 4 KiB pages), past which the WAL should
/// start over from its beginning; see [`Writer::maybe_restart_wal`].
const WAL_RESET_FRAMES: i64 = if cfg!(test) { 256 } else { 16_384 };

/// Pages not yet checkpointed below which the writer finishes the checkpoint
/// itself (a short pause of the commits) to start the WAL over.
const WAL_RESET_REMAINDER: i64 = if cfg!(test) { 64 } else { 256 };

/// WAL size past which the writer starts the WAL over however long the
/// pause, should the checkpointer not keep up or readers keep the WAL in
/// use: it then tries after every commit, waits for a checkpointer's pass
/// to end, and waits up to [`BUSY_TIMEOUT`] (not [`WAL_RESET_WAIT`]) for
/// readers to leave the WAL. (With a short wait and a back-off after failed
/// tries, a reader the scheduler paused inside the WAL let it grow for up
/// to a second of commits.)
const WAL_FORCE_FRAMES: i64 = 4 * WAL_RESET_FRAMES;

/// How long the writer waits for readers to leave the WAL when starting it
/// over.
const WAL_RESET_WAIT: Duration = Duration::from_millis(10);

/// Least time between two attempts of the writer to start the WAL over,
/// after one failed (a reader was using the WAL); doubled while they keep
/// failing, up to [`WAL_RESET_RETRY_MAX`].
const WAL_RESET_RETRY: Duration = Duration::from_millis(10);

/// Longest time between two attempts to start the WAL over.
const WAL_RESET_RETRY_MAX: Duration = Duration::from_secs(1);

/// Least time between two background checkpoints while the WAL is small
/// (commits in between are checkpointed together).
const CHECKPOINT_PACE: Duration = Duration::from_millis(if cfg!(test) { 2 } else { 20 });

/// Background checkpoint interval when nothing is committed.
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// Read-only connections in the pool.
const READERS: usize = 2;

/// How long a connection waits for a lock held by another process.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema migrations, oldest first: entry `n` takes the database from
/// version `n` to `n + 1`. A later schema change is one more entry (and a
/// bump of [`SCHEMA_VERSION`]).
pub const MIGRATIONS: &[&str] = &[MIGRATION_1, MIGRATION_2];

// A new SCHEMA_VERSION needs its migration, and the reverse.
const _: () = assert!(MIGRATIONS.len() == SCHEMA_VERSION as usize);

/// Version 2: staff names seen, so that their protection from look-alike
/// guest names survives a restart.
const MIGRATION_2: &str = "
CREATE TABLE staff_names (
    look TEXT NOT NULL PRIMARY KEY,
    seen_at INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Version 1: every table and the indexes the queries use.
const MIGRATION_1: &str = "
-- A rowid table: rows are stored in insertion order, so the messages of one
-- commit share a few pages; the (room, id) key is a separate, compact index.
-- (Clustered by room, every message would dirty a page of its own room and
-- split pages in the middle of the tree: about twice the WAL per message.)
CREATE TABLE messages (
    room TEXT NOT NULL,
    id INTEGER NOT NULL,
    user_id TEXT NOT NULL,
    json TEXT NOT NULL,
    ts INTEGER NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (room, id)
);
CREATE INDEX messages_by_ts ON messages (ts);

-- Per-room high-water mark of message ids (never lowered, so ids are not
-- reused after pruning) and the number of message rows (for retention).
CREATE TABLE rooms_seq (
    room TEXT NOT NULL PRIMARY KEY,
    last_id INTEGER NOT NULL,
    msg_count INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE bans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT,
    cidr TEXT,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    lifted_at INTEGER
);
CREATE INDEX bans_by_expiry ON bans (expires_at);

CREATE TABLE mutes (
    user_id TEXT NOT NULL PRIMARY KEY,
    until INTEGER NOT NULL,
    reason TEXT NOT NULL,
    actor TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE strikes (
    user_id TEXT NOT NULL PRIMARY KEY,
    points REAL NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE review_items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ('held', 'report')),
    room TEXT NOT NULL,
    message_id INTEGER,
    user_id TEXT NOT NULL,
    nick TEXT NOT NULL,
    content TEXT NOT NULL,
    reason TEXT NOT NULL,
    filter TEXT,
    reporter TEXT,
    ts INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied')),
    decided_by TEXT,
    decided_at INTEGER
);
CREATE INDEX review_items_by_status ON review_items (status, id);

CREATE TABLE room_settings (
    room TEXT NOT NULL PRIMARY KEY,
    slow_mode_secs INTEGER NOT NULL,
    locked INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
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
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
";

/// The SQLite implementation of [`Store`]; see the [module docs](self) for
/// how writes are committed.
pub struct SqliteStore {
    path: PathBuf,
    jobs: Sender<Job>,
    readers: Vec<Mutex<Connection>>,
    next_reader: AtomicUsize,
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    checkpointer: Mutex<Option<JoinHandle<()>>>,
}

/// State the writer thread shares with the handle.
#[derive(Debug)]
struct Shared {
    /// The last commit succeeded (and the writer is running).
    healthy: AtomicBool,
    /// The WAL is past [`WAL_RESET_FRAMES`]: checkpoint without pausing.
    wal_over: AtomicBool,
    /// The writer is about to finish a checkpoint: do not start one.
    reset_wanted: AtomicBool,
    /// Held while checkpointing (writer or checkpointer).
    checkpoint_turn: Mutex<()>,
    /// Closed flag, counters and the ids still queued.
    queue: Queue,
}

impl Shared {
    fn new() -> Shared {
        Shared {
            healthy: AtomicBool::new(true),
            wal_over: AtomicBool::new(false),
            reset_wanted: AtomicBool::new(false),
            checkpoint_turn: Mutex::new(()),
            queue: Queue::default(),
        }
    }
}

impl SqliteStore {
    /// Opens (creating it, and its directory, on first run) the database at
    /// `config.path`, migrates its schema and starts the writer thread.
    ///
    /// Fails with [`StoreError::TooNew`] (leaving the file untouched) when
    /// the database comes from a newer Wardroom.
    pub fn open(config: &StoreConfig) -> Result<SqliteStore, StoreError> {
        let path = config.path.clone();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| StoreError::Database(format!("cannot create {}: {e}", parent.display())))?;
        }
        let conn = open_writer(&path, config.synchronous)?;
        keep_ts_index(&conn, config.retain_for.is_some())?;
        let mut readers = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            readers.push(Mutex::new(open_reader(&path)?));
        }

        let checkpoint_conn = open_checkpointer(&path, config.synchronous)?;

        let shared = Arc::new(Shared::new());
        let checkpointer = Checkpointer { conn: checkpoint_conn, shared: Arc::clone(&shared) };
        let checkpointer = std::thread::Builder::new()
            .name("wardroom-store-checkpoint".into())
            .spawn(move || checkpointer.run())
            .map_err(|e| StoreError::Unavailable(format!("cannot start the checkpoint thread: {e}")))?;
        let (jobs, receiver) = mpsc::channel();
        let writer = Writer {
            conn,
            jobs: receiver,
            shared: Arc::clone(&shared),
            checkpointer: Some(checkpointer.thread().clone()),
            next_wal_reset: Instant::now(),
            wal_reset_backoff: Duration::ZERO,
            last_commit: Instant::now(),
            retain_per_room: config.retain_per_room,
            retain_for: config.retain_for,
            pruning: false,
            next_prune: Instant::now() + FIRST_PRUNE,
            pass_deleted: 0,
            last_group_writes: 0,
            prune_waiters: Vec::new(),
        };
        let handle =
            std::thread::Builder::new().name("wardroom-store".into()).spawn(move || writer.run()).map_err(|e| {
                shared.queue.closed.store(true, Ordering::SeqCst);
                checkpointer.thread().unpark();
                StoreError::Unavailable(format!("cannot start the writer thread: {e}"))
            })?;

        Ok(SqliteStore {
            path,
            jobs,
            readers,
            next_reader: AtomicUsize::new(0),
            shared,
            writer: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(Some(checkpointer)),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits everything queued so far, checkpoints the WAL and stops the
    /// store's threads. Later writes fail with [`StoreError::Unavailable`];
    /// reads keep working. Idempotent; also run on drop.
    pub fn close(&self) {
        if !self.shared.queue.closed.swap(true, Ordering::SeqCst) {
            let _ = self.jobs.send(Job::Shutdown);
        }
        // The checkpointer first, so that the writer's last checkpoint does
        // not wait for it.
        let checkpointer = self.checkpointer.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(checkpointer) = checkpointer {
            checkpointer.thread().unpark();
            if checkpointer.join().is_err() {
                tracing::error!("the store checkpoint thread panicked");
            }
        }
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner).take();
        if writer.is_some_and(|writer| writer.join().is_err()) {
            tracing::error!("the store writer thread panicked");
        }
    }

    /// Runs retention now instead of waiting for the next periodic pass, and
    /// returns how many messages it deleted. The pass still runs in chunks
    /// on the writer thread, between commits. Blocks: call it outside async
    /// code (or in `spawn_blocking`).
    pub fn run_retention(&self) -> Result<u64, StoreError> {
        self.shared.queue.run_retention(&self.jobs)
    }

    /// Counters of the writer thread.
    pub fn stats(&self) -> StoreStats {
        self.shared.queue.stats()
    }

    /// A read connection: a free one if any, else waits for one.
    fn reader(&self) -> MutexGuard<'_, Connection> {
        for reader in &self.readers {
            match reader.try_lock() {
                Ok(guard) => return guard,
                Err(TryLockError::Poisoned(poisoned)) => return poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        let n = self.next_reader.fetch_add(1, Ordering::Relaxed) % self.readers.len();
        self.readers[n].lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.close();
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .field("healthy", &self.shared.healthy.load(Ordering::Relaxed))
            .field("closed", &self.shared.queue.closed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Store for SqliteStore {
    fn write(&self, writes: Vec<Write>) -> Commit {
        self.shared.queue.write(&self.jobs, writes)
    }

    fn history(&self, room: &str, before: Option<u64>, limit: usize) -> Result<Vec<StoredMessage>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // Ids above i64::MAX cannot be stored, so such a bound means "latest".
        let before = before.and_then(|b| i64::try_from(b).ok()).unwrap_or(i64::MAX);
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT room, id, user_id, json, ts FROM messages
             WHERE room = ?1 AND id < ?2 AND deleted = 0 ORDER BY id DESC LIMIT ?3",
        )?;
        let mut messages =
            stmt.query_map(params![room, before, count(limit)], read_message)?.collect::<Result<Vec<_>, _>>()?;
        messages.reverse();
        Ok(messages)
    }

    fn last_message_id(&self, room: &str) -> Result<u64, StoreError> {
        let queued = self.shared.queue.queued_id(room);
        let conn = self.reader();
        let mut stmt = conn.prepare_cached("SELECT last_id FROM rooms_seq WHERE room = ?1")?;
        let id = stmt.query_row([room], |row| to_u64(row, 0)).optional()?;
        Ok(id.unwrap_or(0).max(queued))
    }

    fn snapshot(&self, now: u64) -> Result<Snapshot, StoreError> {
        let mut conn = self.reader();
        // One read transaction: the four parts are from the same commit.
        let tx = conn.transaction()?;
        let bans = query_bans(&tx, Some(now))?;
        let mutes = {
            let mut stmt = tx.prepare_cached(
                "SELECT user_id, until, reason, actor, created_at FROM mutes WHERE until > ?1 ORDER BY user_id",
            )?;
            stmt.query_map([stored_time(now)], |row| {
                Ok(Mute {
                    user_id: row.get(0)?,
                    until: to_u64(row, 1)?,
                    reason: row.get(2)?,
                    actor: row.get(3)?,
                    created_at: to_u64(row, 4)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?
        };
        let strikes = {
            let mut stmt =
                tx.prepare_cached("SELECT user_id, points, updated_at FROM strikes WHERE points > 0 ORDER BY user_id")?;
            stmt.query_map([], |row| Ok((row.get(0)?, Strikes { points: row.get(1)?, updated_at: to_u64(row, 2)? })))?
                .collect::<Result<Vec<_>, _>>()?
        };
        let rooms = {
            let mut stmt = tx.prepare_cached(
                "SELECT room, slow_mode_secs, locked FROM room_settings
                 WHERE slow_mode_secs <> 0 OR locked <> 0 ORDER BY room",
            )?;
            stmt.query_map([], |row| {
                Ok(RoomSettings { room: row.get(0)?, slow_mode_secs: row.get(1)?, locked: row.get(2)? })
            })?
            .collect::<Result<Vec<_>, _>>()?
        };
        let staff_names = {
            let mut stmt = tx.prepare_cached("SELECT look FROM staff_names ORDER BY look")?;
            stmt.query_map([], |row| row.get(0))?.collect::<Result<Vec<String>, _>>()?
        };
        tx.finish()?;
        Ok(Snapshot { bans, mutes, strikes, rooms, staff_names })
    }

    fn bans(&self, active_at: Option<u64>) -> Result<Vec<Ban>, StoreError> {
        Ok(query_bans(&self.reader(), active_at)?)
    }

    fn review_items(&self, status: Option<ReviewStatus>) -> Result<Vec<ReviewItem>, StoreError> {
        let conn = self.reader();
        let items = match status {
            Some(status) => {
                let mut stmt = conn.prepare_cached(&format!("{REVIEW_SELECT} WHERE status = ?1 ORDER BY id"))?;
                stmt.query_map([status.as_str()], read_review)?.collect::<Result<Vec<_>, _>>()?
            }
            None => {
                let mut stmt = conn.prepare_cached(&format!("{REVIEW_SELECT} ORDER BY id"))?;
                stmt.query_map([], read_review)?.collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(items)
    }

    fn review_item(&self, id: i64) -> Result<Option<ReviewItem>, StoreError> {
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&format!("{REVIEW_SELECT} WHERE id = ?1"))?;
        Ok(stmt.query_row([id], read_review).optional()?)
    }

    fn message(&self, room: &str, id: u64) -> Result<Option<StoredMessage>, StoreError> {
        let Ok(id) = i64::try_from(id) else { return Ok(None) };
        let conn = self.reader();
        let mut stmt = conn.prepare_cached(
            "SELECT room, id, user_id, json, ts FROM messages WHERE room = ?1 AND id = ?2 AND deleted = 0",
        )?;
        Ok(stmt.query_row(params![room, id], read_message).optional()?)
    }

    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError> {
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        // Only the filters in use appear in the SQL, so SQLite can pick the
        // matching index; each of the few shapes is prepared once and cached.
        let mut sql =
            String::from("SELECT id, at, actor, action, target, room, reason, rule, details FROM audit WHERE 1 = 1");
        let mut args: Vec<Value> = Vec::with_capacity(5);
        for (column, value) in [("actor", &query.actor), ("target", &query.target), ("room", &query.room)] {
            if let Some(value) = value {
                sql.push_str(&format!(" AND {column} = ?{}", args.len() + 1));
                args.push(Value::Text(value.clone()));
            }
        }
        if let Some(before) = query.before {
            sql.push_str(&format!(" AND id < ?{}", args.len() + 1));
            args.push(Value::Integer(before));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len() + 1));
        args.push(Value::Integer(count(query.limit)));

        let conn = self.reader();
        let mut stmt = conn.prepare_cached(&sql)?;
        let entries = stmt
            .query_map(params_from_iter(args), |row| {
                Ok(AuditEntry {
                    id: row.get(0)?,
                    at: to_u64(row, 1)?,
                    actor: row.get(2)?,
                    action: row.get(3)?,
                    target: row.get(4)?,
                    room: row.get(5)?,
                    reason: row.get(6)?,
                    rule: row.get(7)?,
                    details: row.get(8)?,
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(entries)
    }

    fn is_healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst) && !self.shared.queue.closed.load(Ordering::SeqCst)
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e.to_string())
    }
}

/// Opens the read-write connection, refuses a too-new schema, sets the
/// pragmas and migrates.
fn open_writer(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Check the version before anything that writes (journal_mode does).
    check_version(&conn)?;

    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Database(format!("cannot switch {} to WAL mode (got {mode})", path.display())));
    }
    conn.pragma_update(None, "synchronous", sync_pragma(synchronous))?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 16 MiB of page cache; keep a checkpointed WAL from staying huge.
    conn.pragma_update(None, "cache_size", -16_384)?;
    conn.pragma_update(None, "journal_size_limit", 128 * 1024 * 1024)?;
    // Checkpoints run on the checkpointer thread, not inside commits.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.set_prepared_statement_cache_capacity(64);

    migrate(&mut conn)?;
    Ok(conn)
}

/// Keeps the `ts` index of messages only while age retention (`retain_for`)
/// is configured: it serves nothing else, and every insert and every
/// pruned message would otherwise update it (about a third of the B-tree
/// work per message). Created when age retention is turned on (which takes
/// a while on a large database, once) and dropped when it is turned off.
fn keep_ts_index(conn: &Connection, wanted: bool) -> Result<(), StoreError> {
    let exists: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'index' AND name = 'messages_by_ts'",
        [],
        |row| row.get(0),
    )?;
    if wanted && !exists {
        tracing::info!("indexing messages by time for age retention");
        conn.execute_batch("CREATE INDEX messages_by_ts ON messages (ts)")?;
    } else if !wanted && exists {
        tracing::info!("dropping the time index of messages (no age retention)");
        conn.execute_batch("DROP INDEX messages_by_ts")?;
    }
    Ok(())
}

/// Opens the checkpointer's connection.
fn open_checkpointer(path: &Path, synchronous: Synchronous) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", sync_pragma(synchronous))?;
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

fn sync_pragma(synchronous: Synchronous) -> &'static str {
    match synchronous {
        Synchronous::Full => "FULL",
        Synchronous::Normal => "NORMAL",
    }
}

/// `PRAGMA wal_checkpoint(mode)`: whether it was blocked, pages in the WAL,
/// pages of it checkpointed. `NOOP` (SQLite 3.51+, bundled) only reports.
fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(bool, i64, i64)> {
    conn.prepare_cached(&format!("PRAGMA wal_checkpoint({mode})"))?
        .query_row([], |row| Ok((row.get::<_, i64>(0)? != 0, row.get(1)?, row.get(2)?)))
}

/// The checkpointer thread: copies committed pages from the WAL back into
/// the database file, so that commits do not.
struct Checkpointer {
    conn: Connection,
    shared: Arc<Shared>,
}

impl Checkpointer {
    fn run(self) {
        let shared = &self.shared;
        let mut warned = false;
        let mut caught_up = true;
        loop {
            // Woken by the writer after commits (or now and then anyway);
            // while the WAL is too long, one pass after another until only a
            // few pages are left for the writer.
            let hurry = shared.wal_over.load(Ordering::Relaxed) && !caught_up;
            if !hurry || shared.reset_wanted.load(Ordering::Relaxed) {
                std::thread::park_timeout(CHECKPOINT_IDLE);
            }
            if shared.queue.closed.load(Ordering::SeqCst) {
                break;
            }
            if shared.reset_wanted.load(Ordering::Relaxed) {
                // The writer finishes this one, and wakes us after it.
                continue;
            }
            let result = {
                let _turn = shared.checkpoint_turn.lock().unwrap_or_else(PoisonError::into_inner);
                checkpoint(&self.conn, "PASSIVE")
            };
            match result {
                Ok((_, frames, done)) => {
                    caught_up = done >= frames;
                    warned = false;
                }
                Err(e) => {
                    caught_up = true;
                    if !warned {
                        tracing::warn!(error = %e, "store checkpoint failed");
                        warned = true;
                    }
                }
            }
            if !shared.wal_over.load(Ordering::Relaxed) {
                std::thread::sleep(CHECKPOINT_PACE);
            }
        }
    }
}

/// Opens a read-only connection (after the writer has set up the file).
fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "cache_size", -8_192)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

/// The schema version in the database (`PRAGMA user_version`).
fn schema_version(conn: &Connection) -> Result<u32, StoreError> {
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    // user_version is a signed 32-bit header field; treat negatives as too new.
    Ok(u32::try_from(version).unwrap_or(u32::MAX))
}

fn check_version(conn: &Connection) -> Result<u32, StoreError> {
    let found = schema_version(conn)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::TooNew { found, supported: SCHEMA_VERSION });
    }
    Ok(found)
}

/// Runs the missing migrations in one transaction.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Again inside the write lock: another process may have migrated since.
    let found = check_version(&tx)?;
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql).map_err(|e| StoreError::Database(format!("migration to version {}: {e}", from + 1)))?;
    }
    tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    tx.commit()?;
    tracing::info!(from = found, to = SCHEMA_VERSION, "migrated the store schema");
    Ok(())
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    jobs: Receiver<Job>,
    shared: Arc<Shared>,
    /// Woken after commits.
    checkpointer: Option<Thread>,
    /// No attempt to start the WAL over before this.
    next_wal_reset: Instant,
    /// The wait after the last failed attempt.
    wal_reset_backoff: Duration,
    /// When the last group began to commit (see [`COMMIT_PACE`]).
    last_commit: Instant,
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
    /// Callers of [`SqliteStore::run_retention`] waiting for the pass.
    prune_waiters: Vec<oneshot::Sender<Result<u64, StoreError>>>,
}

/// Marks the store unhealthy when the writer thread ends, even by a panic.
struct UnhealthyOnExit(Arc<Shared>);

impl Drop for UnhealthyOnExit {
    fn drop(&mut self) {
        self.0.healthy.store(false, Ordering::SeqCst);
    }
}

/// Why a group did not commit.
enum GroupFailure {
    /// A write failed: retry with one savepoint per batch.
    Batch,
    /// The transaction failed as a whole.
    Commit(rusqlite::Error),
}

impl Writer {
    fn run(mut self) {
        let _guard = UnhealthyOnExit(Arc::clone(&self.shared));
        loop {
            let retention = self.retention_enabled();
            let now = Instant::now();
            let job = if retention && (self.pruning || now >= self.next_prune) {
                match self.jobs.try_recv() {
                    Ok(job) => Some(job),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else if retention {
                match self.jobs.recv_timeout(self.next_prune.saturating_duration_since(now)) {
                    Ok(job) => Some(job),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match self.jobs.recv() {
                    Ok(job) => Some(job),
                    Err(_) => break,
                }
            };
            if job.is_some_and(|job| !self.handle(job)) {
                break;
            }
            if retention && (self.pruning || Instant::now() >= self.next_prune) {
                self.prune_step();
            }
        }
        // Commit whatever was queued before the shutdown was noticed.
        while let Ok(job) = self.jobs.try_recv() {
            self.handle(job);
        }
        for waiter in self.prune_waiters.drain(..) {
            let _ = waiter.send(Err(unavailable()));
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA optimize; PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(error = %e, "store checkpoint at shutdown failed");
        }
    }

    fn retention_enabled(&self) -> bool {
        self.retain_per_room > 0 || self.retain_for.is_some()
    }

    /// Handles a job (and the group it starts); false when told to stop.
    fn handle(&mut self, first: Job) -> bool {
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Batch(pending) => {
                    // Under load, let the group gather (see COMMIT_PACE).
                    let wait = COMMIT_PACE.saturating_sub(self.last_commit.elapsed());
                    if !wait.is_zero() {
                        std::thread::sleep(wait);
                    }
                    self.last_commit = Instant::now();
                    let (group, after) = gather(pending, &self.jobs);
                    next = after;
                    self.commit_group(group);
                }
                Job::Prune(reply) => {
                    if !self.retention_enabled() {
                        let _ = reply.send(Ok(0));
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

    /// Commits a group and resolves its batches in order, then forgets the
    /// queued message ids the database now holds (or never will).
    fn commit_group(&mut self, group: Vec<Pending>) {
        let results = match self.apply_group(&group, false) {
            Err(GroupFailure::Batch) => self.apply_group(&group, true),
            other => other,
        };
        match results {
            Ok(results) => {
                self.shared.healthy.store(true, Ordering::SeqCst);
                let writes = self.shared.queue.committed(&group, &results);
                self.last_group_writes = self.last_group_writes.saturating_add(writes as usize);
                self.wake_checkpointer();
                for (pending, result) in group.into_iter().zip(results) {
                    let _ = pending.reply.send(result);
                }
            }
            Err(failure) => {
                let message = match failure {
                    // Not returned by the isolated pass; kept total anyway.
                    GroupFailure::Batch => "a write of the group failed".to_owned(),
                    GroupFailure::Commit(e) => e.to_string(),
                };
                self.shared.healthy.store(false, Ordering::SeqCst);
                self.shared.queue.failed(&group);
                tracing::error!(error = %message, batches = group.len(), "store commit failed");
                for pending in group {
                    let _ = pending.reply.send(Err(StoreError::Database(message.clone())));
                }
            }
        }
        self.maybe_restart_wal();
    }

    fn wake_checkpointer(&self) {
        if let Some(checkpointer) = &self.checkpointer {
            checkpointer.unpark();
        }
    }

    /// Keeps the WAL from growing without end. The WAL only starts over
    /// from its beginning when a transaction begins with every page of it
    /// checkpointed, which the checkpointer thread alone never achieves
    /// while commits keep coming. So, once the WAL is past
    /// [`WAL_RESET_FRAMES`], the checkpointer runs one pass after another
    /// until fewer than [`WAL_RESET_REMAINDER`] pages are left, and then
    /// the writer (after the replies went out) checkpoints those few itself,
    /// waiting at most [`WAL_RESET_WAIT`] for readers to leave the WAL — a
    /// pause of a few milliseconds — and its next transaction starts the
    /// WAL over.
    fn maybe_restart_wal(&mut self) {
        let shared = &self.shared;
        let Ok((_, frames, backfilled)) = checkpoint(&self.conn, "NOOP") else { return };
        if frames < WAL_RESET_FRAMES {
            // (Also when the WAL started over without our help.)
            shared.wal_over.store(false, Ordering::Relaxed);
            if shared.reset_wanted.swap(false, Ordering::Relaxed) {
                self.wake_checkpointer();
            }
            return;
        }
        if !shared.wal_over.swap(true, Ordering::Relaxed) {
            self.wake_checkpointer();
        }
        let remainder = frames - backfilled.max(0);
        // Once wanted, the checkpointer starts no pass: go on until done.
        // Past the force limit, no back-off and no short wait (below).
        let forced = frames >= WAL_FORCE_FRAMES;
        if !shared.reset_wanted.load(Ordering::Relaxed) {
            if !forced && (remainder > WAL_RESET_REMAINDER || Instant::now() < self.next_wal_reset) {
                return;
            }
            shared.reset_wanted.store(true, Ordering::Relaxed);
        }
        let turn = match shared.checkpoint_turn.try_lock() {
            Ok(turn) => turn,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            // Forced: wait for the checkpointer's pass to end.
            Err(TryLockError::WouldBlock) if forced => crate::lock(&shared.checkpoint_turn),
            // The checkpointer is in a pass; it starts no other, so next time.
            Err(TryLockError::WouldBlock) => return,
        };
        // RESTART also waits for readers still on the WAL, so that the next
        // transaction can start it over; but only briefly (a slow reader
        // means another try later, not stalled commits), unless forced.
        let wait = if forced { BUSY_TIMEOUT } else { WAL_RESET_WAIT };
        let result = self.conn.busy_timeout(wait).and_then(|()| checkpoint(&self.conn, "RESTART"));
        if let Err(e) = self.conn.busy_timeout(BUSY_TIMEOUT) {
            tracing::warn!(error = %e, "cannot restore the store's busy timeout");
        }
        drop(turn);
        shared.reset_wanted.store(false, Ordering::Relaxed);
        self.wake_checkpointer();
        let failed = match result {
            Ok((false, frames, done)) => done != frames,
            // A reader still uses the WAL.
            Ok((true, _, _)) => true,
            Err(e) => {
                tracing::warn!(error = %e, "store checkpoint failed");
                true
            }
        };
        if failed {
            // Try again later, backing off while it keeps failing.
            self.wal_reset_backoff = (self.wal_reset_backoff * 2).clamp(WAL_RESET_RETRY, WAL_RESET_RETRY_MAX);
            self.next_wal_reset = Instant::now() + self.wal_reset_backoff;
        } else {
            shared.wal_over.store(false, Ordering::Relaxed);
            self.wal_reset_backoff = Duration::ZERO;
        }
    }

    /// Runs every batch of the group in one transaction. With `isolated`,
    /// each batch gets a savepoint and a failing one is rolled back alone.
    fn apply_group(&mut self, group: &[Pending], isolated: bool) -> Result<Vec<Committed>, GroupFailure> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(GroupFailure::Commit)?;
        let mut results = Vec::with_capacity(group.len());
        // Per room: highest message id and number of messages inserted.
        let mut rooms: HashMap<&str, (i64, i64)> = HashMap::new();
        for pending in group {
            let result = if isolated {
                tx.execute_batch("SAVEPOINT batch").map_err(GroupFailure::Commit)?;
                match apply_batch(&tx, &pending.writes) {
                    Ok(written) => {
                        tx.execute_batch("RELEASE batch").map_err(GroupFailure::Commit)?;
                        Ok(written)
                    }
                    Err(e) => {
                        tx.execute_batch("ROLLBACK TO batch; RELEASE batch").map_err(GroupFailure::Commit)?;
                        Err(StoreError::Database(e.to_string()))
                    }
                }
            } else {
                match apply_batch(&tx, &pending.writes) {
                    Ok(written) => Ok(written),
                    // Dropping the transaction rolls it back.
                    Err(_) => return Err(GroupFailure::Batch),
                }
            };
            if result.is_ok() {
                for write in &pending.writes {
                    if let Write::Message(m) = write {
                        // In range: apply_batch inserted it.
                        let id = i64::try_from(m.id).unwrap_or(i64::MAX);
                        let entry = rooms.entry(&*m.room).or_insert((id, 0));
                        entry.0 = entry.0.max(id);
                        entry.1 += 1;
                    }
                }
            }
            results.push(result);
        }
        if !rooms.is_empty() {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT INTO rooms_seq (room, last_id, msg_count) VALUES (?1, ?2, ?3)
                     ON CONFLICT (room) DO UPDATE SET last_id = max(last_id, excluded.last_id),
                     msg_count = msg_count + excluded.msg_count",
                )
                .map_err(GroupFailure::Commit)?;
            for (room, (last_id, added)) in rooms {
                stmt.execute(params![room, last_id, added]).map_err(GroupFailure::Commit)?;
            }
        }
        tx.commit().map_err(GroupFailure::Commit)?;
        Ok(results)
    }

    /// One chunk of retention, bookkeeping for the pass it belongs to.
    fn prune_step(&mut self) {
        if !self.pruning {
            self.pruning = true;
            self.pass_deleted = 0;
        }
        // Right after a group, as much as twice its writes (enough to keep up
        // with them, and a pause of the order of its own commit); otherwise,
        // nothing is queued and a full chunk.
        let budget = match std::mem::take(&mut self.last_group_writes) {
            0 => PRUNE_CHUNK,
            writes => writes.saturating_mul(2).clamp(PRUNE_CHUNK_MIN, PRUNE_CHUNK),
        };
        let result = self.prune_chunk(now_ms(), budget);
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
                Err(StoreError::from(e))
            }
        };
        self.pruning = false;
        self.next_prune = Instant::now() + PRUNE_INTERVAL;
        for waiter in self.prune_waiters.drain(..) {
            let _ = waiter.send(match &outcome {
                Ok(n) => Ok(*n),
                Err(e) => Err(StoreError::Database(e.to_string())),
            });
        }
    }

    /// Deletes up to [`PRUNE_CHUNK`] expired messages in one transaction;
    /// returns how many, and whether there may be more.
    fn prune_chunk(&mut self, now_ms: u64, budget: usize) -> rusqlite::Result<(u64, bool)> {
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut budget = budget;
        let mut deleted = 0u64;

        if let Some(age) = self.retain_for {
            let age = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            let cutoff = stored_time(now_ms.saturating_sub(age));
            let mut per_room: HashMap<String, i64> = HashMap::new();
            {
                let mut stmt = tx.prepare_cached(
                    "DELETE FROM messages WHERE rowid IN
                     (SELECT rowid FROM messages WHERE ts < ?1 ORDER BY ts LIMIT ?2)
                     RETURNING room",
                )?;
                let mut rows = stmt.query(params![cutoff, count(budget)])?;
                while let Some(row) = rows.next()? {
                    *per_room.entry(row.get(0)?).or_default() += 1;
                    deleted += 1;
                    budget = budget.saturating_sub(1);
                }
            }
            let mut stmt =
                tx.prepare_cached("UPDATE rooms_seq SET msg_count = max(msg_count - ?2, 0) WHERE room = ?1")?;
            for (room, n) in per_room {
                stmt.execute(params![room, n])?;
            }
        }

        let mut more = budget == 0;
        if self.retain_per_room > 0 && budget > 0 {
            let keep = count_u64(self.retain_per_room);
            let over: Vec<(String, i64)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT room, msg_count - ?1 FROM rooms_seq WHERE msg_count > ?1 ORDER BY msg_count DESC LIMIT ?2",
                )?;
                stmt.query_map(params![keep, count(budget)], |row| Ok((row.get(0)?, row.get(1)?)))?
                    .collect::<Result<_, _>>()?
            };
            // The budget is shared in proportion to each room's excess, so
            // that a chunk deletes about the oldest rows of all those rooms
            // together: a page of the table holds rows of many rooms, and is
            // then rewritten once rather than once per room.
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
                let removed = tx
                    .prepare_cached(
                        "DELETE FROM messages WHERE room = ?1 AND id IN
                         (SELECT id FROM messages WHERE room = ?1 ORDER BY id LIMIT ?2)",
                    )?
                    .execute(params![room, n])?;
                let removed_i64 = i64::try_from(removed).unwrap_or(i64::MAX);
                if removed_i64 < n {
                    // The count had drifted: recount from the rows.
                    tx.prepare_cached(
                        "UPDATE rooms_seq SET msg_count = (SELECT count(*) FROM messages WHERE room = ?1)
                         WHERE room = ?1",
                    )?
                    .execute([&room])?;
                } else {
                    tx.prepare_cached("UPDATE rooms_seq SET msg_count = msg_count - ?2 WHERE room = ?1")?
                        .execute(params![room, removed_i64])?;
                }
                deleted += removed as u64;
                budget = budget.saturating_sub(removed.max(1));
            }
        }
        tx.commit()?;
        // Nothing deleted means nothing to delete (or counts to fix, done).
        Ok((deleted, more && deleted > 0))
    }
}

/// Applies one batch; the results are in the order of the writes.
fn apply_batch(conn: &Connection, writes: &[Write]) -> rusqlite::Result<Vec<Written>> {
    let mut out = Vec::with_capacity(writes.len());
    for write in writes {
        let written = match write {
            Write::Message(m) => {
                conn.prepare_cached("INSERT INTO messages (room, id, user_id, json, ts) VALUES (?1, ?2, ?3, ?4, ?5)")?
                    .execute(params![m.room, id_param(m.id)?, m.user_id, m.json, stored_time(m.ts)])?;
                Written::Done
            }
            Write::DeleteMessage { room, id } => {
                // An id that cannot be stored cannot be deleted either.
                if let Ok(id) = i64::try_from(*id) {
                    conn.prepare_cached("UPDATE messages SET deleted = 1 WHERE room = ?1 AND id = ?2")?
                        .execute(params![room, id])?;
                }
                Written::Done
            }
            Write::Ban(ban) => {
                conn.prepare_cached(
                    "INSERT INTO bans (user_id, cidr, reason, actor, created_at, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    ban.user_id,
                    ban.cidr,
                    ban.reason,
                    ban.actor,
                    stored_time(ban.created_at),
                    ban.expires_at.map(stored_time)
                ])?;
                Written::Id(conn.last_insert_rowid())
            }
            Write::LiftBan { id, at } => {
                // The ban now ends at `at` (if it would have ended later).
                conn.prepare_cached(
                    "UPDATE bans SET lifted_at = ?2,
                     expires_at = CASE WHEN expires_at IS NULL OR expires_at > ?2 THEN ?2 ELSE expires_at END
                     WHERE id = ?1 AND lifted_at IS NULL",
                )?
                .execute(params![id, stored_time(*at)])?;
                Written::Done
            }
            Write::Mute(mute) => {
                conn.prepare_cached(
                    "INSERT INTO mutes (user_id, until, reason, actor, created_at) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (user_id) DO UPDATE SET until = excluded.until, reason = excluded.reason,
                     actor = excluded.actor, created_at = excluded.created_at",
                )?
                .execute(params![
                    mute.user_id,
                    stored_time(mute.until),
                    mute.reason,
                    mute.actor,
                    stored_time(mute.created_at)
                ])?;
                Written::Done
            }
            Write::Unmute { user_id } => {
                conn.prepare_cached("DELETE FROM mutes WHERE user_id = ?1")?.execute([user_id])?;
                Written::Done
            }
            Write::Strikes { user_id, strikes } => {
                // Zero, negative or NaN points clear them (SQLite would store NaN as NULL).
                if strikes.points > 0.0 {
                    conn.prepare_cached(
                        "INSERT INTO strikes (user_id, points, updated_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT (user_id) DO UPDATE SET points = excluded.points, updated_at = excluded.updated_at",
                    )?
                    .execute(params![user_id, strikes.points, stored_time(strikes.updated_at)])?;
                } else {
                    conn.prepare_cached("DELETE FROM strikes WHERE user_id = ?1")?.execute([user_id])?;
                }
                Written::Done
            }
            Write::Review(item) => {
                conn.prepare_cached(
                    "INSERT INTO review_items (kind, room, message_id, user_id, nick, content, reason, filter,
                     reporter, ts, created_at, status, decided_by, decided_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )?
                .execute(params![
                    item.kind.as_str(),
                    item.room,
                    item.message_id.map(id_param).transpose()?,
                    item.user_id,
                    item.nick,
                    item.content,
                    item.reason,
                    item.filter,
                    item.reporter,
                    stored_time(item.ts),
                    stored_time(item.created_at),
                    item.status.as_str(),
                    item.decided_by,
                    item.decided_at.map(stored_time),
                ])?;
                Written::Id(conn.last_insert_rowid())
            }
            Write::Decide { id, status, by, at } => {
                conn.prepare_cached(
                    "UPDATE review_items SET status = ?2, decided_by = ?3, decided_at = ?4 WHERE id = ?1",
                )?
                .execute(params![id, status.as_str(), by, stored_time(*at)])?;
                Written::Done
            }
            Write::StaffName { looks, at } => {
                let mut stmt = conn.prepare_cached(
                    "INSERT INTO staff_names (look, seen_at) VALUES (?1, ?2)
                     ON CONFLICT (look) DO UPDATE SET seen_at = excluded.seen_at",
                )?;
                for look in looks {
                    stmt.execute(params![look, stored_time(*at)])?;
                }
                Written::Done
            }
            Write::RoomSettings(settings) => {
                conn.prepare_cached(
                    "INSERT INTO room_settings (room, slow_mode_secs, locked) VALUES (?1, ?2, ?3)
                     ON CONFLICT (room) DO UPDATE SET slow_mode_secs = excluded.slow_mode_secs,
                     locked = excluded.locked",
                )?
                .execute(params![settings.room, settings.slow_mode_secs, settings.locked])?;
                Written::Done
            }
            Write::Audit(entry) => {
                conn.prepare_cached(
                    "INSERT INTO audit (at, actor, action, target, room, reason, rule, details)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                )?
                .execute(params![
                    stored_time(entry.at),
                    entry.actor,
                    entry.action,
                    entry.target,
                    entry.room,
                    entry.reason,
                    entry.rule,
                    entry.details
                ])?;
                Written::Id(conn.last_insert_rowid())
            }
        };
        out.push(written);
    }
    Ok(out)
}

fn query_bans(conn: &Connection, active_at: Option<u64>) -> rusqlite::Result<Vec<Ban>> {
    const SELECT: &str = "SELECT id, user_id, cidr, reason, actor, created_at, expires_at FROM bans";
    let read = |row: &Row<'_>| {
        Ok(Ban {
            id: row.get(0)?,
            user_id: row.get(1)?,
            cidr: row.get(2)?,
            reason: row.get(3)?,
            actor: row.get(4)?,
            created_at: to_u64(row, 5)?,
            expires_at: to_opt_u64(row, 6)?,
        })
    };
    match active_at {
        // A lifted ban's expires_at was moved to when it was lifted.
        Some(at) => conn
            .prepare_cached(&format!("{SELECT} WHERE expires_at IS NULL OR expires_at > ?1 ORDER BY id DESC"))?
            .query_map([stored_time(at)], read)?
            .collect(),
        None => conn.prepare_cached(&format!("{SELECT} ORDER BY id DESC"))?.query_map([], read)?.collect(),
    }
}

const REVIEW_SELECT: &str = "SELECT id, kind, room, message_id, user_id, nick, content, reason, filter, reporter,
     ts, created_at, status, decided_by, decided_at FROM review_items";

fn read_review(row: &Row<'_>) -> rusqlite::Result<ReviewItem> {
    let kind: String = row.get(1)?;
    let status: String = row.get(12)?;
    Ok(ReviewItem {
        id: row.get(0)?,
        kind: match ReviewKind::parse(&kind) {
            Some(kind) => kind,
            None => return Err(bad_value(1, Type::Text, format!("unknown review kind {kind:?}"))),
        },
        room: row.get(2)?,
        message_id: to_opt_u64(row, 3)?,
        user_id: row.get(4)?,
        nick: row.get(5)?,
        content: row.get(6)?,
        reason: row.get(7)?,
        filter: row.get(8)?,
        reporter: row.get(9)?,
        ts: to_u64(row, 10)?,
        created_at: to_u64(row, 11)?,
        status: match ReviewStatus::parse(&status) {
            Some(status) => status,
            None => return Err(bad_value(12, Type::Text, format!("unknown review status {status:?}"))),
        },
        decided_by: row.get(13)?,
        decided_at: to_opt_u64(row, 14)?,
    })
}

fn read_message(row: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        room: row.get::<_, String>(0)?.into(),
        id: to_u64(row, 1)?,
        user_id: row.get::<_, String>(2)?.into(),
        json: row.get::<_, String>(3)?.into(),
        ts: to_u64(row, 4)?,
    })
}

impl ToSql for Json {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(ValueRef::Text(self.as_bytes())))
    }
}

/// A message id as stored; one past `i64::MAX` is an error for its batch.
fn id_param(id: u64) -> rusqlite::Result<i64> {
    i64::try_from(id).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// A count or limit as an SQL integer.
fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn count_u64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<u64> {
    let v: i64 = row.get(idx)?;
    u64::try_from(v).map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Integer, Box::new(e)))
}

fn to_opt_u64(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<u64>> {
    let v: Option<i64> = row.get(idx)?;
    v.map(|v| u64::try_from(v).map_err(|e| rusqlite::Error::FromSqlConversionFailure(idx, Type::Integer, Box::new(e))))
        .transpose()
}

fn bad_value(idx: usize, ty: Type, message: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(idx, ty, message.into())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            static COUNTER: AtomicU64 = AtomicU64::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let dir =
                std::env::temp_dir().join(format!("wardroom-store-{name}-{}-{n}-{}", std::process::id(), now_ms()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }

        /// A database path in a subdirectory that does not exist yet.
        fn db(&self) -> PathBuf {
            self.0.join("data").join("wardroom.db")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn config(path: PathBuf) -> StoreConfig {
        let mut config = StoreConfig { path, ..StoreConfig::default() };
        config.synchronous = Synchronous::Normal;
        config.retain_per_room = 0;
        config.retain_for = None;
        config
    }

    fn msg(room: &str, id: u64, ts: u64) -> StoredMessage {
        StoredMessage {
            room: room.into(),
            id,
            user_id: format!("u{}", id % 7).into(),
            json: format!(r#"{{"type":"message","room":"{room}","id":{id},"text":"hello {id}"}}"#).into(),
            ts,
        }
    }

    fn commit(store: &SqliteStore, writes: Vec<Write>) -> Vec<Written> {
        store.write(writes).wait_blocking().expect("commit")
    }

    fn audit(actor: &str, action: &str, target: Option<&str>, room: Option<&str>) -> AuditEntry {
        AuditEntry {
            id: 0,
            at: 5_000,
            actor: actor.into(),
            action: action.into(),
            target: target.map(Into::into),
            room: room.map(Into::into),
            reason: "because".into(),
            rule: None,
            details: Some(r#"{"secs":60}"#.into()),
        }
    }

    #[test]
    fn creates_file_and_directory_in_wal_mode() {
        let dir = TempDir::new("create");
        let store = SqliteStore::open(&config(dir.db())).expect("open");
        assert!(dir.db().exists());
        assert!(store.is_healthy());
        let conn = store.reader();
        let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).expect("pragma");
        assert_eq!(mode, "wal");
        assert_eq!(schema_version(&conn).expect("version"), SCHEMA_VERSION);
    }

    #[test]
    fn the_time_index_exists_only_with_age_retention() {
        let dir = TempDir::new("ts-index");
        let has_index = |store: &SqliteStore| -> bool {
            store
                .reader()
                .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'messages_by_ts'", [], |r| {
                    r.get::<_, i64>(0)
                })
                .expect("query")
                == 1
        };
        let store = SqliteStore::open(&config(dir.db())).expect("open");
        assert!(!has_index(&store), "no age retention, no index");
        drop(store);
        let aged = StoreConfig { retain_for: Some(Duration::from_secs(3600)), ..config(dir.db()) };
        let store = SqliteStore::open(&aged).expect("reopen with age retention");
        assert!(has_index(&store));
        drop(store);
        let store = SqliteStore::open(&config(dir.db())).expect("reopen without");
        assert!(!has_index(&store));
    }

    #[test]
    fn audit_is_append_only_in_the_database() {
        let dir = TempDir::new("append-only");
        let path = dir.db();
        {
            let store = SqliteStore::open(&config(path.clone())).expect("open");
            commit(&store, vec![Write::Audit(audit("mod1", "ban", None, None))]);
        }
        let conn = Connection::open(&path).expect("open");
        assert!(conn.execute("UPDATE audit SET actor = 'x'", []).is_err());
        assert!(conn.execute("DELETE FROM audit", []).is_err());
    }

    fn too_new_is_refused(journal_mode: &str) {
        let dir = TempDir::new("too-new");
        let path = dir.db();
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        {
            let conn = Connection::open(&path).expect("create");
            let _: String =
                conn.pragma_update_and_check(None, "journal_mode", journal_mode, |r| r.get(0)).expect("mode");
            conn.execute_batch(&format!(
                "CREATE TABLE future (x TEXT); INSERT INTO future VALUES ('keep me');
                 PRAGMA user_version = {};",
                SCHEMA_VERSION + 1
            ))
            .expect("future schema");
        }
        let before = std::fs::read(&path).expect("read");
        match SqliteStore::open(&config(path.clone())) {
            Err(StoreError::TooNew { found, supported }) => {
                assert_eq!((found, supported), (SCHEMA_VERSION + 1, SCHEMA_VERSION));
            }
            other => panic!("expected TooNew, got {other:?}"),
        }
        assert_eq!(std::fs::read(&path).expect("read"), before, "the database was modified");
        let conn = Connection::open(&path).expect("open");
        let tables: i64 = conn
            .query_row("SELECT count(*) FROM sqlite_schema WHERE type = 'table'", [], |r| r.get(0))
            .expect("tables");
        assert_eq!(tables, 1, "no tables were added");
        let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0)).expect("mode");
        assert_eq!(mode.to_lowercase(), journal_mode.to_lowercase());
    }

    #[test]
    fn newer_schema_is_refused_and_left_unchanged() {
        too_new_is_refused("DELETE");
        too_new_is_refused("WAL");
    }

    /// A database of every earlier schema version is migrated at start-up,
    /// keeping what it holds.
    #[test]
    fn older_schemas_are_migrated_and_keep_their_data() {
        for version in 1..SCHEMA_VERSION {
            let dir = TempDir::new("old-schema");
            let path = dir.db();
            std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
            {
                let conn = Connection::open(&path).expect("create");
                for sql in &MIGRATIONS[..version as usize] {
                    conn.execute_batch(sql).expect("old schema");
                }
                conn.execute_batch(&format!(
                    "INSERT INTO bans (user_id, reason, actor, created_at) VALUES ('u1', 'spam', 'm', 1);
                     PRAGMA user_version = {version};"
                ))
                .expect("old data");
            }
            let store = SqliteStore::open(&config(path.clone())).expect("migrated");
            let snapshot = store.snapshot(2).expect("snapshot");
            assert_eq!(snapshot.bans.iter().map(|b| b.user_id.as_deref()).collect::<Vec<_>>(), [Some("u1")]);
            assert_eq!(commit(&store, vec![Write::StaffName { looks: vec!["rnara".into()], at: 2 }]), [Written::Done]);
            assert_eq!(store.snapshot(2).expect("snapshot").staff_names, ["rnara"]);
            store.close();
            let conn = Connection::open(&path).expect("open");
            let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).expect("version");
            assert_eq!(found, i64::from(SCHEMA_VERSION), "from version {version}");
        }
    }

    #[test]
    fn bad_files_are_errors_not_panics() {
        let dir = TempDir::new("bad");
        // A directory where the file should be.
        std::fs::create_dir_all(dir.db()).expect("dir");
        assert!(matches!(SqliteStore::open(&config(dir.db())), Err(StoreError::Database(_))));
        // Not a database.
        let garbage = dir.0.join("garbage.db");
        std::fs::write(&garbage, vec![0x5a; 8192]).expect("write");
        assert!(matches!(SqliteStore::open(&config(garbage)), Err(StoreError::Database(_))));
    }

    /// A writer on its own (no thread), to drive groups by hand.
    fn bare_writer(path: &Path) -> (Writer, Sender<Job>) {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
        let (jobs, receiver) = mpsc::channel();
        let writer = Writer {
            conn: open_writer(path, Synchronous::Normal).expect("open"),
            jobs: receiver,
            shared: Arc::new(Shared::new()),
            checkpointer: None,
            next_wal_reset: Instant::now(),
            wal_reset_backoff: Duration::ZERO,
            last_commit: Instant::now(),
            retain_per_room: 0,
            retain_for: None,
            pruning: false,
            next_prune: Instant::now(),
            pass_deleted: 0,
            last_group_writes: 0,
            prune_waiters: Vec::new(),
        };
        (writer, jobs)
    }

    fn pending(writes: Vec<Write>) -> (Pending, Commit) {
        Pending::new(writes)
    }

    #[test]
    fn one_group_with_a_bad_batch_commits_the_others() {
        let dir = TempDir::new("group");
        let (mut writer, _jobs) = bare_writer(&dir.db());
        let (a, a_commit) = pending(vec![Write::Message(msg("a", 1, 1)), Write::Audit(audit("m", "a", None, None))]);
        let (b, b_commit) = pending(vec![Write::Audit(audit("m", "b", None, None)), Write::Message(msg("a", 1, 1))]);
        let (c, c_commit) = pending(vec![Write::Message(msg("a", 2, 2)), Write::Audit(audit("m", "c", None, None))]);
        writer.commit_group(vec![a, b, c]);
        assert_eq!(a_commit.wait_blocking().expect("a"), vec![Written::Done, Written::Id(1)]);
        assert!(matches!(b_commit.wait_blocking(), Err(StoreError::Database(_))));
        assert_eq!(c_commit.wait_blocking().expect("c"), vec![Written::Done, Written::Id(2)]);
        assert!(writer.shared.healthy.load(Ordering::SeqCst));
        let seq: (i64, i64) = writer
            .conn
            .query_row("SELECT last_id, msg_count FROM rooms_seq WHERE room = 'a'", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("seq");
        assert_eq!(seq, (2, 2), "the failed batch's message is not counted");
    }

    #[test]
    fn a_failed_commit_fails_the_group_and_marks_unhealthy_until_the_next() {
        let dir = TempDir::new("unhealthy");
        let (mut writer, _jobs) = bare_writer(&dir.db());
        writer.conn.busy_timeout(Duration::from_millis(20)).expect("timeout");
        // Another connection holds the write lock, so the group cannot begin.
        let mut other = Connection::open(dir.db()).expect("other");
        let lock = other.transaction_with_behavior(TransactionBehavior::Immediate).expect("lock");
        let (a, a_commit) = pending(vec![Write::Message(msg("a", 1, 1))]);
        let (b, b_commit) = pending(vec![Write::Audit(audit("m", "b", None, None))]);
        writer.commit_group(vec![a, b]);
        assert!(matches!(a_commit.wait_blocking(), Err(StoreError::Database(_))));
        assert!(matches!(b_commit.wait_blocking(), Err(StoreError::Database(_))));
        assert!(!writer.shared.healthy.load(Ordering::SeqCst));
        drop(lock);
        let (c, c_commit) = pending(vec![Write::Message(msg("a", 1, 1))]);
        writer.commit_group(vec![c]);
        assert_eq!(c_commit.wait_blocking().expect("c"), vec![Written::Done]);
        assert!(writer.shared.healthy.load(Ordering::SeqCst));
    }

    #[test]
    fn the_wal_starts_over_under_continuous_writes() {
        let dir = TempDir::new("wal");
        let store = Arc::new(SqliteStore::open(&config(dir.db())).expect("open"));
        let reading = Arc::new(AtomicBool::new(true));
        let reader = {
            let (store, reading) = (Arc::clone(&store), Arc::clone(&reading));
            std::thread::spawn(move || {
                while reading.load(Ordering::Relaxed) {
                    let page = store.history("room3", None, 50).expect("history");
                    assert!(page.windows(2).all(|w| w[0].id < w[1].id));
                }
            })
        };
        let rooms = 40;
        let rounds = 300;
        for round in 0..rounds {
            let writes = (0..rooms).map(|r| Write::Message(msg(&format!("room{r}"), round + 1, round))).collect();
            commit(&store, writes);
        }
        reading.store(false, Ordering::Relaxed);
        reader.join().expect("reader");
        // Each commit dirtied a page per room, 12,000 pages in all, but the
        // WAL kept starting over. (Past the force limit only while a reader
        // the scheduler paused kept a reset from completing.)
        let wal = std::fs::metadata(dir.db().with_extension("db-wal")).expect("wal").len();
        let limit = 2 * WAL_FORCE_FRAMES as u64 * (4096 + 24) + 32;
        assert!(wal <= limit, "the WAL grew to {wal} bytes, more than {limit}");
        for r in 0..rooms {
            let room = format!("room{r}");
            assert_eq!(store.history(&room, None, usize::MAX).expect("history").len() as u64, rounds);
            assert_eq!(store.last_message_id(&room).expect("last"), rounds);
        }
        store.close();
        let conn = Connection::open(dir.db()).expect("open");
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("check");
        assert_eq!(check, "ok");
    }
}
