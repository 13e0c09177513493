//! One client connection after the upgrade, served by one task on the raw
//! `TcpStream`. The task drives two independent halves:
//!
//! - the writer takes everything queued in the client's outbox at once and
//!   writes it with one `write` (each message stays its own frame). A poll
//!   writes only before it reads, and one that finds the socket readable
//!   reads first: under load, every connection of a scheduler round reads
//!   before any writes, so each writes once per round. A connection that
//!   wrote less than [`WRITE_PACE`] ago, with little queued, waits for the
//!   hub's write pacer to wake it, so a busy connection writes at most about
//!   once per pace;
//! - the reader waits for readability, reads into a per-thread scratch buffer
//!   (an idle connection owns no read buffer), parses frames and acts on them.
//!   It never waits for the writer, except by design: while the client's own
//!   outbox is at least half full, in frames or in bytes, counting the
//!   replies its requests still owe it (`Outbox::backlog`), the reader
//!   pauses, so a client that sends faster than it reads is slowed by TCP
//!   instead of buffered without bound, and the replies to what it
//!   pipelined always fit in its queue.
//!   It also pauses after `REQUESTS_PER_POLL` requests and yields the
//!   worker thread, so a client that keeps requests in flight (history
//!   pages, say) is served in turn with everyone else rather than first.
//!
//! One task instead of a reader task and a writer task saves a task and a
//! shared socket per connection (`docs/design.md`). Deadlines (first frame,
//! idle, close handshake) are enforced by the hub's sweeper, so a connection
//! carries no timer either.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;

use crate::admission::Ticket;
use crate::client::{Client, IdentityKind};
use crate::hub::Hub;
use crate::outbox::{CloseReason, Next};
use crate::protocol::{ClientFrame, ErrorCode, Request, RequestError, parse_client_frame};
use crate::ws::{CloseCode, Event, Flow, MessageReader, OpCode, Violation, encode_control};

/// Size of the per-thread read buffer.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Largest batch buffer (in frames) a connection keeps between bursts.
const KEPT_BATCH_CAPACITY: usize = 16;

/// Most bytes of frames copied together for one `write`. Copying queued
/// frames into one buffer and writing it costs less than a `writev` of one
/// iovec per frame, whose per-iovec copy in the kernel took a fifth of the
/// runtime thread (see docs/design.md).
const GATHER_BYTES: usize = 64 * 1024;

/// Most data frames (requests) one poll of a connection handles before it
/// yields to the other tasks on its worker thread. Tokio's coop budget counts
/// readiness checks, not work, and one read can carry hundreds of requests.
const REQUESTS_PER_POLL: u32 = 16;

/// A busy connection writes at most once per this long, unless much is
/// queued: under load, each write then carries more frames.
pub(crate) const WRITE_PACE: Duration = Duration::from_millis(2);

/// Frames queued at which a connection writes without waiting for the pace.
const PACE_FRAMES: usize = 256;

thread_local! {
    /// Every connection on a thread reads into this buffer in turn; it is
    /// borrowed only for the synchronous processing of one read.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
    /// Frames of one connection are copied here for one `write` (the
    /// connection's next frames, not yet written, stay in its batch).
    static GATHER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(GATHER_BYTES));
}

/// Completes one upgrade: waits for hyper to hand the socket back, welcomes
/// the client, and spawns the [`Connection`] task that serves it. The client
/// was counted by [`Hub::new_client`]; if the upgrade fails (or this task is
/// aborted), it is removed from the hub here.
///
/// The long-lived task's future is the `Connection` alone, so an idle
/// connection costs no more than that struct (see `docs/design.md`).
pub async fn upgrade(
    hub: Arc<Hub>,
    client: Arc<Client>,
    on_upgrade: OnUpgrade,
    requested_nick: Option<String>,
    token: Option<String>,
    ticket: Option<Ticket>,
) {
    let mut pending = Pending { hub: &hub, client: &client, armed: true };
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!(conn = client.id, error = %e, "upgrade did not complete");
            return;
        }
    };
    let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
        tracing::error!(conn = client.id, "upgraded connection is not a TCP stream");
        return;
    };
    hub.register(&client, requested_nick.as_deref(), token.as_deref());
    tracing::debug!(conn = client.id, addr = %client.addr, "connected");

    let policies = hub.policies();
    let limits = &policies.config.limits;
    let mut conn = Connection {
        session: Session { hub: hub.clone(), client: client.clone() },
        stream: parts.io.into_inner(),
        reader: MessageReader::new(limits.max_frame_bytes, limits.max_message_bytes),
        batch: VecDeque::new(),
        partial: false,
        read_end: None,
        write_owed: false,
        pacing: false,
        last_write: Instant::now().checked_sub(WRITE_PACE).unwrap_or_else(Instant::now),
        paused: false,
        budget: REQUESTS_PER_POLL,
        close_taken: false,
        close_written: false,
        lingering: false,
        _ticket: ticket,
    };
    if !parts.read_buf.is_empty() {
        // Bytes the client sent right behind its upgrade request.
        client.touch(hub.now());
        if hub.awaiting_welcome(&client) {
            // Handled once the welcome is out (see `Connection::poll_chat`).
            conn.reader.keep(&parts.read_buf);
            conn.paused = true;
        } else {
            let mut early = parts.read_buf.to_vec();
            conn.feed(&mut early);
        }
    }
    // From here the Connection removes the client from the hub when it ends.
    pending.armed = false;
    let task = tokio::spawn(conn);
    client.set_task(task.abort_handle());
}

/// Removes a client whose upgrade did not complete.
struct Pending<'a> {
    hub: &'a Hub,
    client: &'a Arc<Client>,
    /// Cleared once the client is handed to its [`Connection`].
    armed: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.hub.disconnect(self.client);
        }
    }
}

/// How the reading side ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// The peer closed the TCP connection, or the socket failed.
    Gone,
    /// The peer sent a Close frame.
    ClientClosed,
    /// The peer broke the protocol; a Close frame with the reason is queued.
    Failed,
}

/// One upgraded connection: the future of its task. Dropping it (when it
/// completes, or when the task is aborted) removes the client from the hub.
pub struct Connection {
    /// What the reader needs to act on events.
    session: Session,
    /// The socket.
    stream: TcpStream,
    /// Frame parsing state.
    reader: MessageReader,
    /// Frames taken from the outbox and not yet fully written.
    batch: VecDeque<Bytes>,
    /// The first frame of `batch` is partly written: it must be finished
    /// before anything else, a Close frame included.
    partial: bool,
    /// Set once reading is over.
    read_end: Option<ReadEnd>,
    /// The last poll read and yielded: this one writes before reading.
    write_owed: bool,
    /// This poll's write waits for the write pacer (see [`WRITE_PACE`]).
    pacing: bool,
    /// When the last write happened.
    last_write: Instant,
    /// The reader paused (outbox backlog or spent budget) with input left
    /// to handle.
    paused: bool,
    /// Requests this poll may still handle; see [`REQUESTS_PER_POLL`].
    budget: u32,
    /// The Close frame is in `batch`: nothing more will be taken.
    close_taken: bool,
    /// The Close frame has been written.
    close_written: bool,
    /// After failing the connection: our side is shut, the client's input
    /// is drained until it closes, so it reads our Close frame, not a reset.
    lingering: bool,
    /// The connection's admission slots, freed when it ends.
    _ticket: Option<Ticket>,
}

impl Future for Connection {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let conn = self.get_mut();
        if !conn.lingering {
            match ready!(conn.poll_chat(cx)) {
                ReadEnd::Failed => conn.lingering = true,
                ReadEnd::Gone | ReadEnd::ClientClosed => return Poll::Ready(()),
            }
        }
        conn.poll_linger(cx)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let Session { hub, client } = &self.session;
        hub.disconnect(client);
        hub.record_close(client);
    }
}

impl Connection {
    /// Drives both halves; ready when the close handshake is over.
    ///
    /// A poll writes only before it reads. When the socket is readable and
    /// nothing is owed, it reads first; once it has read, what it owes is
    /// written at its next poll, which it asks for by yielding. Under load
    /// every connection in a round of the scheduler reads before any of
    /// them writes, so each writes once per round what the whole round
    /// produced, instead of once before and once after its own read.
    fn poll_chat(&mut self, cx: &mut Context<'_>) -> Poll<ReadEnd> {
        self.budget = REQUESTS_PER_POLL;
        let owed = std::mem::take(&mut self.write_owed);
        // Found with nothing to read: its read waker is registered, and
        // nothing in this poll reads it, so a read would only check again.
        let unreadable = !owed && !self.stream.poll_read_ready(cx).is_ready();
        // A close that drops the queue (a slow consumer) sends its Close
        // frame now, without reading first.
        let mut may_write = owed || unreadable || self.session.client.outbox.discarding();
        self.pacing = may_write && self.write_must_wait();
        if self.pacing {
            self.session.hub.pace_write(cx.waker());
            self.write_owed = true;
            may_write = false;
        }
        loop {
            if may_write && let Err(e) = ready!(self.poll_write(cx)) {
                tracing::debug!(conn = self.session.client.id, error = %e, "write failed");
                return Poll::Ready(ReadEnd::Gone);
            }
            match (self.read_end, self.close_written) {
                (None, _) => {}
                // Reading is over (the client may have shut its side after
                // its last frame): what is queued, a Close frame included,
                // still goes out before the connection ends.
                (Some(_), _) if !may_write => {
                    may_write = true;
                    continue;
                }
                (Some(ReadEnd::Gone), _) => return Poll::Ready(ReadEnd::Gone),
                (Some(end), true) => return Poll::Ready(end),
                // The Close frame is still being written.
                (Some(_), false) => return Poll::Pending,
            }
            if self.session.hub.awaiting_welcome(&self.session.client) {
                // Requests wait for the welcome (a cluster confirming a
                // guest's nickname); pushing it wakes us through the outbox.
                return self.owe_write(cx, may_write);
            }
            if self.paused {
                if self.session.client.outbox.half_full() {
                    // The writer must drain the outbox first (if it is
                    // blocked on the socket, it will wake us), and promised
                    // replies must arrive (queuing or releasing them wakes
                    // us through the outbox).
                    return self.owe_write(cx, may_write);
                }
                if self.budget == 0 {
                    return self.owe_write(cx, false);
                }
                self.paused = false;
                let (session, budget) = (&self.session, &mut self.budget);
                let result = self.reader.resume(|event| session.on_event(event, budget));
                self.after_feed(result);
                may_write = false;
                continue;
            }
            if unreadable {
                return self.owe_write(cx, may_write);
            }
            match self.poll_read(cx) {
                Poll::Ready(true) => may_write = false,
                Poll::Ready(false) => {}
                Poll::Pending => return self.owe_write(cx, may_write),
            }
        }
    }

    /// Ends a poll. One that did not write yields, so that it writes (and
    /// registers for the outbox) at its next poll, after the tasks already
    /// queued on this thread.
    fn owe_write(&mut self, cx: &mut Context<'_>, wrote: bool) -> Poll<ReadEnd> {
        if wrote || self.pacing {
            self.write_owed |= self.pacing;
            return Poll::Pending;
        }
        self.write_owed = true;
        yield_now(cx)
    }

    /// Whether a write due now waits for the pacer: the connection wrote
    /// less than [`WRITE_PACE`] ago, little is queued, and it is not closing.
    fn write_must_wait(&self) -> bool {
        self.batch.is_empty()
            && self.read_end.is_none()
            && self.last_write.elapsed() < WRITE_PACE
            && self.session.client.outbox.len_unless_closing().is_some_and(|queued| queued < PACE_FRAMES)
    }

    /// Shuts our side and discards input until the client closes its side.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if Pin::new(&mut self.stream).poll_shutdown(cx).is_pending() {
            return Poll::Pending;
        }
        loop {
            if ready!(self.stream.poll_read_ready(cx)).is_err() {
                return Poll::Ready(());
            }
            let done = SCRATCH.with_borrow_mut(|buf| match self.stream.try_read(buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != io::ErrorKind::WouldBlock,
            });
            if done {
                return Poll::Ready(());
            }
        }
    }

    /// Writes the batch, refilling it from the outbox, until both are empty
    /// (ready) or the socket is full (pending).
    ///
    /// Once a close drops the queue (a slow consumer), the frames taken and
    /// not yet started are dropped too: the Close frame goes out right after
    /// the frame being written, instead of behind up to a whole queue that a
    /// client this far behind may never read within the close deadline.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.close_taken && self.session.client.outbox.discarding() {
                self.batch.truncate(usize::from(self.partial));
            }
            while !self.batch.is_empty() {
                ready!(self.stream.poll_write_ready(cx))?;
                match write_batch(&self.stream, &self.batch) {
                    Ok(written) => {
                        self.last_write = Instant::now();
                        let (frames, partial) = advance(&mut self.batch, written);
                        self.partial = partial || (self.partial && frames == 0);
                        let metrics = &self.session.hub.metrics;
                        metrics.frames_out.add(frames);
                        metrics.socket_writes.inc();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            if self.close_taken {
                self.close_written = true;
                return Poll::Ready(Ok(()));
            }
            // The emptied buffer goes back to the outbox for the next frames,
            // unless a burst made it large: then to the allocator, so that a
            // quiet connection holds little queue memory.
            if self.batch.capacity() > KEPT_BATCH_CAPACITY {
                self.batch = VecDeque::new();
            }
            match self.session.client.outbox.poll_next(cx, &mut self.batch) {
                Poll::Ready(Next::Frames) => {}
                Poll::Ready(Next::Closing) => self.close_taken = true,
                Poll::Pending => return Poll::Ready(Ok(())),
            }
        }
    }

    /// Reads once and handles what arrived. Ready(true) when something was
    /// read (call again), Ready(false) when the socket has nothing for now.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if let Err(e) = ready!(self.stream.poll_read_ready(cx)) {
            tracing::debug!(conn = self.session.client.id, error = %e, "read failed");
            self.read_end = Some(ReadEnd::Gone);
            return Poll::Ready(true);
        }
        let outcome = SCRATCH.with_borrow_mut(|buf| match self.stream.try_read(buf) {
            Ok(0) => Err(ReadEnd::Gone),
            Ok(n) => {
                self.session.client.touch(self.session.hub.now());
                self.feed(&mut buf[..n]);
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(_) => Err(ReadEnd::Gone),
        });
        match outcome {
            Ok(read) => Poll::Ready(read),
            Err(end) => {
                self.read_end = Some(end);
                Poll::Ready(true)
            }
        }
    }

    fn feed(&mut self, data: &mut [u8]) {
        // Limits follow the running config: a reload applies to open connections.
        let limits = &self.session.hub.policies().config.limits;
        self.reader.set_limits(limits.max_frame_bytes, limits.max_message_bytes);
        let (session, budget) = (&self.session, &mut self.budget);
        let result = self.reader.feed(data, |event| session.on_event(event, budget));
        self.after_feed(result);
    }

    fn after_feed(&mut self, result: Result<Flow, Violation>) {
        match result {
            Ok(Flow::Continue) => {}
            Ok(Flow::Pause) => self.paused = true,
            Ok(Flow::Stop) => self.read_end = Some(ReadEnd::ClientClosed),
            Err(violation) => {
                let client = &self.session.client;
                tracing::debug!(conn = client.id, code = violation.code, reason = %violation.reason, "protocol violation");
                client.outbox.close(
                    violation.code,
                    &violation.reason,
                    CloseReason::for_violation(violation.code),
                    false,
                );
                self.read_end = Some(ReadEnd::Failed);
            }
        }
    }
}

/// Ends this poll and asks to be polled again once the tasks already queued
/// on this worker have run: the waker fires while the task is running, so
/// tokio requeues it behind them (not in the LIFO slot).
fn yield_now(cx: &mut Context<'_>) -> Poll<ReadEnd> {
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// One `write` of the first frames of `batch`: a frame alone is written as
/// it is; several are copied into one buffer first (up to [`GATHER_BYTES`]).
/// Returns the bytes written, as `writev` would.
fn write_batch(stream: &TcpStream, batch: &VecDeque<Bytes>) -> io::Result<usize> {
    let Some(first) = batch.front() else { return Ok(0) };
    if batch.len() == 1 || first.len() >= GATHER_BYTES {
        return stream.try_write(first);
    }
    GATHER.with_borrow_mut(|buf| {
        buf.clear();
        for frame in batch {
            if buf.len() + frame.len() > GATHER_BYTES {
                break;
            }
            buf.extend_from_slice(frame);
        }
        stream.try_write(buf)
    })
}

/// Drops `written` bytes from the front of `batch`; returns how many frames
/// were completed, and whether the write ended inside a frame.
fn advance(batch: &mut VecDeque<Bytes>, mut written: usize) -> (u64, bool) {
    let mut completed = 0;
    while let Some(front) = batch.front_mut() {
        if written < front.len() {
            front.advance(written);
            return (completed, written > 0);
        }
        written -= front.len();
        batch.pop_front();
        completed += 1;
    }
    (completed, false)
}

/// What the reader needs to act on events.
struct Session {
    hub: Arc<Hub>,
    client: Arc<Client>,
}

impl Session {
    /// Acts on one event; pauses reading once the client's outbox backlog
    /// (queued and promised frames) reaches half its queue, in frames or in
    /// bytes, or the poll's request `budget` is spent.
    fn on_event(&self, event: Event<'_>, budget: &mut u32) -> Flow {
        let closing = self.client.outbox.closing_since().is_some();
        match event {
            Event::Close(code) => {
                let code = code.map_or(CloseCode::NORMAL, |(code, _)| code);
                self.client.outbox.close(code, "", CloseReason::Client, false);
                return Flow::Stop;
            }
            Event::Ping(payload) => {
                self.client.outbox.push(encode_control(OpCode::Pong, payload));
            }
            Event::Pong => {}
            // Once we are closing, data frames are read and ignored.
            _ if closing => {}
            Event::Binary => {
                *budget = budget.saturating_sub(1);
                self.client.outbox.push(
                    RequestError::new(ErrorCode::Unsupported, "binary frames are not supported; send JSON text frames")
                        .to_frame(),
                );
            }
            Event::Text(text) => {
                *budget = budget.saturating_sub(1);
                self.on_text(text);
            }
        }
        if self.client.outbox.half_full() || *budget == 0 { Flow::Pause } else { Flow::Continue }
    }

    fn on_text(&self, text: &str) {
        let result = parse_client_frame(text).and_then(|ClientFrame { reference, request }| {
            self.dispatch(request, reference.as_ref()).map_err(|mut e| {
                e.reference = reference;
                e
            })
        });
        if let Err(error) = result {
            self.hub.metrics.request_errors.inc();
            tracing::debug!(conn = self.client.id, code = ?error.code, frame = ?truncate(text), "request refused");
            self.client.outbox.push(error.to_frame());
        }
    }

    fn dispatch(&self, request: Request, reference: Option<&crate::protocol::Ref>) -> Result<(), RequestError> {
        let (hub, client) = (&*self.hub, &self.client);
        if let Request::Auth { token } = request {
            return hub.authenticate(client, &token, reference);
        }
        if client.identity().kind == IdentityKind::Anonymous {
            return Err(RequestError::new(
                ErrorCode::Unauthorized,
                "sign in first: send an `auth` frame with your token",
            ));
        }
        // Every request but messages (which the `rate` filter limits) draws
        // on the connection's budget; staff's moderation requests do not.
        let budgeted = match request {
            Request::Message { .. } => false,
            Request::Join { .. }
            | Request::Leave { .. }
            | Request::Nick { .. }
            | Request::History { .. }
            | Request::Report { .. } => true,
            _ => !client.identity().roles.is_staff(),
        };
        if budgeted {
            let limits = &hub.policies().config.limits;
            if let Err(wait) = client.take_request(hub.now(), limits.requests_per_minute, limits.requests_burst) {
                return Err(RequestError {
                    retry_after_ms: Some(wait),
                    ..RequestError::new(
                        ErrorCode::Policy("rate_limited".to_owned()),
                        format!("too many `{}` requests; try again in {wait} ms", request.kind()),
                    )
                });
            }
        }
        match request {
            Request::Join { room } => hub.join(client, &room, reference),
            Request::Leave { room } => hub.leave(client, &room, reference),
            Request::Message { room, content } => hub.post(client, &room, content, reference),
            Request::Nick { nick } => hub.set_nick(client, &nick, reference),
            Request::History { room, before, limit } => hub.history(client, &room, before, limit, reference),
            moderation => hub.moderate(client, moderation, reference),
        }
    }
}

/// At most the first 200 bytes of client text, for logs.
fn truncate(text: &str) -> &str {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_handles_partial_frames() {
        let mut batch: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fgh"].into_iter().map(Bytes::from_static).collect();
        assert_eq!(advance(&mut batch, 4), (1, true));
        assert_eq!(batch, [Bytes::from_static(b"e"), Bytes::from_static(b"fgh")]);
        assert_eq!(advance(&mut batch, 1), (1, false));
        assert_eq!(advance(&mut batch, 3), (1, false));
        assert!(batch.is_empty());
    }
}
