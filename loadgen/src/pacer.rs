//! The open-loop send schedule.
//!
//! Message `k` (counting all senders together) is due at
//! `from + k / rate` seconds and goes out from sender `k % senders` as that
//! sender's message number `k / senders`: each sender sends at
//! `rate / senders` per second, and the senders are evenly interleaved. The
//! content carries the *scheduled* time, so if the generator or the server
//! stalls, the backlog is sent at once and shows up as latency instead of as
//! a lower offered rate.
//!
//! Sends are made from two places: a timer task (precise `timerfd`
//! wake-ups, for when the generator is idle) and every connection's read
//! loop, which checks after each read whether a send is due. Under load the
//! read loops run every few microseconds, so the schedule is kept even while
//! the timer task waits its turn behind hundreds of ready readers.

use std::rc::Rc;

use crate::client::build_message;
use crate::frame::Stamp;
use crate::state::Shared;
use crate::timer::Timer;

/// Shortest sleep of the timer task: above ~40k messages/s it sends small
/// batches instead of waking for every message (the extra delay, at most
/// this, is counted in the latency).
const MIN_WAKE_GAP_NS: u64 = 25_000;

/// The schedule's position and the buffers messages are built in.
pub struct Pacer {
    /// When message 0 is due (ns since the start).
    from_ns: u64,
    /// No message is due at or after this.
    until_ns: u64,
    /// Time between two messages, ns.
    period_ns: f64,
    /// Number of senders.
    senders: u64,
    /// Deliveries a message to room `r` should produce.
    room_size: Vec<u64>,
    /// Index of the next message.
    next: u64,
    /// The frame being built.
    frame: Vec<u8>,
    /// Scratch space for the payload.
    scratch: Vec<u8>,
}

impl Pacer {
    /// A schedule for `[from_ns, until_ns)` at `rate` messages/s from
    /// `senders` senders; `room_size[r]` is a message's fan-out in room `r`.
    pub fn new(rate: f64, senders: usize, from_ns: u64, until_ns: u64, room_size: Vec<u64>) -> Self {
        Self {
            from_ns,
            until_ns,
            period_ns: 1e9 / rate,
            senders: senders as u64,
            room_size,
            next: 0,
            frame: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// When message `k` is due.
    fn due(&self, k: u64) -> u64 {
        self.from_ns + (k as f64 * self.period_ns) as u64
    }

    /// When the next message is due (`u64::MAX` once the schedule is done).
    pub fn next_due(&self) -> u64 {
        let at = self.due(self.next);
        if at >= self.until_ns || self.senders == 0 { u64::MAX } else { at }
    }

    /// Sends every message due at `now`.
    pub fn send_due(&mut self, shared: &Shared, now: u64) {
        let size = shared.opts.size;
        loop {
            let at = self.next_due();
            if at > now {
                return;
            }
            let stamp = Stamp { sender: self.next % self.senders, seq: self.next / self.senders, sent_ns: at };
            self.next += 1;
            let senders = shared.senders.borrow();
            let conn = senders.get(stamp.sender as usize).and_then(Option::as_ref).filter(|c| c.is_ready());
            let Some(conn) = conn else {
                shared.c.skipped.inc();
                continue;
            };
            let built = build_message(
                &mut self.frame,
                &mut self.scratch,
                conn.room,
                shared.run_tag,
                stamp,
                size,
                shared.opts.ack,
            );
            if !built || !conn.send(&self.frame) {
                shared.c.skipped.inc();
                continue;
            }
            shared.c.sent_total.inc();
            if shared.in_window(at) {
                shared.c.sent_window.inc();
                if shared.opts.ack {
                    shared.unacked.borrow_mut().insert((stamp.sender, stamp.seq), at);
                }
                shared.c.expected_window.add(self.room_size.get(conn.room).copied().unwrap_or(0));
                shared.send_lag.borrow_mut().record(shared.now_ns().saturating_sub(at));
            }
        }
    }
}

/// The timer task: wakes when the next message is due (unless a read loop
/// sent it first) until the schedule is done.
pub async fn drive(shared: Rc<Shared>, timer: Timer) {
    loop {
        let next = shared.next_send_ns();
        if next == u64::MAX {
            return;
        }
        timer.sleep_until(next.max(shared.now_ns() + MIN_WAKE_GAP_NS)).await;
        shared.pace(u64::MAX);
    }
}
