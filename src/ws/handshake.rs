//! The opening handshake: checks an upgrade request and computes the
//! `Sec-WebSocket-Accept` answer.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use http::HeaderMap;
use http::header::{CONNECTION, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION, UPGRADE};

/// The GUID appended to the client's key (RFC 6455 §1.3).
const ACCEPT_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Why an upgrade request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// `Connection` lacks `upgrade` or `Upgrade` lacks `websocket`.
    #[error("not a WebSocket upgrade request (needs `Connection: upgrade` and `Upgrade: websocket`)")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` is missing or not 13.
    #[error("unsupported WebSocket version (only 13 is supported)")]
    Version,
    /// `Sec-WebSocket-Key` is missing or not 16 base64-encoded bytes.
    #[error("missing or malformed Sec-WebSocket-Key")]
    Key,
}

/// Checks the upgrade headers and returns the `Sec-WebSocket-Accept` value.
pub fn accept(headers: &HeaderMap) -> Result<String, HandshakeError> {
    let has_token = |name, token: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|value| value.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token))))
    };
    if !has_token(CONNECTION, "upgrade") || !has_token(UPGRADE, "websocket") {
        return Err(HandshakeError::NotUpgrade);
    }
    if headers.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(HandshakeError::Version);
    }
    let key = headers.get(SEC_WEBSOCKET_KEY).ok_or(HandshakeError::Key)?.as_bytes();
    match BASE64.decode(key) {
        Ok(decoded) if decoded.len() == 16 => Ok(accept_key(key)),
        _ => Err(HandshakeError::Key),
    }
}

/// `base64(sha1(key + GUID))`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID.as_bytes());
    BASE64.encode(sha.digest().bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn refuses_wrong_version_and_bad_key() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        headers.insert(UPGRADE, "websocket".parse().unwrap());
        headers.insert(SEC_WEBSOCKET_VERSION, "8".parse().unwrap());
        headers.insert(SEC_WEBSOCKET_KEY, "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap());
        assert_eq!(accept(&headers), Err(HandshakeError::Version));
        headers.insert(SEC_WEBSOCKET_VERSION, "13".parse().unwrap());
        assert!(accept(&headers).is_ok());
        headers.insert(SEC_WEBSOCKET_KEY, "c2hvcnQ=".parse().unwrap());
        assert_eq!(accept(&headers), Err(HandshakeError::Key));
    }
}
