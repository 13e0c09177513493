//! One connected client as the hub sees it: who it is, which rooms it is in,
//! its outbound queue, and the timestamps the deadline sweeper reads.
//!
//! Kept small on purpose: an idle connection costs this struct, its task and
//! its socket, nothing more (`docs/design.md`, "Memory per connection").

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::ser::{Serialize, SerializeSeq, Serializer};
use tokio::task::AbortHandle;

use crate::hub::Room;
use crate::lock;
use crate::outbox::{Depth, Outbox, Pushed};
use crate::protocol::UserView;

/// Identifies a connection for the lifetime of the process.
pub type ConnId = u64;

/// A set of roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles(u8);

impl Roles {
    /// A member of the community (every user).
    pub const MEMBER: Roles = Roles(1);
    /// May mute, kick and ban.
    pub const MODERATOR: Roles = Roles(2);
    /// May do everything, including configuration.
    pub const ADMIN: Roles = Roles(4);

    const NAMES: [(Roles, &'static str); 3] =
        [(Self::MEMBER, "member"), (Self::MODERATOR, "moderator"), (Self::ADMIN, "admin")];

    /// The role called `name` (`member`, `moderator`, `admin`).
    pub fn from_name(name: &str) -> Option<Roles> {
        Self::NAMES.into_iter().find(|(_, n)| *n == name).map(|(r, _)| r)
    }

    /// Whether the roles include moderator or admin.
    pub fn is_staff(self) -> bool {
        self.0 & (Self::MODERATOR.0 | Self::ADMIN.0) != 0
    }

    /// Rank for moderation: 2 for admins, 1 for moderators, 0 for members.
    /// A moderator acts only on users of a lower rank.
    pub fn rank(self) -> u8 {
        if self.contains(Self::ADMIN) {
            2
        } else if self.contains(Self::MODERATOR) {
            1
        } else {
            0
        }
    }

    /// Whether every role in `other` is in `self`.
    pub fn contains(self, other: Roles) -> bool {
        self.0 & other.0 == other.0
    }

    /// The role names, in a stable order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES.into_iter().filter(move |(r, _)| self.contains(*r)).map(|(_, n)| n)
    }

    /// The role names in a fixed array, for filters' contexts without an
    /// allocation: use `&names[..count]`.
    pub fn name_array(self) -> ([&'static str; 3], usize) {
        let mut names = [""; 3];
        let mut count = 0;
        for name in self.names() {
            names[count] = name;
            count += 1;
        }
        (names, count)
    }
}

impl std::ops::BitOr for Roles {
    type Output = Roles;
    fn bitor(self, rhs: Roles) -> Roles {
        Roles(self.0 | rhs.0)
    }
}

impl Serialize for Roles {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(None)?;
        for name in self.names() {
            seq.serialize_element(name)?;
        }
        seq.end()
    }
}

/// Who a client is. Replaced whole (never edited) when the nickname changes,
/// so readers take a snapshot and hold no lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Stable user id; `guest:<session>` for guests.
    pub user_id: Arc<str>,
    /// Current nickname.
    pub nick: Box<str>,
    /// Roles.
    pub roles: Roles,
    /// How the client identified itself.
    pub kind: IdentityKind,
}

/// How a client identified itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    /// Not yet: only an `auth` frame is accepted (guests are not allowed).
    Anonymous,
    /// A guest with a nickname.
    Guest,
    /// A user with a verified token.
    User,
}

impl Identity {
    /// Whether the client is a guest.
    pub fn is_guest(&self) -> bool {
        self.kind == IdentityKind::Guest
    }

    /// The identity as other clients see it.
    pub fn view(&self) -> UserView<'_> {
        UserView { id: &self.user_id, nick: &self.nick, roles: self.roles }
    }
}

/// A connected client.
#[derive(Debug)]
pub struct Client {
    /// Connection id, unique in this process.
    pub id: ConnId,
    /// Session id sent in `welcome` (random, so it cannot be guessed).
    pub session: u64,
    /// The client's address (the socket's, or the trusted proxy's client).
    pub addr: IpAddr,
    /// Frames waiting to be written to this client.
    pub outbox: Outbox,
    /// Who the client is; swapped whole on a nickname change.
    identity: Mutex<Arc<Identity>>,
    /// Rooms the client is in. Only the client's own task and disconnect
    /// change it; the hub reads it to check membership.
    pub(crate) rooms: Mutex<Vec<Arc<Room>>>,
    /// Hub clock (ms) when the connection was upgraded.
    connected_at: u64,
    /// Hub clock (ms) of the last bytes received; 0 before the first frame.
    last_rx: AtomicU64,
    /// Hub clock (ms) of the last ping sent.
    last_ping: AtomicU64,
    /// When the request budget is next full again ([`Client::take_request`]).
    requests_due: AtomicU64,
    /// The task serving this client (the upgrade's, then the connection's),
    /// so the sweeper can end a connection whose close handshake overran.
    task: Mutex<Option<AbortHandle>>,
}

impl Client {
    /// A new client with a placeholder identity (set by the hub on register).
    pub fn new(id: ConnId, session: u64, addr: IpAddr, outbox: Outbox, now: u64) -> Self {
        Self {
            id,
            session,
            addr,
            outbox,
            identity: Mutex::new(Arc::new(Identity {
                user_id: "".into(),
                nick: "".into(),
                roles: Roles::default(),
                kind: IdentityKind::Anonymous,
            })),
            rooms: Mutex::new(Vec::new()),
            connected_at: now,
            last_rx: AtomicU64::new(0),
            last_ping: AtomicU64::new(0),
            requests_due: AtomicU64::new(0),
            task: Mutex::new(None),
        }
    }

    /// A snapshot of who the client is.
    pub fn identity(&self) -> Arc<Identity> {
        lock(&self.identity).clone()
    }

    pub(crate) fn set_identity(&self, identity: Identity) {
        *lock(&self.identity) = Arc::new(identity);
    }

    /// The session id as sent in `welcome`.
    pub fn session_str(&self) -> String {
        format!("{:016x}", self.session)
    }

    /// Takes one request from the client's budget of `per_minute` requests,
    /// up to `burst` at once (the generic cell rate algorithm, on the hub
    /// clock `now`), or says how many milliseconds until one is available.
    /// Only the connection's own task calls it.
    pub fn take_request(&self, now: u64, per_minute: u32, burst: u32) -> Result<(), u64> {
        if per_minute == 0 {
            return Ok(());
        }
        let interval = 60_000 / u64::from(per_minute);
        let tolerance = interval * u64::from(burst.saturating_sub(1));
        let due = self.requests_due.load(Ordering::Relaxed).max(now);
        if due - now > tolerance {
            return Err(due - now - tolerance);
        }
        self.requests_due.store(due + interval, Ordering::Relaxed);
        Ok(())
    }

    /// Records that bytes arrived at hub clock `now`.
    pub fn touch(&self, now: u64) {
        self.last_rx.store(now.max(1), Ordering::Relaxed);
    }

    pub(crate) fn connected_at(&self) -> u64 {
        self.connected_at
    }

    pub(crate) fn last_rx(&self) -> Option<u64> {
        Some(self.last_rx.load(Ordering::Relaxed)).filter(|&t| t != 0)
    }

    pub(crate) fn last_ping(&self) -> u64 {
        self.last_ping.load(Ordering::Relaxed)
    }

    pub(crate) fn set_last_ping(&self, now: u64) {
        self.last_ping.store(now, Ordering::Relaxed);
    }

    /// Remembers the task now serving this client, so it can be aborted.
    pub fn set_task(&self, handle: AbortHandle) {
        *lock(&self.task) = Some(handle);
    }

    /// Like [`set_task`](Self::set_task), unless a task is already known:
    /// the upgrade task may hand over to the connection task before its
    /// spawner gets to record it.
    pub fn set_task_if_unset(&self, handle: AbortHandle) {
        lock(&self.task).get_or_insert(handle);
    }

    /// Ends the client's task at once (no close handshake).
    pub fn abort(&self) {
        if let Some(task) = lock(&self.task).as_ref() {
            task.abort();
        }
    }

    /// Whether the client is in `room`.
    pub fn room(&self, name: &str) -> Option<Arc<Room>> {
        lock(&self.rooms).iter().find(|r| r.name() == name).cloned()
    }
}

/// Frames a request will put in its client's outbox later, once what it
/// waits for happens: a message's `ack` after the commit (and, in a cluster,
/// its echo from the broker), a moderator's `done`, `held`, a nickname the
/// broker granted, or the error that replaces any of them.
///
/// Until then they count toward the backlog at which the client's reader
/// pauses ([`Outbox::backlog`]), so however many requests a client pipelines,
/// their replies fit in its queue. Made where the request is handled (on the
/// client's own connection task); dropping it releases what was not sent,
/// so a reply given up (a callback dropped at shutdown, say) cannot leave the
/// reader paused.
///
/// Each promised frame reserves bytes as well ([`REPLY_BYTES`], or what the
/// caller knows it needs), and exactly what was reserved is released.
#[derive(Debug)]
pub struct Reply {
    /// Who waits.
    client: Arc<Client>,
    /// Frames and bytes still promised.
    promised: Depth,
}

/// Bytes reserved for each promised frame that is not a chat message (an
/// `ack`, `done`, `held`, `renamed` or an error): more than any of them
/// takes, since a `ref` is at most 64 bytes and a room name 64 characters.
pub const REPLY_BYTES: usize = 1024;

impl Reply {
    /// Promises `frames` small frames ([`REPLY_BYTES`] each) to `client`.
    pub fn new(client: &Arc<Client>, frames: usize) -> Reply {
        Self::with_bytes(client, frames, frames * REPLY_BYTES)
    }

    /// Promises `frames` frames of `bytes` bytes in all to `client` (a
    /// message's echo, whose size the caller knows, and its `ack`).
    pub fn with_bytes(client: &Arc<Client>, frames: usize, bytes: usize) -> Reply {
        let promised = Depth { frames, bytes };
        client.outbox.promise(promised);
        Reply { client: client.clone(), promised }
    }

    /// Queues `frame` as the reply's last frame, releasing the promise.
    pub fn send(mut self, frame: Bytes) -> Pushed {
        let promised = std::mem::take(&mut self.promised);
        self.client.outbox.push_releasing(frame, promised)
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.promised != Depth::default() {
            self.client.outbox.release(self.promised);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_is_promised_until_sent_or_dropped() {
        let client = Arc::new(Client::new(1, 1, IpAddr::from([127, 0, 0, 1]), Outbox::new(8, 1 << 20), 0));
        let sent = Reply::new(&client, 2);
        let dropped = Reply::with_bytes(&client, 1, 5000);
        assert_eq!(client.outbox.backlog(), Depth { frames: 3, bytes: 2 * REPLY_BYTES + 5000 });
        assert_eq!(sent.send(Bytes::from_static(b"ack")), Pushed::Queued);
        assert_eq!((client.outbox.len(), client.outbox.backlog()), (1, Depth { frames: 2, bytes: 5003 }));
        drop(dropped);
        assert_eq!(client.outbox.backlog(), Depth { frames: 1, bytes: 3 });
    }
}
