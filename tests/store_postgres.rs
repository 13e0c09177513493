//! The PostgreSQL store against the real server at
//! `postgres://postgres@127.0.0.1:5432/test` (trust auth; another with
//! `WARDROOM_TEST_POSTGRES`): the cases every store shares
//! (`support/store_cases.rs`), what only PostgreSQL has (migrations by nodes
//! starting together, several nodes on one database, connections killed or
//! cut off), and real servers on it.
//!
//! Every test works in a schema of its own (`wr_…`, through the URL's
//! `options=-csearch_path%3D…`, with the same `application_name`), dropped
//! at its end, so parallel tests and reruns never see each other's rows.
//!
//! Throughput (prints figures; skipped unless the variable is set):
//!
//! ```text
//! WARDROOM_PG_BENCH=5 cargo test --release --test store_postgres -- ack_throughput --nocapture
//! ```
//!
//! `WARDROOM_PG_BENCH` is the seconds per run, `WARDROOM_PG_BENCH_WRITERS`
//! (default 50) the writer threads, each sending single-message batches and
//! waiting for each commit.

mod support;

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::process::ServerProcess;
use support::{Client, TestServer, eventually, fresh_dir};
use wardroom::config::{StoreConfig, Synchronous};
use wardroom::store::postgres::PostgresStore;
use wardroom::store::{AuditQuery, Mute, Store, StoreError, Write, Written};

#[macro_use]
#[path = "support/store_cases.rs"]
mod store_cases;

use store_cases::{audit, ban, commit, ids, msg};

/// The database the tests use.
fn base_url() -> String {
    std::env::var("WARDROOM_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn base_config() -> postgres::Config {
    base_url().parse().expect("WARDROOM_TEST_POSTGRES is a PostgreSQL URL")
}

/// Where the test database listens.
fn database_addr() -> SocketAddr {
    let config = base_config();
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .expect("resolve the database host")
        .next()
        .expect("an address for the database host")
}

/// Runs `sql` (simple protocol, `;`-separated) in `schema` if given, on a
/// connection of its own and a thread of its own (the blocking client may
/// not run on a tokio runtime thread); returns the rows of the last
/// statement, as text.
fn sql(schema: Option<&str>, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let (schema, sql) = (schema.map(str::to_owned), sql.to_owned());
    std::thread::spawn(move || {
        // The server's message, not just "db error".
        let text = |e: postgres::Error| e.as_db_error().map_or_else(|| e.to_string(), |db| db.message().to_owned());
        let mut client = base_config().connect(postgres::NoTls).map_err(|e| format!("connect: {}", text(e)))?;
        if let Some(schema) = schema {
            client.batch_execute(&format!("SET search_path = {schema}")).map_err(text)?;
        }
        let mut rows = Vec::new();
        for message in client.simple_query(&sql).map_err(text)? {
            if let postgres::SimpleQueryMessage::Row(row) = message {
                rows.push((0..row.len()).map(|i| row.get(i).map(str::to_owned)).collect());
            }
        }
        Ok(rows)
    })
    .join()
    .expect("sql thread")
}

/// One value of the first row.
fn scalar(schema: &str, query: &str) -> String {
    let rows = sql(Some(schema), query).unwrap_or_else(|e| panic!("{query}: {e}"));
    rows.first().and_then(|row| row.first().cloned().flatten()).unwrap_or_default()
}

/// A schema of its own for one test, dropped at the end.
struct Pg {
    schema: String,
}

impl Pg {
    fn new() -> Pg {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let schema = format!("wr_{}_{}_{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        sql(None, &format!("CREATE SCHEMA {schema}")).expect("create the test schema");
        Pg { schema }
    }

    /// The schema's URL through `addr` (the database itself by default).
    fn url_via(&self, addr: SocketAddr) -> String {
        let config = base_config();
        let user = config.get_user().unwrap_or("postgres");
        let db = config.get_dbname().unwrap_or("test");
        format!(
            "postgres://{user}@{addr}/{db}?options=-csearch_path%3D{schema}&application_name={schema}",
            schema = self.schema
        )
    }

    fn url(&self) -> String {
        self.url_via(database_addr())
    }

    fn store_config(&self, url: String, retain_per_room: u64, retain_for: Option<Duration>) -> StoreConfig {
        StoreConfig { url: Some(url), retain_per_room, retain_for, ..StoreConfig::default() }
    }

    fn open(&self) -> PostgresStore {
        PostgresStore::open(&self.store_config(self.url(), 0, None)).expect("open")
    }

    /// Ends every connection of this test's stores (not waiting more than
    /// 5 s for each); returns how many there were.
    fn kill_connections(&self) -> usize {
        let rows = sql(
            None,
            &format!(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE application_name = '{}'",
                self.schema
            ),
        )
        .expect("terminate");
        rows.len()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Err(e) = sql(None, &format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema)) {
            eprintln!("cannot drop schema {}: {e}", self.schema);
        }
    }
}

impl store_cases::Backend for Pg {
    type Store = PostgresStore;
    const PRUNE_CHUNK: usize = wardroom::store::postgres::PRUNE_CHUNK;

    fn open(&self, retain_per_room: u64, retain_for: Option<Duration>) -> PostgresStore {
        PostgresStore::open(&self.store_config(self.url(), retain_per_room, retain_for)).expect("open")
    }

    fn run_retention(store: &PostgresStore) -> Result<u64, StoreError> {
        store.run_retention()
    }

    fn close(store: &PostgresStore) {
        store.close();
    }

    fn pruned(store: &PostgresStore) -> u64 {
        store.stats().pruned
    }
}

store_cases!(Pg::new());

#[test]
fn nodes_starting_together_migrate_once() {
    const NODES: usize = 4;
    let pg = Arc::new(Pg::new());
    let barrier = Arc::new(Barrier::new(NODES));
    let handles: Vec<_> = (0..NODES)
        .map(|_| {
            let (pg, barrier) = (Arc::clone(&pg), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                pg.open()
            })
        })
        .collect();
    let opened: Vec<PostgresStore> = handles.into_iter().map(|handle| handle.join().expect("open")).collect();
    let version = wardroom::store::SCHEMA_VERSION;
    assert_eq!(
        scalar(&pg.schema, "SELECT count(*) || ':' || max(version) FROM wardroom_schema"),
        format!("{version}:{version}")
    );
    // All of them work on the one schema.
    for (n, store) in opened.iter().enumerate() {
        let id = n as u64 + 1;
        assert_eq!(commit(store, vec![Write::Message(msg("lobby", id, id))]), vec![Written::Done]);
    }
    assert_eq!(ids(&opened[0].history("lobby", None, 10).expect("history")), (1..=NODES as u64).collect::<Vec<_>>());
    drop(opened);
    // Opening again changes nothing.
    drop(pg.open());
    assert_eq!(scalar(&pg.schema, "SELECT count(*) FROM wardroom_schema"), version.to_string());
}

#[test]
fn a_newer_schema_is_refused_and_left_unchanged() {
    let pg = Pg::new();
    let supported = wardroom::store::SCHEMA_VERSION;
    let versions: Vec<String> = (1..=supported + 1).map(|v| format!("({v})")).collect();
    sql(
        Some(&pg.schema),
        &format!(
            "CREATE TABLE wardroom_schema (version INTEGER PRIMARY KEY);
             INSERT INTO wardroom_schema VALUES {};
             CREATE TABLE future (x TEXT); INSERT INTO future VALUES ('keep me');",
            versions.join(", ")
        ),
    )
    .expect("future schema");
    match PostgresStore::open(&pg.store_config(pg.url(), 0, None)) {
        Err(StoreError::TooNew { found, supported: s }) => assert_eq!((found, s), (supported + 1, supported)),
        other => panic!("expected TooNew, got {other:?}"),
    }
    let tables = scalar(
        &pg.schema,
        &format!(
            "SELECT string_agg(table_name, ',' ORDER BY table_name) FROM information_schema.tables
             WHERE table_schema = '{}'",
            pg.schema
        ),
    );
    assert_eq!(tables, "future,wardroom_schema", "no tables were added");
    assert_eq!(scalar(&pg.schema, "SELECT string_agg(x, ',') FROM future"), "keep me");
}

#[test]
fn the_audit_log_is_append_only_in_the_database() {
    let pg = Pg::new();
    {
        let store = pg.open();
        commit(&store, vec![Write::Audit(audit("mod1", "ban", None, None))]);
    }
    for statement in ["UPDATE audit SET actor = 'x'", "DELETE FROM audit", "TRUNCATE audit"] {
        let error = sql(Some(&pg.schema), statement).expect_err(statement);
        assert!(error.contains("append-only"), "{statement}: {error}");
    }
    assert_eq!(scalar(&pg.schema, "SELECT actor FROM audit"), "mod1");
}

#[test]
fn bad_urls_and_unreachable_databases_are_errors_not_panics() {
    let pg = Pg::new();
    // Nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let started = Instant::now();
    match PostgresStore::open(&pg.store_config(pg.url_via(closed), 0, None)) {
        Err(StoreError::Unavailable(message)) => assert!(message.contains("connect"), "{message}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    // A database that does not exist.
    let url = pg.url().replace("/test?", "/wardroom_no_such_database?");
    assert!(matches!(PostgresStore::open(&pg.store_config(url, 0, None)), Err(StoreError::Unavailable(_))));
    for url in ["mysql://u@h/db", "postgres://u@h:x/db"] {
        assert!(matches!(PostgresStore::open(&pg.store_config(url.into(), 0, None)), Err(StoreError::Database(_))));
    }
}

#[test]
fn two_nodes_share_one_database() {
    let pg = Pg::new();
    let (a, b) = (pg.open(), pg.open());
    // Ids come from the caller, whichever node writes.
    for id in 1..=20 {
        let node = if id % 2 == 0 { &a } else { &b };
        commit(node, vec![Write::Message(msg("lobby", id, id))]);
    }
    assert_eq!(ids(&a.history("lobby", None, 100).expect("history")), (1..=20).collect::<Vec<_>>());
    assert_eq!(b.history("lobby", None, 100).expect("history"), a.history("lobby", None, 100).expect("history"));
    assert_eq!((a.last_message_id("lobby").expect("a"), b.last_message_id("lobby").expect("b")), (20, 20));
    // The same (room, id) twice is refused, not renumbered.
    assert!(matches!(b.write(vec![Write::Message(msg("lobby", 7, 7))]).wait_blocking(), Err(StoreError::Database(_))));

    // The same ban written by both nodes is one ban, with one id.
    let the_ban = ban(Some("u1"), Some("203.0.113.7/32"), None);
    let (from_a, from_b) = (a.write(vec![Write::Ban(the_ban.clone())]), b.write(vec![Write::Ban(the_ban.clone())]));
    let (from_a, from_b) = (from_a.wait_blocking().expect("a"), from_b.wait_blocking().expect("b"));
    assert_eq!(from_a, from_b);
    assert_eq!(a.bans(None).expect("bans").len(), 1);
    let other = commit(&b, vec![Write::Ban(ban(Some("u2"), None, None))]);
    assert_ne!(other, from_a);

    // A mute set on one node is in the other's snapshot; audit ids are shared.
    let mute = Mute { user_id: "u3".into(), until: 9_000, reason: "r".into(), actor: "m".into(), created_at: 1 };
    commit(&a, vec![Write::Mute(mute.clone())]);
    assert_eq!(b.snapshot(1_000).expect("snapshot").mutes, vec![mute]);
    let first = commit(&a, vec![Write::Audit(audit("m", "x", None, None))]);
    let second = commit(&b, vec![Write::Audit(audit("m", "y", None, None))]);
    assert_eq!((first, second), (vec![Written::Id(1)], vec![Written::Id(2)]));
    let actions: Vec<String> = a
        .audit(&AuditQuery { limit: 10, ..AuditQuery::default() })
        .expect("audit")
        .into_iter()
        .map(|e| e.action)
        .collect();
    assert_eq!(actions, ["y", "x"]);
}

#[test]
fn two_nodes_writing_moderation_at_once_never_deadlock() {
    const ROUNDS: usize = 100;
    let pg = Pg::new();
    let deadlocks = || scalar(&pg.schema, "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()");
    let before = deadlocks();
    let started = Instant::now();
    let nodes: Vec<_> = (0..2)
        .map(|node| {
            let store = pg.open();
            std::thread::spawn(move || {
                let mut ids = Vec::new();
                for round in 0..ROUNDS {
                    let the_ban = Write::Ban(wardroom::store::Ban {
                        created_at: round as u64,
                        ..ban(Some(&format!("node{node}-{round}")), None, None)
                    });
                    let entry = Write::Audit(audit("mod", "ban", None, None));
                    // Opposite orders: counters taken as they come would cross.
                    let writes = if node == 0 { vec![the_ban, entry] } else { vec![entry, the_ban] };
                    let written: Vec<i64> = commit(&store, writes)
                        .into_iter()
                        .map(|w| match w {
                            Written::Id(id) => id,
                            Written::Done => panic!("a ban and an audit entry have ids"),
                        })
                        .collect();
                    // (ban id, audit id)
                    ids.push(if node == 0 { (written[0], written[1]) } else { (written[1], written[0]) });
                }
                ids
            })
        })
        .collect();
    let (mut ban_ids, mut audit_ids) = (BTreeSet::new(), BTreeSet::new());
    for node in nodes {
        for (ban_id, audit_id) in node.join().expect("node") {
            ban_ids.insert(ban_id);
            audit_ids.insert(audit_id);
        }
    }
    let all = |n: usize| (1..=n as i64).collect::<BTreeSet<_>>();
    assert_eq!((ban_ids, audit_ids), (all(2 * ROUNDS), all(2 * ROUNDS)), "every batch got ids of its own");
    // A deadlock costs a second (deadlock_timeout) before it is broken.
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    eprintln!("deadlocks in the database before {before}, after {}", deadlocks());
}

#[test]
fn a_killed_connection_is_replaced_and_no_acked_write_is_lost() {
    let pg = Pg::new();
    let store = Arc::new(pg.open());
    commit(&*store, vec![Write::Message(msg("lobby", 1, 1))]);
    assert_eq!(store.history("lobby", None, 10).expect("history").len(), 1);

    // Killed while idle: the next write and read go through on new connections.
    assert!(pg.kill_connections() >= 2, "the writer's and a reader's connections");
    assert_eq!(commit(&*store, vec![Write::Message(msg("lobby", 2, 2))]), vec![Written::Done]);
    assert_eq!(ids(&store.history("lobby", None, 10).expect("history")), vec![1, 2]);
    assert!(store.is_healthy());

    // Killed again and again under a stream of writes: each write is acked
    // or fails with an error, and every acked one is stored.
    let writing = Arc::new(AtomicBool::new(true));
    let writers: Vec<JoinHandle<(Vec<u64>, usize)>> = (0..4u64)
        .map(|t| {
            let (store, writing) = (Arc::clone(&store), Arc::clone(&writing));
            std::thread::spawn(move || {
                let room = format!("stream{t}");
                let (mut acked, mut failed) = (Vec::new(), 0);
                let mut id = 0;
                while writing.load(Ordering::Relaxed) {
                    id += 1;
                    match store.write(vec![Write::Message(msg(&room, id, id))]).wait_blocking() {
                        Ok(_) => acked.push(id),
                        Err(StoreError::Unavailable(_) | StoreError::Database(_)) => failed += 1,
                        Err(e) => panic!("unexpected error {e}"),
                    }
                }
                (acked, failed)
            })
        })
        .collect();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(150));
        pg.kill_connections();
    }
    std::thread::sleep(Duration::from_millis(150));
    writing.store(false, Ordering::Relaxed);
    let mut failures = 0;
    for (t, writer) in writers.into_iter().enumerate() {
        let (acked, failed) = writer.join().expect("writer");
        failures += failed;
        assert!(!acked.is_empty(), "writer {t} got no ack at all");
        let stored: BTreeSet<u64> =
            ids(&store.history(&format!("stream{t}"), None, usize::MAX).expect("history")).into_iter().collect();
        let lost: Vec<_> = acked.iter().filter(|id| !stored.contains(id)).collect();
        assert!(lost.is_empty(), "writer {t}: acked but not stored: {lost:?}");
    }
    eprintln!("{failures} writes failed with an error while their connection was killed");
    assert_eq!(commit(&*store, vec![Write::Message(msg("lobby", 3, 3))]), vec![Written::Done]);
    assert!(store.is_healthy());
}

/// A TCP relay to the database that a test can cut off and bring back, as
/// a network partition or a database restart would.
struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `addr` (port 0: any) and relays to the database.
    fn start(addr: SocketAddr) -> Relay {
        let listener = TcpListener::bind(addr).expect("bind the relay");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let acceptor = {
            let (stop, sockets) = (Arc::clone(&stop), Arc::clone(&sockets));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            let Ok(upstream) = TcpStream::connect(database_addr()) else { continue };
                            let _ = client.set_nonblocking(false);
                            for (from, to) in [(&client, &upstream), (&upstream, &client)] {
                                let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else { continue };
                                std::thread::spawn(move || {
                                    let _ = std::io::copy(&mut from, &mut to);
                                    let _ = to.shutdown(Shutdown::Both);
                                });
                            }
                            sockets.lock().unwrap_or_else(|e| e.into_inner()).extend([client, upstream]);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                        Err(_) => break,
                    }
                }
            })
        };
        Relay { addr, stop, sockets, acceptor: Some(acceptor) }
    }

    /// Cuts every relayed connection and stops listening: connecting is
    /// refused until [`Relay::start`] on the same address.
    fn cut(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.join().expect("relay acceptor");
        }
        for socket in self.sockets.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
    }
}

fn wait_until(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !check() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn while_the_database_is_unreachable_writes_fail_cleanly_then_recover() {
    let pg = Pg::new();
    let mut relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], 0)));
    let store = PostgresStore::open(&pg.store_config(pg.url_via(relay.addr), 0, None)).expect("open");
    commit(&store, vec![Write::Message(msg("lobby", 1, 1))]);
    assert!(store.is_healthy());

    relay.cut();
    let started = Instant::now();
    match store.write(vec![Write::Message(msg("lobby", 2, 2))]).wait_blocking() {
        Err(StoreError::Unavailable(message)) => assert!(message.contains("database"), "{message}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5), "failed at once, took {:?}", started.elapsed());
    assert!(!store.is_healthy(), "unhealthy while unreachable");
    assert!(matches!(store.history("lobby", None, 10), Err(StoreError::Unavailable(_))));
    assert!(matches!(store.last_message_id("lobby"), Err(StoreError::Unavailable(_))));
    // Still failing, still fast, for as long as it lasts.
    for id in 3..6 {
        let started = Instant::now();
        assert!(matches!(
            store.write(vec![Write::Message(msg("lobby", id, id))]).wait_blocking(),
            Err(StoreError::Unavailable(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(!store.is_healthy());
    }

    // Back: healthy again without any write, and writes and reads work.
    let _relay = Relay::start(relay.addr);
    assert!(wait_until(Duration::from_secs(10), || store.is_healthy()), "did not reconnect");
    assert_eq!(commit(&store, vec![Write::Message(msg("lobby", 6, 6))]), vec![Written::Done]);
    assert_eq!(ids(&store.history("lobby", None, 10).expect("history")), vec![1, 6], "failed writes left nothing");
    assert_eq!(store.last_message_id("lobby").expect("last"), 6);
}

const ADMIN: &str = "Authorization: Bearer admin-token\r\nContent-Type: application/json\r\n";

async fn admin(addr: SocketAddr, method: &str, path: &str, body: Value) -> (u16, Value) {
    let (status, text) = support::raw::http_request_with_body(addr, method, path, ADMIN, &body.to_string()).await;
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn server_config(url: &str) -> std::path::PathBuf {
    let path = fresh_dir().join("config.toml");
    let text = format!(
        "[server]\nbind = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n[admin]\ntoken = \"admin-token\"\n\
         [store]\nurl = {url:?}\n"
    );
    std::fs::write(&path, text).expect("write config");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_postgres_keeps_history_and_bans_across_restarts() {
    let pg = Pg::new();
    let config = server_config(&pg.url());
    let start = || ServerProcess::start(env!("CARGO_BIN_EXE_wardroom"), &config);

    // First run: three acked messages and a ban.
    let server = start();
    let mut writer = Client::connect(&server.ws_url("nick=Writer")).await;
    writer.join("lobby").await;
    let mut acked = Vec::new();
    for text in ["one", "two", "three"] {
        acked.push(writer.post("lobby", text).await["id"].as_u64().expect("id"));
    }
    assert_eq!(acked, [1, 2, 3]);
    let (status, body) =
        admin(server.addr, "POST", "/admin/bans", json!({"ip": "198.51.100.0/24", "reason": "botnet"})).await;
    assert_eq!(status, 200, "{body}");
    writer.close().await;
    assert!(server.terminate(), "exit 0 on SIGTERM");
    assert_eq!(scalar(&pg.schema, "SELECT count(*) FROM messages"), "3", "in PostgreSQL, not in a file");

    // Second run: the history and the ban are there; ids go on from 4.
    let server = start();
    let mut reader = Client::connect(&server.ws_url("nick=Reader")).await;
    let joined = reader.join("lobby").await;
    let history: Vec<(u64, String)> = joined["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|m| (m["id"].as_u64().unwrap_or(0), m["content"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert_eq!(history, [(1, "one".into()), (2, "two".into()), (3, "three".into())], "{joined}");
    assert_eq!(reader.post("lobby", "four").await["id"], 4);
    let (_, bans) = admin(server.addr, "GET", "/admin/bans", Value::Null).await;
    assert_eq!(bans[0]["cidr"], "198.51.100.0/24", "{bans}");
    // Ban this guest (and so its address) ...
    let guest = reader.welcome["user"]["id"].as_str().expect("guest id").to_owned();
    let (status, body) = admin(server.addr, "POST", "/admin/bans", json!({"user": guest, "reason": "spam"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(reader.expect_close().await, (1008, "banned: spam".to_owned()));
    assert!(server.terminate(), "exit 0 on SIGTERM");

    // ... and after a restart it is still kept out.
    let server = start();
    let mut again = Client::connect_any(&server.ws_url("nick=Innocent")).await;
    let error = again.recv().await;
    assert_eq!(error["code"], "banned", "still banned after the restart: {error}");
    assert_eq!(again.expect_close().await.0, 1008);
    assert!(server.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_and_acks_follow_the_database() {
    let pg = Pg::new();
    let relay = Arc::new(Mutex::new(Relay::start(SocketAddr::from(([127, 0, 0, 1], 0)))));
    let relay_addr = relay.lock().expect("relay").addr;
    let server = TestServer::with_toml(&format!("[store]\nurl = {:?}\n", pg.url_via(relay_addr))).await;
    let ready = || async { support::raw::http_get_status(server.addr, "/readyz").await };
    let is_ready = eventually(Duration::from_secs(10), || async { (ready().await == 200).then_some(()) }).await;
    assert!(is_ready.is_some(), "/readyz never 200");
    let mut client = server.client("Writer").await;
    client.join("lobby").await;
    assert_eq!(client.post("lobby", "before").await["id"], 1);

    // Cut off: not ready, and a message gets an error instead of an ack.
    relay.lock().expect("relay").cut();
    let not_ready = eventually(Duration::from_secs(10), || async { (ready().await == 503).then_some(()) }).await;
    assert!(not_ready.is_some(), "/readyz stayed 200 without the database");
    client.send(json!({"type": "message", "room": "lobby", "content": "during", "ref": "during"})).await;
    let answer = loop {
        let frame = client.recv().await;
        if frame["type"] == "ack" || frame["type"] == "error" {
            break frame;
        }
    };
    assert_eq!(answer["type"], "error", "no ack while the database is unreachable: {answer}");
    assert_eq!(answer["code"], "unavailable", "{answer}");

    // Back: ready again, acks again.
    *relay.lock().expect("relay") = Relay::start(relay_addr);
    let back = eventually(Duration::from_secs(10), || async { (ready().await == 200).then_some(()) }).await;
    assert!(back.is_some(), "/readyz did not come back");
    let ack = client.post("lobby", "after").await;
    assert_eq!(ack["type"], "ack");
    let mut reader = server.client("Reader").await;
    let joined = reader.join("lobby").await;
    let contents: Vec<&str> =
        joined["history"].as_array().expect("history").iter().filter_map(|m| m["content"].as_str()).collect();
    assert!(contents.contains(&"before") && contents.contains(&"after"), "{joined}");
    // What the database holds: the acknowledged messages, not the other.
    let stored = scalar(&pg.schema, "SELECT string_agg(json::json->>'content', ',' ORDER BY id) FROM messages");
    assert_eq!(stored, "before,after");
}

/// Acknowledged single-message writes per second; see the module docs.
#[test]
fn ack_throughput() {
    let Some(secs) = std::env::var("WARDROOM_PG_BENCH").ok().and_then(|v| v.parse::<u64>().ok()) else { return };
    let writers: u64 = std::env::var("WARDROOM_PG_BENCH_WRITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    for synchronous in [Synchronous::Full, Synchronous::Normal] {
        let pg = Pg::new();
        let config = StoreConfig { synchronous, ..pg.store_config(pg.url(), 10_000, None) };
        let store = Arc::new(PostgresStore::open(&config).expect("open"));
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs.max(1));
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let room = format!("bench{w}");
                    let mut latencies = Vec::new();
                    let mut id = 0;
                    while Instant::now() < deadline {
                        id += 1;
                        let message = msg(&room, id, store_cases::now_ms());
                        let t0 = Instant::now();
                        store.write(vec![Write::Message(message)]).wait_blocking().expect("commit");
                        latencies.push(t0.elapsed().as_micros() as u64);
                    }
                    latencies
                })
            })
            .collect();
        let mut latencies: Vec<u64> = threads.into_iter().flat_map(|t| t.join().expect("writer")).collect();
        let elapsed = start.elapsed();
        latencies.sort_unstable();
        let pct = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
        let stats = store.stats();
        println!(
            "{synchronous:?}, {writers} threads: {} acked messages in {:.2}s = {:.0} msg/s; commit latency ms p50 {:.2} p99 {:.2}; {} commits, {:.1} batches each",
            latencies.len(),
            elapsed.as_secs_f64(),
            latencies.len() as f64 / elapsed.as_secs_f64(),
            pct(0.5),
            pct(0.99),
            stats.commits,
            stats.batches as f64 / stats.commits.max(1) as f64,
        );
    }
}
