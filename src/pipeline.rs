//! The policy pipeline: the `[[filters]]` of the config, built through the
//! [`Registry`] and run in the order they appear.
//!
//! Filters decide, the caller acts: running the pipeline yields an
//! [`Outcome`] (the deciding verdict, which filter gave it, and what
//! shadow-mode filters would have done), and the hub carries it out.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use wardroom_plugin_api::{
    BuildContext, BuildError, Connection, Context, Escalation, Filter, FilterFactory, Message, Options, Registry,
    Verdict,
};

use crate::lock;

/// One `[[filters]]` entry as written in the config.
#[derive(Debug, Clone, Deserialize)]
pub struct FilterEntry {
    /// The filter kind (a registered factory).
    pub kind: String,
    /// Name for logs, metrics and kept state; defaults to the kind.
    #[serde(default)]
    pub id: Option<String>,
    /// A disabled filter is checked but not run.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `false`: shadow mode, logging and counting what the filter would do
    /// without doing it.
    #[serde(default = "yes")]
    pub enforce: bool,
    /// Run only for these rooms (all rooms when absent).
    #[serde(default)]
    pub rooms: Option<Vec<String>>,
    /// Users with any of these roles skip the filter.
    #[serde(default)]
    pub exempt_roles: Vec<String>,
    /// Strikes a user gets when this filter refuses a message.
    #[serde(default = "one")]
    pub strikes: f64,
    /// Everything else: the filter's own options.
    #[serde(flatten)]
    pub options: serde_json::Map<String, serde_json::Value>,
}

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

/// State kept across reloads, per filter id.
pub type FilterStates = HashMap<String, HashMap<String, Arc<dyn Any + Send + Sync>>>;

/// A built pipeline. Immutable; a reload builds a new one.
pub struct Pipeline {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.entries.iter().map(|e| &e.id)).finish()
    }
}

struct Entry {
    id: Arc<str>,
    filter: Box<dyn Filter>,
    enabled: bool,
    enforce: bool,
    rooms: Option<HashSet<String>>,
    exempt_roles: Vec<String>,
    strikes: f64,
}

/// What running the pipeline decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The verdict that counts: the first enforced one that is not `Allow`,
    /// `Modified` or `Flag`, else `Modified` if any filter edited, else `Allow`.
    pub verdict: Verdict,
    /// The filter that gave `verdict`, when one did.
    pub decided_by: Option<Arc<str>>,
    /// Enforced `Flag` verdicts (the message is delivered and moderators told).
    pub flags: Vec<(Arc<str>, String)>,
    /// What shadow-mode filters would have done (when not `Allow`).
    pub shadow: Vec<(Arc<str>, Verdict)>,
    /// Strikes the deciding filter gives when it refuses.
    pub strikes: f64,
}

/// A build problem: the dotted config path it concerns and what is wrong.
pub type BuildProblem = (String, String);

/// State one filter entry keeps across reloads.
type EntryState = HashMap<String, Arc<dyn Any + Send + Sync>>;

/// Builds the filter of entry `id` (at config path `path`), or adds its
/// problems to `problems`. An unknown option is reported at its own key,
/// dropped, and the filter built again, until every unknown option is
/// listed. A problem left after that is reported unless it concerns a table
/// an option was dropped from: it may come from the drop (a misspelt
/// required option is missing then).
fn build_filter(
    factory: &dyn FilterFactory,
    entry: &FilterEntry,
    id: &str,
    path: &str,
    previous: Option<&EntryState>,
    problems: &mut Vec<BuildProblem>,
) -> Option<(Box<dyn Filter>, EntryState)> {
    let is_unknown = |e: &BuildError| e.message.starts_with("unknown field");
    let describe = |e: &BuildError, option: &str| {
        let also = if is_unknown(e) && !option.contains(['.', '[']) {
            format!(" (or a key of every entry: {ENTRY_KEYS})")
        } else {
            String::new()
        };
        format!("filter `{id}` ({}): {}{also}", entry.kind, e.message)
    };
    let mut options = Options::new(entry.options.clone());
    let mut dropped: Vec<String> = Vec::new();
    loop {
        let mut ctx = BuildContext::new(previous.cloned().unwrap_or_default());
        let error = match factory.build(&options, &mut ctx) {
            Ok(filter) if dropped.is_empty() => return Some((filter, ctx.into_kept())),
            Ok(_) => return None,
            Err(error) => error,
        };
        match &error.option {
            Some(option) if is_unknown(&error) && dropped.len() < MAX_UNKNOWN_OPTIONS && options.remove(option) => {
                problems.push((format!("{path}.{option}"), describe(&error, option)));
                dropped.push(option.clone());
            }
            Some(option) => {
                let inside = |d: &String| d.strip_prefix(option.as_str()).is_some_and(|r| r.starts_with(['.', '[']));
                if !dropped.iter().any(inside) {
                    problems.push((format!("{path}.{option}"), describe(&error, option)));
                }
                return None;
            }
            None => {
                if dropped.is_empty() {
                    problems.push((path.to_owned(), describe(&error, "")));
                }
                return None;
            }
        }
    }
}

/// Unknown keys reported per filter entry before giving up on it.
const MAX_UNKNOWN_OPTIONS: usize = 32;

/// The keys every `[[filters]]` entry takes besides the filter's own options.
const ENTRY_KEYS: &str = "`kind`, `id`, `enabled`, `enforce`, `rooms`, `exempt_roles`, `strikes`";

impl Pipeline {
    /// A pipeline with no filters.
    pub fn empty() -> Self {
        Pipeline { entries: Vec::new() }
    }

    /// Builds every entry, handing each factory the state its id kept last
    /// time. Returns the pipeline and the state to keep, or every problem.
    pub fn build(
        entries: &[FilterEntry],
        registry: &Registry,
        previous: &FilterStates,
    ) -> Result<(Pipeline, FilterStates), Vec<BuildProblem>> {
        let mut problems = Vec::new();
        let mut built = Vec::new();
        let mut kept = FilterStates::new();
        let mut seen = HashSet::new();
        for (index, entry) in entries.iter().enumerate() {
            let path = format!("filters[{index}]");
            let id = entry.id.clone().unwrap_or_else(|| entry.kind.clone());
            if !seen.insert(id.clone()) {
                problems.push((
                    format!("{path}.id"),
                    format!("two filters are called `{id}`; give each an `id` of its own"),
                ));
                continue;
            }
            let Some(factory) = registry.get(&entry.kind) else {
                let kinds: Vec<_> = registry.kinds().map(|k| format!("`{k}`")).collect();
                problems.push((
                    format!("{path}.kind"),
                    format!("unknown filter kind `{}`; known kinds: {}", entry.kind, kinds.join(", ")),
                ));
                continue;
            };
            let Some((filter, state)) = build_filter(factory, entry, &id, &path, previous.get(&id), &mut problems)
            else {
                continue;
            };
            kept.insert(id.clone(), state);
            built.push(Entry {
                id: id.into(),
                filter,
                enabled: entry.enabled,
                enforce: entry.enforce,
                rooms: entry.rooms.as_ref().map(|rooms| rooms.iter().cloned().collect()),
                exempt_roles: entry.exempt_roles.clone(),
                strikes: entry.strikes,
            });
        }
        if problems.is_empty() { Ok((Pipeline { entries: built }, kept)) } else { Err(problems) }
    }

    /// Ids of the filters, in run order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| &*e.id)
    }

    /// Runs the connect hooks. When one refuses the connection, the filters
    /// before it that accepted it are told it ended.
    pub fn on_connect(&self, connection: &Connection<'_>) -> Outcome {
        let outcome = self.run(None, &[], |filter, _| filter.on_connect(connection));
        if let (false, Some(refuser)) = (outcome.verdict.lets_through(), &outcome.decided_by) {
            for entry in self.entries.iter().filter(|e| e.enabled).take_while(|e| e.id != *refuser) {
                entry.filter.on_disconnect(connection);
            }
        }
        outcome
    }

    /// Tells every filter that a connection it saw has ended.
    pub fn on_disconnect(&self, connection: &Connection<'_>) {
        for entry in self.entries.iter().filter(|e| e.enabled) {
            entry.filter.on_disconnect(connection);
        }
    }

    /// Runs the join hooks.
    pub fn on_join(&self, room: &str, ctx: &Context<'_>) -> Outcome {
        self.run(Some(room), ctx.roles, |filter, _| filter.on_join(room, ctx))
    }

    /// Runs the message hooks. Enforcing filters edit `message` in place;
    /// shadow filters see a copy, so their edits are not applied.
    pub fn on_message(&self, message: &mut Message, ctx: &Context<'_>) -> Outcome {
        self.run(Some(ctx.room), ctx.roles, |filter, shadow| {
            if shadow { filter.on_message(&mut message.clone(), ctx) } else { filter.on_message(message, ctx) }
        })
    }

    /// Lets every filter prune its state.
    pub fn housekeeping(&self) {
        for entry in &self.entries {
            entry.filter.housekeeping();
        }
    }

    fn run(&self, room: Option<&str>, roles: &[&str], mut hook: impl FnMut(&dyn Filter, bool) -> Verdict) -> Outcome {
        let mut outcome =
            Outcome { verdict: Verdict::Allow, decided_by: None, flags: Vec::new(), shadow: Vec::new(), strikes: 0.0 };
        for entry in &self.entries {
            if !entry.enabled
                || room.is_some_and(|room| entry.rooms.as_ref().is_some_and(|rooms| !rooms.contains(room)))
                || entry.exempt_roles.iter().any(|role| roles.contains(&role.as_str()))
            {
                continue;
            }
            let verdict = hook(&*entry.filter, !entry.enforce);
            match verdict {
                Verdict::Allow => {}
                other if !entry.enforce => outcome.shadow.push((entry.id.clone(), other)),
                Verdict::Modified => {
                    outcome.verdict = Verdict::Modified;
                    outcome.decided_by = Some(entry.id.clone());
                }
                Verdict::Flag { reason } => outcome.flags.push((entry.id.clone(), reason)),
                other => {
                    outcome.verdict = other;
                    outcome.decided_by = Some(entry.id.clone());
                    outcome.strikes = entry.strikes;
                    return outcome;
                }
            }
        }
        outcome
    }
}

/// What a verdict count is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerdictKey {
    /// The filter's id.
    pub filter: Arc<str>,
    /// The verdict's name (`reject`, `hold`, …).
    pub verdict: &'static str,
    /// The rejection code or escalation, if any.
    pub code: String,
    /// Whether the filter runs in shadow mode.
    pub shadow: bool,
}

/// Counts of verdicts other than `Allow`, per filter, verdict, code and mode.
#[derive(Debug, Default)]
pub struct VerdictCounts {
    counts: Mutex<HashMap<VerdictKey, u64>>,
}

impl VerdictCounts {
    /// Counts what an outcome holds.
    pub fn record(&self, outcome: &Outcome) {
        if outcome.decided_by.is_none() && outcome.flags.is_empty() && outcome.shadow.is_empty() {
            return;
        }
        let mut counts = lock(&self.counts);
        let mut count = |filter: &Arc<str>, verdict: &Verdict, shadow: bool| {
            let key = VerdictKey { filter: filter.clone(), verdict: verdict.name(), code: code(verdict), shadow };
            *counts.entry(key).or_default() += 1;
        };
        if let Some(id) = &outcome.decided_by {
            count(id, &outcome.verdict, false);
        }
        for (id, reason) in &outcome.flags {
            count(id, &Verdict::Flag { reason: reason.clone() }, false);
        }
        for (id, verdict) in &outcome.shadow {
            count(id, verdict, true);
        }
    }

    /// Every counted combination, sorted.
    pub fn snapshot(&self) -> Vec<(VerdictKey, u64)> {
        let mut rows: Vec<_> = lock(&self.counts).iter().map(|(key, n)| (key.clone(), *n)).collect();
        rows.sort();
        rows
    }
}

/// The machine code of a verdict, for metrics.
fn code(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Reject { code, .. } => code.clone(),
        Verdict::Escalate { action, .. } => match action {
            Escalation::Warn => "warn",
            Escalation::Mute(_) => "mute",
            Escalation::Kick => "kick",
            Escalation::Ban(_) => "ban",
            _ => "other",
        }
        .to_owned(),
        _ => String::new(),
    }
}
