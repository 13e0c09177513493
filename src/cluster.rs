//! The cluster: several Wardroom nodes acting as one chat server, through a
//! Redis broker and one shared PostgreSQL store (`[cluster]`, see
//! `docs/operations.md` and the "Cluster" section of `docs/design.md`).
//!
//! What goes through Redis, all under the configured prefix `P`:
//!
//! - **Messages.** The poster task sends each accepted message to Redis as
//!   one Lua script ([`POST_SCRIPT`]) that takes the room's next id
//!   (`INCR P:seq:<room>`) and publishes the message with that id on
//!   `P:room:<room>`, atomically: ids come from one place, and every node
//!   receives a room's messages in id order. Scripts are pipelined, up to
//!   [`MAX_BATCH`] per round trip.
//! - **Effects** ([`Effect`]) on `P:effects`: moderation (bans, mutes,
//!   kicks, deletions, room settings), frames for staff or for one user,
//!   presence, and config reloads. The node that acts applies an effect at
//!   once and publishes it; the others apply it when it arrives.
//! - **Presence** is also kept in one hash per room (`P:members:<room>`,
//!   member `<node>:<conn>`), read whole when a node (re)connects.
//! - **Liveness.** Each node sets `P:node:<id>` with a 3 s expiry every
//!   second. A node whose key is gone at two checks in a row (a second
//!   apart) is gone: the others drop its members.
//! - **Strikes** are counted in `P:strikes:<user>` by [`STRIKES_SCRIPT`], so
//!   a user on two nodes is counted once.
//! - **Guest nicknames** are held in one hash, `P:nicks` (folded nickname →
//!   `<node>:<conn>`), claimed by [`CLAIM_NICK_SCRIPT`] (free, ours, or
//!   held by a node whose heartbeat is gone) and released by
//!   [`RELEASE_NICK_SCRIPT`] (only if ours), in order, by one task. Staff
//!   names seen by any node are in `P:staff` (their look-alike keys), which
//!   the claim checks too.
//!
//! While the subscriber is cut off from Redis the node is not ready
//! (`/readyz` 503), refuses posts and nickname changes with `unavailable`
//! (ids and nicknames must come from one place) and keeps its connections; it reconnects with backoff and, once
//! back, reloads presence and announces its own members again. Messages
//! published meanwhile are in the store: clients catch up with `history`.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

use crate::client::{Client, Reply, Roles};
use crate::config::ClusterConfig;
use crate::hub::Hub;
use crate::lock;
use crate::protocol::{PresenceEvent, Ref, UserView};
use crate::store::{Ban, Mute, RoomSettings};

/// Takes a room's next message id and publishes the message with it, in one
/// atomic step. `KEYS`: the room's sequence and channel. `ARGV`: the lowest
/// id the sequence may be at (the node's last known id, so a flushed Redis
/// never reuses ids the store has), the message JSON before and after its
/// id, and the envelope header (`<node> <token>`).
pub const POST_SCRIPT: &str = r#"
local floor = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < floor then redis.call('SET', KEYS[1], floor) end
local id = redis.call('INCR', KEYS[1])
redis.call('PUBLISH', KEYS[2], ARGV[4] .. ' ' .. id .. ' ' .. ARGV[2] .. id .. ARGV[3])
return id
"#;

/// Adds strikes to a user, with the same decay as one node applies (one
/// strike forgiven per full period). `KEYS`: the user's strikes hash.
/// `ARGV`: points to add, decay period (ms), now (ms), and the node's own
/// value (points, since) used when Redis has none. Returns the points
/// before and after, and the start of the running period.
pub const STRIKES_SCRIPT: &str = r#"
local stored = redis.call('HMGET', KEYS[1], 'points', 'since')
local points = tonumber(stored[1])
local since = tonumber(stored[2])
if not points or not since then
  points = tonumber(ARGV[4])
  since = tonumber(ARGV[5])
end
local decay = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local forgiven = math.floor(math.max(now - since, 0) / decay)
points = math.max(points - forgiven, 0)
since = since + forgiven * decay
if points <= 0 then since = now end
local after = points + tonumber(ARGV[1])
redis.call('HSET', KEYS[1], 'points', tostring(after), 'since', string.format('%d', since))
redis.call('PEXPIRE', KEYS[1], math.ceil(after + 1) * decay)
return {tostring(points), tostring(after), string.format('%d', since)}
"#;

/// Claims a guest nickname for a connection. `KEYS`: the nicknames hash and
/// the staff names set. `ARGV`: the folded nickname, the owner
/// (`<node>:<conn>`), the prefix of heartbeat keys (`P:node:`), the
/// nickname's look-alike keys, one per line (empty: not checked), and the
/// claiming node.
/// Returns 1 if the nickname is now the owner's (it was free, held by the
/// claiming node, whose own map already settled it, or held by a node whose
/// heartbeat key is gone), 0 if a connection of another live node holds it,
/// 2 if it looks like a staff member's name.
pub const CLAIM_NICK_SCRIPT: &str = r#"
for look in string.gmatch(ARGV[4], '[^\n]+') do
  if redis.call('SISMEMBER', KEYS[2], look) == 1 then return 2 end
end
local owner = redis.call('HGET', KEYS[1], ARGV[1])
if owner and owner ~= ARGV[2] then
  local node = string.match(owner, '^([^:]*):')
  if node and node ~= ARGV[5] and redis.call('EXISTS', ARGV[3] .. node) == 1 then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// Releases a nickname if the owner still holds it. `KEYS`: the nicknames
/// hash. `ARGV`: the folded nickname and the owner. Returns 1 if released.
pub const RELEASE_NICK_SCRIPT: &str = r#"
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"#;

/// Releases every nickname a node holds (when it stops). `KEYS`: the
/// nicknames hash. `ARGV`: `<node>:`. Returns how many were released.
const RELEASE_NODE_SCRIPT: &str = r#"
local all = redis.call('HGETALL', KEYS[1])
local released = 0
for i = 1, #all, 2 do
  if string.sub(all[i + 1], 1, #ARGV[1]) == ARGV[1] then
    redis.call('HDEL', KEYS[1], all[i])
    released = released + 1
  end
end
return released
"#;

/// Most posts sent to Redis in one pipeline.
pub const MAX_BATCH: usize = 256;
/// How often a node says it is alive.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a heartbeat lasts: two missed beats and a bit, and the node is gone.
pub const HEARTBEAT_TTL: Duration = Duration::from_secs(3);
/// Timeout of every Redis connection attempt and command.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Backoff between reconnection attempts of the subscriber.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Posts and effects that may wait for Redis; beyond, they are refused.
const QUEUE: usize = 65_536;

/// A member of a room connected to another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteMember {
    /// User id.
    pub user: String,
    /// Nickname.
    pub nick: String,
    /// Role names.
    pub roles: Vec<String>,
    /// The client's address (to ban a guest by address from another node).
    pub addr: IpAddr,
}

impl RemoteMember {
    /// The roles, as a set.
    pub fn roles(&self) -> Roles {
        self.roles.iter().filter_map(|name| Roles::from_name(name)).fold(Roles::default(), |a, b| a | b)
    }

    /// The member as clients see it (with `roles` from [`Self::roles`]).
    pub fn view(&self, roles: Roles) -> UserView<'_> {
        UserView { id: &self.user, nick: &self.nick, roles }
    }
}

/// What happened to a member, on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceKind {
    /// Entered the room.
    Join,
    /// Left the room or disconnected.
    Leave,
    /// Changed nickname.
    Nick,
}

impl PresenceKind {
    /// The protocol's event.
    pub fn event(self) -> PresenceEvent {
        match self {
            PresenceKind::Join => PresenceEvent::Join,
            PresenceKind::Leave => PresenceEvent::Leave,
            PresenceKind::Nick => PresenceEvent::Nick,
        }
    }
}

/// Something one node did that every node must carry out for its own
/// clients and memory. Applied by [`Hub::apply_effect`], the one path local
/// moderation uses too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Effect {
    /// A frame (its JSON) for every moderator and admin online.
    ToStaff {
        /// The frame's JSON.
        frame: String,
    },
    /// A frame for every connection of a user.
    ToUser {
        /// The user id.
        user: String,
        /// The frame's JSON.
        frame: String,
        /// Only to connections without a staff role.
        members_only: bool,
    },
    /// Close every connection of a user (a kick).
    CloseUser {
        /// The user id.
        user: String,
        /// The Close frame's reason.
        message: String,
    },
    /// A new ban: kept in memory, and the user's connections closed.
    Ban {
        /// The ban (its store id is not known yet: 0).
        ban: WireBan,
        /// The Close frame's reason.
        message: String,
    },
    /// Bans lifted: those of `user`, of `net`, and those listed.
    LiftBans {
        /// Every ban of this user.
        user: Option<String>,
        /// Every ban of exactly this network.
        net: Option<String>,
        /// Bans identified by (user, network, creation time).
        bans: Vec<(Option<String>, Option<String>, u64)>,
    },
    /// A mute, told to the user.
    Mute {
        /// The mute.
        mute: WireMute,
    },
    /// A mute lifted, told to the user.
    Unmute {
        /// The user id.
        user: String,
    },
    /// A room's slow mode or lock changed, told to its members.
    RoomSettings {
        /// Room name.
        room: String,
        /// Slow mode in seconds (0: off).
        slow_mode_secs: u32,
        /// Read-only for members.
        locked: bool,
    },
    /// A message deleted from a room.
    Delete {
        /// Room name.
        room: String,
        /// Message id.
        id: u64,
    },
    /// Someone on another node joined, left or changed nickname.
    Presence {
        /// Room name.
        room: String,
        /// `<node>:<connection>`.
        member: String,
        /// Who.
        who: RemoteMember,
        /// What happened.
        event: PresenceKind,
        /// The old nickname, for `nick`.
        previous: Option<String>,
    },
    /// A node applied a new config: the others reload their own file.
    Reload,
}

/// A [`Ban`] on the wire (serde-friendly, without the store id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBan {
    /// The banned user.
    pub user_id: Option<String>,
    /// The banned network.
    pub cidr: Option<String>,
    /// Why.
    pub reason: String,
    /// Who.
    pub actor: String,
    /// When (ms since the Unix epoch).
    pub created_at: u64,
    /// Until when.
    pub expires_at: Option<u64>,
}

impl From<&Ban> for WireBan {
    fn from(b: &Ban) -> Self {
        WireBan {
            user_id: b.user_id.clone(),
            cidr: b.cidr.clone(),
            reason: b.reason.clone(),
            actor: b.actor.clone(),
            created_at: b.created_at,
            expires_at: b.expires_at,
        }
    }
}

impl From<&WireBan> for Ban {
    fn from(b: &WireBan) -> Self {
        Ban {
            id: 0,
            user_id: b.user_id.clone(),
            cidr: b.cidr.clone(),
            reason: b.reason.clone(),
            actor: b.actor.clone(),
            created_at: b.created_at,
            expires_at: b.expires_at,
        }
    }
}

/// A [`Mute`] on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireMute {
    /// The muted user.
    pub user_id: String,
    /// Until when (ms since the Unix epoch).
    pub until: u64,
    /// Why.
    pub reason: String,
    /// Who.
    pub actor: String,
    /// When.
    pub created_at: u64,
}

impl From<&Mute> for WireMute {
    fn from(m: &Mute) -> Self {
        WireMute {
            user_id: m.user_id.clone(),
            until: m.until,
            reason: m.reason.clone(),
            actor: m.actor.clone(),
            created_at: m.created_at,
        }
    }
}

impl From<&WireMute> for Mute {
    fn from(m: &WireMute) -> Self {
        Mute {
            user_id: m.user_id.clone(),
            until: m.until,
            reason: m.reason.clone(),
            actor: m.actor.clone(),
            created_at: m.created_at,
        }
    }
}

impl From<&RoomSettings> for Effect {
    fn from(s: &RoomSettings) -> Self {
        Effect::RoomSettings { room: s.room.clone(), slow_mode_secs: s.slow_mode_secs, locked: s.locked }
    }
}

/// A nickname asked for by a local guest, waiting for the broker's answer.
#[derive(Debug)]
pub struct NickClaim {
    /// Who asks.
    pub client: Arc<Client>,
    /// The nickname, as asked.
    pub nick: String,
    /// What the answer is for.
    pub purpose: NickPurpose,
}

/// Why a nickname is claimed.
#[derive(Debug)]
pub enum NickPurpose {
    /// A guest connecting: `welcome` waits for the answer.
    Connect {
        /// The error to send after `welcome` (the requested nickname was
        /// refused here already).
        error: Option<crate::protocol::RequestError>,
        /// The nickname is a `guest-NNNN` this node picked.
        picked: bool,
    },
    /// A `nick` request: `renamed` or an error waits for the answer.
    Change {
        /// The request's `ref`.
        reference: Option<Ref>,
        /// The answer, promised to the connection meanwhile.
        reply: Reply,
    },
}

/// The broker's answer to a [`NickClaim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NickAnswer {
    /// The nickname is the connection's.
    Claimed,
    /// A connection on another node holds it.
    Taken,
    /// It looks like the name of a staff member seen on another node.
    Staff,
    /// The broker could not be asked (the reason).
    Failed(String),
}

/// What the nickname task sends to Redis, in order.
#[derive(Debug)]
pub enum NickOp {
    /// Claim a nickname for a guest; the answer goes to the hub.
    Claim(NickClaim),
    /// Claim again a nickname a local connection holds (after the node
    /// reconnects): a refusal is only logged.
    Assert {
        /// Folded nickname.
        key: String,
        /// The connection holding it.
        conn: u64,
    },
    /// Release a nickname if the connection still holds it.
    Release {
        /// Folded nickname.
        key: String,
        /// The connection that held it.
        conn: u64,
    },
    /// Remember a staff member's look-alike keys for every node.
    Staff {
        /// The keys ([`crate::identity::impersonation_keys`]).
        looks: Vec<String>,
    },
}

/// An effect with the node it comes from.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    /// The publishing node, so it can skip its own.
    node: String,
    /// What to do.
    effect: Effect,
}

/// A message waiting for its id.
pub struct PostRequest {
    /// Room name.
    pub room: Arc<str>,
    /// The node's last known id of the room (see [`POST_SCRIPT`]).
    pub floor: u64,
    /// The message JSON up to its id.
    pub head: String,
    /// The message JSON after its id.
    pub tail: String,
    /// The author.
    pub user_id: String,
    /// Acceptance time.
    pub ts: u64,
    /// Identifies an author's post on this node (0 for none): its reply
    /// waits in [`Cluster`].
    pub token: u64,
    /// Runs once the id is known (to flag the message to moderators).
    pub on_id: Option<crate::hub::OnId>,
}

/// An author's post waiting for its message to be committed and delivered
/// back (its echo), to send its `ack` if it has a `ref`.
#[derive(Debug)]
struct PendingAck {
    /// Who waits: the echo and the ack are promised to the author until
    /// then, so that its reader does not run ahead of them.
    reply: Reply,
    /// The message's `ref`, if it has one.
    reference: Option<Ref>,
    /// Room name.
    room: Arc<str>,
    /// Acceptance time.
    ts: u64,
    /// The id, once Redis gave it.
    id: Option<u64>,
    /// The commit's outcome, once known (`Err` holds the reason).
    committed: Option<Result<(), String>>,
    /// Whether the message came back from the broker (or never will).
    delivered: bool,
}

/// What an ack waiting in the cluster turned into.
#[derive(Debug)]
pub enum AckReady {
    /// The message is committed and delivered: send `ack` (if it has a
    /// `ref`).
    Ack {
        /// Who waits.
        reply: Reply,
        /// The `ref`.
        reference: Option<Ref>,
        /// Room name.
        room: Arc<str>,
        /// The id.
        id: u64,
        /// Acceptance time.
        ts: u64,
    },
    /// The commit failed: send an `unavailable` error (if it has a `ref`).
    Failed {
        /// Who waits.
        reply: Reply,
        /// The `ref`.
        reference: Option<Ref>,
        /// The id.
        id: u64,
        /// Why.
        reason: String,
    },
}

/// The receiving halves of the cluster's queues.
type Receivers = (mpsc::Receiver<PostRequest>, mpsc::Receiver<Envelope>, mpsc::Receiver<NickOp>);

/// This node's part of the cluster: its connections to Redis, what it knows
/// of the other nodes' members, and the acks waiting for the broker.
pub struct Cluster {
    /// This node's id, random per process.
    node: String,
    /// Namespace of keys and channels.
    prefix: String,
    /// For the subscriber's dedicated connection.
    client: redis::Client,
    /// Commands (scripts, publishes, heartbeats): multiplexed, reconnecting.
    redis: ConnectionManager,
    /// The subscriber is connected and has caught up with presence.
    subscribed: AtomicBool,
    /// The last heartbeat went through.
    beating: AtomicBool,
    /// Posts for the poster task.
    posts: mpsc::Sender<PostRequest>,
    /// Effects for the publisher task.
    effects: mpsc::Sender<Envelope>,
    /// The receiving halves, taken by [`Cluster::start`].
    receivers: Mutex<Option<Receivers>>,
    /// Nickname claims and releases for the nickname task.
    nicks: mpsc::Sender<NickOp>,
    /// Authors' posts waiting for their message, by token.
    pending: Mutex<HashMap<u64, PendingAck>>,
    /// Source of post tokens (0 means nobody waits).
    next_token: AtomicU64,
    /// Members on other nodes: room → member key → who.
    remote: Mutex<HashMap<String, HashMap<String, RemoteMember>>>,
    /// The background tasks, aborted by [`Cluster::stop`].
    tasks: Mutex<Vec<AbortHandle>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.node).field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

/// A post was refused: too many are waiting for the broker.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("too many messages are waiting for the cluster broker")]
pub struct QueueFull;

/// Why the cluster could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot use the cluster broker {broker}: {source}")]
pub struct ClusterError {
    /// The configured URL.
    broker: String,
    /// What Redis' client said.
    source: redis::RedisError,
}

impl Cluster {
    /// A node of the cluster `config` describes; nothing connects until
    /// [`Cluster::start`]. Must be called inside a tokio runtime.
    pub fn new(config: &ClusterConfig) -> Result<Arc<Self>, ClusterError> {
        let error = |source| ClusterError { broker: config.broker.clone(), source };
        let client = redis::Client::open(config.broker.as_str()).map_err(error)?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_TIMEOUT))
            .set_response_timeout(Some(REDIS_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let redis = ConnectionManager::new_lazy_with_config(client.clone(), manager_config).map_err(error)?;
        let (posts, posts_rx) = mpsc::channel(QUEUE);
        let (effects, effects_rx) = mpsc::channel(QUEUE);
        let (nicks, nicks_rx) = mpsc::channel(QUEUE);
        Ok(Arc::new(Cluster {
            node: format!("{:016x}", crate::hub::random_u64()),
            prefix: config.prefix.clone(),
            client,
            redis,
            subscribed: AtomicBool::new(false),
            beating: AtomicBool::new(false),
            posts,
            effects,
            receivers: Mutex::new(Some((posts_rx, effects_rx, nicks_rx))),
            nicks,
            pending: Mutex::default(),
            next_token: AtomicU64::new(1),
            remote: Mutex::default(),
            tasks: Mutex::default(),
        }))
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Whether this node is connected to the broker (subscribed, caught up,
    /// and its heartbeat going through): ready, and able to take posts.
    pub fn is_connected(&self) -> bool {
        self.subscribed.load(Ordering::Acquire) && self.beating.load(Ordering::Acquire)
    }

    /// The key of a local connection in presence.
    pub fn member_key(&self, conn: u64) -> String {
        format!("{}:{conn}", self.node)
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.prefix)
    }

    fn effects_channel(&self) -> String {
        format!("{}:effects", self.prefix)
    }

    /// Starts the poster, publisher, subscriber and heartbeat tasks for `hub`.
    pub fn start(self: &Arc<Self>, hub: &Arc<Hub>) {
        let Some((posts, effects, nicks)) = lock(&self.receivers).take() else { return };
        let hub = Arc::downgrade(hub);
        let handles = [
            tokio::spawn(poster(self.clone(), hub.clone(), posts)).abort_handle(),
            tokio::spawn(publisher(self.clone(), effects)).abort_handle(),
            tokio::spawn(nicknamer(self.clone(), hub.clone(), nicks)).abort_handle(),
            tokio::spawn(subscriber(self.clone(), hub.clone())).abort_handle(),
            tokio::spawn(heartbeat(self.clone(), hub.clone())).abort_handle(),
            tokio::spawn(announce_reloads(self.clone(), hub)).abort_handle(),
        ];
        lock(&self.tasks).extend(handles);
    }

    /// Stops the background tasks, once the effects already queued (the
    /// departures of the clients closed at shutdown) are published and the
    /// nicknames released, releases whatever nickname this node still holds,
    /// and removes this node's heartbeat, so the others see it gone at once.
    pub async fn stop(&self) {
        let drained = async {
            while self.effects.capacity() < self.effects.max_capacity()
                || self.nicks.capacity() < self.nicks.max_capacity()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // The publisher's last batch is on its way.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = tokio::time::timeout(REDIS_TIMEOUT, drained).await;
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        let mut redis = self.redis.clone();
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL").arg(RELEASE_NODE_SCRIPT).arg(1).arg(self.nicks_key()).arg(format!("{}:", self.node)).ignore();
        pipe.del(self.key("node", &self.node)).ignore();
        let _ = tokio::time::timeout(REDIS_TIMEOUT, pipe.query_async::<()>(&mut redis)).await;
    }

    /// Queues a nickname claim or release for the broker, in order with the
    /// others; gives the operation back if the queue is full.
    pub fn queue_nick(&self, op: NickOp) -> Result<(), Box<NickOp>> {
        self.nicks.try_send(op).map_err(|e| match e {
            mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op) => Box::new(op),
        })
    }

    /// Queues the release of a nickname a local connection held (a full
    /// queue is logged: the nickname stays held until this node stops).
    pub fn release_nick(&self, key: String, conn: u64) {
        if self.queue_nick(NickOp::Release { key, conn }).is_err() {
            tracing::warn!("a nickname release was dropped: the broker queue is full");
        }
    }

    fn nicks_key(&self) -> String {
        format!("{}:nicks", self.prefix)
    }

    /// Queues a post. An author's post (`waiting`: the reply promised to
    /// the author, and the `ref`) is held until the message is committed
    /// and has come back from the broker; then its ack is due.
    pub fn post(&self, mut request: PostRequest, waiting: Option<(Reply, Option<Ref>)>) -> Result<(), QueueFull> {
        if let Some((reply, reference)) = waiting {
            let token = self.next_token.fetch_add(1, Ordering::Relaxed);
            request.token = token;
            let ack = PendingAck {
                reply,
                reference,
                room: request.room.clone(),
                ts: request.ts,
                id: None,
                committed: None,
                delivered: false,
            };
            lock(&self.pending).insert(token, ack);
        }
        let token = request.token;
        self.posts.try_send(request).map_err(|_| {
            lock(&self.pending).remove(&token);
            QueueFull
        })
    }

    /// Forgets a post that failed; returns its author's reply and `ref`,
    /// for the caller to tell the author.
    pub fn forget(&self, token: u64) -> Option<(Reply, Option<Ref>)> {
        lock(&self.pending).remove(&token).map(|ack| (ack.reply, ack.reference))
    }

    /// Records the id Redis gave a waiting post.
    pub fn assigned(&self, token: u64, id: u64) {
        if let Some(ack) = lock(&self.pending).get_mut(&token) {
            ack.id = Some(id);
        }
    }

    /// Records a waiting post's commit; returns its ack if it is due.
    pub fn committed(&self, token: u64, result: Result<(), String>) -> Option<AckReady> {
        let mut pending = lock(&self.pending);
        pending.get_mut(&token)?.committed = Some(result);
        take_if_due(&mut pending, token)
    }

    /// Records that a waiting post came back; returns its ack if it is due.
    pub fn delivered(&self, token: u64) -> Option<AckReady> {
        let mut pending = lock(&self.pending);
        pending.get_mut(&token)?.delivered = true;
        take_if_due(&mut pending, token)
    }

    /// The broker is gone: posts that have their id will not come back, so
    /// their acks go out once committed. Returns those already due.
    fn give_up_deliveries(&self) -> Vec<AckReady> {
        let mut pending = lock(&self.pending);
        let tokens: Vec<u64> = pending.iter().filter(|(_, a)| a.id.is_some()).map(|(t, _)| *t).collect();
        let mut due = Vec::new();
        for token in tokens {
            if let Some(ack) = pending.get_mut(&token) {
                ack.delivered = true;
            }
            due.extend(take_if_due(&mut pending, token));
        }
        due
    }

    /// Publishes an effect to the other nodes (dropped, with a warning,
    /// while the broker is unreachable and the queue full).
    pub fn publish(&self, effect: Effect) {
        if let Err(e) = self.effects.try_send(Envelope { node: self.node.clone(), effect }) {
            tracing::warn!(error = %e, "effect not published: the broker queue is full");
        }
    }

    /// Adds strikes through Redis; see [`STRIKES_SCRIPT`]. Returns the
    /// points before and after, and the start of the running period.
    pub async fn add_strikes(
        &self,
        user_id: &str,
        points: f64,
        decay: Duration,
        now: u64,
        seed: (f64, u64),
    ) -> redis::RedisResult<(f64, f64, u64)> {
        let mut redis = self.redis.clone();
        let (before, after, since): (String, String, String) = redis::Script::new(STRIKES_SCRIPT)
            .key(self.key("strikes", user_id))
            .arg(points)
            .arg(decay.as_millis().max(1) as u64)
            .arg(now)
            .arg(seed.0)
            .arg(seed.1)
            .invoke_async(&mut redis)
            .await?;
        let number = |s: &str| s.parse::<f64>().unwrap_or(0.0);
        Ok((number(&before), number(&after), number(&since) as u64))
    }

    /// Clears a user's strikes everywhere.
    pub async fn clear_strikes(&self, user_id: &str) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        redis::cmd("DEL").arg(self.key("strikes", user_id)).query_async(&mut redis).await
    }

    /// Members of `room` on other nodes.
    pub fn remote_members(&self, room: &str) -> Vec<RemoteMember> {
        lock(&self.remote).get(room).map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// How many members `room` has on other nodes.
    pub fn remote_count(&self, room: &str) -> usize {
        lock(&self.remote).get(room).map_or(0, HashMap::len)
    }

    /// Room memberships on other nodes, all rooms together.
    pub fn remote_membership_count(&self) -> usize {
        lock(&self.remote).values().map(HashMap::len).sum()
    }

    /// The address of a user connected to another node, if any.
    pub fn remote_user(&self, user_id: &str) -> Option<IpAddr> {
        lock(&self.remote).values().flat_map(|m| m.values()).find(|m| m.user == user_id).map(|m| m.addr)
    }

    /// Applies a presence change to the view of other nodes' members;
    /// returns whether it changed anything (a repeated join does not).
    pub fn update_remote(&self, room: &str, member: &str, who: &RemoteMember, event: PresenceKind) -> bool {
        let mut remote = lock(&self.remote);
        match event {
            PresenceKind::Join | PresenceKind::Nick => {
                let members = remote.entry(room.to_owned()).or_default();
                let previous = members.insert(member.to_owned(), who.clone());
                event == PresenceKind::Nick || previous.is_none()
            }
            PresenceKind::Leave => {
                let Some(members) = remote.get_mut(room) else { return false };
                let removed = members.remove(member).is_some();
                if members.is_empty() {
                    remote.remove(room);
                }
                removed
            }
        }
    }

    /// The nodes other members are on.
    fn remote_nodes(&self) -> Vec<String> {
        let remote = lock(&self.remote);
        let mut nodes: Vec<String> = remote
            .values()
            .flat_map(|m| m.keys())
            .filter_map(|member| member.split_once(':').map(|(node, _)| node.to_owned()))
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// The members this node knows on `node`: (room, member key, who).
    fn members_of_node(&self, node: &str) -> Vec<(String, String, RemoteMember)> {
        let prefix = format!("{node}:");
        lock(&self.remote)
            .iter()
            .flat_map(|(room, members)| {
                members
                    .iter()
                    .filter(|(member, _)| member.starts_with(&prefix))
                    .map(|(member, who)| (room.clone(), member.clone(), who.clone()))
            })
            .collect()
    }

    /// Every member this node knows on other nodes: (room, member key, who).
    pub fn all_remote(&self) -> Vec<(String, String, RemoteMember)> {
        lock(&self.remote)
            .iter()
            .flat_map(|(room, members)| members.iter().map(|(m, who)| (room.clone(), m.clone(), who.clone())))
            .collect()
    }
}

/// Removes and returns a pending ack if both its commit and its delivery
/// are done.
fn take_if_due(pending: &mut HashMap<u64, PendingAck>, token: u64) -> Option<AckReady> {
    let ack = pending.get(&token)?;
    let due = match (&ack.committed, ack.id) {
        // A failed commit is reported at once.
        (Some(Err(_)), Some(_)) => true,
        (Some(Ok(())), Some(_)) => ack.delivered,
        _ => false,
    };
    if !due {
        return None;
    }
    let ack = pending.remove(&token)?;
    let id = ack.id?;
    Some(match ack.committed {
        Some(Err(reason)) => AckReady::Failed { reply: ack.reply, reference: ack.reference, id, reason },
        _ => AckReady::Ack { reply: ack.reply, reference: ack.reference, room: ack.room, id, ts: ack.ts },
    })
}

/// Sends posts to Redis in pipelined batches, in the order they were
/// accepted, and hands each id back to the hub.
async fn poster(cluster: Arc<Cluster>, hub: Weak<Hub>, mut posts: mpsc::Receiver<PostRequest>) {
    let script = redis::Script::new(POST_SCRIPT);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if posts.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT").arg("LOAD").arg(POST_SCRIPT).ignore();
        for post in &batch {
            pipe.cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(2)
                .arg(cluster.key("seq", &post.room))
                .arg(cluster.key("room", &post.room))
                .arg(post.floor)
                .arg(&post.head)
                .arg(&post.tail)
                .arg(format!("{} {}", cluster.node, post.token));
        }
        let mut redis = cluster.redis.clone();
        let result: redis::RedisResult<Vec<u64>> = pipe.query_async(&mut redis).await;
        let Some(hub) = hub.upgrade() else { return };
        match result {
            Ok(ids) if ids.len() == batch.len() => {
                for (post, id) in batch.drain(..).zip(ids) {
                    hub.cluster_posted(post, id);
                }
            }
            Ok(ids) => {
                let error = format!("the broker answered {} ids for {} messages", ids.len(), batch.len());
                for post in batch.drain(..) {
                    hub.cluster_post_failed(post, &error);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, posts = batch.len(), "posting to the broker failed");
                let error = format!("the cluster broker is unreachable: {e}");
                for post in batch.drain(..) {
                    hub.cluster_post_failed(post, &error);
                }
            }
        }
    }
}

/// Sends nickname claims and releases to Redis in pipelined batches, in the
/// order they were queued, and hands each claim's answer to the hub.
async fn nicknamer(cluster: Arc<Cluster>, hub: Weak<Hub>, mut ops: mpsc::Receiver<NickOp>) {
    let claim = redis::Script::new(CLAIM_NICK_SCRIPT);
    let release = redis::Script::new(RELEASE_NICK_SCRIPT);
    let (nicks, staff) = (cluster.nicks_key(), cluster.key("staff", ""));
    let heartbeats = cluster.key("node", "");
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if ops.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("SCRIPT").arg("LOAD").arg(CLAIM_NICK_SCRIPT).ignore();
        pipe.cmd("SCRIPT").arg("LOAD").arg(RELEASE_NICK_SCRIPT).ignore();
        for op in &batch {
            let owner = |conn: u64| cluster.member_key(conn);
            match op {
                NickOp::Claim(NickClaim { client, nick, .. }) => {
                    pipe.cmd("EVALSHA")
                        .arg(claim.get_hash())
                        .arg(2)
                        .arg(&nicks)
                        .arg(&staff)
                        .arg(crate::names::fold_nick(nick))
                        .arg(owner(client.id))
                        .arg(&heartbeats)
                        .arg(crate::identity::impersonation_keys(nick).join("\n"))
                        .arg(&cluster.node);
                }
                NickOp::Assert { key, conn } => {
                    pipe.cmd("EVALSHA")
                        .arg(claim.get_hash())
                        .arg(2)
                        .arg(&nicks)
                        .arg(&staff)
                        .arg(key)
                        .arg(owner(*conn))
                        .arg(&heartbeats)
                        .arg("")
                        .arg(&cluster.node);
                }
                NickOp::Release { key, conn } => {
                    pipe.cmd("EVALSHA").arg(release.get_hash()).arg(1).arg(&nicks).arg(key).arg(owner(*conn));
                }
                NickOp::Staff { looks } => {
                    pipe.sadd(&staff, looks);
                }
            }
        }
        let mut redis = cluster.redis.clone();
        let result: redis::RedisResult<Vec<i64>> = pipe.query_async(&mut redis).await;
        let Some(hub) = hub.upgrade() else { return };
        let answers: Vec<Result<i64, String>> = match result {
            Ok(codes) if codes.len() == batch.len() => codes.into_iter().map(Ok).collect(),
            Ok(codes) => {
                let error = format!("the broker answered {} times for {} requests", codes.len(), batch.len());
                vec![Err(error); batch.len()]
            }
            Err(e) => {
                tracing::warn!(error = %e, requests = batch.len(), "nickname requests did not reach the broker");
                vec![Err(format!("the cluster broker is unreachable: {e}")); batch.len()]
            }
        };
        for (op, answer) in batch.drain(..).zip(answers) {
            match op {
                NickOp::Claim(claim) => {
                    let answer = match answer {
                        Ok(1) => NickAnswer::Claimed,
                        Ok(2) => NickAnswer::Staff,
                        Ok(_) => NickAnswer::Taken,
                        Err(reason) => NickAnswer::Failed(reason),
                    };
                    hub.nick_answered(claim, answer);
                }
                NickOp::Assert { key, conn } if answer == Ok(0) => {
                    tracing::warn!(nick = %key, conn, "a nickname held here is also held on another node");
                }
                _ => {}
            }
        }
    }
}

/// Publishes effects in batches; presence also updates the room's members
/// hash in the same transaction.
async fn publisher(cluster: Arc<Cluster>, mut effects: mpsc::Receiver<Envelope>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let channel = cluster.effects_channel();
    loop {
        if effects.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for envelope in batch.drain(..) {
            if let Effect::Presence { room, member, who, event, .. } = &envelope.effect {
                let key = cluster.key("members", room);
                match event {
                    PresenceKind::Leave => {
                        pipe.hdel(&key, member).ignore();
                    }
                    PresenceKind::Join | PresenceKind::Nick => {
                        let who = serde_json::to_string(who).unwrap_or_default();
                        pipe.hset(&key, member, who).ignore();
                    }
                }
            }
            match serde_json::to_string(&envelope) {
                Ok(json) => {
                    pipe.publish(&channel, json).ignore();
                }
                Err(e) => tracing::error!(error = %e, "an effect could not be encoded"),
            }
        }
        let mut redis = cluster.redis.clone();
        if let Err(e) = pipe.query_async::<()>(&mut redis).await {
            tracing::warn!(error = %e, "effects not published: the broker is unreachable");
        }
    }
}

/// Receives messages and effects; reconnects with backoff, and on each
/// (re)connection catches up with presence.
async fn subscriber(cluster: Arc<Cluster>, hub: Weak<Hub>) {
    let mut backoff = BACKOFF_MIN;
    let mut reconnecting = false;
    let rooms = format!("{}:room:", cluster.prefix);
    let effects = cluster.effects_channel();
    loop {
        match connect_subscriber(&cluster, &rooms, &effects).await {
            Ok(pubsub) => {
                let (mut sink, mut stream) = pubsub.split();
                if let Some(hub) = hub.upgrade() {
                    hub.new_subscription();
                }
                let caught_up = match hub.upgrade() {
                    Some(hub) => {
                        if reconnecting {
                            // Moderation published while cut off was missed.
                            hub.resync_moderation().await;
                        }
                        catch_up(&cluster, &hub).await
                    }
                    None => return,
                };
                match caught_up {
                    Ok(()) => {
                        backoff = BACKOFF_MIN;
                        cluster.subscribed.store(true, Ordering::Release);
                        tracing::info!(node = %cluster.node, "connected to the cluster broker");
                        let mut ping = tokio::time::interval(HEARTBEAT_EVERY);
                        loop {
                            tokio::select! {
                                message = stream.next() => {
                                    let Some(message) = message else { break };
                                    let Some(hub) = hub.upgrade() else { return };
                                    receive(&cluster, &hub, &rooms, &message);
                                }
                                _ = ping.tick() => {
                                    let pong = tokio::time::timeout(REDIS_TIMEOUT, sink.ping::<redis::Value>()).await;
                                    if !matches!(pong, Ok(Ok(_))) {
                                        break;
                                    }
                                }
                            }
                        }
                        cluster.subscribed.store(false, Ordering::Release);
                        tracing::warn!("lost the cluster broker; posts are refused until it is back");
                        if let Some(hub) = hub.upgrade() {
                            hub.release_acks(cluster.give_up_deliveries());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot catch up with the cluster broker"),
                }
            }
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "cannot reach the cluster broker"),
        }
        reconnecting = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn connect_subscriber(cluster: &Cluster, rooms: &str, effects: &str) -> redis::RedisResult<redis::aio::PubSub> {
    let connect = async {
        let mut pubsub = cluster.client.get_async_pubsub().await?;
        pubsub.subscribe(effects).await?;
        pubsub.psubscribe(format!("{}*", glob_escape(rooms))).await?;
        Ok(pubsub)
    };
    match tokio::time::timeout(REDIS_TIMEOUT, connect).await {
        Ok(result) => result,
        Err(_) => Err(redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))),
    }
}

/// Escapes the glob characters of a channel prefix.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// One message from the broker: a room's message, or an effect.
fn receive(cluster: &Cluster, hub: &Hub, rooms: &str, message: &redis::Msg) {
    let channel = message.get_channel_name();
    let payload = message.get_payload_bytes();
    if let Some(room) = channel.strip_prefix(rooms) {
        // `<node> <token> <id> <json>`
        let Ok(text) = std::str::from_utf8(payload) else { return };
        let mut parts = text.splitn(4, ' ');
        let (Some(node), Some(token), Some(id), Some(json)) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            tracing::warn!(room = ?room, "a malformed message from the broker was ignored");
            return;
        };
        let (Ok(token), Ok(id)) = (token.parse::<u64>(), id.parse::<u64>()) else { return };
        let own = (node == cluster.node && token != 0).then_some(token);
        hub.deliver_published(room, id, json, own);
        return;
    }
    match serde_json::from_slice::<Envelope>(payload) {
        Ok(envelope) if envelope.node != cluster.node => hub.apply_effect(&envelope.effect),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "an effect from the broker could not be read"),
    }
}

/// After (re)connecting: beat at once, load every room's members hash
/// (replacing this node's view of the others, with presence events for the
/// differences), then announce this node's own members again.
async fn catch_up(cluster: &Cluster, hub: &Arc<Hub>) -> redis::RedisResult<()> {
    let mut redis = cluster.redis.clone();
    let beat = redis::cmd("SET")
        .arg(cluster.key("node", &cluster.node))
        .arg("1")
        .arg("PX")
        .arg(HEARTBEAT_TTL.as_millis() as u64)
        .query_async::<()>(&mut redis)
        .await;
    cluster.beating.store(beat.is_ok(), Ordering::Release);
    beat?;
    let pattern = format!("{}*", glob_escape(&cluster.key("members", "")));
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, mut found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut redis)
            .await?;
        keys.append(&mut found);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let own = format!("{}:", cluster.node);
    let members_prefix = cluster.key("members", "");
    let mut view: HashMap<(String, String), RemoteMember> = HashMap::new();
    for key in keys {
        let Some(room) = key.strip_prefix(&members_prefix) else { continue };
        let entries: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(&mut redis).await?;
        for (member, who) in entries {
            if member.starts_with(&own) {
                continue;
            }
            if let Ok(who) = serde_json::from_str::<RemoteMember>(&who) {
                view.insert((room.to_owned(), member), who);
            }
        }
    }
    for (room, member, who) in cluster.all_remote() {
        if !view.contains_key(&(room.clone(), member.clone())) {
            hub.apply_presence(&room, &member, &who, PresenceKind::Leave, None);
        }
    }
    for ((room, member), who) in view {
        hub.apply_presence(&room, &member, &who, PresenceKind::Join, None);
    }
    for (room, member, who) in hub.local_presence() {
        cluster.publish(Effect::Presence { room, member, who, event: PresenceKind::Join, previous: None });
    }
    assert_nicks(cluster, hub);
    Ok(())
}

/// Claims again every nickname local connections hold (Redis may have lost
/// them, or other nodes taken them over while this node's heartbeat lapsed).
fn assert_nicks(cluster: &Cluster, hub: &Hub) {
    for (key, conn) in hub.local_nicks() {
        if cluster.queue_nick(NickOp::Assert { key, conn }).is_err() {
            tracing::warn!("nicknames not claimed again: the broker queue is full");
            return;
        }
    }
}

/// Says this node is alive every [`HEARTBEAT_EVERY`], and drops the members
/// of nodes whose heartbeat key is gone at two checks in a row.
async fn heartbeat(cluster: Arc<Cluster>, hub: Weak<Hub>) {
    let mut missed_once: HashSet<String> = HashSet::new();
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut redis = cluster.redis.clone();
        // `NX` first: if the key had lapsed, the other nodes have dropped
        // this node's members, and they must hear about them again.
        let key = cluster.key("node", &cluster.node);
        let ttl = HEARTBEAT_TTL.as_millis() as u64;
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&key).arg("1").arg("PX").arg(ttl).arg("NX");
        pipe.cmd("PEXPIRE").arg(&key).arg(ttl).ignore();
        let beat = pipe.query_async::<(Option<String>,)>(&mut redis).await;
        if let Err(e) = &beat
            && cluster.beating.load(Ordering::Acquire)
        {
            tracing::warn!(error = %e, "the heartbeat did not reach the cluster broker");
        }
        cluster.beating.store(beat.is_ok(), Ordering::Release);
        if !cluster.is_connected() {
            continue;
        }
        if let (Ok((Some(_),)), Some(hub)) = (&beat, hub.upgrade()) {
            tracing::warn!("this node's heartbeat had lapsed; announcing its members again");
            for (room, member, who) in hub.local_presence() {
                cluster.publish(Effect::Presence { room, member, who, event: PresenceKind::Join, previous: None });
            }
            assert_nicks(&cluster, &hub);
        }
        let nodes = cluster.remote_nodes();
        if nodes.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for node in &nodes {
            pipe.exists(cluster.key("node", node));
        }
        let Ok(alive) = pipe.query_async::<Vec<bool>>(&mut redis).await else { continue };
        let Some(hub) = hub.upgrade() else { return };
        // Gone at two checks in a row: a node whose key lapsed for a moment
        // announces its members again, and that must not be undone here.
        let missing: HashSet<String> =
            nodes.into_iter().zip(alive).filter(|(_, alive)| !alive).map(|(node, _)| node).collect();
        let gone: Vec<String> = missing.intersection(&missed_once).cloned().collect();
        missed_once = missing;
        for node in &gone {
            tracing::warn!(node = %node, "a cluster node stopped beating; dropping its members");
            let mut cleanup = redis::pipe();
            for (room, member, who) in cluster.members_of_node(node) {
                hub.apply_presence(&room, &member, &who, PresenceKind::Leave, None);
                cleanup.hdel(cluster.key("members", &room), &member).ignore();
            }
            let _ = cleanup.query_async::<()>(&mut redis).await;
        }
    }
}

/// Tells the other nodes whenever this node applied a new config.
async fn announce_reloads(cluster: Arc<Cluster>, hub: Weak<Hub>) {
    let Some(mut applied) = hub.upgrade().map(|hub| hub.reloader().applied()) else { return };
    while applied.changed().await.is_ok() {
        cluster.publish(Effect::Reload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects_round_trip_as_json() {
        let effect = Effect::Presence {
            room: "lobby".into(),
            member: "ab:3".into(),
            who: RemoteMember {
                user: "guest:1".into(),
                nick: "ann".into(),
                roles: vec!["member".into()],
                addr: IpAddr::from([127, 0, 0, 1]),
            },
            event: PresenceKind::Join,
            previous: None,
        };
        let envelope = Envelope { node: "n1".into(), effect: effect.clone() };
        let json = serde_json::to_string(&envelope).expect("encodes");
        let back: Envelope = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back.effect, effect);
    }

    #[test]
    fn channel_prefixes_are_escaped_for_patterns() {
        assert_eq!(glob_escape("a*b?[c]\\:room:"), "a\\*b\\?\\[c\\]\\\\:room:");
    }

    #[test]
    fn an_ack_waits_for_both_commit_and_delivery() {
        let client =
            Arc::new(Client::new(1, 1, IpAddr::from([127, 0, 0, 1]), crate::outbox::Outbox::new(8, 1 << 20), 0));
        let frame = crate::protocol::parse_client_frame(r#"{"type":"leave","room":"a","ref":"r"}"#);
        let reference = frame.ok().and_then(|f| f.reference).expect("a ref");
        let mut pending = HashMap::new();
        let ack = |delivered, committed| PendingAck {
            reply: Reply::new(&client, 2),
            reference: Some(reference.clone()),
            room: "lobby".into(),
            ts: 5,
            id: Some(7),
            committed,
            delivered,
        };
        pending.insert(1, ack(true, None));
        assert!(take_if_due(&mut pending, 1).is_none());
        pending.insert(2, ack(false, Some(Ok(()))));
        assert!(take_if_due(&mut pending, 2).is_none());
        pending.insert(3, ack(true, Some(Ok(()))));
        assert!(matches!(take_if_due(&mut pending, 3), Some(AckReady::Ack { id: 7, .. })));
        pending.insert(4, ack(false, Some(Err("no".into()))));
        assert!(matches!(take_if_due(&mut pending, 4), Some(AckReady::Failed { id: 7, .. })));
        assert_eq!(pending.len(), 2);
    }
}
