//! `wardroom-repeat-guard`: the `repeat_guard` filter. It rejects a user's
//! message when the user already sent the same, or nearly the same, message
//! too often within a window (code `repeated`, with a retry hint), and a
//! message that mentions too many distinct people (code `mention_flood`).
//!
//! ```toml
//! [[filters]]
//! kind = "repeat_guard"
//! # How far back repeats are counted: a number with a unit, ms, s, m or h,
//! # e.g. "500ms", "30s", "5m". More than 0 and at most 1h. Default "30s".
//! window = "30s"
//! # How many nearly identical messages a user may send within the window;
//! # the next one is rejected with the code `repeated`. 1 to 20, default 2
//! # (the third is rejected).
//! max_repeats = 2
//! # How alike two messages must be to count as the same: the Dice
//! # coefficient of their character pairs, from 0.5 (loose) to 1.0 (equal
//! # once normalised). Default 0.9.
//! similarity = 0.9
//! # A message mentioning more than this many distinct @nicks is rejected
//! # with the code `mention_flood`. At least 1, default 5.
//! max_mentions = 5
//! ```
//!
//! # Repeats
//!
//! Repeats are counted per user (`user_id`), in every room the filter
//! applies to, so pasting one message into many rooms counts too. Messages
//! are compared once normalised: lowercase, invisible characters (such as
//! zero-width spaces) dropped, whitespace collapsed, and trailing noise
//! (anything but letters, such as `!!!`, a counter or emoji) stripped, so
//! `Buy gold!!!`, `buy  gold 2` and `BUY GOLD` are the same message. Below
//! `similarity = 1.0`, messages also count as the same when the Dice
//! coefficient of their character bigrams reaches `similarity`; the
//! comparison reads at most the first 100 characters (plus the length and a
//! hash of the whole text), so its cost is bounded whatever the message
//! size. A rejected message is not remembered: the retry hint is when the
//! oldest counted repeat leaves the window.
//!
//! # Mentions
//!
//! A mention is `@` at the start of the text or after a character that
//! cannot be in a nickname (so `bob@example.com` is not one), followed by a
//! nickname (letters, digits, `_`, `-`, `.`). Mentions of the same nickname
//! in any case count once. A mention flood is rejected before repeats are
//! counted, and is not remembered as a message.
//!
//! # State
//!
//! For each user the filter remembers only the messages of the last window,
//! at most `2 × max_repeats + 2` of them (enough to catch two messages sent
//! in turn), each as a fingerprint of a few hundred bytes at most. The state
//! is kept across config reloads. `housekeeping` drops users whose messages
//! have all left the window, and at most 50 000 users are tracked: beyond
//! that, the least recently active tenth is forgotten.
#![warn(missing_docs)]

mod duration;
mod text;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Deserialize;
use wardroom_plugin_api::{
    BuildContext, BuildError, Context, Filter, FilterFactory, Message, Options, Registry, Verdict,
};

use crate::text::Fingerprint;

/// Registers the `repeat_guard` filter.
pub fn register(registry: &mut Registry) {
    registry.register(RepeatGuardFactory);
}

/// The options of a `repeat_guard` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RepeatGuardOptions {
    /// How far back repeats are counted, e.g. `"30s"`.
    #[serde(default = "default_window")]
    window: String,
    /// Nearly identical messages allowed within the window.
    #[serde(default = "default_max_repeats")]
    max_repeats: u32,
    /// Dice coefficient from which two messages are the same.
    #[serde(default = "default_similarity")]
    similarity: f64,
    /// Distinct mentions allowed in one message.
    #[serde(default = "default_max_mentions")]
    max_mentions: u32,
}

/// The default `window`.
fn default_window() -> String {
    "30s".to_owned()
}

/// The default `max_repeats`.
fn default_max_repeats() -> u32 {
    2
}

/// The default `similarity`.
fn default_similarity() -> f64 {
    0.9
}

/// The default `max_mentions`.
fn default_max_mentions() -> u32 {
    5
}

/// The longest `window`.
const MAX_WINDOW: Duration = Duration::from_secs(3600);
/// The largest `max_repeats`.
const MAX_REPEATS: u32 = 20;
/// The lowest `similarity`: below it, unrelated messages would match.
const MIN_SIMILARITY: f64 = 0.5;
/// Users tracked at most; beyond, the least recently active are forgotten.
const MAX_USERS: usize = 50_000;
/// Messages remembered per user at most (for `max_repeats = MAX_REPEATS`).
const MAX_HISTORY: usize = 2 * MAX_REPEATS as usize + 2;

/// A message a user sent, as remembered.
#[derive(Debug)]
struct Sent {
    at: Instant,
    fingerprint: Fingerprint,
}

/// Each user's recent messages, oldest first; kept across reloads.
type Recent = Mutex<HashMap<String, VecDeque<Sent>>>;

/// Locks a mutex, carrying on with the data if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The built filter.
#[derive(Debug)]
pub struct RepeatGuard {
    window: Duration,
    /// `window` as written in the options, for reasons.
    window_text: String,
    max_repeats: usize,
    similarity: f64,
    max_mentions: usize,
    /// Users tracked at most ([`MAX_USERS`]; smaller in tests).
    max_users: usize,
    recent: Arc<Recent>,
}

/// Factory for `kind = "repeat_guard"`.
#[derive(Debug)]
pub struct RepeatGuardFactory;

impl FilterFactory for RepeatGuardFactory {
    fn kind(&self) -> &str {
        "repeat_guard"
    }

    fn build(&self, options: &Options, ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
        Ok(Box::new(RepeatGuard::build(options.parse()?, ctx)?))
    }
}

impl RepeatGuard {
    /// Validates the options and takes the state of the previous build.
    fn build(options: RepeatGuardOptions, ctx: &mut BuildContext) -> Result<Self, BuildError> {
        let window = duration::parse(&options.window).map_err(|e| BuildError::option("window", e))?;
        if window.is_zero() || window > MAX_WINDOW {
            return Err(BuildError::option("window", "must be longer than 0s and at most 1h"));
        }
        if !(1..=MAX_REPEATS).contains(&options.max_repeats) {
            return Err(BuildError::option("max_repeats", format!("must be between 1 and {MAX_REPEATS}")));
        }
        if !(MIN_SIMILARITY..=1.0).contains(&options.similarity) {
            return Err(BuildError::option(
                "similarity",
                format!("must be between {MIN_SIMILARITY} (loose) and 1.0 (equal once normalised)"),
            ));
        }
        if options.max_mentions == 0 {
            return Err(BuildError::option("max_mentions", "must be at least 1"));
        }
        // Remembered messages stay meaningful whatever the options: reuse them.
        let recent = ctx.state("recent", |_: &Recent| true, Recent::default);
        Ok(RepeatGuard {
            window,
            window_text: options.window.trim().to_owned(),
            max_repeats: options.max_repeats as usize,
            similarity: options.similarity,
            max_mentions: options.max_mentions as usize,
            max_users: MAX_USERS,
            recent,
        })
    }

    /// Messages remembered per user: enough to see `max_repeats` of each of
    /// two messages sent in turn.
    fn history_len(&self) -> usize {
        (2 * self.max_repeats + 2).min(MAX_HISTORY)
    }

    /// The verdict on `text` sent by `user` at `now`; records it if allowed.
    fn check(&self, text: &str, user: &str, now: Instant) -> Verdict {
        let mentions = text::count_mentions(text, self.max_mentions);
        if mentions > self.max_mentions {
            let max = self.max_mentions;
            return Verdict::reject(
                "mention_flood",
                format!("this message mentions more than {max} people; mention at most {max} per message"),
            );
        }
        let fingerprint = Fingerprint::of(text);
        let bigrams = fingerprint.bigrams();
        let mut recent = lock(&self.recent);
        if let Some(sent) = recent.get_mut(user) {
            sent.retain(|s| now.duration_since(s.at) < self.window);
            // When each earlier copy was sent, oldest first.
            let mut copies = [now; MAX_HISTORY];
            let mut count = 0;
            for s in sent.iter().filter(|s| fingerprint.is_similar(&bigrams, &s.fingerprint, self.similarity)) {
                if count < MAX_HISTORY {
                    copies[count] = s.at;
                    count += 1;
                }
            }
            if count >= self.max_repeats {
                // Allowed again once all but max_repeats - 1 copies have left the window.
                let oldest_counted = copies[count - self.max_repeats];
                let wait = (oldest_counted + self.window).saturating_duration_since(now).max(Duration::from_millis(1));
                return Verdict::reject_for(
                    "repeated",
                    format!(
                        "you already sent this message {count} times in the last {}; try again in {}s",
                        self.window_text,
                        wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
                    ),
                    wait,
                );
            }
            sent.push_back(Sent { at: now, fingerprint });
            while sent.len() > self.history_len() {
                sent.pop_front();
            }
            return Verdict::Allow;
        }
        if recent.len() >= self.max_users {
            self.make_room(&mut recent, now);
        }
        recent.insert(user.to_owned(), VecDeque::from([Sent { at: now, fingerprint }]));
        Verdict::Allow
    }

    /// Drops what has left the window at `now`, and the users left with nothing.
    fn prune(&self, now: Instant) {
        let mut recent = lock(&self.recent);
        self.prune_locked(&mut recent, now);
    }

    /// [`prune`](Self::prune) with the lock held; gives back memory a flood left.
    fn prune_locked(&self, recent: &mut HashMap<String, VecDeque<Sent>>, now: Instant) {
        recent.retain(|_, sent| {
            sent.retain(|s| now.duration_since(s.at) < self.window);
            !sent.is_empty()
        });
        if recent.capacity() > 4 * recent.len() + 64 {
            recent.shrink_to(2 * recent.len());
        }
    }

    /// At the user limit: prunes, and if that is not enough, forgets the
    /// least recently active tenth of the users.
    fn make_room(&self, recent: &mut HashMap<String, VecDeque<Sent>>, now: Instant) {
        self.prune_locked(recent, now);
        if recent.len() < self.max_users {
            return;
        }
        let last_active = |sent: &VecDeque<Sent>| sent.iter().map(|s| s.at).max();
        let mut times: Vec<Instant> = recent.values().filter_map(last_active).collect();
        let forget = (self.max_users / 10).max(1).min(times.len());
        if forget == 0 {
            return;
        }
        let (_, cutoff, _) = times.select_nth_unstable(forget - 1);
        let cutoff = *cutoff;
        recent.retain(|_, sent| last_active(sent).is_some_and(|at| at > cutoff));
    }
}

impl Filter for RepeatGuard {
    fn on_message(&self, message: &mut Message, ctx: &Context<'_>) -> Verdict {
        self.check(&message.content, ctx.user_id, Instant::now())
    }

    fn housekeeping(&self) {
        self.prune(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(value: serde_json::Value) -> Options {
        match value {
            serde_json::Value::Object(map) => Options::new(map),
            other => panic!("options must be an object, got {other}"),
        }
    }

    fn guard_in(value: serde_json::Value, ctx: &mut BuildContext) -> RepeatGuard {
        RepeatGuard::build(options(value).parse().unwrap(), ctx).unwrap()
    }

    fn guard(value: serde_json::Value) -> RepeatGuard {
        guard_in(value, &mut BuildContext::default())
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn code(verdict: &Verdict) -> Option<&str> {
        match verdict {
            Verdict::Reject { code, .. } => Some(code),
            _ => None,
        }
    }

    fn users(filter: &RepeatGuard) -> usize {
        lock(&filter.recent).len()
    }

    #[test]
    fn register_adds_the_repeat_guard_kind() {
        let mut registry = Registry::new();
        register(&mut registry);
        assert_eq!(registry.kinds().collect::<Vec<_>>(), ["repeat_guard"]);
        let built = registry.get("repeat_guard").unwrap().build(&Options::default(), &mut BuildContext::default());
        assert!(built.is_ok(), "every option has a default");
    }

    #[test]
    fn the_third_copy_within_the_window_is_rejected_with_a_retry_hint() {
        let filter = guard(serde_json::json!({}));
        let t0 = Instant::now();
        assert_eq!(filter.check("buy gold", "alice", t0), Verdict::Allow);
        assert_eq!(filter.check("buy gold", "alice", t0 + secs(5)), Verdict::Allow);
        let Verdict::Reject { code, reason, retry_after } = filter.check("buy gold", "alice", t0 + secs(10)) else {
            panic!("the third copy is rejected")
        };
        assert_eq!(code, "repeated");
        assert_eq!(retry_after, Some(secs(20)), "when the first copy leaves the 30s window");
        assert!(reason.contains("2 times in the last 30s"), "{reason}");
    }

    #[test]
    fn copies_older_than_the_window_do_not_count() {
        let filter = guard(serde_json::json!({ "window": "500ms" }));
        let t0 = Instant::now();
        assert_eq!(filter.check("hello", "alice", t0), Verdict::Allow);
        assert_eq!(filter.check("hello", "alice", t0 + Duration::from_millis(100)), Verdict::Allow);
        assert_eq!(code(&filter.check("hello", "alice", t0 + Duration::from_millis(400))), Some("repeated"));
        assert_eq!(filter.check("hello", "alice", t0 + Duration::from_millis(500)), Verdict::Allow);
    }

    #[test]
    fn a_rejected_copy_is_not_remembered() {
        let filter = guard(serde_json::json!({ "window": "10s" }));
        let t0 = Instant::now();
        filter.check("spam", "alice", t0);
        filter.check("spam", "alice", t0 + secs(8));
        for s in 8..10 {
            assert_eq!(code(&filter.check("spam", "alice", t0 + secs(s))), Some("repeated"));
        }
        assert_eq!(filter.check("spam", "alice", t0 + secs(10)), Verdict::Allow, "only the copy at 8s is left");
    }

    #[test]
    fn nearly_identical_messages_count_as_copies() {
        let filter = guard(serde_json::json!({}));
        let t0 = Instant::now();
        assert_eq!(filter.check("Join my server at discord now please", "alice", t0), Verdict::Allow);
        assert_eq!(filter.check("join  my server at DISCORD now please!!! 2", "alice", t0), Verdict::Allow);
        assert_eq!(code(&filter.check("join my server at discord now pleaze", "alice", t0)), Some("repeated"));
    }

    #[test]
    fn different_messages_and_different_users_do_not_count() {
        let filter = guard(serde_json::json!({ "max_repeats": 1 }));
        let t0 = Instant::now();
        assert_eq!(filter.check("good morning everyone", "alice", t0), Verdict::Allow);
        assert_eq!(filter.check("how is everyone doing", "alice", t0), Verdict::Allow);
        assert_eq!(filter.check("good morning everyone", "bob", t0), Verdict::Allow);
        assert_eq!(code(&filter.check("good morning everyone", "alice", t0)), Some("repeated"));
    }

    #[test]
    fn max_repeats_sets_how_many_copies_are_allowed() {
        let filter = guard(serde_json::json!({ "max_repeats": 4 }));
        let t0 = Instant::now();
        for _ in 0..4 {
            assert_eq!(filter.check("again", "alice", t0), Verdict::Allow);
        }
        assert_eq!(code(&filter.check("again", "alice", t0)), Some("repeated"));
    }

    #[test]
    fn a_similarity_of_one_counts_only_equal_normalised_text() {
        let filter = guard(serde_json::json!({ "similarity": 1.0, "max_repeats": 1 }));
        let t0 = Instant::now();
        assert_eq!(filter.check("join my server at discord now please", "alice", t0), Verdict::Allow);
        assert_eq!(filter.check("join my server at discord now pleaze", "alice", t0), Verdict::Allow);
        assert_eq!(code(&filter.check("Join my server at discord now please!", "alice", t0)), Some("repeated"));
    }

    #[test]
    fn two_messages_sent_in_turn_are_both_caught() {
        let filter = guard(serde_json::json!({}));
        let t0 = Instant::now();
        for text in ["first ad", "second ad", "first ad", "second ad"] {
            assert_eq!(filter.check(text, "alice", t0), Verdict::Allow, "{text}");
        }
        assert_eq!(code(&filter.check("first ad", "alice", t0)), Some("repeated"));
        assert_eq!(code(&filter.check("second ad", "alice", t0)), Some("repeated"));
    }

    #[test]
    fn each_user_keeps_only_a_few_messages() {
        let filter = guard(serde_json::json!({}));
        let t0 = Instant::now();
        for i in 0..100 {
            filter.check(&format!("message number {i} is {}", "x".repeat(i)), "alice", t0);
        }
        assert_eq!(lock(&filter.recent)["alice"].len(), filter.history_len());
    }

    #[test]
    fn long_messages_are_checked_at_bounded_cost() {
        let filter = guard(serde_json::json!({ "max_repeats": 1 }));
        let t0 = Instant::now();
        let paste = "word ".repeat(3000);
        assert_eq!(filter.check(&paste, "alice", t0), Verdict::Allow);
        assert_eq!(filter.check(&paste[..paste.len() / 2], "alice", t0), Verdict::Allow, "half as long");
        assert_eq!(code(&filter.check(&paste, "alice", t0)), Some("repeated"));
    }

    #[test]
    fn too_many_distinct_mentions_are_a_flood() {
        let filter = guard(serde_json::json!({ "max_mentions": 3 }));
        let t0 = Instant::now();
        assert_eq!(filter.check("@a @b @c @A @b hi", "alice", t0), Verdict::Allow);
        let Verdict::Reject { code, reason, retry_after } = filter.check("@a @b @c @d", "alice", t0) else {
            panic!("four distinct mentions")
        };
        assert_eq!((code.as_str(), retry_after), ("mention_flood", None));
        assert!(reason.contains("more than 3"), "{reason}");
        assert_eq!(filter.check("mail a@b.com c@d.com e@f.com g@h.com", "alice", t0), Verdict::Allow);
    }

    #[test]
    fn the_default_allows_five_mentions() {
        let filter = guard(serde_json::json!({}));
        let t0 = Instant::now();
        assert_eq!(filter.check("@a @b @c @d @e", "alice", t0), Verdict::Allow);
        assert_eq!(code(&filter.check("@a @b @c @d @e @f", "bob", t0)), Some("mention_flood"));
    }

    #[test]
    fn a_mention_flood_is_not_remembered_as_a_message() {
        let filter = guard(serde_json::json!({ "max_mentions": 1, "max_repeats": 1 }));
        let t0 = Instant::now();
        assert_eq!(code(&filter.check("@a @b", "alice", t0)), Some("mention_flood"));
        assert_eq!(users(&filter), 0);
    }

    #[test]
    fn history_survives_a_reload() {
        let mut first = BuildContext::default();
        let filter = guard_in(serde_json::json!({ "max_repeats": 1 }), &mut first);
        let t0 = Instant::now();
        assert_eq!(filter.check("hello", "alice", t0), Verdict::Allow);
        let mut second = BuildContext::new(first.into_kept());
        let reloaded = guard_in(serde_json::json!({ "max_repeats": 1, "window": "1m" }), &mut second);
        assert_eq!(code(&reloaded.check("hello", "alice", t0 + secs(1))), Some("repeated"));
    }

    #[test]
    fn housekeeping_forgets_users_whose_messages_left_the_window() {
        let filter = guard(serde_json::json!({ "window": "10s" }));
        let t0 = Instant::now();
        filter.check("old", "alice", t0);
        filter.check("newer", "bob", t0 + secs(5));
        filter.check("older", "bob", t0);
        filter.prune(t0 + secs(12));
        assert_eq!(users(&filter), 1);
        assert_eq!(lock(&filter.recent)["bob"].len(), 1);
        filter.prune(t0 + secs(20));
        assert_eq!(users(&filter), 0);
    }

    #[test]
    fn a_flood_of_distinct_users_stays_bounded() {
        let mut filter = guard(serde_json::json!({ "window": "1h" }));
        filter.max_users = 100;
        let t0 = Instant::now();
        for i in 0..1000u64 {
            assert_eq!(filter.check("hi", &format!("guest:{i}"), t0 + Duration::from_millis(i)), Verdict::Allow);
            assert!(users(&filter) <= 100);
        }
        let recent = lock(&filter.recent);
        assert!(recent.contains_key("guest:999"), "the most recent users are kept");
        assert!(!recent.contains_key("guest:0"), "the least recently active are forgotten");
    }

    #[test]
    fn bad_options_are_refused_with_the_option_named() {
        let error = |value: serde_json::Value| -> Result<(), BuildError> {
            RepeatGuard::build(options(value).parse()?, &mut BuildContext::default()).map(drop)
        };
        let option = |value: serde_json::Value| error(value).expect_err("refused").option;
        assert_eq!(option(serde_json::json!({ "window": "30" })).as_deref(), Some("window"));
        assert_eq!(option(serde_json::json!({ "window": "0s" })).as_deref(), Some("window"));
        assert_eq!(option(serde_json::json!({ "window": "2h" })).as_deref(), Some("window"));
        assert_eq!(option(serde_json::json!({ "window": "5 weeks" })).as_deref(), Some("window"));
        assert_eq!(option(serde_json::json!({ "max_repeats": 0 })).as_deref(), Some("max_repeats"));
        assert_eq!(option(serde_json::json!({ "max_repeats": 21 })).as_deref(), Some("max_repeats"));
        assert_eq!(option(serde_json::json!({ "similarity": 0.2 })).as_deref(), Some("similarity"));
        assert_eq!(option(serde_json::json!({ "similarity": 1.5 })).as_deref(), Some("similarity"));
        assert_eq!(option(serde_json::json!({ "max_mentions": 0 })).as_deref(), Some("max_mentions"));
        let unknown = error(serde_json::json!({ "windw": "30s" })).expect_err("refused");
        assert!(unknown.message.contains("unknown field `windw`"), "{unknown}");
        let negative = error(serde_json::json!({ "max_repeats": -1 })).expect_err("refused");
        assert!(negative.message.contains("invalid value"), "{negative}");
    }
}
