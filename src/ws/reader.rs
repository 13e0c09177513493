//! Turns bytes read from a client into WebSocket events: frames are parsed,
//! unmasked, checked against the limits, and fragmented messages assembled,
//! with UTF-8 checked as each fragment arrives.

use super::frame::{CloseCode, HeaderError, OpCode, parse_header, unmask};

/// Something a client sent, ready for the connection to act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete, valid UTF-8 text message.
    Text(&'a str),
    /// A complete binary message (its content is not kept).
    Binary,
    /// A ping: answer with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong (proof of life).
    Pong,
    /// The client started the close handshake; `None` if it gave no code.
    Close(Option<(u16, &'a str)>),
}

/// The client broke the protocol or a limit: close with this code and reason.
pub type Violation = HeaderError;

/// What the event handler wants after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep going.
    Continue,
    /// Stop for now: keep the rest of the input for [`MessageReader::resume`].
    Pause,
    /// Stop for good: drop the rest of the input.
    Stop,
}

/// A message whose fragments are still arriving.
#[derive(Debug)]
struct Fragments {
    /// Text or Binary.
    opcode: OpCode,
    /// Text collected so far (binary content is counted, not kept).
    text: Vec<u8>,
    /// Bytes received so far, for the message size limit.
    len: usize,
    /// `text[..utf8_checked]` is known to be valid UTF-8.
    utf8_checked: usize,
}

/// Per-connection read state. Empty (no heap memory) between messages unless
/// a frame arrived split across reads.
#[derive(Debug)]
pub struct MessageReader {
    /// Bytes of an incomplete frame, kept until the rest arrives.
    partial: Vec<u8>,
    /// The fragmented message being assembled, if any.
    fragments: Option<Box<Fragments>>,
    /// Largest frame payload accepted.
    max_frame: u32,
    /// Largest message accepted (all fragments).
    max_message: u32,
}

impl MessageReader {
    /// A reader enforcing these limits (both in bytes, capped at 4 GiB).
    pub fn new(max_frame: usize, max_message: usize) -> Self {
        let mut reader = Self { partial: Vec::new(), fragments: None, max_frame: 0, max_message: 0 };
        reader.set_limits(max_frame, max_message);
        reader
    }

    /// Changes the limits for the frames that follow.
    pub fn set_limits(&mut self, max_frame: usize, max_message: usize) {
        self.max_frame = u32::try_from(max_frame).unwrap_or(u32::MAX);
        self.max_message = u32::try_from(max_message).unwrap_or(u32::MAX);
    }

    /// Feeds bytes read from the socket (the buffer is used as scratch space
    /// for unmasking) and calls `on_event` for each complete event, until it
    /// returns [`Flow::Pause`] or [`Flow::Stop`]. Input not yet handled (an
    /// incomplete frame, or everything after a pause) is kept.
    pub fn feed(&mut self, data: &mut [u8], mut on_event: impl FnMut(Event<'_>) -> Flow) -> Result<Flow, Violation> {
        if !self.partial.is_empty() {
            self.partial.extend_from_slice(data);
            return self.resume(on_event);
        }
        let (consumed, flow) = self.process(data, &mut on_event)?;
        if flow != Flow::Stop && consumed < data.len() {
            self.partial.extend_from_slice(&data[consumed..]);
        }
        Ok(flow)
    }

    /// Keeps bytes read from the socket without handling them yet: they are
    /// handled, in order, by the next [`resume`](Self::resume).
    pub fn keep(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
    }

    /// Handles the input kept by [`feed`](Self::feed) after a pause.
    pub fn resume(&mut self, mut on_event: impl FnMut(Event<'_>) -> Flow) -> Result<Flow, Violation> {
        let mut buf = std::mem::take(&mut self.partial);
        let (consumed, flow) = self.process(&mut buf, &mut on_event)?;
        if flow != Flow::Stop && consumed < buf.len() {
            buf.drain(..consumed);
            self.partial = buf;
        }
        Ok(flow)
    }

    /// Handles every complete frame at the start of `buf`; returns how many
    /// bytes were consumed.
    fn process(
        &mut self,
        buf: &mut [u8],
        on_event: &mut impl FnMut(Event<'_>) -> Flow,
    ) -> Result<(usize, Flow), Violation> {
        let mut pos = 0;
        while let Some(header) = parse_header(&buf[pos..], self.max_frame as usize)? {
            let end = pos + header.header_len + header.payload_len;
            if end > buf.len() {
                break;
            }
            let payload = &mut buf[pos + header.header_len..end];
            unmask(payload, header.mask);
            pos = end;
            match self.frame(header.opcode, header.fin, payload, on_event)? {
                Flow::Continue => {}
                flow => return Ok((pos, flow)),
            }
        }
        Ok((pos, Flow::Continue))
    }

    fn frame(
        &mut self,
        opcode: OpCode,
        fin: bool,
        payload: &[u8],
        on_event: &mut impl FnMut(Event<'_>) -> Flow,
    ) -> Result<Flow, Violation> {
        match opcode {
            OpCode::Ping => Ok(on_event(Event::Ping(payload))),
            OpCode::Pong => Ok(on_event(Event::Pong)),
            OpCode::Close => Ok(on_event(Event::Close(parse_close(payload)?))),
            OpCode::Text | OpCode::Binary => {
                if self.fragments.is_some() {
                    return Err(protocol("a new message started before the fragmented one finished"));
                }
                if fin {
                    return Ok(on_event(complete(opcode, payload)?));
                }
                let mut fragments = Box::new(Fragments { opcode, text: Vec::new(), len: 0, utf8_checked: 0 });
                self.append(&mut fragments, payload)?;
                self.fragments = Some(fragments);
                Ok(Flow::Continue)
            }
            OpCode::Continuation => {
                let Some(mut fragments) = self.fragments.take() else {
                    return Err(protocol("continuation frame without a message to continue"));
                };
                self.append(&mut fragments, payload)?;
                if !fin {
                    self.fragments = Some(fragments);
                    return Ok(Flow::Continue);
                }
                let event = match fragments.opcode {
                    OpCode::Text => Event::Text(std::str::from_utf8(&fragments.text).map_err(|_| invalid_utf8())?),
                    _ => Event::Binary,
                };
                Ok(on_event(event))
            }
        }
    }

    fn append(&self, fragments: &mut Fragments, payload: &[u8]) -> Result<(), Violation> {
        fragments.len += payload.len();
        if fragments.len > self.max_message as usize {
            return Err(Violation {
                code: CloseCode::TOO_BIG,
                reason: format!("message exceeds the limit of {} bytes", self.max_message),
            });
        }
        if fragments.opcode == OpCode::Text {
            fragments.text.extend_from_slice(payload);
            // Fail fast: check what arrived, allowing only an incomplete
            // character at the very end to wait for the next fragment.
            match std::str::from_utf8(&fragments.text[fragments.utf8_checked..]) {
                Ok(_) => fragments.utf8_checked = fragments.text.len(),
                Err(e) if e.error_len().is_none() => fragments.utf8_checked += e.valid_up_to(),
                Err(_) => return Err(invalid_utf8()),
            }
        }
        Ok(())
    }
}

fn complete(opcode: OpCode, payload: &[u8]) -> Result<Event<'_>, Violation> {
    match opcode {
        OpCode::Text => Ok(Event::Text(std::str::from_utf8(payload).map_err(|_| invalid_utf8())?)),
        _ => Ok(Event::Binary),
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, Violation> {
    match payload {
        [] => Ok(None),
        [_] => Err(protocol("close frame with a 1-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !CloseCode::is_valid_from_peer(code) {
                return Err(protocol(format!("invalid close code {code}")));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| invalid_utf8())?;
            Ok(Some((code, reason)))
        }
    }
}

fn protocol(reason: impl Into<String>) -> Violation {
    Violation { code: CloseCode::PROTOCOL_ERROR, reason: reason.into() }
}

fn invalid_utf8() -> Violation {
    Violation { code: CloseCode::INVALID_PAYLOAD, reason: "text is not valid UTF-8".to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [9, 8, 7, 6];
        let mut out = vec![first_byte];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn events(reader: &mut MessageReader, mut data: Vec<u8>) -> Result<Vec<String>, Violation> {
        let mut seen = Vec::new();
        reader.feed(&mut data, |event| {
            seen.push(format!("{event:?}"));
            Flow::Continue
        })?;
        Ok(seen)
    }

    #[test]
    fn assembles_fragments_split_across_reads() {
        let mut reader = MessageReader::new(1024, 1024);
        let mut bytes = frame(0x01, "héllo ".as_bytes());
        bytes.extend(frame(0x89, b"p"));
        bytes.extend(frame(0x80, b"world"));
        let (a, b) = bytes.split_at(9);
        assert_eq!(events(&mut reader, a.to_vec()).unwrap(), Vec::<String>::new());
        assert_eq!(
            events(&mut reader, b.to_vec()).unwrap(),
            vec!["Ping([112])".to_owned(), "Text(\"héllo world\")".to_owned()]
        );
        assert!(reader.partial.is_empty() && reader.fragments.is_none());
    }

    #[test]
    fn pause_keeps_the_rest_for_resume() {
        let mut reader = MessageReader::new(1024, 1024);
        let mut bytes = frame(0x81, b"one");
        bytes.extend(frame(0x81, b"two"));
        bytes.extend(frame(0x81, b"thr"));
        let mut seen = Vec::new();
        let flow = reader.feed(&mut bytes, |event| {
            seen.push(format!("{event:?}"));
            Flow::Pause
        });
        assert_eq!((flow, seen.len()), (Ok(Flow::Pause), 1));
        let flow = reader.resume(|event| {
            seen.push(format!("{event:?}"));
            Flow::Continue
        });
        assert_eq!(flow, Ok(Flow::Continue));
        assert_eq!(seen, ["Text(\"one\")", "Text(\"two\")", "Text(\"thr\")"]);
        assert!(reader.partial.is_empty());
    }

    #[test]
    fn invalid_utf8_split_across_fragments_fails_fast() {
        let mut reader = MessageReader::new(1024, 1024);
        // "κ" is CE BA; CE followed by a non-continuation byte is invalid.
        assert!(events(&mut reader, frame(0x01, &[b'a', 0xCE])).is_ok(), "incomplete char waits");
        let err = events(&mut reader, frame(0x00, &[0x41])).unwrap_err();
        assert_eq!(err.code, 1007);
    }

    #[test]
    fn message_limit_counts_all_fragments() {
        let mut reader = MessageReader::new(10, 15);
        let mut bytes = frame(0x01, b"0123456789");
        bytes.extend(frame(0x00, b"0123456789"));
        assert_eq!(events(&mut reader, bytes).unwrap_err().code, 1009);
    }

    #[test]
    fn continuation_without_start_and_interleaved_messages_are_protocol_errors() {
        let mut reader = MessageReader::new(100, 100);
        assert_eq!(events(&mut reader, frame(0x80, b"x")).unwrap_err().code, 1002);
        let mut reader = MessageReader::new(100, 100);
        let mut bytes = frame(0x01, b"x");
        bytes.extend(frame(0x81, b"y"));
        assert_eq!(events(&mut reader, bytes).unwrap_err().code, 1002);
    }

    #[test]
    fn close_payloads_are_checked() {
        let mut reader = MessageReader::new(100, 100);
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        assert_eq!(events(&mut reader, frame(0x88, &close)).unwrap(), vec!["Close(Some((1000, \"bye\")))"]);
        assert_eq!(events(&mut reader, frame(0x88, &[0x03])).unwrap_err().code, 1002);
        assert_eq!(events(&mut reader, frame(0x88, &1005u16.to_be_bytes())).unwrap_err().code, 1002);
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.push(0xFF);
        assert_eq!(events(&mut reader, frame(0x88, &bad_reason)).unwrap_err().code, 1007);
    }
}
