//! Reload torture, with honest traffic flowing all along: 50 saves by rename,
//! each applied within a second with no honest message lost; truncate-then-
//! write never leaves a moment without the profanity filter; invalid files
//! and a deleted file keep the old policies and are reported.
//!
//! A long suite: `cargo test --features long-tests --test reload_torture`.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::raw::http_request;
use support::{Client, TempConfig, TestServer};
use tokio_tungstenite::tungstenite::Message;

const HONEST: usize = 8;

fn policy(extra_word: &str) -> String {
    format!(
        "[admin]\ntoken = \"t\"\n[moderation]\nladder = []\n\n[[filters]]\nkind = \"profanity\"\nwords = [\"fuck\", {extra_word:?}]\n"
    )
}

async fn status(server: &TestServer) -> Value {
    let (_, body) = http_request(server.addr, "GET", "/admin/reload", "Authorization: Bearer t\r\n").await;
    serde_json::from_str(&body).unwrap_or(Value::Null)
}

/// Honest clients in one room, each sending a numbered message every 50 ms
/// and checking that it receives every member's messages in order, once.
struct Honest {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<(usize, BTreeMap<String, u64>)>>,
}

async fn honest_traffic(server: &TestServer) -> Honest {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for i in 0..HONEST {
        let mut client = server.client(&format!("honest{i}")).await;
        client.join("torture").await;
        clients.push(client);
    }
    // Drain the presence events of later joiners.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut tasks = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let (stop, sent) = (stop.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = client.into_inner().split();
            let me = format!("honest{i}");
            let mut last_seen: BTreeMap<String, u64> = BTreeMap::new();
            let mut n = 0u64;
            let mut ticker = tokio::time::interval(Duration::from_millis(50));
            let mut acked = 0;
            loop {
                tokio::select! {
                    _ = ticker.tick(), if !stop.load(Ordering::Relaxed) => {
                        n += 1;
                        let frame = json!({"type": "message", "room": "torture", "content": format!("{me} {n}"), "ref": n});
                        sink.send(Message::text(frame.to_string())).await.expect("send");
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    message = stream.next() => {
                        let Some(Ok(Message::Text(text))) = message else {
                            match message {
                                Some(Ok(_)) => continue,
                                other => panic!("{me} was disconnected: {other:?}"),
                            }
                        };
                        let frame: Value = serde_json::from_str(&text).unwrap();
                        match frame["type"].as_str() {
                            Some("message") => {
                                let content = frame["content"].as_str().unwrap();
                                let (who, k) = content.split_once(' ').unwrap();
                                let k: u64 = k.parse().unwrap();
                                let previous = last_seen.insert(who.to_owned(), k).unwrap_or(0);
                                assert_eq!(k, previous + 1, "{me}: from {who}, {k} after {previous}: lost, repeated or reordered");
                            }
                            Some("ack") => acked += 1,
                            Some("error") => panic!("{me}: honest message refused: {frame}"),
                            _ => {}
                        }
                        if stop.load(Ordering::Relaxed) && acked == n && last_seen.get(&me) == Some(&n) {
                            // Give the others' last messages a moment, then stop.
                            let until = tokio::time::Instant::now() + Duration::from_millis(500);
                            while let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout_at(until, stream.next()).await {
                                let frame: Value = serde_json::from_str(&text).unwrap();
                                if frame["type"] == "message" {
                                    let (who, k) = frame["content"].as_str().unwrap().split_once(' ').unwrap();
                                    let k: u64 = k.parse().unwrap();
                                    let previous = last_seen.insert(who.to_owned(), k).unwrap_or(0);
                                    assert_eq!(k, previous + 1, "{me}: from {who}");
                                }
                            }
                            return (i, last_seen);
                        }
                    }
                }
            }
        }));
    }
    Honest { stop, sent, tasks }
}

impl Honest {
    /// Stops sending and checks that everyone got everything.
    async fn finish(self) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.stop.store(true, Ordering::Relaxed);
        let mut seen = Vec::new();
        for task in self.tasks {
            seen.push(
                tokio::time::timeout(Duration::from_secs(20), task)
                    .await
                    .expect("honest client finishes")
                    .expect("no panic"),
            );
        }
        let totals: BTreeMap<String, u64> =
            seen.iter().map(|(i, s)| (format!("honest{i}"), s[&format!("honest{i}")])).collect();
        for (i, last_seen) in &seen {
            assert_eq!(last_seen, &totals, "honest{i} did not receive every message");
        }
        let sent: u64 = totals.values().sum();
        assert_eq!(sent, self.sent.load(Ordering::Relaxed));
        println!("{sent} honest messages, each delivered to all {HONEST} members in order");
    }
}

/// Whether a blocked word is refused right now (a probe client's view).
async fn refused(probe: &mut Client, word: &str, n: u64) -> bool {
    probe.send(json!({"type": "message", "room": "probe", "content": word, "ref": n})).await;
    loop {
        let frame = probe.recv().await;
        if frame["ref"] == n {
            return frame["type"] == "error";
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_saves_by_rename_apply_within_a_second_and_lose_no_honest_message() {
    let file = TempConfig::new(&policy("word0"));
    let server = TestServer::with_file(&file.path).await;
    let honest = honest_traffic(&server).await;
    let mut probe = server.client("probe").await;
    probe.join("probe").await;
    let mut slowest = Duration::ZERO;
    let mut probes = 0;
    for save in 1..=50u64 {
        let word = format!("word{save}");
        file.save_by_rename(&policy(&word));
        let saved = Instant::now();
        while !{
            probes += 1;
            refused(&mut probe, &word, probes).await
        } {
            assert!(saved.elapsed() < Duration::from_secs(1), "save {save} not applied within 1 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        slowest = slowest.max(saved.elapsed());
    }
    println!("slowest reload: {slowest:?}");
    honest.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_then_write_never_leaves_a_window_without_the_filter() {
    let file = TempConfig::new(&policy("word0"));
    let server = TestServer::with_file(&file.path).await;
    let honest = honest_traffic(&server).await;
    let probing = Arc::new(AtomicBool::new(true));
    let probe_flag = probing.clone();
    let mut probe = server.client("probe").await;
    probe.join("probe").await;
    let prober = tokio::spawn(async move {
        let mut n = 0;
        while probe_flag.load(Ordering::Relaxed) {
            n += 1;
            assert!(refused(&mut probe, "fuck", n).await, "probe {n}: the blocked word went through");
        }
        n
    });
    for round in 0..20u64 {
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(&file.path).expect("truncate");
        // Empty for a random moment, sometimes long enough for a reload.
        tokio::time::sleep(Duration::from_millis(round * 37 % 400)).await;
        std::io::Write::write_all(&mut f, file.with_store(&policy(&format!("w{round}"))).as_bytes()).expect("write");
        drop(f);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    probing.store(false, Ordering::Relaxed);
    let probes = prober.await.expect("no probe let the word through");
    println!("{probes} probes, all refused");
    honest.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_edits_under_traffic_keep_the_old_policies_and_are_reported() {
    let file = TempConfig::new(&policy("kept"));
    let server = TestServer::with_file(&file.path).await;
    let honest = honest_traffic(&server).await;
    let mut probe = server.client("probe").await;
    probe.join("probe").await;
    let base = policy("kept");
    let cases = [
        ("invalid TOML", format!("{base}words = [\n")),
        ("a bad regex", format!("{base}rules = [{{ regex = \"(\" }}]\n")),
        ("an oversized regex", format!("{base}rules = [{{ regex = \"\\\\w{{1000}}\\\\w{{1000}}\\\\w{{1000}}\" }}]\n")),
        ("an out-of-range value", format!("{base}\n[limits]\noutbound_queue = 0\n")),
    ];
    let mut n = 0;
    for (what, text) in cases {
        let before = status(&server).await["at_ms"].as_u64().unwrap_or(0);
        file.save_by_rename(&text);
        let report = support::eventually(Duration::from_secs(2), || async {
            let status = status(&server).await;
            (status["at_ms"].as_u64() > Some(before)).then_some(status)
        })
        .await
        .unwrap_or_else(|| panic!("{what}: no reload reported"));
        assert_eq!(report["outcome"], "rejected", "{what}: {report}");
        n += 1;
        assert!(refused(&mut probe, "kept", n).await, "{what}: the old policy keeps running");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    std::fs::remove_file(&file.path).expect("delete the config");
    let deleted = support::eventually(Duration::from_secs(2), || async {
        let status = status(&server).await;
        status["message"].as_str().is_some_and(|m| m.contains("cannot read")).then_some(status)
    })
    .await;
    assert!(deleted.is_some(), "a deleted file is reported");
    assert!(refused(&mut probe, "kept", 100).await);
    honest.finish().await;
}
