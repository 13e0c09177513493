//! Durable state behind a [`Store`] trait: message history, bans, mutes,
//! strikes, the review queue (held messages and reports), room settings and
//! the audit log.
//!
//! Writes are queued and committed in batches (group commit): a [`Commit`]
//! resolves once its writes are durable, and that is when the server sends
//! an `ack`. The hub never waits on a commit while holding a lock, and keeps
//! what it checks on every message (bans, mutes, recent history) in memory,
//! loading it from the store at start-up.
//!
//! [`sqlite`] is the embedded default; [`postgres`] (`[store] url`) is the
//! same behind the same trait, for several nodes sharing one database.
//! [`open`] picks the one the config names.

pub mod postgres;
mod queue;
pub mod sqlite;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::oneshot;

/// Schema version this build writes; a database from a newer version is
/// refused rather than touched.
pub const SCHEMA_VERSION: u32 = 2;

pub use queue::{MAX_GROUP_WRITES, StoreStats};

/// Opens the store `[store]` selects: PostgreSQL when `url` is set, else
/// the SQLite file at `path`.
pub fn open(config: &crate::config::StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config.url {
        Some(_) => Arc::new(self::postgres::PostgresStore::open(config)?),
        None => Arc::new(sqlite::SqliteStore::open(config)?),
    })
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database was written by a newer Wardroom.
    #[error(
        "the database has schema version {found}, newer than this build's {supported}; upgrade Wardroom or use another database"
    )]
    TooNew {
        /// Version in the database.
        found: u32,
        /// Newest version this build knows.
        supported: u32,
    },
    /// The store is shut down or its writer died.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The database reported an error.
    #[error("database error: {0}")]
    Database(String),
}

/// A chat message as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Room name.
    pub room: Arc<str>,
    /// Per-room id.
    pub id: u64,
    /// Sender's user id.
    pub user_id: Arc<str>,
    /// The `message` frame's JSON, exactly as delivered.
    pub json: Json,
    /// Acceptance time, ms since the Unix epoch.
    pub ts: u64,
}

/// JSON text (a delivered frame's payload), shared with the frame rather
/// than copied.
#[derive(Clone, PartialEq, Eq)]
pub struct Json(Bytes);

impl Json {
    /// The payload of `frame`, an encoded text frame, shared with it.
    pub fn of_frame(frame: &Bytes) -> Self {
        Json(frame.slice(frame.len() - crate::ws::payload_of(frame).len()..))
    }

    /// The text.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The text as a `str` (checked: it was built from a `str` or from a
    /// frame the server encoded from `str`s).
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl From<String> for Json {
    fn from(text: String) -> Self {
        Json(Bytes::from(text))
    }
}

impl fmt::Debug for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(&self.0), f)
    }
}

/// A ban: by user id, by address range, or both (a guest banned by id is
/// also banned by the address it used, so another nickname does not help).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ban {
    /// Store-assigned id (0 until stored).
    pub id: i64,
    /// The banned user, if banned by id.
    pub user_id: Option<String>,
    /// The banned address or network (`203.0.113.7/32`), for guests.
    pub cidr: Option<String>,
    /// Why.
    pub reason: String,
    /// Who banned (user id, or `filter:<id>` / `ladder` for automatic bans).
    pub actor: String,
    /// When, ms since the Unix epoch.
    pub created_at: u64,
    /// When it ends; `None` for a permanent ban.
    pub expires_at: Option<u64>,
}

/// A mute: the user may read but not send until `until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mute {
    /// The muted user.
    pub user_id: String,
    /// When it ends, ms since the Unix epoch.
    pub until: u64,
    /// Why.
    pub reason: String,
    /// Who muted.
    pub actor: String,
    /// When, ms since the Unix epoch.
    pub created_at: u64,
}

/// A user's strikes: `points` as of `updated_at`, decaying over time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Strikes {
    /// Points at `updated_at`.
    pub points: f64,
    /// ms since the Unix epoch.
    pub updated_at: u64,
}

/// What a review item is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewKind {
    /// A message a filter held.
    Held,
    /// A message a member reported.
    Report,
}

impl ReviewKind {
    /// The name stored in the database and sent to clients.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewKind::Held => "held",
            ReviewKind::Report => "report",
        }
    }

    /// The kind named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        [ReviewKind::Held, ReviewKind::Report].into_iter().find(|k| k.as_str() == name)
    }
}

/// Where a review item stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReviewStatus {
    /// Waiting for a moderator.
    Pending,
    /// Approved: a held message was delivered; a report was upheld.
    Approved,
    /// Denied: a held message was dropped; a report was dismissed.
    Denied,
}

impl ReviewStatus {
    /// The name stored in the database and sent to clients.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewStatus::Pending => "pending",
            ReviewStatus::Approved => "approved",
            ReviewStatus::Denied => "denied",
        }
    }

    /// The status named `name`, if any.
    pub fn parse(name: &str) -> Option<Self> {
        [ReviewStatus::Pending, ReviewStatus::Approved, ReviewStatus::Denied].into_iter().find(|s| s.as_str() == name)
    }
}

/// A time (ms since the epoch) as both databases store it: past `i64::MAX`
/// it saturates, which only moves "practically never" to "never".
pub(crate) fn stored_time(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// An item of the review queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReviewItem {
    /// Store-assigned id (0 until stored).
    pub id: i64,
    /// Held message or report.
    pub kind: ReviewKind,
    /// Room of the message.
    pub room: String,
    /// For reports: the reported message's id.
    pub message_id: Option<u64>,
    /// Author of the message.
    pub user_id: String,
    /// Author's nickname at the time.
    pub nick: String,
    /// The message text.
    pub content: String,
    /// Why it is here (the filter's reason, or the reporter's).
    pub reason: String,
    /// The filter that held it, for held messages.
    pub filter: Option<String>,
    /// Who reported it, for reports.
    pub reporter: Option<String>,
    /// When the message was sent, ms since the Unix epoch.
    pub ts: u64,
    /// When the item was created.
    pub created_at: u64,
    /// Where it stands.
    pub status: ReviewStatus,
    /// Who decided.
    pub decided_by: Option<String>,
    /// When.
    pub decided_at: Option<u64>,
}

/// A room's moderation settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RoomSettings {
    /// Room name.
    pub room: String,
    /// Slow mode set by a moderator, in seconds (0: off).
    pub slow_mode_secs: u32,
    /// Locked: read-only for members.
    pub locked: bool,
}

/// One entry of the append-only audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    /// Store-assigned id (0 until stored), increasing.
    pub id: i64,
    /// ms since the Unix epoch.
    pub at: u64,
    /// Who acted: a user id, or `filter:<id>` / `ladder` for automatic actions.
    pub actor: String,
    /// What was done: `ban`, `mute`, `kick`, `delete`, `forbidden`, …
    pub action: String,
    /// Whom or what it was done to (user id, address, review item).
    pub target: Option<String>,
    /// Where.
    pub room: Option<String>,
    /// Why.
    pub reason: String,
    /// The filter or ladder rule that caused it, for automatic actions.
    pub rule: Option<String>,
    /// Anything else, as JSON (duration, message id, …).
    pub details: Option<String>,
}

/// Filters for reading the audit log, newest first.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// Only this actor.
    pub actor: Option<String>,
    /// Only this target.
    pub target: Option<String>,
    /// Only this room.
    pub room: Option<String>,
    /// Only entries with an id below this (for paging).
    pub before: Option<i64>,
    /// At most this many.
    pub limit: usize,
}

/// One write; a batch of them is committed together.
#[derive(Debug, Clone)]
pub enum Write {
    /// A chat message.
    Message(StoredMessage),
    /// Mark a message deleted: it leaves history.
    DeleteMessage {
        /// Room name.
        room: String,
        /// Message id.
        id: u64,
    },
    /// A new ban (its id comes back in the [`Committed`] results).
    Ban(Ban),
    /// End a ban now.
    LiftBan {
        /// The ban's id.
        id: i64,
        /// When, ms since the Unix epoch.
        at: u64,
    },
    /// Set (or replace) a user's mute.
    Mute(Mute),
    /// End a user's mute.
    Unmute {
        /// The user.
        user_id: String,
    },
    /// Set a user's strikes (0 points clears them).
    Strikes {
        /// The user.
        user_id: String,
        /// The new value.
        strikes: Strikes,
    },
    /// A new review item (its id comes back in the results).
    Review(ReviewItem),
    /// Record a decision on a review item.
    Decide {
        /// The item.
        id: i64,
        /// Approved or denied.
        status: ReviewStatus,
        /// Who decided.
        by: String,
        /// When.
        at: u64,
    },
    /// Set a room's settings.
    RoomSettings(RoomSettings),
    /// Append to the audit log.
    Audit(AuditEntry),
    /// Remember a staff member's name (its look-alike keys), so that guests
    /// cannot take a look-alike of it after a restart either.
    StaffName {
        /// The keys.
        looks: Vec<String>,
        /// When it was seen, ms since the Unix epoch.
        at: u64,
    },
}

/// What one write produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Nothing to report.
    Done,
    /// The id the store gave the new row (bans, review items, audit entries).
    Id(i64),
}

/// The results of a batch of writes, in order.
pub type Committed = Result<Vec<Written>, StoreError>;

/// Resolves when a batch of writes is durably committed.
#[derive(Debug)]
pub struct Commit(oneshot::Receiver<Committed>);

impl Commit {
    /// A commit that is already resolved.
    pub fn ready(result: Committed) -> Self {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(result);
        Commit(rx)
    }

    /// A pending commit and the sender that resolves it.
    pub fn pending() -> (oneshot::Sender<Committed>, Self) {
        let (tx, rx) = oneshot::channel();
        (tx, Commit(rx))
    }

    /// Waits for the commit.
    pub async fn wait(mut self) -> Committed {
        std::future::poll_fn(|cx| self.poll_wait(cx)).await
    }

    /// Polls for the commit (for a task that watches many).
    pub fn poll_wait(&mut self, cx: &mut Context<'_>) -> Poll<Committed> {
        Pin::new(&mut self.0).poll(cx).map(|result| result.unwrap_or_else(|_| Err(writer_stopped())))
    }

    /// Waits for the commit from a thread outside the async runtime.
    pub fn wait_blocking(self) -> Committed {
        self.0.blocking_recv().unwrap_or_else(|_| Err(writer_stopped()))
    }
}

/// The error of a commit whose writer stopped before resolving it.
fn writer_stopped() -> StoreError {
    StoreError::Unavailable("the writer stopped".into())
}

/// Everything loaded at start-up to rebuild the in-memory state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Bans that have not ended.
    pub bans: Vec<Ban>,
    /// Mutes that have not ended.
    pub mutes: Vec<Mute>,
    /// Strikes of every user who has some.
    pub strikes: Vec<(String, Strikes)>,
    /// Room settings that differ from the defaults.
    pub rooms: Vec<RoomSettings>,
    /// Look-alike keys of every staff member's name seen
    /// ([`crate::identity::impersonation_keys`]).
    pub staff_names: Vec<String>,
}

/// Durable storage. Implementations must be cheap to call from async code:
/// writes only queue (the commit happens elsewhere), reads are short
/// indexed queries.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Queues writes to be committed together, in order, after any queued
    /// before them. The returned [`Commit`] resolves once they are durable.
    fn write(&self, writes: Vec<Write>) -> Commit;

    /// Up to `limit` messages of `room` with ids below `before` (or the
    /// latest), oldest first, deleted ones excluded, as delivered JSON.
    fn history(&self, room: &str, before: Option<u64>, limit: usize) -> Result<Vec<StoredMessage>, StoreError>;

    /// The highest message id ever used in `room` (0 if none).
    fn last_message_id(&self, room: &str) -> Result<u64, StoreError>;

    /// State to rebuild at start-up; `now` decides what has ended.
    fn snapshot(&self, now: u64) -> Result<Snapshot, StoreError>;

    /// Bans, newest first; with `active_at`, only those not ended then.
    fn bans(&self, active_at: Option<u64>) -> Result<Vec<Ban>, StoreError>;

    /// Review items, oldest first; with `status`, only those.
    fn review_items(&self, status: Option<ReviewStatus>) -> Result<Vec<ReviewItem>, StoreError>;

    /// One review item.
    fn review_item(&self, id: i64) -> Result<Option<ReviewItem>, StoreError>;

    /// One message, unless it was deleted (reports and deletions of a
    /// deleted message find nothing).
    fn message(&self, room: &str, id: u64) -> Result<Option<StoredMessage>, StoreError>;

    /// Audit entries, newest first.
    fn audit(&self, query: &AuditQuery) -> Result<Vec<AuditEntry>, StoreError>;

    /// Whether the store can take writes (for `/readyz`).
    fn is_healthy(&self) -> bool;
}
