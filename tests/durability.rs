//! Durability with real server processes on one database file: bans survive
//! a restart, and `kill -9` loses no acknowledged message, ban, mute or
//! audit entry, and leaves a database that passes SQLite's integrity check.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::process::ServerProcess;
use support::{Client, fresh_dir};
use tokio_tungstenite::tungstenite::Message;

const ADMIN: &str = "Authorization: Bearer admin-token\r\nContent-Type: application/json\r\n";

/// A config in a fresh directory, with the database next to it.
fn config(extra: &str) -> std::path::PathBuf {
    let dir = fresh_dir();
    let path = dir.join("config.toml");
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n[admin]\ntoken = \"admin-token\"\n\
         [store]\npath = {:?}\n{extra}",
        dir.join("wardroom.db")
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn start(config: &std::path::Path) -> ServerProcess {
    ServerProcess::start(env!("CARGO_BIN_EXE_wardroom"), config)
}

async fn admin(server: &ServerProcess, method: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) =
        support::raw::http_request_with_body(server.addr, method, path, ADMIN, &body.to_string()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ban_survives_a_restart_of_the_server_process() {
    let config = config("");
    let server = start(&config);
    let mut guest = Client::connect(&server.ws_url("nick=Spammer")).await;
    let guest_id = guest.welcome["user"]["id"].as_str().unwrap().to_owned();
    let (status, body) = admin(&server, "POST", "/admin/bans", json!({"user": guest_id, "reason": "spam"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(guest.expect_close().await, (1008, "banned: spam".to_owned()));
    assert!(server.terminate(), "exit 0 on SIGTERM");

    let server = start(&config);
    let mut again = Client::connect_any(&server.ws_url("nick=Innocent")).await;
    let error = again.recv().await;
    assert_eq!(error["code"], "banned", "still banned after the restart: {error}");
    assert_eq!(again.expect_close().await.0, 1008);
    let (_, bans) = admin(&server, "GET", "/admin/bans", Value::Null).await;
    assert_eq!(bans[0]["user_id"], guest_id.as_str(), "{bans}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_acknowledged_message_ban_mute_or_audit_entry() {
    let config = config("[limits]\noutbound_queue = 100000\n");
    let server = start(&config);

    // A ban and a mute, each answered only once durable.
    let (status, _) = admin(&server, "POST", "/admin/bans", json!({"ip": "198.51.100.0/24", "reason": "botnet"})).await;
    assert_eq!(status, 200);
    let (status, _) = admin(&server, "POST", "/admin/mutes", json!({"user": "u-42", "duration": 3600})).await;
    assert_eq!(status, 200);

    // Stream messages and collect the acknowledged ids, then kill -9 mid-stream.
    let (ws, _) = tokio_tungstenite::connect_async(server.ws_url("nick=Writer")).await.expect("connect");
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::text(json!({"type": "join", "room": "log"}).to_string())).await.unwrap();
    let writer = tokio::spawn(async move {
        for i in 0..20_000 {
            let frame = json!({"type": "message", "room": "log", "content": format!("entry {i}"), "ref": i});
            if sink.send(Message::text(frame.to_string())).await.is_err() {
                break;
            }
        }
    });
    let mut acked = BTreeSet::new();
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(10), stream.next()).await {
        let Message::Text(text) = message else { continue };
        let frame: Value = serde_json::from_str(&text).unwrap();
        if frame["type"] == "ack" {
            acked.insert(frame["id"].as_u64().unwrap());
            if acked.len() == 3_000 {
                break;
            }
        }
    }
    server.kill_9();
    // Acks that were already on their way count too.
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await {
        if let Message::Text(text) = message {
            let frame: Value = serde_json::from_str(&text).unwrap();
            if frame["type"] == "ack" {
                acked.insert(frame["id"].as_u64().unwrap());
            }
        }
    }
    writer.abort();
    assert!(acked.len() >= 3_000, "only {} acks before the kill", acked.len());

    let db = config.parent().unwrap().join("wardroom.db");
    let integrity: String = rusqlite::Connection::open(&db)
        .expect("open the database")
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .expect("integrity check");
    assert_eq!(integrity, "ok");

    // Everything acknowledged is there after a restart.
    let server = start(&config);
    let mut reader = Client::connect(&server.ws_url("nick=Reader")).await;
    reader.join("log").await;
    let stored = reader.history_ids("log").await;
    let lost: Vec<_> = acked.difference(&stored).collect();
    assert!(lost.is_empty(), "{} acknowledged messages lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);

    let (_, bans) = admin(&server, "GET", "/admin/bans", Value::Null).await;
    assert_eq!(bans[0]["cidr"], "198.51.100.0/24", "{bans}");
    let (_, mutes) = admin(&server, "GET", "/admin/mutes", Value::Null).await;
    assert_eq!(mutes[0]["user_id"], "u-42", "{mutes}");
    let (_, audit) = admin(&server, "GET", "/admin/audit?actor=admin-api", Value::Null).await;
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["mute", "ban"], "{audit}");
}

/// A guest may not take a look-alike of a staff member's name, also after a
/// restart, before that staff member has come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staff_members_name_stays_protected_after_a_restart() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let config = config("[auth]\njwt_secret = \"durable-secret\"\nroles = { \"mod-1\" = [\"moderator\"] }\n");
    let server = start(&config);
    let exp = wardroom::protocol::now_ms() / 1000 + 3600;
    let claims = json!({"sub": "mod-1", "name": "Mara", "exp": exp});
    let token =
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(b"durable-secret")).expect("sign");
    let moderator = Client::connect(&server.ws_url(&format!("token={token}"))).await;
    assert_eq!(moderator.welcome["user"]["roles"], json!(["member", "moderator"]));
    moderator.close().await;
    assert!(server.terminate(), "exit 0 on SIGTERM");

    let server = start(&config);
    // As written, with a Cyrillic а, and in capitals with a Greek Μ.
    for disguise in ["Mara", "M%D0%B0ra", "%CE%9CARA"] {
        let mut guest = Client::connect(&server.ws_url(&format!("nick={disguise}"))).await;
        assert!(guest.nick().starts_with("guest-"), "{disguise}: {}", guest.welcome);
        let error = guest.recv().await;
        assert_eq!(error["code"], "invalid_nick", "{disguise}: {error}");
    }
    let guest = Client::connect(&server.ws_url("nick=Marek")).await;
    assert_eq!(guest.nick(), "Marek", "other names are free");
}
