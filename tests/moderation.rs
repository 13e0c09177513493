//! A moderated community through real sockets: identity (tokens, guests,
//! look-alike names), moderation actions and what their targets see, the
//! review queue, reports, the escalation ladder, and the audit log and
//! admin API that record all of it.

mod support;

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::raw::{http_request, http_request_with_body};
use support::{Client, TestServer};

const SECRET: &str = "test-secret";
const ADMIN: &str = "Authorization: Bearer admin-token\r\n";

const CONFIG: &str = r#"
[auth]
jwt_secret = "test-secret"
roles = { "mod-1" = ["moderator"], "mod-2" = ["moderator"], "adm-1" = ["admin"] }

[admin]
token = "admin-token"

[moderation]
ladder = [
  { strikes = 2, action = "warn" },
  { strikes = 3, action = "mute", duration = "1h" },
]

[[filters]]
kind = "profanity"
words = ["fuck"]
rules = [{ regex = "\\d{7,}", action = "hold" }]
"#;

fn token(sub: &str, name: &str, roles: &[&str], valid_for: i64) -> String {
    let exp = (wardroom::protocol::now_ms() / 1000) as i64 + valid_for;
    let claims = json!({"sub": sub, "name": name, "roles": roles, "exp": exp});
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).expect("sign")
}

async fn user(server: &TestServer, sub: &str, name: &str) -> Client {
    Client::connect(&format!("ws://{}/ws?token={}", server.addr, token(sub, name, &[], 3600))).await
}

/// Reads frames until one of type `kind` arrives (an unexpected error fails).
async fn until(client: &mut Client, kind: &str) -> Value {
    loop {
        let frame = client.recv().await;
        if frame["type"] == kind {
            return frame;
        }
        assert_ne!(frame["type"], "error", "waiting for {kind}: {frame}");
    }
}

async fn admin_get(server: &TestServer, path: &str) -> Value {
    let (status, body) = http_request(server.addr, "GET", path, ADMIN).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// A moderator, a guest and the room they share.
async fn community(server: &TestServer) -> (Client, Client, String) {
    let mut moderator = user(server, "mod-1", "Sentinel").await;
    assert_eq!(moderator.welcome["user"]["roles"], json!(["member", "moderator"]));
    let mut guest = server.client("Alice").await;
    let guest_id = guest.nick_id();
    moderator.join("lobby").await;
    guest.join("lobby").await;
    until(&mut moderator, "presence").await;
    (moderator, guest, guest_id)
}

trait Ids {
    fn nick_id(&self) -> String;
}

impl Ids for Client {
    fn nick_id(&self) -> String {
        self.welcome["user"]["id"].as_str().expect("user id").to_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_muted_user_sees_the_remaining_time_and_can_talk_again_after_it_ends() {
    let server = TestServer::with_toml(CONFIG).await;
    let (mut moderator, mut guest, guest_id) = community(&server).await;
    moderator.send(json!({"type": "mute", "user": guest_id, "duration": 1, "reason": "cool off", "ref": "m"})).await;
    let done = until(&mut moderator, "done").await;
    assert_eq!((&done["action"], &done["ref"]), (&json!("mute"), &json!("m")));
    let muted = until(&mut guest, "muted").await;
    assert_eq!(muted["reason"], "cool off");
    assert!(muted["remaining_ms"].as_u64().is_some_and(|ms| ms > 500 && ms <= 1000), "{muted}");

    guest.send(json!({"type": "message", "room": "lobby", "content": "hello?", "ref": 1})).await;
    let error = until(&mut guest, "error").await;
    assert_eq!(error["code"], "muted");
    assert!(error["retry_after_ms"].as_u64().is_some_and(|ms| ms <= 1000), "{error}");

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(guest.post("lobby", "I'm back").await["type"], "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_trying_a_moderator_action_gets_forbidden_and_is_audited() {
    let server = TestServer::with_toml(CONFIG).await;
    let (_moderator, mut guest, guest_id) = community(&server).await;
    for attempt in [
        json!({"type": "ban", "user": "mod-1", "ref": 1}),
        json!({"type": "kick", "user": "mod-1", "ref": 2}),
        json!({"type": "lock", "room": "lobby", "ref": 3}),
    ] {
        guest.send(attempt.clone()).await;
        let error = until(&mut guest, "error").await;
        assert_eq!((&error["code"], &error["ref"]), (&json!("forbidden"), &attempt["ref"]), "{attempt}");
    }
    let audit = admin_get(&server, &format!("/admin/audit?actor={guest_id}")).await;
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["forbidden"; 3], "{audit}");
    assert!(audit[0]["reason"].as_str().unwrap().contains("`lock`"), "newest first: {audit}");
    assert_eq!((&audit[0]["room"], &audit[1]["target"]), (&json!("lobby"), &json!("mod-1")), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicked_and_banned_users_are_closed_with_the_reason_and_banned_guests_stay_out() {
    let server = TestServer::with_toml(CONFIG).await;
    let (mut moderator, mut guest, guest_id) = community(&server).await;
    moderator.send(json!({"type": "kick", "user": guest_id, "reason": "take a break"})).await;
    assert_eq!(guest.expect_close().await, (1008, "kicked: take a break".to_owned()));
    until(&mut moderator, "done").await;

    let mut guest = server.client("Alice").await;
    let guest_id = guest.nick_id();
    guest.join("lobby").await;
    moderator.send(json!({"type": "ban", "user": guest_id, "duration": 600, "reason": "spam"})).await;
    let (code, reason) = guest.expect_close().await;
    assert_eq!(code, 1008);
    assert_eq!(reason, "banned for 10m: spam");
    until(&mut moderator, "done").await;

    // Another nickname from the same address does not help.
    let mut again = Client::connect_any(&server.ws_url(Some("NotAlice"))).await;
    let error = again.recv().await;
    assert_eq!(error["code"], "banned", "{error}");
    assert!(error["message"].as_str().unwrap().contains("spam"));
    assert_eq!(again.expect_close().await.0, 1008);

    // The admin API lists the ban and lifts it.
    let bans = admin_get(&server, "/admin/bans").await;
    assert_eq!(bans.as_array().unwrap().len(), 1, "{bans}");
    assert_eq!(bans[0]["cidr"], "127.0.0.1/32");
    let id = bans[0]["id"].as_i64().unwrap();
    let (status, body) = http_request(server.addr, "DELETE", &format!("/admin/bans/{id}"), ADMIN).await;
    assert_eq!(status, 200, "{body}");
    server.client("Alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_message_reaches_the_room_only_after_approval() {
    let server = TestServer::with_toml(CONFIG).await;
    let (mut moderator, mut guest, guest_id) = community(&server).await;
    let mut bob = server.client("Bob").await;
    bob.join("lobby").await;

    guest.send(json!({"type": "message", "room": "lobby", "content": "call 5551234567", "ref": "h1"})).await;
    let held = until(&mut guest, "held").await;
    assert_eq!(held["ref"], "h1");
    let item_id = held["id"].as_i64().expect("item id");
    let review = until(&mut moderator, "review").await;
    assert_eq!(review["item"]["id"], item_id);
    assert_eq!(review["item"]["content"], "call 5551234567");
    assert_eq!((&review["item"]["kind"], &review["item"]["user_id"]), (&json!("held"), &json!(guest_id)));
    let sent_at = review["item"]["ts"].as_u64().unwrap();

    // Nothing reached the room: Bob's next message is his own.
    assert_eq!(bob.post("lobby", "anyone?").await["type"], "ack");

    tokio::time::sleep(Duration::from_millis(20)).await;
    moderator.send(json!({"type": "approve", "item": item_id, "ref": "a"})).await;
    until(&mut moderator, "done").await;
    let delivered = until(&mut bob, "message").await;
    assert_eq!((&delivered["content"], &delivered["from"]), (&json!("call 5551234567"), &json!("Alice")));
    assert_eq!(delivered["ts"], sent_at, "delivered with its original time");
    let reviewed = until(&mut guest, "reviewed").await;
    assert_eq!((&reviewed["id"], &reviewed["status"]), (&json!(item_id), &json!("approved")));

    // Denied: it never arrives.
    guest.send(json!({"type": "message", "room": "lobby", "content": "again 5551234567"})).await;
    let item_id = until(&mut guest, "held").await["id"].as_i64().unwrap();
    moderator.send(json!({"type": "deny", "item": item_id, "reason": "no phone numbers"})).await;
    until(&mut moderator, "done").await;
    assert_eq!(until(&mut guest, "reviewed").await["status"], "denied");
    let pending = admin_get(&server, "/admin/review").await;
    assert_eq!(pending, json!([]), "nothing pending");
    let all = admin_get(&server, "/admin/review?status=all").await;
    assert_eq!(all.as_array().unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_reach_the_moderators_and_upheld_ones_delete_the_message() {
    let server = TestServer::with_toml(CONFIG).await;
    let (mut moderator, mut guest, _) = community(&server).await;
    let mut bob = server.client("Bob").await;
    bob.join("lobby").await;
    let id = guest.post("lobby", "something nasty").await["id"].as_u64().unwrap();

    bob.send(json!({"type": "report", "room": "lobby", "id": id, "reason": "rude", "ref": "r"})).await;
    assert_eq!(until(&mut bob, "done").await["ref"], "r");
    let review = until(&mut moderator, "review").await;
    assert_eq!((&review["item"]["kind"], &review["item"]["reason"]), (&json!("report"), &json!("rude")));
    assert_eq!(review["item"]["content"], "something nasty");

    let item = review["item"]["id"].as_i64().unwrap();
    moderator.send(json!({"type": "approve", "item": item})).await;
    let deleted = until(&mut bob, "deleted").await;
    assert_eq!((&deleted["room"], &deleted["id"]), (&json!("lobby"), &json!(id)));

    // Gone from history for newcomers.
    let mut carol = server.client("Carol").await;
    let joined = carol.join("lobby").await;
    assert!(joined["history"].as_array().unwrap().iter().all(|m| m["id"] != id), "{joined}");
    carol.send(json!({"type": "history", "room": "lobby"})).await;
    let page = until(&mut carol, "history").await;
    assert!(page["messages"].as_array().unwrap().iter().all(|m| m["id"] != id), "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_mode_and_locks_bind_members_but_not_moderators() {
    let server = TestServer::with_toml(CONFIG).await;
    let (mut moderator, mut guest, _) = community(&server).await;
    moderator.send(json!({"type": "slow_mode", "room": "lobby", "seconds": 30})).await;
    let room = until(&mut guest, "room").await;
    assert_eq!((&room["slow_mode"], &room["locked"]), (&json!(30), &json!(false)));
    guest.post("lobby", "first").await;
    guest.send(json!({"type": "message", "room": "lobby", "content": "second", "ref": 9})).await;
    let error = until(&mut guest, "error").await;
    assert_eq!(error["code"], "slow_mode");
    assert!(error["retry_after_ms"].as_u64().is_some_and(|ms| ms > 25_000), "{error}");
    moderator.post("lobby", "mods are not slowed").await;
    moderator.post("lobby", "at all").await;

    moderator.send(json!({"type": "lock", "room": "lobby"})).await;
    assert_eq!(until(&mut guest, "room").await["locked"], true);
    guest.send(json!({"type": "message", "room": "lobby", "content": "hello", "ref": 10})).await;
    assert_eq!(until(&mut guest, "error").await["code"], "room_locked");
    moderator.post("lobby", "announcement").await;

    let mut late = server.client("Late").await;
    let joined = late.join("lobby").await;
    assert_eq!((&joined["slow_mode"], &joined["locked"]), (&json!(30), &json!(true)), "newcomers see the settings");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_names_of_staff_and_reserved_names_are_refused() {
    let server = TestServer::with_toml(CONFIG).await;
    let _moderator = user(&server, "mod-1", "Sentinel").await;
    // Greek Μ, Τ and Ν below are capitals whose lower case passes for no Latin letter.
    for disguise in ["Adm1n", "%D0%90dmin", "rnod", "SentineI", "5entinel", "%CE%9COD", "SEN%CE%A4I%CE%9DEL"] {
        let mut guest = Client::connect(&server.ws_url(Some(disguise))).await;
        assert!(guest.nick().starts_with("guest-"), "{disguise}: {}", guest.welcome);
        let error = guest.recv().await;
        assert_eq!(error["code"], "invalid_nick", "{disguise}: {error}");
    }
    let mut guest = server.client("Visitor").await;
    for disguise in ["M0derator", "\u{39C}ODERATOR"] {
        guest.send(json!({"type": "nick", "nick": disguise})).await;
        assert_eq!(guest.recv().await["code"], "invalid_nick", "{disguise}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_expired_tokens_are_refused_with_unauthorized_and_a_close() {
    let server = TestServer::with_toml(CONFIG).await;
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "mod-1", "exp": 9_999_999_999u64, "roles": ["admin"]}),
        &EncodingKey::from_secret(b"not the secret"),
    )
    .unwrap();
    let expired = token("u-2", "Old", &[], -3600);
    for bad in [forged, expired, "not.a.token".to_owned()] {
        let mut client = Client::connect_any(&format!("ws://{}/ws?token={bad}", server.addr)).await;
        let error = client.recv().await;
        assert_eq!(error["code"], "unauthorized", "{error}");
        assert_eq!(client.expect_close().await.0, 1008);
    }
    // An `auth` frame with a bad token is refused; a good one signs in.
    let mut guest = server.client("Guesty").await;
    guest.send(json!({"type": "auth", "token": token("u-3", "Real", &[], -10), "ref": 1})).await;
    assert_eq!(guest.recv().await["code"], "unauthorized");
    guest.send(json!({"type": "auth", "token": token("u-3", "Real", &[], 3600)})).await;
    let welcome = guest.recv().await;
    assert_eq!((&welcome["type"], &welcome["user"]["id"]), (&json!("welcome"), &json!("u-3")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_guests_only_signed_in_users_may_chat() {
    let config = CONFIG.replace("[auth]\n", "[auth]\nguests = false\n");
    let server = TestServer::with_toml(&config).await;
    let mut anonymous = support::raw::RawClient::connect(server.addr, "/ws").await;
    anonymous.send_frame(true, support::raw::TEXT, br#"{"type":"join","room":"lobby","ref":1}"#).await;
    let error = anonymous.recv().await;
    assert_eq!((&error["type"], &error["code"]), (&json!("error"), &json!("unauthorized")), "no welcome before auth");
    let auth = json!({"type": "auth", "token": token("u-9", "Nine", &[], 3600)}).to_string();
    anonymous.send_frame(true, support::raw::TEXT, auth.as_bytes()).await;
    let welcome = anonymous.recv().await;
    assert_eq!(welcome["user"]["nick"], "Nine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_messages_climb_the_escalation_ladder() {
    let server = TestServer::with_toml(CONFIG).await;
    let (_moderator, mut guest, guest_id) = community(&server).await;
    for (i, expect) in [(1, None), (2, Some("warning")), (3, Some("muted"))] {
        guest.send(json!({"type": "message", "room": "lobby", "content": "fuck", "ref": i})).await;
        if let Some(kind) = expect {
            let frame = until(&mut guest, kind).await;
            assert!(frame["reason"].as_str().unwrap().contains("strikes"), "{frame}");
        }
        assert_eq!(until(&mut guest, "error").await["code"], "profanity");
    }
    guest.send(json!({"type": "message", "room": "lobby", "content": "sorry", "ref": 4})).await;
    assert_eq!(until(&mut guest, "error").await["code"], "muted");
    // Automatic actions are written without anyone waiting for them: poll.
    let path = format!("/admin/audit?target={guest_id}&actor=ladder");
    let audit = support::eventually(Duration::from_secs(5), || async {
        let audit = admin_get(&server, &path).await;
        (audit.as_array().map(Vec::len) == Some(2)).then_some(audit)
    })
    .await
    .expect("both ladder actions are audited");
    let actions: Vec<&str> = audit.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["mute", "warn"], "{audit}");
    assert!(audit[0]["rule"].as_str().unwrap().contains("3 strikes"), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_action_is_in_the_audit_log_and_the_admin_api() {
    let server = TestServer::with_toml(CONFIG).await;
    let (mut moderator, mut guest, guest_id) = community(&server).await;
    let id = guest.post("lobby", "to be deleted").await["id"].as_u64().unwrap();
    for request in [
        json!({"type": "delete", "room": "lobby", "id": id, "reason": "off topic"}),
        json!({"type": "mute", "user": guest_id, "duration": 600}),
        json!({"type": "unmute", "user": guest_id}),
        json!({"type": "slow_mode", "room": "lobby", "seconds": 5}),
        json!({"type": "lock", "room": "lobby"}),
        json!({"type": "unlock", "room": "lobby"}),
        json!({"type": "clear_strikes", "user": guest_id}),
        json!({"type": "ban", "ip": "198.51.100.0/24", "reason": "botnet"}),
        json!({"type": "unban", "ip": "198.51.100.0/24"}),
    ] {
        moderator.send(request.clone()).await;
        let answer = until(&mut moderator, "done").await;
        assert_eq!(answer["action"], request["type"]);
    }
    let audit = admin_get(&server, "/admin/audit?actor=mod-1").await;
    let actions: Vec<&str> = audit.as_array().unwrap().iter().rev().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["delete", "mute", "unmute", "slow_mode", "lock", "unlock", "clear_strikes", "ban", "unban"]);
    assert_eq!(audit[8]["room"], "lobby");
    assert_eq!(audit[8]["reason"], "off topic");

    // Paging: newest first, `before` continues.
    let first = admin_get(&server, "/admin/audit?actor=mod-1&limit=4").await;
    let before = first[3]["id"].as_i64().unwrap();
    let next = admin_get(&server, &format!("/admin/audit?actor=mod-1&limit=10&before={before}")).await;
    assert_eq!(first.as_array().unwrap().len() + next.as_array().unwrap().len(), 9);

    // Admin actions are audited as the admin API.
    let (status, body) =
        http_request(server.addr, "POST", "/admin/mutes", &format!("{ADMIN}Content-Type: application/json\r\n")).await;
    assert_eq!(status, 400, "a body is required: {body}");
    let rooms = admin_get(&server, "/admin/rooms").await;
    assert_eq!(rooms[0]["room"], "lobby");
    assert_eq!(rooms[0]["member_count"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_errors_are_json_and_say_what_is_wrong() {
    let server = TestServer::with_toml(CONFIG).await;
    let error = |(status, body): (u16, String)| -> (u16, String, String) {
        let value: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"));
        let text = |key: &str| value[key].as_str().unwrap_or_else(|| panic!("no `{key}`: {body}")).to_owned();
        (status, text("error"), text("message"))
    };
    let get = |path: &'static str| http_request(server.addr, "GET", path, ADMIN);

    let (status, code, message) = error(get("/admin/audit?limit=0").await);
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    assert!(message.contains("`limit` is from 1 to 1000"), "{message}");
    let (status, code, message) = error(get("/admin/audit?before=abc").await);
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    assert!(message.contains("`before` is a number"), "{message}");
    let (status, code, _) = error(get("/admin/review?status=bogus").await);
    assert_eq!((status, code.as_str()), (400, "bad_request"));
    let (status, code, _) = error(get("/admin/nothing").await);
    assert_eq!((status, code.as_str()), (404, "not_found"));
    let (status, code, _) = error(http_request(server.addr, "DELETE", "/admin/bans/abc", ADMIN).await);
    assert_eq!((status, code.as_str()), (400, "bad_request"));

    let huge = format!(r#"{{"user": "x", "reason": "{}"}}"#, "a".repeat(70 * 1024));
    let (status, code, message) =
        error(http_request_with_body(server.addr, "POST", "/admin/mutes", ADMIN, &huge).await);
    assert_eq!((status, code.as_str()), (413, "too_large"), "{message}");

    // A POST without a body, as `curl -X POST` sends it.
    let (status, body) = http_request(server.addr, "POST", "/admin/reload", ADMIN).await;
    assert_eq!(status, 200, "{body}");
}

/// Sends `request` and returns the error it gets.
async fn refused(client: &mut Client, request: Value) -> Value {
    client.send(request.clone()).await;
    loop {
        let frame = client.recv().await;
        assert_ne!(frame["type"], "done", "{request} was carried out");
        if frame["type"] == "error" {
            return frame;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderators_act_only_on_users_below_their_rank() {
    let server = TestServer::with_toml(CONFIG).await;
    let (mut moderator, _guest, _) = community(&server).await;
    let mut admin = user(&server, "adm-1", "Chief").await;
    for (request, message) in [
        (json!({"type": "ban", "user": "adm-1", "duration": 60}), "a moderator cannot ban an admin"),
        (json!({"type": "mute", "user": "adm-1"}), "a moderator cannot mute an admin"),
        // Not connected: the rank comes from `[auth] roles`.
        (json!({"type": "kick", "user": "mod-2"}), "a moderator cannot kick a moderator"),
        (json!({"type": "ban", "user": "mod-1"}), "you cannot ban yourself"),
    ] {
        let error = refused(&mut moderator, request.clone()).await;
        assert_eq!(
            (error["code"].as_str(), error["message"].as_str()),
            (Some("forbidden"), Some(message)),
            "{request}"
        );
    }
    let audit = admin_get(&server, "/admin/audit?actor=mod-1").await;
    let targets: Vec<&str> = audit.as_array().unwrap().iter().rev().map(|e| e["target"].as_str().unwrap()).collect();
    assert_eq!(targets, ["adm-1", "adm-1", "mod-2", "mod-1"], "{audit}");
    assert!(audit.as_array().unwrap().iter().all(|e| e["action"] == "forbidden"), "{audit}");

    // An admin outranks a moderator.
    admin.send(json!({"type": "mute", "user": "mod-1", "duration": 60})).await;
    until(&mut admin, "done").await;
    until(&mut moderator, "muted").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durations_out_of_range_and_deleted_messages_are_refused() {
    let server = TestServer::with_toml(CONFIG).await;
    let (mut moderator, mut guest, guest_id) = community(&server).await;
    for duration in [json!(0), json!(u64::MAX), json!(9_223_372_036_854_775_808u64)] {
        for kind in ["ban", "mute"] {
            let error = refused(&mut moderator, json!({"type": kind, "user": guest_id, "duration": duration})).await;
            assert_eq!(error["code"], "bad_request", "{kind} {duration}: {error}");
            assert!(error["message"].as_str().unwrap().contains("`duration` is from 1 to"), "{error}");
        }
    }
    let (status, body) = http_request_with_body(
        server.addr,
        "POST",
        "/admin/bans",
        ADMIN,
        &format!(r#"{{"user": "x", "duration": {}}}"#, u64::MAX),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(admin_get(&server, "/admin/bans").await.as_array().unwrap().is_empty(), "nothing was banned");

    let id = guest.post("lobby", "soon gone").await["id"].as_u64().unwrap();
    moderator.send(json!({"type": "delete", "room": "lobby", "id": id})).await;
    until(&mut moderator, "done").await;
    let error = refused(&mut moderator, json!({"type": "delete", "room": "lobby", "id": id})).await;
    assert_eq!(error["code"], "not_found", "a second delete: {error}");
    let error = refused(&mut guest, json!({"type": "report", "room": "lobby", "id": id, "reason": "rude"})).await;
    assert_eq!(error["code"], "not_found", "a report of a deleted message: {error}");
    let kept = guest.post("lobby", "still here").await["id"].as_u64().unwrap();
    let error = refused(&mut guest, json!({"type": "report", "room": "lobby", "id": kept, "reason": " "})).await;
    assert_eq!(
        (error["code"].as_str(), error["message"].as_str()),
        (Some("bad_request"), Some("a report needs a reason"))
    );
    let error = refused(&mut moderator, json!({"type": "ban", "user": "", "reason": "nobody"})).await;
    assert_eq!(error["code"], "bad_request", "{error}");
    let deletions = admin_get(&server, "/admin/audit?actor=mod-1").await;
    assert_eq!(deletions.as_array().unwrap().iter().filter(|e| e["action"] == "delete").count(), 1, "{deletions}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_banned_after_leaving_is_banned_by_address_too() {
    let server = TestServer::with_toml(CONFIG).await;
    let (mut moderator, mut guest, guest_id) = community(&server).await;
    guest.post("lobby", "spam spam spam").await;
    guest.close().await;
    until(&mut moderator, "presence").await;
    moderator.send(json!({"type": "ban", "user": guest_id, "duration": 600, "reason": "spam"})).await;
    until(&mut moderator, "done").await;
    let bans = admin_get(&server, "/admin/bans").await;
    assert_eq!(bans[0]["cidr"], "127.0.0.1/32", "{bans}");
    let mut again = Client::connect_any(&server.ws_url(Some("NotAlice"))).await;
    let error = again.recv().await;
    assert_eq!(error["code"], "banned", "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_flooding_moderation_requests_is_held_to_the_request_budget() {
    let server =
        TestServer::with_toml(&format!("{CONFIG}\n[limits]\nrequests_per_minute = 6\nrequests_burst = 3\n")).await;
    let (_moderator, mut guest, guest_id) = community(&server).await;
    // The guest's join took one request of three.
    for i in 0..4 {
        guest.send(json!({"type": "kick", "user": "mod-1", "ref": i})).await;
    }
    let mut codes = Vec::new();
    while codes.len() < 4 {
        let frame = guest.recv().await;
        if frame["type"] == "error" {
            codes.push(frame["code"].as_str().unwrap().to_owned());
        }
    }
    codes.sort();
    assert_eq!(codes, ["forbidden", "forbidden", "rate_limited", "rate_limited"]);
    let audit = admin_get(&server, &format!("/admin/audit?actor={guest_id}")).await;
    assert_eq!(audit.as_array().unwrap().len(), 2, "only the attempts within the budget: {audit}");
}

/// A moderator signing in gets the pending review queue, but no more of it
/// than a quarter of a small outbound queue, and stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_review_queue_does_not_close_a_moderator_with_a_small_queue() {
    let server = TestServer::with_toml(&format!("{CONFIG}\n[limits]\noutbound_queue = 16\n")).await;
    let mut guest = server.client("Alice").await;
    guest.join("lobby").await;
    for i in 0..30 {
        guest.send(json!({"type": "message", "room": "lobby", "content": format!("call 555123{i:04}")})).await;
        until(&mut guest, "held").await;
    }
    let mut moderator = user(&server, "mod-1", "Sentinel").await;
    for _ in 0..4 {
        assert_eq!(moderator.recv().await["type"], "review");
    }
    // Nothing else queued; the moderator is connected and answered.
    let joined = moderator.join("lobby").await;
    assert_eq!(joined["type"], "joined", "{joined}");
}
