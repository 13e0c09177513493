//! Frame encoding (server → client) and header parsing (client → server).

use bytes::Bytes;

/// Longest server frame header: 2 bytes + 8 bytes of extended length.
pub const MAX_HEADER: usize = 10;

/// Frame opcodes (RFC 6455 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    /// A further fragment of a message.
    Continuation = 0x0,
    /// A UTF-8 text message.
    Text = 0x1,
    /// A binary message.
    Binary = 0x2,
    /// Close handshake.
    Close = 0x8,
    /// Keepalive request.
    Ping = 0x9,
    /// Keepalive answer.
    Pong = 0xA,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<Self> {
        Some(match bits {
            0x0 => Self::Continuation,
            0x1 => Self::Text,
            0x2 => Self::Binary,
            0x8 => Self::Close,
            0x9 => Self::Ping,
            0xA => Self::Pong,
            _ => return None,
        })
    }

    /// Close, Ping and Pong are control frames.
    pub fn is_control(self) -> bool {
        self as u8 & 0x8 != 0
    }
}

/// Close status codes the server sends (RFC 6455 §7.4.1).
pub struct CloseCode;

impl CloseCode {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The server is going away (shutting down).
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text message was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// The client broke a policy (slow consumer, deadlines).
    pub const POLICY: u16 = 1008;
    /// A frame or message was over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// The server hit an unexpected condition.
    pub const INTERNAL: u16 = 1011;

    /// Whether a client may send `code` in a Close frame: the codes defined by
    /// RFC 6455 and registered with IANA (1000–1003, 1007–1014) and the
    /// ranges for libraries and applications (3000–4999).
    pub fn is_valid_from_peer(code: u16) -> bool {
        matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// A buffer that keeps room for the frame header in front of the payload, so
/// that a frame is built in place with no copy of the payload.
#[derive(Debug)]
pub struct FrameBuf {
    buf: Vec<u8>,
}

impl Default for FrameBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameBuf {
    /// An empty frame with room for a typical chat payload.
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.resize(MAX_HEADER, 0);
        Self { buf }
    }

    /// The payload written so far. Append to it; the header room in front is
    /// not part of it.
    pub fn payload_mut(&mut self) -> PayloadWriter<'_> {
        PayloadWriter(&mut self.buf)
    }

    /// Writes the header for `opcode` in front of the payload and returns the
    /// whole frame, ready to be shared by any number of recipients.
    pub fn finish(mut self, opcode: OpCode) -> Bytes {
        let len = self.buf.len() - MAX_HEADER;
        let mut header = [0u8; MAX_HEADER];
        let header_len = write_header(&mut header, opcode, len);
        let start = MAX_HEADER - header_len;
        self.buf[start..MAX_HEADER].copy_from_slice(&header[..header_len]);
        Bytes::from(self.buf).slice(start..)
    }
}

/// Append-only access to a [`FrameBuf`]'s payload.
#[derive(Debug)]
pub struct PayloadWriter<'a>(&'a mut Vec<u8>);

impl PayloadWriter<'_> {
    /// Appends bytes.
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    /// Appends one byte.
    pub fn push(&mut self, byte: u8) {
        self.0.push(byte);
    }

    /// Removes the last payload byte, never the header room.
    pub fn pop(&mut self) -> Option<u8> {
        if self.0.len() > MAX_HEADER { self.0.pop() } else { None }
    }

    /// The last payload byte.
    pub fn last(&self) -> Option<&u8> {
        self.0[MAX_HEADER..].last()
    }
}

impl std::io::Write for PayloadWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn write_header(out: &mut [u8; MAX_HEADER], opcode: OpCode, len: usize) -> usize {
    out[0] = 0x80 | opcode as u8;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(len) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Encodes a text frame around an already-serialized payload.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut buf = FrameBuf::new();
    buf.payload_mut().extend_from_slice(payload);
    buf.finish(OpCode::Text)
}

/// Encodes a small frame (control frames: at most 125 bytes of payload).
pub fn encode_control(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut buf = FrameBuf::new();
    buf.payload_mut().extend_from_slice(payload);
    buf.finish(opcode)
}

/// Encodes a Close frame; the reason is cut to fit the 125-byte limit.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let mut payload = Vec::with_capacity(2 + end);
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode_control(OpCode::Close, &payload)
}

/// The payload of a frame this module encoded (server frames are unmasked).
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let header_len = match frame.get(1).map(|b| b & 0x7F) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(header_len..).unwrap_or_default()
}

/// A parsed client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Last fragment of its message.
    pub fin: bool,
    /// Frame type.
    pub opcode: OpCode,
    /// Masking key (client frames are always masked).
    pub mask: [u8; 4],
    /// Payload length in bytes.
    pub payload_len: usize,
    /// Header length in bytes, including the masking key.
    pub header_len: usize,
}

/// A client broke the protocol: close with `code` and `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (close {code})")]
pub struct HeaderError {
    /// Close code to send.
    pub code: u16,
    /// Close reason to send.
    pub reason: String,
}

fn protocol_error(reason: impl Into<String>) -> HeaderError {
    HeaderError { code: CloseCode::PROTOCOL_ERROR, reason: reason.into() }
}

/// Parses a client frame header at the start of `buf`. `Ok(None)` means more
/// bytes are needed. Frames longer than `max_frame` are refused here, before
/// any of their payload is buffered.
pub fn parse_header(buf: &[u8], max_frame: usize) -> Result<Option<Header>, HeaderError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    if b0 & 0x70 != 0 {
        return Err(protocol_error("reserved bits set without a negotiated extension"));
    }
    let opcode = OpCode::from_bits(b0 & 0x0F).ok_or_else(|| protocol_error(format!("unknown opcode {}", b0 & 0x0F)))?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(protocol_error("client frames must be masked"));
    }
    let len7 = b1 & 0x7F;
    if opcode.is_control() && (!fin || len7 > 125) {
        return Err(protocol_error("control frames must be unfragmented and at most 125 bytes"));
    }
    let (payload_len, ext) = match len7 {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 2),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(b);
                let len = u64::from_be_bytes(bytes);
                if len >> 63 != 0 {
                    return Err(protocol_error("frame length has its most significant bit set"));
                }
                (len, 8)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 0),
    };
    if payload_len > max_frame as u64 {
        return Err(HeaderError {
            code: CloseCode::TOO_BIG,
            reason: format!("frame of {payload_len} bytes exceeds the limit of {max_frame}"),
        });
    }
    let header_len = 2 + ext + 4;
    let Some(mask) = buf.get(2 + ext..header_len) else { return Ok(None) };
    Ok(Some(Header {
        fin,
        opcode,
        mask: [mask[0], mask[1], mask[2], mask[3]],
        payload_len: payload_len as usize,
        header_len,
    }))
}

/// Unmasks a payload in place.
pub fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3]]);
    let mut chunks = payload.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_every_length_form() {
        for len in [0usize, 125, 126, 65_535, 65_536] {
            let mut buf = FrameBuf::new();
            buf.payload_mut().extend_from_slice(&vec![b'x'; len]);
            let frame = buf.finish(OpCode::Text);
            assert_eq!(frame[0], 0x81);
            assert_eq!(payload_of(&frame).len(), len, "len {len}");
        }
    }

    #[test]
    fn parses_masked_header_and_refuses_violations() {
        let frame = [0x81, 0x85, 1, 2, 3, 4];
        let header = parse_header(&frame, 100).unwrap().unwrap();
        assert_eq!((header.opcode, header.payload_len, header.header_len), (OpCode::Text, 5, 6));
        assert_eq!(parse_header(&frame[..5], 100), Ok(None));
        assert_eq!(parse_header(&[0x81, 0x05], 100).unwrap_err().code, 1002, "unmasked");
        assert_eq!(parse_header(&[0xC1, 0x80], 100).unwrap_err().code, 1002, "rsv1");
        assert_eq!(parse_header(&[0x83, 0x80], 100).unwrap_err().code, 1002, "opcode 3");
        assert_eq!(parse_header(&[0x09, 0x80], 100).unwrap_err().code, 1002, "fragmented ping");
        assert_eq!(parse_header(&[0x81, 0xFE, 0x01, 0x00], 100).unwrap_err().code, 1009);
    }

    #[test]
    fn unmask_round_trips() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let original: Vec<u8> = (0..37).collect();
        let mut data = original.clone();
        unmask(&mut data, mask);
        for (i, (a, b)) in data.iter().zip(&original).enumerate() {
            assert_eq!(*a, b ^ mask[i % 4]);
        }
        unmask(&mut data, mask);
        assert_eq!(data, original);
    }
}
