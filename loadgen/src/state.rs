//! State shared by every task of the (single-threaded) generator: plain
//! `Cell`s and `RefCell`s behind one `Rc`, no locks or atomics.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Instant;

use crate::client::Conn;
use crate::histogram::Histogram;
use crate::options::Options;
use crate::pacer::Pacer;

/// Bytes asked of the kernel per read.
pub const READ_CHUNK: usize = 64 * 1024;

/// Connections whose unread receive queue is sampled.
pub const BACKLOG_PROBES: usize = 64;

/// How many distinct error texts are kept for the report.
const MAX_ERROR_KINDS: usize = 8;

/// A counter.
#[derive(Debug, Default)]
pub struct Counter(Cell<u64>);

impl Counter {
    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.set(self.0.get() + n);
    }

    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

/// Everything counted during a run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections whose WebSocket handshake succeeded.
    pub connected: Counter,
    /// Connections that failed to connect or upgrade.
    pub connect_failed: Counter,
    /// Connections that got `joined`.
    pub joined: Counter,
    /// Connections that got an error or closed before `joined`.
    pub join_failed: Counter,
    /// Connections done with connecting and joining (any outcome).
    pub settled: Counter,
    /// `error` frames received.
    pub error_frames: Counter,
    /// Joined connections that the server closed or that broke before the end.
    pub unexpected_closes: Counter,
    /// Pings answered.
    pub pings: Counter,
    /// Successful reads from sockets.
    pub reads: Counter,
    /// Bytes read from sockets.
    pub read_bytes: Counter,
    /// Message deliveries received, all of them.
    pub received_total: Counter,
    /// Deliveries of messages scheduled inside the window.
    pub received_window_sched: Counter,
    /// Deliveries received (at any schedule) while the window was open.
    pub received_window_recv: Counter,
    /// Message frames that were not ours (other run, unparsable content).
    pub foreign: Counter,
    /// Messages written to a socket.
    pub sent_total: Counter,
    /// Messages scheduled inside the window and written.
    pub sent_window: Counter,
    /// Deliveries expected for the messages in `sent_window`.
    pub expected_window: Counter,
    /// Scheduled messages not sent because their sender's connection was
    /// down or not joined.
    pub skipped: Counter,
    /// Acknowledgements received, all of them.
    pub acked_total: Counter,
    /// Acknowledgements of messages scheduled inside the window.
    pub acked_window: Counter,
}

/// The shared state.
pub struct Shared {
    /// The run's options.
    pub opts: Options,
    /// Start of the generator's clock; every `*_ns` is relative to it.
    pub start: Instant,
    /// Tag in every message's content, so deliveries from other runs are
    /// told apart.
    pub run_tag: u64,
    /// `g<run_tag>:`, the start of every content of this run.
    pub run_prefix: Vec<u8>,
    /// Measurement window `[start, end)` in ns; `u64::MAX` until sending starts.
    pub window: Cell<(u64, u64)>,
    /// Set once the results are being collected: closes after that are
    /// expected.
    pub stopping: Cell<bool>,
    /// The counters.
    pub c: Counters,
    /// Latency of deliveries of in-window messages, ns.
    pub latency: RefCell<Histogram>,
    /// How late the pacer sent in-window messages, ns.
    pub send_lag: RefCell<Histogram>,
    /// Time from scheduled send to `ack`, for in-window messages, ns.
    pub ack_latency: RefCell<Histogram>,
    /// In-window messages sent with `--ack` and not acknowledged yet, by
    /// (sender, seq), with their scheduled send time: what is left at the
    /// end is reported.
    pub unacked: RefCell<BTreeMap<(u64, u64), u64>>,
    /// Joined members per room.
    pub room_members: RefCell<Vec<u64>>,
    /// Connections whose receive queue is sampled (up to [`BACKLOG_PROBES`],
    /// spread over the client indexes).
    pub backlog_probes: RefCell<Vec<Rc<Conn>>>,
    /// Unread bytes seen in the probes' receive queues, one sample per
    /// probe every 100 ms during the window.
    pub backlog: RefCell<Histogram>,
    /// The sending connections, by client index (`None` until connected).
    pub senders: RefCell<Vec<Option<Rc<Conn>>>>,
    /// The one read buffer shared by all connections (only one reads at a
    /// time); grows if a connection carries over a large partial frame.
    pub read_buf: RefCell<Vec<u8>>,
    /// Distinct error texts with their counts.
    errors: RefCell<Vec<(String, u64)>>,
    /// The send schedule, once sending has started.
    pacer: RefCell<Option<Pacer>>,
    /// When the next message is due (`u64::MAX`: nothing to send).
    next_send: Cell<u64>,
}

impl Shared {
    /// Fresh state for a run.
    pub fn new(opts: Options, start: Instant) -> Self {
        let rooms = opts.rooms;
        let senders = opts.senders;
        Self {
            opts,
            start,
            run_tag: u64::from(std::process::id()),
            run_prefix: crate::frame::run_prefix(u64::from(std::process::id())),
            window: Cell::new((u64::MAX, u64::MAX)),
            stopping: Cell::new(false),
            c: Counters::default(),
            latency: RefCell::new(Histogram::new()),
            send_lag: RefCell::new(Histogram::new()),
            ack_latency: RefCell::new(Histogram::new()),
            unacked: RefCell::default(),
            room_members: RefCell::new(vec![0; rooms]),
            backlog_probes: RefCell::new(Vec::new()),
            backlog: RefCell::new(Histogram::new()),
            senders: RefCell::new(vec![None; senders]),
            read_buf: RefCell::new(vec![0; READ_CHUNK]),
            errors: RefCell::new(Vec::new()),
            pacer: RefCell::new(None),
            next_send: Cell::new(u64::MAX),
        }
    }

    /// Starts sending on `pacer`'s schedule.
    pub fn start_pacer(&self, pacer: Pacer) {
        self.next_send.set(pacer.next_due());
        *self.pacer.borrow_mut() = Some(pacer);
    }

    /// When the next message is due (`u64::MAX`: nothing more to send).
    pub fn next_send_ns(&self) -> u64 {
        self.next_send.get()
    }

    /// Sends whatever is due if `now` (a recent clock reading, or
    /// `u64::MAX` to force a check) has reached the next send time. Cheap
    /// when nothing is due: the read loops call it after every read.
    #[inline]
    pub fn pace(&self, now: u64) {
        if now >= self.next_send.get() {
            self.send_due();
        }
    }

    /// Sends every message due now.
    fn send_due(&self) {
        // Not re-entrant: a send never reads, so this cannot nest; if it
        // somehow did, the outer call sends everything anyway.
        let Ok(mut pacer) = self.pacer.try_borrow_mut() else {
            return;
        };
        if let Some(pacer) = pacer.as_mut() {
            pacer.send_due(self, self.now_ns());
            self.next_send.set(pacer.next_due());
        }
    }

    /// Nanoseconds since the start.
    #[inline]
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Whether `ns` falls in the measurement window.
    #[inline]
    pub fn in_window(&self, ns: u64) -> bool {
        let (from, to) = self.window.get();
        ns >= from && ns < to
    }

    /// Notes an error text for the report (grouped, first few kinds only).
    pub fn note_error(&self, text: String) {
        let mut errors = self.errors.borrow_mut();
        if let Some(entry) = errors.iter_mut().find(|(t, _)| *t == text) {
            entry.1 += 1;
        } else if errors.len() < MAX_ERROR_KINDS {
            errors.push((text, 1));
        }
    }

    /// The error texts noted, with counts.
    pub fn errors(&self) -> Vec<(String, u64)> {
        self.errors.borrow().clone()
    }
}
