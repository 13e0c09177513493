//! Flow control: a client that stops reading is closed as a slow consumer,
//! and nobody else loses or waits for anything; a client that reads promptly
//! is never closed for the replies to what it pipelines.

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::TestServer;
use support::raw::{CLOSE, PING, RawClient, TEXT};
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

/// Fills `room` with `count` messages of about 8,000 bytes each (no filter
/// in the test config refuses them), so that a full `history` page of 200
/// is about 1.6 MB, as in the audit.
async fn seed_big_messages(server: &TestServer, room: &str, count: usize) {
    let mut writer = server.client("Seeder").await;
    writer.join(room).await;
    let padding = "h".repeat(8000);
    for i in 0..count {
        writer.send(json!({"type": "message", "room": room, "content": format!("{i:04}{padding}")})).await;
    }
    for _ in 0..count {
        assert_eq!(writer.recv().await["type"], "message");
    }
    writer.close().await;
}

/// A raw client in `room` that has read its `welcome` and `joined`.
async fn raw_member(server: &TestServer, nick: &str, room: &str) -> RawClient {
    let mut client = RawClient::connect(server.addr, &format!("/ws?nick={nick}")).await;
    assert_eq!(client.recv().await["type"], "welcome");
    client.send_frame(true, TEXT, json!({"type": "join", "room": room}).to_string().as_bytes()).await;
    assert_eq!(client.recv().await["type"], "joined");
    client
}

/// Reads everything the server sends until its Close frame: each frame
/// must be complete (the raw client checks lengths), and the Close must
/// come before the connection ends. Returns the history pages read before
/// it and the Close's code and reason.
async fn read_pages_until_close(client: &mut RawClient) -> (usize, (u16, String)) {
    let mut pages = 0;
    loop {
        let frame =
            client.read_frame().await.unwrap_or_else(|| panic!("EOF without a Close frame after {pages} pages"));
        match frame.opcode {
            CLOSE => return (pages, frame.close()),
            PING => {}
            _ => pages += usize::from(frame.json()["type"] == "history"),
        }
    }
}

/// A client that floods `history` (pages of ~1.6 MB) and never reads holds
/// at most its byte budget in its queue: its reader pauses at half of it,
/// and the room traffic that does not fit in the rest closes it as a slow
/// consumer. Before the byte bound, its 60 pages (~96 MB) all queued, and
/// 1,024 frames would have had to pile up before it was closed. The other
/// members keep chatting throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_history_without_reading_is_closed_before_its_pages_pile_up() {
    const REQUESTS: usize = 60;
    let server = TestServer::with_toml("[limits]\nrequests_per_minute = 0\noutbound_queue_bytes = 2097152\n").await;
    seed_big_messages(&server, "archive", 200).await;
    let mut flooder = raw_member(&server, "Flooder", "archive").await;
    let history = json!({"type": "history", "room": "archive"}).to_string();
    for _ in 0..REQUESTS {
        flooder.send_frame(true, TEXT, history.as_bytes()).await;
    }

    let mut chatter = server.client("Chatter").await;
    let mut listener = server.client("Listener").await;
    chatter.join("archive").await;
    listener.join("archive").await;
    let padding = "c".repeat(8000);
    for i in 0..100 {
        let content = format!("{i}-{padding}");
        chatter.send(json!({"type": "message", "room": "archive", "content": content, "ref": i})).await;
        let ack = loop {
            let frame = chatter.recv().await;
            if frame["type"] == "ack" {
                break frame;
            }
        };
        assert_eq!(ack["ref"], i, "{ack}");
        let seen = loop {
            let frame = listener.recv().await;
            if frame["type"] == "message" {
                break frame;
            }
        };
        assert_eq!(seen["id"], ack["id"], "the other members get every message, at once");
    }

    let (pages, close) = read_pages_until_close(&mut flooder).await;
    assert_eq!((close.0, close.1.as_str()), (1008, "slow consumer"));
    assert!(pages < REQUESTS / 2, "closed with {pages} of its {REQUESTS} pages sent");
}

/// The byte budget bounds what piles up, not what one frame may weigh: a
/// client that reads promptly gets every page of ~1.6 MB although its queue
/// may hold 40,960 bytes (the smallest budget `check` accepts), since an
/// empty queue takes any frame, and the reader pauses while one waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reading_promptly_gets_history_pages_larger_than_its_byte_budget() {
    const REQUESTS: usize = 30;
    let server = TestServer::with_toml("[limits]\nrequests_per_minute = 0\noutbound_queue_bytes = 40960\n").await;
    seed_big_messages(&server, "archive", 200).await;
    let (mut sink, mut stream) = server.client("Reader").await.into_inner().split();
    sink.send(Message::text(json!({"type": "join", "room": "archive"}).to_string())).await.expect("join");
    let send = async move {
        for i in 0..REQUESTS {
            let frame = json!({"type": "history", "room": "archive", "ref": i});
            sink.send(Message::text(frame.to_string())).await.expect("send");
        }
        sink
    };
    let read = async move {
        let mut pages = 0;
        while pages < REQUESTS {
            let message = tokio::time::timeout(support::PATIENCE, stream.next())
                .await
                .unwrap_or_else(|_| panic!("stalled after {pages} pages"))
                .unwrap_or_else(|| panic!("disconnected after {pages} pages"))
                .expect("read error");
            let Message::Text(text) = message else { panic!("after {pages} pages: {message:?}") };
            let frame: Value = serde_json::from_str(&text).expect("json");
            match frame["type"].as_str() {
                Some("joined") => {}
                Some("history") => {
                    assert_eq!(
                        (frame["ref"].as_u64(), frame["messages"].as_array().map(Vec::len)),
                        (Some(pages as u64), Some(200))
                    );
                    pages += 1;
                }
                _ => panic!("after {pages} pages: {}", &text[..text.len().min(200)]),
            }
        }
    };
    let (_sink, ()) = futures_util::future::join(send, read).await;
}

/// Once a client is cut as a slow consumer, its Close frame follows the
/// frame being written at that moment: the frames its writer had taken and
/// not begun are dropped with the rest of its queue. Before, the Close waited
/// behind them (here a batch of history pages worth tens of MB; with
/// 1,024 frames of 8 KB, 8 MB), and a client that read only what reached
/// its socket got no Close before the close deadline ended the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_gets_its_close_frame_right_after_the_frame_in_progress() {
    const REQUESTS: usize = 40;
    // Bounded in frames only (64), so that the writer takes many pages at
    // once; the close deadline is long so that only the order is tested.
    let server = TestServer::with_toml(
        "[limits]\nrequests_per_minute = 0\noutbound_queue = 64\noutbound_queue_bytes = 1073741824\n\
         [timeouts]\nclose = \"120s\"\n",
    )
    .await;
    seed_big_messages(&server, "archive", 200).await;
    let mut slow = raw_member(&server, "Slow", "archive").await;
    let history = json!({"type": "history", "room": "archive"}).to_string();
    for _ in 0..REQUESTS {
        slow.send_frame(true, TEXT, history.as_bytes()).await;
    }
    // Wait until the server has read the requests and its writer is stuck.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    // Every echo reaches the slow client's queue before its ack is sent:
    // past 64 frames queued, the server has decided to close it.
    let mut chatter = server.client("Chatter").await;
    chatter.join("archive").await;
    for i in 0..100 {
        chatter.post("archive", &format!("m{i}")).await;
    }

    // What reached the socket buffers (a few MB), then the page in
    // progress, then the Close; before, the 16 or so pages the writer had
    // taken came first.
    let (pages, close) = read_pages_until_close(&mut slow).await;
    assert_eq!((close.0, close.1.as_str()), (1008, "slow consumer"));
    assert!(pages <= 8, "the Close came after {pages} of {REQUESTS} pages");
}
