//! Several Wardroom nodes as one chat server, against the real Redis
//! (`redis://127.0.0.1:6379`, another with `WARDROOM_TEST_REDIS`) and the
//! real PostgreSQL (`support/pg.rs`). Each test runs its own cluster: its
//! own Redis prefix (keys removed at the end) and its own database schema.
//! If either server cannot be reached the test fails, saying which.
//!
//! Nodes are in-process servers on port 0, except the one killed with
//! SIGKILL, which is a `wardroom` process. Clients are real WebSocket
//! clients; the broker cut is a TCP proxy between a node and Redis.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::pg::Pg;
use support::process::ServerProcess;
use support::raw::{RawClient, http_get, http_request, masked_frame};
use support::{Client, TempConfig, TestServer, eventually};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

const SECRET: &str = "cluster-secret";

/// Long enough for a heartbeat to lapse and a reconnection with backoff.
const CLUSTER_PATIENCE: Duration = Duration::from_secs(20);

fn redis_url() -> String {
    std::env::var("WARDROOM_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// One test's namespace on the real Redis, emptied at the end.
struct Broker {
    url: String,
    prefix: String,
}

impl Broker {
    fn new() -> Broker {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let url = redis_url();
        let reachable = redis::Client::open(url.as_str())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
        if let Err(e) = reachable {
            panic!(
                "Redis is not reachable at {url} ({e}): these tests need the real server \
                 (.ci/run starts it; set WARDROOM_TEST_REDIS for another)"
            );
        }
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let prefix = format!("wrtest-{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        Broker { url, prefix }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let Ok(mut redis) =
            redis::Client::open(self.url.as_str()).and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
        else {
            return;
        };
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{}:*", self.prefix)).query(&mut redis).unwrap_or_default();
        if !keys.is_empty() {
            let _ = redis::cmd("DEL").arg(keys).query::<()>(&mut redis);
        }
    }
}

/// A cluster's shared services: one schema, one Redis prefix.
struct Cluster {
    pg: Pg,
    broker: Broker,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster { broker: Broker::new(), pg: Pg::new() }
    }

    /// A node's config: `extra`, then the shared store and the cluster
    /// through `broker`.
    fn toml_via(&self, extra: &str, broker: &str) -> String {
        format!(
            "{extra}\n[store]\nurl = {:?}\n\n[cluster]\nbroker = {broker:?}\nprefix = {:?}\n",
            self.pg.url(),
            self.broker.prefix
        )
    }

    fn toml(&self, extra: &str) -> String {
        self.toml_via(extra, &self.broker.url)
    }

    /// A node in this process, once it is ready.
    async fn node(&self, extra: &str) -> TestServer {
        let node = TestServer::with_toml(&self.toml(extra)).await;
        ready(node.addr).await;
        node
    }
}

/// Waits for `/readyz` to answer 200.
async fn ready(addr: SocketAddr) {
    eventually(CLUSTER_PATIENCE, || async { (http_get(addr, "/readyz").await.0 == 200).then_some(()) })
        .await
        .unwrap_or_else(|| panic!("node {addr} did not become ready"));
}

fn token(sub: &str, name: &str) -> String {
    let exp = (wardroom::protocol::now_ms() / 1000) as i64 + 3600;
    let claims = json!({"sub": sub, "name": name, "exp": exp});
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).expect("sign")
}

async fn user(addr: SocketAddr, sub: &str, name: &str) -> Client {
    Client::connect(&format!("ws://{addr}/ws?token={}", token(sub, name))).await
}

/// Reads frames until one matches `wanted`; an `error` fails unless wanted.
async fn until(client: &mut Client, what: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    loop {
        let frame = client.recv().await;
        if wanted(&frame) {
            return frame;
        }
        assert_ne!(frame["type"], "error", "waiting for {what}: {frame}");
    }
}

async fn until_type(client: &mut Client, kind: &str) -> Value {
    until(client, kind, |f| f["type"] == kind).await
}

async fn until_presence(client: &mut Client, event: &str, nick: &str) -> Value {
    until(client, &format!("{nick} {event}"), |f| {
        f["type"] == "presence" && f["event"] == event && f["user"]["nick"] == nick
    })
    .await
}

/// Sends a request with a `ref` and returns the frame answering it.
async fn request(client: &mut Client, mut frame: Value) -> Value {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let reference = format!("q{}", NEXT.fetch_add(1, Ordering::Relaxed));
    frame["ref"] = json!(reference);
    client.send(frame).await;
    loop {
        let answer = client.recv().await;
        if answer["ref"] == reference.as_str() {
            return answer;
        }
    }
}

async fn post(client: &mut Client, room: &str, content: &str) -> Value {
    request(client, json!({"type": "message", "room": room, "content": content})).await
}

async fn history(client: &mut Client, room: &str) -> Vec<(u64, String)> {
    let page = request(client, json!({"type": "history", "room": room})).await;
    assert_eq!(page["type"], "history", "{page}");
    page["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| (m["id"].as_u64().expect("id"), m["content"].as_str().expect("content").to_owned()))
        .collect()
}

/// Posts `content` to `lobby` until the answer is `wanted` (for at most
/// [`CLUSTER_PATIENCE`]).
async fn post_until(client: &mut Client, content: &str, wanted: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + CLUSTER_PATIENCE;
    loop {
        let answer = post(client, "lobby", content).await;
        if wanted(&answer) {
            return answer;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {answer} after {CLUSTER_PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn nicks(joined: &Value) -> BTreeSet<String> {
    joined["members"].as_array().expect("members").iter().map(|m| m["nick"].as_str().unwrap_or("").to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_two_nodes_see_every_message_in_one_order() {
    const PER_CLIENT: usize = 25;
    let cluster = Cluster::new();
    let (a, b) = (cluster.node("").await, cluster.node("").await);
    let mut clients = vec![a.client("ann").await, a.client("amy").await, b.client("bob").await, b.client("bea").await];
    for client in &mut clients {
        client.join("lobby").await;
    }
    let total = PER_CLIENT * clients.len();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(n, mut client)| {
            tokio::spawn(async move {
                for i in 0..PER_CLIENT {
                    let content = format!("c{n}-{i:02}");
                    client.send(json!({"type": "message", "room": "lobby", "content": content, "ref": i})).await;
                }
                let (mut seen, mut acks) = (Vec::new(), 0);
                while seen.len() < total || acks < PER_CLIENT {
                    let frame = client.recv().await;
                    match frame["type"].as_str() {
                        Some("message") => seen.push((
                            frame["id"].as_u64().expect("id"),
                            frame["content"].as_str().unwrap_or("").to_owned(),
                        )),
                        Some("ack") => acks += 1,
                        Some("error") => panic!("client {n}: {frame}"),
                        _ => {}
                    }
                }
                seen
            })
        })
        .collect();
    let mut orders = Vec::new();
    for task in tasks {
        orders.push(task.await.expect("client task"));
    }
    let first = &orders[0];
    assert_eq!(first.len(), total);
    assert!(first.windows(2).all(|w| w[0].0 < w[1].0), "ids increase: {first:?}");
    let contents: BTreeSet<&str> = first.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(contents.len(), total, "every message once");
    for n in 0..4 {
        let own: Vec<&str> =
            first.iter().map(|(_, c)| c.as_str()).filter(|c| c.starts_with(&format!("c{n}-"))).collect();
        assert!(own.windows(2).all(|w| w[0] < w[1]), "a sender's messages keep their order: {own:?}");
    }
    for (n, order) in orders.iter().enumerate() {
        assert_eq!(order, first, "client {n} saw another order");
    }
}

/// In a cluster a message's echo comes back from the broker, and its ack
/// waits for both the commit and the echo: a client pipelining messages with
/// a small queue, with and without `ref`s, still gets every echo and ack and
/// is not closed as a slow consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pipelining_messages_with_a_small_queue_gets_every_echo_and_ack() {
    let cluster = Cluster::new();
    let node = cluster.node("[limits]\noutbound_queue = 16\n").await;
    let mut acked = node.client("acked").await;
    acked.join("acked").await;
    acked.pipeline_and_read_everything("acked", 500, true).await;
    let mut unacked = node.client("unacked").await;
    unacked.join("unacked").await;
    unacked.pipeline_and_read_everything("unacked", 500, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_history_agree_on_every_node() {
    let admin = "[admin]\ntoken = \"admin-token\"\n";
    let cluster = Cluster::new();
    let (a, b) = (cluster.node(admin).await, cluster.node(admin).await);
    let mut ann = a.client("ann").await;
    ann.join("hall").await;
    let mut bob = b.client("bob").await;
    bob.join("hall").await;
    until_presence(&mut ann, "join", "bob").await;
    let mut cat = a.client("cat").await;
    cat.join("hall").await;
    let mut dan = b.client("dan").await;
    dan.join("hall").await;
    until_presence(&mut ann, "join", "dan").await;
    until_presence(&mut bob, "join", "cat").await;

    // Newcomers on either node see the same members.
    let mut eve = a.client("eve").await;
    let on_a = eve.join("hall").await;
    let mut fay = b.client("fay").await;
    let on_b = fay.join("hall").await;
    let others =
        |joined: &Value| nicks(joined).into_iter().filter(|n| n != "eve" && n != "fay").collect::<BTreeSet<_>>();
    let everyone: BTreeSet<String> = ["ann", "bob", "cat", "dan"].map(String::from).into();
    assert_eq!(others(&on_a), everyone, "{on_a}");
    assert_eq!(others(&on_b), everyone, "{on_b}");
    assert!(on_a["member_count"].as_u64() >= Some(5), "{on_a}");

    // A nickname change and a departure on one node reach the other.
    let renamed = request(&mut ann, json!({"type": "nick", "nick": "anna"})).await;
    assert_eq!(renamed["type"], "renamed", "{renamed}");
    let nick = until_presence(&mut bob, "nick", "anna").await;
    assert_eq!(nick["previous"], "ann");
    dan.close().await;
    until_presence(&mut cat, "leave", "dan").await;

    // History is the same from either node.
    for (client, text) in [(&mut ann, "one"), (&mut bob, "two"), (&mut cat, "three")] {
        let ack = post(client, "hall", text).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let from_a = history(&mut eve, "hall").await;
    let from_b = history(&mut fay, "hall").await;
    let texts: Vec<&str> = from_a.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(texts, ["one", "two", "three"]);
    assert_eq!(from_a, from_b);

    // A third node started now learns the members from Redis, and has the
    // same history.
    let c = cluster.node("").await;
    let mut gil = c.client("gil").await;
    let joined = gil.join("hall").await;
    let expected: BTreeSet<String> = ["anna", "bob", "cat", "eve", "fay", "gil"].map(String::from).into();
    assert_eq!(nicks(&joined), expected, "{joined}");
    assert_eq!(joined["member_count"], 6);
    assert_eq!(history(&mut gil, "hall").await, from_a);
    until_presence(&mut ann, "join", "gil").await;
    // The admin API of any node lists the members of every node.
    let (status, body) = http_request(a.addr, "GET", "/admin/rooms", "Authorization: Bearer admin-token\r\n").await;
    assert_eq!(status, 200, "{body}");
    let rooms: Value = serde_json::from_str(&body).expect("JSON");
    let hall = rooms.as_array().and_then(|r| r.iter().find(|r| r["room"] == "hall")).expect("hall is listed");
    assert_eq!(hall["member_count"], 6, "{hall}");
}

const MODERATED: &str = r#"
[auth]
jwt_secret = "cluster-secret"
roles = { "mod-1" = ["moderator"] }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_on_one_node_applies_on_the_other() {
    let cluster = Cluster::new();
    let (a, b) = (cluster.node(MODERATED).await, cluster.node(MODERATED).await);
    let mut moderator = user(a.addr, "mod-1", "Sentinel").await;
    moderator.join("lobby").await;
    let mut uma = user(b.addr, "u-1", "Uma").await;
    uma.join("lobby").await;
    until_presence(&mut moderator, "join", "Uma").await;

    // A mute on A silences Uma on B, and lifting it lets her speak.
    let done = request(&mut moderator, json!({"type": "mute", "user": "u-1", "duration": 3600})).await;
    assert_eq!(done["type"], "done", "{done}");
    until_type(&mut uma, "muted").await;
    let refused = post(&mut uma, "lobby", "hello?").await;
    assert_eq!(refused["code"], "muted", "{refused}");
    let done = request(&mut moderator, json!({"type": "unmute", "user": "u-1"})).await;
    assert_eq!(done["type"], "done", "{done}");
    until_type(&mut uma, "unmuted").await;

    // A deletion on A reaches B's members and B's history.
    let ack = post(&mut uma, "lobby", "oops").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let id = ack["id"].as_u64().expect("id");
    let done = request(&mut moderator, json!({"type": "delete", "room": "lobby", "id": id})).await;
    assert_eq!(done["type"], "done", "{done}");
    let deleted = until_type(&mut uma, "deleted").await;
    assert_eq!(deleted["id"], id);
    assert!(history(&mut uma, "lobby").await.iter().all(|(i, _)| *i != id), "deleted from B's history");

    // Slow mode set on A holds on B.
    request(&mut moderator, json!({"type": "slow_mode", "room": "lobby", "seconds": 60})).await;
    let settings = until_type(&mut uma, "room").await;
    assert_eq!(settings["slow_mode"], 60);
    assert_eq!(post(&mut uma, "lobby", "first").await["type"], "ack");
    let refused = post(&mut uma, "lobby", "second").await;
    assert_eq!(refused["code"], "slow_mode", "{refused}");
    request(&mut moderator, json!({"type": "slow_mode", "room": "lobby", "seconds": 0})).await;
    until(&mut uma, "slow mode off", |f| f["type"] == "room" && f["slow_mode"] == 0).await;

    // A lock on A makes the room read-only on B.
    request(&mut moderator, json!({"type": "lock", "room": "lobby"})).await;
    until(&mut uma, "lock", |f| f["type"] == "room" && f["locked"] == true).await;
    let refused = post(&mut uma, "lobby", "anyone?").await;
    assert_eq!(refused["code"], "room_locked", "{refused}");
    request(&mut moderator, json!({"type": "unlock", "room": "lobby"})).await;
    until(&mut uma, "unlock", |f| f["type"] == "room" && f["locked"] == false).await;

    // A kick on A closes a guest connected to B.
    let mut gus = b.client("Gus").await;
    let gus_id = gus.welcome["user"]["id"].as_str().expect("id").to_owned();
    gus.join("lobby").await;
    until_presence(&mut moderator, "join", "Gus").await;
    let done = request(&mut moderator, json!({"type": "kick", "user": gus_id})).await;
    assert_eq!(done["type"], "done", "{done}");
    let (code, reason) = gus.expect_close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("kicked"), "{reason}");

    // A ban on A disconnects Val on B and keeps her out of both nodes.
    let mut val = user(b.addr, "u-2", "Val").await;
    val.join("lobby").await;
    until_presence(&mut moderator, "join", "Val").await;
    let done = request(&mut moderator, json!({"type": "ban", "user": "u-2", "reason": "spam"})).await;
    assert_eq!(done["type"], "done", "{done}");
    let (code, reason) = val.expect_close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("banned"), "{reason}");
    for node in [&a, &b] {
        let mut again = Client::connect_any(&format!("ws://{}/ws?token={}", node.addr, token("u-2", "Val"))).await;
        let refused = again.recv().await;
        assert_eq!(refused["code"], "banned", "{}: {refused}", node.addr);
        assert_eq!(again.expect_close().await.0, 1008);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strikes_are_counted_once_for_a_user_on_two_nodes() {
    let config = r#"
[auth]
jwt_secret = "cluster-secret"

[moderation]
ladder = [{ strikes = 3, action = "mute", duration = "1h" }]

[[filters]]
kind = "profanity"
words = ["darn"]
"#;
    let cluster = Cluster::new();
    let (a, b) = (cluster.node(config).await, cluster.node(config).await);
    let mut on_a = user(a.addr, "u-5", "Sam").await;
    let mut on_b = user(b.addr, "u-5", "Sam").await;
    on_a.join("lobby").await;
    on_b.join("lobby").await;
    // Two strikes on A and one on B: three for the user, once.
    for on_a_now in [true, false, true] {
        let client = if on_a_now { &mut on_a } else { &mut on_b };
        let refused = post(client, "lobby", "darn it").await;
        assert_eq!(refused["code"], "profanity", "{refused}");
    }
    until_type(&mut on_a, "muted").await;
    until_type(&mut on_b, "muted").await;
    for client in [&mut on_a, &mut on_b] {
        let refused = post(client, "lobby", "hello").await;
        assert_eq!(refused["code"], "muted", "{refused}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_on_two_nodes_gets_at_most_each_nodes_rate_limit() {
    // Each node limits the messages it accepts; a user on two nodes gets
    // at most the sum (the documented bound), never more.
    const BURST: usize = 5;
    let config = format!(
        "[auth]\njwt_secret = \"cluster-secret\"\n\n[[filters]]\nkind = \"rate\"\nper_user = {{ per_minute = 1, burst = {BURST} }}\nstrikes = 0\n"
    );
    let cluster = Cluster::new();
    let (a, b) = (cluster.node(&config).await, cluster.node(&config).await);
    let mut on_a = user(a.addr, "u-7", "Rae").await;
    let mut on_b = user(b.addr, "u-7", "Rae").await;
    on_a.join("lobby").await;
    on_b.join("lobby").await;
    let mut accepted = [0; 2];
    for round in 0..3 * BURST {
        for (n, client) in [&mut on_a, &mut on_b].into_iter().enumerate() {
            let answer = post(client, "lobby", &format!("m{n}-{round}")).await;
            match answer["type"].as_str() {
                Some("ack") => accepted[n] += 1,
                _ => assert_eq!(answer["code"], "rate_limited", "{answer}"),
            }
        }
    }
    assert_eq!(accepted, [BURST, BURST], "each node accepts its own burst, and no more");
}

/// A TCP proxy to Redis that the test can cut (every connection dropped,
/// new ones refused) and restore.
struct Proxy {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    accept: AbortHandle,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let cut = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let (cut_flag, open) = (cut.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { continue };
                if cut_flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let relay = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                open.lock().expect("proxy connections").push(relay.abort_handle());
            }
        })
        .abort_handle();
        Proxy { addr, cut, connections, accept }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for relay in self.connections.lock().expect("proxy connections").drain(..) {
            relay.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

fn redis_addr() -> SocketAddr {
    let url = redis_url();
    let host_port = url.trim_start_matches("redis://").split('/').next().unwrap_or("127.0.0.1:6379").to_owned();
    let host_port = host_port.rsplit('@').next().unwrap_or("127.0.0.1:6379").to_owned();
    let host_port = if host_port.contains(':') { host_port } else { format!("{host_port}:6379") };
    std::net::ToSocketAddrs::to_socket_addrs(&host_port)
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("cannot resolve the Redis address in {url}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_the_broker_keeps_its_clients_and_catches_up() {
    let cluster = Cluster::new();
    let proxy = Proxy::start(redis_addr()).await;
    let a = TestServer::with_toml(&cluster.toml_via(MODERATED, &format!("redis://{}", proxy.addr))).await;
    ready(a.addr).await;
    let b = cluster.node(MODERATED).await;
    let mut ann = a.client("ann").await;
    ann.join("lobby").await;
    let mut ivy = user(a.addr, "u-9", "Ivy").await;
    let mut moderator = user(b.addr, "mod-1", "Sentinel").await;
    let mut bob = b.client("bob").await;
    bob.join("lobby").await;
    until_presence(&mut ann, "join", "bob").await;
    post(&mut bob, "lobby", "before").await;
    until(&mut ann, "before", |f| f["content"] == "before").await;

    proxy.cut();
    let unready = eventually(CLUSTER_PATIENCE, || async {
        let (status, body) = http_get(a.addr, "/readyz").await;
        (status == 503).then_some(body)
    })
    .await
    .expect("the cut-off node reports itself not ready");
    assert_eq!(unready.trim(), "cluster broker unreachable");
    let metrics = http_get(a.addr, "/metrics").await.1;
    assert!(metrics.contains("\nwardroom_cluster_broker_connected 0\n"), "{metrics}");
    let refused = post(&mut ann, "lobby", "lost?").await;
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    assert!(refused["retry_after_ms"].as_u64().is_some(), "{refused}");
    // Nicknames come from the broker too: changing one waits for it.
    let refused = request(&mut ann, json!({"type": "nick", "nick": "annie"})).await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    // The other node carries on meanwhile, moderation included.
    for text in ["during-1", "during-2"] {
        assert_eq!(post(&mut bob, "lobby", text).await["type"], "ack");
    }
    let done = request(&mut moderator, json!({"type": "mute", "user": "u-9", "duration": 3600})).await;
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(http_get(b.addr, "/readyz").await.0, 200);

    proxy.restore();
    ready(a.addr).await;
    let metrics = http_get(a.addr, "/metrics").await.1;
    assert!(metrics.contains("\nwardroom_cluster_broker_connected 1\n"), "{metrics}");
    // Ann's connection stayed open: she posts again, and both sides see it.
    post_until(&mut ann, "after", |answer| answer["type"] == "ack").await;
    until(&mut bob, "after", |f| f["content"] == "after").await;
    post(&mut bob, "lobby", "welcome back").await;
    until(&mut ann, "welcome back", |f| f["content"] == "welcome back").await;
    // The mute decided meanwhile holds here too.
    until_type(&mut ivy, "muted").await;
    ivy.join("lobby").await;
    assert_eq!(post(&mut ivy, "lobby", "hi").await["code"], "muted");
    // What was said meanwhile is in history.
    let texts: Vec<String> = history(&mut ann, "lobby").await.into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["before", "during-1", "during-2", "after", "welcome back"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_traffic_takes_only_its_own_connections() {
    let cluster = Cluster::new();
    let file = TempConfig::new(&cluster.toml("[server]\nbind = \"127.0.0.1:0\"\n\n[log]\nformat = \"json\"\n"));
    let a = ServerProcess::start(env!("CARGO_BIN_EXE_wardroom"), &file.path);
    ready(a.addr).await;
    let b = cluster.node("").await;
    let mut a1 = Client::connect(&a.ws_url("nick=ada")).await;
    let mut a2 = Client::connect(&a.ws_url("nick=abe")).await;
    let mut b1 = b.client("ben").await;
    let mut b2 = b.client("bea").await;
    for client in [&mut b1, &mut b2, &mut a1, &mut a2] {
        client.join("lobby").await;
    }
    until_presence(&mut b2, "join", "ada").await;
    until_presence(&mut b2, "join", "abe").await;

    // Traffic from both nodes, and A dies while B's goes on.
    for i in 0..20 {
        a1.send(json!({"type": "message", "room": "lobby", "content": format!("a-{i}")})).await;
    }
    let talker = tokio::spawn(async move {
        for i in 0..30 {
            let ack = post(&mut b1, "lobby", &format!("b-{i}")).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        b1
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.kill_9();
    let mut b1 = talker.await.expect("B's traffic goes on");
    // A's clients lose their connections; B's keep theirs and their room.
    for client in [&mut a1, &mut a2] {
        while client.next_message().await.is_some() {}
    }
    for client in [&mut b1, &mut b2] {
        let mut gone = BTreeSet::new();
        while gone.len() < 2 {
            let leave =
                until(client, "A's members leaving", |f| f["type"] == "presence" && f["event"] == "leave").await;
            gone.insert(leave["user"]["nick"].as_str().unwrap_or("").to_owned());
        }
        assert_eq!(gone, ["abe", "ada"].map(String::from).into());
    }
    assert_eq!(http_get(b.addr, "/readyz").await.0, 200);
    for i in 0..5 {
        let ack = post(&mut b1, "lobby", &format!("after-{i}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    until(&mut b2, "after-4", |f| f["content"] == "after-4").await;
    let joined = b.client("cal").await.join("lobby").await;
    assert_eq!(nicks(&joined), ["bea", "ben", "cal"].map(String::from).into(), "{joined}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_reload_on_one_node_reaches_the_others() {
    let cluster = Cluster::new();
    let base = "[reload]\nwatch = false\n\n[admin]\ntoken = \"admin-token\"\n";
    let file = TempConfig::new(&cluster.toml(base));
    let a = TestServer::with_file(&file.path).await;
    let b = TestServer::with_file(&file.path).await;
    ready(a.addr).await;
    ready(b.addr).await;
    let mut bob = b.client("bob").await;
    bob.join("lobby").await;
    assert_eq!(post(&mut bob, "lobby", "zebra").await["type"], "ack");

    file.write_in_place(&cluster.toml(&format!("{base}\n[[filters]]\nkind = \"profanity\"\nwords = [\"zebra\"]\n")));
    let (status, body) = http_request(a.addr, "POST", "/admin/reload", "Authorization: Bearer admin-token\r\n").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("applied"), "{body}");
    // B was not asked; it reloads because A said so.
    let refused = post_until(&mut bob, "zebra", |answer| answer["type"] == "error").await;
    assert_eq!(refused["code"], "profanity", "{refused}");

    // B's reload is announced back to A, which finds nothing new: wait for
    // it, or it could read the next file before the request below does.
    eventually(CLUSTER_PATIENCE, || async {
        let metrics = http_get(a.addr, "/metrics").await.1;
        metrics.contains("wardroom_config_reloads_total{outcome=\"unchanged\"} 1\n").then_some(())
    })
    .await
    .expect("A hears of B's reload");

    // `[cluster]` is read at start-up: a reload that changes it says so and
    // keeps the node in its cluster.
    let moved = cluster.toml(base).replace(&cluster.broker.prefix, "elsewhere");
    file.write_in_place(&moved);
    let (status, body) = http_request(a.addr, "POST", "/admin/reload", "Authorization: Bearer admin-token\r\n").await;
    assert_eq!(status, 200, "{body}");
    let reload: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(reload["outcome"], "applied", "{reload}");
    assert!(reload["restart_required"].as_array().is_some_and(|keys| keys.contains(&json!("cluster"))), "{reload}");
    let mut ann = a.client("ann").await;
    ann.join("lobby").await;
    assert_eq!(post(&mut ann, "lobby", "still here").await["type"], "ack");
    until(&mut bob, "a message from A", |f| f["content"] == "still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_posts_to_a_room_get_distinct_ids() {
    let cluster = Cluster::new();
    let (a, b) = (cluster.node("").await, cluster.node("").await);
    let mut ann = a.client("ann").await;
    let mut bob = b.client("bob").await;
    for round in 0..5 {
        let room = format!("fresh-{round}");
        for client in [&mut ann, &mut bob] {
            // The other's message of the last round may come after one's own ack.
            client.send(json!({"type": "join", "room": room})).await;
            until_type(client, "joined").await;
        }
        let (first, second) = tokio::join!(post(&mut ann, &room, "from a"), post(&mut bob, &room, "from b"));
        let ids: BTreeSet<u64> =
            [&first, &second].iter().map(|ack| ack["id"].as_u64().expect("an ack with an id")).collect();
        assert_eq!(ids, [1, 2].into(), "{first} {second}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_opened_during_traffic_misses_no_message() {
    const OPENINGS: usize = 30;
    let cluster = Cluster::new();
    // Bob joins and leaves 30 times: more than the default request budget.
    let unlimited = "[limits]\nrequests_per_minute = 0\n";
    let (a, b) = (cluster.node("").await, cluster.node(unlimited).await);
    let mut ann = a.client("ann").await;
    ann.join("busy").await;
    let stop = Arc::new(AtomicBool::new(false));
    let sending = stop.clone();
    let sender = tokio::spawn(async move {
        let mut i = 0;
        while !sending.load(Ordering::Relaxed) {
            ann.send(json!({"type": "message", "room": "busy", "content": format!("m{i}")})).await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ann
    });
    // Bob is the only member on B: each join opens the room on B while
    // A's messages are on their way to the store, each leave closes it.
    let mut bob = b.client("bob").await;
    for opening in 0..OPENINGS {
        let joined = bob.join("busy").await;
        let history: Vec<u64> =
            joined["history"].as_array().expect("history").iter().filter_map(|m| m["id"].as_u64()).collect();
        let next = until_type(&mut bob, "message").await["id"].as_u64().expect("id");
        if let Some(last) = history.last() {
            assert_eq!(next, last + 1, "opening {opening}: joined ends at {last}, then {next} arrives");
        }
        let left = request(&mut bob, json!({"type": "leave", "room": "busy"})).await;
        assert_eq!(left["type"], "left", "{left}");
    }
    stop.store(true, Ordering::Relaxed);
    sender.await.expect("sender");
}

/// Sends `nick` and returns the answer (`renamed` or `error`).
async fn rename(client: &mut Client, nick: &str) -> Value {
    request(client, json!({"type": "nick", "nick": nick})).await
}

/// Connects a guest asking for `nick` until it gets it (for at most
/// [`CLUSTER_PATIENCE`]); every refusal must be the `nick_taken` fallback.
async fn connect_until_named(url: &str, nick: &str) -> Client {
    let deadline = tokio::time::Instant::now() + CLUSTER_PATIENCE;
    loop {
        let mut client = Client::connect(url).await;
        if client.nick() == nick {
            return client;
        }
        assert!(client.nick().starts_with("guest-"), "{}", client.welcome);
        let error = client.recv().await;
        assert_eq!(error["code"], "nick_taken", "{error}");
        assert!(tokio::time::Instant::now() < deadline, "{nick:?} still taken after {CLUSTER_PATIENCE:?}");
        client.close().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_before_the_welcome_wait_for_it() {
    let cluster = Cluster::new();
    let a = cluster.node("").await;
    // The join and the message travel with the upgrade request itself, so the
    // node has them before the broker has confirmed the nickname.
    let mut early = masked_frame(true, 1, br#"{"type":"join","room":"lobby"}"#);
    early.extend(masked_frame(true, 1, br#"{"type":"message","room":"lobby","content":"first","ref":1}"#));
    let mut eager = RawClient::connect_pipelined(a.addr, "/ws?nick=eager", &early).await;
    let kinds: Vec<String> = [eager.recv().await, eager.recv().await, eager.recv().await, eager.recv().await]
        .iter()
        .map(|frame| {
            assert_ne!(frame["type"], "error", "{frame}");
            frame["type"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    assert_eq!(kinds[..2], ["welcome", "joined"], "{kinds:?}");
    assert!(kinds.contains(&"message".to_owned()) && kinds.contains(&"ack".to_owned()), "{kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nickname_is_unique_across_nodes() {
    let cluster = Cluster::new();
    let (a, b) = (cluster.node("").await, cluster.node("").await);
    let mut ann = a.client("ann").await;
    assert_eq!(ann.nick(), "ann");

    // Held on A, in any case: at connect, B falls back as one node does.
    let mut other = Client::connect(&b.ws_url(Some("ANN"))).await;
    assert!(other.nick().starts_with("guest-"), "{}", other.welcome);
    let error = other.recv().await;
    assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("error"), Some("nick_taken")), "{error}");
    // And a nickname change on B is refused.
    let refused = rename(&mut other, "Ann").await;
    assert_eq!(refused["code"], "nick_taken", "{refused}");
    assert!(refused["message"].as_str().is_some_and(|m| m.contains("\"Ann\"")), "{refused}");

    // The other way round, with a nickname taken by a change.
    let renamed = rename(&mut other, "bob").await;
    assert_eq!(renamed["type"], "renamed", "{renamed}");
    assert_eq!(renamed["user"]["nick"], "bob", "{renamed}");
    assert_eq!(rename(&mut ann, "BOB").await["code"], "nick_taken");

    // Released on A's disconnect: B gets it.
    ann.close().await;
    let deadline = tokio::time::Instant::now() + CLUSTER_PATIENCE;
    loop {
        let answer = rename(&mut other, "Ann").await;
        if answer["type"] == "renamed" {
            assert_eq!(answer["previous"], "bob", "{answer}");
            break;
        }
        assert_eq!(answer["code"], "nick_taken", "{answer}");
        assert!(tokio::time::Instant::now() < deadline, "\"ann\" still taken after {CLUSTER_PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Now held on B: refused on A; and "bob", released by the change, is free.
    let mut late = Client::connect(&a.ws_url(Some("ann"))).await;
    assert!(late.nick().starts_with("guest-"), "{}", late.welcome);
    assert_eq!(late.recv().await["code"], "nick_taken");
    // (Ann's refused claim of "BOB" left nothing reserved on A.)
    let bob = connect_until_named(&a.ws_url(Some("BOB")), "BOB").await;
    assert_eq!(bob.nick(), "BOB");
    // Still unique on one node, and a guest may change the case of its own.
    assert_eq!(rename(&mut other, "aNN").await["type"], "renamed");
    assert_eq!(rename(&mut late, "bob").await["code"], "nick_taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nickname_held_on_a_killed_node_is_free_once_it_stops_beating() {
    let cluster = Cluster::new();
    let file = TempConfig::new(&cluster.toml("[server]\nbind = \"127.0.0.1:0\"\n\n[log]\nformat = \"json\"\n"));
    let a = ServerProcess::start(env!("CARGO_BIN_EXE_wardroom"), &file.path);
    ready(a.addr).await;
    let b = cluster.node("").await;
    let mut ada = Client::connect(&a.ws_url("nick=ada")).await;
    assert_eq!(ada.nick(), "ada");
    let mut other = b.client("bea").await;
    assert_eq!(rename(&mut other, "Ada").await["code"], "nick_taken");

    a.kill_9();
    while ada.next_message().await.is_some() {}
    // Nobody released it: B takes it over once A's heartbeat key is gone.
    let taken = connect_until_named(&b.ws_url(Some("ADA")), "ADA").await;
    assert_eq!(taken.nick(), "ADA");
    assert_eq!(rename(&mut other, "ada").await["code"], "nick_taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_staff_name_seen_on_one_node_is_refused_to_guests_on_the_others() {
    let cluster = Cluster::new();
    let (a, b) = (cluster.node(MODERATED).await, cluster.node(MODERATED).await);
    let _moderator = user(a.addr, "mod-1", "Sentinel").await;
    let mut guest = b.client("gus").await;
    let deadline = tokio::time::Instant::now() + CLUSTER_PATIENCE;
    // The staff name reaches the broker right after the moderator's welcome.
    loop {
        let answer = rename(&mut guest, "SENTlNEL").await;
        if answer["code"] == "invalid_nick" {
            assert!(answer["message"].as_str().is_some_and(|m| m.contains("staff")), "{answer}");
            break;
        }
        assert_eq!(answer["type"], "renamed", "{answer}");
        assert!(tokio::time::Instant::now() < deadline, "the staff name never reached node B");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut other = Client::connect(&b.ws_url(Some("sentinel"))).await;
    assert!(other.nick().starts_with("guest-"), "{}", other.welcome);
    assert_eq!(other.recv().await["code"], "invalid_nick");
}
