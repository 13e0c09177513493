//! Prometheus metrics. Counters are plain atomics updated on the hot path
//! (once per message, never once per recipient); gauges that describe the
//! current state (connections, rooms, queue depth) are read from the hub when
//! `/metrics` is scraped. Rendered in the Prometheus text format.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::admission::Refusal;
use crate::outbox::CloseReason;
use crate::pipeline::VerdictKey;
use crate::policy::ReloadOutcome;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current count.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Escapes a label value (backslash, quote, newline).
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A latency histogram with fixed buckets (seconds), lock-free.
#[derive(Debug)]
pub struct Histogram {
    /// Upper bounds of the buckets, in microseconds.
    bounds: &'static [u64],
    /// Observations per bucket (not cumulative), plus one for +Inf.
    counts: Vec<AtomicU64>,
    /// Sum of observations, in microseconds.
    sum_us: AtomicU64,
}

/// Commit latency buckets: 0.1 ms to 2.5 s.
const COMMIT_BUCKETS_US: &[u64] =
    &[100, 250, 500, 1_000, 2_500, 5_000, 10_000, 20_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000];

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            bounds: COMMIT_BUCKETS_US,
            counts: (0..=COMMIT_BUCKETS_US.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, value: std::time::Duration) {
        let us = value.as_micros() as u64;
        let bucket = self.bounds.iter().position(|b| us <= *b).unwrap_or(self.bounds.len());
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_us.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// Counters of the server, shared by every task.
#[derive(Debug, Default)]
pub struct Metrics {
    /// WebSocket connections upgraded.
    pub connections_opened: Counter,
    /// WebSocket connections ended, by reason (indexed by [`CloseReason`]).
    pub connections_closed: [Counter; CloseReason::ALL.len()],
    /// TCP connections refused by the accept loop or the upgrade.
    pub connections_refused: [Counter; 2],
    /// Chat messages accepted from clients.
    pub messages_in: Counter,
    /// Frames queued to clients by room fan-out (one per member per event).
    pub deliveries: Counter,
    /// Frames written to clients.
    pub frames_out: Counter,
    /// Writes to client sockets (each carries every frame queued then).
    pub socket_writes: Counter,
    /// Time from queuing a write to its durable commit.
    pub store_commit: Histogram,
    /// Requests answered with an `error` frame.
    pub request_errors: Counter,
}

/// Values read from the hub at scrape time.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Pipeline verdicts other than allow, by filter, verdict, code and mode.
    pub verdicts: Vec<(VerdictKey, u64)>,
    /// Reload attempts by outcome.
    pub reloads: Vec<(ReloadOutcome, u64)>,
    /// Open WebSocket connections.
    pub connections: usize,
    /// Open TCP connections (HTTP and WebSocket).
    pub tcp_connections: usize,
    /// Rooms that exist.
    pub rooms: usize,
    /// Frames waiting in all outbound queues.
    pub queued_frames: usize,
    /// Frames waiting in the longest outbound queue.
    pub max_queued_frames: usize,
    /// Bytes waiting in all outbound queues.
    pub queued_bytes: usize,
    /// Bytes waiting in the largest outbound queue (by bytes).
    pub max_queued_bytes: usize,
    /// In a cluster: whether the broker is reachable, and how many room
    /// members other nodes have.
    pub cluster: Option<(bool, usize)>,
}

impl Metrics {
    /// Counts a refused connection.
    pub fn refused(&self, refusal: Refusal) {
        self.connections_refused[refusal as usize].inc();
    }

    /// Counts an ended connection.
    pub fn closed(&self, reason: CloseReason) {
        self.connections_closed[reason as usize].inc();
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn render(&self, now: &Snapshot) -> String {
        let mut out = String::with_capacity(4096);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for (labels, value) in samples {
                let _ = writeln!(out, "{name}{labels} {value}");
            }
        };
        let plain = |value: u64| vec![(String::new(), value)];
        metric(
            "wardroom_build_info",
            "gauge",
            "Build information; the value is always 1.",
            &[(format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), 1)],
        );
        metric("wardroom_connections", "gauge", "Open WebSocket connections.", &plain(now.connections as u64));
        metric(
            "wardroom_tcp_connections",
            "gauge",
            "Open TCP connections, HTTP and WebSocket.",
            &plain(now.tcp_connections as u64),
        );
        metric(
            "wardroom_connections_opened_total",
            "counter",
            "WebSocket connections upgraded.",
            &plain(self.connections_opened.get()),
        );
        let closed: Vec<_> = CloseReason::ALL
            .iter()
            .map(|reason| {
                (format!("{{reason=\"{}\"}}", reason.as_str()), self.connections_closed[*reason as usize].get())
            })
            .collect();
        metric("wardroom_connections_closed_total", "counter", "WebSocket connections ended, by reason.", &closed);
        let refused: Vec<_> = [Refusal::ServerFull, Refusal::TooManyFromAddress]
            .iter()
            .map(|r| (format!("{{reason=\"{}\"}}", r.as_str()), self.connections_refused[*r as usize].get()))
            .collect();
        metric("wardroom_connections_refused_total", "counter", "Connections refused, by reason.", &refused);
        metric("wardroom_rooms", "gauge", "Rooms that exist.", &plain(now.rooms as u64));
        if let Some((connected, remote_members)) = now.cluster {
            metric(
                "wardroom_cluster_broker_connected",
                "gauge",
                "1 while this node reaches the cluster's broker (and takes messages), else 0.",
                &plain(u64::from(connected)),
            );
            metric(
                "wardroom_cluster_remote_members",
                "gauge",
                "Room memberships on the other nodes of the cluster, as this node knows them.",
                &plain(remote_members as u64),
            );
        }
        metric(
            "wardroom_messages_in_total",
            "counter",
            "Chat messages accepted from clients.",
            &plain(self.messages_in.get()),
        );
        metric(
            "wardroom_fanout_deliveries_total",
            "counter",
            "Frames queued to room members by fan-out.",
            &plain(self.deliveries.get()),
        );
        metric(
            "wardroom_outbound_queued_frames",
            "gauge",
            "Frames waiting in all outbound queues.",
            &plain(now.queued_frames as u64),
        );
        metric(
            "wardroom_outbound_queue_max_frames",
            "gauge",
            "Frames waiting in the longest outbound queue.",
            &plain(now.max_queued_frames as u64),
        );
        metric(
            "wardroom_outbound_queued_bytes",
            "gauge",
            "Bytes waiting in all outbound queues.",
            &plain(now.queued_bytes as u64),
        );
        metric(
            "wardroom_outbound_queue_max_bytes",
            "gauge",
            "Bytes waiting in the largest outbound queue.",
            &plain(now.max_queued_bytes as u64),
        );
        metric(
            "wardroom_frames_out_total",
            "counter",
            "Frames written to clients (slow consumers: wardroom_connections_closed_total{reason=\"slow_consumer\"}).",
            &plain(self.frames_out.get()),
        );
        metric(
            "wardroom_socket_writes_total",
            "counter",
            "Writes to client sockets; frames out per write is how well writes are coalesced.",
            &plain(self.socket_writes.get()),
        );
        let verdicts: Vec<_> = now
            .verdicts
            .iter()
            .map(|(key, n)| {
                let labels = format!(
                    "{{filter=\"{}\",verdict=\"{}\",code=\"{}\",mode=\"{}\"}}",
                    escape(&key.filter),
                    key.verdict,
                    escape(&key.code),
                    if key.shadow { "shadow" } else { "enforce" }
                );
                (labels, *n)
            })
            .collect();
        metric(
            "wardroom_filter_verdicts_total",
            "counter",
            "Pipeline verdicts other than allow, by filter, verdict and code; mode=\"shadow\" counts what shadow-mode filters would have done.",
            &verdicts,
        );
        let reloads: Vec<_> =
            now.reloads.iter().map(|(outcome, n)| (format!("{{outcome=\"{}\"}}", outcome.as_str()), *n)).collect();
        metric("wardroom_config_reloads_total", "counter", "Config reload attempts, by outcome.", &reloads);
        metric(
            "wardroom_request_errors_total",
            "counter",
            "Requests answered with an error frame.",
            &plain(self.request_errors.get()),
        );
        self.store_commit.render(
            &mut out,
            "wardroom_store_commit_seconds",
            "Time from queuing a store write to its durable commit (group commit included).",
        );
        out
    }
}
