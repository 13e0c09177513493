//! Moderation: bans, mutes, strikes and the escalation ladder, room slow
//! mode and locks, the review queue (held messages and reports), message
//! deletion, and the audit log of all of it.
//!
//! What is checked on every connection or message (bans, mutes, room
//! settings) is kept in memory ([`ModerationState`]) and written through to
//! the store. Every action, manual or automatic, appends an audit entry in
//! the same commit as the action itself; the moderator's `done` is sent only
//! once that commit is durable.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::client::{Client, Identity, Reply, Roles};
use crate::cluster::Effect;
use crate::hub::{Hub, json_of};
use crate::lock;
use crate::outbox::CloseReason;
use crate::protocol::{ErrorCode, Ref, Request, RequestError, ServerFrame, encode, now_ms};
use crate::store::{
    AuditEntry, Ban, Mute, ReviewItem, ReviewKind, ReviewStatus, RoomSettings, Snapshot, Strikes, Write, Written,
};
use crate::ws::{CloseCode, text_frame};

/// `[moderation]` in the config.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModerationConfig {
    /// One strike is forgiven per this much time.
    #[serde(with = "crate::config::duration")]
    pub strike_decay: Duration,
    /// Mute length when a moderator gives none.
    #[serde(with = "crate::config::duration")]
    pub default_mute: Duration,
    /// Strike thresholds and what crossing each one does, lowest first.
    pub ladder: Vec<LadderStep>,
}

impl Default for ModerationConfig {
    fn default() -> Self {
        let step = |strikes, action, duration: Option<u64>| LadderStep {
            strikes,
            action,
            duration: duration.map(Duration::from_secs),
        };
        ModerationConfig {
            strike_decay: Duration::from_secs(3600),
            default_mute: Duration::from_secs(600),
            ladder: vec![
                step(3.0, LadderAction::Warn, None),
                step(5.0, LadderAction::Mute, Some(600)),
                step(8.0, LadderAction::Kick, None),
                step(12.0, LadderAction::Ban, Some(3600)),
            ],
        }
    }
}

/// One step of the escalation ladder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LadderStep {
    /// Reaching this many strikes triggers the action.
    pub strikes: f64,
    /// What happens.
    pub action: LadderAction,
    /// For `mute` (required) and `ban` (absent: permanent).
    #[serde(default, with = "crate::config::duration::optional")]
    pub duration: Option<Duration>,
}

/// An action of the ladder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LadderAction {
    /// A warning to the user.
    Warn,
    /// A mute for the step's duration.
    Mute,
    /// Disconnection.
    Kick,
    /// A ban for the step's duration (or for good).
    Ban,
}

impl ModerationConfig {
    /// Problems with the ladder, as `(key, message)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut previous = 0.0;
        for (i, step) in self.ladder.iter().enumerate() {
            let key = format!("moderation.ladder[{i}]");
            if !(step.strikes.is_finite() && step.strikes > previous) {
                problems.push((key.clone(), format!("strikes must be above the previous step's ({previous})")));
            }
            previous = step.strikes.max(previous);
            if step.action == LadderAction::Mute && step.duration.is_none() {
                problems.push((key, "a mute step needs a `duration`".to_owned()));
            }
        }
        if self.strike_decay.is_zero() {
            problems.push(("moderation.strike_decay".to_owned(), "must be longer than 0s".to_owned()));
        }
        problems
    }
}

/// In-memory moderation state, loaded from the store at start-up.
#[derive(Debug, Default)]
pub struct ModerationState {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Bans that have not been lifted (expired ones are skipped and pruned).
    bans: Vec<Ban>,
    /// Mutes by user id.
    mutes: HashMap<String, Mute>,
    /// Strikes by user id.
    strikes: HashMap<String, Strikes>,
    /// Room settings that differ from the default.
    rooms: HashMap<String, RoomSettings>,
    /// Last message time (ms) per (room, user), for rooms in slow mode.
    last_post: HashMap<(String, String), u64>,
    /// Impersonation keys of staff nicknames seen.
    staff_names: HashSet<String>,
    /// Addresses of guests who left lately, oldest first, so that a ban of
    /// a guest who has just disconnected still bans its address.
    departed_guests: std::collections::VecDeque<(String, IpAddr)>,
}

/// Departed guests whose address [`Inner::departed_guests`] remembers.
const DEPARTED_GUESTS: usize = 4096;

impl ModerationState {
    /// State from the store's snapshot.
    pub fn load(snapshot: Snapshot) -> Self {
        let inner = Inner {
            bans: snapshot.bans,
            mutes: snapshot.mutes.into_iter().map(|m| (m.user_id.clone(), m)).collect(),
            strikes: snapshot.strikes.into_iter().collect(),
            rooms: snapshot.rooms.into_iter().map(|r| (r.room.clone(), r)).collect(),
            staff_names: snapshot.staff_names.into_iter().collect(),
            ..Inner::default()
        };
        ModerationState { inner: Mutex::new(inner) }
    }

    /// The ban keeping out a user (by id) or a guest (by address), if any.
    pub fn ban_for(&self, user_id: &str, addr: IpAddr, guest: bool, now: u64) -> Option<Ban> {
        let inner = lock(&self.inner);
        inner
            .bans
            .iter()
            .filter(|ban| ban.expires_at.is_none_or(|end| end > now))
            .find(|ban| {
                ban.user_id.as_deref() == Some(user_id)
                    || (guest
                        && ban.cidr.as_deref().and_then(|c| c.parse::<IpNet>().ok()).is_some_and(|n| n.contains(&addr)))
            })
            .cloned()
    }

    /// The user's mute, if it has not ended.
    pub fn mute_of(&self, user_id: &str, now: u64) -> Option<Mute> {
        lock(&self.inner).mutes.get(user_id).filter(|m| m.until > now).cloned()
    }

    /// Mutes in force at `now`, soonest ending first.
    pub fn mutes(&self, now: u64) -> Vec<Mute> {
        let mut mutes: Vec<Mute> = lock(&self.inner).mutes.values().filter(|m| m.until > now).cloned().collect();
        mutes.sort_by_key(|m| m.until);
        mutes
    }

    /// A room's settings (defaults if never changed).
    pub fn room(&self, room: &str) -> RoomSettings {
        lock(&self.inner)
            .rooms
            .get(room)
            .cloned()
            .unwrap_or_else(|| RoomSettings { room: room.to_owned(), ..Default::default() })
    }

    /// Slow mode: `Some(wait_ms)` if the user posted in `room` less than
    /// `seconds` ago; otherwise records this post and returns `None`.
    pub fn slow_mode_wait(&self, room: &str, user_id: &str, seconds: u32, now: u64) -> Option<u64> {
        let mut inner = lock(&self.inner);
        let key = (room.to_owned(), user_id.to_owned());
        let interval = u64::from(seconds) * 1000;
        if let Some(last) = inner.last_post.get(&key)
            && now < last + interval
        {
            return Some(last + interval - now);
        }
        inner.last_post.insert(key, now);
        None
    }

    /// Adds `points` strikes (after decay) and returns (before, after) and
    /// the strikes to store.
    fn add_strikes(&self, user_id: &str, points: f64, decay: Duration, now: u64) -> (f64, f64, Strikes) {
        let mut inner = lock(&self.inner);
        let current = inner.strikes.get(user_id).map(|s| decayed(*s, decay, now));
        let before = current.map_or(0.0, |s| s.points);
        let since = current.filter(|s| s.points > 0.0).map_or(now, |s| s.updated_at);
        let strikes = Strikes { points: before + points, updated_at: since };
        inner.strikes.insert(user_id.to_owned(), strikes);
        (before, strikes.points, strikes)
    }

    /// A user's strikes now (after decay), as (points, start of the
    /// running period).
    fn strikes_of(&self, user_id: &str, decay: Duration, now: u64) -> (f64, u64) {
        let inner = lock(&self.inner);
        inner.strikes.get(user_id).map(|s| decayed(*s, decay, now)).map_or((0.0, now), |s| (s.points, s.updated_at))
    }

    /// Sets a user's strikes as counted elsewhere (the cluster's broker).
    fn set_strikes(&self, user_id: &str, strikes: Strikes) {
        lock(&self.inner).strikes.insert(user_id.to_owned(), strikes);
    }

    /// Whether a name with these look-alike keys looks like a staff
    /// member's name seen so far.
    pub fn looks_like_staff(&self, keys: &[String]) -> bool {
        let inner = lock(&self.inner);
        keys.iter().any(|key| inner.staff_names.contains(key))
    }

    /// Remembers the address of a guest who disconnected (the last
    /// [`DEPARTED_GUESTS`] of them).
    pub fn note_departed_guest(&self, user_id: &str, addr: IpAddr) {
        let mut inner = lock(&self.inner);
        if inner.departed_guests.len() == DEPARTED_GUESTS {
            inner.departed_guests.pop_front();
        }
        inner.departed_guests.push_back((user_id.to_owned(), addr));
    }

    /// The address of a guest who disconnected lately.
    pub fn departed_guest_addr(&self, user_id: &str) -> Option<IpAddr> {
        lock(&self.inner).departed_guests.iter().rev().find(|(id, _)| id == user_id).map(|(_, addr)| *addr)
    }

    /// Remembers a staff member's name (its look-alike keys), so guests
    /// cannot imitate it; returns whether any key is new.
    pub fn note_staff_name(&self, keys: Vec<String>) -> bool {
        let mut inner = lock(&self.inner);
        let mut new = false;
        for key in keys {
            new |= inner.staff_names.insert(key);
        }
        new
    }

    /// Brings bans, mutes and room settings up to date with the store, for
    /// a cluster node that may have missed effects while cut off from the
    /// broker. Entries younger than `grace` that the store may not have
    /// committed yet are kept. Returns the bans and mutes that are new here.
    fn resync(&self, snapshot: Snapshot, now: u64, grace: u64) -> (Vec<Ban>, Vec<Mute>) {
        let same = |a: &Ban, b: &Ban| a.user_id == b.user_id && a.cidr == b.cidr && a.created_at == b.created_at;
        let mut inner = lock(&self.inner);
        let new_bans: Vec<Ban> =
            snapshot.bans.iter().filter(|s| !inner.bans.iter().any(|b| same(b, s))).cloned().collect();
        let recent: Vec<Ban> = inner
            .bans
            .iter()
            .filter(|b| b.created_at + grace > now && !snapshot.bans.iter().any(|s| same(s, b)))
            .cloned()
            .collect();
        inner.bans = snapshot.bans;
        inner.bans.extend(recent);
        let mut mutes: HashMap<String, Mute> = snapshot.mutes.into_iter().map(|m| (m.user_id.clone(), m)).collect();
        let new_mutes: Vec<Mute> = mutes
            .values()
            .filter(|m| inner.mutes.get(&m.user_id).is_none_or(|known| known.created_at < m.created_at))
            .cloned()
            .collect();
        for mute in inner.mutes.values().filter(|m| m.created_at + grace > now) {
            if mutes.get(&mute.user_id).is_none_or(|stored| stored.created_at < mute.created_at) {
                mutes.insert(mute.user_id.clone(), mute.clone());
            }
        }
        inner.mutes = mutes;
        inner.rooms = snapshot.rooms.into_iter().map(|r| (r.room.clone(), r)).collect();
        (new_bans, new_mutes)
    }

    /// Drops ended bans and mutes, idle slow-mode entries and spent strikes.
    pub fn prune(&self, now: u64, decay: Duration) {
        let mut inner = lock(&self.inner);
        inner.bans.retain(|b| b.expires_at.is_none_or(|end| end > now));
        inner.mutes.retain(|_, m| m.until > now);
        let rooms = inner.rooms.clone();
        inner.last_post.retain(|(room, _), last| {
            let seconds = rooms.get(room).map_or(0, |r| r.slow_mode_secs);
            now < *last + u64::from(seconds) * 1000
        });
        inner.strikes.retain(|_, s| decayed(*s, decay, now).points > 0.0);
    }
}

/// Strikes left at `now`: one whole strike is forgiven per full `decay`
/// period; `updated_at` moves to the start of the period still running.
fn decayed(strikes: Strikes, decay: Duration, now: u64) -> Strikes {
    let period = (decay.as_millis() as u64).max(1);
    let forgiven = now.saturating_sub(strikes.updated_at) / period;
    Strikes { points: (strikes.points - forgiven as f64).max(0.0), updated_at: strikes.updated_at + forgiven * period }
}

/// A message a filter put on hold.
#[derive(Debug, Clone, Copy)]
pub struct Held<'a> {
    /// Its room.
    pub room: &'a str,
    /// Its text.
    pub content: &'a str,
    /// The filter's reason.
    pub reason: &'a str,
    /// The filter's id.
    pub filter: &'a str,
    /// The message's `ref`.
    pub reference: Option<&'a Ref>,
}

/// Who acts: a user, or the server on behalf of a filter or the ladder.
#[derive(Debug, Clone)]
pub struct Actor {
    /// User id, `filter:<id>`, `ladder` or `admin-api`.
    pub id: String,
    /// For automatic actions: the filter or ladder step that caused it.
    pub rule: Option<String>,
}

impl Actor {
    fn user(identity: &Identity) -> Self {
        Actor { id: identity.user_id.to_string(), rule: None }
    }
}

/// What a moderation action does to a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sanction {
    /// A warning.
    Warn,
    /// No sending until the duration ends.
    Mute(Duration),
    /// Disconnected.
    Kick,
    /// Disconnected and kept out (for the duration, or for good).
    Ban(Option<Duration>),
}

impl Sanction {
    fn name(self) -> &'static str {
        match self {
            Sanction::Warn => "warn",
            Sanction::Mute(_) => "mute",
            Sanction::Kick => "kick",
            Sanction::Ban(_) => "ban",
        }
    }
}

fn audit(
    actor: &Actor,
    action: &str,
    target: Option<String>,
    room: Option<&str>,
    reason: &str,
    details: Option<String>,
) -> Write {
    Write::Audit(AuditEntry {
        id: 0,
        at: now_ms(),
        actor: actor.id.clone(),
        action: action.to_owned(),
        target,
        room: room.map(str::to_owned),
        reason: reason.to_owned(),
        rule: actor.rule.clone(),
        details,
    })
}

fn not_found(what: impl Into<String>) -> RequestError {
    RequestError::new(ErrorCode::NotFound, what)
}

/// The longest mute or timed ban, in seconds (100 years); a ban without a
/// duration is permanent.
const MAX_DURATION_SECS: u64 = 100 * 365 * 86_400;

/// A request's `duration`: 1 second to [`MAX_DURATION_SECS`].
fn seconds(secs: u64) -> Result<Duration, RequestError> {
    if (1..=MAX_DURATION_SECS).contains(&secs) {
        Ok(Duration::from_secs(secs))
    } else {
        Err(RequestError::new(
            ErrorCode::BadRequest,
            format!("`duration` is from 1 to {MAX_DURATION_SECS} seconds (100 years), not {secs}"),
        ))
    }
}

/// The time, in milliseconds since the epoch, `duration` after `now`.
fn deadline(now: u64, duration: Duration) -> u64 {
    now.saturating_add(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

fn human(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        s if s % 86_400 == 0 && s > 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 && s > 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 && s > 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

impl Hub {
    /// Handles a moderation request or a report from `client`. Members may
    /// only report; anything else needs the moderator or admin role, and an
    /// attempt without it is refused with `forbidden` and audited.
    pub fn moderate(
        &self,
        client: &Arc<Client>,
        request: Request,
        reference: Option<&Ref>,
    ) -> Result<(), RequestError> {
        let identity = client.identity();
        let actor = Actor::user(&identity);
        let action = request.kind();
        if let Some((why, message)) = self.refusal(&identity, &request) {
            // Refused, and answered once the attempt is on record.
            let write = audit(&actor, "forbidden", request.target(), request.room(), &why, None);
            let error =
                RequestError { reference: reference.cloned(), ..RequestError::new(ErrorCode::Forbidden, message) };
            let reply = Reply::new(client, 1);
            self.commit_then(vec![write], move |_| {
                reply.send(error.to_frame());
            });
            return Ok(());
        }
        let writes = self.apply(&actor, Some(&identity), request)?;
        // A new review item (a report) goes to the moderators once stored.
        let new_item = writes.iter().enumerate().find_map(|(i, w)| match w {
            Write::Review(item) => Some((i, item.clone())),
            _ => None,
        });
        let done = encode(&ServerFrame::Done { action, reference });
        let reply = Reply::new(client, 1);
        let hub = self.self_ref();
        self.commit_then(writes, move |result| match result {
            Ok(results) => {
                reply.send(done);
                if let (Some((index, item)), Some(hub)) = (new_item, hub.upgrade()) {
                    let id = match results.get(index) {
                        Some(Written::Id(id)) => *id,
                        _ => 0,
                    };
                    let frame = encode(&ServerFrame::Review { item: &ReviewItem { id, ..item } });
                    hub.effect(Effect::ToStaff { frame: json_of(&frame) });
                }
            }
            Err(e) => {
                reply.send(RequestError::new(ErrorCode::Unavailable, format!("not recorded: {e}")).to_frame());
            }
        });
        Ok(())
    }

    /// Why `identity` may not make `request`, if it may not: for the audit
    /// log, and for the user. Members may only report; nobody mutes, kicks
    /// or bans themselves or a user whose rank is not below their own
    /// (its connections' roles, and what `[auth] roles` grants).
    fn refusal(&self, identity: &Identity, request: &Request) -> Option<(String, String)> {
        let action = request.kind();
        if matches!(request, Request::Report { .. }) {
            return None;
        }
        if !identity.roles.is_staff() {
            return Some((format!("`{action}` needs the moderator role"), format!("`{action}` is for moderators")));
        }
        let (Request::Kick { user, .. } | Request::Mute { user, .. } | Request::Ban { user: Some(user), .. }) = request
        else {
            return None;
        };
        if *identity.user_id == **user {
            let why = format!("`{action}` of oneself");
            return Some((why, format!("you cannot {action} yourself")));
        }
        let target = self
            .clients_of(user)
            .iter()
            .map(|c| c.identity().roles)
            .chain([self.policies().auth.roles_of(user)])
            .max_by_key(|roles| roles.rank())
            .unwrap_or(Roles::MEMBER);
        (target.rank() >= identity.roles.rank()).then(|| {
            let role = rank_name(target);
            (format!("`{action}` of {role}"), format!("{} cannot {action} {role}", rank_name(identity.roles)))
        })
    }

    /// Carries out a moderation request for `actor` (a moderator, or the
    /// admin API) and returns the writes recording it. `reporter` is the
    /// user making a report.
    pub fn apply(
        &self,
        actor: &Actor,
        reporter: Option<&Identity>,
        request: Request,
    ) -> Result<Vec<Write>, RequestError> {
        if let Some(user) = request.target().filter(|target| target.trim().is_empty()) {
            return Err(RequestError::new(
                ErrorCode::BadRequest,
                format!("{user:?} is not a user id, address or network"),
            ));
        }
        let writes = match request {
            Request::Report { reason, .. } if reason.trim().is_empty() => {
                return Err(RequestError::new(ErrorCode::BadRequest, "a report needs a reason"));
            }
            Request::Report { room, id, reason } => match reporter {
                Some(reporter) => self.report(reporter, &room, id, &reason)?,
                None => return Err(RequestError::new(ErrorCode::BadRequest, "reports come from users")),
            },
            Request::Kick { user, reason } => {
                let reason = reason.unwrap_or_else(|| "kicked by a moderator".to_owned());
                self.sanction(&user, Sanction::Kick, actor, &reason, None)?
            }
            Request::Mute { user, duration, reason } => {
                let duration = match duration {
                    Some(secs) => seconds(secs)?,
                    None => self.policies().config.moderation.default_mute,
                };
                let reason = reason.unwrap_or_else(|| "muted by a moderator".to_owned());
                self.sanction(&user, Sanction::Mute(duration), actor, &reason, None)?
            }
            Request::Unmute { user } => self.unmute(&user, actor)?,
            Request::Ban { user, ip, duration, reason } => {
                let reason = reason.unwrap_or_else(|| "banned by a moderator".to_owned());
                let duration = duration.map(seconds).transpose()?;
                match (user, ip) {
                    (Some(user), None) => self.sanction(&user, Sanction::Ban(duration), actor, &reason, None)?,
                    (None, Some(ip)) => self.ban_address(&ip, duration, actor, &reason)?,
                    _ => return Err(RequestError::new(ErrorCode::BadRequest, "give either `user` or `ip`")),
                }
            }
            Request::Unban { user, ip, ban } => self.unban(user.as_deref(), ip.as_deref(), ban, actor)?,
            Request::Delete { room, id, reason } => {
                self.delete_message(&room, id, actor, reason.as_deref().unwrap_or("deleted by a moderator"))?
            }
            Request::SlowMode { room, seconds } => {
                let what = format!("slow mode: one message per {seconds}s");
                self.set_room(&room, actor, "slow_mode", &what, |r| r.slow_mode_secs = seconds)?
            }
            Request::Lock { room } => {
                self.set_room(&room, actor, "lock", "read-only for members", |r| r.locked = true)?
            }
            Request::Unlock { room } => self.set_room(&room, actor, "unlock", "open again", |r| r.locked = false)?,
            Request::ClearStrikes { user } => {
                lock(&self.moderation.inner).strikes.remove(&user);
                if let Some(cluster) = self.cluster.clone() {
                    let user = user.clone();
                    tokio::spawn(async move {
                        if let Err(e) = cluster.clear_strikes(&user).await {
                            tracing::warn!(error = %e, user = ?user, "strikes not cleared on the cluster broker");
                        }
                    });
                }
                vec![
                    Write::Strikes { user_id: user.clone(), strikes: Strikes { points: 0.0, updated_at: now_ms() } },
                    audit(actor, "clear_strikes", Some(user), None, "strikes cleared", None),
                ]
            }
            Request::Approve { item } => self.decide(item, ReviewStatus::Approved, actor, None)?,
            Request::Deny { item, reason } => self.decide(item, ReviewStatus::Denied, actor, reason.as_deref())?,
            other => {
                return Err(RequestError::new(
                    ErrorCode::BadRequest,
                    format!("`{}` is not a moderation request", other.kind()),
                ));
            }
        };
        Ok(writes)
    }

    /// A moderation request from the admin API: carried out as `admin-api`
    /// and answered once durable.
    pub async fn apply_as_admin(&self, request: Request) -> Result<(), RequestError> {
        let actor = Actor { id: "admin-api".to_owned(), rule: None };
        let writes = self.apply(&actor, None, request)?;
        self.store()
            .write(writes)
            .wait()
            .await
            .map(|_| ())
            .map_err(|e| RequestError::new(ErrorCode::Unavailable, format!("not recorded: {e}")))
    }

    /// Applies a sanction to every connection of `user_id` and returns the
    /// writes recording it.
    pub fn sanction(
        &self,
        user_id: &str,
        sanction: Sanction,
        actor: &Actor,
        reason: &str,
        room: Option<&str>,
    ) -> Result<Vec<Write>, RequestError> {
        let targets = self.clients_of(user_id);
        let now = now_ms();
        let mut writes = Vec::new();
        let details = match sanction {
            Sanction::Mute(d) | Sanction::Ban(Some(d)) => Some(format!("{{\"duration_ms\":{}}}", d.as_millis())),
            _ => None,
        };
        match sanction {
            Sanction::Warn => {
                let frame = encode(&ServerFrame::Warning { reason });
                self.effect(Effect::ToUser { user: user_id.to_owned(), frame: json_of(&frame), members_only: false });
            }
            Sanction::Mute(duration) => {
                let mute = Mute {
                    user_id: user_id.to_owned(),
                    until: deadline(now, duration),
                    reason: reason.to_owned(),
                    actor: actor.id.clone(),
                    created_at: now,
                };
                self.effect(Effect::Mute { mute: (&mute).into() });
                writes.push(Write::Mute(mute));
            }
            Sanction::Kick => {
                let elsewhere = self.cluster.as_ref().and_then(|c| c.remote_user(user_id));
                if targets.is_empty() && elsewhere.is_none() {
                    return Err(not_found(format!("user {user_id:?} is not connected")));
                }
                self.effect(Effect::CloseUser { user: user_id.to_owned(), message: format!("kicked: {reason}") });
            }
            Sanction::Ban(duration) => {
                // A guest is banned by address too, so that reconnecting
                // under another nickname does not help.
                let cidr = if user_id.starts_with("guest:") {
                    targets
                        .first()
                        .map(|c| c.addr)
                        .or_else(|| self.cluster.as_ref().and_then(|c| c.remote_user(user_id)))
                        .or_else(|| self.moderation.departed_guest_addr(user_id))
                        .map(|addr| IpNet::from(addr).to_string())
                } else {
                    None
                };
                let ban = Ban {
                    id: 0,
                    user_id: Some(user_id.to_owned()),
                    cidr,
                    reason: reason.to_owned(),
                    actor: actor.id.clone(),
                    created_at: now,
                    expires_at: duration.map(|d| deadline(now, d)),
                };
                let why = match duration {
                    Some(d) => format!("banned for {}: {reason}", human(d)),
                    None => format!("banned: {reason}"),
                };
                self.effect(Effect::Ban { ban: (&ban).into(), message: why });
                writes.push(Write::Ban(ban));
            }
        }
        writes.push(audit(actor, sanction.name(), Some(user_id.to_owned()), room, reason, details));
        tracing::info!(actor = %actor.id, action = sanction.name(), target = ?user_id, reason = ?reason, "moderation");
        Ok(writes)
    }

    fn ban_address(
        &self,
        ip: &str,
        duration: Option<Duration>,
        actor: &Actor,
        reason: &str,
    ) -> Result<Vec<Write>, RequestError> {
        let net: IpNet = ip
            .parse()
            .or_else(|_| ip.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| RequestError::new(ErrorCode::BadRequest, format!("{ip:?} is not an address or network")))?;
        let now = now_ms();
        let ban = Ban {
            id: 0,
            user_id: None,
            cidr: Some(net.to_string()),
            reason: reason.to_owned(),
            actor: actor.id.clone(),
            created_at: now,
            expires_at: duration.map(|d| deadline(now, d)),
        };
        self.effect(Effect::Ban { ban: (&ban).into(), message: format!("banned: {reason}") });
        Ok(vec![Write::Ban(ban), audit(actor, "ban", Some(net.to_string()), None, reason, None)])
    }

    fn unban(
        &self,
        user: Option<&str>,
        ip: Option<&str>,
        id: Option<i64>,
        actor: &Actor,
    ) -> Result<Vec<Write>, RequestError> {
        let now = now_ms();
        let net = ip.and_then(|ip| ip.parse::<IpNet>().or_else(|_| ip.parse::<IpAddr>().map(IpNet::from)).ok());
        let matches = |ban: &Ban| {
            id.is_some_and(|id| ban.id == id)
                || user.is_some_and(|u| ban.user_id.as_deref() == Some(u))
                || net.is_some_and(|n| ban.cidr.as_deref().and_then(|c| c.parse::<IpNet>().ok()) == Some(n))
        };
        // Ban ids come from the store; the bans in memory are matched to
        // them by what they ban.
        let stored: Vec<Ban> = self
            .store()
            .bans(Some(now))
            .map_err(|e| RequestError::new(ErrorCode::Unavailable, e.to_string()))?
            .into_iter()
            .filter(|b| matches(b))
            .collect();
        let same = |a: &Ban, b: &Ban| a.user_id == b.user_id && a.cidr == b.cidr && a.created_at == b.created_at;
        let in_memory = lock(&self.moderation.inner)
            .bans
            .iter()
            .filter(|b| matches(b) || stored.iter().any(|s| same(s, b)))
            .count();
        if stored.is_empty() && in_memory == 0 {
            return Err(not_found("no matching ban"));
        }
        // Memory bans carry no store id: what an id names is lifted by
        // what it bans.
        self.effect(Effect::LiftBans {
            user: user.map(str::to_owned),
            net: net.map(|n| n.to_string()),
            bans: stored.iter().map(|b| (b.user_id.clone(), b.cidr.clone(), b.created_at)).collect(),
        });
        let mut writes: Vec<Write> = stored.iter().map(|b| Write::LiftBan { id: b.id, at: now }).collect();
        let target = user.map(str::to_owned).or(ip.map(str::to_owned)).or(id.map(|i| format!("ban:{i}")));
        writes.push(audit(actor, "unban", target, None, "ban lifted", None));
        Ok(writes)
    }

    fn unmute(&self, user_id: &str, actor: &Actor) -> Result<Vec<Write>, RequestError> {
        if !lock(&self.moderation.inner).mutes.contains_key(user_id) {
            return Err(not_found(format!("user {user_id:?} is not muted")));
        }
        self.effect(Effect::Unmute { user: user_id.to_owned() });
        Ok(vec![
            Write::Unmute { user_id: user_id.to_owned() },
            audit(actor, "unmute", Some(user_id.to_owned()), None, "mute lifted", None),
        ])
    }

    fn set_room(
        &self,
        room: &str,
        actor: &Actor,
        action: &str,
        what: &str,
        change: impl FnOnce(&mut RoomSettings),
    ) -> Result<Vec<Write>, RequestError> {
        crate::names::validate_room(room, self.policies().config.rooms.max_name_chars)
            .map_err(|m| RequestError::new(ErrorCode::InvalidRoom, m))?;
        let mut settings = self.moderation.room(room);
        change(&mut settings);
        self.effect(Effect::from(&settings));
        Ok(vec![Write::RoomSettings(settings), audit(actor, action, Some(room.to_owned()), Some(room), what, None)])
    }

    fn delete_message(&self, room: &str, id: u64, actor: &Actor, reason: &str) -> Result<Vec<Write>, RequestError> {
        let author = self
            .history_author(room, id)
            .or_else(|| self.store().message(room, id).ok().flatten().map(|m| m.user_id.to_string()));
        let Some(author) = author else {
            return Err(not_found(format!("no message {id} in room {room:?}")));
        };
        // Announced once the store no longer has it, so that whoever is told
        // "deleted" (on any node) never finds the message in `history`. The
        // audit entry is queued behind the deletion, so the moderator's
        // `done` (sent when it commits) also comes after.
        let (hub, owned_room) = (self.self_ref(), room.to_owned());
        self.commit_then(vec![Write::DeleteMessage { room: room.to_owned(), id }], move |result| match result {
            Ok(_) => {
                if let Some(hub) = hub.upgrade() {
                    hub.effect(Effect::Delete { room: owned_room, id });
                }
            }
            Err(e) => tracing::error!(room = %owned_room, id, error = %e, "could not delete a message"),
        });
        Ok(vec![audit(actor, "delete", Some(author), Some(room), reason, Some(format!("{{\"message_id\":{id}}}")))])
    }

    fn report(&self, reporter: &Identity, room: &str, id: u64, reason: &str) -> Result<Vec<Write>, RequestError> {
        let message = self
            .store()
            .message(room, id)
            .map_err(|e| RequestError::new(ErrorCode::Unavailable, e.to_string()))?
            .ok_or_else(|| not_found(format!("no message {id} in room {room:?}")))?;
        let value: serde_json::Value = serde_json::from_slice(message.json.as_bytes()).unwrap_or_default();
        let now = now_ms();
        let item = ReviewItem {
            id: 0,
            kind: ReviewKind::Report,
            room: room.to_owned(),
            message_id: Some(id),
            user_id: message.user_id.to_string(),
            nick: value["from"].as_str().unwrap_or_default().to_owned(),
            content: value["content"].as_str().unwrap_or_default().to_owned(),
            reason: reason.to_owned(),
            filter: None,
            reporter: Some(reporter.user_id.to_string()),
            ts: message.ts,
            created_at: now,
            status: ReviewStatus::Pending,
            decided_by: None,
            decided_at: None,
        };
        let actor = Actor::user(reporter);
        Ok(vec![
            Write::Review(item),
            audit(
                &actor,
                "report",
                Some(message.user_id.to_string()),
                Some(room),
                reason,
                Some(format!("{{\"message_id\":{id}}}")),
            ),
        ])
    }

    /// Approves or denies a review item: an approved held message reaches
    /// the room with its original time; an upheld report deletes the message.
    fn decide(
        &self,
        id: i64,
        status: ReviewStatus,
        actor: &Actor,
        reason: Option<&str>,
    ) -> Result<Vec<Write>, RequestError> {
        let item = self
            .store()
            .review_item(id)
            .map_err(|e| RequestError::new(ErrorCode::Unavailable, e.to_string()))?
            .ok_or_else(|| not_found(format!("no review item {id}")))?;
        if item.status != ReviewStatus::Pending {
            return Err(RequestError::new(ErrorCode::BadRequest, format!("review item {id} was already decided")));
        }
        let now = now_ms();
        let mut writes = vec![Write::Decide { id, status, by: actor.id.clone(), at: now }];
        match (item.kind, status) {
            (ReviewKind::Held, ReviewStatus::Approved) => {
                self.deliver_approved(&item);
            }
            (ReviewKind::Report, ReviewStatus::Approved) => {
                if let Some(message_id) = item.message_id
                    && let Ok(mut delete) = self.delete_message(&item.room, message_id, actor, "report upheld")
                {
                    writes.append(&mut delete);
                }
            }
            _ => {}
        }
        let action = if status == ReviewStatus::Approved { "approve" } else { "deny" };
        writes.push(audit(
            actor,
            action,
            Some(format!("review:{id}")),
            Some(&item.room),
            reason.unwrap_or(action),
            None,
        ));
        let frame = json_of(&encode(&ServerFrame::Reviewed { id, status, by: &actor.id }));
        self.effect(Effect::ToStaff { frame: frame.clone() });
        self.effect(Effect::ToUser { user: item.user_id.clone(), frame, members_only: true });
        Ok(writes)
    }

    /// Puts a message on hold: the review item and an audit entry are
    /// stored; once they are, the author gets `held` (with the item's id)
    /// and the moderators online get `review`.
    pub fn hold(&self, client: &Arc<Client>, identity: &Identity, held: Held<'_>) {
        let Held { room, content, reason, filter, reference } = held;
        let now = now_ms();
        let item = ReviewItem {
            id: 0,
            kind: ReviewKind::Held,
            room: room.to_owned(),
            message_id: None,
            user_id: identity.user_id.to_string(),
            nick: identity.nick.to_string(),
            content: content.to_owned(),
            reason: reason.to_owned(),
            filter: Some(filter.to_owned()),
            reporter: None,
            ts: now,
            created_at: now,
            status: ReviewStatus::Pending,
            decided_by: None,
            decided_at: None,
        };
        let actor = Actor { id: format!("filter:{filter}"), rule: Some(filter.to_owned()) };
        let writes = vec![
            Write::Review(item.clone()),
            audit(&actor, "hold", Some(item.user_id.clone()), Some(room), reason, None),
        ];
        let (reply, room, reason, reference) =
            (Reply::new(client, 1), room.to_owned(), reason.to_owned(), reference.cloned());
        let hub = self.self_ref();
        self.commit_then(writes, move |result| {
            let Ok(results) = result else {
                reply.send(
                    RequestError::new(ErrorCode::Unavailable, "the message could not be queued for review").to_frame(),
                );
                return;
            };
            let id = match results.first() {
                Some(Written::Id(id)) => *id,
                _ => 0,
            };
            reply.send(encode(&ServerFrame::Held { room: &room, id, reason: &reason, reference: reference.as_ref() }));
            if let Some(hub) = hub.upgrade() {
                let item = ReviewItem { id, ..item };
                hub.effect(Effect::ToStaff { frame: json_of(&encode(&ServerFrame::Review { item: &item })) });
            }
        });
    }

    /// Strikes for a refused message, and what the ladder does about them.
    pub fn strike(&self, identity: &Identity, filter: &str, points: f64, room: &str) {
        if points <= 0.0 || identity.roles.is_staff() {
            return;
        }
        let policies = self.policies();
        let config = &policies.config.moderation;
        let now = now_ms();
        if let Some(cluster) = self.cluster.clone() {
            // Counted once for the user across nodes, in Redis; the ladder
            // runs on the node whose message crossed a step.
            let seed = self.moderation.strikes_of(&identity.user_id, config.strike_decay, now);
            let (hub, identity, filter, room) = (self.self_ref(), identity.clone(), filter.to_owned(), room.to_owned());
            let decay = config.strike_decay;
            tokio::spawn(async move {
                let counted = cluster.add_strikes(&identity.user_id, points, decay, now, seed).await;
                let Some(hub) = hub.upgrade() else { return };
                match counted {
                    Ok((before, after, since)) => {
                        let strikes = Strikes { points: after, updated_at: since };
                        hub.moderation.set_strikes(&identity.user_id, strikes);
                        hub.strikes_counted(&identity, &filter, &room, (before, after, strikes));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "strikes counted on this node only: the cluster broker is unreachable");
                        let decay = hub.policies().config.moderation.strike_decay;
                        let counted = hub.moderation.add_strikes(&identity.user_id, points, decay, now);
                        hub.strikes_counted(&identity, &filter, &room, counted);
                    }
                }
            });
            return;
        }
        let counted = self.moderation.add_strikes(&identity.user_id, points, config.strike_decay, now);
        self.strikes_counted(identity, filter, room, counted);
    }

    /// Stores a user's new strikes and climbs the ladder: every step
    /// between `before` and `after` is carried out.
    fn strikes_counted(&self, identity: &Identity, filter: &str, room: &str, counted: (f64, f64, Strikes)) {
        let (before, after, strikes) = counted;
        let policies = self.policies();
        let config = &policies.config.moderation;
        let mut writes = vec![Write::Strikes { user_id: identity.user_id.to_string(), strikes }];
        for step in config.ladder.iter().filter(|s| before < s.strikes && s.strikes <= after) {
            let sanction = match step.action {
                LadderAction::Warn => Sanction::Warn,
                LadderAction::Mute => Sanction::Mute(step.duration.unwrap_or(config.default_mute)),
                LadderAction::Kick => Sanction::Kick,
                LadderAction::Ban => Sanction::Ban(step.duration),
            };
            let actor =
                Actor { id: "ladder".to_owned(), rule: Some(format!("{} strikes (last: {filter})", step.strikes)) };
            let reason = format!("{} strikes for messages refused by the filters", step.strikes);
            if let Ok(mut more) = self.sanction(&identity.user_id, sanction, &actor, &reason, Some(room)) {
                writes.append(&mut more);
            }
        }
        self.store().write(writes);
    }

    /// Carries out a filter's `escalate` verdict.
    pub fn escalate(
        &self,
        identity: &Identity,
        filter: &str,
        action: wardroom_plugin_api::Escalation,
        reason: &str,
        room: &str,
    ) {
        use wardroom_plugin_api::Escalation;
        let sanction = match action {
            Escalation::Warn => Sanction::Warn,
            Escalation::Mute(d) => Sanction::Mute(d),
            Escalation::Kick => Sanction::Kick,
            Escalation::Ban(d) => Sanction::Ban(d),
            _ => {
                tracing::warn!(filter = %filter, ?action, "escalation of an unknown kind ignored");
                return;
            }
        };
        let actor = Actor { id: format!("filter:{filter}"), rule: Some(filter.to_owned()) };
        match self.sanction(&identity.user_id, sanction, &actor, reason, Some(room)) {
            Ok(writes) => {
                self.store().write(writes);
            }
            Err(e) => tracing::info!(filter = %filter, error = %e.message, "escalation not carried out"),
        }
    }

    /// Catches up with moderation done while this node was cut off from the
    /// cluster's broker: reads the store's bans, mutes and room settings,
    /// and closes or tells the users a missed ban or mute concerns.
    pub(crate) async fn resync_moderation(&self) {
        const GRACE_MS: u64 = 10_000;
        let store = self.store().clone();
        let now = now_ms();
        let snapshot = match tokio::task::spawn_blocking(move || store.snapshot(now)).await {
            Ok(Ok(snapshot)) => snapshot,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot catch up with moderation: the store is unavailable");
                return;
            }
            Err(_) => return,
        };
        let (bans, mutes) = self.moderation.resync(snapshot, now, GRACE_MS);
        for ban in bans.iter().filter(|b| b.expires_at.is_none_or(|end| end > now)) {
            let Some(user) = &ban.user_id else { continue };
            for client in self.clients_of(user) {
                client.outbox.close(CloseCode::POLICY, &format!("banned: {}", ban.reason), CloseReason::Banned, false);
            }
        }
        for mute in mutes.iter().filter(|m| m.until > now) {
            let frame =
                encode(&ServerFrame::Muted { until: mute.until, remaining_ms: mute.until - now, reason: &mute.reason });
            for client in self.clients_of(&mute.user_id) {
                client.outbox.push(frame.clone());
            }
        }
    }

    /// Carries out `effect` here and, in a cluster, publishes it so every
    /// other node carries it out too.
    pub fn effect(&self, effect: Effect) {
        self.apply_effect(&effect);
        if let Some(cluster) = &self.cluster {
            cluster.publish(effect);
        }
    }

    /// Carries out an effect on this node's memory and clients: the one
    /// path for moderation done here and for what another node published.
    pub fn apply_effect(&self, effect: &Effect) {
        match effect {
            Effect::ToStaff { frame } => self.broadcast_to_staff(&text_frame(frame.as_bytes())),
            Effect::ToUser { user, frame, members_only } => {
                let frame = text_frame(frame.as_bytes());
                for client in self.clients_of(user) {
                    if !(*members_only && client.identity().roles.is_staff()) {
                        client.outbox.push(frame.clone());
                    }
                }
            }
            Effect::CloseUser { user, message } => {
                for client in self.clients_of(user) {
                    client.outbox.close(CloseCode::POLICY, message, CloseReason::Kicked, false);
                }
            }
            Effect::Ban { ban, message } => {
                let ban = Ban::from(ban);
                lock(&self.moderation.inner).bans.push(ban.clone());
                let closing: Vec<Arc<Client>> = match (&ban.user_id, ban.cidr.as_deref().map(str::parse::<IpNet>)) {
                    (Some(user), _) => self.clients_of(user),
                    (None, Some(Ok(net))) => self
                        .all_clients()
                        .into_iter()
                        .filter(|c| c.identity().is_guest() && net.contains(&c.addr))
                        .collect(),
                    _ => Vec::new(),
                };
                for client in closing {
                    client.outbox.close(CloseCode::POLICY, message, CloseReason::Banned, false);
                }
            }
            Effect::LiftBans { user, net, bans } => {
                let net = net.as_deref().and_then(|n| n.parse::<IpNet>().ok());
                lock(&self.moderation.inner).bans.retain(|b| {
                    let by_user = user.is_some() && b.user_id == *user;
                    let by_net = net.is_some() && b.cidr.as_deref().and_then(|c| c.parse::<IpNet>().ok()) == net;
                    let listed = bans.iter().any(|(u, c, at)| b.user_id == *u && b.cidr == *c && b.created_at == *at);
                    !(by_user || by_net || listed)
                });
            }
            Effect::Mute { mute } => {
                let mute = Mute::from(mute);
                let now = now_ms();
                let frame = encode(&ServerFrame::Muted {
                    until: mute.until,
                    remaining_ms: mute.until.saturating_sub(now),
                    reason: &mute.reason,
                });
                let user = mute.user_id.clone();
                lock(&self.moderation.inner).mutes.insert(user.clone(), mute);
                for client in self.clients_of(&user) {
                    client.outbox.push(frame.clone());
                }
            }
            Effect::Unmute { user } => {
                if lock(&self.moderation.inner).mutes.remove(user).is_some() {
                    let frame = encode(&ServerFrame::Unmuted {});
                    for client in self.clients_of(user) {
                        client.outbox.push(frame.clone());
                    }
                }
            }
            Effect::RoomSettings { room, slow_mode_secs, locked } => {
                let settings = RoomSettings { room: room.clone(), slow_mode_secs: *slow_mode_secs, locked: *locked };
                lock(&self.moderation.inner).rooms.insert(room.clone(), settings);
                let frame = encode(&ServerFrame::Room { room, slow_mode: *slow_mode_secs, locked: *locked });
                self.broadcast_to_room(room, &frame);
            }
            Effect::Delete { room, id } => {
                self.remove_from_history(room, *id);
                self.broadcast_to_room(room, &encode(&ServerFrame::Deleted { room, id: *id }));
            }
            Effect::Presence { room, member, who, event, previous } => {
                self.apply_presence(room, member, who, *event, previous.as_deref());
            }
            Effect::Reload => {
                // Reading and building can take a moment: off the runtime.
                let reloader = self.reloader().clone();
                tokio::task::spawn_blocking(move || reloader.reload());
            }
        }
    }

    /// Whether `client` may post in `room` now: mutes, locks and the
    /// room's slow mode (staff are exempt from locks and slow mode).
    pub fn may_post(&self, identity: &Identity, room: &str) -> Result<(), RequestError> {
        let now = now_ms();
        if let Some(mute) = self.moderation.mute_of(&identity.user_id, now) {
            let remaining = mute.until - now;
            return Err(RequestError {
                retry_after_ms: Some(remaining),
                ..RequestError::new(
                    ErrorCode::Muted,
                    format!("you are muted for {} more seconds: {}", remaining.div_ceil(1000), mute.reason),
                )
            });
        }
        if identity.roles.is_staff() {
            return Ok(());
        }
        let settings = self.moderation.room(room);
        if settings.locked {
            return Err(RequestError::new(ErrorCode::RoomLocked, format!("room {room:?} is read-only")));
        }
        if settings.slow_mode_secs > 0
            && let Some(wait) = self.moderation.slow_mode_wait(room, &identity.user_id, settings.slow_mode_secs, now)
        {
            return Err(RequestError {
                retry_after_ms: Some(wait),
                ..RequestError::new(
                    ErrorCode::Policy("slow_mode".into()),
                    format!("slow mode: one message every {}s in this room", settings.slow_mode_secs),
                )
            });
        }
        Ok(())
    }
}

/// The highest role in `roles`, for messages.
fn rank_name(roles: Roles) -> &'static str {
    match roles.rank() {
        2 => "an admin",
        1 => "a moderator",
        _ => "a member",
    }
}

impl Request {
    /// The user, address or ban a moderation request is aimed at (for the
    /// audit log).
    pub fn target(&self) -> Option<String> {
        match self {
            Request::Kick { user, .. }
            | Request::Mute { user, .. }
            | Request::Unmute { user }
            | Request::ClearStrikes { user } => Some(user.clone()),
            Request::Ban { user, ip, .. } => user.clone().or_else(|| ip.clone()),
            Request::Unban { user, ip, ban } => {
                user.clone().or_else(|| ip.clone()).or_else(|| ban.map(|id| format!("ban:{id}")))
            }
            Request::Approve { item } | Request::Deny { item, .. } => Some(format!("review:{item}")),
            _ => None,
        }
    }

    /// The room a request is about, if any.
    pub fn room(&self) -> Option<&str> {
        match self {
            Request::Join { room }
            | Request::Leave { room }
            | Request::Message { room, .. }
            | Request::History { room, .. }
            | Request::Report { room, .. }
            | Request::Delete { room, .. }
            | Request::SlowMode { room, .. }
            | Request::Lock { room }
            | Request::Unlock { room } => Some(room),
            _ => None,
        }
    }

    /// The request's `type`, as clients write it.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Join { .. } => "join",
            Request::Leave { .. } => "leave",
            Request::Message { .. } => "message",
            Request::Nick { .. } => "nick",
            Request::History { .. } => "history",
            Request::Auth { .. } => "auth",
            Request::Report { .. } => "report",
            Request::Kick { .. } => "kick",
            Request::Mute { .. } => "mute",
            Request::Unmute { .. } => "unmute",
            Request::Ban { .. } => "ban",
            Request::Unban { .. } => "unban",
            Request::Delete { .. } => "delete",
            Request::SlowMode { .. } => "slow_mode",
            Request::Lock { .. } => "lock",
            Request::Unlock { .. } => "unlock",
            Request::ClearStrikes { .. } => "clear_strikes",
            Request::Approve { .. } => "approve",
            Request::Deny { .. } => "deny",
        }
    }
}
