//! `wardroom-plugin-api`: the contract between Wardroom and the filters that
//! decide what may happen in a chat. Plugin crates depend on this crate alone.
//!
//! A [`Filter`] looks at a connection, a join or a message and returns a
//! [`Verdict`]; it never acts itself. The server acts on the verdict: it
//! refuses the connection, drops the message with an error to its sender,
//! holds it for review, or escalates against the sender. Filters are built by
//! a [`FilterFactory`] from the options of a `[[filters]]` entry in
//! `config.toml`, and factories are found by their `kind` in a [`Registry`].
//!
//! ```
//! use wardroom_plugin_api::{Context, Filter, FilterFactory, BuildContext, BuildError, Message, Options, Registry, Verdict};
//!
//! /// Rejects messages that shout (all capitals).
//! struct NoShouting { min_letters: usize }
//!
//! impl Filter for NoShouting {
//!     fn on_message(&self, message: &mut Message, _ctx: &Context<'_>) -> Verdict {
//!         let letters: Vec<char> = message.content.chars().filter(|c| c.is_alphabetic()).collect();
//!         if letters.len() >= self.min_letters && letters.iter().all(|c| c.is_uppercase()) {
//!             Verdict::reject("shouting", "please don't shout")
//!         } else {
//!             Verdict::Allow
//!         }
//!     }
//! }
//!
//! struct NoShoutingFactory;
//!
//! impl FilterFactory for NoShoutingFactory {
//!     fn kind(&self) -> &str { "no_shouting" }
//!     fn build(&self, options: &Options, _ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
//!         #[derive(serde::Deserialize)]
//!         #[serde(deny_unknown_fields)]
//!         struct Config { #[serde(default = "five")] min_letters: usize }
//!         fn five() -> usize { 5 }
//!         let config: Config = options.parse()?;
//!         Ok(Box::new(NoShouting { min_letters: config.min_letters }))
//!     }
//! }
//!
//! /// What a plugin crate exports: one function registering its factories.
//! pub fn register(registry: &mut Registry) {
//!     registry.register(NoShoutingFactory);
//! }
//! # let mut registry = Registry::new();
//! # register(&mut registry);
//! # assert!(registry.get("no_shouting").is_some());
//! ```
#![warn(missing_docs)]

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;

/// A filter: hooks called for connections, joins and messages. Every hook
/// defaults to [`Verdict::Allow`], so a filter implements only what it cares
/// about. Hooks are synchronous and must be cheap: they run on the path of
/// every message. Filters keep their own state with interior mutability.
///
/// ```
/// use wardroom_plugin_api::{Context, Filter, Message, Verdict};
///
/// /// Refuses messages in one room while allowing everything else.
/// struct ReadOnly { room: String }
///
/// impl Filter for ReadOnly {
///     fn on_message(&self, _message: &mut Message, ctx: &Context<'_>) -> Verdict {
///         if ctx.room == self.room && !ctx.has_role("moderator") {
///             Verdict::reject("read_only", "only moderators post here")
///         } else {
///             Verdict::Allow
///         }
///     }
/// }
/// ```
pub trait Filter: Send + Sync + 'static {
    /// A client asks to connect (before the WebSocket upgrade). A rejection
    /// refuses the upgrade with an HTTP error: 429 for the code
    /// `rate_limited`, 403 otherwise.
    fn on_connect(&self, connection: &Connection<'_>) -> Verdict {
        let _ = connection;
        Verdict::Allow
    }

    /// A connection that [`on_connect`](Filter::on_connect) allowed has ended.
    fn on_disconnect(&self, connection: &Connection<'_>) {
        let _ = connection;
    }

    /// A user asks to join `room`.
    fn on_join(&self, room: &str, ctx: &Context<'_>) -> Verdict {
        let _ = (room, ctx);
        Verdict::Allow
    }

    /// A user sends a message. The filter may edit it in place and return
    /// [`Verdict::Modified`].
    fn on_message(&self, message: &mut Message, ctx: &Context<'_>) -> Verdict {
        let _ = (message, ctx);
        Verdict::Allow
    }

    /// Called every few seconds: prune state that is no longer needed, so
    /// that a flood of distinct users or addresses cannot grow it forever.
    fn housekeeping(&self) {}
}

/// What a filter decided.
///
/// ```
/// use std::time::Duration;
/// use wardroom_plugin_api::{Escalation, Verdict};
///
/// let limited = Verdict::reject_for("rate_limited", "slow down", Duration::from_secs(2));
/// assert!(!limited.lets_through());
/// assert_eq!(limited.name(), "reject");
/// let mute = Verdict::Escalate { action: Escalation::Mute(Duration::from_secs(600)), reason: "spam".into() };
/// assert_eq!(mute.name(), "escalate");
/// assert!(Verdict::Flag { reason: "check this".into() }.lets_through());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Let it through.
    Allow,
    /// Let it through as edited by the filter (for example with words masked).
    Modified,
    /// Refuse it; only the sender is told, with `code` and `reason`.
    Reject {
        /// Stable, machine-readable code, e.g. `rate_limited`.
        code: String,
        /// A sentence for the sender.
        reason: String,
        /// When trying again may succeed.
        retry_after: Option<Duration>,
    },
    /// Keep the message out of the room until a moderator approves it.
    Hold {
        /// Why, for the moderators and the sender.
        reason: String,
    },
    /// Deliver, and tell the moderators.
    Flag {
        /// Why, for the moderators.
        reason: String,
    },
    /// Refuse it and act against the sender.
    Escalate {
        /// What to do.
        action: Escalation,
        /// Why, for the sender, the moderators and the audit log.
        reason: String,
    },
}

impl Verdict {
    /// A rejection with no retry hint.
    pub fn reject(code: impl Into<String>, reason: impl Into<String>) -> Self {
        Verdict::Reject { code: code.into(), reason: reason.into(), retry_after: None }
    }

    /// A rejection that may succeed after `retry_after`.
    pub fn reject_for(code: impl Into<String>, reason: impl Into<String>, retry_after: Duration) -> Self {
        Verdict::Reject { code: code.into(), reason: reason.into(), retry_after: Some(retry_after) }
    }

    /// Whether the verdict lets the message (or connection, or join) through.
    pub fn lets_through(&self) -> bool {
        matches!(self, Verdict::Allow | Verdict::Modified | Verdict::Flag { .. })
    }

    /// A short name for logs and metrics: `allow`, `modified`, `reject`, …
    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Allow => "allow",
            Verdict::Modified => "modified",
            Verdict::Reject { .. } => "reject",
            Verdict::Hold { .. } => "hold",
            Verdict::Flag { .. } => "flag",
            Verdict::Escalate { .. } => "escalate",
        }
    }
}

/// An action against a user, asked for by [`Verdict::Escalate`].
///
/// ```
/// use std::time::Duration;
/// use wardroom_plugin_api::Escalation;
///
/// let ladder = [Escalation::Warn, Escalation::Mute(Duration::from_secs(600)), Escalation::Kick, Escalation::Ban(None)];
/// assert_eq!(ladder.len(), 4);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Escalation {
    /// A warning to the user.
    Warn,
    /// The user may not send messages for this long.
    Mute(Duration),
    /// The user is disconnected.
    Kick,
    /// The user is disconnected and kept out for this long (`None`: for good).
    Ban(Option<Duration>),
}

/// A message on its way to a room.
///
/// ```
/// use wardroom_plugin_api::Message;
///
/// let mut message = Message { content: "hello".to_owned() };
/// message.content.make_ascii_uppercase();
/// assert_eq!(message.content, "HELLO");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The text; filters may edit it.
    pub content: String,
}

/// Who is acting, where and when.
///
/// ```
/// use wardroom_plugin_api::Context;
///
/// let ctx = Context {
///     user_id: "guest:1f2e",
///     nick: "Alice",
///     roles: &["member", "moderator"],
///     addr: "203.0.113.7".parse().unwrap(),
///     room: "lobby",
///     now: std::time::SystemTime::now(),
/// };
/// assert!(ctx.has_role("moderator"));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// Stable user id (`guest:<session>` for guests).
    pub user_id: &'a str,
    /// The user's nickname.
    pub nick: &'a str,
    /// The user's roles, e.g. `["member", "moderator"]`.
    pub roles: &'a [&'a str],
    /// The user's address.
    pub addr: IpAddr,
    /// The room concerned.
    pub room: &'a str,
    /// The server's time.
    pub now: SystemTime,
}

impl Context<'_> {
    /// Whether the user has `role`.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.contains(&role)
    }
}

/// A connection asking to be accepted.
///
/// ```
/// use wardroom_plugin_api::Connection;
///
/// let connection = Connection { addr: "198.51.100.4".parse().unwrap(), origin: Some("https://chat.example.com"), user_id: None };
/// assert!(connection.origin.is_some_and(|o| o.starts_with("https://")));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    /// The client's address (behind a trusted proxy: the forwarded one).
    pub addr: IpAddr,
    /// The `Origin` header, if the client sent one.
    pub origin: Option<&'a str>,
    /// The user id, if the client authenticated while connecting.
    pub user_id: Option<&'a str>,
}

/// The options of one `[[filters]]` entry: every key of the entry except the
/// ones the server reads itself (`kind`, `id`, `enabled`, `enforce`, `rooms`,
/// `exempt_roles`), as JSON-like values.
///
/// ```
/// use wardroom_plugin_api::Options;
///
/// #[derive(serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct MyOptions { limit: u32 }
///
/// let mut map = serde_json::Map::new();
/// map.insert("limit".into(), 5.into());
/// let options = Options::new(map);
/// assert_eq!(options.parse::<MyOptions>().unwrap().limit, 5);
/// assert_eq!(options.get("limit"), Some(&serde_json::json!(5)));
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options(serde_json::Map<String, serde_json::Value>);

impl Options {
    /// Options from a map of keys to values.
    pub fn new(map: serde_json::Map<String, serde_json::Value>) -> Self {
        Options(map)
    }

    /// Deserializes the options into the filter's own config type. Use
    /// `#[serde(deny_unknown_fields)]` on it so that typos are reported.
    /// An error names the option it is about, as a path such as `per_user`,
    /// `per_user.burst` or `rules[2].regex` (an unknown key included), so the
    /// server can point at that key in the file.
    ///
    /// ```
    /// use wardroom_plugin_api::Options;
    ///
    /// #[derive(Debug, serde::Deserialize)]
    /// #[serde(deny_unknown_fields)]
    /// struct Quota { per_minute: u32 }
    /// #[derive(Debug, serde::Deserialize)]
    /// #[serde(deny_unknown_fields)]
    /// struct MyOptions { per_user: Quota }
    ///
    /// let options: serde_json::Value = serde_json::json!({"per_user": {"per_minut": 30}});
    /// let serde_json::Value::Object(map) = options else { unreachable!() };
    /// let error = Options::new(map).parse::<MyOptions>().unwrap_err();
    /// assert_eq!(error.option.as_deref(), Some("per_user.per_minut"));
    /// assert!(error.message.starts_with("unknown field `per_minut`"));
    /// ```
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, BuildError> {
        serde_path_to_error::deserialize(serde_json::Value::Object(self.0.clone())).map_err(|e| {
            let option = e.path().iter().next().is_some().then(|| e.path().to_string());
            BuildError { option, message: e.into_inner().to_string() }
        })
    }

    /// Removes the option at `path` (as in [`BuildError::option`]: `a`,
    /// `a.b`, `a[1].b`); returns whether it was there. The server uses it to
    /// drop an unknown key and build again, to find every problem at once.
    pub fn remove(&mut self, path: &str) -> bool {
        remove_at(&mut self.0, path)
    }

    /// The raw value of one option.
    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.get(key)
    }
}

/// Removes the entry at a path such as `a[1].b` from `map`.
fn remove_at(map: &mut serde_json::Map<String, serde_json::Value>, path: &str) -> bool {
    let (head, rest) = match path.find(['.', '[']) {
        Some(0) | None => (path, ""),
        Some(i) => path.split_at(i),
    };
    if rest.is_empty() {
        return map.remove(head).is_some();
    }
    let mut value = match map.get_mut(head) {
        Some(value) => value,
        None => return false,
    };
    let mut rest = rest;
    // Array indices, then either the end or a key in a table.
    while let Some(after) = rest.strip_prefix('[') {
        let Some((index, tail)) = after.split_once(']') else { return false };
        let Ok(index) = index.parse::<usize>() else { return false };
        let serde_json::Value::Array(items) = value else { return false };
        if tail.is_empty() {
            if index < items.len() {
                items.remove(index);
                return true;
            }
            return false;
        }
        match items.get_mut(index) {
            Some(item) => value = item,
            None => return false,
        }
        rest = tail;
    }
    match (value, rest.strip_prefix('.')) {
        (serde_json::Value::Object(inner), Some(rest)) => remove_at(inner, rest),
        _ => false,
    }
}

/// Why a filter could not be built from its options.
///
/// ```
/// use wardroom_plugin_api::BuildError;
///
/// let error = BuildError::option("limit", "must be at least 1");
/// assert_eq!(error.to_string(), "option `limit`: must be at least 1");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildError {
    /// The option at fault (a key of the entry, e.g. `rules`), if known.
    pub option: Option<String>,
    /// What is wrong, and how to fix it.
    pub message: String,
}

impl BuildError {
    /// An error about the options as a whole.
    pub fn new(message: impl Into<String>) -> Self {
        BuildError { option: None, message: message.into() }
    }

    /// An error about one option.
    pub fn option(option: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError { option: Some(option.into()), message: message.into() }
    }
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.option {
            Some(option) => write!(f, "option `{option}`: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for BuildError {}

/// State that survives a reload, kept by the server for each filter entry
/// (by its `id`) and handed to the factory when the entry is rebuilt, so
/// that editing the config never resets a rate limit or a counter.
///
/// ```
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use wardroom_plugin_api::BuildContext;
///
/// // First build: a fresh counter.
/// let mut first = BuildContext::default();
/// let counter = first.state("seen", |_: &AtomicU64| true, AtomicU64::default);
/// counter.fetch_add(3, Ordering::Relaxed);
/// // After a reload, the same counter is handed back.
/// let mut second = BuildContext::new(first.into_kept());
/// let again = second.state("seen", |_: &AtomicU64| true, AtomicU64::default);
/// assert_eq!(again.load(Ordering::Relaxed), 3);
/// ```
#[derive(Default)]
pub struct BuildContext {
    previous: HashMap<String, Arc<dyn Any + Send + Sync>>,
    kept: HashMap<String, Arc<dyn Any + Send + Sync>>,
}

impl fmt::Debug for BuildContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BuildContext").field("previous", &self.previous.len()).field("kept", &self.kept.len()).finish()
    }
}

impl BuildContext {
    /// A context holding the state the previous build kept.
    pub fn new(previous: HashMap<String, Arc<dyn Any + Send + Sync>>) -> Self {
        BuildContext { previous, kept: HashMap::new() }
    }

    /// The state stored under `key` by the previous build of this filter
    /// entry if it has type `T` and `reuse` accepts it, or a new one from
    /// `init`. Either way it is kept for the next build.
    pub fn state<T: Any + Send + Sync>(
        &mut self,
        key: &str,
        reuse: impl FnOnce(&T) -> bool,
        init: impl FnOnce() -> T,
    ) -> Arc<T> {
        let state = self
            .previous
            .get(key)
            .and_then(|any| any.clone().downcast::<T>().ok())
            .filter(|state| reuse(state))
            .unwrap_or_else(|| Arc::new(init()));
        self.kept.insert(key.to_owned(), state.clone());
        state
    }

    /// The state to hand to the next build.
    pub fn into_kept(self) -> HashMap<String, Arc<dyn Any + Send + Sync>> {
        self.kept
    }
}

/// Builds filters of one kind.
///
/// ```
/// use wardroom_plugin_api::{BuildContext, BuildError, Filter, FilterFactory, Options};
///
/// struct Nothing;
/// impl Filter for Nothing {}
///
/// struct NothingFactory;
/// impl FilterFactory for NothingFactory {
///     fn kind(&self) -> &str { "nothing" }
///     fn build(&self, options: &Options, _ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
///         if options.get("anything").is_some() {
///             return Err(BuildError::option("anything", "this filter takes no options"));
///         }
///         Ok(Box::new(Nothing))
///     }
/// }
/// assert!(NothingFactory.build(&Options::default(), &mut BuildContext::default()).is_ok());
/// ```
pub trait FilterFactory: Send + Sync + 'static {
    /// The name `[[filters]]` entries use in `kind = "…"`.
    fn kind(&self) -> &str;

    /// Builds a filter from an entry's options. Validate everything here:
    /// the server refuses a config (at start-up or on reload) whose filters
    /// do not build, and keeps the old policies running.
    fn build(&self, options: &Options, ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError>;
}

/// The filter kinds known to the server: built-ins and plugins.
///
/// ```
/// use wardroom_plugin_api::{BuildContext, BuildError, Filter, FilterFactory, Options, Registry};
///
/// struct Nothing;
/// impl Filter for Nothing {}
/// struct NothingFactory;
/// impl FilterFactory for NothingFactory {
///     fn kind(&self) -> &str { "nothing" }
///     fn build(&self, _: &Options, _: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> { Ok(Box::new(Nothing)) }
/// }
///
/// let mut registry = Registry::new();
/// registry.register(NothingFactory);
/// assert_eq!(registry.kinds().collect::<Vec<_>>(), ["nothing"]);
/// ```
#[derive(Default)]
pub struct Registry {
    factories: BTreeMap<String, Box<dyn FilterFactory>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.factories.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Adds a factory; a later factory of the same kind replaces an earlier
    /// one, so an application can override a built-in.
    pub fn register(&mut self, factory: impl FilterFactory) {
        self.factories.insert(factory.kind().to_owned(), Box::new(factory));
    }

    /// The factory for `kind`.
    pub fn get(&self, kind: &str) -> Option<&dyn FilterFactory> {
        self.factories.get(kind).map(|f| &**f)
    }

    /// Every registered kind, sorted.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_survives_a_rebuild_when_reusable() {
        let mut first = BuildContext::default();
        let counter = first.state("count", |_: &u32| true, || 7u32);
        let mut second = BuildContext::new(first.into_kept());
        let again = second.state("count", |_: &u32| true, || 0u32);
        assert!(Arc::ptr_eq(&counter, &again));
        let mut third = BuildContext::new(second.into_kept());
        let fresh = third.state("count", |n: &u32| *n != 7, || 1u32);
        assert_eq!(*fresh, 1, "a state the filter refuses to reuse is replaced");
    }

    #[test]
    fn options_are_removed_by_path() {
        let json = serde_json::json!({"a": 1, "b": {"c": 2, "d": [{"e": 3, "f": 4}, 5]}});
        let serde_json::Value::Object(map) = json else { unreachable!() };
        let mut options = Options::new(map);
        assert!(options.remove("b.d[0].e"));
        assert!(options.remove("b.d[1]"));
        assert!(options.remove("a"));
        assert!(!options.remove("b.x") && !options.remove("b.d[3]") && !options.remove("b.c.z"));
        assert_eq!(options.0, serde_json::json!({"b": {"c": 2, "d": [{"f": 4}]}}).as_object().unwrap().clone());
    }

    #[test]
    fn options_parse_into_typed_config() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        #[serde(deny_unknown_fields)]
        struct Config {
            words: Vec<String>,
        }
        let mut map = serde_json::Map::new();
        map.insert("words".into(), serde_json::json!(["a", "b"]));
        assert_eq!(Options::new(map.clone()).parse::<Config>().unwrap().words, ["a", "b"]);
        map.insert("wrods".into(), serde_json::json!([]));
        let error = Options::new(map).parse::<Config>().unwrap_err();
        assert!(error.message.contains("unknown field `wrods`"), "{error}");
    }
}
