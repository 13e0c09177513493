//! The policy pipeline through real sockets: every verdict kind reaches the
//! client as documented, only the sender sees a refusal, and shadow mode
//! delivers while counting what it would have done.

mod support;

use serde_json::{Value, json};
use support::raw::{RawClient, http_get};
use support::{Client, TestServer};
use wardroom::Server;
use wardroom_plugin_api::{
    BuildContext, BuildError, Context, Escalation, Filter, FilterFactory, Message, Options, Registry, Verdict,
};

const POLICY: &str = r#"
# This test refuses many messages on purpose: no escalation ladder.
[moderation]
ladder = []

[[filters]]
kind = "size"
max_chars = 40

[[filters]]
kind = "profanity"
words = ["fuck"]
rules = [
  { words = ["darn"], action = "mask" },
  { words = ["heck"], action = "flag" },
  { regex = "\\d{7,}", action = "hold" },
]

[[filters]]
id = "banana-watch"
kind = "profanity"
words = ["banana"]
enforce = false
default_allow = false

[[filters]]
kind = "slow_mode"
interval = "10s"
rooms = ["slow"]

[[filters]]
kind = "rate"
per_user = { per_minute = 60, burst = 12 }
"#;

async fn send(client: &mut Client, room: &str, content: &str, reference: u64) {
    client.send(json!({"type": "message", "room": room, "content": content, "ref": reference})).await;
}

/// The next frame, which must be an error for `reference`.
async fn expect_error(client: &mut Client, reference: u64) -> Value {
    let error = client.recv().await;
    assert_eq!((&error["type"], &error["ref"]), (&json!("error"), &json!(reference)), "{error}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verdict_kind_reaches_the_client_as_documented() {
    let server = TestServer::with_toml(POLICY).await;
    let mut alice = server.client("Alice").await;
    let mut bob = server.client("Bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    assert_eq!(alice.recv().await["event"], "join");

    // Reject: too large, with the limit in the message.
    send(&mut alice, "lobby", &"x".repeat(41), 1).await;
    let error = expect_error(&mut alice, 1).await;
    assert_eq!(error["code"], "too_large");
    assert!(error["message"].as_str().unwrap().contains("the limit is 40"), "{error}");

    // Reject: a blocked word, however disguised.
    send(&mut alice, "lobby", "what the f.u.c.k", 2).await;
    assert_eq!(expect_error(&mut alice, 2).await["code"], "profanity");

    // Allow-modified: masked for everyone.
    send(&mut alice, "lobby", "oh darn it", 3).await;
    let masked = bob.recv().await;
    assert_eq!((&masked["type"], &masked["content"]), (&json!("message"), &json!("oh **** it")));
    assert_eq!(alice.recv().await["content"], "oh **** it");
    assert_eq!(alice.recv().await["type"], "ack");

    // Flag: delivered unchanged (moderators are told).
    send(&mut alice, "lobby", "what the heck", 4).await;
    assert_eq!(bob.recv().await["content"], "what the heck");
    alice.recv().await;
    assert_eq!(alice.recv().await["type"], "ack");

    // Hold: kept out of the room; the sender is told it awaits review.
    send(&mut alice, "lobby", "call me on 5551234", 5).await;
    let held = alice.recv().await;
    assert_eq!((&held["type"], &held["ref"], &held["room"]), (&json!("held"), &json!(5), &json!("lobby")), "{held}");

    // Shadow mode: delivered, but counted as what it would have done.
    send(&mut alice, "lobby", "banana bread", 6).await;
    assert_eq!(bob.recv().await["content"], "banana bread", "bob never saw the refused or held messages");
    alice.recv().await;
    assert_eq!(alice.recv().await["type"], "ack");

    // Slow mode applies only to the rooms it names.
    alice.join("slow").await;
    send(&mut alice, "slow", "first", 7).await;
    alice.recv().await;
    alice.recv().await;
    send(&mut alice, "slow", "second", 8).await;
    let error = expect_error(&mut alice, 8).await;
    assert_eq!(error["code"], "slow_mode");
    let wait = error["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(wait > 9_000 && wait <= 10_000, "{error}");

    // Rate limit: with a retry hint; the connection stays usable.
    let mut limited = None;
    for i in 0..20 {
        send(&mut bob, "lobby", &format!("flood {i}"), 100 + i).await;
        loop {
            let frame = bob.recv().await;
            match frame["type"].as_str() {
                Some("error") => {
                    limited = Some(frame);
                    break;
                }
                Some("ack") => break,
                _ => {}
            }
        }
        if limited.is_some() {
            break;
        }
    }
    let limited = limited.expect("bob is rate limited within 20 messages");
    assert_eq!(limited["code"], "rate_limited");
    assert!(limited["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{limited}");

    let (_, metrics) = http_get(server.addr, "/metrics").await;
    for sample in [
        r#"wardroom_filter_verdicts_total{filter="banana-watch",verdict="reject",code="profanity",mode="shadow"} 1"#,
        r#"wardroom_filter_verdicts_total{filter="profanity",verdict="hold",code="",mode="enforce"} 1"#,
        r#"wardroom_filter_verdicts_total{filter="profanity",verdict="flag",code="",mode="enforce"} 1"#,
        r#"wardroom_filter_verdicts_total{filter="size",verdict="reject",code="too_large",mode="enforce"} 1"#,
        r#"wardroom_filter_verdicts_total{filter="slow_mode",verdict="reject",code="slow_mode",mode="enforce"} 1"#,
        r#"wardroom_filter_verdicts_total{filter="rate",verdict="reject",code="rate_limited",mode="enforce"} 1"#,
    ] {
        assert!(metrics.contains(sample), "missing {sample} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_are_checked_before_the_upgrade() {
    let server = TestServer::with_toml(
        "[[filters]]\nkind = \"origin\"\nallow = [\"https://chat.example.com\", \"https://*.example.org\"]\n",
    )
    .await;
    let upgrade = |origin: &str| {
        let header = format!("Origin: {origin}\r\n");
        let addr = server.addr;
        async move { RawClient::try_connect(addr, "/ws", &header, None).await.err() }
    };
    let refused = upgrade("https://evil.example.net").await.expect("refused");
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(upgrade("https://chat.example.com").await.is_none());
    assert!(upgrade("https://rooms.example.org").await.is_none());
    assert!(RawClient::try_connect(server.addr, "/ws", "", None).await.is_ok(), "no Origin: allowed by default");
    // An allowed Origin in front of another does not let the other in.
    let two = "Origin: https://chat.example.com\r\nOrigin: https://evil.example.net\r\n";
    let refused = RawClient::try_connect(server.addr, "/ws", two, None).await.err().expect("refused");
    assert!(refused.starts_with("HTTP/1.1 400"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_rate_limits_answer_429() {
    let server = TestServer::with_toml("[[filters]]\nkind = \"rate\"\nconcurrent_connections = 2\n").await;
    let _a = RawClient::connect(server.addr, "/ws").await;
    let b = RawClient::connect(server.addr, "/ws").await;
    let refused = RawClient::try_connect(server.addr, "/ws", "", None).await.err().expect("third refused");
    assert!(refused.starts_with("HTTP/1.1 429"), "{refused}");
    drop(b);
    let reconnected = support::eventually(support::PATIENCE, || async {
        RawClient::try_connect(server.addr, "/ws", "", None).await.ok()
    })
    .await;
    assert!(reconnected.is_some(), "a closed connection frees its slot");
}

/// A filter of the test's own: escalates against anyone saying "spam".
struct SpamGuard;

impl Filter for SpamGuard {
    fn on_message(&self, message: &mut Message, _ctx: &Context<'_>) -> Verdict {
        if message.content.contains("spam") {
            Verdict::Escalate { action: Escalation::Mute(std::time::Duration::from_secs(60)), reason: "spam".into() }
        } else {
            Verdict::Allow
        }
    }
}

struct SpamGuardFactory;

impl FilterFactory for SpamGuardFactory {
    fn kind(&self) -> &str {
        "spam_guard"
    }

    fn build(&self, _options: &Options, _ctx: &mut BuildContext) -> Result<Box<dyn Filter>, BuildError> {
        Ok(Box::new(SpamGuard))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escalations_refuse_the_message_and_are_counted() {
    let config = wardroom::config::parse("[[filters]]\nkind = \"spam_guard\"\n").unwrap();
    let server = Server::builder()
        .register(|registry: &mut Registry| registry.register(SpamGuardFactory))
        .with_config(config)
        .unwrap();
    let server = TestServer::run(server).await;
    let mut alice = server.client("Alice").await;
    alice.join("lobby").await;
    send(&mut alice, "lobby", "buy spam now", 1).await;
    // The escalation is carried out: Alice is muted, then told why her message was refused.
    let muted = alice.recv().await;
    assert_eq!((&muted["type"], &muted["reason"]), (&json!("muted"), &json!("spam")), "{muted}");
    assert!(muted["remaining_ms"].as_u64().is_some_and(|ms| ms > 59_000), "{muted}");
    let error = expect_error(&mut alice, 1).await;
    assert_eq!(error["code"], "policy_violation");
    send(&mut alice, "lobby", "ham is fine", 2).await;
    let error = expect_error(&mut alice, 2).await;
    assert_eq!(error["code"], "muted");
    let (_, metrics) = http_get(server.addr, "/metrics").await;
    assert!(
        metrics.contains(
            r#"wardroom_filter_verdicts_total{filter="spam_guard",verdict="escalate",code="mute",mode="enforce"} 1"#
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_filter_kind_is_refused_at_start_with_its_place() {
    let config = wardroom::config::parse("[[filters]]\nkind = \"nope\"\n").unwrap();
    let problems = Server::builder().with_config(config).expect_err("unknown kind");
    assert!(problems.to_string().contains("unknown filter kind `nope`"), "{problems}");
}

#[cfg(feature = "link-guard")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundled_plugin_refuses_a_message_end_to_end() {
    let config = wardroom::config::parse("[[filters]]\nkind = \"link_guard\"\nallow = [\"example.com\"]\n").unwrap();
    let server = Server::builder().register(wardroom_link_guard::register).with_config(config).unwrap();
    let server = TestServer::run(server).await;
    let mut alice = server.client("Alice").await;
    alice.join("lobby").await;
    send(&mut alice, "lobby", "see evil [.] com for free stuff", 1).await;
    let error = expect_error(&mut alice, 1).await;
    assert_eq!(error["code"], "link_not_allowed");
    assert!(error["message"].as_str().unwrap().contains("evil.com"), "{error}");
    assert_eq!(alice.post("lobby", "docs at https://docs.example.com/start").await["type"], "ack");
}
