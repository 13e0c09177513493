//! Flow control: a client that stops reading is closed as a slow consumer,
//! and nobody else loses or waits for anything.

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
