//! A scripted chat client: joins a room, sends each line of stdin as a
//! message, and prints every frame the server sends.
//!
//! ```sh
//! cargo run --release &                      # the server
//! cargo run --example chat_client -- ws://127.0.0.1:8080/ws Alice lobby
//! ```

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "ws://127.0.0.1:8080/ws".to_owned());
    let nick = args.next().unwrap_or_else(|| "scripted".to_owned());
    let room = args.next().unwrap_or_else(|| "lobby".to_owned());

    let (ws, _) = tokio_tungstenite::connect_async(format!("{url}?nick={nick}")).await?;
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::text(json!({"type": "join", "room": room}).to_string())).await?;

    let printer = tokio::spawn(async move {
        while let Some(message) = stream.next().await {
            match message {
                Ok(Message::Text(text)) => println!("{text}"),
                Ok(Message::Close(frame)) => {
                    println!("closed: {frame:?}");
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("error: {e}");
                    break;
                }
            }
        }
    });

    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut reference = 0u64;
    while let Some(line) = lines.next_line().await? {
        reference += 1;
        let frame = json!({"type": "message", "room": room, "content": line, "ref": reference});
        sink.send(Message::text(frame.to_string())).await?;
    }
    sink.send(Message::Close(None)).await?;
    printer.await?;
    Ok(())
}
