//! Flow control: a client that stops reading is closed as a slow consumer,
//! and nobody else loses or waits for anything; a client that reads promptly
//! is never closed for the replies to what it pipelines.

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::TestServer;
use tokio_tungstenite::tungstenite::Message;

const MESSAGES: u64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_while_others_receive_every_message_in_order() {
    // A long close deadline so the slow client can still read its Close
    // frame once it finally reads.
    let server = TestServer::with_toml("[limits]\noutbound_queue = 64\n[timeouts]\nclose = \"120s\"\n").await;
    let mut fast = server.client("Fast").await;
    let mut slow = server.client("Slow").await;
    fast.join("flood").await;
    slow.join("flood").await;
    assert_eq!(fast.recv().await["event"], "join");

    // 10,000 messages of 4 KiB: 40 MB, far more than the socket buffers
    // between the server and a client that never reads.
    let padding = "p".repeat(4096);
    let (mut sink, mut stream) = fast.into_inner().split();
    let sender = tokio::spawn(async move {
        for i in 1..=MESSAGES {
            let frame = json!({"type": "message", "room": "flood", "content": format!("{i:05}{padding}")});
            sink.send(Message::text(frame.to_string())).await.expect("send");
        }
        sink
    });
    let mut expected = 1;
    while expected <= MESSAGES {
        let message = tokio::time::timeout(support::PATIENCE, stream.next())
            .await
            .expect("fast client stalled")
            .expect("fast client disconnected")
            .expect("fast client read error");
        let Message::Text(text) = message else { continue };
        let frame: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(frame["type"], "message", "{}", &text[..text.len().min(200)]);
        assert_eq!(frame["id"], expected, "ids arrive in order, none missing");
        assert!(frame["content"].as_str().is_some_and(|c| c.starts_with(&format!("{expected:05}"))));
        expected += 1;
    }
    let _sink = sender.await.expect("sender");

    // The slow client reads what reached its socket, then the Close frame.
    let (code, reason) = slow.expect_close().await;
    assert_eq!((code, reason.as_str()), (1008, "slow consumer"));
}

/// A client that sends messages faster than they are committed, and reads
/// everything, is read only as far as the replies it is owed (each message's
/// echo now, its ack after the commit) fit in its queue: never closed as a
/// slow consumer, it gets every echo and every ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pipelining_messages_with_a_small_queue_gets_every_echo_and_ack() {
    let server = TestServer::with_toml("[limits]\noutbound_queue = 16\n").await;
    let mut client = server.client("Pipeliner").await;
    client.join("pipes").await;
    client.pipeline_and_read_everything("pipes", 1000, true).await;
}

/// The same with the smallest queue `check` accepts: room for one message's
/// echo and ack.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pipelining_messages_with_the_smallest_queue_gets_every_echo_and_ack() {
    let server = TestServer::with_toml("[limits]\noutbound_queue = 2\n").await;
    let mut client = server.client("Pipeliner").await;
    client.join("pipes").await;
    client.pipeline_and_read_everything("pipes", 200, true).await;
}

/// The pause threshold comes from the connection's own queue: a reload that
/// grows `outbound_queue` (new connections get the larger queue) must not
/// let an open connection read as if it had the larger queue too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_growing_the_queue_keeps_open_connections_pausing_for_their_own() {
    let file = support::TempConfig::new("[limits]\noutbound_queue = 16\n");
    let server = TestServer::with_file(&file.path).await;
    let mut client = server.client("Pipeliner").await;
    client.join("pipes").await;
    file.save_by_rename("[limits]\noutbound_queue = 1024\n[rooms]\nhistory_page_max = 199\n");
    support::eventually(support::PATIENCE, || async {
        let probe = server.client("Probe").await;
        let reloaded = probe.welcome["limits"]["history_page_max"] == 199;
        probe.close().await;
        reloaded.then_some(())
    })
    .await
    .expect("the reload was applied");
    client.pipeline_and_read_everything("pipes", 1000, true).await;
}

/// Other replies that wait for a commit count too: a guest pipelining
/// moderation requests, each refused with `forbidden` once the attempt is in
/// the audit log, gets every refusal, in order, and is not closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pipelining_requests_answered_after_a_commit_gets_every_answer() {
    const REQUESTS: u64 = 500;
    // No request budget: it would refuse most of these before the audit.
    let server = TestServer::with_toml("[limits]\noutbound_queue = 16\nrequests_per_minute = 0\n").await;
    let (mut sink, mut stream) = server.client("Eager").await.into_inner().split();
    let send = async move {
        for i in 1..=REQUESTS {
            let frame = json!({"type": "kick", "user": "guest:0", "ref": format!("k{i}")});
            sink.send(Message::text(frame.to_string())).await.expect("send");
        }
    };
    let read = async move {
        for i in 1..=REQUESTS {
            let message = tokio::time::timeout(support::PATIENCE, stream.next())
                .await
                .unwrap_or_else(|_| panic!("stalled after {} answers", i - 1))
                .unwrap_or_else(|| panic!("disconnected after {} answers", i - 1))
                .expect("read error");
            let Message::Text(text) = message else { panic!("after {} answers: {message:?}", i - 1) };
            let frame: Value = serde_json::from_str(&text).expect("json");
            assert_eq!((frame["code"].as_str(), frame["ref"].as_str()), (Some("forbidden"), Some(&*format!("k{i}"))));
        }
    };
    futures_util::future::join(send, read).await;
}
