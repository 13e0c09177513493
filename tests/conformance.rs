//! RFC 6455 conformance, server side: the cases of Autobahn|Testsuite
//! sections 1–7 that apply to a server, replayed over raw sockets against a
//! real Wardroom server (Autobahn itself needs Python 2 or Docker).
//!
//! Autobahn's "echo" becomes "the server answers": a text frame that is a
//! valid request gets its answer (`joined` for a padded `join`, the
//! `message` itself for a `message`), any other text gets an `error` frame,
//! a binary frame gets an `unsupported` error, and the connection stays
//! usable. Where Autobahn expects the connection to be failed, the test
//! checks the close code, that nothing else was answered first, and that
//! the server closes TCP. `docs/conformance.md` maps every test to the
//! Autobahn cases it covers.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use support::raw::{BINARY, CLOSE, CONT, Frame, PING, PONG, RawClient, TEXT, masked_frame};
use support::{PATIENCE, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Limits high enough for Autobahn's largest messages (64 KiB frames, a
/// 256 KiB message in 7.1.6), and for one connection joining a fresh room
/// per probe (no request budget); `normal` sync keeps the `message` cases
/// fast.
const CONFIG: &str = "[limits]\nmax_frame_bytes = 1048576\nmax_message_bytes = 1048576\nrequests_per_minute = 0\n\n\
                      [rooms]\nmax_rooms_per_connection = 1000\n\n\
                      [store]\nsynchronous = \"normal\"\n";

/// How long the server gets to close TCP after the close handshake.
const EOF_WITHIN: Duration = Duration::from_secs(2);

/// "κόσμε": Autobahn's multi-byte test word (2-byte and 3-byte characters).
const KOSME: &[u8] = b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5";

async fn server() -> TestServer {
    TestServer::with_toml(CONFIG).await
}

/// A room name no other connection uses, so that no presence event from
/// another test's client arrives in the middle of an assertion.
fn fresh_room() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("conf{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A connection past its `welcome`, with Nagle off so that each write
/// leaves as its own segment (byte-by-byte cases really trickle).
async fn connect(server: &TestServer) -> RawClient {
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.stream.set_nodelay(true).expect("TCP_NODELAY");
    let welcome = next_frame(&mut raw).await.json();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    raw
}

/// A `join` request for a room of its own, padded with JSON whitespace to
/// exactly `len` bytes: the answer (`joined` with the same `ref`) proves that
/// the server got every byte of the payload, unmasked, in order.
fn join_of_len(len: usize, reference: u64) -> Vec<u8> {
    let room = fresh_room();
    let bare = format!(r#"{{"type":"join","room":"{room}","ref":{reference}}}"#);
    assert!(bare.len() <= len, "a join needs at least {} bytes", bare.len());
    let pad = " ".repeat(len - bare.len());
    format!(r#"{{"type":"join",{pad}"room":"{room}","ref":{reference}}}"#).into_bytes()
}

/// A valid request: `join` of a fresh room.
fn join(reference: u64) -> Vec<u8> {
    json!({"type": "join", "room": fresh_room(), "ref": reference}).to_string().into_bytes()
}

/// A `message` request for `room` (no `ref`, so the only answer is the
/// message itself, delivered back to its sender).
fn message(room: &str, content: &str) -> Vec<u8> {
    json!({"type": "message", "room": room, "content": content}).to_string().into_bytes()
}

/// A `message` request whose content is `bytes` verbatim, valid UTF-8 or not.
fn message_with_raw_content(room: &str, bytes: &[u8]) -> Vec<u8> {
    let mut payload = format!(r#"{{"type":"message","room":"{room}","content":""#).into_bytes();
    payload.extend_from_slice(bytes);
    payload.extend_from_slice(b"\"}");
    payload
}

/// The next frame that is not a keepalive ping from the server.
async fn next_frame(raw: &mut RawClient) -> Frame {
    loop {
        let frame = raw.read_frame().await.expect("the server closed the connection");
        if frame.opcode != PING {
            return frame;
        }
    }
}

/// The next frame is the `joined` answer carrying `reference`.
async fn expect_joined(raw: &mut RawClient, reference: u64) {
    let answer = next_frame(raw).await.json();
    assert_eq!((answer["type"].as_str(), answer["ref"].as_u64()), (Some("joined"), Some(reference)), "{answer}");
}

/// The next frame is an `error` with this code.
async fn expect_error(raw: &mut RawClient, code: &str) -> Value {
    let answer = next_frame(raw).await.json();
    assert_eq!((answer["type"].as_str(), answer["code"].as_str()), (Some("error"), Some(code)), "{answer}");
    answer
}

/// The next frame is a pong carrying `payload`.
async fn expect_pong(raw: &mut RawClient, payload: &[u8]) {
    let frame = next_frame(raw).await;
    assert_eq!((frame.opcode, frame.fin), (PONG, true), "expected a pong, got {frame:?}");
    assert_eq!(frame.payload, payload, "the pong carries the ping's payload");
}

/// The connection still works: a `join` is answered, and it is the very
/// next frame (nothing unexpected was queued before it).
async fn assert_usable(raw: &mut RawClient, reference: u64) {
    raw.send_frame(true, TEXT, &join(reference)).await;
    expect_joined(raw, reference).await;
}

/// Joins a fresh room and returns its name (for `message` requests).
async fn join_room(raw: &mut RawClient) -> String {
    let room = fresh_room();
    raw.send_frame(true, TEXT, json!({"type": "join", "room": room, "ref": 0}).to_string().as_bytes()).await;
    expect_joined(raw, 0).await;
    room
}

/// The next frame is the `message` echo of `content`.
async fn expect_message(raw: &mut RawClient, content: &str) {
    let answer = next_frame(raw).await.json();
    assert_eq!(answer["type"], "message", "{answer}");
    assert_eq!(answer["content"].as_str(), Some(content), "content {:?} came back as {answer}", content);
}

/// Reads up to the server's Close frame: returns the frames before it
/// (server pings left out) and the close code and reason.
async fn read_to_close(raw: &mut RawClient) -> (Vec<Frame>, u16, String) {
    let mut before = Vec::new();
    loop {
        let frame = raw.read_frame().await.expect("connection closed without a Close frame");
        match frame.opcode {
            CLOSE => {
                assert!(frame.fin, "a Close frame is never fragmented");
                let (code, reason) = frame.close();
                return (before, code, reason);
            }
            PING => {}
            _ => before.push(frame),
        }
    }
}

/// Completes the close handshake from the client side (echoing the code,
/// as Autobahn does) and checks that the server closes TCP promptly.
async fn finish_close(raw: &mut RawClient, code: u16) {
    let _ = raw.stream.write_all(&masked_frame(true, CLOSE, &code.to_be_bytes())).await;
    assert!(raw.sees_eof_within(EOF_WITHIN).await, "the server must close TCP after the close handshake");
}

/// The server fails the connection with `code`, answering nothing else
/// before it (no pong, no answer); then closes TCP.
async fn expect_failure(raw: &mut RawClient, code: u16) {
    let (before, got, reason) = read_to_close(raw).await;
    assert_eq!(got, code, "close code (reason {reason:?}); frames before the close: {before:?}");
    assert!(before.is_empty(), "nothing is answered before failing the connection: {before:?}");
    finish_close(raw, got).await;
}

/// Like [`expect_failure`], but first the answers to the valid requests
/// sent before the violation: `joined` with each of these refs, in order.
async fn expect_failure_after_joins(raw: &mut RawClient, refs: &[u64], code: u16) {
    let (before, got, reason) = read_to_close(raw).await;
    let answers: Vec<(String, Option<u64>)> = before
        .iter()
        .map(|frame| {
            let json = frame.json();
            (json["type"].as_str().unwrap_or_default().to_owned(), json["ref"].as_u64())
        })
        .collect();
    let expected: Vec<(String, Option<u64>)> = refs.iter().map(|r| ("joined".to_owned(), Some(*r))).collect();
    assert_eq!(answers, expected, "only the valid requests are answered, and no pong");
    assert_eq!(got, code, "close code (reason {reason:?})");
    finish_close(raw, got).await;
}

/// The server answers the client's Close with `code` (nothing else first)
/// and closes TCP.
async fn expect_clean_close(raw: &mut RawClient, code: u16) {
    let (before, got, reason) = read_to_close(raw).await;
    assert!(before.is_empty(), "nothing is sent after the client's Close: {before:?}");
    assert_eq!(got, code, "the server answers the Close with the same code (reason {reason:?})");
    assert!(raw.sees_eof_within(EOF_WITHIN).await, "the server must close TCP after the close handshake");
}

/// How frames are written to the socket (Autobahn's "chops").
#[derive(Debug, Clone, Copy)]
enum Chops {
    /// All frames in one write.
    One,
    /// One write per frame, with a short pause between.
    FrameWise,
    /// One write per byte.
    OctetWise,
}

const ALL_CHOPS: [Chops; 3] = [Chops::One, Chops::FrameWise, Chops::OctetWise];

async fn send(raw: &mut RawClient, frames: &[Vec<u8>], chops: Chops) {
    match chops {
        Chops::One => raw.send_raw(&frames.concat()).await,
        Chops::FrameWise => {
            for frame in frames {
                raw.send_raw(frame).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        Chops::OctetWise => trickle(raw, &frames.concat()).await,
    }
}

/// Writes `bytes` one byte per write.
async fn trickle(raw: &mut RawClient, bytes: &[u8]) {
    for byte in bytes {
        raw.stream.write_all(std::slice::from_ref(byte)).await.expect("send one byte");
    }
}

/// Writes `bytes` in writes of `size` bytes.
async fn send_in_chops(raw: &mut RawClient, bytes: &[u8], size: usize) {
    for chunk in bytes.chunks(size) {
        raw.stream.write_all(chunk).await.expect("send a chop");
    }
}

/// A masked frame with an arbitrary first byte (FIN, RSV bits, opcode).
fn frame_with_first_byte(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = masked_frame(true, 0, payload);
    frame[0] = first_byte;
    frame
}

/// A final frame of `opcode` with reserved bits `rsv` (0–7) set.
fn frame_with_rsv(rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame_with_first_byte(0x80 | rsv << 4 | opcode, payload)
}

/// Deterministic pseudo-random bytes (xorshift), for "binary" payloads.
fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Splits `bytes` into `n` fragments (some of them empty when `empty` is
/// set) and returns the frames of the fragmented text message.
fn fragmented_text(bytes: &[u8], n: usize, empty: bool) -> Vec<Vec<u8>> {
    assert!(n >= 2);
    let mut cuts: Vec<usize> = (1..n).map(|i| bytes.len() * i / n).collect();
    if empty {
        // Empty first, middle and last fragments.
        cuts[0] = 0;
        if n > 3 {
            cuts[n / 2] = cuts[n / 2 - 1];
        }
        cuts[n - 2] = bytes.len();
    }
    let mut bounds = vec![0];
    bounds.extend(cuts);
    bounds.push(bytes.len());
    (0..n)
        .map(|i| {
            let opcode = if i == 0 { TEXT } else { CONT };
            masked_frame(i == n - 1, opcode, &bytes[bounds[i]..bounds[i + 1]])
        })
        .collect()
}

/// One fragment per byte of `bytes`.
fn one_byte_fragments(bytes: &[u8]) -> Vec<Vec<u8>> {
    (0..bytes.len())
        .map(|i| masked_frame(i == bytes.len() - 1, if i == 0 { TEXT } else { CONT }, &bytes[i..=i]))
        .collect()
}

// ---------------------------------------------------------------------------
// Section 1: framing. Cases 1.1.1–1.1.8 (text) and 1.2.1–1.2.8 (binary):
// payloads of 0, 125, 126, 127, 128, 65535 and 65536 bytes (every length
// encoding and its edges), sent whole, in chops of 997 bytes (1.x.8) and
// trickled byte by byte.
// ---------------------------------------------------------------------------

const LENGTHS: [usize; 7] = [0, 125, 126, 127, 128, 65_535, 65_536];

/// Sends a text message of `len` bytes with `deliver`, then checks the answer
/// (`joined` for a padded join; an `error` for the empty text, which is not
/// JSON) and that the connection is still usable.
async fn text_of_each_length_is_answered(chops: Option<usize>) {
    let server = server().await;
    let mut raw = connect(&server).await;
    for (i, len) in LENGTHS.into_iter().enumerate() {
        let reference = i as u64 + 1;
        let payload = if len == 0 { Vec::new() } else { join_of_len(len, reference) };
        assert_eq!(payload.len(), len);
        let frame = masked_frame(true, TEXT, &payload);
        match chops {
            None => raw.send_raw(&frame).await,
            Some(1) => trickle(&mut raw, &frame).await,
            Some(size) => send_in_chops(&mut raw, &frame, size).await,
        }
        if len == 0 {
            let error = expect_error(&mut raw, "bad_request").await;
            assert!(error["message"].as_str().unwrap_or_default().contains("invalid JSON"), "{error}");
        } else {
            expect_joined(&mut raw, reference).await;
        }
    }
    assert_usable(&mut raw, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_messages_of_every_length_encoding_are_answered() {
    text_of_each_length_is_answered(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_messages_sent_in_chops_of_997_bytes_are_answered() {
    text_of_each_length_is_answered(Some(997)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_messages_trickled_byte_by_byte_are_answered() {
    text_of_each_length_is_answered(Some(1)).await;
}

/// Binary messages of every length get `unsupported`, and the connection
/// stays usable after each.
async fn binary_of_each_length_is_refused_politely(chops: Option<usize>) {
    let server = server().await;
    let mut raw = connect(&server).await;
    for (i, len) in LENGTHS.into_iter().enumerate() {
        let frame = masked_frame(true, BINARY, &pseudo_random_bytes(len, i as u64 + 7));
        match chops {
            None => raw.send_raw(&frame).await,
            Some(1) => trickle(&mut raw, &frame).await,
            Some(size) => send_in_chops(&mut raw, &frame, size).await,
        }
        expect_error(&mut raw, "unsupported").await;
        assert_usable(&mut raw, i as u64 + 1).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_messages_of_every_length_encoding_get_unsupported_and_the_connection_stays_usable() {
    binary_of_each_length_is_refused_politely(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_messages_sent_in_chops_of_997_bytes_get_unsupported() {
    binary_of_each_length_is_refused_politely(Some(997)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_messages_trickled_byte_by_byte_get_unsupported() {
    binary_of_each_length_is_refused_politely(Some(1)).await;
}

/// Not an Autobahn case (its client library never sends them), but the
/// other side of section 1: a client frame that is not masked, or whose
/// 64-bit length has the most significant bit set, fails with 1002.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmasked_frames_and_lengths_with_the_top_bit_set_fail_with_1002() {
    let server = server().await;
    let mut unmasked = vec![0x81, 13];
    unmasked.extend_from_slice(b"Hello, world!");
    let mut top_bit = vec![0x81, 0x80 | 127];
    top_bit.extend_from_slice(&(1u64 << 63 | 5).to_be_bytes());
    top_bit.extend_from_slice(&[1, 2, 3, 4]);
    for bytes in [unmasked, top_bit] {
        let mut raw = connect(&server).await;
        raw.send_raw(&bytes).await;
        expect_failure(&mut raw, 1002).await;
    }
}

// ---------------------------------------------------------------------------
// Section 2: pings and pongs. Cases 2.1–2.11.
// ---------------------------------------------------------------------------

/// 2.1 (no payload), 2.2 (text payload), 2.3 (binary payload), 2.4 (125
/// bytes, the largest control payload).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_get_pongs_with_the_same_payload() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let payloads: [Vec<u8>; 5] = [
        Vec::new(),
        b"Hello, world!".to_vec(),
        vec![0x00, 0xff, 0xfe, 0xfd, 0xfc, 0xfb, 0x00, 0xff],
        vec![0xfe; 125],
        pseudo_random_bytes(125, 42),
    ];
    for payload in &payloads {
        raw.send_frame(true, PING, payload).await;
        expect_pong(&mut raw, payload).await;
    }
    assert_usable(&mut raw, 1).await;
}

/// 2.5: a control frame payload over 125 bytes fails the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_with_126_byte_payload_fails_with_1002_and_no_pong() {
    let server = server().await;
    let mut raw = connect(&server).await;
    raw.send_frame(true, PING, &[0xfe; 126]).await;
    expect_failure(&mut raw, 1002).await;
}

/// 2.6: a 125-byte ping trickled byte by byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_of_125_bytes_trickled_byte_by_byte_gets_its_pong() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let payload = pseudo_random_bytes(125, 26);
    trickle(&mut raw, &masked_frame(true, PING, &payload)).await;
    expect_pong(&mut raw, &payload).await;
    assert_usable(&mut raw, 1).await;
}

/// 2.7 (empty pong), 2.8 (pong with payload), 2.9 (unsolicited pong, then a
/// ping: only the ping is answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsolicited_pongs_are_ignored() {
    let server = server().await;
    let mut raw = connect(&server).await;
    raw.send_frame(true, PONG, b"").await;
    raw.send_frame(true, PONG, b"unsolicited pong payload").await;
    assert_usable(&mut raw, 1).await;

    raw.send_frame(true, PONG, b"unsolicited pong payload").await;
    raw.send_frame(true, PING, b"ping payload").await;
    expect_pong(&mut raw, b"ping payload").await;
    assert_usable(&mut raw, 2).await;
}

fn ten_pings() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let payloads: Vec<Vec<u8>> = (0..10).map(|i| format!("payload-{i}").into_bytes()).collect();
    let frames = payloads.iter().map(|p| masked_frame(true, PING, p)).collect();
    (frames, payloads)
}

/// 2.10: ten pings in a row get ten pongs, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_pings_get_ten_pongs_in_order() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let (frames, payloads) = ten_pings();
    send(&mut raw, &frames, Chops::One).await;
    for payload in &payloads {
        expect_pong(&mut raw, payload).await;
    }
    assert_usable(&mut raw, 1).await;
}

/// 2.11: the same, trickled byte by byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_pings_trickled_byte_by_byte_get_ten_pongs_in_order() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let (frames, payloads) = ten_pings();
    send(&mut raw, &frames, Chops::OctetWise).await;
    for payload in &payloads {
        expect_pong(&mut raw, payload).await;
    }
    assert_usable(&mut raw, 1).await;
}

/// 2.10 under back-pressure: with `limits.outbound_queue = 4` the server
/// stops reading whenever 2 answers wait for the client, so 100 pings and
/// 100 requests sent at once are read in many pauses; every one is still
/// answered, in order, and nothing is dropped or closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_and_requests_beyond_the_read_pause_threshold_are_all_answered_in_order() {
    let toml = CONFIG.replace("[rooms]", "outbound_queue = 4\n\n[rooms]");
    let server = TestServer::with_toml(&toml).await;
    for chops in [Chops::One, Chops::OctetWise] {
        let mut raw = connect(&server).await;
        let mut frames = Vec::new();
        for i in 0..100u64 {
            frames.push(masked_frame(true, PING, format!("ping {i}").as_bytes()));
            frames.push(masked_frame(true, TEXT, &join(i)));
        }
        send(&mut raw, &frames, chops).await;
        for i in 0..100u64 {
            expect_pong(&mut raw, format!("ping {i}").as_bytes()).await;
            expect_joined(&mut raw, i).await;
        }
        assert_usable(&mut raw, 1000).await;
    }
}

// ---------------------------------------------------------------------------
// Section 3: reserved bits. Cases 3.1–3.7, extended to every RSV
// combination on every frame type. No extension is ever negotiated.
// ---------------------------------------------------------------------------

/// 3.1 (text, RSV=1), 3.5 (binary, RSV=5), 3.6 (ping, RSV=6), 3.7 (close,
/// RSV=7), and every other combination of RSV bits on text, binary, ping,
/// pong and close frames: the connection fails with 1002, nothing answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_bits_on_any_frame_fail_with_1002() {
    let server = server().await;
    let payloads: [(u8, &[u8]); 5] = [
        (TEXT, b"Hello, world!"),
        (BINARY, &[0xff; 8]),
        (PING, b"Hello, world!"),
        (PONG, b"Hello, world!"),
        (CLOSE, &[0x03, 0xe8]),
    ];
    for (opcode, payload) in payloads {
        for rsv in 1..=7u8 {
            let mut raw = connect(&server).await;
            raw.send_raw(&frame_with_rsv(rsv, opcode, payload)).await;
            expect_failure(&mut raw, 1002).await;
        }
    }
}

/// 3.2 (a valid text, then one with RSV=2), 3.3 (valid text, RSV=3 text and
/// a ping in one chop) and 3.4 (the same frame-wise, and octet-wise): the
/// valid message is answered, then the connection fails, with no pong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_bits_after_a_valid_message_fail_after_answering_it() {
    let server = server().await;
    let mut raw = connect(&server).await;
    raw.send_frame(true, TEXT, &join(1)).await;
    raw.send_raw(&frame_with_rsv(2, TEXT, b"Hello, world!")).await;
    expect_failure_after_joins(&mut raw, &[1], 1002).await;

    for chops in ALL_CHOPS {
        let mut raw = connect(&server).await;
        let frames = [
            masked_frame(true, TEXT, &join(2)),
            frame_with_rsv(3, TEXT, b"Hello, world!"),
            masked_frame(true, PING, b"Hello, world!"),
        ];
        send(&mut raw, &frames, chops).await;
        expect_failure_after_joins(&mut raw, &[2], 1002).await;
    }
}

/// Sends an upgrade request with `extra_headers` and returns the response
/// head (status line and headers).
async fn upgrade_response_head(addr: SocketAddr, extra_headers: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send the upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut byte)).await.expect("response in time").expect("read");
        assert_eq!(n, 1, "connection closed during the handshake: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8(head).expect("the response head is text")
}

/// hyper upgrades only HTTP/1.1 connections: an HTTP/1.0 upgrade request
/// gets a 400 that says so, not a 101 on a connection that then ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_upgrade_request_is_refused_with_400() {
    let server = server().await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let request = format!(
        "GET /ws HTTP/1.0\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        server.addr
    );
    stream.write_all(request.as_bytes()).await.expect("send the upgrade request");
    let mut response = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut response)).await.expect("response in time").expect("read");
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.0 400"), "{text}");
    assert!(text.ends_with("a WebSocket upgrade needs HTTP/1.1"), "{text}");
}

/// No extension is negotiated, even when the client offers
/// permessage-deflate (RFC 7692), so a "compressed" frame (RSV1) is a
/// protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permessage_deflate_is_not_negotiated_so_rsv1_stays_a_protocol_error() {
    let server = server().await;
    let offer = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";
    let head = upgrade_response_head(server.addr, offer).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("sec-websocket-extensions"), "no extension is accepted: {head}");

    let mut raw = RawClient::try_connect(server.addr, "/ws", offer, None).await.expect("upgrade");
    assert_eq!(next_frame(&mut raw).await.json()["type"], "welcome");
    // "Hello" compressed with permessage-deflate (RFC 7692 §7.2.3.1).
    raw.send_raw(&frame_with_rsv(4, TEXT, &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00])).await;
    expect_failure(&mut raw, 1002).await;
}

// ---------------------------------------------------------------------------
// Section 4: reserved opcodes. Cases 4.1.1–4.1.5 (non-control 3–7) and
// 4.2.1–4.2.5 (control 11–15), extended to every reserved opcode with and
// without payload, alone and after a valid message followed by a ping.
// ---------------------------------------------------------------------------

async fn reserved_opcodes_fail(opcodes: std::ops::RangeInclusive<u8>) {
    let server = server().await;
    for opcode in opcodes {
        // 4.x.1/4.x.2: the reserved frame alone, without and with payload.
        for payload in [&b""[..], b"reserved opcode payload"] {
            let mut raw = connect(&server).await;
            raw.send_raw(&masked_frame(true, opcode, payload)).await;
            expect_failure(&mut raw, 1002).await;
        }
        // 4.x.3–4.x.5: a valid message, the reserved frame, a ping.
        for chops in ALL_CHOPS {
            let mut raw = connect(&server).await;
            let frames = [
                masked_frame(true, TEXT, &join(u64::from(opcode))),
                masked_frame(true, opcode, b"reserved opcode payload"),
                masked_frame(true, PING, b"Hello, world!"),
            ];
            send(&mut raw, &frames, chops).await;
            expect_failure_after_joins(&mut raw, &[u64::from(opcode)], 1002).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_non_control_opcodes_3_to_7_fail_with_1002() {
    reserved_opcodes_fail(3..=7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_control_opcodes_11_to_15_fail_with_1002() {
    reserved_opcodes_fail(11..=15).await;
}

// ---------------------------------------------------------------------------
// Section 5: fragmentation. Cases 5.1–5.20.
// ---------------------------------------------------------------------------

/// 5.1 (ping in 2 fragments), 5.2 (pong in 2 fragments), and a close in 2
/// fragments: control frames are never fragmented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_control_frames_fail_with_1002() {
    let server = server().await;
    for opcode in [PING, PONG, CLOSE] {
        let mut raw = connect(&server).await;
        let frames = [masked_frame(false, opcode, b"frag"), masked_frame(true, CONT, b"ment")];
        send(&mut raw, &frames, Chops::One).await;
        expect_failure(&mut raw, 1002).await;
    }
}

/// 5.3 (text in 2 fragments, one chop), 5.4 (frame-wise), 5.5 (octet-wise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_in_two_fragments_is_assembled() {
    let server = server().await;
    let mut raw = connect(&server).await;
    for (i, chops) in ALL_CHOPS.into_iter().enumerate() {
        let reference = i as u64 + 1;
        send(&mut raw, &fragmented_text(&join(reference), 2, false), chops).await;
        expect_joined(&mut raw, reference).await;
    }
}

/// 5.6–5.8: a ping between the two fragments is answered at once (before
/// the message, which completes only afterwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_between_fragments_is_answered_before_the_message() {
    let server = server().await;
    let mut raw = connect(&server).await;
    for (i, chops) in ALL_CHOPS.into_iter().enumerate() {
        let reference = i as u64 + 1;
        let mut frames = fragmented_text(&join(reference), 2, false);
        frames.insert(1, masked_frame(true, PING, b"ping payload"));
        send(&mut raw, &frames, chops).await;
        expect_pong(&mut raw, b"ping payload").await;
        expect_joined(&mut raw, reference).await;
    }
}

/// 5.9–5.11 (continuation with FIN set and nothing to continue, then a
/// text) and 5.12–5.14 (the same without FIN), each in one chop,
/// frame-wise and octet-wise: the connection fails before the text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_without_a_message_to_continue_fails_with_1002() {
    let server = server().await;
    for fin in [true, false] {
        for chops in ALL_CHOPS {
            let mut raw = connect(&server).await;
            let frames = [masked_frame(fin, CONT, b"non-continuation payload"), masked_frame(true, TEXT, &join(1))];
            send(&mut raw, &frames, chops).await;
            expect_failure(&mut raw, 1002).await;
        }
    }
}

/// 5.15: a text in 2 fragments, then a continuation with nothing to
/// continue, then a text: the first message is answered, then the
/// connection fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_continuation_after_a_complete_fragmented_message_fails_with_1002() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let mut frames = fragmented_text(&join(1), 2, false);
    frames.push(masked_frame(false, CONT, b"fragment3"));
    frames.push(masked_frame(true, TEXT, &join(2)));
    send(&mut raw, &frames, Chops::One).await;
    expect_failure_after_joins(&mut raw, &[1], 1002).await;
}

/// 5.16 (continuation without FIN, then a text in 2 fragments, twice) and
/// 5.17 (the same with FIN set on the stray continuation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stray_continuation_before_a_fragmented_message_fails_with_1002() {
    let server = server().await;
    for fin in [false, true] {
        let mut raw = connect(&server).await;
        let mut frames = Vec::new();
        for reference in [1, 2] {
            frames.push(masked_frame(fin, CONT, b"fragment1"));
            frames.extend(fragmented_text(&join(reference), 2, false));
        }
        send(&mut raw, &frames, Chops::One).await;
        expect_failure(&mut raw, 1002).await;
    }
}

/// 5.18 (a text "fragmented" into two frames that both have the text
/// opcode), and likewise a binary or a complete text starting inside an
/// open fragmented message, or a text inside an open binary one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_data_frame_inside_an_open_fragmented_message_fails_with_1002() {
    let server = server().await;
    let request = join(1);
    let (first, second) = request.split_at(10);
    let cases: [[Vec<u8>; 2]; 4] = [
        [masked_frame(false, TEXT, first), masked_frame(true, TEXT, second)],
        [masked_frame(false, TEXT, first), masked_frame(true, BINARY, b"\x00\x01")],
        [masked_frame(false, TEXT, first), masked_frame(false, TEXT, second)],
        [masked_frame(false, BINARY, b"\x00\x01"), masked_frame(true, TEXT, &request)],
    ];
    for frames in cases {
        let mut raw = connect(&server).await;
        send(&mut raw, &frames, Chops::One).await;
        expect_failure(&mut raw, 1002).await;
    }
}

/// 5.19 and 5.20: a text in 5 fragments sent with pauses, with pings after
/// the second and fourth: each pong arrives while the message is still
/// incomplete (the server does not hold control frames back), and the
/// message is answered once complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_inside_a_slow_fragmented_message_are_answered_while_it_is_open() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let fragments = fragmented_text(&join(1), 5, false);
    for (i, fragment) in fragments.iter().enumerate() {
        raw.send_raw(fragment).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        if i == 1 || i == 3 {
            let payload = format!("pongme {i}!");
            raw.send_frame(true, PING, payload.as_bytes()).await;
            expect_pong(&mut raw, payload.as_bytes()).await;
        }
    }
    expect_joined(&mut raw, 1).await;
}

/// Text messages in 2 to 16 fragments, with and without empty fragments
/// (empty first, middle and last), are assembled in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_in_2_to_16_fragments_including_empty_ones_is_assembled() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let mut reference = 0;
    for n in 2..=16 {
        for empty in [false, true] {
            reference += 1;
            let request = join_of_len(200, reference);
            send(&mut raw, &fragmented_text(&request, n, empty), Chops::One).await;
            expect_joined(&mut raw, reference).await;
        }
    }
    // One fragment per byte, every frame in one write.
    reference += 1;
    send(&mut raw, &one_byte_fragments(&join(reference)), Chops::One).await;
    expect_joined(&mut raw, reference).await;
}

/// A fragmented text (with a ping between fragments) trickled byte by byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_text_trickled_byte_by_byte_is_assembled() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let mut frames = fragmented_text(&join_of_len(300, 1), 7, true);
    frames.insert(3, masked_frame(true, PING, b"mid-message"));
    send(&mut raw, &frames, Chops::OctetWise).await;
    expect_pong(&mut raw, b"mid-message").await;
    expect_joined(&mut raw, 1).await;
}

/// A fragmented binary message is one message: one `unsupported` error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_binary_message_gets_one_unsupported_error() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let frames = [
        masked_frame(false, BINARY, &[0xff; 100]),
        masked_frame(true, PING, b""),
        masked_frame(false, CONT, &[]),
        masked_frame(true, CONT, &[0x00; 100]),
    ];
    send(&mut raw, &frames, Chops::One).await;
    expect_pong(&mut raw, b"").await;
    expect_error(&mut raw, "unsupported").await;
    assert_usable(&mut raw, 1).await;
}

// ---------------------------------------------------------------------------
// Section 6: UTF-8 handling. Cases 6.1.x–6.23.x.
// ---------------------------------------------------------------------------

/// 6.1.1 (empty text), 6.1.2 (three empty fragments) and 6.1.3 (empty
/// first and last fragments around a non-empty one) are valid text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_text_messages_and_empty_fragments_are_valid() {
    let server = server().await;
    let mut raw = connect(&server).await;
    raw.send_frame(true, TEXT, b"").await;
    expect_error(&mut raw, "bad_request").await;
    let empty = [masked_frame(false, TEXT, b""), masked_frame(false, CONT, b""), masked_frame(true, CONT, b"")];
    send(&mut raw, &empty, Chops::One).await;
    expect_error(&mut raw, "bad_request").await;
    let around = [masked_frame(false, TEXT, b""), masked_frame(false, CONT, &join(1)), masked_frame(true, CONT, b"")];
    send(&mut raw, &around, Chops::One).await;
    expect_joined(&mut raw, 1).await;
}

/// 6.2.1 (valid UTF-8 in one fragment), 6.2.2 (two fragments split at a
/// code point boundary), 6.2.3 (one-byte fragments, so fragments end
/// inside characters), 6.2.4 (the same with "κόσμε"): the text comes back
/// unchanged as the content of the `message`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_utf8_split_anywhere_across_fragments_is_accepted() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let room = join_room(&mut raw).await;
    let hello = "Hello-µ@ßöäüàá-UTF-8!!";
    let kosme = std::str::from_utf8(KOSME).unwrap();

    raw.send_frame(true, TEXT, &message(&room, hello)).await;
    expect_message(&mut raw, hello).await;

    let request = message(&room, hello);
    let at_boundary = request.windows(2).position(|w| w == "µ".as_bytes()).expect("µ in the request");
    let frames =
        [masked_frame(false, TEXT, &request[..at_boundary]), masked_frame(true, CONT, &request[at_boundary..])];
    send(&mut raw, &frames, Chops::One).await;
    expect_message(&mut raw, hello).await;

    for text in [hello, kosme] {
        send(&mut raw, &one_byte_fragments(&message(&room, text)), Chops::One).await;
        expect_message(&mut raw, text).await;
    }
}

/// 6.3.1: invalid UTF-8 in one frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_one_frame_fails_with_1007() {
    let server = server().await;
    let mut raw = connect(&server).await;
    raw.send_frame(true, TEXT, &[KOSME, b"\xed\xa0\x80edited"].concat()).await;
    expect_failure(&mut raw, 1007).await;
}

/// Sends `fragments` one write at a time, waiting after each, and expects
/// the connection to fail with 1007 right after fragment `fails_at` (the
/// first one after which the text can no longer become valid): the server
/// must not wait for the rest of the message ("fail fast"). The fragments
/// after `fails_at`, including the final one, are never sent.
async fn fails_fast(raw: &mut RawClient, fragments: &[Vec<u8>], fails_at: usize, what: &str) {
    assert!(fails_at + 1 < fragments.len(), "{what}: the final fragment must come after the invalid bytes");
    raw.send_raw(&fragments[..fails_at].concat()).await;
    if let Ok(frame) = raw.read_frame_within(Duration::from_millis(20)).await {
        panic!("{what}: the server answered {frame:?} while the text was still valid");
    }
    raw.send_raw(&fragments[fails_at]).await;
    let (before, code, reason) = read_to_close(raw).await;
    assert!(before.is_empty(), "{what}: {before:?}");
    assert_eq!(code, 1007, "{what}: closed before the final fragment was sent ({reason})");
    finish_close(raw, code).await;
}

/// 6.3.2: invalid UTF-8 in one-byte fragments: the connection fails at the
/// fragment that makes the text invalid, long before the message ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_one_byte_fragments_fails_fast_with_1007() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let text = [KOSME, b"\xed\xa0\x80edited"].concat();
    // 0xED 0xA0 starts a surrogate (U+D800): invalid at the 0xA0.
    let fails_at = KOSME.len() + 1;
    fails_fast(&mut raw, &one_byte_fragments(&text), fails_at, "6.3.2").await;
}

/// 6.4.1 (the second of 3 fragments is a code point above U+10FFFF) and
/// 6.4.2 (the first fragment ends with 0xF4, the second byte 0x90 makes
/// it invalid): the connection fails before the third fragment is sent.
/// Also an invalid sequence split across a fragment boundary ("\xce" then
/// "A").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_middle_fragment_fails_before_the_message_completes() {
    let server = server().await;
    let cases: [(&str, [&[u8]; 3]); 3] = [
        ("6.4.1", [KOSME, b"\xf4\x90\x80\x80", b"edited"]),
        ("6.4.2", [&[KOSME, b"\xf4"].concat(), b"\x90", b"\x80\x80edited"]),
        ("split sequence", [b"{\"x\":\"\xce", b"A", b"\"}"]),
    ];
    for (what, parts) in cases {
        let mut raw = connect(&server).await;
        let frames = [
            masked_frame(false, TEXT, parts[0]),
            masked_frame(false, CONT, parts[1]),
            masked_frame(true, CONT, parts[2]),
        ];
        fails_fast(&mut raw, &frames, 1, what).await;
    }
}

/// 6.4.3 and 6.4.4: one frame whose payload arrives in 3 chops, the second
/// making it invalid. Autobahn accepts failing fast (at the second chop)
/// or, "non-strict", once the frame is complete; this server validates a
/// frame once it has all of it, so it is non-strict here. The test checks
/// that the close is 1007 either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_chops_of_one_frame_fails_with_1007() {
    let server = server().await;
    let cases: [[&[u8]; 3]; 2] =
        [[KOSME, b"\xf4\x90\x80\x80", b"edited"], [&[KOSME, b"\xf4"].concat(), b"\x90", b"\x80\x80edited"]];
    for parts in cases {
        let mut raw = connect(&server).await;
        let frame = masked_frame(true, TEXT, &parts.concat());
        let header = frame.len() - parts.concat().len();
        let (first, rest) = frame.split_at(header + parts[0].len());
        let (second, third) = rest.split_at(parts[1].len());
        raw.send_raw(first).await;
        if let Ok(frame) = raw.read_frame_within(Duration::from_millis(50)).await {
            panic!("the first chop is valid UTF-8, yet the server answered {frame:?}");
        }
        raw.send_raw(second).await;
        let code = match raw.read_frame_within(Duration::from_millis(300)).await {
            // Strict: failed at the second chop.
            Ok(Some(frame)) => frame.close().0,
            Ok(None) => panic!("the connection ended without a Close frame"),
            // Non-strict: nothing yet; the last chop completes the frame.
            Err(()) => {
                raw.send_raw(third).await;
                let (before, code, _) = read_to_close(&mut raw).await;
                assert!(before.is_empty(), "{before:?}");
                code
            }
        };
        assert_eq!(code, 1007);
        finish_close(&mut raw, code).await;
    }
}

/// Autobahn 6.5–6.23 (from Markus Kuhn's UTF-8 decoder stress test): the
/// valid sequences. Section numbers are Autobahn's.
fn valid_sequences() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("6.5.1", b"hello\x24world".to_vec()),
        ("6.5.2", b"hello\xc2\xa2world".to_vec()),
        ("6.5.3", b"hello\xe2\x82\xacworld".to_vec()),
        ("6.5.4", b"hello\xf0\xa4\xad\xa2world".to_vec()),
        ("6.5.5", KOSME.to_vec()),
        ("6.7.1", b"\x00".to_vec()),
        ("6.7.2", b"\xc2\x80".to_vec()),
        ("6.7.3", b"\xe0\xa0\x80".to_vec()),
        ("6.7.4", b"\xf0\x90\x80\x80".to_vec()),
        ("6.9.1", b"\x7f".to_vec()),
        ("6.9.2", b"\xdf\xbf".to_vec()),
        ("6.9.3 (U+FFFF)", b"\xef\xbf\xbf".to_vec()),
        ("6.9.4 (U+10FFFF)", b"\xf4\x8f\xbf\xbf".to_vec()),
        ("6.11.1 (U+D7FF)", b"\xed\x9f\xbf".to_vec()),
        ("6.11.2 (U+E000)", b"\xee\x80\x80".to_vec()),
        ("6.11.3 (U+FFFD)", b"\xef\xbf\xbd".to_vec()),
        ("6.11.4 (U+10FFFF)", b"\xf4\x8f\xbf\xbf".to_vec()),
    ];
    // 6.6.x: prefixes of "κόσμε" that end on a character boundary.
    let kosme = std::str::from_utf8(KOSME).unwrap();
    for end in 1..=KOSME.len() {
        if kosme.is_char_boundary(end) {
            cases.push(("6.6 (prefix of κόσμε)", KOSME[..end].to_vec()));
        }
    }
    // 6.22.x: non-characters are valid UTF-8: U+FFFE, U+FFFF and the last
    // two code points of planes 1–16.
    cases.push(("6.22 (U+FFFE)", b"\xef\xbf\xbe".to_vec()));
    cases.push(("6.22 (U+FFFF)", b"\xef\xbf\xbf".to_vec()));
    for plane in 1..=16u32 {
        for last in [0xfffe, 0xffff] {
            let c = char::from_u32(plane << 16 | last).unwrap();
            cases.push(("6.22 (plane non-character)", c.to_string().into_bytes()));
        }
    }
    // 6.23.x: Unicode specials U+FFF9–U+FFFF.
    for c in '\u{fff9}'..='\u{ffff}' {
        cases.push(("6.23 (special)", c.to_string().into_bytes()));
    }
    cases
}

/// Autobahn 6.6–6.21: the invalid sequences.
fn invalid_sequences() -> Vec<(&'static str, Vec<u8>)> {
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // 6.6.x: prefixes of "κόσμε" that end inside a character.
    let kosme = std::str::from_utf8(KOSME).unwrap();
    for end in 1..KOSME.len() {
        if !kosme.is_char_boundary(end) {
            cases.push(("6.6 (truncated κόσμε)", KOSME[..end].to_vec()));
        }
    }
    let fixed: [(&str, &[u8]); 39] = [
        ("6.8.1 (5-byte form)", b"\xf8\x88\x80\x80\x80"),
        ("6.8.2 (6-byte form)", b"\xfc\x84\x80\x80\x80\x80"),
        ("6.10.1 (U+1FFFFF)", b"\xf7\xbf\xbf\xbf"),
        ("6.10.2", b"\xfb\xbf\xbf\xbf\xbf"),
        ("6.10.3", b"\xfd\xbf\xbf\xbf\xbf\xbf"),
        ("6.11.5 (U+110000)", b"\xf4\x90\x80\x80"),
        ("6.12.1", b"\x80"),
        ("6.12.2", b"\xbf"),
        ("6.12.3", b"\x80\xbf"),
        ("6.12.4", b"\x80\xbf\x80"),
        ("6.12.5", b"\x80\xbf\x80\xbf"),
        ("6.12.6", b"\x80\xbf\x80\xbf\x80"),
        ("6.12.7", b"\x80\xbf\x80\xbf\x80\xbf"),
        ("6.16.1", b"\xfe"),
        ("6.16.2", b"\xff"),
        ("6.16.3", b"\xfe\xfe\xff\xff"),
        ("6.17.1 (overlong /)", b"\xc0\xaf"),
        ("6.17.2", b"\xe0\x80\xaf"),
        ("6.17.3", b"\xf0\x80\x80\xaf"),
        ("6.17.4", b"\xf8\x80\x80\x80\xaf"),
        ("6.17.5", b"\xfc\x80\x80\x80\x80\xaf"),
        ("6.18.1 (maximum overlong)", b"\xc1\xbf"),
        ("6.18.2", b"\xe0\x9f\xbf"),
        ("6.18.3", b"\xf0\x8f\xbf\xbf"),
        ("6.18.4", b"\xf8\x87\xbf\xbf\xbf"),
        ("6.18.5", b"\xfc\x83\xbf\xbf\xbf\xbf"),
        ("6.19.1 (overlong NUL)", b"\xc0\x80"),
        ("6.19.2", b"\xe0\x80\x80"),
        ("6.19.3", b"\xf0\x80\x80\x80"),
        ("6.19.4", b"\xf8\x80\x80\x80\x80"),
        ("6.19.5", b"\xfc\x80\x80\x80\x80\x80"),
        ("6.20.1 (U+D800)", b"\xed\xa0\x80"),
        ("6.20.2 (U+DB7F)", b"\xed\xad\xbf"),
        ("6.20.3 (U+DB80)", b"\xed\xae\x80"),
        ("6.20.4 (U+DBFF)", b"\xed\xaf\xbf"),
        ("6.20.5 (U+DC00)", b"\xed\xb0\x80"),
        ("6.20.6 (U+DF80)", b"\xed\xbe\x80"),
        ("6.20.7 (U+DFFF)", b"\xed\xbf\xbf"),
        ("6.21.1 (U+D800 U+DC00)", b"\xed\xa0\x80\xed\xb0\x80"),
    ];
    cases.extend(fixed.iter().map(|(name, bytes)| (*name, bytes.to_vec())));
    // 6.12.8: every continuation byte 0x80–0xBE in a row.
    cases.push(("6.12.8", (0x80..0xbf).collect()));
    // 6.13.x: lonely start bytes, each followed by a space.
    for (name, range) in [
        ("6.13.1", 0xc0..0xdf),
        ("6.13.2", 0xe0..0xef),
        ("6.13.3", 0xf0..0xf7),
        ("6.13.4", 0xf8..0xfb),
        ("6.13.5", 0xfc..0xfd),
    ] {
        cases.push((name, range.flat_map(|b| [b, b' ']).collect()));
    }
    // 6.14.x: sequences with their last continuation byte missing; 6.15.1:
    // all of them concatenated.
    let truncated: [&[u8]; 10] = [
        b"\xc0",
        b"\xe0\x80",
        b"\xf0\x80\x80",
        b"\xf8\x80\x80\x80",
        b"\xfc\x80\x80\x80\x80",
        b"\xdf",
        b"\xef\xbf",
        b"\xf7\xbf\xbf",
        b"\xfb\xbf\xbf\xbf",
        b"\xfd\xbf\xbf\xbf\xbf",
    ];
    cases.extend(truncated.iter().map(|bytes| ("6.14 (last byte missing)", bytes.to_vec())));
    cases.push(("6.15.1", truncated.concat()));
    // 6.21.2–6.21.8: the other paired surrogates.
    for (high, low) in [
        (&b"\xed\xa0\x80"[..], &b"\xed\xbf\xbf"[..]),
        (b"\xed\xad\xbf", b"\xed\xb0\x80"),
        (b"\xed\xad\xbf", b"\xed\xbf\xbf"),
        (b"\xed\xae\x80", b"\xed\xb0\x80"),
        (b"\xed\xae\x80", b"\xed\xbf\xbf"),
        (b"\xed\xaf\xbf", b"\xed\xb0\x80"),
        (b"\xed\xaf\xbf", b"\xed\xbf\xbf"),
    ] {
        cases.push(("6.21 (paired surrogates)", [high, low].concat()));
    }
    cases
}

/// 6.5–6.23, the valid sequences: each is accepted alone as a whole text
/// payload (exactly as Autobahn sends it: the answer is an `error` because
/// it is not JSON, and the connection stays open) and comes back unchanged
/// as the content of a `message`. Also a long text mixing 1- to 4-byte
/// characters, whole and in fragments cut inside characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_utf8_sequences_are_accepted_and_come_back_unchanged() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let room = join_room(&mut raw).await;
    for (case, bytes) in valid_sequences() {
        let text = std::str::from_utf8(&bytes).unwrap_or_else(|_| panic!("{case} is valid UTF-8"));
        raw.send_frame(true, TEXT, &bytes).await;
        let answer = next_frame(&mut raw).await.json();
        assert_eq!(answer["type"], "error", "{case}: {answer}");
        raw.send_frame(true, TEXT, &message(&room, text)).await;
        expect_message(&mut raw, text).await;
    }

    let long: String = "a\u{e9}\u{20ac}\u{1f600}\u{ffff}\u{10ffff}κόσμε ".repeat(2400);
    assert!(long.len() > 65_536, "long enough for the 64-bit length form");
    raw.send_frame(true, TEXT, &message(&room, &long)).await;
    expect_message(&mut raw, &long).await;
    send(&mut raw, &fragmented_text(&message(&room, &long), 9, true), Chops::One).await;
    expect_message(&mut raw, &long).await;
}

/// 6.6–6.21, the invalid sequences, each sent as the whole payload of one
/// text frame: the connection fails with 1007, nothing answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_sequences_fail_with_1007() {
    let server = server().await;
    for (case, bytes) in invalid_sequences() {
        assert!(std::str::from_utf8(&bytes).is_err(), "{case} is invalid UTF-8");
        let mut raw = connect(&server).await;
        raw.send_frame(true, TEXT, &bytes).await;
        let (before, code, reason) = read_to_close(&mut raw).await;
        assert!(before.is_empty(), "{case}: {before:?}");
        assert_eq!(code, 1007, "{case}: {reason}");
        finish_close(&mut raw, code).await;
    }
}

/// 6.6–6.21 sent the 6.3.2 way: each invalid sequence inside a JSON
/// string, one byte per fragment. The connection fails fast, at the first
/// fragment after which the text can no longer be valid (a truncated
/// sequence: at the byte after it), before the final fragment is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_sequences_in_one_byte_fragments_fail_fast_with_1007() {
    let server = server().await;
    for (case, bytes) in invalid_sequences() {
        let request = message_with_raw_content("room", &bytes);
        // The first prefix that no continuation can make valid.
        let fails_at = (1..=request.len())
            .find(|&end| std::str::from_utf8(&request[..end]).is_err_and(|e| e.error_len().is_some()))
            .expect("invalid before the end")
            - 1;
        let mut raw = connect(&server).await;
        fails_fast(&mut raw, &one_byte_fragments(&request), fails_at, case).await;
    }
}

// ---------------------------------------------------------------------------
// Section 7: the close handshake. Cases 7.1.1–7.1.6, 7.3.1–7.3.6, 7.5.1,
// 7.7.1–7.7.13, 7.9.1–7.9.9 (and 7.9.x of older releases), 7.13.1–7.13.2.
// ---------------------------------------------------------------------------

fn close_frame(code: u16, reason: &[u8]) -> Vec<u8> {
    masked_frame(true, CLOSE, &[&code.to_be_bytes()[..], reason].concat())
}

/// 7.1.1: a message then a close: the message is answered, then the close
/// handshake completes and the server closes TCP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_after_a_message_answers_the_message_then_closes() {
    let server = server().await;
    let mut raw = connect(&server).await;
    send(&mut raw, &[masked_frame(true, TEXT, &join(1)), close_frame(1000, b"")], Chops::One).await;
    expect_joined(&mut raw, 1).await;
    expect_clean_close(&mut raw, 1000).await;
}

/// 7.1.2 (a second close), 7.1.3 (a ping after the close), 7.1.4 (a text
/// after the close): whatever follows the client's close is ignored, in the
/// same write or in a later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_after_the_clients_close_are_ignored() {
    let server = server().await;
    let after: [Vec<u8>; 3] =
        [close_frame(1000, b""), masked_frame(true, PING, b"after close"), masked_frame(true, TEXT, &join(1))];
    for frame in &after {
        for chops in [Chops::One, Chops::FrameWise] {
            let mut raw = connect(&server).await;
            let frames = [close_frame(1000, b""), frame.clone()];
            match chops {
                Chops::FrameWise => {
                    raw.send_raw(&frames[0]).await;
                    // The server may already be gone: a failed write is fine.
                    let _ = raw.stream.write_all(&frames[1]).await;
                }
                _ => send(&mut raw, &frames, chops).await,
            }
            expect_clean_close(&mut raw, 1000).await;
        }
    }
}

/// 7.1.5: first fragment, close, second fragment: the close wins, the
/// message is never answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_inside_a_fragmented_message_ends_the_connection_unanswered() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let request = join(1);
    let frames =
        [masked_frame(false, TEXT, &request[..10]), close_frame(1000, b""), masked_frame(true, CONT, &request[10..])];
    send(&mut raw, &frames, Chops::One).await;
    expect_clean_close(&mut raw, 1000).await;
}

/// 7.1.6: a 256 KiB text, a short text, a close and a ping, back to back:
/// both texts are answered (both with `error`: neither is JSON), then the
/// close; the ping after the close gets no pong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_message_then_close_then_ping() {
    let server = server().await;
    let mut raw = connect(&server).await;
    let big = b"BAsd7&jh23".repeat(256 * 1024 / 10 + 1)[..256 * 1024].to_vec();
    let frames = [
        masked_frame(true, TEXT, &big),
        masked_frame(true, TEXT, b"Hello World!"),
        close_frame(1000, b""),
        masked_frame(true, PING, b""),
    ];
    send(&mut raw, &frames, Chops::One).await;
    expect_error(&mut raw, "bad_request").await;
    expect_error(&mut raw, "bad_request").await;
    expect_clean_close(&mut raw, 1000).await;
}

/// 7.3.1: a close without payload is answered with 1000, then TCP closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_without_payload_is_answered_with_1000_and_tcp_closes() {
    let server = server().await;
    let mut raw = connect(&server).await;
    raw.send_frame(true, CLOSE, b"").await;
    expect_clean_close(&mut raw, 1000).await;
}

/// 7.3.2: a 1-byte close payload (half a code) is a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_1_byte_payload_fails_with_1002() {
    let server = server().await;
    let mut raw = connect(&server).await;
    raw.send_frame(true, CLOSE, b"\x03").await;
    expect_failure(&mut raw, 1002).await;
}

/// 7.3.3 (code only), 7.3.4 (code and reason), 7.3.5 (code and a 123-byte
/// reason, the most that fits) and a reason in multi-byte UTF-8: the code
/// is echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_code_and_reason_is_echoed() {
    let server = server().await;
    let long_reason = [b'*'; 123];
    let reasons: [&[u8]; 4] = [b"", b"Hello World!", &long_reason, "κόσμε \u{10ffff}".as_bytes()];
    for reason in reasons {
        let mut raw = connect(&server).await;
        raw.send_raw(&close_frame(1000, reason)).await;
        expect_clean_close(&mut raw, 1000).await;
    }
}

/// 7.3.6: a close payload of 126 bytes (code and a 124-byte reason) is over
/// the control frame limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_with_126_byte_payload_fails_with_1002() {
    let server = server().await;
    let mut raw = connect(&server).await;
    raw.send_raw(&close_frame(1000, &[b'*'; 124])).await;
    expect_failure(&mut raw, 1002).await;
}

/// 7.5.1: a close reason that is not UTF-8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_reason_with_invalid_utf8_fails_with_1007() {
    let server = server().await;
    let mut raw = connect(&server).await;
    raw.send_raw(&close_frame(1000, &[KOSME, b"\xed\xa0\x80edited"].concat())).await;
    expect_failure(&mut raw, 1007).await;
}

/// 7.7.1–7.7.13: valid close codes are echoed. Also 1012–1014, registered
/// with IANA after Autobahn's list was written (older Autobahn releases
/// listed them as invalid in 7.9.x): accepted and echoed, on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_close_codes_are_echoed() {
    let server = server().await;
    let codes = [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999, 1012, 1013, 1014];
    for code in codes {
        let mut raw = connect(&server).await;
        raw.send_raw(&close_frame(code, b"")).await;
        expect_clean_close(&mut raw, code).await;
    }
}

/// 7.9.1–7.9.9 (0, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999), 1015
/// (7.9.x in older releases; only for TLS failures, never sent), 7.13.1
/// (5000) and 7.13.2 (65535): invalid close codes are a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_close_codes_fail_with_1002() {
    let server = server().await;
    for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535] {
        let mut raw = connect(&server).await;
        raw.send_raw(&close_frame(code, b"")).await;
        let (before, got, reason) = read_to_close(&mut raw).await;
        assert!(before.is_empty(), "code {code}: {before:?}");
        assert_eq!(got, 1002, "close code {code} must be refused ({reason})");
        finish_close(&mut raw, got).await;
    }
}

/// After failing a connection, the server's side of the close handshake:
/// its Close first, then TCP closes once the client answers, within a
/// couple of seconds, even if the client keeps the socket open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_initiated_close_ends_with_tcp_closed() {
    let server = server().await;
    let mut raw = connect(&server).await;
    raw.send_raw(&frame_with_rsv(1, TEXT, b"x")).await;
    let (_, code, _) = read_to_close(&mut raw).await;
    assert_eq!(code, 1002);
    raw.send_raw(&close_frame(1002, b"")).await;
    assert!(raw.sees_eof_within(EOF_WITHIN).await, "TCP closed after the handshake");
}
