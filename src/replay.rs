//! `wardroom replay`: runs messages through the policy pipeline of a config
//! file and prints what each filter decided, so rules can be tuned (in shadow
//! mode or not) before they go live.
//!
//! Input: one message per line, either plain text or a JSON object
//! `{"user": "…", "roles": ["member"], "room": "…", "content": "…"}` (every
//! field but `content` optional). Output: one JSON object per message.
//! Messages are replayed back to back, so rate limits see them as a burst.

use std::io::{BufRead, Write};
use std::net::{IpAddr, Ipv4Addr};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use wardroom_plugin_api::{Context, Message, Verdict};

use crate::pipeline::Pipeline;

/// One input message.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    #[serde(default = "default_user")]
    user: String,
    #[serde(default = "default_roles")]
    roles: Vec<String>,
    #[serde(default = "default_room")]
    room: String,
    content: String,
}

fn default_user() -> String {
    "replay".to_owned()
}

fn default_roles() -> Vec<String> {
    vec!["member".to_owned()]
}

fn default_room() -> String {
    "lobby".to_owned()
}

/// What the pipeline did with one message.
#[derive(Debug, Serialize)]
struct Report<'a> {
    line: usize,
    content: &'a str,
    verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    filter: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    /// The text as it would be delivered, when a filter changed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivered: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    flags: Vec<Shadow<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    shadow: Vec<Shadow<'a>>,
}

/// A verdict that did not decide (flag, or shadow mode).
#[derive(Debug, Serialize)]
struct Shadow<'a> {
    filter: &'a str,
    verdict: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

fn code_and_reason(verdict: &Verdict) -> (Option<&str>, Option<&str>) {
    match verdict {
        Verdict::Reject { code, reason, .. } => (Some(code), Some(reason)),
        Verdict::Hold { reason } | Verdict::Flag { reason } | Verdict::Escalate { reason, .. } => (None, Some(reason)),
        _ => (None, None),
    }
}

/// Replays every line of `input` through `pipeline`, writing one JSON
/// report per message to `output`. Returns how many messages were refused.
pub fn run(pipeline: &Pipeline, input: impl BufRead, mut output: impl Write) -> std::io::Result<usize> {
    let mut refused = 0;
    for (index, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed = line.trim_start().starts_with('{').then(|| serde_json::from_str::<Input>(&line));
        let input = match parsed {
            Some(Ok(input)) => input,
            Some(Err(e)) => {
                writeln!(output, "{}", serde_json::json!({"line": index + 1, "error": e.to_string()}))?;
                continue;
            }
            None => Input { user: default_user(), roles: default_roles(), room: default_room(), content: line.clone() },
        };
        let roles: Vec<&str> = input.roles.iter().map(String::as_str).collect();
        let ctx = Context {
            user_id: &input.user,
            nick: &input.user,
            roles: &roles,
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            room: &input.room,
            now: SystemTime::now(),
        };
        let mut message = Message { content: input.content.clone() };
        let outcome = pipeline.on_message(&mut message, &ctx);
        if !outcome.verdict.lets_through() {
            refused += 1;
        }
        let (code, reason) = code_and_reason(&outcome.verdict);
        let report = Report {
            line: index + 1,
            content: &input.content,
            verdict: outcome.verdict.name(),
            filter: outcome.decided_by.as_deref(),
            code,
            reason,
            delivered: (outcome.verdict.lets_through() && message.content != input.content).then_some(&message.content),
            flags: outcome
                .flags
                .iter()
                .map(|(filter, reason)| Shadow { filter, verdict: "flag", code: None, reason: Some(reason) })
                .collect(),
            shadow: outcome
                .shadow
                .iter()
                .map(|(filter, verdict)| {
                    let (code, reason) = code_and_reason(verdict);
                    Shadow { filter, verdict: verdict.name(), code, reason }
                })
                .collect(),
        };
        writeln!(output, "{}", serde_json::to_string(&report).map_err(std::io::Error::other)?)?;
    }
    Ok(refused)
}
