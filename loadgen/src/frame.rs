//! The little of RFC 6455 a load-generating client needs: masked client
//! frames out, unmasked server frame headers in, and fast byte scans of the
//! JSON payloads (no JSON parser: the fields we need are found by pattern).

use std::sync::LazyLock;

use memchr::memmem::Finder;

/// Opcode of a text frame.
pub const OP_TEXT: u8 = 0x1;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OP_PONG: u8 = 0xA;

/// Mask key for every client frame. RFC 6455 wants it unpredictable to stop
/// cache poisoning through proxies; on loopback a fixed key is harmless, and
/// the payload is still masked as the server expects.
const MASK: [u8; 4] = [0x5a, 0xc3, 0x17, 0x8e];

/// Appends one complete, masked client frame (FIN set) to `out`.
pub fn encode_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | (opcode & 0x0f));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(0x80 | 126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().zip(MASK.iter().cycle()).map(|(b, m)| b ^ m));
}

/// A parsed server frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// FIN bit.
    pub fin: bool,
    /// Low four bits of the first byte.
    pub opcode: u8,
    /// Whether the server (wrongly) masked the frame.
    pub masked: bool,
    /// Bytes of header, including the mask key if any.
    pub header_len: usize,
    /// Payload bytes announced.
    pub payload_len: u64,
}

/// Parses a frame header at the start of `buf`; `None` if more bytes are
/// needed to know it.
#[inline]
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    let (&b0, rest) = buf.split_first()?;
    let &b1 = rest.first()?;
    let masked = b1 & 0x80 != 0;
    let mask_len = if masked { 4 } else { 0 };
    let (payload_len, len_bytes) = match b1 & 0x7f {
        126 => (u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)), 2),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 8),
        n => (u64::from(n), 0),
    };
    let header_len = 2 + len_bytes + mask_len;
    if buf.len() < header_len {
        return None;
    }
    Some(Header { fin: b0 & 0x80 != 0, opcode: b0 & 0x0f, masked, header_len, payload_len })
}

/// The `type` of a server JSON frame, as far as the generator cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A chat message delivery.
    Message,
    /// The answer to our `join`.
    Joined,
    /// A refused request.
    Error,
    /// The acknowledgement of a message we sent with a `ref`.
    Ack,
    /// Anything else (welcome, presence, history, ...), or no `type` found.
    Other,
}

/// Payload bytes [`classify`] wants to see before deciding.
pub const CLASSIFY_BYTES: usize = 96;

/// Classifies a text payload by its `type` field, looked for in the first
/// [`CLASSIFY_BYTES`] bytes (servers put `type` first; both Wardroom and the
/// Node peer do).
#[inline]
pub fn classify(payload: &[u8]) -> Kind {
    const FAST: &[u8] = b"{\"type\":\"message\"";
    if payload.starts_with(FAST) {
        return Kind::Message;
    }
    let head = &payload[..payload.len().min(CLASSIFY_BYTES)];
    static TYPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"type\":\""));
    let Some(at) = TYPE.find(head) else {
        return Kind::Other;
    };
    let value = &head[at + 8..];
    let value = match value.iter().position(|&b| b == b'"') {
        Some(end) => &value[..end],
        None => return Kind::Other,
    };
    match value {
        b"message" => Kind::Message,
        b"joined" => Kind::Joined,
        b"error" => Kind::Error,
        b"ack" => Kind::Ack,
        _ => Kind::Other,
    }
}

/// The payload from the start of the `"content":"` field's value to the
/// end (the value's end is not looked for: [`parse_content`] reads only the
/// stamp at its start).
#[inline]
pub fn content_start(payload: &[u8]) -> Option<&[u8]> {
    static KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"content\":\""));
    let at = KEY.find(payload)?;
    Some(&payload[at + KEY.needle().len()..])
}

/// The payload from the start of the `"ref":"` field's value to the end.
#[inline]
pub fn ref_start(payload: &[u8]) -> Option<&[u8]> {
    static KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"ref\":\""));
    let at = KEY.find(payload)?;
    Some(&payload[at + KEY.needle().len()..])
}

/// What a message's content says about when and by whom it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Index of the sending client.
    pub sender: u64,
    /// The sender's sequence number.
    pub seq: u64,
    /// Scheduled send time, ns since the generator started.
    pub sent_ns: u64,
}

/// Writes the content of a message: `g<run>:s<sender>:q<seq>:t<ns>:` padded
/// with `x` to exactly `size` bytes. Returns `false` (and writes nothing) if
/// the stamp alone is longer than `size`.
pub fn write_content(out: &mut Vec<u8>, run: u64, stamp: Stamp, size: usize) -> bool {
    let start = out.len();
    write_stamp(out, run, stamp);
    let written = out.len() - start;
    if written > size {
        out.truncate(start);
        return false;
    }
    out.resize(start + size, b'x');
    true
}

/// Writes just the stamp part of a content, `g<run>:t<ns>:s<sender>:q<seq>:`
/// (the send time right after the run, where [`parse_sent_ns`] finds it).
pub fn write_stamp(out: &mut Vec<u8>, run: u64, stamp: Stamp) {
    for (tag, value) in [(b'g', run), (b't', stamp.sent_ns), (b's', stamp.sender), (b'q', stamp.seq)] {
        out.push(tag);
        push_decimal(out, value);
        out.push(b':');
    }
}

/// Parses a content written by [`write_content`] for run `run`.
#[inline]
pub fn parse_content(content: &[u8], run: u64) -> Option<Stamp> {
    let mut rest = content;
    if field(&mut rest, b'g')? != run {
        return None;
    }
    let sent_ns = field(&mut rest, b't')?;
    Some(Stamp { sender: field(&mut rest, b's')?, seq: field(&mut rest, b'q')?, sent_ns })
}

/// The `"g<run>:"` that starts every content of run `run`.
pub fn run_prefix(run: u64) -> Vec<u8> {
    let mut prefix = vec![b'g'];
    push_decimal(&mut prefix, run);
    prefix.push(b':');
    prefix
}

/// Just the send time of a content of the run whose [`run_prefix`] is
/// `prefix` (a delivery needs no more).
#[inline]
pub fn parse_sent_ns(content: &[u8], prefix: &[u8]) -> Option<u64> {
    let mut rest = content.strip_prefix(prefix)?;
    field(&mut rest, b't')
}

/// Parses `<tag><decimal>:` at the start of `rest` and moves past it.
#[inline(always)]
fn field(rest: &mut &[u8], tag: u8) -> Option<u64> {
    let text = *rest;
    if text.first() != Some(&tag) {
        return None;
    }
    // Up to 19 digits cannot overflow a u64.
    const MAX_DIGITS: usize = 19;
    let mut value = 0u64;
    let mut i = 1;
    loop {
        let byte = *text.get(i)?;
        if byte == b':' {
            break;
        }
        let digit = byte.wrapping_sub(b'0');
        if digit > 9 || i > MAX_DIGITS {
            return None;
        }
        value = value * 10 + u64::from(digit);
        i += 1;
    }
    if i == 1 {
        return None;
    }
    *rest = &text[i + 1..];
    Some(value)
}

/// Appends `value` in decimal.
pub fn push_decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unmask(frame: &[u8]) -> (u8, Vec<u8>) {
        let h = parse_header(frame).expect("header");
        assert!(h.masked && h.fin);
        let key = &frame[h.header_len - 4..h.header_len];
        let payload = &frame[h.header_len..];
        assert_eq!(payload.len() as u64, h.payload_len);
        (h.opcode, payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]).collect())
    }

    #[test]
    fn client_frames_round_trip_at_every_length_form() {
        for len in [0, 5, 125, 126, 1000, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            encode_client_frame(&mut out, OP_TEXT, &payload);
            assert_eq!(unmask(&out), (OP_TEXT, payload), "len {len}");
        }
    }

    #[test]
    fn server_headers_need_all_their_bytes() {
        let mut frame = vec![0x81, 126, 0x01, 0x00];
        assert_eq!(parse_header(&frame[..3]), None);
        let h = parse_header(&frame).unwrap();
        assert_eq!((h.opcode, h.header_len, h.payload_len, h.masked), (OP_TEXT, 4, 256, false));
        frame = vec![0x89, 127, 0, 0, 0, 0, 0, 1, 0, 0];
        assert_eq!(parse_header(&frame[..9]), None);
        assert_eq!(parse_header(&frame).unwrap().payload_len, 65536);
        assert_eq!(parse_header(&[0x81]), None);
        assert_eq!(parse_header(&[0x01, 3]).map(|h| (h.fin, h.opcode)), Some((false, OP_TEXT)));
    }

    #[test]
    fn classifies_and_extracts_content() {
        let msg =
            br#"{"type":"message","room":"r0","id":7,"from":"a","user":"guest:1","content":"g9:s1:q2:t3:xx","ts":1}"#;
        assert_eq!(classify(msg), Kind::Message);
        assert_eq!(content_start(msg), Some(&b"g9:s1:q2:t3:xx\",\"ts\":1}"[..]));
        assert_eq!(classify(br#"{"room":"r0","type":"message"}"#), Kind::Message);
        assert_eq!(classify(br#"{"type":"joined","room":"r0","history":[{"type":"message"}]}"#), Kind::Joined);
        assert_eq!(classify(br#"{"type":"error","code":"x"}"#), Kind::Error);
        assert_eq!(classify(br#"{"type":"presence"}"#), Kind::Other);
        assert_eq!(classify(b"{\"type\":\"mess"), Kind::Other);
        assert_eq!(classify(b"[]"), Kind::Other);
        // A quoted key inside a value is escaped, so it cannot match.
        let tricky = br#"{"type":"message","from":"\"content\":\"nope","content":"yes"}"#;
        assert_eq!(content_start(tricky), Some(&b"yes\"}"[..]));
        assert_eq!(content_start(b"{\"content\":\""), Some(&b""[..]));
        assert_eq!(content_start(b"{\"content\":"), None);
    }

    #[test]
    fn content_round_trips_and_rejects_other_runs() {
        let stamp = Stamp { sender: 12, seq: 345, sent_ns: 6_789_012_345 };
        let mut out = b"prefix".to_vec();
        assert!(write_content(&mut out, 4242, stamp, 64));
        assert_eq!(out.len(), 6 + 64);
        let content = &out[6..];
        assert!(content.starts_with(b"g4242:t6789012345:s12:q345:xxx"));
        assert_eq!(parse_content(content, 4242), Some(stamp));
        assert_eq!(parse_sent_ns(content, &run_prefix(4242)), Some(6_789_012_345));
        assert_eq!(parse_sent_ns(content, &run_prefix(424)), None);
        assert_eq!(parse_sent_ns(content, &run_prefix(42420)), None);
        assert_eq!(parse_content(content, 4243), None);
        assert_eq!(parse_content(b"g1:t1:s1:q", 1), None);
        assert_eq!(parse_content(b"hello", 1), None);
        assert_eq!(parse_content(b"g1:t1:s:q1:", 1), None);
        assert_eq!(parse_content(b"g1:t99999999999999999999:s1:q1:", 1), None);
        assert_eq!(
            parse_content(b"g1:t9999999999999999999:s1:q1:", 1).map(|s| s.sent_ns),
            Some(9_999_999_999_999_999_999)
        );
        let mut small = Vec::new();
        assert!(!write_content(&mut small, 4242, stamp, 10));
        assert!(small.is_empty());
    }
}
