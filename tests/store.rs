//! The SQLite store from the outside: the cases every store shares
//! (`support/store_cases.rs`, run on PostgreSQL by `store_postgres.rs`),
//! acknowledged writes survive the process being killed, and (opt-in) the
//! acknowledged-write throughput.
//!
//! Throughput (prints figures; skipped unless the variable is set):
//!
//! ```text
//! WARDROOM_STORE_BENCH=5 cargo test --release -p wardroom --test store -- ack_throughput --nocapture
//! ```
//!
//! `WARDROOM_STORE_BENCH` is the seconds per run; `WARDROOM_STORE_BENCH_WRITERS`
//! (default 50) the writer threads, `WARDROOM_STORE_BENCH_TASKS` (default
//! 1000) the tokio tasks of the closed-loop async run,
//! `WARDROOM_STORE_BENCH_RATE` (default 50000 messages/s) and
//! `WARDROOM_STORE_BENCH_PACED_TASKS` (default 500) the open-loop run;
//! `WARDROOM_STORE_BENCH_RETAIN` the messages kept per room (default
//! 10000, as in `[store]`); `WARDROOM_STORE_BENCH_SYNC` (`full` or `normal`) and
//! `WARDROOM_STORE_BENCH_KIND` (`threads`, `tasks` or `paced`) run only part
//! of it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wardroom::config::{StoreConfig, Synchronous};
use wardroom::store::sqlite::SqliteStore;
use wardroom::store::{AuditEntry, Store, StoredMessage, Write, Written};

#[macro_use]
#[path = "support/store_cases.rs"]
mod store_cases;

/// SQLite on a file of its own for each shared case.
struct Sqlite(TempDir);

impl store_cases::Backend for Sqlite {
    type Store = SqliteStore;
    const PRUNE_CHUNK: usize = wardroom::store::sqlite::PRUNE_CHUNK;

    fn open(&self, retain_per_room: u64, retain_for: Option<Duration>) -> SqliteStore {
        let mut config = config(self.0.db(), Synchronous::Normal);
        config.retain_per_room = retain_per_room;
        config.retain_for = retain_for;
        SqliteStore::open(&config).expect("open")
    }

    fn run_retention(store: &SqliteStore) -> Result<u64, wardroom::store::StoreError> {
        store.run_retention()
    }

    fn close(store: &SqliteStore) {
        store.close();
    }

    fn pruned(store: &SqliteStore) -> u64 {
        store.stats().pruned
    }
}

store_cases!(Sqlite(TempDir::new("cases")));

/// Set (to the database path) in the child process of the crash test.
const CHILD_DB: &str = "WARDROOM_STORE_CRASH_DB";
/// `full` or `normal`, for the child.
const CHILD_SYNC: &str = "WARDROOM_STORE_CRASH_SYNC";
/// Writer threads in the child.
const CHILD_THREADS: usize = 4;
/// Acknowledgements to wait for before the kill.
const ACKS_BEFORE_KILL: usize = 2_000;

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("wardroom-store-it-{name}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }

    fn db(&self) -> PathBuf {
        self.0.join("wardroom.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(path: PathBuf, synchronous: Synchronous) -> StoreConfig {
    let mut config = StoreConfig { path, ..StoreConfig::default() };
    config.synchronous = synchronous;
    config
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn message(room: &str, id: u64) -> StoredMessage {
    StoredMessage {
        room: room.into(),
        id,
        user_id: format!("user-{}", id % 97).into(),
        json: format!(
            r#"{{"type":"message","room":"{room}","id":{id},"from":{{"id":"user-{}","nick":"someone"}},"text":"a typical chat line of moderate length, number {id}","ts":{}}}"#,
            id % 97,
            now_ms()
        )
        .into(),
        ts: now_ms(),
    }
}

/// The child side of [`acknowledged_writes_survive_sigkill`]: does nothing
/// unless started by it.
#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_DB) else { return };
    let synchronous = match std::env::var(CHILD_SYNC).as_deref() {
        Ok("normal") => Synchronous::Normal,
        _ => Synchronous::Full,
    };
    let store = Arc::new(SqliteStore::open(&config(PathBuf::from(path), synchronous)).expect("open"));
    let deadline = Instant::now() + Duration::from_secs(60); // in case the parent is gone
    let threads: Vec<_> = (0..CHILD_THREADS)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let room = format!("crash{t}");
                let mut id = 0;
                while Instant::now() < deadline {
                    id += 1;
                    let entry = AuditEntry {
                        id: 0,
                        at: now_ms(),
                        actor: "crash".into(),
                        action: "say".into(),
                        target: None,
                        room: Some(room.clone()),
                        reason: String::new(),
                        rule: None,
                        details: Some(id.to_string()),
                    };
                    let written = store
                        .write(vec![Write::Message(message(&room, id)), Write::Audit(entry)])
                        .wait_blocking()
                        .expect("commit");
                    let Written::Id(audit_id) = written[1] else { panic!("no audit id") };
                    // Straight to the process's stdout, past the test harness.
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "ack {t} {id} {audit_id}").expect("stdout");
                    out.flush().expect("flush");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("writer");
    }
}

fn crash_and_check(synchronous: &str) {
    let dir = TempDir::new(&format!("crash-{synchronous}"));
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DB, dir.db())
        .env(CHILD_SYNC, synchronous)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // (thread, message id) -> audit id, for every acknowledged batch.
    let mut acked: BTreeMap<(usize, u64), i64> = BTreeMap::new();
    let mut record = |line: &str| {
        let mut parts = line.split(' ');
        if parts.next() != Some("ack") {
            return;
        }
        let t: usize = parts.next().and_then(|p| p.parse().ok()).expect("thread");
        let id: u64 = parts.next().and_then(|p| p.parse().ok()).expect("id");
        let audit_id: i64 = parts.next().and_then(|p| p.parse().ok()).expect("audit id");
        acked.insert((t, id), audit_id);
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen = 0;
    while seen < ACKS_BEFORE_KILL {
        let wait = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(wait) {
            Ok(line) => {
                seen += usize::from(line.starts_with("ack "));
                record(&line);
            }
            Err(e) => {
                let _ = child.kill();
                panic!("the child stopped acknowledging after {seen} acks: {e}");
            }
        }
    }
    // SIGKILL in the middle of the writes.
    child.kill().expect("kill");
    child.wait().expect("wait");
    // Acks already in the pipe count too.
    for line in lines.iter() {
        record(&line);
    }
    reader.join().expect("reader");
    assert!(acked.len() >= ACKS_BEFORE_KILL);

    // The database is sound and holds every acknowledged write.
    {
        let conn = rusqlite::Connection::open(dir.db()).expect("open");
        let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).expect("integrity_check");
        assert_eq!(check, "ok");
    }
    let store = SqliteStore::open(&config(dir.db(), Synchronous::Full)).expect("reopen");
    for (&(t, id), &audit_id) in &acked {
        let room = format!("crash{t}");
        let stored = store.message(&room, id).expect("read");
        assert!(stored.is_some(), "{synchronous}: acknowledged message {room}/{id} is missing");
        let entry = store
            .audit(&wardroom::store::AuditQuery { before: Some(audit_id + 1), limit: 1, ..Default::default() })
            .expect("audit");
        assert_eq!(entry.first().map(|e| (e.id, e.details.clone())), Some((audit_id, Some(id.to_string()))));
    }
    for t in 0..CHILD_THREADS {
        let max = acked.keys().filter(|(th, _)| *th == t).map(|(_, id)| *id).max().unwrap_or(0);
        assert!(store.last_message_id(&format!("crash{t}")).expect("last") >= max);
    }
    eprintln!("{synchronous}: {} acknowledged batches survived SIGKILL", acked.len());
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    if std::env::var_os(CHILD_DB).is_some() {
        return;
    }
    crash_and_check("normal");
    crash_and_check("full");
}

/// Latency percentiles of a sorted sample, in ms.
fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i.min(sorted.len() - 1)]) / 1000.0
}

fn report(label: &str, latencies: &mut [u32], elapsed: Duration, store: &SqliteStore) {
    latencies.sort_unstable();
    let stats = store.stats();
    println!(
        "{label}: {} acked messages in {:.2}s = {:.0} msg/s; commit latency ms p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}; {} commits, {:.1} batches each; {} pruned",
        latencies.len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(latencies, 0.50),
        percentile(latencies, 0.99),
        percentile(latencies, 0.999),
        percentile(latencies, 1.0),
        stats.commits,
        stats.batches as f64 / stats.commits.max(1) as f64,
        stats.pruned,
    );
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The store of a benchmark run: `[store]` defaults (10,000 messages kept
/// per room) unless `WARDROOM_STORE_BENCH_RETAIN` says otherwise.
fn bench_store(dir: &TempDir, synchronous: Synchronous) -> Arc<SqliteStore> {
    let mut config = config(dir.db(), synchronous);
    config.retain_per_room = env_number("WARDROOM_STORE_BENCH_RETAIN", config.retain_per_room);
    Arc::new(SqliteStore::open(&config).expect("open"))
}

/// Threads, each sending single-message batches and waiting for the commit.
fn bench_threads(synchronous: Synchronous, writers: u64, run: Duration) {
    let dir = TempDir::new("bench-threads");
    let store = bench_store(&dir, synchronous);
    let start = Instant::now();
    let deadline = start + run;
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let room = format!("bench{w}");
                let mut latencies = Vec::new();
                let mut id = 0;
                while Instant::now() < deadline {
                    id += 1;
                    let msg = message(&room, id);
                    let t0 = Instant::now();
                    store.write(vec![Write::Message(msg)]).wait_blocking().expect("commit");
                    latencies.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                latencies
            })
        })
        .collect();
    let mut latencies: Vec<u32> = threads.into_iter().flat_map(|t| t.join().expect("writer")).collect();
    let elapsed = start.elapsed();
    report(&format!("{synchronous:?}, {writers} threads"), &mut latencies, elapsed, &store);
}

/// Tokio tasks on a 2-worker runtime, each sending single-message batches
/// and awaiting the commit (the way the server uses the store).
fn bench_tasks(synchronous: Synchronous, tasks: u64, run: Duration) {
    let dir = TempDir::new("bench-tasks");
    let store = bench_store(&dir, synchronous);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let start = Instant::now();
    let deadline = start + run;
    let mut latencies: Vec<u32> = runtime.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|w| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let room = format!("bench{}", w % 100);
                    let mut latencies = Vec::new();
                    let mut id = 0;
                    while Instant::now() < deadline {
                        id += 1;
                        // Ids unique per room: tasks sharing a room interleave.
                        let msg = message(&room, id * tasks + w);
                        let t0 = Instant::now();
                        store.write(vec![Write::Message(msg)]).wait().await.expect("commit");
                        latencies.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for handle in handles {
            all.extend(handle.await.expect("task"));
        }
        all
    });
    let elapsed = start.elapsed();
    report(&format!("{synchronous:?}, {tasks} tokio tasks"), &mut latencies, elapsed, &store);
}

/// Open loop: `tasks` tokio tasks together offering `rate` single-message
/// batches per second (each task on its own ticker, awaiting each commit
/// before its next tick), to see the commit latency at a given load.
fn bench_paced(synchronous: Synchronous, tasks: u64, rate: u64, run: Duration) {
    let dir = TempDir::new("bench-paced");
    let store = bench_store(&dir, synchronous);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let period = Duration::from_secs_f64(tasks as f64 / rate as f64);
    let start = Instant::now();
    let deadline = start + run;
    let mut latencies: Vec<u32> = runtime.block_on(async {
        let handles: Vec<_> = (0..tasks)
            .map(|w| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    let room = format!("bench{}", w % 100);
                    let mut latencies = Vec::new();
                    // Spread the tasks' ticks over the period.
                    let first = tokio::time::Instant::now() + period.mul_f64(w as f64 / tasks as f64);
                    let mut ticker = tokio::time::interval_at(first, period);
                    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    let mut id = 0;
                    while Instant::now() < deadline {
                        ticker.tick().await;
                        id += 1;
                        let msg = message(&room, id * tasks + w);
                        let t0 = Instant::now();
                        store.write(vec![Write::Message(msg)]).wait().await.expect("commit");
                        latencies.push(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    latencies
                })
            })
            .collect();
        let mut all = Vec::new();
        for handle in handles {
            all.extend(handle.await.expect("task"));
        }
        all
    });
    let elapsed = start.elapsed();
    report(&format!("{synchronous:?}, {tasks} tokio tasks paced at {rate}/s"), &mut latencies, elapsed, &store);
}

/// Acknowledged single-message writes per second; see the module docs.
#[test]
fn ack_throughput() {
    let Some(secs) = std::env::var("WARDROOM_STORE_BENCH").ok().and_then(|v| v.parse::<u64>().ok()) else { return };
    let run = Duration::from_secs(secs.max(1));
    let writers = env_number("WARDROOM_STORE_BENCH_WRITERS", 50);
    let tasks = env_number("WARDROOM_STORE_BENCH_TASKS", 1000);
    let rate = env_number("WARDROOM_STORE_BENCH_RATE", 50_000).max(1);
    let paced_tasks = env_number("WARDROOM_STORE_BENCH_PACED_TASKS", 500).max(1);
    let sync = std::env::var("WARDROOM_STORE_BENCH_SYNC").unwrap_or_default();
    let kind = std::env::var("WARDROOM_STORE_BENCH_KIND").unwrap_or_default();
    for synchronous in [Synchronous::Full, Synchronous::Normal] {
        if !sync.is_empty() && !format!("{synchronous:?}").eq_ignore_ascii_case(&sync) {
            continue;
        }
        if kind.is_empty() || kind == "threads" {
            bench_threads(synchronous, writers, run);
        }
        if kind.is_empty() || kind == "tasks" {
            bench_tasks(synchronous, tasks, run);
        }
        if kind.is_empty() || kind == "paced" {
            bench_paced(synchronous, paced_tasks, rate, run);
        }
    }
}
