//! Crash and restart: ten rounds of `kill -9` at a random moment while
//! messages, bans and mutes are in flight, each followed by a restart on the
//! same database. Everything that was acknowledged is still there, SQLite's
//! integrity check passes, and banned users are still refused.
//!
//! A long suite (about a minute): `cargo test --features long-tests --test crash`.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::process::ServerProcess;
use support::raw::http_request_with_body;
use support::{Client, fresh_dir};
use tokio_tungstenite::tungstenite::Message;

const ROUNDS: usize = 10;
const ADMIN: &str = "Authorization: Bearer admin-token\r\nContent-Type: application/json\r\n";

fn token(sub: &str) -> String {
    let exp = wardroom::protocol::now_ms() / 1000 + 3600;
    let claims = json!({"sub": sub, "name": sub, "exp": exp});
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"crash-secret")).expect("sign")
}

/// A small, seeded random source (the seed is printed, to replay a failure).
struct Random(u64);

impl Random {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// What the server has acknowledged so far, across rounds.
#[derive(Default)]
struct Acknowledged {
    messages: BTreeSet<u64>,
    banned: Vec<String>,
    muted: Vec<String>,
}

async fn admin(server: &ServerProcess, method: &str, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = http_request_with_body(server.addr, method, path, ADMIN, &body.to_string()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// Everything acknowledged before is still there.
async fn verify(server: &ServerProcess, acked: &Acknowledged) {
    let mut reader = Client::connect(&server.ws_url("nick=Checker")).await;
    reader.join("ledger").await;
    let stored = reader.history_ids("ledger").await;
    let lost: Vec<_> = acked.messages.difference(&stored).take(5).collect();
    assert!(lost.is_empty(), "acknowledged messages lost, e.g. {lost:?}");

    let (_, bans) = admin(server, "GET", "/admin/bans", &Value::Null).await;
    let banned: BTreeSet<&str> = bans.as_array().unwrap().iter().filter_map(|b| b["user_id"].as_str()).collect();
    for user in &acked.banned {
        assert!(banned.contains(user.as_str()), "ban of {user} lost: {bans}");
        let mut client = Client::connect_any(&server.ws_url(&format!("token={}", token(user)))).await;
        assert_eq!(client.recv().await["code"], "banned", "{user} is still refused");
    }
    let (_, mutes) = admin(server, "GET", "/admin/mutes", &Value::Null).await;
    let muted: BTreeSet<&str> = mutes.as_array().unwrap().iter().filter_map(|m| m["user_id"].as_str()).collect();
    for user in &acked.muted {
        assert!(muted.contains(user.as_str()), "mute of {user} lost: {mutes}");
    }
    // Every acknowledged ban and mute has its audit entry. The log is read
    // page by page (1,000 entries at most per page): ten rounds can
    // acknowledge more than one page of them.
    let mut audited: BTreeSet<(String, String)> = BTreeSet::new();
    let mut before = String::new();
    loop {
        let path = format!("/admin/audit?actor=admin-api&limit=1000{before}");
        let (status, page) = admin(server, "GET", &path, &Value::Null).await;
        assert_eq!(status, 200, "{page}");
        let page = page.as_array().cloned().unwrap_or_default();
        let Some(last) = page.last() else { break };
        before = format!("&before={}", last["id"]);
        audited
            .extend(page.iter().filter_map(|entry| {
                Some((entry["action"].as_str()?.to_owned(), entry["target"].as_str()?.to_owned()))
            }));
    }
    for (action, users) in [("ban", &acked.banned), ("mute", &acked.muted)] {
        for user in users {
            assert!(audited.contains(&(action.to_owned(), user.clone())), "audit entry of the {action} of {user} lost");
        }
    }
}

fn integrity_check(db: &std::path::Path) {
    let result: String = rusqlite::Connection::open(db)
        .expect("open the database")
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .expect("integrity check");
    assert_eq!(result, "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_kill_9_rounds_lose_nothing_acknowledged() {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    println!("seed {seed}");
    let mut random = Random(seed);
    let dir = fresh_dir();
    let db = dir.join("wardroom.db");
    let config = dir.join("config.toml");
    // No request budget: after each round one client pages through the
    // whole history.
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n[admin]\ntoken = \"admin-token\"\n\
         [auth]\njwt_secret = \"crash-secret\"\n[limits]\noutbound_queue = 100000\nrequests_per_minute = 0\n[store]\npath = {db:?}\nretain_per_room = 0\n"
    );
    std::fs::write(&config, text).expect("write config");
    let mut acked = Acknowledged::default();

    for round in 0..ROUNDS {
        let server = ServerProcess::start(env!("CARGO_BIN_EXE_wardroom"), &config);
        verify(&server, &acked).await;

        // Messages in flight...
        let (ws, _) = tokio_tungstenite::connect_async(server.ws_url(&format!("nick=Writer{round}"))).await.unwrap();
        let (mut sink, mut stream) = ws.split();
        sink.send(Message::text(json!({"type": "join", "room": "ledger"}).to_string())).await.unwrap();
        let writer = tokio::spawn(async move {
            for i in 0.. {
                let frame = json!({"type": "message", "room": "ledger", "content": format!("round {round} entry {i}"), "ref": i});
                if sink.send(Message::text(frame.to_string())).await.is_err() {
                    return;
                }
                if i % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
        let reader = tokio::spawn(async move {
            let mut ids = Vec::new();
            while let Some(Ok(message)) = stream.next().await {
                if let Message::Text(text) = message {
                    let frame: Value = serde_json::from_str(&text).unwrap_or_default();
                    if frame["type"] == "ack" {
                        ids.push(frame["id"].as_u64().unwrap());
                    }
                }
            }
            ids
        });
        // ...and bans and mutes, recorded once the server answers.
        let kill_at = Instant::now() + Duration::from_millis(100 + random.below(900));
        let mut n = 0;
        while Instant::now() < kill_at {
            let user = format!("r{round}-u{n}");
            let (path, body) = if n % 2 == 0 {
                ("/admin/bans", json!({"user": user, "reason": "crash test"}))
            } else {
                ("/admin/mutes", json!({"user": user, "duration": 86_400}))
            };
            let answered = tokio::time::timeout(
                kill_at.saturating_duration_since(Instant::now()),
                admin(&server, "POST", path, &body),
            )
            .await;
            if let Ok((200, _)) = answered {
                if n % 2 == 0 { acked.banned.push(user) } else { acked.muted.push(user) }
            }
            n += 1;
        }
        server.kill_9();
        writer.abort();
        let ids = tokio::time::timeout(Duration::from_secs(10), reader).await.expect("reader ends").expect("reader");
        println!(
            "round {round}: {} messages, {} bans, {} mutes acknowledged so far",
            ids.len(),
            acked.banned.len(),
            acked.muted.len()
        );
        acked.messages.extend(ids);
        integrity_check(&db);
    }
    let server = ServerProcess::start(env!("CARGO_BIN_EXE_wardroom"), &config);
    verify(&server, &acked).await;
    assert!(acked.messages.len() > 1_000, "enough traffic to prove something: {}", acked.messages.len());
    assert!(server.terminate());
}
