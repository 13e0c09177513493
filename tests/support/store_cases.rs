//! The behaviour every [`Store`] implementation shares, as cases generic over
//! a [`Backend`]. A test file runs all of them with
//!
//! ```ignore
//! #[macro_use]
//! #[path = "support/store_cases.rs"]
//! mod store_cases;
//! store_cases!(MyBackend::new());
//! ```
//!
//! where the expression gives a fresh, empty database for each case (and
//! cleans it up when dropped).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wardroom::store::{
    AuditEntry, AuditQuery, Ban, Mute, ReviewItem, ReviewKind, ReviewStatus, RoomSettings, Store, StoreError,
    StoredMessage, Strikes, Write, Written,
};

/// A store implementation on a database of its own.
pub trait Backend {
    /// The implementation.
    type Store: Store;
    /// Most messages one retention transaction deletes.
    const PRUNE_CHUNK: usize;
    /// Opens the database (the same one each time) with these retention
    /// settings (`0` and `None`: keep everything).
    fn open(&self, retain_per_room: u64, retain_for: Option<Duration>) -> Self::Store;
    /// Runs a retention pass now.
    fn run_retention(store: &Self::Store) -> Result<u64, StoreError>;
    /// Commits what is queued and stops the writer.
    fn close(store: &Self::Store);
    /// Messages deleted by retention since opening.
    fn pruned(store: &Self::Store) -> u64;
}

/// One `#[test]` per case, each on a database from `$backend`.
macro_rules! store_cases {
    ($backend:expr) => {
        store_cases!(@each $backend;
            messages_round_trip_and_deletion,
            last_message_id_counts_writes_still_queued,
            bans_round_trip_and_lift,
            mutes_strikes_and_rooms_round_trip,
            review_items_round_trip_and_decide,
            audit_round_trip_filters_and_paging,
            history_pages_backwards_without_deleted,
            retention_by_count_keeps_the_newest,
            retention_by_age_and_ids_survive_prune_and_reopen,
            automatic_retention_runs_in_the_background,
            reopening_keeps_everything_and_does_not_reuse_ids,
            a_failing_batch_fails_alone,
            empty_batch_resolves_after_earlier_ones,
            concurrent_batches_commit_in_order_with_correct_ids,
            close_commits_queued_writes_then_refuses,
        );
    };
    (@each $backend:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                let backend = $backend;
                store_cases::$case(&backend);
            }
        )*
    };
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

pub fn msg(room: &str, id: u64, ts: u64) -> StoredMessage {
    StoredMessage {
        room: room.into(),
        id,
        user_id: format!("u{}", id % 7).into(),
        json: format!(r#"{{"type":"message","room":"{room}","id":{id},"text":"hello {id}"}}"#).into(),
        ts,
    }
}

pub fn commit(store: &impl Store, writes: Vec<Write>) -> Vec<Written> {
    store.write(writes).wait_blocking().expect("commit")
}

pub fn ids(messages: &[StoredMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.id).collect()
}

pub fn ban(user: Option<&str>, cidr: Option<&str>, expires_at: Option<u64>) -> Ban {
    Ban {
        id: 0,
        user_id: user.map(Into::into),
        cidr: cidr.map(Into::into),
        reason: "spam".into(),
        actor: "mod1".into(),
        created_at: 1_000,
        expires_at,
    }
}

pub fn audit(actor: &str, action: &str, target: Option<&str>, room: Option<&str>) -> AuditEntry {
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

pub fn review(kind: ReviewKind, text: &str) -> ReviewItem {
    ReviewItem {
        id: 0,
        kind,
        room: "lobby".into(),
        message_id: (kind == ReviewKind::Report).then_some(3),
        user_id: "u1".into(),
        nick: "alice".into(),
        content: text.into(),
        reason: "looks bad".into(),
        filter: (kind == ReviewKind::Held).then(|| "profanity".into()),
        reporter: (kind == ReviewKind::Report).then(|| "u2".into()),
        ts: 2_000,
        created_at: 2_001,
        status: ReviewStatus::Pending,
        decided_by: None,
        decided_at: None,
    }
}

pub fn messages_round_trip_and_deletion<B: Backend>(b: &B) {
    let store = b.open(0, None);
    let written = commit(&store, vec![Write::Message(msg("lobby", 1, 10)), Write::Message(msg("lobby", 2, 11))]);
    assert_eq!(written, vec![Written::Done, Written::Done]);
    assert_eq!(store.history("lobby", None, 10).expect("history"), vec![msg("lobby", 1, 10), msg("lobby", 2, 11)]);
    assert_eq!(store.last_message_id("lobby").expect("last"), 2);
    assert_eq!(store.last_message_id("nowhere").expect("last"), 0);

    let written = commit(&store, vec![Write::DeleteMessage { room: "lobby".into(), id: 1 }]);
    assert_eq!(written, vec![Written::Done]);
    assert_eq!(ids(&store.history("lobby", None, 10).expect("history")), vec![2]);
    // Gone for reports and deletions too.
    assert_eq!(store.message("lobby", 1).expect("message"), None);
    assert_eq!(store.message("lobby", 2).expect("message"), Some(msg("lobby", 2, 11)));
    assert_eq!(store.message("lobby", 9).expect("message"), None);
    assert_eq!(store.message("lobby", u64::MAX).expect("message"), None);
    // Deleting what does not exist (or cannot) is not an error.
    commit(&store, vec![Write::DeleteMessage { room: "x".into(), id: u64::MAX }]);
}

pub fn last_message_id_counts_writes_still_queued<B: Backend>(b: &B) {
    let store = b.open(0, None);
    let pending = store.write(vec![Write::Message(msg("lobby", 41, 1))]);
    // Before the commit resolves, the id already counts.
    assert_eq!(store.last_message_id("lobby").expect("last"), 41);
    pending.wait_blocking().expect("commit");
    assert_eq!(store.last_message_id("lobby").expect("last"), 41);
}

pub fn bans_round_trip_and_lift<B: Backend>(b: &B) {
    let store = b.open(0, None);
    let written = commit(
        &store,
        vec![
            Write::Ban(ban(Some("u1"), None, None)),
            Write::Ban(ban(None, Some("203.0.113.7/32"), Some(10_000))),
            Write::Ban(ban(Some("u3"), Some("198.51.100.0/24"), Some(u64::MAX))),
        ],
    );
    assert_eq!(written, vec![Written::Id(1), Written::Id(2), Written::Id(3)]);

    let all = store.bans(None).expect("bans");
    assert_eq!(all.iter().map(|b| b.id).collect::<Vec<_>>(), vec![3, 2, 1], "newest first");
    assert_eq!(all[2], Ban { id: 1, ..ban(Some("u1"), None, None) });
    assert_eq!(all[1], Ban { id: 2, ..ban(None, Some("203.0.113.7/32"), Some(10_000)) });
    // Saturated, not wrapped.
    assert_eq!(all[0].expires_at, Some(i64::MAX as u64));

    let active = store.bans(Some(10_000)).expect("bans");
    assert_eq!(active.iter().map(|b| b.id).collect::<Vec<_>>(), vec![3, 1], "expired one left out");

    assert_eq!(commit(&store, vec![Write::LiftBan { id: 1, at: 5_000 }]), vec![Written::Done]);
    let active = store.bans(Some(6_000)).expect("bans");
    assert_eq!(active.iter().map(|b| b.id).collect::<Vec<_>>(), vec![3, 2]);
    let lifted = store.bans(None).expect("bans").into_iter().find(|b| b.id == 1).expect("ban 1");
    assert_eq!(lifted.expires_at, Some(5_000), "a lifted ban ends when lifted");
    // Lifting again (or a ban that does not exist) changes nothing.
    commit(&store, vec![Write::LiftBan { id: 1, at: 9_000 }, Write::LiftBan { id: 99, at: 9_000 }]);
    let lifted = store.bans(None).expect("bans").into_iter().find(|b| b.id == 1).expect("ban 1");
    assert_eq!(lifted.expires_at, Some(5_000));

    let snapshot = store.snapshot(6_000).expect("snapshot");
    assert_eq!(snapshot.bans.iter().map(|b| b.id).collect::<Vec<_>>(), vec![3, 2]);
}

pub fn mutes_strikes_and_rooms_round_trip<B: Backend>(b: &B) {
    let store = b.open(0, None);
    let mute = |user: &str, until: u64| Mute {
        user_id: user.into(),
        until,
        reason: "flood".into(),
        actor: "mod1".into(),
        created_at: 100,
    };
    let strikes = |points: f64| Strikes { points, updated_at: 200 };
    let settings =
        |room: &str, slow: u32, locked: bool| RoomSettings { room: room.into(), slow_mode_secs: slow, locked };
    let written = commit(
        &store,
        vec![
            Write::Mute(mute("u1", 1_000)),
            Write::Mute(mute("u2", 5_000)),
            Write::Mute(mute("u2", 9_000)),
            Write::Mute(mute("u3", 9_000)),
            Write::Unmute { user_id: "u3".into() },
            Write::Strikes { user_id: "u1".into(), strikes: strikes(2.5) },
            Write::Strikes { user_id: "u2".into(), strikes: strikes(1.0) },
            Write::Strikes { user_id: "u3".into(), strikes: strikes(f64::NAN) },
            Write::RoomSettings(settings("lobby", 30, false)),
            Write::RoomSettings(settings("vip", 0, true)),
            Write::RoomSettings(settings("quiet", 10, false)),
            Write::RoomSettings(settings("quiet", 0, false)),
        ],
    );
    assert_eq!(written, vec![Written::Done; 12]);

    let snapshot = store.snapshot(2_000).expect("snapshot");
    assert_eq!(snapshot.mutes, vec![mute("u2", 9_000)], "u1 ended, u2 replaced, u3 unmuted");
    assert_eq!(snapshot.strikes, vec![("u1".to_string(), strikes(2.5)), ("u2".to_string(), strikes(1.0))]);
    assert_eq!(snapshot.rooms, vec![settings("lobby", 30, false), settings("vip", 0, true)]);
    assert_eq!(store.snapshot(0).expect("snapshot").mutes.len(), 2);

    commit(&store, vec![Write::Strikes { user_id: "u1".into(), strikes: strikes(0.0) }]);
    assert_eq!(store.snapshot(2_000).expect("snapshot").strikes, vec![("u2".to_string(), strikes(1.0))]);
}

pub fn review_items_round_trip_and_decide<B: Backend>(b: &B) {
    let store = b.open(0, None);
    let held = review(ReviewKind::Held, "bad words");
    let report = review(ReviewKind::Report, "rude");
    let written = commit(&store, vec![Write::Review(held.clone()), Write::Review(report.clone())]);
    assert_eq!(written, vec![Written::Id(1), Written::Id(2)]);

    assert_eq!(store.review_item(1).expect("item"), Some(ReviewItem { id: 1, ..held.clone() }));
    assert_eq!(store.review_item(2).expect("item"), Some(ReviewItem { id: 2, ..report.clone() }));
    assert_eq!(store.review_item(3).expect("item"), None);

    let written =
        commit(&store, vec![Write::Decide { id: 1, status: ReviewStatus::Approved, by: "mod1".into(), at: 3_000 }]);
    assert_eq!(written, vec![Written::Done]);
    let all = store.review_items(None).expect("items");
    assert_eq!(all.iter().map(|i| i.id).collect::<Vec<_>>(), vec![1, 2], "oldest first");
    assert_eq!(all[0].status, ReviewStatus::Approved);
    assert_eq!(all[0].decided_by.as_deref(), Some("mod1"));
    assert_eq!(all[0].decided_at, Some(3_000));
    let pending = store.review_items(Some(ReviewStatus::Pending)).expect("items");
    assert_eq!(pending, vec![ReviewItem { id: 2, ..report }]);
    assert!(store.review_items(Some(ReviewStatus::Denied)).expect("items").is_empty());
}

pub fn audit_round_trip_filters_and_paging<B: Backend>(b: &B) {
    let store = b.open(0, None);
    let entries = [
        audit("mod1", "ban", Some("u1"), Some("lobby")),
        audit("mod2", "mute", Some("u2"), Some("lobby")),
        audit("mod1", "kick", Some("u2"), Some("vip")),
        audit("filter:profanity", "delete", None, None),
        audit("mod1", "mute", Some("u1"), None),
    ];
    let written = commit(&store, entries.iter().cloned().map(Write::Audit).collect());
    assert_eq!(written, (1..=5).map(Written::Id).collect::<Vec<_>>());

    let query = |actor: Option<&str>, target: Option<&str>, room: Option<&str>, before, limit| {
        let q = AuditQuery {
            actor: actor.map(Into::into),
            target: target.map(Into::into),
            room: room.map(Into::into),
            before,
            limit,
        };
        store.audit(&q).expect("audit").iter().map(|e| e.id).collect::<Vec<_>>()
    };
    assert_eq!(query(None, None, None, None, 100), vec![5, 4, 3, 2, 1]);
    assert_eq!(query(Some("mod1"), None, None, None, 100), vec![5, 3, 1]);
    assert_eq!(query(None, Some("u2"), None, None, 100), vec![3, 2]);
    assert_eq!(query(None, None, Some("lobby"), None, 100), vec![2, 1]);
    assert_eq!(query(Some("mod1"), Some("u1"), None, None, 100), vec![5, 1]);
    assert_eq!(query(Some("mod1"), Some("u1"), Some("lobby"), None, 100), vec![1]);
    assert_eq!(query(None, None, None, None, 2), vec![5, 4]);
    assert_eq!(query(None, None, None, Some(4), 2), vec![3, 2]);
    assert_eq!(query(None, None, None, Some(2), 2), vec![1]);
    assert_eq!(query(None, None, None, None, 0), Vec::<i64>::new());
    assert_eq!(query(None, None, None, None, usize::MAX).len(), 5);

    let all = store.audit(&AuditQuery { limit: 10, ..AuditQuery::default() }).expect("audit");
    assert_eq!(all[4], AuditEntry { id: 1, ..entries[0].clone() });
}

pub fn history_pages_backwards_without_deleted<B: Backend>(b: &B) {
    let store = b.open(0, None);
    commit(&store, (1..=25).map(|id| Write::Message(msg("lobby", id, 1_000 + id))).collect());
    commit(&store, (1..=5).map(|id| Write::Message(msg("other", id, 1_000 + id))).collect());
    commit(&store, [3, 17, 18, 24].into_iter().map(|id| Write::DeleteMessage { room: "lobby".into(), id }).collect());

    let page = store.history("lobby", None, 10).expect("history");
    assert_eq!(ids(&page), vec![12, 13, 14, 15, 16, 19, 20, 21, 22, 23, 25][1..].to_vec());
    let page = store.history("lobby", Some(13), 10).expect("history");
    assert_eq!(ids(&page), vec![1, 2, 4, 5, 6, 7, 8, 9, 10, 11, 12][1..].to_vec());
    let page = store.history("lobby", Some(2), 10).expect("history");
    assert_eq!(ids(&page), vec![1]);
    assert!(store.history("lobby", Some(1), 10).expect("history").is_empty());
    assert!(store.history("lobby", None, 0).expect("history").is_empty());
    assert!(store.history("nowhere", None, 10).expect("history").is_empty());
    // Out-of-range bounds and limits are clamped, not errors.
    assert_eq!(store.history("lobby", Some(u64::MAX), usize::MAX).expect("history").len(), 21);
    assert_eq!(ids(&store.history("other", None, 3).expect("history")), vec![3, 4, 5]);
}

pub fn retention_by_count_keeps_the_newest<B: Backend>(b: &B) {
    let store = b.open(5, None);
    commit(&store, (1..=12).map(|id| Write::Message(msg("a", id, id))).collect());
    commit(&store, (1..=3).map(|id| Write::Message(msg("b", id, id))).collect());
    assert_eq!(B::run_retention(&store).expect("prune"), 7);
    assert_eq!(ids(&store.history("a", None, 100).expect("history")), vec![8, 9, 10, 11, 12]);
    assert_eq!(ids(&store.history("b", None, 100).expect("history")), vec![1, 2, 3]);
    assert_eq!(store.last_message_id("a").expect("last"), 12);
    assert_eq!(B::run_retention(&store).expect("prune"), 0);

    // A big excess goes in several chunks, shared between the rooms.
    let n = 3 * B::PRUNE_CHUNK as u64 + 17;
    commit(&store, (13..13 + n).map(|id| Write::Message(msg("a", id, id))).collect());
    commit(&store, (4..304).map(|id| Write::Message(msg("b", id, id))).collect());
    commit(&store, (1..=6).map(|id| Write::Message(msg("c", id, id))).collect());
    assert_eq!(B::run_retention(&store).expect("prune"), n + 298 + 1);
    assert_eq!(ids(&store.history("a", None, 100).expect("history")), (8 + n..13 + n).collect::<Vec<_>>());
    assert_eq!(ids(&store.history("b", None, 100).expect("history")), (299..304).collect::<Vec<_>>());
    assert_eq!(ids(&store.history("c", None, 100).expect("history")), (2..=6).collect::<Vec<_>>());
    assert_eq!(B::pruned(&store), 7 + n + 298 + 1);
}

pub fn retention_by_age_and_ids_survive_prune_and_reopen<B: Backend>(b: &B) {
    let hour = Duration::from_secs(3600);
    let now = now_ms();
    let old = now - 2 * 3600 * 1000;
    {
        let store = b.open(0, Some(hour));
        commit(&store, (1..=5).map(|id| Write::Message(msg("a", id, old + id))).collect());
        commit(&store, (6..=8).map(|id| Write::Message(msg("a", id, now + id))).collect());
        commit(&store, (1..=4).map(|id| Write::Message(msg("b", id, old + id))).collect());
        assert_eq!(B::run_retention(&store).expect("prune"), 9);
        assert_eq!(ids(&store.history("a", None, 100).expect("history")), vec![6, 7, 8]);
        assert!(store.history("b", None, 100).expect("history").is_empty());
        assert_eq!(store.last_message_id("a").expect("last"), 8);
        assert_eq!(store.last_message_id("b").expect("last"), 4, "high-water mark survives an empty room");
    }
    // Reopen with a count limit too: the row counts stayed right.
    let store = b.open(2, Some(hour));
    assert_eq!(store.last_message_id("b").expect("last"), 4);
    assert_eq!(store.last_message_id("a").expect("last"), 8);
    commit(&store, vec![Write::Message(msg("b", 5, now))]);
    assert_eq!(B::run_retention(&store).expect("prune"), 1);
    assert_eq!(ids(&store.history("a", None, 100).expect("history")), vec![7, 8]);
    assert_eq!(ids(&store.history("b", None, 100).expect("history")), vec![5]);
    assert_eq!(store.last_message_id("b").expect("last"), 5);
}

pub fn automatic_retention_runs_in_the_background<B: Backend>(b: &B) {
    let store = b.open(3, None);
    commit(&store, (1..=10).map(|id| Write::Message(msg("a", id, id))).collect());
    let deadline = Instant::now() + Duration::from_secs(15);
    while store.history("a", None, 100).expect("history").len() > 3 {
        assert!(Instant::now() < deadline, "retention did not run");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ids(&store.history("a", None, 100).expect("history")), vec![8, 9, 10]);
}

pub fn reopening_keeps_everything_and_does_not_reuse_ids<B: Backend>(b: &B) {
    let writes = vec![
        Write::Message(msg("lobby", 1, 10)),
        Write::Message(msg("lobby", 2, 11)),
        Write::DeleteMessage { room: "lobby".into(), id: 1 },
        Write::Ban(ban(Some("u1"), None, None)),
        Write::Mute(Mute { user_id: "u2".into(), until: 9_000, reason: "r".into(), actor: "m".into(), created_at: 1 }),
        Write::Strikes { user_id: "u3".into(), strikes: Strikes { points: 1.5, updated_at: 7 } },
        Write::Review(review(ReviewKind::Held, "x")),
        Write::RoomSettings(RoomSettings { room: "lobby".into(), slow_mode_secs: 5, locked: true }),
        Write::Audit(audit("mod1", "ban", Some("u1"), None)),
        Write::StaffName { looks: vec!["rnara".into(), "mara".into()], at: 3 },
        Write::StaffName { looks: vec!["rnara".into()], at: 4 },
    ];
    let (history, snapshot, items, entries) = {
        let store = b.open(0, None);
        commit(&store, writes);
        (
            store.history("lobby", None, 10).expect("history"),
            store.snapshot(1_000).expect("snapshot"),
            store.review_items(None).expect("items"),
            store.audit(&AuditQuery { limit: 10, ..AuditQuery::default() }).expect("audit"),
        )
    };
    let store = b.open(0, None);
    assert_eq!(store.history("lobby", None, 10).expect("history"), history);
    let again = store.snapshot(1_000).expect("snapshot");
    assert_eq!(snapshot.staff_names, ["mara", "rnara"], "each key once, in order");
    assert_eq!(
        (again.bans, again.mutes, again.strikes, again.rooms, again.staff_names),
        (snapshot.bans, snapshot.mutes, snapshot.strikes, snapshot.rooms, snapshot.staff_names)
    );
    assert_eq!(store.review_items(None).expect("items"), items);
    assert_eq!(store.audit(&AuditQuery { limit: 10, ..AuditQuery::default() }).expect("audit"), entries);
    assert_eq!(store.message("lobby", 1).expect("message"), None, "still deleted");
    assert_eq!(store.message("lobby", 2).expect("message"), Some(msg("lobby", 2, 11)));
    assert_eq!(store.last_message_id("lobby").expect("last"), 2);
    let written = commit(
        &store,
        vec![
            Write::Ban(ban(Some("u9"), None, None)),
            Write::Review(review(ReviewKind::Report, "y")),
            Write::Audit(audit("mod1", "mute", None, None)),
        ],
    );
    assert_eq!(written, vec![Written::Id(2), Written::Id(2), Written::Id(2)]);
}

pub fn a_failing_batch_fails_alone<B: Backend>(b: &B) {
    let store = b.open(0, None);
    commit(&store, vec![Write::Message(msg("a", 1, 1))]);
    // Queued together, so very likely one group.
    let first = store.write(vec![Write::Message(msg("a", 2, 2)), Write::Audit(audit("m", "x", None, None))]);
    let duplicate = store.write(vec![Write::Audit(audit("m", "y", None, None)), Write::Message(msg("a", 1, 1))]);
    let too_big = store.write(vec![Write::Message(msg("a", u64::MAX, 1))]);
    let bad_report =
        store.write(vec![Write::Review(ReviewItem { message_id: Some(u64::MAX), ..review(ReviewKind::Report, "z") })]);
    let last = store.write(vec![Write::Message(msg("a", 3, 3)), Write::Audit(audit("m", "z", None, None))]);
    assert_eq!(first.wait_blocking().expect("first"), vec![Written::Done, Written::Id(1)]);
    assert!(matches!(duplicate.wait_blocking(), Err(StoreError::Database(_))));
    assert!(matches!(too_big.wait_blocking(), Err(StoreError::Database(_))));
    assert!(matches!(bad_report.wait_blocking(), Err(StoreError::Database(_))));
    assert_eq!(last.wait_blocking().expect("last"), vec![Written::Done, Written::Id(2)]);
    assert!(store.is_healthy(), "a bad batch is not an unhealthy store");
    // The failed batch left nothing behind.
    let actions: Vec<String> = store
        .audit(&AuditQuery { limit: 10, ..AuditQuery::default() })
        .expect("audit")
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, vec!["z", "x"]);
    assert_eq!(ids(&store.history("a", None, 10).expect("history")), vec![1, 2, 3]);
    assert_eq!(store.last_message_id("a").expect("last"), 3);
    assert!(store.review_items(None).expect("items").is_empty());
}

pub fn empty_batch_resolves_after_earlier_ones<B: Backend>(b: &B) {
    let store = b.open(0, None);
    let first = store.write(vec![Write::Message(msg("a", 1, 1))]);
    assert_eq!(store.write(Vec::new()).wait_blocking().expect("empty"), Vec::new());
    assert_eq!(ids(&store.history("a", None, 10).expect("history")), vec![1]);
    assert!(first.wait_blocking().is_ok());
}

pub fn concurrent_batches_commit_in_order_with_correct_ids<B: Backend>(b: &B) {
    const THREADS: u64 = 8;
    const ROUNDS: u64 = 50;
    const PIPELINE: u64 = 5;
    let store = Arc::new(b.open(0, None));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let room = format!("room{t}");
                let mut got = Vec::new();
                for round in 0..ROUNDS {
                    // Several batches in flight at once, then wait for all.
                    let commits: Vec<_> = (0..PIPELINE)
                        .map(|k| {
                            let id = round * PIPELINE + k + 1;
                            let mut entry = audit("bot", "say", None, Some(&room));
                            entry.details = Some(format!("{t}:{id}"));
                            (id, store.write(vec![Write::Message(msg(&room, id, id)), Write::Audit(entry)]))
                        })
                        .collect();
                    for (id, commit) in commits {
                        match commit.wait_blocking().expect("commit").as_slice() {
                            [Written::Done, Written::Id(audit_id)] => got.push((id, *audit_id)),
                            other => panic!("unexpected results {other:?}"),
                        }
                    }
                }
                got
            })
        })
        .collect();
    let mut all_audit_ids = Vec::new();
    for (t, handle) in handles.into_iter().enumerate() {
        let got = handle.join().expect("thread");
        assert_eq!(got.len() as u64, ROUNDS * PIPELINE);
        // Queue order is commit order: audit ids grow with the message ids.
        assert!(got.windows(2).all(|w| w[0].1 < w[1].1), "thread {t}: out of order");
        let entries = store
            .audit(&AuditQuery { room: Some(format!("room{t}")), limit: usize::MAX, ..AuditQuery::default() })
            .expect("audit");
        let by_id: HashMap<i64, String> = entries.into_iter().map(|e| (e.id, e.details.unwrap_or_default())).collect();
        for (message_id, audit_id) in &got {
            assert_eq!(by_id.get(audit_id), Some(&format!("{t}:{message_id}")), "id of another batch");
        }
        let history = store.history(&format!("room{t}"), None, usize::MAX).expect("history");
        assert_eq!(ids(&history), (1..=ROUNDS * PIPELINE).collect::<Vec<_>>());
        all_audit_ids.extend(got.into_iter().map(|(_, id)| id));
    }
    all_audit_ids.sort_unstable();
    assert_eq!(all_audit_ids, (1..=(THREADS * ROUNDS * PIPELINE) as i64).collect::<Vec<_>>());
    assert!(store.is_healthy());
}

pub fn close_commits_queued_writes_then_refuses<B: Backend>(b: &B) {
    let store = b.open(0, None);
    let pending: Vec<_> = (1..=100).map(|id| store.write(vec![Write::Message(msg("a", id, id))])).collect();
    B::close(&store);
    for commit in pending {
        assert!(commit.wait_blocking().is_ok(), "queued before close, so committed");
    }
    assert!(!store.is_healthy());
    assert!(matches!(
        store.write(vec![Write::Message(msg("a", 101, 1))]).wait_blocking(),
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(B::run_retention(&store), Err(StoreError::Unavailable(_))));
    assert_eq!(store.last_message_id("a").expect("reads still work"), 100);
    B::close(&store);
    drop(store);
    let store = b.open(0, None);
    assert_eq!(store.history("a", None, 1000).expect("history").len(), 100);
}
