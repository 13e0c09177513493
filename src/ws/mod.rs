//! The WebSocket protocol (RFC 6455), server side, written for this server's
//! needs rather than taken from tungstenite (see `docs/design.md`):
//!
//! - outgoing frames are encoded once and the same bytes go to every
//!   recipient (server frames are never masked);
//! - a connection holds no read buffer while idle: bytes are read into a
//!   per-thread scratch buffer and only an incomplete frame is kept;
//! - limits are checked on the frame header, before any payload is buffered.
//!
//! Layout: [`handshake`] answers the HTTP upgrade; `frame` encodes frames and
//! parses frame headers; `reader` turns bytes into [`Event`]s.

pub mod handshake;

mod frame;
mod reader;

pub use frame::{CloseCode, FrameBuf, MAX_HEADER, OpCode, close_frame, encode_control, payload_of, text_frame};
pub use reader::{Event, Flow, MessageReader, Violation};
