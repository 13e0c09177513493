//! Bad input: each case gets its documented error (or close code), and the
//! connection stays usable wherever the protocol allows it.

mod support;

use support::TestServer;
use support::raw::{BINARY, CONT, PING, PONG, RawClient, TEXT};
use tokio_tungstenite::tungstenite::Message;

/// After an error, the client can still chat.
async fn still_works(client: &mut support::Client, room: &str) {
    let ack = client.post(room, "still here").await;
    assert_eq!(ack["type"], "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_get_errors_and_the_connection_stays_usable() {
    let server = TestServer::start().await;
    let mut client = server.client("Alice").await;
    client.join("lobby").await;

    let cases: &[(&str, &str, &str)] = &[
        ("not json", "bad_request", "invalid JSON"),
        ("{\"type\":\"message\",\"room\":", "bad_request", "invalid JSON"),
        ("[1,2,3]", "bad_request", "JSON object"),
        ("{\"room\":\"lobby\"}", "bad_request", "missing field `type`"),
        ("{\"type\":\"dance\"}", "unsupported", "unknown frame type \"dance\""),
        ("{\"type\":7}", "bad_request", "`type` must be a string"),
        ("{\"type\":\"join\"}", "bad_request", "missing field `room`"),
        ("{\"type\":\"message\",\"room\":\"lobby\"}", "bad_request", "missing field `content`"),
        ("{\"type\":\"join\",\"room\":42}", "bad_request", "invalid type: integer `42`, expected a string"),
        ("{\"type\":\"history\",\"room\":\"lobby\",\"limit\":\"ten\"}", "bad_request", "invalid type: string"),
        ("{\"type\":\"join\",\"room\":\"a\",\"extra\":1}", "bad_request", "unknown field `extra`"),
        ("{\"type\":\"join\",\"room\":\"a\",\"ref\":{\"x\":1}}", "bad_request", "`ref` must be"),
    ];
    for (text, code, needle) in cases {
        client.send_text(text).await;
        let error = client.recv().await;
        assert_eq!(error["type"], "error", "{text}: {error}");
        assert_eq!(error["code"], *code, "{text}: {error}");
        let message = error["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{text}: message {message:?} should contain {needle:?}");
    }

    // A failed frame's ref comes back with the error.
    client.send_text("{\"type\":\"join\",\"ref\":\"r-1\"}").await;
    assert_eq!(client.recv().await["ref"], "r-1");

    // Binary frames are not part of the protocol.
    client.send_message(Message::binary(vec![1u8, 2, 3])).await;
    let error = client.recv().await;
    assert_eq!(error["code"], "unsupported");

    // Deeply nested JSON is refused without hurting the server.
    client.send_text(&"[".repeat(10_000)).await;
    assert_eq!(client.recv().await["code"], "bad_request");

    still_works(&mut client, "lobby").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_closes_with_1007() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(server.addr, "/ws?nick=Raw").await;
    assert_eq!(raw.recv().await["type"], "welcome");
    raw.send_frame(true, TEXT, b"{\"type\":\"join\",\"room\":\"\xFF\"}").await;
    assert_eq!(raw.expect_close().await.0, 1007);

    // Split across fragments, the bad byte sequence is caught too.
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.recv().await;
    raw.send_frame(false, TEXT, b"{\"x\":\"\xCE").await;
    raw.send_frame(true, CONT, b"A\"}").await;
    assert_eq!(raw.expect_close().await.0, 1007);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frame_is_refused_from_its_header_with_1009() {
    let server = TestServer::with_toml("[limits]\nmax_frame_bytes = 1024\nmax_message_bytes = 4096\n").await;

    // Only the header of a 1 MiB frame is sent: the server must not wait for
    // (or buffer) the payload before refusing it.
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.recv().await;
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(1u64 << 20).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    raw.send_raw(&header).await;
    let (code, reason) = raw.expect_close().await;
    assert_eq!(code, 1009);
    assert!(reason.contains("1024"), "reason names the limit: {reason}");

    // A message whose fragments add up past the message limit.
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.recv().await;
    raw.send_frame(false, TEXT, &[b'a'; 1000]).await;
    for _ in 0..3 {
        raw.send_frame(false, CONT, &[b'a'; 1000]).await;
    }
    raw.send_frame(true, CONT, &[b'a'; 1000]).await;
    assert_eq!(raw.expect_close().await.0, 1009);

    // A well-behaved client library sending too much gets 1009 as well.
    let mut client = server.client("Big").await;
    client.send_text(&"x".repeat(2000)).await;
    assert_eq!(client.expect_close().await.0, 1009);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_1002() {
    let server = TestServer::start().await;
    let violations: &[(&str, Vec<u8>)] = &[
        ("reserved bit", vec![0xC1, 0x80, 0, 0, 0, 0]),
        ("unknown opcode", vec![0x83, 0x80, 0, 0, 0, 0]),
        ("unmasked frame", vec![0x81, 0x00]),
        ("fragmented ping", vec![0x09, 0x80, 0, 0, 0, 0]),
        ("continuation first", support::raw::masked_frame(true, CONT, b"x")),
    ];
    for (name, bytes) in violations {
        let mut raw = RawClient::connect(server.addr, "/ws").await;
        raw.recv().await;
        raw.send_raw(bytes).await;
        assert_eq!(raw.expect_close().await.0, 1002, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragmented_messages_pings_and_pongs_are_handled() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(server.addr, "/ws?nick=Frag").await;
    raw.recv().await;
    let join = br#"{"type":"join","room":"lobby"}"#;
    raw.send_frame(false, TEXT, &join[..10]).await;
    raw.send_frame(true, PING, b"hello").await;
    raw.send_frame(false, CONT, &join[10..20]).await;
    raw.send_frame(true, PONG, b"").await;
    raw.send_frame(true, CONT, &join[20..]).await;
    let pong = raw.read_frame().await.expect("pong");
    assert_eq!((pong.opcode, pong.payload.as_slice()), (PONG, &b"hello"[..]));
    assert_eq!(raw.recv().await["type"], "joined");

    raw.send_frame(true, BINARY, b"\x00\x01").await;
    assert_eq!(raw.recv().await["code"], "unsupported");
    raw.send_frame(true, TEXT, br#"{"type":"message","room":"lobby","content":"ok","ref":1}"#).await;
    assert_eq!(raw.recv().await["type"], "message");
    assert_eq!(raw.recv().await["type"], "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clean_close_is_echoed() {
    let server = TestServer::start().await;
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.recv().await;
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    raw.send_frame(true, support::raw::CLOSE, &payload).await;
    assert_eq!(raw.expect_close().await.0, 1000);
    assert!(raw.sees_eof_within(std::time::Duration::from_secs(2)).await, "server closes TCP after the handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_websocket_requests_get_http_errors() {
    let server = TestServer::start().await;
    assert_eq!(server.get_status("/ws").await, 400);
    assert_eq!(server.get_status("/nowhere").await, 404);
    assert_eq!(server.get_status("/healthz").await, 200);
    assert_eq!(server.get_status("/readyz").await, 200);
}
