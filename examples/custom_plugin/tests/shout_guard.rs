//! The example server with its plugin, through a real socket: a shouted
//! message gets the plugin's `shouting` error; others are delivered.

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn next_json(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> Value {
    loop {
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("no error");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).expect("json");
        }
    }
}

#[tokio::test]
async fn the_plugin_verdict_reaches_the_client() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).expect("example config");
    let mut config = wardroom::config::parse(&text).expect("the example config is valid");
    // A database of the test's own, not next to the example.
    let dir = std::env::temp_dir().join(format!("wardroom-example-{}", std::process::id()));
    config.store.path = dir.join("wardroom.db");
    let server = wardroom::Server::builder()
        .register(wardroom_example_custom_plugin::register)
        .with_config(config)
        .expect("the example config builds with the plugin registered");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server.run(listener, std::future::pending()));

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?nick=Loud")).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    ws.send(Message::text(json!({"type": "join", "room": "lobby"}).to_string())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "joined");

    let shout = json!({"type": "message", "room": "lobby", "content": "WHY IS NOBODY ANSWERING", "ref": 1});
    ws.send(Message::text(shout.to_string())).await.unwrap();
    let error = next_json(&mut ws).await;
    assert_eq!((&error["type"], &error["code"], &error["ref"]), (&json!("error"), &json!("shouting"), &json!(1)));

    let calm = json!({"type": "message", "room": "lobby", "content": "Why is nobody answering?", "ref": 2});
    ws.send(Message::text(calm.to_string())).await.unwrap();
    assert_eq!(next_json(&mut ws).await["content"], "Why is nobody answering?");
}
