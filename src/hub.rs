//! The hub: rooms, membership, nicknames, presence, per-room message ids and
//! fan-out, plus the sweeper that enforces every connection deadline.
//!
//! Locking: `std::sync::Mutex`es held for short, synchronous sections and
//! never across an `.await`. Order, when more than one is held: `rooms` →
//! a room's state → a client's outbox or rooms list. `claims` comes before
//! all of them (it is held while a claimed nickname is applied). `nicks`
//! and `clients` are taken alone or after `claims`.
//!
//! Nicknames in a cluster: the local map is a fast path (a nickname taken
//! here is refused at once); a nickname free here is reserved here and
//! claimed from the broker ([`crate::cluster::NickClaim`]), and the guest's
//! `welcome`, or the `renamed` answering `nick`, is sent when the broker
//! answers.
//!
//! Fan-out: a message is encoded once into a WebSocket frame and the same
//! [`Bytes`] is pushed to every member's outbox while the room lock is held,
//! so every member sees a room's messages in id order.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::client::{Client, ConnId, Identity, IdentityKind, REPLY_BYTES, Reply, Roles};
use crate::cluster::{
    AckReady, Cluster, Effect, NickAnswer, NickClaim, NickOp, NickPurpose, PostRequest, PresenceKind, RemoteMember,
};
use crate::identity::impersonation_keys;
use crate::lock;
use crate::metrics::{Metrics, Snapshot};
use crate::moderation::{Held, ModerationState};
use crate::names::{fold_nick, validate_nick, validate_room};
use crate::outbox::{CloseReason, Depth, Outbox, Pushed};
use crate::pipeline::{Outcome, VerdictCounts};
use crate::policy::{Policies, Reloader};
use crate::protocol::{
    ErrorCode, Limits, PresenceEvent, Ref, RequestError, ServerFrame, encode, encode_with_list, now_ms,
};
use crate::store::{Commit, Committed, Json, Store, StoreError, StoredMessage, Write};
use crate::ws::{CloseCode, OpCode, encode_control, payload_of};
use arc_swap::Guard;
use wardroom_plugin_api::{Connection, Context, Message, Verdict};

/// Shared state of the chat: a cheap-to-clone handle is `Arc<Hub>`.
#[derive(Debug)]
pub struct Hub {
    /// The running policies (config and pipeline), reloadable.
    reloader: Arc<Reloader>,
    /// Verdict counts of the pipeline, for `/metrics`.
    pub verdicts: VerdictCounts,
    /// Start of the hub clock used for deadlines (milliseconds).
    epoch: Instant,
    /// Rooms by name. A room exists while it has members.
    rooms: Mutex<HashMap<Arc<str>, Arc<Room>>>,
    /// Folded nickname → the connection using it.
    nicks: Mutex<HashMap<String, ConnId>>,
    /// In a cluster: folded nicknames reserved in `nicks` while the broker
    /// is asked, by connection (see [`Hub::nick_answered`]).
    claims: Mutex<HashMap<ConnId, Vec<String>>>,
    /// Every registered client, for the sweeper and for shutdown.
    clients: Mutex<HashMap<ConnId, Arc<Client>>>,
    /// Source of connection ids.
    next_conn: AtomicU64,
    /// Number of registered clients; shutdown waits for it to reach zero.
    live: watch::Sender<usize>,
    /// Set once shutdown starts: no new client is welcomed.
    closing: AtomicBool,
    /// Counters for `/metrics`.
    pub metrics: Metrics,
    /// Durable state: history, bans, mutes, review queue, audit log.
    store: Arc<dyn Store>,
    /// Bans, mutes, strikes and room settings, checked in memory.
    pub(crate) moderation: ModerationState,
    /// This hub, for callbacks that run after a commit.
    this: Weak<Hub>,
    /// The other nodes, when this node is one of a cluster (`[cluster]`).
    pub(crate) cluster: Option<Arc<Cluster>>,
    /// In a cluster: what the broker delivered for rooms not open here, so
    /// a room opened while messages are on their way to the store misses
    /// none. Taken after `rooms` (or after a room's state), never before.
    heard: Mutex<Heard>,
    /// Callbacks waiting for their commits (see [`Hub::after_commit`]).
    after_commit: mpsc::UnboundedSender<AfterCommit>,
    /// Connections whose write waits for the next pacer tick.
    paced: Arc<Paced>,
}

/// Connections waiting to write (see [`Hub::pace_write`]).
#[derive(Debug, Default)]
struct Paced {
    wakers: Mutex<Vec<std::task::Waker>>,
    tick: tokio::sync::Notify,
}

/// Wakes the connections that wait to write, one pace after the first of
/// them asked; ends at its first wake-up after the hub is gone (or with the
/// runtime).
async fn run_write_pacer(paced: Weak<Paced>, pace: Duration) {
    loop {
        let Some(notified) = paced.upgrade() else { return };
        notified.tick.notified().await;
        drop(notified);
        tokio::time::sleep(pace).await;
        let Some(paced) = paced.upgrade() else { return };
        let wakers = std::mem::take(&mut *lock(&paced.wakers));
        for waker in wakers {
            waker.wake();
        }
    }
}

/// A callback waiting for a commit (see [`Hub::after_commit`]).
struct AfterCommit {
    commit: Commit,
    started: Instant,
    then: Box<dyn FnOnce(Committed) + Send>,
}

/// Runs every commit callback of `hub`, as they resolve, until the hub is
/// gone and the last of them has run.
///
/// One task serves them all. A commit resolves on the store's thread, and a
/// task woken from outside the runtime waits in the runtime's global queue,
/// which a busy scheduler serves once every few dozen polls: with a task per
/// commit, acks fell seconds behind at 20,000 commits/s (the queue grew
/// faster than it was served). This task is woken once for however many
/// commits resolved since it last ran, and runs unconstrained by Tokio's
/// cooperative budget, so that it handles all of them before it yields: with
/// the budget, it yielded after about 64 and fell behind the same way.
///
/// The store resolves batches in the order they were queued, so callbacks
/// wait in that order and only the first is watched: one waker for a whole
/// group commit, not one per batch.
async fn run_commit_callbacks(hub: Weak<Hub>, mut queued: mpsc::UnboundedReceiver<AfterCommit>) {
    let mut waiting = VecDeque::new();
    let mut open = true;
    std::future::poll_fn(|cx| {
        while open {
            match queued.poll_recv(cx) {
                Poll::Ready(Some(next)) => waiting.push_back(next),
                Poll::Ready(None) => open = false,
                Poll::Pending => break,
            }
        }
        while let Some(first) = waiting.front_mut() {
            let Poll::Ready(result) = first.commit.poll_wait(cx) else { break };
            let Some(AfterCommit { started, then, .. }) = waiting.pop_front() else { break };
            if let Some(hub) = hub.upgrade() {
                hub.metrics.store_commit.observe(started.elapsed());
            }
            // A callback that panics (a bug) must not stop every later ack,
            // as it would if it unwound through this one task.
            if std::panic::catch_unwind(AssertUnwindSafe(|| then(result))).is_err() {
                tracing::error!("a commit callback panicked");
            }
        }
        if open || !waiting.is_empty() { Poll::Pending } else { Poll::Ready(()) }
    })
    .await;
}

/// Messages the broker delivered for rooms that are not open on this node.
#[derive(Debug, Default)]
struct Heard {
    /// The last id delivered per room since the subscription began: a room
    /// opened here continues from it (what the store has beyond it is still
    /// on its way from the broker).
    last: HashMap<Arc<str>, u64>,
    /// The latest of those messages (their commits may still be on their
    /// way), oldest first.
    recent: VecDeque<(Arc<str>, u64, Bytes)>,
}

/// Messages of rooms not open on this node kept for [`Hub::room_for_join`].
const RECENT_KEPT: usize = 1024;
/// Rooms whose last delivered id is remembered; beyond, the memory starts over.
const HEARD_ROOMS: usize = 100_000;
/// Latest messages of a room closed here that are kept the same way.
const RECENT_PER_ROOM: usize = 64;

/// A chat room.
#[derive(Debug)]
pub struct Room {
    /// The room's name.
    name: Arc<str>,
    /// Members, ids and history; fan-out happens under this lock.
    state: Mutex<RoomState>,
}

#[derive(Debug, Default)]
struct RoomState {
    /// Members by connection.
    members: HashMap<ConnId, Arc<Client>>,
    /// Id of the last message (ids start at 1).
    last_id: u64,
    /// Recent messages as encoded frames, oldest first, ids increasing
    /// (consecutive on a single node; a cluster node cut off from the
    /// broker may miss some, which `history` then fills in).
    history: VecDeque<(u64, Bytes)>,
    /// Set when the room was removed from the hub; a joiner must retry.
    removed: bool,
    /// In a cluster: nothing was delivered since the broker subscription
    /// began again, so `last_id` may be behind what the store has.
    stale: bool,
}

impl Room {
    /// The room's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A ping frame with an empty payload, shared by every ping.
fn ping_frame() -> Bytes {
    encode_control(OpCode::Ping, &[])
}

impl Hub {
    /// A hub with no rooms or clients, over `store` (whose state is loaded),
    /// on its own or as one node of `cluster`. Must be called within a
    /// Tokio runtime (it spawns the task that runs commit callbacks).
    pub fn new(
        reloader: Arc<Reloader>,
        store: Arc<dyn Store>,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Arc<Self>, StoreError> {
        let snapshot = store.snapshot(now_ms())?;
        let (after_commit, queued) = mpsc::unbounded_channel();
        let hub = Arc::new_cyclic(|this| Self {
            store,
            cluster,
            heard: Mutex::default(),
            moderation: ModerationState::load(snapshot),
            this: this.clone(),
            reloader,
            verdicts: VerdictCounts::default(),
            epoch: Instant::now(),
            rooms: Mutex::default(),
            nicks: Mutex::default(),
            claims: Mutex::default(),
            clients: Mutex::default(),
            next_conn: AtomicU64::new(1),
            live: watch::Sender::new(0),
            closing: AtomicBool::new(false),
            metrics: Metrics::default(),
            after_commit,
            paced: Arc::default(),
        });
        tokio::spawn(tokio::task::unconstrained(run_commit_callbacks(Arc::downgrade(&hub), queued)));
        tokio::spawn(run_write_pacer(Arc::downgrade(&hub.paced), crate::connection::WRITE_PACE));
        Ok(hub)
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The cluster this node is part of, if any.
    pub fn cluster(&self) -> Option<&Arc<Cluster>> {
        self.cluster.as_ref()
    }

    /// Why this node should not get traffic now, if it should not
    /// (`/readyz`): shutting down, the store or the cluster broker unreachable.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.is_closing() {
            Some("shutting down")
        } else if !self.store.is_healthy() {
            Some("store unavailable")
        } else if self.cluster.as_ref().is_some_and(|c| !c.is_connected()) {
            Some("cluster broker unreachable")
        } else {
            None
        }
    }

    /// A weak handle to this hub, for callbacks.
    pub(crate) fn self_ref(&self) -> Weak<Hub> {
        self.this.clone()
    }

    /// Queues `writes` and runs `then` once they are committed (or failed),
    /// without holding up the caller. Commit latency is measured here.
    pub fn commit_then(&self, writes: Vec<Write>, then: impl FnOnce(Committed) + Send + 'static) {
        self.after_commit(self.store.write(writes), then);
    }

    /// Runs `then` once `commit` resolves, without holding up the caller.
    pub fn after_commit(&self, commit: Commit, then: impl FnOnce(Committed) + Send + 'static) {
        let waiting = AfterCommit { commit, started: Instant::now(), then: Box::new(then) };
        if self.after_commit.send(waiting).is_err() {
            // The callback task ended with its runtime: nothing can run it.
            tracing::warn!("commit callback dropped: the runtime is shutting down");
        }
    }

    /// Wakes `waker` at the write pacer's next tick.
    pub(crate) fn pace_write(&self, waker: &std::task::Waker) {
        let first = {
            let mut wakers = lock(&self.paced.wakers);
            wakers.push(waker.clone());
            wakers.len() == 1
        };
        if first {
            self.paced.tick.notify_one();
        }
    }

    /// Every registered client.
    pub fn all_clients(&self) -> Vec<Arc<Client>> {
        lock(&self.clients).values().cloned().collect()
    }

    /// The connections of a user.
    pub fn clients_of(&self, user_id: &str) -> Vec<Arc<Client>> {
        self.all_clients().into_iter().filter(|c| &*c.identity().user_id == user_id).collect()
    }

    /// Sends `frame` to every moderator and admin online.
    pub fn broadcast_to_staff(&self, frame: &Bytes) {
        for client in self.all_clients() {
            if client.identity().roles.is_staff() {
                client.outbox.push(frame.clone());
            }
        }
    }

    /// Sends `frame` to every member of `room`, if it exists.
    pub fn broadcast_to_room(&self, room: &str, frame: &Bytes) {
        let room = lock(&self.rooms).get(room).cloned();
        if let Some(room) = room {
            let state = lock(&room.state);
            self.fan_out(&state, frame, None);
        }
    }

    /// The author of a message in a room's recent history, if it is there.
    pub(crate) fn history_author(&self, room: &str, id: u64) -> Option<String> {
        let room = lock(&self.rooms).get(room).cloned()?;
        let state = lock(&room.state);
        let (_, frame) = state.history.iter().find(|(i, _)| *i == id)?;
        let value: serde_json::Value = serde_json::from_slice(payload_of(frame)).ok()?;
        value["user"].as_str().map(str::to_owned)
    }

    /// Removes a message from a room's recent history; returns its author
    /// if it was there.
    pub(crate) fn remove_from_history(&self, room: &str, id: u64) -> Option<String> {
        let room = lock(&self.rooms).get(room).cloned()?;
        let mut state = lock(&room.state);
        let index = state.history.iter().position(|(i, _)| *i == id)?;
        let (_, frame) = state.history.remove(index)?;
        let value: serde_json::Value = serde_json::from_slice(payload_of(&frame)).ok()?;
        value["user"].as_str().map(str::to_owned)
    }

    /// The running policies: a snapshot, valid for as long as it is held.
    pub fn policies(&self) -> Guard<Arc<Policies>> {
        self.reloader.current()
    }

    /// The reloader that owns the policies.
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// Milliseconds on the hub clock (for deadlines; not wall time).
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether shutdown has started.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Limits announced to clients.
    fn limits(&self) -> Limits {
        let policies = self.policies();
        let c = &policies.config;
        Limits {
            max_message_bytes: c.limits.max_message_bytes,
            max_frame_bytes: c.limits.max_frame_bytes,
            max_rooms_per_connection: c.rooms.max_rooms_per_connection,
            history_page_max: c.rooms.history_page_max,
        }
    }

    /// A client for a connection being upgraded. It counts as live (and is
    /// under the sweeper's deadlines) from now until [`Hub::disconnect`];
    /// [`Hub::register`] welcomes it once the upgrade completes.
    pub fn new_client(&self, addr: IpAddr) -> Arc<Client> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let limits = &self.policies().config.limits;
        let outbox = Outbox::new(limits.outbound_queue, limits.outbound_queue_bytes);
        let client = Arc::new(Client::new(id, random_u64(), addr, outbox, self.now()));
        lock(&self.clients).insert(id, client.clone());
        self.live.send_modify(|n| *n += 1);
        client
    }

    /// Admits an upgraded client. With a token, the client is that user;
    /// without one, a guest (if guests are allowed) with the requested
    /// nickname or a `guest-NNNN`; if guests are not allowed, the client
    /// must send an `auth` frame first. Banned users are refused and closed.
    pub fn register(&self, client: &Arc<Client>, requested_nick: Option<&str>, token: Option<&str>) {
        self.metrics.connections_opened.inc();
        if self.is_closing() {
            client.outbox.close(CloseCode::GOING_AWAY, "server shutting down", CloseReason::Shutdown, false);
            return;
        }
        if let Some(token) = token {
            if let Err(error) = self.authenticate(client, token, None) {
                client.outbox.push(error.to_frame());
                client.outbox.close(CloseCode::POLICY, &error.message, CloseReason::Unauthorized, false);
            }
            return;
        }
        if !self.policies().config.auth.guests {
            // Nothing but an `auth` frame is accepted until then.
            return;
        }
        let guest_id = format!("guest:{}", client.session_str());
        if self.refuse_if_banned(client, &guest_id, true) {
            return;
        }
        let refused = requested_nick.and_then(|nick| self.claim_nick(client.id, nick, None).err());
        let (nick, picked) = match (requested_nick, &refused) {
            (Some(nick), None) => (nick.to_owned(), false),
            _ => (self.claim_guest_nick(client.id), true),
        };
        if let Some(cluster) = self.cluster.as_ref().filter(|c| c.is_connected()) {
            // `welcome` waits for the broker. Cut off from it, a guest keeps
            // the nickname this node gave (see `docs/design.md`).
            let mut claims = lock(&self.claims);
            let claim =
                NickClaim { client: client.clone(), nick, purpose: NickPurpose::Connect { error: refused, picked } };
            if let Err(op) = self.ask_broker(cluster, &mut claims, claim)
                && let NickOp::Claim(claim) = *op
                && let NickPurpose::Connect { error, .. } = claim.purpose
            {
                self.welcome_guest(client, claim.nick, error);
            }
            return;
        }
        self.welcome_guest(client, nick, refused);
    }

    /// Whether the connection's `welcome` waits for the cluster's broker to
    /// confirm its nickname: until then its requests are not read.
    pub fn awaiting_welcome(&self, client: &Client) -> bool {
        self.cluster.is_some()
            && client.identity().kind == IdentityKind::Anonymous
            && lock(&self.claims).contains_key(&client.id)
    }

    /// Welcomes a connection as a guest called `nick`, followed by `error`.
    fn welcome_guest(&self, client: &Arc<Client>, nick: String, error: Option<RequestError>) {
        let guest_id = format!("guest:{}", client.session_str());
        let identity =
            Identity { user_id: guest_id.into(), nick: nick.into(), roles: Roles::MEMBER, kind: IdentityKind::Guest };
        self.welcome(client, identity);
        if let Some(error) = error {
            client.outbox.push(error.to_frame());
        }
    }

    /// Queues a claim of a nickname reserved here (with `claims` held);
    /// gives it back, its reservation kept, if the queue is full.
    fn ask_broker(
        &self,
        cluster: &Cluster,
        claims: &mut HashMap<ConnId, Vec<String>>,
        claim: NickClaim,
    ) -> Result<(), Box<NickOp>> {
        let (id, key) = (claim.client.id, fold_nick(&claim.nick));
        claims.entry(id).or_default().push(key.clone());
        cluster.queue_nick(NickOp::Claim(claim)).inspect_err(|_| {
            tracing::warn!("a nickname claim was not sent: the broker queue is full");
            take_claim(claims, id, &key);
        })
    }

    /// The broker answered a nickname claim: `welcome` the connecting guest
    /// (with a `guest-NNNN` claimed in turn if the nickname was refused), or
    /// answer the `nick` request. A connection that left or signed in
    /// meanwhile gets nothing, and the nickname is released.
    pub(crate) fn nick_answered(&self, claim: NickClaim, answer: NickAnswer) {
        let Some(cluster) = &self.cluster else { return };
        let NickClaim { client, nick, purpose } = claim;
        let key = fold_nick(&nick);
        let mut claims = lock(&self.claims);
        if !take_claim(&mut claims, client.id, &key) {
            // Gone: its reservations here went with it.
            if answer == NickAnswer::Claimed {
                cluster.release_nick(key, client.id);
            }
            return;
        }
        let current = client.identity();
        // Whether the reservation here must stay: the connection uses the
        // nickname, or another of its claims asks for it.
        let kept = |claims: &HashMap<ConnId, Vec<String>>| {
            fold_nick(&current.nick) == key && current.kind == IdentityKind::Guest
                || claims.get(&client.id).is_some_and(|keys| keys.contains(&key))
        };
        let unreserve = |claims: &HashMap<ConnId, Vec<String>>, release: bool| {
            if !kept(claims) {
                self.release_key(client.id, &key);
                if release {
                    cluster.release_nick(key.clone(), client.id);
                }
            }
        };
        let wanted = match &purpose {
            NickPurpose::Connect { .. } => current.kind == IdentityKind::Anonymous && !self.is_closing(),
            NickPurpose::Change { .. } => current.kind == IdentityKind::Guest,
        };
        if !wanted {
            // Signed in (or shutting down) meanwhile.
            unreserve(&claims, answer != NickAnswer::Taken);
            return;
        }
        let refusal = |answer: &NickAnswer| match answer {
            NickAnswer::Staff => RequestError::new(
                ErrorCode::InvalidNick,
                format!("{nick:?} looks like the name of a staff member or a reserved name"),
            ),
            NickAnswer::Failed(_) => cut_off(),
            _ => RequestError::new(ErrorCode::NickTaken, format!("the nickname {nick:?} is in use")),
        };
        match (answer, purpose) {
            (NickAnswer::Claimed, NickPurpose::Connect { error, .. }) => self.welcome_guest(&client, nick, error),
            (NickAnswer::Failed(reason), NickPurpose::Connect { error, .. }) => {
                // Cut off from the broker: the nickname this node gave stands.
                tracing::warn!(reason = %reason, "a guest's nickname could not be claimed across the cluster");
                self.welcome_guest(&client, nick, error);
            }
            (answer, NickPurpose::Connect { error, picked }) => {
                unreserve(&claims, false);
                let error = if picked { error } else { Some(refusal(&answer)) };
                let nick = self.claim_guest_nick(client.id);
                let claim =
                    NickClaim { client: client.clone(), nick, purpose: NickPurpose::Connect { error, picked: true } };
                if let Err(op) = self.ask_broker(cluster, &mut claims, claim)
                    && let NickOp::Claim(claim) = *op
                    && let NickPurpose::Connect { error, .. } = claim.purpose
                {
                    self.welcome_guest(&client, claim.nick, error);
                }
            }
            (NickAnswer::Claimed, NickPurpose::Change { reference, reply }) => {
                let previous = fold_nick(&current.nick);
                if previous != key && !claims.get(&client.id).is_some_and(|keys| keys.contains(&previous)) {
                    self.release_key(client.id, &previous);
                    cluster.release_nick(previous, client.id);
                }
                self.rename(&client, &nick, reference.as_ref());
                // Released once `renamed` is queued.
                drop(reply);
            }
            (answer, NickPurpose::Change { reference, reply }) => {
                unreserve(&claims, matches!(answer, NickAnswer::Failed(_)));
                let mut error = refusal(&answer);
                error.reference = reference;
                self.metrics.request_errors.inc();
                reply.send(error.to_frame());
            }
        }
    }

    /// The folded nicknames local connections hold, for claiming them again
    /// after the node reconnects to the broker.
    pub(crate) fn local_nicks(&self) -> Vec<(String, ConnId)> {
        lock(&self.nicks).iter().map(|(key, id)| (key.clone(), *id)).collect()
    }

    /// Closes a banned client with the ban's reason; true if it was banned.
    fn refuse_if_banned(&self, client: &Client, user_id: &str, guest: bool) -> bool {
        let Some(ban) = self.moderation.ban_for(user_id, client.addr, guest, now_ms()) else { return false };
        let until = ban.expires_at.map_or_else(
            || "for good".to_owned(),
            |end| format!("for {} more seconds", end.saturating_sub(now_ms()).div_ceil(1000)),
        );
        let message = format!("you are banned {until}: {}", ban.reason);
        client.outbox.push(RequestError::new(ErrorCode::Banned, message.clone()).to_frame());
        client.outbox.close(CloseCode::POLICY, &message, CloseReason::Banned, false);
        true
    }

    /// Sets the client's identity and sends `welcome`, plus the mute in
    /// force, if any.
    fn welcome(&self, client: &Arc<Client>, identity: Identity) {
        let session = client.session_str();
        let limits = self.limits();
        client.outbox.push(encode(&ServerFrame::Welcome {
            protocol: crate::protocol::PROTOCOL_VERSION,
            session: &session,
            user: identity.view(),
            limits: &limits,
        }));
        let now = now_ms();
        if let Some(mute) = self.moderation.mute_of(&identity.user_id, now) {
            client.outbox.push(encode(&ServerFrame::Muted {
                until: mute.until,
                remaining_ms: mute.until - now,
                reason: &mute.reason,
            }));
        }
        if identity.roles.is_staff() {
            let looks = impersonation_keys(&identity.nick);
            if let Some(cluster) = &self.cluster
                && cluster.queue_nick(NickOp::Staff { looks: looks.clone() }).is_err()
            {
                tracing::warn!("a staff name was not shared with the cluster: the broker queue is full");
            }
            if self.moderation.note_staff_name(looks.clone()) {
                // Kept, so that the name stays protected after a restart.
                self.commit_then(vec![Write::StaffName { looks, at: now_ms() }], |result| {
                    if let Err(e) = result {
                        tracing::warn!(error = %e, "a staff name was not stored");
                    }
                });
            }
            self.send_pending_review(client);
        }
        client.set_identity(identity);
    }

    /// Moderators and admins get the pending review queue (oldest first) as
    /// `review` frames when they arrive, so that a page opened, reloaded or
    /// reconnected after an item was queued still shows it.
    fn send_pending_review(&self, client: &Client) {
        // At most 100, and a quarter of the client's queue, so that a small
        // `outbound_queue` does not close a moderator as it signs in.
        let most = (client.outbox.capacity() / 4).clamp(1, 100);
        match self.store().review_items(Some(crate::store::ReviewStatus::Pending)) {
            Ok(items) => {
                for item in items.iter().take(most) {
                    client.outbox.push(encode(&ServerFrame::Review { item }));
                }
            }
            Err(e) => tracing::warn!(error = %e, "the pending review queue could not be read"),
        }
    }

    /// Handles a token, from `?token=` or an `auth` frame: the client becomes
    /// that user (a guest's nickname is released).
    pub fn authenticate(&self, client: &Arc<Client>, token: &str, reference: Option<&Ref>) -> Result<(), RequestError> {
        let verified = self
            .policies()
            .auth
            .verify(token)
            .map_err(|e| RequestError::new(ErrorCode::Unauthorized, e.to_string()))?;
        let current = client.identity();
        if current.kind == IdentityKind::User && *current.user_id != verified.user_id {
            return Err(RequestError::new(
                ErrorCode::BadRequest,
                "this connection is already signed in as another user",
            ));
        }
        if self.refuse_if_banned(client, &verified.user_id, false) {
            return Ok(());
        }
        // A nickname claim answered now must see the new identity.
        let _claims = self.cluster.is_some().then(|| lock(&self.claims));
        let current = client.identity();
        if current.kind == IdentityKind::Guest {
            self.free_nick(client.id, &current.nick);
        }
        let _ = reference;
        self.welcome(
            client,
            Identity {
                user_id: verified.user_id.into(),
                nick: verified.name.into(),
                roles: verified.roles,
                kind: IdentityKind::User,
            },
        );
        Ok(())
    }

    /// Removes a client that disconnected: leaves its rooms (with presence
    /// events) and frees its nickname.
    pub fn disconnect(&self, client: &Arc<Client>) {
        let rooms = std::mem::take(&mut *lock(&client.rooms));
        // Under `claims`, so a claim answered later finds the client gone.
        let (identity, claimed) = {
            let mut claims = lock(&self.claims);
            (client.identity(), claims.remove(&client.id))
        };
        self.policies().pipeline.on_disconnect(&Connection { addr: client.addr, origin: None, user_id: None });
        for room in rooms {
            self.remove_member(&room, client, &identity);
        }
        if identity.kind == IdentityKind::Guest {
            self.free_nick(client.id, &identity.nick);
            self.moderation.note_departed_guest(&identity.user_id, client.addr);
        }
        for key in claimed.into_iter().flatten() {
            self.release_key(client.id, &key);
        }
        if lock(&self.clients).remove(&client.id).is_some() {
            self.live.send_modify(|n| *n -= 1);
        }
    }

    /// Counts a connection that was upgraded and has now ended.
    pub fn record_close(&self, client: &Client) {
        let reason = client.outbox.close_reason().unwrap_or(CloseReason::Gone);
        self.metrics.closed(reason);
        tracing::debug!(conn = client.id, reason = reason.as_str(), "disconnected");
    }

    /// Rooms and their members, for the admin API.
    pub fn room_overview(&self) -> serde_json::Value {
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        let mut members: std::collections::BTreeMap<String, Vec<serde_json::Value>> = rooms
            .iter()
            .map(|room| {
                let members = lock(&room.state)
                    .members
                    .values()
                    .map(|c| {
                        let identity = c.identity();
                        serde_json::json!({"user": identity.view(), "conn": c.id, "addr": c.addr.to_string()})
                    })
                    .collect();
                (room.name.to_string(), members)
            })
            .collect();
        if let Some(cluster) = &self.cluster {
            // Members on other nodes: `conn` is `<node>:<connection>` there.
            for (room, member, who) in cluster.all_remote() {
                let view =
                    serde_json::json!({"user": who.view(who.roles()), "conn": member, "addr": who.addr.to_string()});
                members.entry(room).or_default().push(view);
            }
        }
        let overview = members
            .into_iter()
            .map(|(room, members)| {
                let settings = self.moderation.room(&room);
                serde_json::json!({
                    "room": room,
                    "member_count": members.len(),
                    "members": members,
                    "slow_mode": settings.slow_mode_secs,
                    "locked": settings.locked,
                })
            })
            .collect();
        serde_json::Value::Array(overview)
    }

    /// Current values for `/metrics`.
    pub fn snapshot(&self, tcp_connections: usize) -> Snapshot {
        let clients: Vec<Arc<Client>> = lock(&self.clients).values().cloned().collect();
        let depths: Vec<Depth> = clients.iter().map(|c| c.outbox.depth()).collect();
        Snapshot {
            verdicts: self.verdicts.snapshot(),
            reloads: self.reloader.counts().collect(),
            connections: clients.len(),
            tcp_connections,
            rooms: lock(&self.rooms).len(),
            queued_frames: depths.iter().map(|d| d.frames).sum(),
            max_queued_frames: depths.iter().map(|d| d.frames).max().unwrap_or(0),
            queued_bytes: depths.iter().map(|d| d.bytes).sum(),
            max_queued_bytes: depths.iter().map(|d| d.bytes).max().unwrap_or(0),
            cluster: self.cluster.as_ref().map(|c| (c.is_connected(), c.remote_membership_count())),
        }
    }

    /// Frees `nick` if connection `id` holds it, here and, in a cluster, in
    /// the broker.
    fn free_nick(&self, id: ConnId, nick: &str) {
        let key = fold_nick(nick);
        self.release_key(id, &key);
        if let Some(cluster) = &self.cluster {
            cluster.release_nick(key, id);
        }
    }

    /// Frees the folded nickname `key` here if connection `id` holds it.
    fn release_key(&self, id: ConnId, key: &str) {
        let mut nicks = lock(&self.nicks);
        if nicks.get(key) == Some(&id) {
            nicks.remove(key);
        }
    }

    /// Claims `nick` for connection `id` on this node, releasing `previous`
    /// if given. Names that look like a reserved name or a staff member's
    /// are refused.
    fn claim_nick(&self, id: ConnId, nick: &str, previous: Option<&str>) -> Result<(), RequestError> {
        let policies = self.policies();
        validate_nick(nick, &policies.config.nicknames).map_err(|m| RequestError::new(ErrorCode::InvalidNick, m))?;
        if policies.auth.is_reserved(nick) || self.moderation.looks_like_staff(&impersonation_keys(nick)) {
            return Err(RequestError::new(
                ErrorCode::InvalidNick,
                format!("{nick:?} looks like the name of a staff member or a reserved name"),
            ));
        }
        let key = fold_nick(nick);
        let mut nicks = lock(&self.nicks);
        match nicks.get(&key) {
            Some(&owner) if owner != id => {
                return Err(RequestError::new(ErrorCode::NickTaken, format!("the nickname {nick:?} is in use")));
            }
            _ => {}
        }
        if let Some(previous) = previous.map(fold_nick).filter(|p| *p != key) {
            nicks.remove(&previous);
        }
        nicks.insert(key, id);
        Ok(())
    }

    /// Picks a free `guest-NNNN` nickname, with more digits as guests grow.
    fn claim_guest_nick(&self, id: ConnId) -> String {
        let mut nicks = lock(&self.nicks);
        let mut digits = 4u32;
        loop {
            for _ in 0..16 {
                let low = 10u64.pow(digits - 1);
                let n = low + random_u64() % (9 * low);
                let nick = format!("guest-{n}");
                if !nicks.contains_key(&nick) {
                    nicks.insert(nick.clone(), id);
                    return nick;
                }
            }
            digits += 1;
        }
    }

    /// Handles `nick`: changes the nickname and tells every room.
    pub fn set_nick(&self, client: &Arc<Client>, nick: &str, reference: Option<&Ref>) -> Result<(), RequestError> {
        let old = client.identity();
        if old.kind == IdentityKind::User {
            return Err(RequestError::new(ErrorCode::Forbidden, "your name comes from your account"));
        }
        if let Some(cluster) = &self.cluster {
            // Answered once the broker has; cut off from it, refused rather
            // than risk a nickname used twice.
            let mut claims = lock(&self.claims);
            if !cluster.is_connected() {
                return Err(cut_off());
            }
            self.claim_nick(client.id, nick, None)?;
            let purpose = NickPurpose::Change { reference: reference.cloned(), reply: Reply::new(client, 1) };
            let claim = NickClaim { client: client.clone(), nick: nick.to_owned(), purpose };
            if self.ask_broker(cluster, &mut claims, claim).is_err() {
                let key = fold_nick(nick);
                if key != fold_nick(&old.nick) && !claims.get(&client.id).is_some_and(|keys| keys.contains(&key)) {
                    self.release_key(client.id, &key);
                }
                return Err(cut_off());
            }
            return Ok(());
        }
        self.claim_nick(client.id, nick, Some(&old.nick))?;
        self.rename(client, nick, reference);
        Ok(())
    }

    /// Gives the client the nickname `nick` (already claimed) and tells it
    /// and every room.
    fn rename(&self, client: &Arc<Client>, nick: &str, reference: Option<&Ref>) {
        let old = client.identity();
        let new = Identity { nick: nick.into(), ..(*old).clone() };
        client.outbox.push(encode(&ServerFrame::Renamed { user: new.view(), previous: &old.nick, reference }));
        client.set_identity(new);
        let new = client.identity();
        let rooms = lock(&client.rooms).clone();
        for room in rooms {
            let state = lock(&room.state);
            self.announce(&room.name, client, &new, PresenceKind::Nick, Some(&old.nick));
            if self.room_size(&room.name, &state) <= self.policies().config.rooms.presence_max_members {
                let frame = encode(&ServerFrame::Presence {
                    room: &room.name,
                    user: new.view(),
                    event: PresenceEvent::Nick,
                    previous: Some(&old.nick),
                });
                self.fan_out(&state, &frame, Some(client.id));
            }
        }
    }

    /// Handles `join`: enters (or creates) a room and answers `joined` with
    /// the members and recent history; the other members get `presence`.
    pub fn join(&self, client: &Arc<Client>, name: &str, reference: Option<&Ref>) -> Result<(), RequestError> {
        let policies = self.policies();
        let rooms_config = &policies.config.rooms;
        validate_room(name, rooms_config.max_name_chars).map_err(|m| RequestError::new(ErrorCode::InvalidRoom, m))?;
        let already = client.room(name);
        if already.is_none() && lock(&client.rooms).len() >= rooms_config.max_rooms_per_connection {
            return Err(RequestError::new(
                ErrorCode::TooManyRooms,
                format!("one connection may be in at most {} rooms", rooms_config.max_rooms_per_connection),
            ));
        }
        let identity = client.identity();
        if already.is_none() {
            let (names, count) = identity.roles.name_array();
            let ctx = filter_context(&identity, &names[..count], client, name);
            let outcome = policies.pipeline.on_join(name, &ctx);
            self.record_outcome(&outcome, client.addr, Some(name));
            if !outcome.verdict.lets_through() {
                return Err(refusal(outcome.verdict));
            }
        }
        loop {
            let room = match &already {
                Some(room) => room.clone(),
                None => self.room_for_join(name)?,
            };
            let mut state = lock(&room.state);
            if state.removed {
                continue;
            }
            let is_new = !state.members.contains_key(&client.id);
            if is_new && state.members.len() >= rooms_config.max_members {
                return Err(RequestError::new(
                    ErrorCode::RoomFull,
                    format!("room {name:?} is full ({} members)", rooms_config.max_members),
                ));
            }
            if is_new {
                state.members.insert(client.id, client.clone());
            }
            let joined = self.joined_frame(&room, &state, reference);
            client.outbox.push(joined);
            if is_new {
                self.announce(&room.name, client, &identity, PresenceKind::Join, None);
                if self.room_size(&room.name, &state) <= rooms_config.presence_max_members {
                    let frame = encode(&ServerFrame::Presence {
                        room: &room.name,
                        user: identity.view(),
                        event: PresenceEvent::Join,
                        previous: None,
                    });
                    self.fan_out(&state, &frame, Some(client.id));
                }
                drop(state);
                lock(&client.rooms).push(room);
            }
            return Ok(());
        }
    }

    /// The room called `name`, created if it does not exist and the room
    /// limit allows.
    fn room_for_join(&self, name: &str) -> Result<Arc<Room>, RequestError> {
        let mut rooms = lock(&self.rooms);
        if let Some(room) = rooms.get(name) {
            return Ok(room.clone());
        }
        if rooms.len() >= self.policies().config.rooms.max_rooms {
            return Err(RequestError::new(
                ErrorCode::RoomLimit,
                format!("the server holds its maximum of {} rooms", self.policies().config.rooms.max_rooms),
            ));
        }
        let policies = self.policies();
        let unavailable =
            |e: StoreError| RequestError::new(ErrorCode::Unavailable, format!("cannot open the room: {e}"));
        let mut last_id = self.store.last_message_id(name).map_err(unavailable)?;
        let history = self.store.history(name, None, policies.config.rooms.history_kept).map_err(unavailable)?;
        let mut history: VecDeque<(u64, Bytes)> =
            history.into_iter().map(|m| (m.id, crate::ws::text_frame(m.json.as_bytes()))).collect();
        // A commit between the two reads may have added to the history.
        last_id = last_id.max(history.back().map_or(0, |(id, _)| *id));
        if self.cluster.is_some() {
            let heard = lock(&self.heard);
            if let Some(&cursor) = heard.last.get(name) {
                // Continue from the broker's position: what the store has
                // beyond it arrives live, and what it lacks up to it (commits
                // still on their way) comes from what was heard.
                history.retain(|(id, _)| *id <= cursor);
                for (_, id, frame) in heard.recent.iter().filter(|(room, _, _)| &**room == name) {
                    if *id <= cursor && !history.iter().any(|(known, _)| known == id) {
                        history.push_back((*id, frame.clone()));
                    }
                }
                history.make_contiguous().sort_by_key(|(id, _)| *id);
                last_id = cursor;
            }
        }
        while history.len() > policies.config.rooms.history_kept {
            history.pop_front();
        }
        let name: Arc<str> = name.into();
        let room = Arc::new(Room {
            name: name.clone(),
            state: Mutex::new(RoomState { last_id, history, ..RoomState::default() }),
        });
        rooms.insert(name, room.clone());
        Ok(room)
    }

    fn joined_frame(&self, room: &Room, state: &RoomState, reference: Option<&Ref>) -> Bytes {
        let most = self.policies().config.rooms.presence_max_members;
        let identities: Vec<Arc<Identity>> = state.members.values().take(most).map(|m| m.identity()).collect();
        let remote = self.cluster.as_ref().map(|c| c.remote_members(&room.name)).unwrap_or_default();
        let remote_roles: Vec<Roles> = remote.iter().map(RemoteMember::roles).collect();
        let members: Vec<_> = identities
            .iter()
            .map(|i| i.view())
            .chain(remote.iter().zip(&remote_roles).map(|(m, roles)| m.view(*roles)))
            .take(most)
            .collect();
        let skip = state.history.len().saturating_sub(self.policies().config.rooms.history_on_join);
        let settings = self.moderation.room(&room.name);
        encode_with_list(
            &ServerFrame::Joined {
                room: &room.name,
                member_count: state.members.len() + remote.len(),
                members: &members,
                slow_mode: settings.slow_mode_secs,
                locked: settings.locked,
                reference,
            },
            "history",
            state.history.iter().skip(skip).map(|(_, frame)| payload_of(frame)),
        )
    }

    /// Handles `leave`.
    pub fn leave(&self, client: &Arc<Client>, name: &str, reference: Option<&Ref>) -> Result<(), RequestError> {
        let room = {
            let mut rooms = lock(&client.rooms);
            let index = rooms.iter().position(|r| r.name() == name).ok_or_else(|| not_member(name))?;
            rooms.swap_remove(index)
        };
        self.remove_member(&room, client, &client.identity());
        client.outbox.push(encode(&ServerFrame::Left { room: name, reference }));
        Ok(())
    }

    fn remove_member(&self, room: &Arc<Room>, client: &Client, identity: &Identity) {
        let now_empty = {
            let mut state = lock(&room.state);
            if state.members.remove(&client.id).is_none() {
                return;
            }
            self.announce(&room.name, client, identity, PresenceKind::Leave, None);
            if !state.members.is_empty()
                && self.room_size(&room.name, &state) < self.policies().config.rooms.presence_max_members
            {
                let frame = encode(&ServerFrame::Presence {
                    room: &room.name,
                    user: identity.view(),
                    event: PresenceEvent::Leave,
                    previous: None,
                });
                self.fan_out(&state, &frame, None);
            }
            state.members.is_empty()
        };
        if now_empty {
            let mut rooms = lock(&self.rooms);
            let mut state = lock(&room.state);
            if state.members.is_empty() && !state.removed {
                state.removed = true;
                rooms.remove(&room.name);
                if self.cluster.is_some() {
                    // Commits of the latest messages may still be on their
                    // way (from another node): a room opened again soon
                    // continues from here.
                    let skip = state.history.len().saturating_sub(RECENT_PER_ROOM);
                    for (id, frame) in state.history.iter().skip(skip) {
                        self.heard(&room.name, *id, frame);
                    }
                    if !state.stale {
                        let mut heard = lock(&self.heard);
                        let last = heard.last.entry(room.name.clone()).or_default();
                        *last = (*last).max(state.last_id);
                    }
                }
            }
        }
    }

    /// Handles `message`: gives it the room's next id, keeps it in history,
    /// and sends the same encoded frame to every member (the sender too),
    /// then `ack` to the sender if the frame had a `ref`.
    pub fn post(
        &self,
        client: &Arc<Client>,
        name: &str,
        content: String,
        reference: Option<&Ref>,
    ) -> Result<(), RequestError> {
        let room = client.room(name).ok_or_else(|| not_member(name))?;
        if content.trim().is_empty() {
            return Err(RequestError::new(ErrorCode::BadRequest, "a message needs some text; this one is empty"));
        }
        let identity = client.identity();
        if self.cluster.as_ref().is_some_and(|c| !c.is_connected()) {
            return Err(cut_off());
        }
        self.may_post(&identity, name)?;
        let policies = self.policies();
        let mut message = Message { content };
        let (names, count) = identity.roles.name_array();
        let ctx = filter_context(&identity, &names[..count], client, name);
        let outcome = policies.pipeline.on_message(&mut message, &ctx);
        self.record_outcome(&outcome, client.addr, Some(name));
        let filter = outcome.decided_by.as_deref().unwrap_or("");
        match outcome.verdict {
            Verdict::Allow | Verdict::Modified => {}
            Verdict::Hold { reason } => {
                let held = Held { room: name, content: &message.content, reason: &reason, filter, reference };
                self.hold(client, &identity, held);
                return Ok(());
            }
            Verdict::Escalate { action, reason } => {
                self.escalate(&identity, filter, action, &reason, name);
                self.strike(&identity, filter, outcome.strikes, name);
                return Err(refusal(Verdict::Escalate { action, reason }));
            }
            other => {
                self.strike(&identity, filter, outcome.strikes, name);
                return Err(refusal(other));
            }
        }

        if let Some(cluster) = &self.cluster {
            let floor = lock(&room.state).last_id;
            let ts = now_ms();
            let post = self.post_request(&room.name, floor, &identity.user_id, &identity.nick, &message.content, ts);
            // Both the echo (from the broker: this JSON with an id of at
            // most 20 digits, in a frame header of at most 10 bytes) and
            // the ack come later.
            let echo_bytes = post.head.len() + post.tail.len() + 30;
            let acked = reference.is_some();
            let reply =
                Reply::with_bytes(client, 1 + usize::from(acked), echo_bytes + usize::from(acked) * REPLY_BYTES);
            let waiting = Some((reply, reference.cloned()));
            let flags = outcome.flags;
            let on_id: Option<OnId> = (!flags.is_empty()).then(|| {
                let (identity, content, room) = (identity.clone(), message.content.clone(), room.name.clone());
                Box::new(move |hub: &Hub, id: u64| hub.flag(&room, id, &identity, &content, &flags)) as OnId
            });
            let post = PostRequest { on_id, ..post };
            cluster.post(post, waiting).map_err(|_| cut_off())?;
            self.metrics.messages_in.inc();
            return Ok(());
        }
        let (id, ts, commit) = self.publish(&room, &identity.user_id, &identity.nick, &message.content, now_ms());
        self.metrics.messages_in.inc();
        self.flag(name, id, &identity, &message.content, &outcome.flags);
        // The ack waits for the message to be durable.
        let Some(reference) = reference.cloned() else { return Ok(()) };
        let (reply, room_name) = (Reply::new(client, 1), room.name.clone());
        self.after_commit(commit, move |result| {
            let frame = match result {
                Ok(_) => encode(&ServerFrame::Ack { reference: &reference, id, room: &room_name, ts }),
                Err(e) => RequestError {
                    reference: Some(reference),
                    ..RequestError::new(ErrorCode::Unavailable, format!("message {id} may not have been saved: {e}"))
                }
                .to_frame(),
            };
            reply.send(frame);
        });
        Ok(())
    }

    /// Appends a message to a room: the next id, the recent history, the
    /// fan-out to every member, and the store write (queued while the room
    /// is locked, so ids reach the store in order). Returns the id, the time
    /// and the commit to wait for before acknowledging.
    fn publish(&self, room: &Room, user_id: &Arc<str>, nick: &str, content: &str, ts: u64) -> (u64, u64, Commit) {
        let history_kept = self.policies().config.rooms.history_kept;
        let mut state = lock(&room.state);
        let id = state.last_id + 1;
        let frame = encode(&ServerFrame::Message { room: &room.name, id, from: nick, user: user_id, content, ts });
        let stored =
            StoredMessage { room: room.name.clone(), id, user_id: user_id.clone(), json: Json::of_frame(&frame), ts };
        let commit = self.store.write(vec![Write::Message(stored)]);
        state.last_id = id;
        state.history.push_back((id, frame.clone()));
        while state.history.len() > history_kept {
            state.history.pop_front();
        }
        self.fan_out(&state, &frame, None);
        (id, ts, commit)
    }

    /// Tells the moderators what the filters flagged in message `id`.
    fn flag(&self, room: &str, id: u64, identity: &Identity, content: &str, flags: &[(Arc<str>, String)]) {
        for (filter, reason) in flags {
            let frame = encode(&ServerFrame::Flagged { room, id, user: identity.view(), content, reason, filter });
            self.effect(Effect::ToStaff { frame: json_of(&frame) });
        }
    }

    /// A message for the cluster's poster: its JSON split around the id
    /// Redis will give it.
    fn post_request(
        &self,
        room: &Arc<str>,
        floor: u64,
        user_id: &str,
        nick: &str,
        content: &str,
        ts: u64,
    ) -> PostRequest {
        let frame = encode(&ServerFrame::Message { room, id: 0, from: nick, user: user_id, content, ts });
        let (head, tail) = split_at_id(&json_of(&frame));
        PostRequest { room: room.clone(), floor, head, tail, user_id: user_id.to_owned(), ts, token: 0, on_id: None }
    }

    /// A post got its id from the cluster: its store write is queued now
    /// (the poster hands ids over in order), and its ack waits for the
    /// commit and for the message to come back from the broker.
    pub(crate) fn cluster_posted(&self, mut post: PostRequest, id: u64) {
        let json = format!("{}{id}{}", post.head, post.tail);
        let token = post.token;
        if let (Some(cluster), true) = (&self.cluster, token != 0) {
            cluster.assigned(token, id);
        }
        if let Some(on_id) = post.on_id.take() {
            on_id(self, id);
        }
        let stored =
            StoredMessage { room: post.room.clone(), id, user_id: post.user_id.into(), json: json.into(), ts: post.ts };
        let hub = self.self_ref();
        let room = post.room;
        self.commit_then(vec![Write::Message(stored)], move |result| {
            let Some(hub) = hub.upgrade() else { return };
            if let Err(e) = &result {
                tracing::error!(error = %e, room = ?room, id, "a message of the cluster was not saved");
            }
            if token == 0 {
                return;
            }
            if let Some(cluster) = &hub.cluster {
                let due = cluster.committed(token, result.map(|_| ()).map_err(|e| e.to_string()));
                hub.release_acks(due.into_iter().collect());
            }
        });
    }

    /// A post the broker did not take: its author gets `unavailable`.
    pub(crate) fn cluster_post_failed(&self, post: PostRequest, reason: &str) {
        let waiting = match (&self.cluster, post.token) {
            (Some(cluster), token) if token != 0 => cluster.forget(token),
            _ => None,
        };
        if let Some((reply, reference)) = waiting {
            let error = RequestError {
                reference,
                retry_after_ms: Some(1000),
                ..RequestError::new(ErrorCode::Unavailable, format!("the message was not sent: {reason}"))
            };
            reply.send(error.to_frame());
        }
    }

    /// Sends the acks (or errors) that are due, and releases the replies
    /// promised to the authors (a post without a `ref` gets no ack).
    pub(crate) fn release_acks(&self, due: Vec<AckReady>) {
        for ready in due {
            match ready {
                AckReady::Ack { reply, reference: Some(reference), room, id, ts } => {
                    reply.send(encode(&ServerFrame::Ack { reference: &reference, id, room: &room, ts }));
                }
                AckReady::Failed { reply, reference: Some(reference), id, reason } => {
                    let error = RequestError {
                        reference: Some(reference),
                        ..RequestError::new(
                            ErrorCode::Unavailable,
                            format!("message {id} may not have been saved: {reason}"),
                        )
                    };
                    reply.send(error.to_frame());
                }
                AckReady::Ack { reference: None, .. } | AckReady::Failed { reference: None, .. } => {}
            }
        }
    }

    /// A message from the broker (this node's or another's): delivered to
    /// the room's members here, in id order; an id already seen (the room
    /// was opened from a store that had it) is skipped. `own` is the token
    /// of this node's post, whose ack may now be due.
    pub(crate) fn deliver_published(&self, name: &str, id: u64, json: &str, own: Option<u64>) {
        let frame = crate::ws::text_frame(json.as_bytes());
        loop {
            let open = {
                let rooms = lock(&self.rooms);
                let open = rooms.get(name).cloned();
                if open.is_none() {
                    self.heard(name, id, &frame);
                }
                open
            };
            let Some(room) = open else { break };
            let history_kept = self.policies().config.rooms.history_kept;
            let mut state = lock(&room.state);
            if state.removed {
                // Closed meanwhile (and maybe opened again): look again.
                continue;
            }
            state.stale = false;
            if id > state.last_id {
                state.last_id = id;
                state.history.push_back((id, frame.clone()));
                while state.history.len() > history_kept {
                    state.history.pop_front();
                }
                self.fan_out(&state, &frame, None);
            }
            break;
        }
        if let (Some(token), Some(cluster)) = (own, &self.cluster) {
            self.release_acks(cluster.delivered(token).into_iter().collect());
        }
    }

    /// Remembers a message of a room that is not open here (see `heard`).
    fn heard(&self, room: &str, id: u64, frame: &Bytes) {
        let mut heard = lock(&self.heard);
        if heard.recent.len() >= RECENT_KEPT {
            heard.recent.pop_front();
        }
        let room: Arc<str> = room.into();
        heard.recent.push_back((room.clone(), id, frame.clone()));
        if heard.last.len() >= HEARD_ROOMS && !heard.last.contains_key(&room) {
            heard.last.clear();
        }
        let last = heard.last.entry(room).or_default();
        *last = (*last).max(id);
    }

    /// A new subscription to the broker: what it delivers continues from
    /// nothing heard so far (what was published while there was none is in
    /// the store).
    pub(crate) fn new_subscription(&self) {
        let rooms = lock(&self.rooms);
        for room in rooms.values() {
            lock(&room.state).stale = true;
        }
        let mut heard = lock(&self.heard);
        heard.last.clear();
        heard.recent.clear();
    }

    /// Members of a room: here and, in a cluster, on the other nodes.
    fn room_size(&self, room: &str, state: &RoomState) -> usize {
        state.members.len() + self.cluster.as_ref().map_or(0, |c| c.remote_count(room))
    }

    /// Tells the other nodes about a presence change of a local client.
    fn announce(&self, room: &str, client: &Client, identity: &Identity, event: PresenceKind, previous: Option<&str>) {
        if let Some(cluster) = &self.cluster {
            cluster.publish(Effect::Presence {
                room: room.to_owned(),
                member: cluster.member_key(client.id),
                who: remote_member(client, identity),
                event,
                previous: previous.map(str::to_owned),
            });
        }
    }

    /// A presence change on another node: the view of its members follows,
    /// and the room's members here get `presence` (nothing if it changes
    /// nothing, such as a join announced again after a reconnection).
    pub(crate) fn apply_presence(
        &self,
        room: &str,
        member: &str,
        who: &RemoteMember,
        event: PresenceKind,
        previous: Option<&str>,
    ) {
        let Some(cluster) = &self.cluster else { return };
        let Some(open) = lock(&self.rooms).get(room).cloned() else {
            cluster.update_remote(room, member, who, event);
            return;
        };
        let state = lock(&open.state);
        if !cluster.update_remote(room, member, who, event) || state.removed || state.members.is_empty() {
            return;
        }
        let size = self.room_size(room, &state);
        let most = self.policies().config.rooms.presence_max_members;
        let shown = if event == PresenceKind::Leave { size < most } else { size <= most };
        if shown {
            let frame =
                encode(&ServerFrame::Presence { room, user: who.view(who.roles()), event: event.event(), previous });
            self.fan_out(&state, &frame, None);
        }
    }

    /// Every local member of every room, for announcing them to the cluster.
    pub(crate) fn local_presence(&self) -> Vec<(String, String, RemoteMember)> {
        let Some(cluster) = &self.cluster else { return Vec::new() };
        let rooms: Vec<Arc<Room>> = lock(&self.rooms).values().cloned().collect();
        let mut members = Vec::new();
        for room in rooms {
            let state = lock(&room.state);
            for client in state.members.values() {
                let identity = client.identity();
                members.push((room.name.to_string(), cluster.member_key(client.id), remote_member(client, &identity)));
            }
        }
        members
    }

    /// Delivers an approved held message to its room, with its original time.
    pub(crate) fn deliver_approved(&self, item: &crate::store::ReviewItem) {
        if let Some(cluster) = &self.cluster {
            let open = lock(&self.rooms).get(item.room.as_str()).cloned();
            let floor = match open {
                Some(room) => lock(&room.state).last_id,
                None => self.store.last_message_id(&item.room).unwrap_or(0),
            };
            let room: Arc<str> = item.room.as_str().into();
            let post = self.post_request(&room, floor, &item.user_id, &item.nick, &item.content, item.ts);
            if cluster.post(post, None).is_err() {
                tracing::error!(room = ?item.room, "cannot deliver an approved message: the broker is unreachable");
            }
            return;
        }
        let rooms = lock(&self.rooms);
        let room = match rooms.get(item.room.as_str()) {
            Some(room) => room.clone(),
            None => match (self.store.last_message_id(&item.room), self.store.history(&item.room, None, 0)) {
                (Ok(last_id), Ok(_)) => {
                    // Nobody is in the room: publish through a room that
                    // exists only for this message.
                    let name: Arc<str> = item.room.as_str().into();
                    Arc::new(Room {
                        name,
                        state: Mutex::new(RoomState { last_id, removed: true, ..RoomState::default() }),
                    })
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, room = ?item.room, "cannot deliver an approved message");
                    return;
                }
            },
        };
        let (id, _, commit) = self.publish(&room, &item.user_id.as_str().into(), &item.nick, &item.content, item.ts);
        drop(rooms);
        self.after_commit(commit, move |result| {
            if let Err(e) = result {
                tracing::error!(error = %e, id, "an approved message was not saved");
            }
        });
    }

    /// Counts and logs what the pipeline decided: shadow verdicts (what
    /// would have happened) and flags.
    pub fn record_outcome(&self, outcome: &Outcome, addr: IpAddr, room: Option<&str>) {
        self.verdicts.record(outcome);
        for (filter, verdict) in &outcome.shadow {
            tracing::info!(filter = %filter, verdict = verdict.name(), detail = ?verdict, %addr, room = ?room, "shadow mode: not enforced");
        }
        for (filter, reason) in &outcome.flags {
            tracing::info!(filter = %filter, reason = ?reason, %addr, room = ?room, "message flagged");
        }
    }

    /// Pushes `frame` to every member except `skip`.
    fn fan_out(&self, state: &RoomState, frame: &Bytes, skip: Option<ConnId>) {
        let mut queued = 0;
        for (id, member) in &state.members {
            if Some(*id) == skip {
                continue;
            }
            match member.outbox.push(frame.clone()) {
                Pushed::Queued => queued += 1,
                Pushed::Overflow => tracing::info!(conn = member.id, "closing slow consumer"),
                Pushed::Closed => {}
            }
        }
        self.metrics.deliveries.add(queued);
    }

    /// Handles `history`: up to `limit` messages before id `before` (or the
    /// latest), oldest first.
    pub fn history(
        &self,
        client: &Arc<Client>,
        name: &str,
        before: Option<u64>,
        limit: Option<usize>,
        reference: Option<&Ref>,
    ) -> Result<(), RequestError> {
        client.room(name).ok_or_else(|| not_member(name))?;
        let max = self.policies().config.rooms.history_page_max;
        if limit == Some(0) {
            return Err(RequestError::new(ErrorCode::BadRequest, format!("`limit` is from 1 to {max}, not 0")));
        }
        let limit = limit.unwrap_or(max).min(max);
        // One more than asked tells whether older messages exist.
        let mut messages = self
            .store
            .history(name, before, limit + 1)
            .map_err(|e| RequestError::new(ErrorCode::Unavailable, format!("history is unavailable: {e}")))?;
        let more = messages.len() > limit;
        if more {
            messages.remove(0);
        }
        let frame = encode_with_list(
            &ServerFrame::History { room: name, more, reference },
            "messages",
            messages.iter().map(|m| m.json.as_bytes()),
        );
        client.outbox.push(frame);
        Ok(())
    }

    /// Enforces deadlines on every client: the first frame, idleness (with a
    /// ping first), and the close handshake. Returns how long to wait before
    /// the next sweep.
    pub fn sweep(&self) -> Duration {
        let policies = self.policies();
        let t = &policies.config.timeouts;
        let now = self.now();
        let ms = |d: Duration| d.as_millis() as u64;
        let mut overdue = Vec::new();
        let clients: Vec<Arc<Client>> = lock(&self.clients).values().cloned().collect();
        for client in clients {
            if let Some(since) = client.outbox.closing_since() {
                if since.elapsed() > t.close {
                    overdue.push(client);
                }
                continue;
            }
            match client.last_rx() {
                None if now.saturating_sub(client.connected_at()) > ms(t.first_frame) => {
                    client.outbox.close(
                        CloseCode::POLICY,
                        &format!("no frame within {:?} of connecting", t.first_frame),
                        CloseReason::FirstFrameTimeout,
                        true,
                    );
                }
                Some(last) if now.saturating_sub(last) > ms(t.idle) => {
                    client.outbox.close(CloseCode::POLICY, "idle timeout", CloseReason::IdleTimeout, true);
                }
                last => {
                    let quiet_since = last.unwrap_or(client.connected_at()).max(client.last_ping());
                    if now.saturating_sub(quiet_since) >= ms(t.ping_interval) {
                        client.set_last_ping(now);
                        client.outbox.push(ping_frame());
                    }
                }
            }
        }
        for client in overdue {
            client.abort();
        }
        let shortest = [t.first_frame, t.ping_interval, t.idle, t.close].into_iter().min().unwrap_or_default();
        (shortest / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
    }

    /// Starts shutdown: no new client is welcomed, and every client gets what
    /// is queued for it followed by a Close frame with 1001.
    pub fn close_all(&self) {
        self.closing.store(true, Ordering::Release);
        let clients: Vec<Arc<Client>> = lock(&self.clients).values().cloned().collect();
        for client in clients {
            client.outbox.close(CloseCode::GOING_AWAY, "server shutting down", CloseReason::Shutdown, false);
        }
    }

    /// Ends every remaining client's task at once.
    pub fn abort_all(&self) {
        let clients: Vec<Arc<Client>> = lock(&self.clients).values().cloned().collect();
        for client in clients {
            client.abort();
        }
    }

    /// Waits until no client is registered.
    pub async fn wait_empty(&self) {
        let mut live = self.live.subscribe();
        let _ = live.wait_for(|n| *n == 0).await;
    }

    /// Number of registered clients.
    pub fn client_count(&self) -> usize {
        *self.live.borrow()
    }
}

/// The filters' view of a user acting in `room`.
fn filter_context<'a>(identity: &'a Identity, roles: &'a [&'a str], client: &Client, room: &'a str) -> Context<'a> {
    Context { user_id: &identity.user_id, nick: &identity.nick, roles, addr: client.addr, room, now: SystemTime::now() }
}

/// The error for a verdict that refuses a request.
pub fn refusal(verdict: Verdict) -> RequestError {
    match verdict {
        Verdict::Reject { code, reason, retry_after } => RequestError {
            retry_after_ms: retry_after.map(|d| d.as_millis().max(1) as u64),
            ..RequestError::new(ErrorCode::Policy(code), reason)
        },
        Verdict::Escalate { reason, .. } => RequestError::new(ErrorCode::Policy("policy_violation".into()), reason),
        Verdict::Hold { reason } => RequestError::new(ErrorCode::Policy("held".into()), reason),
        other => {
            RequestError::new(ErrorCode::Policy("blocked".into()), format!("refused by policy ({})", other.name()))
        }
    }
}

/// What a cluster's node runs once its post has an id.
pub(crate) type OnId = Box<dyn FnOnce(&Hub, u64) + Send>;

/// Removes one pending claim of `key` by connection `id`; false if there
/// was none (the connection left).
fn take_claim(claims: &mut HashMap<ConnId, Vec<String>>, id: ConnId, key: &str) -> bool {
    let Some(keys) = claims.get_mut(&id) else { return false };
    let Some(at) = keys.iter().position(|k| k == key) else { return false };
    keys.swap_remove(at);
    if keys.is_empty() {
        claims.remove(&id);
    }
    true
}

/// The refusal of a post or a nickname change while the node is cut off
/// from the cluster broker.
fn cut_off() -> RequestError {
    RequestError {
        retry_after_ms: Some(1000),
        ..RequestError::new(
            ErrorCode::Unavailable,
            "this server is cut off from the rest of the cluster; try again in a moment",
        )
    }
}

/// Splits a `message` frame's JSON (with id 0) around the id's value.
/// `room` comes before `id` and is a JSON string, inside which a quote is
/// always escaped, so the first `,"id":0,` is the field.
fn split_at_id(json: &str) -> (String, String) {
    const ID: &str = ",\"id\":0,";
    match json.find(ID) {
        Some(at) => (json[..at + ID.len() - 2].to_owned(), json[at + ID.len() - 1..].to_owned()),
        // Not a shape this build writes; a later `id` key wins in JSON.
        None => (format!("{},\"id\":", json.trim_end().trim_end_matches('}')), "}".to_owned()),
    }
}

/// A frame's JSON text.
pub(crate) fn json_of(frame: &Bytes) -> String {
    String::from_utf8_lossy(payload_of(frame)).into_owned()
}

/// A local client as the other nodes see it.
fn remote_member(client: &Client, identity: &Identity) -> RemoteMember {
    RemoteMember {
        user: identity.user_id.to_string(),
        nick: identity.nick.to_string(),
        roles: identity.roles.names().map(str::to_owned).collect(),
        addr: client.addr,
    }
}

fn not_member(room: &str) -> RequestError {
    RequestError::new(ErrorCode::NotMember, format!("you are not in room {room:?}; join it first"))
}

/// A random number from the operating system.
pub fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // The OS random source failing is not recoverable in any useful way; fall
    // back to the clock so ids stay unique within the process.
    if getrandom::fill(&mut bytes).is_err() {
        return std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    }
    u64::from_ne_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_splits_around_its_id() {
        let frame = encode(&ServerFrame::Message {
            room: "a\",\"id\":0,\"",
            id: 0,
            from: "ann",
            user: "guest:1",
            content: ",\"id\":0,",
            ts: 5,
        });
        let (head, tail) = split_at_id(&json_of(&frame));
        let value: serde_json::Value = serde_json::from_str(&format!("{head}42{tail}")).expect("valid JSON");
        assert_eq!((value["id"].as_u64(), value["room"].as_str()), (Some(42), Some("a\",\"id\":0,\"")));
        assert_eq!(value["content"], ",\"id\":0,");
        let (head, tail) = split_at_id("{\"type\":\"message\"}");
        let value: serde_json::Value = serde_json::from_str(&format!("{head}7{tail}")).expect("valid JSON");
        assert_eq!(value["id"], 7);
    }
}
