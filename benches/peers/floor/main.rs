//! The floor of the fan-out benchmarks: a broadcast server that does nothing
//! per delivery but the one `write` a delivery needs.
//!
//! It speaks the protocol subset that `wardroom-loadgen` uses, as the Node
//! peer in `../node-ws` does (`welcome`, `join`/`joined`, `message`
//! broadcast), on one thread with level-triggered epoll and no runtime, no
//! queue, no task and no timer: a message is serialized once and written to
//! each member's socket at once, straight from the loop that read it. Bytes a
//! socket does not take are kept for that member and written when it is
//! writable again. No limits, no policies, no store: it is a yardstick, not a
//! server to run.
//!
//! Whatever latency it shows under a load is what one core of this machine
//! costs for that load in the kernel's TCP and loopback path, so it tells a
//! target that no server could meet here (under the same pinning) from one
//! that Wardroom misses.
//!
//! Run: `taskset -c 0 target/release/floor-peer 127.0.0.1:8091` (serves
//! `ws://127.0.0.1:8091/ws`; any path is accepted; port 0 picks one, and the
//! first line printed names it).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use serde::Deserialize;
use wardroom::protocol::{ServerFrame, encode, now_ms};
use wardroom::ws::handshake::accept_key;
use wardroom::ws::{Event, Flow, MessageReader, OpCode, encode_control, text_frame};

/// The epoll token of the listening socket.
const LISTENER: u64 = u64::MAX;

/// Largest request head accepted before the upgrade.
const MAX_HEAD: usize = 8192;

/// A request from a client; anything else is answered with an error.
#[derive(Deserialize)]
struct Request<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    room: Option<String>,
    content: Option<String>,
}

/// A client connection.
struct Conn {
    stream: TcpStream,
    /// The request head until the upgrade; `None` once open.
    head: Option<Vec<u8>>,
    reader: MessageReader,
    /// Bytes the socket has not taken yet.
    out: Vec<u8>,
    /// Whether epoll also watches for writability.
    watching_out: bool,
    user: String,
    nick: String,
    rooms: Vec<String>,
}

impl Conn {
    /// Writes `bytes` now, or queues them behind what is queued (watching
    /// for writability). False when the connection is broken.
    fn deliver(&mut self, epoll: i32, token: u64, bytes: &[u8]) -> bool {
        if !self.out.is_empty() {
            self.out.extend_from_slice(bytes);
            return true;
        }
        let written = match self.stream.write(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(_) => return false,
        };
        if written < bytes.len() {
            self.out.extend_from_slice(&bytes[written..]);
            return self.watch_out(epoll, token, true);
        }
        true
    }

    /// Writes what is queued. False when the connection is broken.
    fn flush(&mut self, epoll: i32, token: u64) -> bool {
        match self.stream.write(&self.out) {
            Ok(n) => {
                self.out.drain(..n);
                !self.out.is_empty() || self.watch_out(epoll, token, false)
            }
            Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        }
    }

    /// Watches for writability (or stops). False if epoll refused.
    fn watch_out(&mut self, epoll: i32, token: u64, on: bool) -> bool {
        if self.watching_out == on {
            return true;
        }
        self.watching_out = on;
        let events = libc::EPOLLIN as u32 | if on { libc::EPOLLOUT as u32 } else { 0 };
        ctl(epoll, libc::EPOLL_CTL_MOD, self.stream.as_raw_fd(), token, events).is_ok()
    }

    /// Reads once and handles what arrived: the upgrade, then WebSocket
    /// frames. False when the connection is to close.
    fn take_input(&mut self, scratch: &mut [u8], texts: &mut Vec<String>, replies: &mut Vec<Vec<u8>>) -> bool {
        let n = match self.stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) => return matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted),
        };
        let Some(head) = self.head.as_mut() else { return feed(&mut self.reader, &mut scratch[..n], texts, replies) };
        head.extend_from_slice(&scratch[..n]);
        let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4) else {
            return head.len() <= MAX_HEAD;
        };
        let Some((response, nick)) = upgrade(&head[..end]) else { return false };
        let mut rest = head.split_off(end);
        self.head = None;
        if let Some(nick) = nick {
            self.nick = nick;
        }
        replies.push(response.into_bytes());
        replies.push(text_frame(br#"{"type":"welcome","protocol":1}"#).to_vec());
        feed(&mut self.reader, &mut rest, texts, replies)
    }
}

/// A room: its members' tokens and the next message id.
struct Room {
    members: Vec<u64>,
    next_id: u64,
}

/// The whole server state.
struct Floor {
    epoll: OwnedFd,
    listener: TcpListener,
    conns: HashMap<u64, Conn>,
    rooms: HashMap<String, Room>,
    next_token: u64,
}

fn main() -> io::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8091".to_owned());
    let listener = TcpListener::bind(&addr)?;
    listener.set_nonblocking(true)?;
    // SAFETY: epoll_create1 has no memory-safety preconditions, and the
    // descriptor it returns is new and owned by nothing else.
    let epoll = unsafe { OwnedFd::from_raw_fd(cvt(libc::epoll_create1(libc::EPOLL_CLOEXEC))?) };
    let mut floor = Floor { epoll, listener, conns: HashMap::new(), rooms: HashMap::new(), next_token: 0 };
    ctl(floor.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, floor.listener.as_raw_fd(), LISTENER, libc::EPOLLIN as u32)?;
    println!("floor peer listening on ws://{}/ws", floor.listener.local_addr()?);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut scratch = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: `events` is a valid buffer of `events.len()` entries.
        let n = unsafe { libc::epoll_wait(floor.epoll.as_raw_fd(), events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for event in &events[..n as usize] {
            let (token, flags) = (event.u64, event.events);
            if token == LISTENER {
                floor.accept_all();
                continue;
            }
            if flags & libc::EPOLLOUT as u32 != 0 {
                floor.flush(token);
            }
            if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                floor.read(token, &mut scratch);
            }
        }
    }
}

/// `epoll_ctl` for one socket.
fn ctl(epoll: i32, op: i32, fd: i32, token: u64, events: u32) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: token };
    // SAFETY: `event` outlives the call; the kernel copies it.
    cvt(unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) }).map(drop)
}

/// Turns a -1 from libc into the OS error.
fn cvt(ret: i32) -> io::Result<i32> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

impl Floor {
    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let token = self.next_token;
                    self.next_token += 1;
                    let registered =
                        stream.set_nonblocking(true).and_then(|()| stream.set_nodelay(true)).and_then(|()| {
                            ctl(
                                self.epoll.as_raw_fd(),
                                libc::EPOLL_CTL_ADD,
                                stream.as_raw_fd(),
                                token,
                                libc::EPOLLIN as u32,
                            )
                        });
                    if registered.is_ok() {
                        let conn = Conn {
                            stream,
                            head: Some(Vec::new()),
                            reader: MessageReader::new(16 * 1024, 16 * 1024),
                            out: Vec::new(),
                            watching_out: false,
                            user: format!("guest:{token}"),
                            nick: format!("guest:{token}"),
                            rooms: Vec::new(),
                        };
                        self.conns.insert(token, conn);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("accept: {e}");
                    return;
                }
            }
        }
    }

    /// One read from a readable socket, and whatever it completes.
    fn read(&mut self, token: u64, scratch: &mut [u8]) {
        let mut texts = Vec::new();
        let mut replies = Vec::new();
        let keep = self.conns.get_mut(&token).is_some_and(|conn| conn.take_input(scratch, &mut texts, &mut replies));
        for reply in replies {
            self.deliver(token, &reply);
        }
        for text in texts {
            self.on_text(token, &text);
        }
        if !keep {
            self.close(token);
        }
    }

    /// Acts on one text message from `token`.
    fn on_text(&mut self, token: u64, text: &str) {
        let request = serde_json::from_str::<Request<'_>>(text).ok();
        let Some(conn) = self.conns.get_mut(&token) else { return };
        match request {
            Some(Request { kind: "join", room: Some(room), .. }) if !room.is_empty() => {
                let joined = text_frame(&serde_json::json!({"type": "joined", "room": room}).to_string().into_bytes());
                if !conn.rooms.contains(&room) {
                    conn.rooms.push(room.clone());
                    self.rooms
                        .entry(room)
                        .or_insert_with(|| Room { members: Vec::new(), next_id: 1 })
                        .members
                        .push(token);
                }
                self.deliver(token, &joined);
            }
            Some(Request { kind: "message", room: Some(room), content: Some(content) })
                if conn.rooms.contains(&room) =>
            {
                let Some(r) = self.rooms.get_mut(&room) else { return };
                let frame = encode(&ServerFrame::Message {
                    room: &room,
                    id: r.next_id,
                    from: &conn.nick,
                    user: &conn.user,
                    content: &content,
                    ts: now_ms(),
                });
                r.next_id += 1;
                let mut broken = Vec::new();
                for &member in &r.members {
                    if self.conns.get_mut(&member).is_some_and(|m| !m.deliver(self.epoll.as_raw_fd(), member, &frame)) {
                        broken.push(member);
                    }
                }
                for member in broken {
                    self.close(member);
                }
            }
            _ => {
                let error =
                    br#"{"type":"error","code":"bad_request","message":"expected join or message (in a joined room)"}"#;
                self.deliver(token, &text_frame(error));
            }
        }
    }

    /// Writes `bytes` to `token` now (or queues them), closing it if broken.
    fn deliver(&mut self, token: u64, bytes: &[u8]) {
        let epoll = self.epoll.as_raw_fd();
        if self.conns.get_mut(&token).is_some_and(|conn| !conn.deliver(epoll, token, bytes)) {
            self.close(token);
        }
    }

    /// Writes what is queued for a writable socket, closing it if broken.
    fn flush(&mut self, token: u64) {
        let epoll = self.epoll.as_raw_fd();
        if self.conns.get_mut(&token).is_some_and(|conn| !conn.flush(epoll, token)) {
            self.close(token);
        }
    }

    fn close(&mut self, token: u64) {
        let Some(conn) = self.conns.remove(&token) else { return };
        for room in &conn.rooms {
            if let Some(r) = self.rooms.get_mut(room) {
                r.members.retain(|&m| m != token);
                if r.members.is_empty() {
                    self.rooms.remove(room);
                }
            }
        }
        // Closing the socket removes it from the epoll set.
    }
}

/// Feeds bytes to the reader: texts and replies (pongs) are collected; false
/// when the connection is to close.
fn feed(reader: &mut MessageReader, data: &mut [u8], texts: &mut Vec<String>, replies: &mut Vec<Vec<u8>>) -> bool {
    let mut close = false;
    let result = reader.feed(data, |event| match event {
        Event::Text(text) => {
            texts.push(text.to_owned());
            Flow::Continue
        }
        Event::Ping(payload) => {
            replies.push(encode_control(OpCode::Pong, payload).to_vec());
            Flow::Continue
        }
        Event::Binary | Event::Pong => Flow::Continue,
        Event::Close(_) => {
            close = true;
            Flow::Stop
        }
    });
    !close && result.is_ok()
}

/// The `101` response to a WebSocket upgrade request head, and the `nick`
/// query parameter if any; `None` if the head is not an upgrade.
fn upgrade(head: &[u8]) -> Option<(String, Option<String>)> {
    let head = std::str::from_utf8(head).ok()?;
    let mut lines = head.split("\r\n");
    let target = lines.next()?.split(' ').nth(1)?;
    let key = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("sec-websocket-key").then(|| value.trim())
    })?;
    let nick = target
        .split_once('?')
        .and_then(|(_, query)| query.split('&').find_map(|pair| pair.strip_prefix("nick=")))
        .map(str::to_owned);
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(key.as_bytes())
    );
    Some((response, nick))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upgrade_gets_the_accept_key_and_the_nick() {
        let head = b"GET /ws?x=1&nick=Ann HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let (response, nick) = upgrade(head).expect("an upgrade");
        assert!(response.starts_with("HTTP/1.1 101 "), "{response}");
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{response}");
        assert_eq!(nick.as_deref(), Some("Ann"));
        assert_eq!(upgrade(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), None, "no key, no upgrade");
    }
}
