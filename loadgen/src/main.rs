//! `wardroom-loadgen`: an open-loop load generator for WebSocket chat
//! servers speaking Wardroom's protocol, over loopback only.
//!
//! # Design
//!
//! The generator must never be the bottleneck: it is built to receive a few
//! million deliveries per second on one CPU (run it under `taskset`).
//!
//! - **One thread.** A Tokio `current_thread` runtime; all state is in `Cell`s
//!   behind one `Rc` ([`state::Shared`]), with no locks or atomics.
//! - **Hand-written WebSocket client.** Each connection does its own HTTP
//!   upgrade, then reads up to 64 KiB at a time into one read buffer shared by
//!   all connections, and scans the server's (unmasked) frame headers in
//!   place: no per-frame allocation, no JSON parsing. A message frame is
//!   recognised by its `type`, and only its `content` is parsed; frames we do
//!   not need whole (a large `joined`) are skipped as they stream by. Pings
//!   are answered with masked pongs.
//! - **Open loop.** Message `k` is scheduled at `k / rate` seconds after
//!   sending starts, from sender `k % senders`; its content carries the
//!   sender, its sequence number and the *scheduled* time
//!   (`g<run>:t123456789:s12:q345:xxxx…`). Latency is receive time minus
//!   scheduled time, so a stalled server (or generator) shows up as latency,
//!   not as a lower offered rate. Due messages are sent by every read loop
//!   (which checks the schedule after each read) and, when nothing is being
//!   read, by a task sleeping on a `timerfd`, which unlike Tokio's 1 ms timer
//!   wheel wakes within microseconds.
//! - **Phases.** Connect at `--connect-rate` and join; send for `--warmup`,
//!   then measure for `--duration` (only messages *scheduled* in that window
//!   count towards latency and the delivery ratio); stop sending and wait
//!   `--drain` for in-flight deliveries; report; exit. Sockets use
//!   `TCP_NODELAY` and `SO_LINGER` 0, so exiting resets them and leaves no
//!   `TIME_WAIT` behind.
//! - **Trust.** The report gives the generator's own CPU use over the window
//!   (from `/proc/self/stat`, with a warning above 90 %), how late the sends
//!   went out (send lag), how many bytes waited unread in a sample of its
//!   sockets (the backlog: near zero while it keeps up, whatever its CPU
//!   use), and, when pinned to one CPU, how much of that CPU other processes
//!   or interrupts took (with a warning above 10 %).
//!
//! # Usage
//!
//! ```text
//! # 2,000 clients in 10 rooms of 200, 100 senders, 10k msg/s = 2M deliveries/s
//! # (Wardroom allows 128 connections per address by default: hence --sources)
//! taskset -c 1 wardroom-loadgen --url ws://127.0.0.1:8080/ws --clients 2000 \
//!     --rooms 10 --senders 100 --rate 10000 --warmup 3 --duration 10 \
//!     --sources 16 --server-pid $(pgrep -x wardroom) --json
//! # two nodes of a cluster: odd-numbered clients on the second, so messages
//! # cross from node to node through the broker
//! wardroom-loadgen --port 8081 --also-port 8082 --clients 200 --rooms 2 \
//!     --senders 20 --rate 2000 --ack
//! # server memory per idle connection
//! wardroom-loadgen --idle --clients 10000 --rooms 500 --sources 79 \
//!     --server-pid $PID --duration 10
//! ```
//!
//! Targets other than 127.0.0.0/8 and `::1` are refused. Each connection is
//! a file descriptor: the open-files limit (raised to its hard limit at
//! start) caps the number of clients of one process. Past ~28k connections
//! per source address, spread them with `--sources N`.

mod client;
mod frame;
mod histogram;
mod options;
mod pacer;
mod procfs;
mod state;
mod timer;

use std::cell::Cell;
use std::fmt::Write as _;
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use options::Options;
use state::Shared;
use timer::Timer;

/// How long to wait for every client to be connected and joined after the
/// last connection attempt started.
const JOIN_TIMEOUT: Duration = Duration::from_secs(15);

/// Interval of the server RSS sampler.
const RSS_SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// Own CPU use above which the results are flagged as untrustworthy.
const SATURATED_CPU_PERCENT: f64 = 90.0;

/// Use of the generator's (pinned) CPU by others above which a warning is
/// printed.
const OTHER_LOAD_PERCENT: f64 = 10.0;

fn main() -> ExitCode {
    let opts = match options::parse(std::env::args().skip(1)) {
        Ok(Some(opts)) => opts,
        Ok(None) => {
            print!("{}", options::USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{}", options::USAGE);
            return ExitCode::from(2);
        }
    };
    if let Err(e) = check_content_size(&opts) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    raise_fd_limit(opts.clients);
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, run(opts))
}

/// Refuses a `--size` too small for the largest stamp this run can write.
fn check_content_size(opts: &Options) -> Result<(), String> {
    let secs = (opts.warmup + opts.duration).as_secs_f64();
    let senders = opts.senders.max(1) as f64;
    let worst = frame::Stamp {
        sender: opts.senders.saturating_sub(1) as u64,
        seq: (opts.rate * secs / senders).ceil() as u64 + 1,
        sent_ns: 99_999_999_999_999, // ~28 hours
    };
    let mut stamp = Vec::new();
    frame::write_stamp(&mut stamp, u64::from(std::process::id()).max(9_999_999), worst);
    if opts.idle || opts.size >= stamp.len() {
        Ok(())
    } else {
        Err(format!("--size must be at least {} bytes to hold the stamp", stamp.len()))
    }
}

/// Raises the soft open-files limit to the hard one, and warns if even that
/// is too low for the connections asked for.
fn raise_fd_limit(clients: usize) {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write a valid rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    if (clients as u64).saturating_add(32) > limit.rlim_cur {
        eprintln!(
            "warning: open-files limit is {}: at most ~{} connections will succeed",
            limit.rlim_cur,
            (limit.rlim_cur).saturating_sub(32)
        );
    }
}

/// CPU readings at one instant.
#[derive(Clone, Copy)]
struct CpuSnapshot {
    /// When.
    at: Instant,
    /// The server's user+system ticks.
    server: Option<u64>,
    /// Our own user+system ticks.
    own: Option<u64>,
    /// Socket reads so far.
    reads: u64,
    /// Bytes read so far.
    read_bytes: u64,
    /// Message deliveries received so far.
    received: u64,
    /// Busy and total ticks of the CPU we are pinned to.
    pinned: Option<(u64, u64)>,
}

impl CpuSnapshot {
    /// Reads both processes now.
    fn take(shared: &Shared) -> Self {
        Self {
            at: Instant::now(),
            server: shared.opts.server_pid.and_then(|p| procfs::cpu_ticks(&p.to_string())),
            own: procfs::cpu_ticks("self"),
            reads: shared.c.reads.get(),
            read_bytes: shared.c.read_bytes.get(),
            received: shared.c.received_total.get(),
            pinned: procfs::pinned_cpu().and_then(procfs::cpu_line),
        }
    }
}

/// What the report needs besides the counters.
struct Outcome {
    /// Connect-and-join phase, seconds.
    connect_secs: f64,
    /// Measurement (or idle hold) window actually observed, seconds.
    window_secs: f64,
    /// Server CPU % over the window.
    server_cpu: Option<f64>,
    /// Own CPU % over the window.
    own_cpu: Option<f64>,
    /// Socket reads during the window.
    window_reads: u64,
    /// Bytes read during the window.
    window_read_bytes: u64,
    /// Deliveries received during the window.
    window_received: u64,
    /// The CPU the generator is pinned to, if just one.
    pinned_cpu: Option<usize>,
    /// How busy that CPU was over the window, by anything, in percent.
    pinned_busy: Option<f64>,
    /// Server RSS before connecting, KiB.
    rss_start: Option<u64>,
    /// Server RSS at the end, KiB.
    rss_end: Option<u64>,
    /// Highest server RSS sampled, KiB.
    rss_peak: Option<u64>,
    /// Idle mode: server RSS after settling, KiB.
    rss_settled: Option<u64>,
    /// Mean room size seen by the senders' messages.
    fanout: f64,
    /// The generator busy-polled (its CPU figure says nothing).
    busy_poll: bool,
    /// Whether the precise timer was used.
    precise_timer: bool,
}

/// Runs the whole test and prints the report.
async fn run(opts: Options) -> ExitCode {
    let start = Instant::now();
    let pid = opts.server_pid;
    let shared = Rc::new(Shared::new(opts, start));
    let opts = &shared.opts;

    let rss_start = pid.and_then(procfs::rss_kib);
    if let Some(p) = pid
        && rss_start.is_none()
    {
        eprintln!("warning: cannot read /proc/{p}/status; server figures will be missing");
    }
    let rss_peak = Rc::new(Cell::new(rss_start.unwrap_or(0)));
    if opts.busy_poll {
        // A task that is always ready: the runtime then polls for I/O with a
        // zero timeout instead of sleeping in epoll.
        tokio::task::spawn_local(async {
            loop {
                tokio::task::yield_now().await;
            }
        });
    }
    if let Some(p) = pid {
        tokio::task::spawn_local(sample_rss(p, Rc::clone(&rss_peak)));
    }

    eprintln!("connecting {} clients to {} at {}/s ...", opts.clients, opts.url, opts.connect_rate);
    let connect_start = Instant::now();
    let mut spawned = 0;
    let mut last_progress = Instant::now();
    while spawned < opts.clients {
        let due = ((connect_start.elapsed().as_secs_f64() * opts.connect_rate) as usize + 1).min(opts.clients);
        while spawned < due {
            tokio::task::spawn_local(client::run(Rc::clone(&shared), spawned));
            spawned += 1;
        }
        progress(&shared, &mut last_progress);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let deadline = Instant::now() + JOIN_TIMEOUT;
    while (shared.c.settled.get() as usize) < opts.clients && Instant::now() < deadline {
        progress(&shared, &mut last_progress);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connect_secs = connect_start.elapsed().as_secs_f64();
    eprintln!(
        "connected {}, joined {}, failed {} in {connect_secs:.2} s",
        shared.c.connected.get(),
        shared.c.joined.get(),
        shared.c.connect_failed.get() + shared.c.join_failed.get()
    );

    let room_size = shared.room_members.borrow().clone();
    let fanout = if opts.senders == 0 {
        0.0
    } else {
        (0..opts.senders).map(|s| room_size[s % opts.rooms] as f64).sum::<f64>() / opts.senders as f64
    };
    let mut outcome = Outcome {
        connect_secs,
        window_secs: 0.0,
        server_cpu: None,
        own_cpu: None,
        window_reads: 0,
        window_read_bytes: 0,
        window_received: 0,
        pinned_cpu: procfs::pinned_cpu(),
        pinned_busy: None,
        rss_start,
        rss_end: None,
        rss_peak: None,
        rss_settled: None,
        fanout,
        busy_poll: opts.busy_poll,
        precise_timer: false,
    };

    if shared.c.joined.get() > 0 {
        if opts.idle {
            let hold_from = Instant::now();
            tokio::time::sleep(opts.settle.min(opts.duration)).await;
            outcome.rss_settled = pid.and_then(procfs::rss_kib);
            let before = CpuSnapshot::take(&shared);
            tokio::time::sleep_until((hold_from + opts.duration.max(opts.settle)).into()).await;
            measure_cpu(&mut outcome, before, CpuSnapshot::take(&shared));
        } else {
            let timer = Timer::new(start);
            outcome.precise_timer = timer.is_precise();
            if !timer.is_precise() {
                eprintln!("warning: no timerfd; sends are paced by Tokio's 1 ms timer");
            }
            let send_from = shared.now_ns();
            let window_from = send_from + opts.warmup.as_nanos() as u64;
            let window_to = window_from + opts.duration.as_nanos() as u64;
            shared.window.set((window_from, window_to));
            eprintln!(
                "sending {} msg/s from {} senders: warmup {:?}, window {:?}, drain {:?}",
                opts.rate, opts.senders, opts.warmup, opts.duration, opts.drain
            );
            if opts.senders > 0 && opts.rate > 0.0 {
                let schedule = pacer::Pacer::new(opts.rate, opts.senders, send_from, window_to, room_size);
                shared.start_pacer(schedule);
                tokio::task::spawn_local(pacer::drive(Rc::clone(&shared), timer));
            }
            tokio::task::spawn_local(sample_backlog(Rc::clone(&shared)));
            tokio::time::sleep_until((start + Duration::from_nanos(window_from)).into()).await;
            let before = CpuSnapshot::take(&shared);
            tokio::time::sleep_until((start + Duration::from_nanos(window_to)).into()).await;
            measure_cpu(&mut outcome, before, CpuSnapshot::take(&shared));
            tokio::time::sleep(opts.drain).await;
        }
    }
    shared.stopping.set(true);
    outcome.rss_end = pid.and_then(procfs::rss_kib);
    if pid.is_some() {
        let peak = rss_peak.get().max(outcome.rss_end.unwrap_or(0));
        outcome.rss_peak = (peak > 0).then_some(peak);
    }

    print!("{}", human_report(&shared, &outcome));
    if opts.json {
        println!("{}", json_report(&shared, &outcome));
    }
    if shared.c.joined.get() == 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}

/// Fills in the CPU figures for the window between two snapshots.
fn measure_cpu(outcome: &mut Outcome, before: CpuSnapshot, after: CpuSnapshot) {
    let secs = after.at.duration_since(before.at).as_secs_f64();
    outcome.window_secs = secs;
    outcome.server_cpu = procfs::cpu_percent(before.server, after.server, secs);
    outcome.own_cpu = procfs::cpu_percent(before.own, after.own, secs);
    outcome.window_reads = after.reads - before.reads;
    outcome.window_read_bytes = after.read_bytes - before.read_bytes;
    outcome.window_received = after.received - before.received;
    if let (Some((busy0, total0)), Some((busy1, total1))) = (before.pinned, after.pinned) {
        outcome.pinned_busy = Some(ratio(busy1.saturating_sub(busy0), total1.saturating_sub(total0)) * 100.0);
    }
}

/// Prints connection progress to stderr about once a second.
fn progress(shared: &Shared, last: &mut Instant) {
    if last.elapsed() < Duration::from_secs(1) {
        return;
    }
    *last = Instant::now();
    let c = &shared.c;
    eprintln!(
        "  {} connected, {} joined, {} failed",
        c.connected.get(),
        c.joined.get(),
        c.connect_failed.get() + c.join_failed.get()
    );
}

/// Every 100 ms during the window, samples how many bytes wait unread in
/// the probe connections' receive queues: if the generator keeps up, they
/// stay near zero whatever its CPU use.
async fn sample_backlog(shared: Rc<Shared>) {
    let mut interval = tokio::time::interval(RSS_SAMPLE_INTERVAL);
    loop {
        interval.tick().await;
        if shared.stopping.get() {
            return;
        }
        if !shared.in_window(shared.now_ns()) {
            continue;
        }
        let probes = shared.backlog_probes.borrow();
        let mut backlog = shared.backlog.borrow_mut();
        for unread in probes.iter().filter_map(|conn| conn.unread_bytes()) {
            backlog.record(unread);
        }
    }
}

/// Keeps `peak` at the highest RSS of `pid` seen, every 100 ms.
async fn sample_rss(pid: u32, peak: Rc<Cell<u64>>) {
    let mut interval = tokio::time::interval(RSS_SAMPLE_INTERVAL);
    loop {
        interval.tick().await;
        if let Some(rss) = procfs::rss_kib(pid) {
            peak.set(peak.get().max(rss));
        }
    }
}

/// `part / whole`, or 0 when `whole` is 0.
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { part as f64 / whole as f64 }
}

/// KiB as MiB text, or `n/a`.
fn mib(kib: Option<u64>) -> String {
    kib.map_or_else(|| "n/a".to_owned(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

/// A percentage as text, or `n/a`.
fn pct(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1} %"))
}

/// Nanoseconds as milliseconds text.
fn ms(ns: u64) -> String {
    format!("{:.3} ms", ns as f64 / 1e6)
}

/// Whether the generator itself was (nearly) saturated. A busy-polling
/// generator always uses all of its CPU: only its backlog tells.
fn saturated(outcome: &Outcome) -> bool {
    !outcome.busy_poll && outcome.own_cpu.is_some_and(|c| c > SATURATED_CPU_PERCENT)
}

/// Percent of the generator's CPU used by anything else (other processes,
/// interrupts) over the window, when the generator is pinned to one CPU.
fn other_load(outcome: &Outcome) -> Option<f64> {
    Some((outcome.pinned_busy? - outcome.own_cpu?).max(0.0))
}

/// Idle mode: server RSS growth per joined connection, KiB.
fn rss_per_conn(shared: &Shared, outcome: &Outcome) -> Option<f64> {
    let (before, after) = (outcome.rss_start?, outcome.rss_settled?);
    let joined = shared.c.joined.get();
    (joined > 0).then(|| (after as f64 - before as f64) / joined as f64)
}

/// The summary for people.
fn human_report(shared: &Shared, o: &Outcome) -> String {
    let opts = &shared.opts;
    let c = &shared.c;
    let mut out = String::new();
    let _ = writeln!(out, "== wardroom-loadgen: {} ==", opts.url);
    let mode = if opts.idle {
        format!("idle, hold {:?}, settle {:?}", opts.duration, opts.settle)
    } else {
        format!(
            "{} senders, {} msg/s offered, {} B content, warmup {:?}, window {:?}, drain {:?}",
            opts.senders, opts.rate, opts.size, opts.warmup, opts.duration, opts.drain
        )
    };
    let _ = writeln!(out, "setup        {} clients in {} rooms; {mode}", opts.clients, opts.rooms);
    let _ = writeln!(
        out,
        "connections  {} connected, {} failed to connect; {} joined, {} failed to join ({:.2} s)",
        c.connected.get(),
        c.connect_failed.get(),
        c.joined.get(),
        c.join_failed.get(),
        o.connect_secs
    );
    if opts.idle {
        let per_conn = rss_per_conn(shared, o).map_or_else(|| "n/a".to_owned(), |k| format!("{k:.2} KiB"));
        let _ = writeln!(
            out,
            "server RSS   before {}, after settling {}, at end {}, peak {}",
            mib(o.rss_start),
            mib(o.rss_settled),
            mib(o.rss_end),
            mib(o.rss_peak)
        );
        let _ = writeln!(out, "per conn     {per_conn} of server RSS per joined connection");
        let _ = writeln!(
            out,
            "cpu          server {} while idle, loadgen {} (over {:.1} s)",
            pct(o.server_cpu),
            pct(o.own_cpu),
            o.window_secs
        );
    } else {
        let latency = shared.latency.borrow();
        let lag = shared.send_lag.borrow();
        let window = opts.duration.as_secs_f64();
        let _ = writeln!(
            out,
            "offered      {} msg/s x mean room size {:.1} = {:.0} deliveries/s",
            opts.rate,
            o.fanout,
            opts.rate * o.fanout
        );
        let _ = writeln!(
            out,
            "sent         {} in window ({:.1}/s), {} in all, {} skipped (sender down); send lag p50 {}, p99 {}, max {}{}",
            c.sent_window.get(),
            c.sent_window.get() as f64 / window,
            c.sent_total.get(),
            c.skipped.get(),
            ms(lag.quantile(0.5)),
            ms(lag.quantile(0.99)),
            ms(lag.max()),
            if o.precise_timer { "" } else { " (1 ms timer)" }
        );
        let _ = writeln!(
            out,
            "deliveries   expected {}, received {}, ratio {:.6}",
            c.expected_window.get(),
            c.received_window_sched.get(),
            ratio(c.received_window_sched.get(), c.expected_window.get())
        );
        let _ = writeln!(
            out,
            "throughput   {:.0} deliveries/s received during the window ({} received in all)",
            c.received_window_recv.get() as f64 / window,
            c.received_total.get()
        );
        let _ = writeln!(
            out,
            "latency      p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  mean {} (n={})",
            ms(latency.quantile(0.5)),
            ms(latency.quantile(0.9)),
            ms(latency.quantile(0.99)),
            ms(latency.quantile(0.999)),
            ms(latency.max()),
            ms(latency.mean() as u64),
            latency.count()
        );
        if shared.opts.ack {
            let acks = shared.ack_latency.borrow();
            let _ = writeln!(
                out,
                "acks         {} of {} in-window messages acknowledged ({:.0}/s); p50 {}  p99 {}  p99.9 {}  max {}",
                c.acked_window.get(),
                c.sent_window.get(),
                c.acked_window.get() as f64 / window,
                ms(acks.quantile(0.5)),
                ms(acks.quantile(0.99)),
                ms(acks.quantile(0.999)),
                ms(acks.max())
            );
        }
        let _ = writeln!(
            out,
            "server       RSS start {}, end {}, peak {}; CPU {} over the window",
            mib(o.rss_start),
            mib(o.rss_end),
            mib(o.rss_peak),
            pct(o.server_cpu)
        );
        let _ = writeln!(
            out,
            "loadgen      CPU {} over the window; {} reads, {:.1} deliveries and {:.0} bytes per read",
            pct(o.own_cpu),
            o.window_reads,
            ratio(o.window_received, o.window_reads),
            ratio(o.window_read_bytes, o.window_reads)
        );
        let backlog = shared.backlog.borrow();
        let _ = writeln!(
            out,
            "backlog      unread bytes per socket (sampled): mean {:.0}, p99 {}, max {} \
             (stays near zero while the generator keeps up)",
            backlog.mean(),
            backlog.quantile(0.99),
            backlog.max()
        );
    }
    let _ = writeln!(
        out,
        "problems     {} error frames, {} unexpected closes, {} foreign messages; {} pings answered",
        c.error_frames.get(),
        c.unexpected_closes.get(),
        c.foreign.get(),
        c.pings.get()
    );
    for (text, count) in shared.errors() {
        let _ = writeln!(out, "  {count} x {text}");
    }
    let unacked = shared.unacked.borrow();
    for ((sender, seq), at) in unacked.iter().take(10) {
        let _ = writeln!(out, "  not acknowledged: sender {sender} seq {seq}, scheduled at {}", ms(*at));
    }
    if unacked.len() > 10 {
        let _ = writeln!(out, "  ... {} not acknowledged in all", unacked.len());
    }
    if let (Some(cpu), Some(busy), Some(other)) = (o.pinned_cpu, o.pinned_busy, other_load(o)) {
        let _ = writeln!(
            out,
            "loadgen cpu  pinned to CPU {cpu}: {busy:.1} % busy over the window, {other:.1} % of it not the generator"
        );
        if other > OTHER_LOAD_PERCENT {
            let _ = writeln!(
                out,
                "WARNING: other processes or interrupts used {other:.1} % of CPU {cpu} during the window: \
                 the generator had to share its CPU; latency figures are disturbed"
            );
        }
    }
    if saturated(o) {
        let _ = writeln!(
            out,
            "WARNING: the load generator used {} of its CPU: it may be the bottleneck; \
             these results are not trustworthy{}",
            pct(o.own_cpu),
            if opts.idle { "" } else { " (unless the backlog above stayed near zero)" }
        );
    }
    out
}

/// The one-line JSON summary.
fn json_report(shared: &Shared, o: &Outcome) -> String {
    let opts = &shared.opts;
    let c = &shared.c;
    let latency = shared.latency.borrow();
    let lag = shared.send_lag.borrow();
    let backlog = shared.backlog.borrow();
    let acks = shared.ack_latency.borrow();
    let us = |ns: u64| format!("{:.1}", ns as f64 / 1e3);
    let num = |v: Option<f64>| v.map_or_else(|| "null".to_owned(), |v| format!("{v:.2}"));
    let int = |v: Option<u64>| v.map_or_else(|| "null".to_owned(), |v| v.to_string());
    let window = opts.duration.as_secs_f64();
    let errors = shared
        .errors()
        .iter()
        .map(|(text, count)| format!("{{\"count\":{count},\"error\":{}}}", json_string(text)))
        .collect::<Vec<_>>()
        .join(",");
    let mut out = String::from("{");
    let _ = write!(
        out,
        "\"mode\":\"{}\",\"url\":{},\"clients\":{},\"rooms\":{},\"duration_s\":{},\"connected\":{},\
         \"connect_failed\":{},\"joined\":{},\"join_failed\":{},\"connect_s\":{:.3},",
        if opts.idle { "idle" } else { "load" },
        json_string(&opts.url),
        opts.clients,
        opts.rooms,
        opts.duration.as_secs_f64(),
        c.connected.get(),
        c.connect_failed.get(),
        c.joined.get(),
        c.join_failed.get(),
        o.connect_secs
    );
    if !opts.idle {
        let _ = write!(
            out,
            "\"senders\":{},\"rate\":{},\"size\":{},\"warmup_s\":{},\"fanout\":{:.2},\"offered_deliveries_per_s\":{:.0},\"sent\":{},\"sent_in_window\":{},\"skipped\":{},\
             \"expected\":{},\"received\":{},\"delivery_ratio\":{:.6},\"delivered_per_s\":{:.0},\"received_total\":{},\
             \"latency_us\":{{\"p50\":{},\"p90\":{},\"p99\":{},\"p999\":{},\"max\":{},\"mean\":{},\"count\":{}}},\
             \"send_lag_us\":{{\"p50\":{},\"p99\":{},\"max\":{}}},\"precise_timer\":{},\
             \"backlog_bytes\":{{\"mean\":{:.0},\"p99\":{},\"max\":{}}},\
             \"acked\":{},\"ack_latency_us\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{}}},",
            opts.senders,
            opts.rate,
            opts.size,
            opts.warmup.as_secs_f64(),
            o.fanout,
            opts.rate * o.fanout,
            c.sent_total.get(),
            c.sent_window.get(),
            c.skipped.get(),
            c.expected_window.get(),
            c.received_window_sched.get(),
            ratio(c.received_window_sched.get(), c.expected_window.get()),
            c.received_window_recv.get() as f64 / window,
            c.received_total.get(),
            us(latency.quantile(0.5)),
            us(latency.quantile(0.9)),
            us(latency.quantile(0.99)),
            us(latency.quantile(0.999)),
            us(latency.max()),
            us(latency.mean() as u64),
            latency.count(),
            us(lag.quantile(0.5)),
            us(lag.quantile(0.99)),
            us(lag.max()),
            o.precise_timer,
            backlog.mean(),
            backlog.quantile(0.99),
            backlog.max(),
            c.acked_window.get(),
            us(acks.quantile(0.5)),
            us(acks.quantile(0.99)),
            us(acks.quantile(0.999)),
            us(acks.max())
        );
    }
    let _ = write!(
        out,
        "\"error_frames\":{},\"unexpected_closes\":{},\"foreign\":{},\"pings\":{},\"errors\":[{errors}],\
         \"server\":{{\"pid\":{},\"rss_start_kib\":{},\"rss_end_kib\":{},\"rss_peak_kib\":{},\"cpu_pct\":{}",
        c.error_frames.get(),
        c.unexpected_closes.get(),
        c.foreign.get(),
        c.pings.get(),
        int(opts.server_pid.map(u64::from)),
        int(o.rss_start),
        int(o.rss_end),
        int(o.rss_peak),
        num(o.server_cpu)
    );
    if opts.idle {
        let _ = write!(
            out,
            ",\"rss_settled_kib\":{},\"rss_per_conn_kib\":{}",
            int(o.rss_settled),
            num(rss_per_conn(shared, o))
        );
    }
    let _ = write!(
        out,
        "}},\"window_s\":{:.3},\"loadgen_cpu_pct\":{},\"loadgen_saturated\":{},\"busy_poll\":{},\"loadgen_reads\":{},\
         \"deliveries_per_read\":{:.2},\"loadgen_cpu_index\":{},\"loadgen_cpu_busy_pct\":{},\"other_load_pct\":{}}}",
        o.window_secs,
        num(o.own_cpu),
        saturated(o),
        o.busy_poll,
        o.window_reads,
        ratio(o.window_received, o.window_reads),
        int(o.pinned_cpu.map(|c| c as u64)),
        num(o.pinned_busy),
        num(other_load(o))
    );
    out
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for ch in text.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_string("a\"b\\c\nd\u{1}"), r#""a\"b\\c\nd\u0001""#);
    }
}
