//! The floor peer speaks the load generator's protocol subset: a real
//! process, real sockets, and a WebSocket client written out by hand.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The floor process, killed when the test ends.
struct Floor(Child);

impl Drop for Floor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the floor on a free port; returns it and its address.
fn start() -> (Floor, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_floor-peer"))
        .arg("127.0.0.1:0")
        .stdout(Stdio::piped())
        .spawn()
        .expect("floor-peer starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let floor = Floor(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).expect("a first line");
    let addr = line.split("ws://").nth(1).and_then(|rest| rest.split('/').next()).expect("the address").to_owned();
    (floor, addr)
}

/// Connects and upgrades, as `nick`.
fn connect(addr: &str, nick: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(
        stream,
        "GET /ws?nick={nick} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .expect("request");
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("UTF-8 head");
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{head}");
    stream
}

/// Sends a masked text frame (short payloads only).
fn send(stream: &mut TcpStream, text: &str) {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let len = u8::try_from(text.len()).ok().filter(|&n| n < 126).expect("a short payload");
    let mut frame = vec![0x81, 0x80 | len];
    frame.extend_from_slice(&mask);
    frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    stream.write_all(&frame).expect("send");
}

/// Reads one unmasked text frame from the server.
fn receive(stream: &mut TcpStream) -> serde_json::Value {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header).expect("frame header");
    assert_eq!(header[0], 0x81, "a final text frame");
    let len = match header[1] {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).expect("length");
            usize::from(u16::from_be_bytes(ext))
        }
        n => usize::from(n),
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).expect("payload");
    serde_json::from_slice(&payload).expect("JSON")
}

#[test]
fn a_message_reaches_every_member_of_the_room_and_no_one_else() {
    let (_floor, addr) = start();
    let mut ann = connect(&addr, "Ann");
    let mut bob = connect(&addr, "Bob");
    let mut eve = connect(&addr, "Eve");
    for (client, room) in [(&mut ann, "r0"), (&mut bob, "r0"), (&mut eve, "r1")] {
        assert_eq!(receive(client)["type"], "welcome");
        send(client, &format!(r#"{{"type":"join","room":"{room}"}}"#));
        let joined = receive(client);
        assert_eq!((joined["type"].as_str(), joined["room"].as_str()), (Some("joined"), Some(room)));
    }

    send(&mut ann, r#"{"type":"message","room":"r0","content":"hello"}"#);
    for client in [&mut ann, &mut bob] {
        let message = receive(client);
        assert_eq!(message["type"], "message");
        assert_eq!(message["room"], "r0");
        assert_eq!(message["from"], "Ann");
        assert_eq!(message["content"], "hello");
        assert_eq!(message["id"], 1);
    }

    // Eve's room got nothing: the next frame she reads answers her own request.
    send(&mut eve, r#"{"type":"message","room":"r0","content":"not mine"}"#);
    assert_eq!(receive(&mut eve)["code"], "bad_request", "Eve is not in r0");
}
