//! Test support: a real Wardroom server on `127.0.0.1:0`, real WebSocket
//! clients (tokio-tungstenite), and a raw-socket client for frames that a
//! well-behaved client library refuses to send.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod pg;
pub mod process;
pub mod raw;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wardroom::Server;
use wardroom::config::{self, Config};

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A server running in this process.
pub struct TestServer {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestServer {
    /// A server with the default configuration.
    pub async fn start() -> Self {
        Self::with_config(Config::default()).await
    }

    /// A server with the defaults overridden by `toml` (same syntax as config.toml).
    pub async fn with_toml(toml: &str) -> Self {
        let config = config::parse(toml).unwrap_or_else(|problems| panic!("test config is invalid: {problems:?}"));
        Self::with_config(config).await
    }

    /// A server with this configuration (and a database file of its own,
    /// unless the configuration names one).
    pub async fn with_config(mut config: Config) -> Self {
        if config.store.path == Config::default().store.path {
            config.store.path = fresh_dir().join("wardroom.db");
        }
        let server = Server::builder().with_config(config).unwrap_or_else(|problems| panic!("{problems}"));
        Self::run(server).await
    }

    /// A server running the config file at `path` (reloaded when it changes).
    pub async fn with_file(path: &std::path::Path) -> Self {
        let server = Server::builder().load_file(path).unwrap_or_else(|problems| panic!("{problems}"));
        Self::run(server).await
    }

    /// Runs `server` on a port of its own.
    pub async fn run(server: Server) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async {
            let _ = rx.await;
        }));
        Self { addr, shutdown: Some(tx), task }
    }

    /// `ws://…/ws`, with `?nick=` when given.
    pub fn ws_url(&self, nick: Option<&str>) -> String {
        match nick {
            Some(nick) => format!("ws://{}/ws?nick={nick}", self.addr),
            None => format!("ws://{}/ws", self.addr),
        }
    }

    /// A connected client that has read its `welcome`.
    pub async fn client(&self, nick: &str) -> Client {
        Client::connect(&self.ws_url(Some(nick))).await
    }

    /// A plain HTTP GET; returns the status code.
    pub async fn get_status(&self, path: &str) -> u16 {
        raw::http_get_status(self.addr, path).await
    }

    /// Starts shutdown (as SIGTERM would) without waiting for it to finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits for the server to finish shutting down.
    pub async fn finished(self) -> std::io::Result<()> {
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server did not stop within 30 s")
            .expect("server task panicked")
    }
}

/// A new, empty directory under the system's temporary directory.
pub fn fresh_dir() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("wardroom-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A config file in a directory of its own (with its database file there
/// too, unless the text has a `[store]` section), removed on drop.
pub struct TempConfig {
    /// The directory.
    pub dir: std::path::PathBuf,
    /// The file.
    pub path: std::path::PathBuf,
}

impl TempConfig {
    /// Writes `text` to a fresh `config.toml`.
    pub fn new(text: &str) -> Self {
        let dir = fresh_dir();
        let path = dir.join("config.toml");
        let config = Self { dir, path };
        config.write_in_place(text);
        config
    }

    /// `text` with this directory's database, unless it has a `[store]`.
    pub fn with_store(&self, text: &str) -> String {
        if text.contains("[store]") {
            text.to_owned()
        } else {
            format!("{text}\n[store]\npath = {:?}\n", self.dir.join("wardroom.db"))
        }
    }

    /// Rewrites the file in place (open, truncate, write).
    pub fn write_in_place(&self, text: &str) {
        std::fs::write(&self.path, self.with_store(text)).expect("write config");
    }

    /// Saves as editors do: write a temporary file, then rename it over.
    pub fn save_by_rename(&self, text: &str) {
        let temp = self.dir.join(".config.toml.swp");
        std::fs::write(&temp, self.with_store(text)).expect("write temp file");
        std::fs::rename(&temp, &self.path).expect("rename over the config");
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `check` every 20 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    limit: Duration,
    mut check: impl FnMut() -> F,
) -> Option<T> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real WebSocket client.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// The `welcome` frame.
    pub welcome: Value,
}

impl Client {
    /// Connects and reads `welcome`.
    pub async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connect");
        let mut client = Self { ws, welcome: Value::Null };
        client.welcome = client.recv().await;
        assert_eq!(client.welcome["type"], "welcome", "first frame must be welcome: {}", client.welcome);
        client
    }

    /// Connects without expecting `welcome` first (for refusals).
    pub async fn connect_any(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("websocket connect");
        Self { ws, welcome: Value::Null }
    }

    /// This client's nickname according to `welcome`.
    pub fn nick(&self) -> String {
        self.welcome["user"]["nick"].as_str().unwrap_or_default().to_owned()
    }

    /// Sends a JSON frame.
    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    /// Sends a text frame as is.
    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// Sends any WebSocket message.
    pub async fn send_message(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// The next text frame as JSON (pings and pongs are skipped).
    pub async fn recv(&mut self) -> Value {
        loop {
            match self.next_message().await {
                Some(Message::Text(text)) => {
                    return serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("server sent invalid JSON {text:?}: {e}"));
                }
                Some(Message::Ping(_) | Message::Pong(_)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The next frame, or `None` when the connection ended.
    pub async fn next_message(&mut self) -> Option<Message> {
        match tokio::time::timeout(PATIENCE, self.ws.next()).await {
            Ok(Some(Ok(message))) => Some(message),
            Ok(Some(Err(_)) | None) => None,
            Err(_) => panic!("no frame within {PATIENCE:?}"),
        }
    }

    /// Reads until the server's Close frame and returns its code and reason,
    /// then lets the client library answer it and waits for the server to
    /// end the connection.
    pub async fn expect_close(&mut self) -> (u16, String) {
        let close = loop {
            match self.next_message().await {
                Some(Message::Close(Some(CloseFrame { code, reason }))) => break (code.into(), reason.to_string()),
                Some(Message::Close(None)) => break (1005, String::new()),
                Some(_) => continue,
                None => panic!("connection ended without a Close frame"),
            }
        };
        while self.next_message().await.is_some() {}
        close
    }

    /// Joins a room and returns the `joined` frame.
    pub async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        let joined = self.recv().await;
        assert_eq!(joined["type"], "joined", "{joined}");
        joined
    }

    /// The ids of every message `history` holds for `room` (joined), paging
    /// back 200 at a time.
    pub async fn history_ids(&mut self, room: &str) -> std::collections::BTreeSet<u64> {
        let mut stored = std::collections::BTreeSet::new();
        let mut before: Option<u64> = None;
        loop {
            self.send(json!({"type": "history", "room": room, "before": before, "limit": 200})).await;
            let page = self.recv().await;
            assert_eq!(page["type"], "history", "{page}");
            let ids: Vec<u64> = page["messages"]
                .as_array()
                .expect("history messages")
                .iter()
                .map(|m| m["id"].as_u64().expect("message id"))
                .collect();
            stored.extend(ids.iter().copied());
            if page["more"] != true || ids.is_empty() {
                return stored;
            }
            before = ids.first().copied();
        }
    }

    /// Sends a message with a `ref` and returns the `ack`, skipping the
    /// message's own echo and anything else that arrives first.
    pub async fn post(&mut self, room: &str, content: &str) -> Value {
        let reference = format!("post-{content}");
        self.send(json!({"type": "message", "room": room, "content": content, "ref": reference})).await;
        loop {
            let frame = self.recv().await;
            if frame["type"] == "ack" && frame["ref"] == reference.as_str() {
                return frame;
            }
            assert_ne!(frame["type"], "error", "post failed: {frame}");
        }
    }

    /// Sends `count` messages to `room` (joined) back to back, each with a
    /// `ref` if `acked`, without waiting for any answer, while reading
    /// everything the server sends; returns once every echo (and every ack)
    /// has arrived, each kind in order, and the connection still answers.
    /// Panics if it is closed (as a slow consumer, say) or anything else
    /// arrives.
    pub async fn pipeline_and_read_everything(&mut self, room: &str, count: u64, acked: bool) {
        let (mut sink, mut stream) = (&mut self.ws).split();
        let send = async move {
            for i in 1..=count {
                let mut frame = json!({"type": "message", "room": room, "content": format!("m{i}")});
                if acked {
                    frame["ref"] = json!(format!("r{i}"));
                }
                sink.send(Message::text(frame.to_string())).await.expect("send");
            }
        };
        let read = async move {
            let (mut echoes, mut acks) = (0, 0);
            while echoes < count || (acked && acks < count) {
                let message = tokio::time::timeout(PATIENCE, stream.next())
                    .await
                    .unwrap_or_else(|_| panic!("{room}: stalled after {echoes} echoes and {acks} acks"))
                    .unwrap_or_else(|| panic!("{room}: disconnected after {echoes} echoes and {acks} acks"))
                    .expect("read error");
                let text = match message {
                    Message::Text(text) => text,
                    Message::Ping(_) | Message::Pong(_) => continue,
                    other => panic!("{room}: after {echoes} echoes and {acks} acks: {other:?}"),
                };
                let frame: Value = serde_json::from_str(&text).expect("json");
                match frame["type"].as_str() {
                    Some("message") => {
                        echoes += 1;
                        assert_eq!(frame["content"], format!("m{echoes}"), "echoes arrive in order: {frame}");
                    }
                    Some("ack") if acked => {
                        acks += 1;
                        assert_eq!(frame["ref"], format!("r{acks}"), "acks arrive in order: {frame}");
                    }
                    _ => panic!("{room}: after {echoes} echoes and {acks} acks: {frame}"),
                }
            }
        };
        futures_util::future::join(send, read).await;
        self.send(json!({"type": "history", "room": room, "limit": 1})).await;
        let page = self.recv().await;
        assert_eq!(page["type"], "history", "still served: {page}");
    }

    /// The underlying WebSocket, e.g. to split it into a sender and a reader.
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.ws
    }

    /// Closes the connection cleanly: sends a Close frame and reads until the
    /// server ends the connection (dropping a socket with unread data would
    /// reset it, and the server might never see the Close frame).
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(PATIENCE, self.ws.next()).await {}
    }
}
