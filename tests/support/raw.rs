//! A raw-socket WebSocket client: builds frames byte by byte, so tests can
//! send what no client library would (invalid UTF-8, reserved bits, huge
//! length headers) and see exactly what the server answers.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::PATIENCE;

/// Opcodes.
pub const CONT: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// A frame as received from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Code and reason of a Close frame.
    pub fn close(&self) -> (u16, String) {
        assert_eq!(self.opcode, CLOSE, "expected a Close frame, got {self:?}");
        match self.payload.as_slice() {
            [] => (1005, String::new()),
            [hi, lo, reason @ ..] => (u16::from_be_bytes([*hi, *lo]), String::from_utf8_lossy(reason).into_owned()),
            _ => panic!("malformed close payload {:?}", self.payload),
        }
    }

    /// The payload of a text frame, as JSON.
    pub fn json(&self) -> Value {
        assert_eq!(self.opcode, TEXT, "expected a text frame, got {self:?}");
        serde_json::from_slice(&self.payload).expect("server text frames are JSON")
    }
}

/// A WebSocket client speaking through a plain `TcpStream`.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects and completes the handshake on `path` (e.g. `/ws?nick=x`).
    pub async fn connect(addr: SocketAddr, path: &str) -> Self {
        match Self::try_connect(addr, path, "", None).await {
            Ok(client) => client,
            Err(head) => panic!("handshake refused: {head}"),
        }
    }

    /// Connects and sends `early` (frames) in the same write as the upgrade
    /// request, as a client that does not wait for anything would.
    pub async fn connect_pipelined(addr: SocketAddr, path: &str, early: &[u8]) -> Self {
        let mut client = Self { stream: TcpStream::connect(addr).await.expect("connect"), buf: Vec::new() };
        let mut bytes = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .into_bytes();
        bytes.extend_from_slice(early);
        client.stream.write_all(&bytes).await.expect("send the request");
        let head = client.read_http_head().await;
        assert!(head.starts_with("HTTP/1.1 101"), "handshake refused: {head}");
        client
    }

    /// Connects from `source` (an address on this host) if given, sends the
    /// upgrade request with `extra_headers` (each ending in `\r\n`), and
    /// returns the client, or the HTTP response head if the server refused.
    pub async fn try_connect(
        addr: SocketAddr,
        path: &str,
        extra_headers: &str,
        source: Option<std::net::IpAddr>,
    ) -> Result<Self, String> {
        let stream = match source {
            Some(ip) => {
                let socket = tokio::net::TcpSocket::new_v4().expect("socket");
                socket.bind(SocketAddr::new(ip, 0)).expect("bind source address");
                socket.connect(addr).await.expect("connect")
            }
            None => TcpStream::connect(addr).await.expect("connect"),
        };
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
        );
        let mut client = Self { stream, buf: Vec::new() };
        if client.stream.write_all(request.as_bytes()).await.is_err() {
            return Err("connection closed before the request was sent".to_owned());
        }
        let head = client.read_http_head().await;
        if !head.starts_with("HTTP/1.1 101") {
            return Err(head);
        }
        assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "wrong accept key: {head}");
        Ok(client)
    }

    async fn read_http_head(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                return head;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(PATIENCE, self.stream.read(&mut chunk))
                .await
                .expect("no HTTP response in time")
                .unwrap_or(0);
            if n == 0 {
                return String::from("(connection closed during the handshake)");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends one masked frame.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let bytes = masked_frame(fin, opcode, payload);
        self.stream.write_all(&bytes).await.expect("send frame");
    }

    /// Sends bytes as they are.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send raw");
    }

    /// The next frame, or `None` if the server closed the connection.
    pub async fn read_frame(&mut self) -> Option<Frame> {
        self.read_frame_within(PATIENCE).await.expect("no frame in time")
    }

    /// Like [`read_frame`](Self::read_frame), but `Err` on timeout.
    pub async fn read_frame_within(&mut self, limit: Duration) -> Result<Option<Frame>, ()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(frame) = self.parse_frame() {
                return Ok(Some(frame));
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(()),
                Ok(Ok(n)) => n,
                Ok(Err(_)) => 0,
            };
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    fn parse_frame(&mut self) -> Option<Frame> {
        let [b0, b1, ..] = self.buf[..] else { return None };
        assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
        let (len, header) = match b1 & 0x7F {
            126 => (u16::from_be_bytes(self.buf.get(2..4)?.try_into().ok()?) as usize, 4),
            127 => (u64::from_be_bytes(self.buf.get(2..10)?.try_into().ok()?) as usize, 10),
            n => (n as usize, 2),
        };
        if self.buf.len() < header + len {
            return None;
        }
        let payload = self.buf[header..header + len].to_vec();
        self.buf.drain(..header + len);
        Some(Frame { fin: b0 & 0x80 != 0, opcode: b0 & 0x0F, payload })
    }

    /// The next text frame as JSON, skipping pings.
    pub async fn recv(&mut self) -> Value {
        loop {
            let frame = self.read_frame().await.expect("connection closed while waiting for a text frame");
            if frame.opcode != PING {
                return frame.json();
            }
        }
    }

    /// Reads until a Close frame, skipping anything else, and returns it.
    pub async fn expect_close(&mut self) -> (u16, String) {
        loop {
            let frame = self.read_frame().await.expect("connection closed without a Close frame");
            if frame.opcode == CLOSE {
                return frame.close();
            }
        }
    }

    /// Whether the server closed the TCP connection (reads EOF) within `limit`.
    pub async fn sees_eof_within(&mut self, limit: Duration) -> bool {
        loop {
            match self.read_frame_within(limit).await {
                Ok(None) => return true,
                Ok(Some(_)) => continue,
                Err(()) => return false,
            }
        }
    }
}

/// A masked client frame.
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// A plain HTTP/1.1 GET; returns the status code.
pub async fn http_get_status(addr: SocketAddr, path: &str) -> u16 {
    http_get(addr, path).await.0
}

/// A plain HTTP/1.1 GET; returns the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, "").await
}

/// An HTTP/1.1 request with `extra_headers` (each ending in `\r\n`) and no
/// body; returns the status code and the body.
pub async fn http_request(addr: SocketAddr, method: &str, path: &str, extra_headers: &str) -> (u16, String) {
    http_request_with_body(addr, method, path, extra_headers, "").await
}

/// An HTTP/1.1 request with a body; returns the status code and the body.
/// Like curl, it sends `Content-Length` only with a body.
pub async fn http_request_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    extra_headers: &str,
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let length = if body.is_empty() { String::new() } else { format!("Content-Length: {}\r\n", body.len()) };
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{length}{extra_headers}\r\n{body}");
    stream.write_all(request.as_bytes()).await.expect("send request");
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("no HTTP response in time")
        .expect("read response");
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}
