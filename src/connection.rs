//! One client connection after the upgrade: a reader and a writer, run
//! concurrently in one task, on a raw `TcpStream`.
//!
//! - The reader waits for readability, reads into a per-thread scratch buffer
//!   (an idle connection owns no read buffer), parses frames and acts on them.
//!   It never waits on anything but the socket: replies go to the outbox.
//! - The writer takes everything queued in the outbox at once and writes it
//!   with one vectored write (each message stays its own frame).
//! - Deadlines (first frame, idle, close handshake) are enforced by the hub's
//!   sweeper, so a connection carries no timer of its own.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::pin;
use std::sync::Arc;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWriteExt;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::client::Client;
use crate::hub::Hub;
use crate::outbox::Next;
use crate::protocol::{ClientFrame, ErrorCode, Request, RequestError, parse_client_frame};
use crate::ws::{CloseCode, Event, Flow, MessageReader, OpCode, encode_control};

/// Size of the per-thread read buffer.
const SCRATCH_BYTES: usize = 64 * 1024;

/// Most frames handed to one `writev`.
const MAX_IOVECS: usize = 64;

thread_local! {
    /// Every connection on a thread reads into this buffer in turn; it is
    /// borrowed only for the synchronous processing of one read.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_BYTES].into_boxed_slice());
}

/// How the reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadEnd {
    /// The peer closed the TCP connection or it failed.
    Gone,
    /// The peer sent a Close frame; ours (the echo, or the one we sent
    /// first) is in the outbox.
    ClientClosed,
    /// The peer broke the protocol; a Close frame with the reason is queued.
    Failed,
}

/// Serves one connection from the `101` answer until it closes. The client
/// was counted by [`Hub::new_client`]; it is removed from the hub when this
/// future ends or is aborted.
pub async fn serve(hub: Arc<Hub>, client: Arc<Client>, on_upgrade: OnUpgrade, requested_nick: Option<String>) {
    let _disconnect = Disconnect { hub: &hub, client: &client };
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
    hub.register(&client, requested_nick.as_deref());
    tracing::debug!(conn = client.id, addr = %client.addr, "connected");
    run(&hub, &client, parts.io.into_inner(), parts.read_buf).await;
}

/// Runs the reader and the writer until the connection closes.
async fn run(hub: &Hub, client: &Arc<Client>, mut stream: TcpStream, early: Bytes) {
    let limits = &hub.config().limits;
    let mut reader = MessageReader::new(limits.max_frame_bytes, limits.max_message_bytes);
    let mut linger = false;
    {
        let session = Session { hub, client };
        let mut early = early.to_vec();
        let read = pin!(async {
            if !early.is_empty() {
                session.client.touch(session.hub.now());
                if let Some(end) = session.feed(&mut reader, &mut early) {
                    return end;
                }
            }
            read_loop(&stream, &mut reader, &session).await
        });
        let write = pin!(write_loop(&stream, client));
        let (mut read, mut write) = (read, write);
        tokio::select! {
            end = &mut read => match end {
                ReadEnd::Gone => {}
                ReadEnd::ClientClosed => {
                    let _ = write.await;
                }
                ReadEnd::Failed => {
                    linger = write.await.is_ok();
                }
            },
            written = &mut write => {
                if written.is_ok() {
                    // Our Close frame is out: wait for the client's (the
                    // sweeper ends this wait at the close deadline).
                    let _ = read.await;
                }
            }
        }
    }
    if linger {
        // After failing the connection, close our side and drain what the
        // client still sends, so it reads our Close frame instead of a reset.
        let _ = stream.shutdown().await;
        drain(&stream).await;
    }
}

/// Removes the client from the hub when the connection task ends, including
/// when it is aborted.
struct Disconnect<'a> {
    hub: &'a Hub,
    client: &'a Arc<Client>,
}

impl Drop for Disconnect<'_> {
    fn drop(&mut self) {
        self.hub.disconnect(self.client);
        tracing::debug!(conn = self.client.id, "disconnected");
    }
}

/// What the reader needs to act on events.
struct Session<'a> {
    hub: &'a Hub,
    client: &'a Arc<Client>,
}

impl Session<'_> {
    /// Feeds read bytes to the frame reader; `Some` when reading must stop.
    fn feed(&self, reader: &mut MessageReader, data: &mut [u8]) -> Option<ReadEnd> {
        match reader.feed(data, |event| self.on_event(event)) {
            Ok(Flow::Continue) => None,
            Ok(Flow::Stop) => Some(ReadEnd::ClientClosed),
            Err(violation) => {
                tracing::debug!(conn = self.client.id, code = violation.code, reason = %violation.reason, "protocol violation");
                self.client.outbox.close(violation.code, &violation.reason, false);
                Some(ReadEnd::Failed)
            }
        }
    }

    fn on_event(&self, event: Event<'_>) -> Flow {
        let closing = self.client.outbox.closing_since().is_some();
        match event {
            Event::Close(code) => {
                let code = code.map_or(CloseCode::NORMAL, |(code, _)| code);
                self.client.outbox.close(code, "", false);
                return Flow::Stop;
            }
            Event::Ping(payload) => {
                self.client.outbox.push(encode_control(OpCode::Pong, payload));
            }
            Event::Pong => {}
            // Once we are closing, data frames are read and ignored.
            _ if closing => {}
            Event::Binary => {
                self.client.outbox.push(
                    RequestError::new(ErrorCode::Unsupported, "binary frames are not supported; send JSON text frames")
                        .to_frame(),
                );
            }
            Event::Text(text) => self.on_text(text),
        }
        Flow::Continue
    }

    fn on_text(&self, text: &str) {
        let result = parse_client_frame(text).and_then(|ClientFrame { reference, request }| {
            self.dispatch(request, reference.as_ref()).map_err(|mut e| {
                e.reference = reference;
                e
            })
        });
        if let Err(error) = result {
            tracing::debug!(conn = self.client.id, code = ?error.code, frame = ?truncate(text), "request refused");
            self.client.outbox.push(error.to_frame());
        }
    }

    fn dispatch(&self, request: Request, reference: Option<&crate::protocol::Ref>) -> Result<(), RequestError> {
        let (hub, client) = (self.hub, self.client);
        match request {
            Request::Join { room } => hub.join(client, &room, reference),
            Request::Leave { room } => hub.leave(client, &room, reference),
            Request::Message { room, content } => hub.post(client, &room, &content, reference),
            Request::Nick { nick } => hub.set_nick(client, &nick, reference),
            Request::History { room, before, limit } => hub.history(client, &room, before, limit, reference),
        }
    }
}

/// Reads and discards until the peer closes its side.
async fn drain(stream: &TcpStream) {
    while stream.readable().await.is_ok() {
        let done = SCRATCH.with_borrow_mut(|buf| match stream.try_read(buf) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        });
        if done {
            return;
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

async fn read_loop(stream: &TcpStream, reader: &mut MessageReader, session: &Session<'_>) -> ReadEnd {
    loop {
        if stream.readable().await.is_err() {
            return ReadEnd::Gone;
        }
        let end = SCRATCH.with_borrow_mut(|buf| match stream.try_read(buf) {
            Ok(0) => Some(ReadEnd::Gone),
            Ok(n) => {
                session.client.touch(session.hub.now());
                session.feed(reader, &mut buf[..n])
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(_) => Some(ReadEnd::Gone),
        });
        if let Some(end) = end {
            return end;
        }
    }
}

/// Writes what the outbox holds until a Close frame has been written.
async fn write_loop(stream: &TcpStream, client: &Client) -> io::Result<()> {
    let mut batch = VecDeque::new();
    loop {
        let next = poll_fn(|cx| client.outbox.poll_next(cx, &mut batch)).await;
        write_all(stream, &mut batch).await?;
        if next == Next::Closing {
            return Ok(());
        }
    }
}

/// Writes every frame in `batch` with as few `writev` calls as the socket
/// allows, leaving `batch` empty.
async fn write_all(stream: &TcpStream, batch: &mut VecDeque<Bytes>) -> io::Result<()> {
    while !batch.is_empty() {
        stream.writable().await?;
        let written = {
            let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
            let count = batch.len().min(MAX_IOVECS);
            for (slice, frame) in slices.iter_mut().zip(batch.iter()) {
                *slice = IoSlice::new(frame);
            }
            match stream.try_write_vectored(&slices[..count]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        advance(batch, written);
    }
    Ok(())
}

/// Drops `written` bytes from the front of `batch`.
fn advance(batch: &mut VecDeque<Bytes>, mut written: usize) {
    while written > 0 {
        let Some(front) = batch.front_mut() else { return };
        if written >= front.len() {
            written -= front.len();
            batch.pop_front();
        } else {
            front.advance(written);
            return;
        }
    }
    while batch.front().is_some_and(Bytes::is_empty) {
        batch.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_handles_partial_frames() {
        let mut batch: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fgh"].into_iter().map(Bytes::from_static).collect();
        advance(&mut batch, 4);
        assert_eq!(batch, [Bytes::from_static(b"e"), Bytes::from_static(b"fgh")]);
        advance(&mut batch, 4);
        assert!(batch.is_empty());
    }
}
