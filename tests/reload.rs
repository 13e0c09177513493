//! Hot reload: in-place edits, saves by rename, truncate-then-write and a
//! Kubernetes ConfigMap's symlink swap are applied within a second, and so is
//! a rotated public key; invalid files keep the old policies running and are
//! reported; limits and connections survive a reload.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::raw::http_request;
use support::{Client, TempConfig, TestServer, eventually};

const TOKEN: &str = "Authorization: Bearer test-token\r\n";

fn policy(words: &[&str]) -> String {
    let words: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    // No escalation ladder: these tests send many refused messages.
    format!(
        "[admin]\ntoken = \"test-token\"\n\n[moderation]\nladder = []\n\n[[filters]]\nkind = \"profanity\"\nwords = [{}]\n",
        words.join(", ")
    )
}

/// Sends `content` and reports whether the profanity filter refused it.
async fn refused(client: &mut Client, content: &str) -> bool {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let reference = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    client.send(json!({"type": "message", "room": "lobby", "content": content, "ref": reference})).await;
    loop {
        let frame = client.recv().await;
        if frame["ref"] == reference {
            return match frame["type"].as_str() {
                Some("ack") => false,
                Some("error") if frame["code"] == "profanity" => true,
                _ => panic!("unexpected answer {frame}"),
            };
        }
    }
}

async fn status(server: &TestServer) -> Value {
    let (code, body) = http_request(server.addr, "GET", "/admin/reload", TOKEN).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status is JSON")
}

async fn started(words: &[&str]) -> (TempConfig, TestServer, Client) {
    let file = TempConfig::new(&policy(words));
    let server = TestServer::with_file(&file.path).await;
    let mut client = server.client("Alice").await;
    client.join("lobby").await;
    (file, server, client)
}

/// Within a second, "darn" goes from allowed to refused.
async fn darn_becomes_refused(client: &mut Client) {
    becomes_refused(client, "darn").await;
}

/// Within a second, `word` goes from allowed to refused.
async fn becomes_refused(client: &mut Client, word: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while !refused(client, word).await {
        assert!(tokio::time::Instant::now() < deadline, "refusing {word:?} was not applied within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_place_edit_applies_within_a_second() {
    let (file, _server, mut client) = started(&["fuck"]).await;
    assert!(!refused(&mut client, "darn").await);
    file.write_in_place(&policy(&["fuck", "darn"]));
    darn_becomes_refused(&mut client).await;
    assert!(refused(&mut client, "fuck").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_save_by_rename_applies_within_a_second() {
    let (file, _server, mut client) = started(&["fuck"]).await;
    assert!(!refused(&mut client, "darn").await);
    file.save_by_rename(&policy(&["fuck", "darn"]));
    darn_becomes_refused(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_then_write_never_drops_the_filter() {
    let (file, server, mut client) = started(&["fuck"]).await;
    // Truncate, then wait long enough for the watcher to see the empty file.
    std::fs::OpenOptions::new().write(true).truncate(true).open(&file.path).expect("truncate");
    let seen = eventually(Duration::from_secs(2), || async {
        let status = status(&server).await;
        (status["outcome"] == "rejected").then_some(status)
    })
    .await
    .expect("the empty file was noticed");
    assert!(seen["message"].as_str().unwrap().contains("is empty; keeping the current policies"), "{seen}");
    assert!(refused(&mut client, "fuck").await, "the filter is still running");
    std::fs::write(&file.path, file.with_store(&policy(&["fuck", "darn"]))).expect("write");
    darn_becomes_refused(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_files_keep_the_old_policies_and_are_reported() {
    let (file, server, mut client) = started(&["fuck"]).await;
    let base = policy(&["fuck"]);
    let cases = [
        ("invalid TOML", format!("{base}\nwords = [unclosed\n"), "8:"),
        ("an unknown key", format!("{base}\n[rooms]\nmax_romos = 3\n"), "unknown field `max_romos`"),
        ("a bad regex", format!("{base}rules = [{{ regex = \"(unclosed\" }}]\n"), "rules[0].regex"),
        ("an unknown filter kind", format!("{base}\n[[filters]]\nkind = \"nope\"\n"), "unknown filter kind `nope`"),
        ("an out-of-range value", format!("{base}\n[limits]\noutbound_queue = 0\n"), "must be between 2 and"),
        (
            "an oversized regex",
            format!("{base}rules = [{{ regex = \"\\\\w{{1000}}\\\\w{{1000}}\\\\w{{1000}}\" }}]\n"),
            "oversized",
        ),
    ];
    let mut last_at = 0;
    for (what, text, needle) in cases {
        file.save_by_rename(&text);
        let report = eventually(Duration::from_secs(2), || async {
            let status = status(&server).await;
            (status["at_ms"].as_u64() > Some(last_at) && status["outcome"] == "rejected").then_some(status)
        })
        .await
        .unwrap_or_else(|| panic!("{what}: no rejected reload reported"));
        last_at = report["at_ms"].as_u64().unwrap();
        let problems = report["problems"].to_string();
        assert!(problems.contains(needle), "{what}: {needle:?} not in {problems}");
        assert!(
            report["problems"][0].as_str().unwrap().split(':').next().unwrap().parse::<u32>().is_ok(),
            "{what}: problems start with a line number: {problems}"
        );
        assert!(refused(&mut client, "fuck").await, "{what}: the old policy keeps running");
        // Distinct timestamps for the next case.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Deleting the file keeps the policies too.
    std::fs::remove_file(&file.path).expect("delete");
    let report = eventually(Duration::from_secs(2), || async {
        let status = status(&server).await;
        status["message"].as_str().is_some_and(|m| m.contains("cannot read")).then_some(status)
    })
    .await;
    assert!(report.is_some(), "a deleted file is reported");
    assert!(refused(&mut client, "fuck").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_user_is_still_limited_after_a_reload() {
    let with_rate =
        |words: &[&str]| format!("{}\n[[filters]]\nkind = \"rate\"\nper_user = {{ per_minute = 1 }}\n", policy(words));
    let file = TempConfig::new(&with_rate(&["fuck"]));
    let server = TestServer::with_file(&file.path).await;
    let mut client = server.client("Alice").await;
    client.join("lobby").await;
    client.post("lobby", "one").await;
    client.send(json!({"type": "message", "room": "lobby", "content": "two", "ref": "r2"})).await;
    assert_eq!(client.recv().await["code"], "rate_limited");

    file.save_by_rename(&with_rate(&["fuck", "darn"]));
    let applied =
        eventually(Duration::from_secs(2), || async { (status(&server).await["outcome"] == "applied").then_some(()) })
            .await;
    assert!(applied.is_some(), "the reload was applied");
    client.send(json!({"type": "message", "room": "lobby", "content": "three", "ref": "r3"})).await;
    let answer = client.recv().await;
    assert_eq!((&answer["code"], &answer["ref"]), (&json!("rate_limited"), &json!("r3")), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_need_a_restart_are_reported_and_the_rest_applies() {
    let (file, server, mut client) = started(&["fuck"]).await;
    file.save_by_rename(&format!("[server]\nmax_connections = 10\n\n{}", policy(&["fuck", "darn"])));
    darn_becomes_refused(&mut client).await;
    let report = status(&server).await;
    assert_eq!(report["outcome"], "applied");
    assert_eq!(report["restart_required"], json!(["server.max_connections"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_the_token() {
    let (_file, server, _client) = started(&["fuck"]).await;
    for headers in ["", "Authorization: Bearer wrong\r\n", "Authorization: test-token\r\n"] {
        let (code, body) = http_request(server.addr, "GET", "/admin/reload", headers).await;
        assert_eq!((code, body.as_str()), (401, "unauthorized"), "{headers:?}");
    }
    let (code, body) = http_request(server.addr, "POST", "/admin/reload", TOKEN).await;
    assert_eq!(code, 200);
    let report: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["outcome"], "unchanged", "{report}");

    let plain = TestServer::start().await;
    assert_eq!(http_request(plain.addr, "GET", "/admin/reload", TOKEN).await.0, 404, "no token, no admin API");
}

/// Test-only RSA key pairs (private, public), from `tests/keys`.
const KEY_A: (&str, &str) = (include_str!("keys/rsa-a.pem"), include_str!("keys/rsa-a.pub.pem"));
const KEY_B: (&str, &str) = (include_str!("keys/rsa-b.pem"), include_str!("keys/rsa-b.pub.pem"));

/// An RS256 token for `sub`, valid for an hour, signed with `private_pem`.
fn rs256_token(private_pem: &str, sub: &str) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let exp = wardroom::protocol::now_ms() / 1000 + 3600;
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).expect("a test key");
    encode(&Header::new(Algorithm::RS256), &json!({"sub": sub, "exp": exp}), &key).expect("sign")
}

/// Whether a client connecting with `token` gets a `welcome` (else it must
/// be refused as `unauthorized`).
async fn signs_in(server: &TestServer, token: &str) -> bool {
    let mut client = Client::connect_any(&format!("ws://{}/ws?token={token}", server.addr)).await;
    let first = client.recv().await;
    match first["type"].as_str() {
        Some("welcome") => true,
        Some("error") if first["code"] == "unauthorized" => false,
        _ => panic!("unexpected first frame {first}"),
    }
}

/// A config whose `[auth] jwt_public_key` is `key.pem` beside it, holding
/// `public_pem`.
fn with_public_key(public_pem: &str, watch: bool) -> TempConfig {
    let file = TempConfig::new("");
    let key = file.dir.join("key.pem");
    std::fs::write(&key, public_pem).expect("write the public key");
    file.write_in_place(&format!(
        "[admin]\ntoken = \"test-token\"\n\n[auth]\njwt_public_key = {key:?}\n\n[reload]\nwatch = {watch}\n"
    ));
    file
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_reload_rereads_a_rotated_public_key() {
    let file = with_public_key(KEY_A.1, false);
    let server = TestServer::with_file(&file.path).await;
    let (old, new) = (rs256_token(KEY_A.0, "u-1"), rs256_token(KEY_B.0, "u-1"));
    assert!(signs_in(&server, &old).await);
    assert!(!signs_in(&server, &new).await);

    // Rotate the key; the config text stays the same.
    std::fs::write(file.dir.join("key.pem"), KEY_B.1).expect("rotate the key");
    assert!(!signs_in(&server, &new).await, "nothing is watched: the old key runs until a reload");
    let (code, body) = http_request(server.addr, "POST", "/admin/reload", TOKEN).await;
    assert_eq!(code, 200, "{body}");
    let report: Value = serde_json::from_str(&body).expect("status is JSON");
    assert_eq!(report["outcome"], "applied", "{report}");
    assert!(signs_in(&server, &new).await, "a token signed with the new key is accepted");
    assert!(!signs_in(&server, &old).await, "a token signed with the old key is refused");

    // A second reload finds nothing new.
    let (_, body) = http_request(server.addr, "POST", "/admin/reload", TOKEN).await;
    assert_eq!(serde_json::from_str::<Value>(&body).expect("JSON")["outcome"], "unchanged", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_public_key_applies_within_a_second_when_watched() {
    let file = with_public_key(KEY_A.1, true);
    let server = TestServer::with_file(&file.path).await;
    let (old, new) = (rs256_token(KEY_A.0, "u-1"), rs256_token(KEY_B.0, "u-1"));
    assert!(!signs_in(&server, &new).await);
    std::fs::write(file.dir.join("key.pem"), KEY_B.1).expect("rotate the key");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while !signs_in(&server, &new).await {
        assert!(tokio::time::Instant::now() < deadline, "the new key was not used within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!signs_in(&server, &old).await);
}

/// Saves `text` in `dir/name` as `sed -i` does: a new file renamed over it.
fn save_by_rename(dir: &std::path::Path, name: &str, text: &str) {
    let temp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&temp, text).expect("write temp file");
    std::fs::rename(&temp, dir.join(name)).expect("rename over");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configmap_style_symlink_swap_and_an_edit_of_its_target_apply_within_a_second() {
    use std::os::unix::fs::symlink;
    // Kubernetes' layout: config.toml -> ..data/config.toml, ..data -> v1.
    let file = TempConfig::new("");
    std::fs::remove_file(&file.path).expect("remove the plain file");
    let (v1, v2) = (file.dir.join("v1"), file.dir.join("v2"));
    std::fs::create_dir(&v1).expect("v1");
    std::fs::write(v1.join("config.toml"), file.with_store(&policy(&["fuck"]))).expect("write v1");
    symlink("v1", file.dir.join("..data")).expect("..data");
    symlink("..data/config.toml", &file.path).expect("config.toml");
    let server = TestServer::with_file(&file.path).await;
    let mut client = server.client("Alice").await;
    client.join("lobby").await;
    assert!(!refused(&mut client, "darn").await);

    // An update: a new version, then ..data swapped by a rename, then the
    // old version deleted.
    std::fs::create_dir(&v2).expect("v2");
    std::fs::write(v2.join("config.toml"), file.with_store(&policy(&["fuck", "darn"]))).expect("write v2");
    symlink("v2", file.dir.join("..data_tmp")).expect("..data_tmp");
    std::fs::rename(file.dir.join("..data_tmp"), file.dir.join("..data")).expect("swap ..data");
    std::fs::remove_dir_all(&v1).expect("remove v1");
    becomes_refused(&mut client, "darn").await;

    // The file the links now lead to, edited as `sed -i` does, then in place.
    save_by_rename(&v2, "config.toml", &file.with_store(&policy(&["fuck", "darn", "heck"])));
    becomes_refused(&mut client, "heck").await;
    std::fs::write(v2.join("config.toml"), file.with_store(&policy(&["fuck", "darn", "heck", "drat"]))).expect("edit");
    becomes_refused(&mut client, "drat").await;
    assert_eq!(status(&server).await["outcome"], "applied");
}

/// The log lines at `DEBUG` among those arriving within `within`.
fn debug_lines(lines: &std::sync::mpsc::Receiver<String>, within: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    let mut found = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        let Ok(line) = lines.recv_timeout(left) else { break };
        let json: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if json["level"] == "DEBUG" {
            found.push(line);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raising_the_log_level_in_the_config_shows_debug_lines() {
    let config =
        |level: &str| format!("[server]\nbind = \"127.0.0.1:0\"\n\n[log]\nformat = \"json\"\nlevel = {level:?}\n");
    let file = TempConfig::new(&config("info"));
    let (server, lines) = support::process::ServerProcess::start_with_log(env!("CARGO_BIN_EXE_wardroom"), &file.path);
    // A connection logs `connected` at debug.
    support::Client::connect(&server.ws_url("nick=Before")).await.close().await;
    let before = tokio::task::block_in_place(|| debug_lines(&lines, Duration::from_millis(300)));
    assert!(before.is_empty(), "debug lines at level info: {before:?}");

    file.save_by_rename(&config("wardroom=debug"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        support::Client::connect(&server.ws_url("nick=After")).await.close().await;
        let seen = tokio::task::block_in_place(|| debug_lines(&lines, Duration::from_millis(100)));
        if seen.iter().any(|line| line.contains("\"connected\"")) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no debug line within 2 s of raising the level");
    }
    assert!(server.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_format_change_is_reported_as_needing_a_restart() {
    let (file, server, mut client) = started(&["fuck"]).await;
    file.save_by_rename(&format!("[log]\nformat = \"json\"\nlevel = \"debug\"\n\n{}", policy(&["fuck", "darn"])));
    darn_becomes_refused(&mut client).await;
    let report = status(&server).await;
    assert_eq!(report["outcome"], "applied");
    assert_eq!(report["restart_required"], json!(["log.format"]), "the level applies, the format does not");
}
