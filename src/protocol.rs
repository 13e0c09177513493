//! Protocol v1: the JSON frames exchanged over the WebSocket.
//!
//! `docs/protocol.md` mirrors this module: every frame and every error code
//! here has an example there. Client frames are parsed into [`ClientFrame`];
//! server frames are serialized once into a WebSocket frame ([`Bytes`]) that
//! is shared by every recipient.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ws::{FrameBuf, OpCode};

/// The protocol version announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest `ref` a client may attach to a frame, in bytes.
pub const MAX_REF_BYTES: usize = 64;

/// A client's correlation token (`ref`): a short string or an integer, echoed
/// back in the `ack` or `error` that answers the frame.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Ref(Value);

/// A parsed client frame.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientFrame {
    /// The frame's `ref`, if it had one.
    pub reference: Option<Ref>,
    /// What the client asks for.
    pub request: Request,
}

/// Client → server requests, by their `type`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Enter a room, creating it if needed.
    Join {
        /// Room name.
        room: String,
    },
    /// Leave a room.
    Leave {
        /// Room name.
        room: String,
    },
    /// Send a message to a room the client is in.
    Message {
        /// Room name.
        room: String,
        /// The text of the message.
        content: String,
    },
    /// Change nickname.
    Nick {
        /// The new nickname.
        nick: String,
    },
    /// Page backwards through a room's history.
    History {
        /// Room name.
        room: String,
        /// Only messages with an id below this one.
        #[serde(default)]
        before: Option<u64>,
        /// At most this many messages (capped by the server).
        #[serde(default)]
        limit: Option<usize>,
    },
    /// Authenticate with a signed token (JWT).
    Auth {
        /// The token.
        token: String,
    },
    /// Report a message to the moderators.
    Report {
        /// Room of the message.
        room: String,
        /// The message's id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// Moderators: disconnect a user.
    Kick {
        /// The user's id.
        user: String,
        /// Why (shown to the user).
        #[serde(default)]
        reason: Option<String>,
    },
    /// Moderators: stop a user from sending for a while.
    Mute {
        /// The user's id.
        user: String,
        /// Seconds (default: the configured mute).
        #[serde(default)]
        duration: Option<u64>,
        /// Why (shown to the user).
        #[serde(default)]
        reason: Option<String>,
    },
    /// Moderators: end a mute.
    Unmute {
        /// The user's id.
        user: String,
    },
    /// Moderators: ban a user (by id) or an address or network (for guests).
    Ban {
        /// The user's id.
        #[serde(default)]
        user: Option<String>,
        /// An address (`203.0.113.7`) or network (`203.0.113.0/24`).
        #[serde(default)]
        ip: Option<String>,
        /// Seconds (absent: permanent).
        #[serde(default)]
        duration: Option<u64>,
        /// Why (shown to the user).
        #[serde(default)]
        reason: Option<String>,
    },
    /// Moderators: lift bans of a user, of an address, or one ban by id.
    Unban {
        /// The user's id.
        #[serde(default)]
        user: Option<String>,
        /// The address or network.
        #[serde(default)]
        ip: Option<String>,
        /// The ban's id.
        #[serde(default)]
        ban: Option<i64>,
    },
    /// Moderators: delete a message from the room and its history.
    Delete {
        /// Room name.
        room: String,
        /// The message's id.
        id: u64,
        /// Why.
        #[serde(default)]
        reason: Option<String>,
    },
    /// Moderators: one message per `seconds` per member in a room (0: off).
    SlowMode {
        /// Room name.
        room: String,
        /// Seconds between messages.
        seconds: u32,
    },
    /// Moderators: make a room read-only for members.
    Lock {
        /// Room name.
        room: String,
    },
    /// Moderators: end a lock.
    Unlock {
        /// Room name.
        room: String,
    },
    /// Moderators: forget a user's strikes.
    ClearStrikes {
        /// The user's id.
        user: String,
    },
    /// Moderators: approve a review item (deliver a held message, uphold a report).
    Approve {
        /// The item's id.
        item: i64,
    },
    /// Moderators: deny a review item (drop a held message, dismiss a report).
    Deny {
        /// The item's id.
        item: i64,
        /// Why.
        #[serde(default)]
        reason: Option<String>,
    },
}

/// Frame types a client may send, for error messages.
const CLIENT_TYPES: &str = "`join`, `leave`, `message`, `nick`, `history`, `auth`, `report`, `kick`, `mute`, \
`unmute`, `ban`, `unban`, `delete`, `slow_mode`, `lock`, `unlock`, `clear_strikes`, `approve`, `deny`";

/// Stable, machine-readable error codes. `docs/protocol.md` lists each one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorCode {
    /// The frame is not valid JSON, misses a field, or has a field of the wrong type.
    BadRequest,
    /// The frame is valid but not something the server does (binary frames, unknown `type`).
    Unsupported,
    /// The message is larger than a limit.
    TooLarge,
    /// The request names a room the client has not joined.
    NotMember,
    /// The room holds as many members as it may.
    RoomFull,
    /// The client is in as many rooms as one connection may be.
    TooManyRooms,
    /// The server holds as many rooms as it may; no new room can be created.
    RoomLimit,
    /// The room name is empty, too long, or has characters that are not allowed.
    InvalidRoom,
    /// Another user has this nickname (compared case-insensitively).
    NickTaken,
    /// The nickname is too short, too long, or has characters that are not allowed.
    InvalidNick,
    /// The token is missing, forged or expired, or authentication is needed first.
    Unauthorized,
    /// The request needs a role the user does not have.
    Forbidden,
    /// The user is banned.
    Banned,
    /// The user is muted (with `retry_after_ms`).
    Muted,
    /// The room is read-only for members.
    RoomLocked,
    /// The user, message or review item named does not exist.
    NotFound,
    /// The store could not record the request; nothing was done.
    Unavailable,
    /// A filter of the policy pipeline refused the request; the code is the
    /// filter's (`rate_limited`, `profanity`, `slow_mode`, …).
    Policy(String),
}

impl ErrorCode {
    /// The code as sent in `error` frames.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NotMember => "not_member",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::RoomLimit => "room_limit",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::NickTaken => "nick_taken",
            ErrorCode::InvalidNick => "invalid_nick",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Banned => "banned",
            ErrorCode::Muted => "muted",
            ErrorCode::RoomLocked => "room_locked",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Policy(code) => code,
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A request that could not be carried out, answered with an `error` frame.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestError {
    /// The stable code.
    pub code: ErrorCode,
    /// A sentence for the person behind the client.
    pub message: String,
    /// The `ref` of the frame that failed, if it was readable.
    pub reference: Option<Ref>,
    /// When trying again may succeed, in milliseconds.
    pub retry_after_ms: Option<u64>,
}

impl RequestError {
    /// An error with no `ref` attached yet.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), reference: None, retry_after_ms: None }
    }

    /// Encodes this error as an `error` frame.
    pub fn to_frame(&self) -> Bytes {
        encode(&ServerFrame::Error {
            code: &self.code,
            message: &self.message,
            reference: self.reference.as_ref(),
            retry_after_ms: self.retry_after_ms,
        })
    }
}

/// Parses one text frame from a client.
///
/// Every failure names what is wrong; the `ref` is kept whenever the frame is
/// a JSON object with a valid `ref`, so the client can match the error.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, RequestError> {
    match parse_message_frame(text) {
        Some(frame) => Ok(frame),
        None => parse_any_frame(text),
    }
}

/// A `message` frame, the one clients send most, read straight into its
/// fields. The general parser builds a `Value` tree and then buffers it
/// again for the tagged enum, which cost more than the rest of handling
/// the message.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    room: String,
    content: String,
    #[serde(rename = "ref", default)]
    reference: Option<Value>,
}

/// [`parse_client_frame`] for a valid `message` frame; `None` for anything
/// else (another type, an error of any kind), which the general parser
/// then handles, errors included, so that both give the same result.
fn parse_message_frame(text: &str) -> Option<ClientFrame> {
    let frame: MessageFrame<'_> = serde_json::from_str(text).ok()?;
    if frame.kind != "message" {
        return None;
    }
    let reference = reference(frame.reference).ok()?;
    Some(ClientFrame { reference, request: Request::Message { room: frame.room, content: frame.content } })
}

/// A frame's `ref`: absent or null, an integer that fits 64 bits (a float,
/// or an integer too large, would not come back as sent), or a string of
/// at most [`MAX_REF_BYTES`] bytes.
fn reference(value: Option<Value>) -> Result<Option<Ref>, ()> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.len() <= MAX_REF_BYTES => Ok(Some(Ref(Value::String(s)))),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(Ref(Value::Number(n)))),
        Some(_) => Err(()),
    }
}

/// Parses any client frame, and says precisely what is wrong with one that
/// is refused.
fn parse_any_frame(text: &str) -> Result<ClientFrame, RequestError> {
    let bad = |message: String| RequestError::new(ErrorCode::BadRequest, message);
    let mut value: Value = serde_json::from_str(text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let Some(object) = value.as_object_mut() else {
        return Err(bad("a frame must be a JSON object with a `type` field".to_owned()));
    };
    let Ok(reference) = reference(object.remove("ref")) else {
        return Err(bad(format!("`ref` must be an integer (64-bit) or a string of at most {MAX_REF_BYTES} bytes")));
    };
    let with_ref = |mut e: RequestError| {
        e.reference = reference.clone();
        e
    };
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.clone(),
        Some(_) => return Err(with_ref(bad("`type` must be a string".to_owned()))),
        None => return Err(with_ref(bad(format!("missing field `type` (one of {CLIENT_TYPES})")))),
    };
    let request = Request::deserialize(value).map_err(|e| {
        let message = e.to_string();
        if message.starts_with("unknown variant") {
            with_ref(RequestError::new(
                ErrorCode::Unsupported,
                format!("unknown frame type {kind:?}; expected one of {CLIENT_TYPES}"),
            ))
        } else {
            with_ref(bad(format!("invalid `{kind}` frame: {message}")))
        }
    })?;
    Ok(ClientFrame { reference, request })
}

/// A user as other clients see them.
#[derive(Debug, Clone, Serialize)]
pub struct UserView<'a> {
    /// Stable user id (`guest:<session>` for guests).
    pub id: &'a str,
    /// Current nickname.
    pub nick: &'a str,
    /// Roles, e.g. `["member"]`.
    pub roles: crate::client::Roles,
}

/// Limits announced in `welcome`, so clients can check before sending.
#[derive(Debug, Clone, Serialize)]
pub struct Limits {
    /// Largest WebSocket message the server accepts, in bytes.
    pub max_message_bytes: usize,
    /// Largest WebSocket frame the server accepts, in bytes.
    pub max_frame_bytes: usize,
    /// Rooms one connection may be in.
    pub max_rooms_per_connection: usize,
    /// Largest `history` page.
    pub history_page_max: usize,
}

/// What happened in a `presence` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PresenceEvent {
    /// The user entered the room.
    Join,
    /// The user left the room or disconnected.
    Leave,
    /// The user changed nickname (`previous` holds the old one).
    Nick,
}

/// Server → client frames, by their `type`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// First frame of every connection.
    Welcome {
        /// Always [`PROTOCOL_VERSION`].
        protocol: u32,
        /// This connection's session id.
        session: &'a str,
        /// Who the server thinks the client is.
        user: UserView<'a>,
        /// Limits the client should respect.
        limits: &'a Limits,
    },
    /// Answer to `join` (history follows, see [`encode_with_list`]).
    Joined {
        /// Room name.
        room: &'a str,
        /// Members in the room, including the joiner.
        member_count: usize,
        /// Up to `rooms.presence_max_members` of them.
        members: &'a [UserView<'a>],
        /// Seconds between messages per member (0: no slow mode).
        slow_mode: u32,
        /// Read-only for members.
        locked: bool,
        /// Echo of the request's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Ref>,
    },
    /// Answer to `leave`.
    Left {
        /// Room name.
        room: &'a str,
        /// Echo of the request's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Ref>,
    },
    /// A chat message in a room.
    Message {
        /// Room name.
        room: &'a str,
        /// Per-room id, increasing.
        id: u64,
        /// Sender's nickname at the time of sending.
        from: &'a str,
        /// Sender's user id.
        user: &'a str,
        /// The text.
        content: &'a str,
        /// Server time of acceptance, milliseconds since the Unix epoch.
        ts: u64,
    },
    /// Someone joined, left, or changed nickname.
    Presence {
        /// Room name.
        room: &'a str,
        /// The user concerned.
        user: UserView<'a>,
        /// What happened.
        event: PresenceEvent,
        /// The old nickname, for `nick` events.
        #[serde(skip_serializing_if = "Option::is_none")]
        previous: Option<&'a str>,
    },
    /// Answer to `nick`: the client's identity after the change.
    Renamed {
        /// The user, with the new nickname.
        user: UserView<'a>,
        /// The old nickname.
        previous: &'a str,
        /// Echo of the request's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Ref>,
    },
    /// The server accepted a message that carried a `ref`.
    Ack {
        /// Echo of the message's `ref`.
        #[serde(rename = "ref")]
        reference: &'a Ref,
        /// The id the message got.
        id: u64,
        /// Room name.
        room: &'a str,
        /// Server time of acceptance.
        ts: u64,
    },
    /// Answer to `history` (messages follow, see [`encode_with_list`]).
    History {
        /// Room name.
        room: &'a str,
        /// Whether older messages exist.
        more: bool,
        /// Echo of the request's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Ref>,
    },
    /// A message awaits a moderator's review before it reaches the room.
    Held {
        /// Room name.
        room: &'a str,
        /// The review item's id.
        id: i64,
        /// Why it is held.
        reason: &'a str,
        /// Echo of the message's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Ref>,
    },
    /// A moderation request succeeded.
    Done {
        /// The request's type (`kick`, `ban`, …).
        action: &'a str,
        /// Echo of the request's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Ref>,
    },
    /// A message was deleted by a moderator: remove it.
    Deleted {
        /// Room name.
        room: &'a str,
        /// The message's id.
        id: u64,
    },
    /// You are muted until `until` (ms since the Unix epoch).
    Muted {
        /// When the mute ends.
        until: u64,
        /// How long from now.
        remaining_ms: u64,
        /// Why.
        reason: &'a str,
    },
    /// Your mute ended.
    Unmuted {},
    /// A warning from the moderators (or the escalation ladder).
    Warning {
        /// Why.
        reason: &'a str,
    },
    /// A room's moderation settings changed (or, on join, what they are).
    Room {
        /// Room name.
        room: &'a str,
        /// Seconds between messages per member (0: off).
        slow_mode: u32,
        /// Read-only for members.
        locked: bool,
    },
    /// Moderators: a delivered message that a filter flagged.
    Flagged {
        /// Room name.
        room: &'a str,
        /// The message's id.
        id: u64,
        /// The author.
        user: UserView<'a>,
        /// The text as delivered.
        content: &'a str,
        /// Why it was flagged.
        reason: &'a str,
        /// The filter that flagged it.
        filter: &'a str,
    },
    /// Moderators: a new item in the review queue.
    Review {
        /// The item.
        item: &'a crate::store::ReviewItem,
    },
    /// Moderators and the author: a review item was decided.
    Reviewed {
        /// The item's id.
        id: i64,
        /// `approved` or `denied`.
        status: crate::store::ReviewStatus,
        /// Who decided.
        by: &'a str,
    },
    /// A request failed.
    Error {
        /// Stable code.
        code: &'a ErrorCode,
        /// Human-readable explanation.
        message: &'a str,
        /// Echo of the failed frame's `ref`.
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Ref>,
        /// When to try again, for rate limits.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
}

/// Serializes a server frame into a complete WebSocket text frame.
pub fn encode(frame: &ServerFrame<'_>) -> Bytes {
    let mut buf = FrameBuf::new();
    write_json(&mut buf, frame);
    buf.finish(OpCode::Text)
}

/// Serializes a server frame with one more field, `field`, holding a JSON
/// array of already-encoded objects (stored messages), copied verbatim.
pub fn encode_with_list<'i>(frame: &ServerFrame<'_>, field: &str, items: impl IntoIterator<Item = &'i [u8]>) -> Bytes {
    let mut buf = FrameBuf::new();
    write_json(&mut buf, frame);
    let mut payload = buf.payload_mut();
    // A serialized struct always ends with its closing brace: reopen it.
    debug_assert_eq!(payload.last(), Some(&b'}'));
    payload.pop();
    payload.extend_from_slice(b",\"");
    payload.extend_from_slice(field.as_bytes());
    payload.extend_from_slice(b"\":[");
    for (i, item) in items.into_iter().enumerate() {
        if i > 0 {
            payload.push(b',');
        }
        payload.extend_from_slice(item);
    }
    payload.extend_from_slice(b"]}");
    buf.finish(OpCode::Text)
}

fn write_json(buf: &mut FrameBuf, frame: &ServerFrame<'_>) {
    // Serializing these types into memory cannot fail: every map key is a
    // string and no Serialize impl here returns an error.
    if let Err(e) = serde_json::to_writer(buf.payload_mut(), frame) {
        unreachable!("serializing a server frame failed: {e}");
    }
}

/// Milliseconds since the Unix epoch, for `ts` fields.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> RequestError {
        parse_client_frame(text).expect_err("frame should be refused")
    }

    #[test]
    fn message_frames_parse_the_same_on_both_paths() {
        let frames = [
            r#"{"type":"message","room":"lobby","content":"hi"}"#,
            r#"{"type":"message","room":"lobby","content":"hi","ref":7}"#,
            r#"{"ref":"abc","content":"h\u00e9 \"x\"","room":"r","type":"message"}"#,
            r#" { "type" : "message" , "room" : "lobby" , "content" : "" , "ref" : null } "#,
            r#"{"type":"message","room":"lobby","content":"hi","ref":1.5}"#,
            r#"{"type":"message","room":"lobby","content":"hi","ref":-3}"#,
            r#"{"type":"message","room":"lobby","content":"hi","ref":true}"#,
            r#"{"type":"message","room":"lobby","content":"hi","ref":{"a":1}}"#,
            concat!(
                r#"{"type":"message","room":"lobby","content":"hi","ref":""#,
                "0123456789012345678901234567890123456789012345678901234567890123",
                r#""}"#
            ),
            concat!(
                r#"{"type":"message","room":"lobby","content":"hi","ref":""#,
                "01234567890123456789012345678901234567890123456789012345678901234",
                r#""}"#
            ),
            r#"{"type":"message","room":"lobby","content":"hi","extra":1}"#,
            r#"{"type":"message","room":"lobby","content":"a","content":"b"}"#,
            r#"{"type":"message","room":"lobby"}"#,
            r#"{"type":"message","room":7,"content":"hi"}"#,
            r#"{"type":"join","room":"lobby"}"#,
            r#"{"type":"Message","room":"lobby","content":"hi"}"#,
            r#"{"room":"lobby","content":"hi"}"#,
            r#"{"type":"message","room":"lobby","content":"hi"} x"#,
            r#"[1]"#,
        ];
        for text in frames {
            let fast = parse_message_frame(text);
            let any = parse_any_frame(text);
            if let Some(fast) = &fast {
                assert_eq!(Ok(fast), any.as_ref(), "{text}");
            }
            assert_eq!(parse_client_frame(text), any, "{text}");
        }
        // The fast path is taken for the common frames.
        assert!(parse_message_frame(frames[0]).is_some());
        assert!(parse_message_frame(frames[2]).is_some());
        assert!(parse_message_frame(frames[3]).is_some());
    }

    #[test]
    fn parses_each_request_with_its_ref() {
        let frame = parse_client_frame(r#"{"type":"message","room":"lobby","content":"hi","ref":7}"#).unwrap();
        assert_eq!(frame.reference, Some(Ref(Value::from(7))));
        assert_eq!(frame.request, Request::Message { room: "lobby".into(), content: "hi".into() });
        let frame = parse_client_frame(r#"{"type":"history","room":"a","before":10}"#).unwrap();
        assert_eq!(frame.request, Request::History { room: "a".into(), before: Some(10), limit: None });
        for (json, reference) in [("-5", Value::from(-5)), ("18446744073709551615", Value::from(u64::MAX))] {
            for kind in [r#""type":"message","room":"a","content":"hi""#, r#""type":"leave","room":"a""#] {
                let frame = parse_client_frame(&format!("{{{kind},\"ref\":{json}}}")).unwrap();
                assert_eq!(frame.reference, Some(Ref(reference.clone())), "{kind} {json}");
            }
        }
    }

    #[test]
    fn a_ref_that_would_not_come_back_as_sent_is_refused() {
        for json in ["1.5", "1e300", "123456789012345678901234567890", "[1]", "true"] {
            for kind in [r#""type":"message","room":"a","content":"hi""#, r#""type":"leave","room":"a""#] {
                let e = parse_err(&format!("{{{kind},\"ref\":{json}}}"));
                assert_eq!(e.code, ErrorCode::BadRequest, "{kind} {json}");
                assert!(e.message.contains("`ref` must be an integer"), "{}", e.message);
            }
        }
    }

    #[test]
    fn errors_name_the_problem_and_keep_the_ref() {
        let e = parse_err("not json");
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.starts_with("invalid JSON"), "{}", e.message);

        let e = parse_err(r#"{"type":"join","ref":"r1"}"#);
        assert_eq!((e.code.clone(), e.reference.clone()), (ErrorCode::BadRequest, Some(Ref(Value::from("r1")))));
        assert!(e.message.contains("missing field `room`"), "{}", e.message);

        let e = parse_err(r#"{"type":"dance","ref":"r2"}"#);
        assert_eq!(e.code, ErrorCode::Unsupported);
        assert!(e.message.contains("\"dance\""), "{}", e.message);

        let e = parse_err(r#"{"type":"join","room":5}"#);
        assert!(e.message.contains("invalid type: integer `5`"), "{}", e.message);

        let e = parse_err(r#"{"type":"join","room":"a","colour":"red"}"#);
        assert!(e.message.contains("unknown field `colour`"), "{}", e.message);

        let e = parse_err("[1,2]");
        assert!(e.message.contains("JSON object"), "{}", e.message);
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let deep = "[".repeat(100_000);
        assert_eq!(parse_err(&deep).code, ErrorCode::BadRequest);
    }

    #[test]
    fn list_frames_embed_stored_objects_verbatim() {
        let frame = encode_with_list(
            &ServerFrame::History { room: "a", more: false, reference: None },
            "messages",
            [&b"{\"id\":1}"[..], &b"{\"id\":2}"[..]],
        );
        let payload = crate::ws::payload_of(&frame);
        let value: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(value["messages"][1]["id"], 2);
        assert_eq!(value["type"], "history");
    }
}
