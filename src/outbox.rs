//! The bounded queue of encoded frames waiting to be written to one client.
//!
//! The hub pushes shared frames ([`Bytes`] clones: a reference count, no copy)
//! from any task; the client's connection task takes everything queued at once
//! and writes it with one `write` (copied together, up to 64 KiB). The queue is
//! bounded twice, in frames and in bytes: a client whose queue is full in
//! either when a frame arrives is a slow consumer: its queue is dropped and it
//! is closed with 1008, so that nobody else waits for it. An empty queue takes
//! any frame, so one frame larger than the byte budget (a big `history` page)
//! still reaches a client that keeps up.
//!
//! The connection's reader pauses while the outbox's [backlog](Outbox::backlog)
//! reaches half the queue, in frames or in bytes. The backlog counts the frames
//! queued and the frames promised: replies the client's own requests will still
//! bring (an `ack` once the message is committed, a moderator's `done`), each
//! with the bytes reserved for it. Without them, a client that pipelines
//! requests could be read far ahead of its replies, whose burst after a commit
//! would then overflow the queue although the client reads promptly.
//!
//! A `std::sync::Mutex` (not a tokio one) guards the queue: it is held only for
//! a push or a swap, never across an `.await`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;

use crate::lock;
use crate::ws::{CloseCode, close_frame};

/// Why a connection ended, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent a Close frame.
    Client,
    /// The TCP connection ended without a close handshake.
    Gone,
    /// The client broke the WebSocket protocol (1002).
    ProtocolError,
    /// The client sent text that is not UTF-8 (1007).
    InvalidUtf8,
    /// The client sent a frame or message over the limits (1009).
    TooLarge,
    /// The client's outbound queue overflowed (1008).
    SlowConsumer,
    /// The client sent nothing within the first-frame deadline (1008).
    FirstFrameTimeout,
    /// Nothing arrived from the client for the idle timeout (1008).
    IdleTimeout,
    /// The server shut down (1001).
    Shutdown,
    /// A moderator or the escalation ladder kicked the user (1008).
    Kicked,
    /// The user is banned (1008).
    Banned,
    /// The token was missing, forged or expired (1008).
    Unauthorized,
}

impl CloseReason {
    /// Every reason, in declaration order (the order of metric arrays).
    pub const ALL: [CloseReason; 12] = [
        CloseReason::Client,
        CloseReason::Gone,
        CloseReason::ProtocolError,
        CloseReason::InvalidUtf8,
        CloseReason::TooLarge,
        CloseReason::SlowConsumer,
        CloseReason::FirstFrameTimeout,
        CloseReason::IdleTimeout,
        CloseReason::Shutdown,
        CloseReason::Kicked,
        CloseReason::Banned,
        CloseReason::Unauthorized,
    ];

    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Gone => "gone",
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::TooLarge => "too_large",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::FirstFrameTimeout => "first_frame_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Kicked => "kicked",
            CloseReason::Banned => "banned",
            CloseReason::Unauthorized => "unauthorized",
        }
    }

    /// The reason for a violation closed with `code`.
    pub fn for_violation(code: u16) -> Self {
        match code {
            CloseCode::INVALID_PAYLOAD => CloseReason::InvalidUtf8,
            CloseCode::TOO_BIG => CloseReason::TooLarge,
            _ => CloseReason::ProtocolError,
        }
    }
}

/// The result of [`Outbox::push`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// The frame will be written.
    Queued,
    /// The queue was full: the client is now being closed as a slow consumer.
    Overflow,
    /// The client is closing; the frame was dropped.
    Closed,
}

/// What [`Outbox::poll_next`] put in the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Frames to write; ask again afterwards.
    Frames,
    /// The last frames, ending with a Close frame: write them and stop writing.
    Closing,
}

/// Frames and bytes, of a queue or of what it must still hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Depth {
    /// Frames.
    pub frames: usize,
    /// Bytes of those frames.
    pub bytes: usize,
}

/// One client's outbound queue.
#[derive(Debug)]
pub struct Outbox {
    state: Mutex<State>,
    /// Most frames the queue may hold (fixed for the connection's life).
    capacity: usize,
    /// Most bytes the queue may hold, unless it holds a single frame
    /// (fixed for the connection's life).
    capacity_bytes: usize,
    /// Frames promised to this client and not yet queued (see the module
    /// docs). Raised without the lock by the client's own reader; lowered,
    /// and read for [`Outbox::backlog`], under it, so that a reply moving
    /// from promised to queued is counted once, never zero times.
    promised: AtomicUsize,
    /// Bytes reserved for the promised frames, kept like `promised`.
    promised_bytes: AtomicUsize,
    /// Set when a close drops what is queued (a slow consumer, a deadline):
    /// the writer then drops the frames it took and has not started either,
    /// so the Close frame follows at once. Read without the lock, per write.
    discarding: AtomicBool,
}

#[derive(Debug)]
struct State {
    /// Frames not yet handed to the writer.
    queue: VecDeque<Bytes>,
    /// Bytes of the frames in `queue`.
    bytes: usize,
    /// The writer's waker while it waits for frames.
    waker: Option<Waker>,
    /// The Close frame to send, until the writer takes it.
    close_frame: Option<Bytes>,
    /// When the close started (deadline for the close handshake).
    closing_since: Option<Instant>,
    /// Why the close started.
    close_reason: Option<CloseReason>,
}

impl Outbox {
    /// An empty outbox holding at most `capacity` frames and, unless it
    /// holds a single frame, `capacity_bytes` bytes.
    pub fn new(capacity: usize, capacity_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                waker: None,
                close_frame: None,
                closing_since: None,
                close_reason: None,
            }),
            capacity,
            capacity_bytes,
            promised: AtomicUsize::new(0),
            promised_bytes: AtomicUsize::new(0),
            discarding: AtomicBool::new(false),
        }
    }

    /// Queues a frame for this client.
    pub fn push(&self, frame: Bytes) -> Pushed {
        self.push_releasing(frame, Depth::default())
    }

    /// Promises `reply.frames` replies of at most about `reply.bytes` bytes
    /// in all (see the module docs); each must be released once queued or
    /// given up, with [`Outbox::push_releasing`] or [`Outbox::release`]
    /// (`client::Reply` pairs them).
    pub fn promise(&self, reply: Depth) {
        self.promised.fetch_add(reply.frames, Ordering::Relaxed);
        self.promised_bytes.fetch_add(reply.bytes, Ordering::Relaxed);
    }

    /// Queues a frame and, in the same step, releases a promise made with
    /// [`Outbox::promise`] (the frame is the reply that was promised).
    ///
    /// The queue overflows when it holds `capacity` frames, or when the
    /// frame would take it past `capacity_bytes`; an empty queue takes any
    /// frame.
    #[inline]
    pub fn push_releasing(&self, frame: Bytes, released: Depth) -> Pushed {
        let (pushed, waker) = {
            let mut state = lock(&self.state);
            if released != Depth::default() {
                self.release_locked(released);
            }
            if state.closing_since.is_some() {
                return Pushed::Closed;
            }
            let full = state.queue.len() >= self.capacity || state.bytes + frame.len() > self.capacity_bytes;
            if full && !state.queue.is_empty() {
                self.discard(&mut state);
                state.start_close(CloseCode::POLICY, "slow consumer", CloseReason::SlowConsumer);
                (Pushed::Overflow, state.waker.take())
            } else {
                state.bytes += frame.len();
                state.queue.push_back(frame);
                (Pushed::Queued, state.waker.take())
            }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        pushed
    }

    /// Releases a promise whose frames will not be queued (or were queued
    /// already), and wakes the connection: its reader may have paused for
    /// them.
    pub fn release(&self, promise: Depth) {
        let waker = {
            let mut state = lock(&self.state);
            self.release_locked(promise);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Lowers the promised counts; called with the state locked.
    fn release_locked(&self, promise: Depth) {
        self.promised.fetch_sub(promise.frames, Ordering::Relaxed);
        self.promised_bytes.fetch_sub(promise.bytes, Ordering::Relaxed);
    }

    /// Drops what is queued, and tells the writer to drop what it took.
    fn discard(&self, state: &mut State) {
        state.queue = VecDeque::new();
        state.bytes = 0;
        self.discarding.store(true, Ordering::Relaxed);
    }

    /// Starts closing the client: what is queued is written first (or dropped
    /// when `discard` is set), then a Close frame with `code` and `reason`.
    /// Returns false if a close had already started.
    pub fn close(&self, code: u16, reason: &str, why: CloseReason, discard: bool) -> bool {
        let waker = {
            let mut state = lock(&self.state);
            if state.closing_since.is_some() {
                return false;
            }
            if discard {
                self.discard(&mut state);
            }
            state.start_close(code, reason, why);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// When the close started, if it has.
    pub fn closing_since(&self) -> Option<Instant> {
        lock(&self.state).closing_since
    }

    /// Why the close started, if it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        lock(&self.state).close_reason
    }

    /// Whether the close under way drops what is queued, and the frames
    /// the writer took but has not started writing too.
    pub fn discarding(&self) -> bool {
        self.discarding.load(Ordering::Relaxed)
    }

    /// Most frames it holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Frames waiting (not yet taken by the writer).
    pub fn len(&self) -> usize {
        lock(&self.state).queue.len()
    }

    /// Frames and bytes waiting (not yet taken by the writer).
    pub fn depth(&self) -> Depth {
        let state = lock(&self.state);
        Depth { frames: state.queue.len(), bytes: state.bytes }
    }

    /// Frames waiting plus frames promised, and their bytes (those of
    /// promised frames as reserved): what the queue must still be able to
    /// hold for this client's requests so far.
    pub fn backlog(&self) -> Depth {
        let state = lock(&self.state);
        Depth {
            frames: state.queue.len() + self.promised.load(Ordering::Relaxed),
            bytes: state.bytes + self.promised_bytes.load(Ordering::Relaxed),
        }
    }

    /// Whether the [backlog](Outbox::backlog) has reached half the queue, in
    /// frames or in bytes: the point at which the client's reader pauses, so
    /// that the replies to what it read still fit in the other half.
    pub fn half_full(&self) -> bool {
        let backlog = self.backlog();
        backlog.frames >= (self.capacity / 2).max(1) || backlog.bytes >= (self.capacity_bytes / 2).max(1)
    }

    /// Frames waiting, or `None` once the close has started (one lock, for
    /// the writer's pacing check).
    pub fn len_unless_closing(&self) -> Option<usize> {
        let state = lock(&self.state);
        state.closing_since.is_none().then_some(state.queue.len())
    }

    /// Whether no frame is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves everything queued into the writer's empty `batch`, or registers
    /// the writer's waker if there is nothing to take.
    pub fn poll_next(&self, cx: &mut Context<'_>, batch: &mut VecDeque<Bytes>) -> Poll<Next> {
        debug_assert!(batch.is_empty());
        let mut state = lock(&self.state);
        std::mem::swap(&mut state.queue, batch);
        state.bytes = 0;
        if let Some(frame) = state.close_frame.take() {
            batch.push_back(frame);
            return Poll::Ready(Next::Closing);
        }
        if !batch.is_empty() {
            return Poll::Ready(Next::Frames);
        }
        match &state.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => state.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl State {
    fn start_close(&mut self, code: u16, reason: &str, why: CloseReason) {
        self.close_frame = Some(close_frame(code, reason));
        self.closing_since = Some(Instant::now());
        self.close_reason = Some(why);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn next(outbox: &Outbox) -> (Poll<Next>, Vec<Bytes>) {
        let mut batch = VecDeque::new();
        let poll = outbox.poll_next(&mut Context::from_waker(Waker::noop()), &mut batch);
        (poll, batch.into_iter().collect())
    }

    /// A promise of `frames` frames of 10 bytes each.
    fn replies(frames: usize) -> Depth {
        Depth { frames, bytes: frames * 10 }
    }

    #[test]
    fn overflow_drops_the_queue_and_closes_with_1008() {
        let outbox = Outbox::new(2, 1024);
        assert_eq!(outbox.push(Bytes::from_static(b"a")), Pushed::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"b")), Pushed::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"c")), Pushed::Overflow);
        assert_eq!(outbox.push(Bytes::from_static(b"d")), Pushed::Closed);
        let (poll, batch) = next(&outbox);
        assert_eq!(poll, Poll::Ready(Next::Closing));
        assert_eq!(batch, vec![close_frame(1008, "slow consumer")]);
    }

    #[test]
    fn a_frame_past_the_byte_budget_overflows_unless_the_queue_is_empty() {
        let outbox = Outbox::new(8, 10);
        let page = Bytes::from(vec![b'p'; 25]);
        assert_eq!(outbox.push(page.clone()), Pushed::Queued, "an empty queue takes a frame over the budget");
        assert_eq!(outbox.depth(), Depth { frames: 1, bytes: 25 });
        let (poll, batch) = next(&outbox);
        assert_eq!((poll, batch), (Poll::Ready(Next::Frames), vec![page]));
        assert_eq!(outbox.depth(), Depth::default(), "the writer took the bytes with the frames");
        assert_eq!(outbox.push(Bytes::from_static(b"12345")), Pushed::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"67890")), Pushed::Queued);
        assert!(!outbox.discarding());
        assert_eq!(outbox.push(Bytes::from_static(b"!")), Pushed::Overflow);
        assert!(outbox.discarding(), "the writer must drop what it took too");
        assert_eq!(outbox.depth(), Depth::default());
        let (poll, batch) = next(&outbox);
        assert_eq!((poll, batch), (Poll::Ready(Next::Closing), vec![close_frame(1008, "slow consumer")]));
    }

    #[test]
    fn the_reader_pauses_at_half_the_queue_in_frames_or_in_bytes() {
        let outbox = Outbox::new(4, 100);
        outbox.push(Bytes::from_static(b"a"));
        assert!(!outbox.half_full());
        outbox.push(Bytes::from_static(b"b"));
        assert!(outbox.half_full(), "2 of 4 frames");
        let outbox = Outbox::new(4, 100);
        outbox.push(Bytes::from(vec![b'x'; 49]));
        assert!(!outbox.half_full());
        outbox.promise(Depth { frames: 0, bytes: 1 });
        assert!(outbox.half_full(), "49 bytes queued and 1 reserved of 100");
    }

    #[test]
    fn close_without_discard_flushes_queued_frames_first() {
        let outbox = Outbox::new(8, 1024);
        outbox.push(Bytes::from_static(b"a"));
        assert!(outbox.close(1001, "bye", CloseReason::Shutdown, false));
        assert!(!outbox.close(1000, "again", CloseReason::Client, false));
        assert_eq!(outbox.close_reason(), Some(CloseReason::Shutdown));
        let (poll, batch) = next(&outbox);
        assert_eq!(poll, Poll::Ready(Next::Closing));
        assert_eq!(batch, vec![Bytes::from_static(b"a"), close_frame(1001, "bye")]);
    }

    #[test]
    fn promised_frames_count_in_the_backlog_until_queued_or_released() {
        let outbox = Outbox::new(4, 1024);
        outbox.promise(replies(2));
        assert_eq!((outbox.len(), outbox.backlog()), (0, Depth { frames: 2, bytes: 20 }));
        assert_eq!(outbox.push_releasing(Bytes::from_static(b"echo"), Depth::default()), Pushed::Queued);
        assert_eq!((outbox.len(), outbox.backlog()), (1, Depth { frames: 3, bytes: 24 }));
        assert_eq!(outbox.push_releasing(Bytes::from_static(b"ack"), replies(2)), Pushed::Queued);
        assert_eq!((outbox.len(), outbox.backlog()), (2, Depth { frames: 2, bytes: 7 }));
        outbox.promise(replies(1));
        outbox.release(replies(1));
        assert_eq!(outbox.backlog(), Depth { frames: 2, bytes: 7 });
        // Closing drops the frame, not the release.
        outbox.promise(replies(1));
        outbox.close(1001, "bye", CloseReason::Shutdown, true);
        assert_eq!(outbox.push_releasing(Bytes::from_static(b"late"), replies(1)), Pushed::Closed);
        assert_eq!(outbox.backlog(), Depth::default());
    }

    #[test]
    fn a_release_wakes_the_waiting_connection() {
        struct Flag(std::sync::atomic::AtomicBool);
        impl std::task::Wake for Flag {
            fn wake(self: std::sync::Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = std::sync::Arc::new(Flag(false.into()));
        let waker = Waker::from(flag.clone());
        let outbox = Outbox::new(4, 1024);
        outbox.promise(replies(1));
        let mut batch = VecDeque::new();
        assert!(outbox.poll_next(&mut Context::from_waker(&waker), &mut batch).is_pending());
        outbox.release(replies(1));
        assert!(flag.0.load(Ordering::SeqCst), "the reader paused for the promise must look again");
    }

    #[test]
    fn empty_outbox_is_pending() {
        assert_eq!(next(&Outbox::new(1, 1)).0, Poll::Pending);
    }
}
