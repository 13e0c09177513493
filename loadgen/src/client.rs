//! One client connection: TCP connect, HTTP upgrade, `join`, then a read
//! loop that scans server frames straight out of the shared read buffer.
//!
//! Writes (the join, pongs, messages from the pacer) go out with one
//! non-blocking `try_write` each; whatever the kernel does not take waits in
//! the connection's `pending` buffer for a flush task, so frames are never
//! interleaved.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

use crate::frame::{
    self, CLASSIFY_BYTES, Kind, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, classify, content_start, encode_client_frame,
    parse_content, parse_header, parse_sent_ns,
};
use crate::state::{BACKLOG_PROBES, READ_CHUNK, Shared};

/// Time allowed for connect plus upgrade.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest message frame kept whole across reads; larger ones are skipped.
const MAX_CARRY: u64 = 1 << 20;

/// The `ref` attached to `join`, so a refusal can be told from other errors.
const JOIN_REF: &[u8] = b"\"ref\":\"join\"";

/// A connected, upgraded client.
pub struct Conn {
    /// Room index this client joins.
    pub room: usize,
    /// Write side of the socket.
    writer: OwnedWriteHalf,
    /// Bytes the kernel has not taken yet.
    pending: RefCell<Vec<u8>>,
    /// Whether a flush task is running.
    flushing: Cell<bool>,
    /// False once the connection broke or closed.
    alive: Cell<bool>,
    /// Whether `joined` arrived.
    joined: Cell<bool>,
    /// Whether this connection was counted in `settled`.
    settled: Cell<bool>,
}

impl Conn {
    /// Whether the connection is up and in its room.
    pub fn is_ready(&self) -> bool {
        self.alive.get() && self.joined.get()
    }

    /// Bytes received by the kernel that the generator has not read yet
    /// (`None` if the connection is down or the query fails).
    pub fn unread_bytes(&self) -> Option<u64> {
        if !self.alive.get() {
            return None;
        }
        let stream: &TcpStream = self.writer.as_ref();
        let mut unread: libc::c_int = 0;
        // SAFETY: FIONREAD on a socket we own writes one c_int.
        let ok = unsafe { libc::ioctl(stream.as_raw_fd(), libc::FIONREAD, &mut unread) } == 0;
        ok.then(|| u64::try_from(unread).unwrap_or(0))
    }

    /// Queues a complete frame: written now if the kernel takes it, else
    /// kept in order for the flush task. `false` if the connection is down.
    pub fn send(self: &Rc<Self>, bytes: &[u8]) -> bool {
        if !self.alive.get() {
            return false;
        }
        let mut pending = self.pending.borrow_mut();
        if pending.is_empty() {
            match self.writer.try_write(bytes) {
                Ok(n) if n == bytes.len() => return true,
                Ok(n) => pending.extend_from_slice(&bytes[n..]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => pending.extend_from_slice(bytes),
                Err(_) => {
                    self.alive.set(false);
                    return false;
                }
            }
        } else {
            pending.extend_from_slice(bytes);
        }
        if !self.flushing.replace(true) {
            tokio::task::spawn_local(flush(Rc::clone(self)));
        }
        true
    }

    /// Marks the end of connecting and joining, counting the outcome once.
    fn settle(&self, shared: &Shared, joined: bool) {
        if joined && !self.joined.replace(true) {
            shared.c.joined.inc();
            if let Some(members) = shared.room_members.borrow_mut().get_mut(self.room) {
                *members += 1;
            }
        }
        if !self.settled.replace(true) {
            shared.c.settled.inc();
            if !joined {
                shared.c.join_failed.inc();
            }
        }
    }
}

/// Writes a connection's pending bytes as the socket accepts them.
async fn flush(conn: Rc<Conn>) {
    loop {
        if conn.writer.writable().await.is_err() {
            conn.alive.set(false);
            break;
        }
        let mut pending = conn.pending.borrow_mut();
        match conn.writer.try_write(&pending) {
            Ok(n) => {
                pending.drain(..n);
                if pending.is_empty() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                conn.alive.set(false);
                break;
            }
        }
    }
    conn.pending.borrow_mut().clear();
    conn.flushing.set(false);
}

/// Why a connection's read loop ended.
#[derive(Debug)]
enum End {
    /// The server closed the TCP connection.
    Eof,
    /// Reading failed.
    Io(io::Error),
    /// The server sent a close frame with this code (if any).
    ServerClose(Option<u16>),
    /// The server broke the protocol.
    Protocol(&'static str),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Eof => f.write_str("connection closed by server (EOF)"),
            End::Io(e) => write!(f, "read error: {e}"),
            End::ServerClose(Some(code)) => write!(f, "server sent close frame, code {code}"),
            End::ServerClose(None) => f.write_str("server sent close frame without code"),
            End::Protocol(what) => write!(f, "protocol error: {what}"),
        }
    }
}

/// Runs client `index` from connect to close.
pub async fn run(shared: Rc<Shared>, index: usize) {
    let established = tokio::time::timeout(CONNECT_TIMEOUT, establish(&shared, index)).await;
    let (stream, carry) = match established {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => return connect_failed(&shared, format!("connect/upgrade: {e}")),
        Err(_) => return connect_failed(&shared, "connect/upgrade timed out".to_owned()),
    };
    shared.c.connected.inc();
    let room = index % shared.opts.rooms;
    let (reader, writer) = stream.into_split();
    let conn = Rc::new(Conn {
        room,
        writer,
        pending: RefCell::new(Vec::new()),
        flushing: Cell::new(false),
        alive: Cell::new(true),
        joined: Cell::new(false),
        settled: Cell::new(false),
    });
    if let Some(slot) = shared.senders.borrow_mut().get_mut(index) {
        *slot = Some(Rc::clone(&conn));
    }
    if index.is_multiple_of(shared.opts.clients.div_ceil(BACKLOG_PROBES)) {
        shared.backlog_probes.borrow_mut().push(Rc::clone(&conn));
    }
    let mut join = Vec::new();
    let payload = format!("{{\"type\":\"join\",\"room\":\"r{room}\",{}}}", String::from_utf8_lossy(JOIN_REF));
    encode_client_frame(&mut join, OP_TEXT, payload.as_bytes());
    conn.send(&join);

    let end = read_loop(&shared, &conn, reader, carry).await;
    conn.alive.set(false);
    if !conn.settled.get() {
        conn.settle(&shared, false);
        shared.note_error(format!("before joined: {end}"));
    } else if conn.joined.get() && !shared.stopping.get() {
        shared.c.unexpected_closes.inc();
        shared.note_error(format!("after joined: {end}"));
    }
}

/// Counts a connection that never got upgraded.
fn connect_failed(shared: &Shared, error: String) {
    shared.c.connect_failed.inc();
    shared.c.settled.inc();
    shared.note_error(error);
}

/// Connects (from the client's source address) and upgrades to WebSocket.
/// Returns the stream and any bytes read past the response headers.
async fn establish(shared: &Shared, index: usize) -> io::Result<(TcpStream, Vec<u8>)> {
    let opts = &shared.opts;
    // With a second node, odd-numbered clients connect there.
    let (addr, host_header) = match &opts.also {
        Some((addr, host_header)) if index % 2 == 1 => (*addr, host_header),
        _ => (opts.addr, &opts.host_header),
    };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_nodelay(true)?;
    // Abortive close (RST): no TIME_WAIT piles up between runs.
    socket.set_zero_linger()?;
    if opts.sources > 1 {
        let host = 1 + (index % usize::from(opts.sources)) as u8;
        socket.bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)), 0))?;
    }
    let mut stream = socket.connect(addr).await?;

    let separator = if opts.path.contains('?') { '&' } else { '?' };
    let request = format!(
        "GET {path}{separator}nick=lg{tag}-{index} HTTP/1.1\r\n\
         Host: {host}\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        path = opts.path,
        tag = shared.run_tag,
        host = host_header,
    );
    stream.write_all(request.as_bytes()).await?;

    let mut response = Vec::with_capacity(1024);
    loop {
        response.reserve(1024);
        if stream.read_buf(&mut response).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed during upgrade"));
        }
        if let Some(end) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            let status_line = response.split(|&b| b == b'\r').next().unwrap_or_default();
            if !status_line.starts_with(b"HTTP/1.1 101") {
                let status = String::from_utf8_lossy(status_line).into_owned();
                return Err(io::Error::other(format!("upgrade refused: {status}")));
            }
            return Ok((stream, response.split_off(end + 4)));
        }
        if response.len() > 16 * 1024 {
            return Err(io::Error::other("upgrade response headers too long"));
        }
    }
}

/// Where a scan of the read data stopped.
struct Scanned {
    /// Bytes fully handled; the rest is an incomplete frame to carry over.
    consumed: usize,
    /// Payload bytes still to come of a frame being skipped.
    skip: u64,
}

/// Reads until the connection ends. `carry` holds bytes that arrived with
/// the upgrade response; later it holds an incomplete frame between reads
/// (never while skipping).
async fn read_loop(shared: &Shared, conn: &Rc<Conn>, mut reader: OwnedReadHalf, mut carry: Vec<u8>) -> End {
    let mut skip = 0u64;
    if !carry.is_empty() {
        let data = std::mem::take(&mut carry);
        match process(shared, conn, &data, shared.now_ns()) {
            Ok(scanned) => {
                skip = scanned.skip;
                carry.extend_from_slice(&data[scanned.consumed..]);
            }
            Err(end) => return end,
        }
    }
    loop {
        let carried = carry.len();
        // Read into the shared buffer after the carried bytes' place. The
        // buffer is only borrowed inside this synchronous poll and below,
        // never across an await.
        let read = poll_fn(|cx| {
            let mut buf = shared.read_buf.borrow_mut();
            let want = carried + READ_CHUNK;
            if buf.len() < want {
                buf.resize(want, 0);
            }
            let mut read_buf = ReadBuf::new(&mut buf[carried..want]);
            Pin::new(&mut reader).poll_read(cx, &mut read_buf).map_ok(|()| read_buf.filled().len())
        })
        .await;
        let n = match read {
            Ok(0) => return End::Eof,
            Ok(n) => n,
            Err(e) => return End::Io(e),
        };
        let now = shared.now_ns();
        shared.c.reads.inc();
        shared.c.read_bytes.add(n as u64);
        let mut buf = shared.read_buf.borrow_mut();
        let mut from = 0;
        if skip > 0 {
            let skipped = skip.min(n as u64) as usize;
            skip -= skipped as u64;
            from = skipped;
        } else {
            buf[..carried].copy_from_slice(&carry);
        }
        let data = &buf[from..carried + n];
        let scanned = match process(shared, conn, data, now) {
            Ok(scanned) => scanned,
            Err(end) => return end,
        };
        skip += scanned.skip;
        carry.clear();
        if carry.capacity() > READ_CHUNK {
            carry = Vec::new();
        }
        carry.extend_from_slice(&data[scanned.consumed..]);
        drop(buf);
        shared.pace(now);
    }
}

/// Handles every complete frame in `data` (received at `now`).
fn process(shared: &Shared, conn: &Rc<Conn>, data: &[u8], now: u64) -> Result<Scanned, End> {
    let mut pos = 0;
    while let Some(header) = parse_header(&data[pos..]) {
        if header.masked {
            return Err(End::Protocol("server sent a masked frame"));
        }
        if header.opcode >= OP_CLOSE && header.payload_len > 125 {
            return Err(End::Protocol("control frame longer than 125 bytes"));
        }
        let body = pos + header.header_len;
        let available = (data.len() - body) as u64;
        if available >= header.payload_len {
            let end = body + header.payload_len as usize;
            handle_frame(shared, conn, header.opcode, &data[body..end], now)?;
            pos = end;
            continue;
        }
        // An incomplete frame: keep it for the next read, unless it is one
        // we do not need to see whole (then skip the rest of it).
        let partial = &data[body..];
        let keep = match header.opcode {
            OP_TEXT if partial.len() < CLASSIFY_BYTES => true,
            OP_TEXT => match classify(partial) {
                // Deliveries and acks are counted and timed: keep them whole.
                Kind::Message | Kind::Ack if header.payload_len <= MAX_CARRY => true,
                kind => {
                    note_kind(shared, conn, kind, partial);
                    false
                }
            },
            op => op >= OP_CLOSE,
        };
        if keep {
            return Ok(Scanned { consumed: pos, skip: 0 });
        }
        return Ok(Scanned { consumed: data.len(), skip: header.payload_len - available });
    }
    Ok(Scanned { consumed: pos, skip: 0 })
}

/// Handles one complete frame.
#[inline]
fn handle_frame(shared: &Shared, conn: &Rc<Conn>, opcode: u8, payload: &[u8], now: u64) -> Result<(), End> {
    match opcode {
        OP_TEXT => match classify(payload) {
            Kind::Message => on_message(shared, payload, now),
            Kind::Ack => on_ack(shared, payload, now),
            kind => note_kind(shared, conn, kind, payload),
        },
        OP_PING => {
            shared.c.pings.inc();
            let mut pong = Vec::with_capacity(payload.len() + 8);
            encode_client_frame(&mut pong, OP_PONG, payload);
            conn.send(&pong);
        }
        OP_CLOSE => {
            let code = payload.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
            return Err(End::ServerClose(code));
        }
        _ => {} // binary, pong, continuation: nothing to do
    }
    Ok(())
}

/// Counts a non-message text frame (possibly from its first bytes only).
fn note_kind(shared: &Shared, conn: &Conn, kind: Kind, payload: &[u8]) {
    match kind {
        Kind::Joined => conn.settle(shared, true),
        Kind::Error => {
            shared.c.error_frames.inc();
            let about_join = payload.windows(JOIN_REF.len()).any(|w| w == JOIN_REF);
            if about_join && !conn.joined.get() {
                conn.settle(shared, false);
                shared.note_error(format!("join refused: {}", String::from_utf8_lossy(payload)));
            }
        }
        // A message frame too large to keep.
        Kind::Message => shared.c.foreign.inc(),
        Kind::Ack | Kind::Other => {}
    }
}

/// Records one message delivery.
#[inline]
fn on_message(shared: &Shared, payload: &[u8], now: u64) {
    let c = &shared.c;
    c.received_total.inc();
    let Some(sent_ns) = content_start(payload).and_then(|content| parse_sent_ns(content, &shared.run_prefix)) else {
        c.foreign.inc();
        return;
    };
    if shared.in_window(sent_ns) {
        c.received_window_sched.inc();
        shared.latency.borrow_mut().record(now.saturating_sub(sent_ns));
    }
    if shared.in_window(now) {
        c.received_window_recv.inc();
    }
}

/// Records the acknowledgement of one of our messages.
#[inline]
fn on_ack(shared: &Shared, payload: &[u8], now: u64) {
    let Some(stamp) = frame::ref_start(payload).and_then(|r| parse_content(r, shared.run_tag)) else {
        return;
    };
    shared.c.acked_total.inc();
    if shared.in_window(stamp.sent_ns) {
        shared.c.acked_window.inc();
        shared.unacked.borrow_mut().remove(&(stamp.sender, stamp.seq));
        shared.ack_latency.borrow_mut().record(now.saturating_sub(stamp.sent_ns));
    }
}

/// Builds the frame for one chat message into `frame` (using `scratch`);
/// with `ack`, the message carries its stamp as its `ref`.
pub fn build_message(
    frame: &mut Vec<u8>,
    scratch: &mut Vec<u8>,
    room: usize,
    run: u64,
    stamp: frame::Stamp,
    size: usize,
    ack: bool,
) -> bool {
    scratch.clear();
    scratch.extend_from_slice(b"{\"type\":\"message\",\"room\":\"r");
    frame::push_decimal(scratch, room as u64);
    if ack {
        scratch.extend_from_slice(b"\",\"ref\":\"");
        frame::write_stamp(scratch, run, stamp);
    }
    scratch.extend_from_slice(b"\",\"content\":\"");
    if !frame::write_content(scratch, run, stamp, size) {
        return false;
    }
    scratch.extend_from_slice(b"\"}");
    frame.clear();
    encode_client_frame(frame, OP_TEXT, scratch);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Stamp, write_stamp};

    /// A server text frame (unmasked) with `payload`.
    fn server_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x81];
        match payload.len() {
            len @ 0..=125 => frame.push(len as u8),
            len => {
                frame.push(126);
                frame.extend_from_slice(&(len as u16).to_be_bytes());
            }
        }
        frame.extend_from_slice(payload);
        frame
    }

    #[test]
    fn an_ack_split_across_reads_is_counted() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        runtime.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let stream = TcpStream::connect(listener.local_addr().expect("addr")).await.expect("connect");
            let (_reader, writer) = stream.into_split();
            let conn = Rc::new(Conn {
                room: 0,
                writer,
                pending: RefCell::default(),
                flushing: Cell::new(false),
                alive: Cell::new(true),
                joined: Cell::new(true),
                settled: Cell::new(true),
            });
            let opts = crate::options::parse(["--ack".to_owned()]).expect("options").expect("run");
            let shared = Shared::new(opts, std::time::Instant::now());
            shared.window.set((0, u64::MAX));
            // As in a run at 50,000 msg/s, 9 s into the window.
            let stamp = Stamp { sender: 21, seq: 12_163, sent_ns: 12_190_982_000 };
            shared.unacked.borrow_mut().insert((21, 12_163), stamp.sent_ns);

            let mut reference = Vec::new();
            write_stamp(&mut reference, shared.run_tag, stamp);
            let reference = String::from_utf8(reference).expect("stamp");
            // The room name makes the ack longer than the head that
            // classifies it, whatever the length of the run tag (the pid).
            let ack = format!(
                r#"{{"type":"ack","ref":"{reference}","id":608150,"room":"{}","ts":1764190000000}}"#,
                "r".repeat(CLASSIFY_BYTES)
            );
            let ack = server_frame(ack.as_bytes());
            // The first read ends inside the ack, past the bytes that tell
            // what kind of frame it is (at 50,000 msg/s, acks of ~97 bytes
            // were lost when a read ended in their last bytes).
            let cut = ack.len() - 3;
            let first = process(&shared, &conn, &ack[..cut], stamp.sent_ns + 1_000).expect("first read");
            assert_eq!((first.consumed, first.skip), (0, 0), "the partial ack is carried over");
            let second = process(&shared, &conn, &ack, stamp.sent_ns + 2_000).expect("second read");
            assert_eq!(second.consumed, ack.len());
            assert_eq!(shared.c.acked_window.get(), 1);
            assert!(shared.unacked.borrow().is_empty());
        });
    }
}
