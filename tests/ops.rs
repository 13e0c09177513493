//! Operations: `/metrics`, and the hardened accept loop (header-read
//! timeout, connection caps, client address behind trusted proxies).

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use support::TestServer;
use support::raw::{RawClient, TEXT, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The value of an unlabelled or labelled sample in Prometheus text.
fn sample(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {name_and_labels} in:\n{metrics}"))
}

async fn metrics(server: &TestServer) -> String {
    let (status, body) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_connections_messages_deliveries_and_closes() {
    let server = TestServer::start().await;
    let before = metrics(&server).await;
    assert_eq!(sample(&before, "wardroom_connections"), 0);
    assert!(before.contains("# TYPE wardroom_connections_opened_total counter"));
    assert!(before.contains(&format!("wardroom_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"))));

    let mut alice = server.client("Alice").await;
    let mut bob = server.client("Bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    for i in 0..5 {
        alice.post("lobby", &format!("m{i}")).await;
    }
    let mut raw = RawClient::connect(server.addr, "/ws").await;
    raw.recv().await;
    raw.send_frame(true, TEXT, b"\xFF").await;
    assert_eq!(raw.expect_close().await.0, 1007);
    drop(raw);
    bob.send_text("not json").await;
    bob.close().await;

    // Wait for the server to notice both departures.
    let deadline = Instant::now() + support::PATIENCE;
    let now = loop {
        let now = metrics(&server).await;
        if sample(&now, "wardroom_connections") == 1 || Instant::now() > deadline {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(sample(&now, "wardroom_connections"), 1, "{now}");
    assert_eq!(sample(&now, "wardroom_connections_opened_total"), 3);
    assert_eq!(sample(&now, "wardroom_connections_closed_total{reason=\"client\"}"), 1, "{now}");
    assert_eq!(sample(&now, "wardroom_connections_closed_total{reason=\"invalid_utf8\"}"), 1);
    assert_eq!(sample(&now, "wardroom_rooms"), 1);
    assert_eq!(sample(&now, "wardroom_messages_in_total"), 5);
    // 5 messages to 2 members + Bob's join announced to Alice + Bob's leave.
    assert_eq!(sample(&now, "wardroom_fanout_deliveries_total"), 12);
    assert_eq!(sample(&now, "wardroom_request_errors_total"), 1);
    assert!(sample(&now, "wardroom_frames_out_total") >= 20);
    assert_eq!(sample(&now, "wardroom_tcp_connections"), 1 + 1, "alice's socket and this scrape's");
}

/// A client sent a steady stream is written to at most once per write pace
/// (2 ms, plus the first write), however often messages arrive: each write
/// carries what queued meanwhile. Without the pace, both members got one
/// write per message here (600 writes in ~300 ms, against a bound of ~300).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_steady_stream_is_written_in_paced_batches() {
    const MESSAGES: usize = 300;
    let server = TestServer::start().await;
    let mut alice = server.client("Alice").await;
    let mut bob = server.client("Bob").await;
    alice.join("lobby").await;
    bob.join("lobby").await;
    // Alice hears of Bob's join before counting starts.
    let presence = alice.recv().await;
    assert_eq!(presence["type"], "presence", "{presence}");

    let started = Instant::now();
    let before = sample(&metrics(&server).await, "wardroom_socket_writes_total");
    let sender = tokio::spawn(async move {
        for i in 0..MESSAGES {
            alice.send(serde_json::json!({"type": "message", "room": "lobby", "content": format!("m{i}")})).await;
            // 250 µs apart: long enough for each to be written alone, were
            // writes not paced (Tokio's timer cannot sleep under 1 ms).
            let next = Instant::now() + Duration::from_micros(250);
            while Instant::now() < next {
                tokio::task::yield_now().await;
            }
        }
        alice
    });
    let mut received = 0;
    while received < MESSAGES {
        if bob.recv().await["type"] == "message" {
            received += 1;
        }
    }
    let _alice = sender.await.expect("sender");
    let writes = sample(&metrics(&server).await, "wardroom_socket_writes_total") - before;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    // Two members (Alice gets her own messages too), each written at most
    // once per 2 ms, plus one unpaced write each.
    let bound = 2 * (elapsed_ms / 2 + 1);
    assert!(writes <= bound, "{writes} writes for {MESSAGES} messages in {elapsed_ms} ms (bound {bound})");
    assert!(writes >= 2, "both members were written to");
}

/// Sends `bytes` one at a time, `gap` apart; returns how long the server
/// kept the connection open.
async fn trickle(server: &TestServer, bytes: &[u8], gap: Duration) -> Duration {
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let started = Instant::now();
    for byte in bytes {
        if stream.write_all(&[*byte]).await.is_err() {
            return started.elapsed();
        }
        tokio::time::sleep(gap).await;
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(support::PATIENCE, stream.read_to_end(&mut rest)).await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_silent_connections_are_dropped_at_the_header_deadline() {
    let server = TestServer::with_toml("[server]\nheader_read_timeout = \"500ms\"\n").await;
    let request =
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa";
    let open_for = trickle(&server, request, Duration::from_millis(100)).await;
    assert!(open_for < Duration::from_secs(3), "slowloris kept its connection for {open_for:?}");

    let silent_for = trickle(&server, b"", Duration::ZERO).await;
    assert!(silent_for < Duration::from_secs(3), "a silent connection stayed for {silent_for:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_connection_cap_refuses_extra_connections() {
    let server = TestServer::with_toml("[server]\nmax_connections = 3\n").await;
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(RawClient::connect(server.addr, &format!("/ws?nick=held{i}")).await);
    }
    let refused = RawClient::try_connect(server.addr, "/ws", "", None).await;
    assert!(refused.is_err(), "a fourth connection must be refused");
    drop(held.pop());
    // The freed slot can be used again once the server sees the close.
    let deadline = Instant::now() + support::PATIENCE;
    while RawClient::try_connect(server.addr, "/ws", "", None).await.is_err() {
        assert!(Instant::now() < deadline, "the slot was never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_address_cap_counts_each_client_address() {
    let server = TestServer::with_toml("[server]\nmax_connections_per_ip = 2\n").await;
    let first: IpAddr = "127.0.0.1".parse().unwrap();
    let second: IpAddr = "127.0.0.2".parse().unwrap();
    let _a = RawClient::try_connect(server.addr, "/ws", "", Some(first)).await.unwrap();
    let _b = RawClient::try_connect(server.addr, "/ws", "", Some(first)).await.unwrap();
    assert!(RawClient::try_connect(server.addr, "/ws", "", Some(first)).await.is_err());
    let _c = RawClient::try_connect(server.addr, "/ws", "", Some(second)).await.unwrap();
    let metrics = metrics_from(&server, second).await;
    assert_eq!(sample(&metrics, "wardroom_connections_refused_total{reason=\"per_ip_limit\"}"), 1);
}

async fn metrics_from(server: &TestServer, source: IpAddr) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((source, 0).into()).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_forwarded_address_is_limited() {
    let server =
        TestServer::with_toml("[server]\nmax_connections_per_ip = 2\ntrusted_proxies = [\"127.0.0.1\"]\n").await;
    let from = |ip: &str| format!("X-Forwarded-For: {ip}, 127.0.0.1\r\n");
    // The proxy's own connections are not limited per address...
    let _a = RawClient::try_connect(server.addr, "/ws", &from("203.0.113.9"), None).await.unwrap();
    let _b = RawClient::try_connect(server.addr, "/ws", &from("203.0.113.9"), None).await.unwrap();
    // ...but each forwarded client address is.
    let refused = RawClient::try_connect(server.addr, "/ws", &from("203.0.113.9"), None).await;
    let head = refused.err().expect("a third connection for the same client");
    assert!(head.starts_with("HTTP/1.1 429"), "{head}");
    let _c = RawClient::try_connect(server.addr, "/ws", &from("203.0.113.10"), None).await.unwrap();

    // From an untrusted peer the header is ignored: it counts as 127.0.0.2.
    let spoof = from("198.51.100.1");
    let untrusted: IpAddr = "127.0.0.2".parse().unwrap();
    let _d = RawClient::try_connect(server.addr, "/ws", &spoof, Some(untrusted)).await.unwrap();
    let _e = RawClient::try_connect(server.addr, "/ws", &spoof, Some(untrusted)).await.unwrap();
    assert!(RawClient::try_connect(server.addr, "/ws", &spoof, Some(untrusted)).await.is_err());
}
