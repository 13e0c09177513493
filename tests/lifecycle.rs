//! Connection deadlines and shutdown.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::TestServer;
use support::raw::{PING, RawClient, TEXT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_messages_then_sends_1001_to_every_client() {
    let mut server = TestServer::start().await;
    let mut alice = server.client("Alice").await;
    let mut bob = server.client("Bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    for i in 0..50 {
        bob.post("lobby", &format!("before shutdown {i}")).await;
    }
    // Alice has read nothing since joining: 1 presence + 50 messages wait for her.
    server.begin_shutdown();
    assert_eq!(alice.recv().await["event"], "join");
    for i in 0..50 {
        assert_eq!(alice.recv().await["content"], format!("before shutdown {i}"));
    }
    assert_eq!(alice.expect_close().await, (1001, "server shutting down".to_owned()));
    assert_eq!(bob.expect_close().await, (1001, "server shutting down".to_owned()));
    server.finished().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_while_shutting_down_and_the_close_deadline_is_enforced() {
    let mut server = TestServer::with_toml("[timeouts]\nclose = \"1s\"\nshutdown_grace = \"10s\"\n").await;
    assert_eq!(server.get_status("/readyz").await, 200);
    // A client that never answers the Close frame keeps the server draining
    // until the close deadline.
    let mut stubborn = RawClient::connect(server.addr, "/ws").await;
    stubborn.recv().await;
    server.begin_shutdown();
    let started = Instant::now();
    assert_eq!(stubborn.expect_close().await, (1001, "server shutting down".to_owned()));
    assert_eq!(server.get_status("/readyz").await, 503);
    assert_eq!(server.get_status("/healthz").await, 200);
    assert_eq!(server.get_status("/ws").await, 503, "no new connections while draining");
    assert!(stubborn.sees_eof_within(Duration::from_secs(5)).await, "dropped at the close deadline");
    server.finished().await.expect("clean shutdown");
    assert!(started.elapsed() < Duration::from_secs(5), "finished long before the grace period");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_closed_after_the_first_frame_deadline() {
    let server = TestServer::with_toml("[timeouts]\nfirst_frame = \"300ms\"\n").await;
    let mut silent = RawClient::connect(server.addr, "/ws").await;
    assert_eq!(silent.recv().await["type"], "welcome");
    let started = Instant::now();
    let (code, reason) = silent.expect_close().await;
    assert_eq!(code, 1008);
    assert!(reason.contains("no frame within"), "{reason}");
    assert!(started.elapsed() < Duration::from_secs(2), "closed after {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_clients_are_pinged_and_closed_when_nothing_comes_back() {
    let server = TestServer::with_toml("[timeouts]\nping_interval = \"200ms\"\nidle = \"700ms\"\n").await;

    // This client answers nothing: it gets pings, then an idle close.
    let mut mute = RawClient::connect(server.addr, "/ws").await;
    mute.recv().await;
    mute.send_frame(true, support::raw::TEXT, br#"{"type":"join","room":"r"}"#).await;
    assert_eq!(mute.recv().await["type"], "joined");
    let frame = mute.read_frame().await.expect("a ping");
    assert_eq!(frame.opcode, PING);
    assert_eq!(mute.expect_close().await, (1008, "idle timeout".to_owned()));

    // This one answers pings (tungstenite replies while reading): it stays.
    let mut lively = server.client("Lively").await;
    lively.join("r").await;
    let until = Instant::now() + Duration::from_millis(1500);
    while let Ok(message) = tokio::time::timeout_at(until.into(), lively.next_message()).await {
        assert!(message.is_some_and(|m| m.is_ping()), "only pings while quiet");
    }
    lively.send(json!({"type": "message", "room": "r", "content": "still here", "ref": 1})).await;
    assert_eq!(lively.recv().await["content"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_shuts_its_side_after_its_requests_still_gets_the_answers() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start().await;
    let mut half = RawClient::connect(server.addr, "/ws?nick=half").await;
    assert_eq!(half.recv().await["type"], "welcome");
    // Two requests and the end of the client's stream in one TCP segment
    // (corked until the FIN): the server reads all three before it has
    // written a reply.
    let mut requests =
        support::raw::masked_frame(true, TEXT, json!({"type": "join", "room": "lobby"}).to_string().as_bytes());
    requests.extend(support::raw::masked_frame(
        true,
        TEXT,
        json!({"type": "message", "room": "lobby", "content": "last words"}).to_string().as_bytes(),
    ));
    socket2::SockRef::from(&half.stream).set_tcp_cork(true).expect("cork");
    half.send_raw(&requests).await;
    half.stream.shutdown().await.expect("shut the sending side");
    assert_eq!(half.recv().await["type"], "joined");
    assert_eq!(half.recv().await["content"], "last words");
    assert!(half.sees_eof_within(Duration::from_secs(5)).await, "the server ends the connection after answering");
}
