//! The admin HTTP API under `/admin/`, documented in `docs/admin-api.md`.
//!
//! Every request needs `Authorization: Bearer <admin.token>`; the token is
//! compared in constant time. A wrong or missing token gets 401 and nothing
//! else; with no token configured the API does not exist (404).

use std::collections::HashMap;
use std::sync::Arc;

use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use warp::Filter;
use warp::reply::Response;

use crate::hub::Hub;
use crate::protocol::{ErrorCode, Request, now_ms};
use crate::store::{AuditQuery, ReviewStatus};

/// Largest request body the admin API reads.
const MAX_BODY: u64 = 64 * 1024;

/// The admin routes: authorization, then one handler that dispatches on
/// the method and path.
pub fn routes(
    hub: Arc<Hub>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let authorized = authorized(hub.clone());
    warp::path("admin")
        .and(authorized)
        .and(warp::method())
        .and(warp::path::tail())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::body::stream())
        .then(move |(), method: Method, tail: warp::path::Tail, query: String, body| {
            let hub = hub.clone();
            async move {
                let body = match read_body(body).await {
                    Ok(body) => body,
                    Err(response) => return response,
                };
                let segments: Vec<&str> = tail.as_str().split('/').filter(|s| !s.is_empty()).collect();
                handle(&hub, &method, &segments, &query, &body).await
            }
        })
}

/// Reads a request body of at most [`MAX_BODY`] bytes. A request may have
/// none, or give its length or not (`GET` from curl or a browser sends no
/// `Content-Length`).
async fn read_body<S, B>(body: S) -> Result<Vec<u8>, Response>
where
    S: futures_util::Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    let mut body = std::pin::pin!(body);
    let mut bytes = Vec::new();
    while let Some(chunk) = futures_util::StreamExt::next(&mut body).await {
        let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, format!("{e}")))?;
        if (bytes.len() + chunk.remaining()) as u64 > MAX_BODY {
            let message = format!("the request body is larger than {MAX_BODY} bytes");
            return Err(error(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, message));
        }
        bytes::BufMut::put(&mut bytes, chunk);
    }
    Ok(bytes)
}

/// Dispatches one admin request.
async fn handle(hub: &Arc<Hub>, method: &Method, path: &[&str], query: &str, body: &[u8]) -> Response {
    let Ok(params) = serde_urlencoded::from_str::<HashMap<String, String>>(query) else {
        return bad_request(format!("the query string {query:?} is malformed"));
    };
    match (method.as_str(), path) {
        ("GET", ["reload"]) => json(StatusCode::OK, &hub.reloader().status()),
        ("POST", ["reload"]) => {
            let reloader = hub.reloader().clone();
            match tokio::task::spawn_blocking(move || reloader.reload()).await {
                Ok(status) => json(StatusCode::OK, &status),
                Err(_) => error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Unavailable,
                    "the reload failed unexpectedly".to_owned(),
                ),
            }
        }
        ("GET", ["rooms"]) => json(StatusCode::OK, &hub.room_overview()),
        ("GET", ["bans"]) => {
            let active = params.get("all").is_none_or(|v| v != "true");
            stored(hub.store().bans(active.then(now_ms)))
        }
        ("POST", ["bans"]) => match parse::<BanBody>(body) {
            Ok(b) => act(hub, Request::Ban { user: b.user, ip: b.ip, duration: b.duration, reason: b.reason }).await,
            Err(message) => bad_request(message),
        },
        ("DELETE", ["bans", id]) => match id.parse::<i64>() {
            Ok(id) => act(hub, Request::Unban { user: None, ip: None, ban: Some(id) }).await,
            Err(_) => bad_request(format!("a ban id is a number, not {id:?}")),
        },
        ("GET", ["mutes"]) => json(StatusCode::OK, &hub.moderation.mutes(now_ms())),
        ("POST", ["mutes"]) => match parse::<MuteBody>(body) {
            Ok(m) => act(hub, Request::Mute { user: m.user, duration: m.duration, reason: m.reason }).await,
            Err(message) => bad_request(message),
        },
        ("DELETE", ["mutes", user]) => act(hub, Request::Unmute { user: (*user).to_owned() }).await,
        ("GET", ["review"]) => {
            let status = match params.get("status").map(String::as_str) {
                None => Some(ReviewStatus::Pending),
                Some("all") => None,
                Some(name) => match ReviewStatus::parse(name) {
                    Some(status) => Some(status),
                    None => return bad_request(format!("unknown status {name:?}")),
                },
            };
            stored(hub.store().review_items(status))
        }
        ("POST", ["review", id, decision @ ("approve" | "deny")]) => {
            let Ok(item) = id.parse::<i64>() else {
                return bad_request(format!("a review item id is a number, not {id:?}"));
            };
            let reason = if body.is_empty() {
                None
            } else {
                match parse::<DecisionBody>(body) {
                    Ok(body) => body.reason,
                    Err(message) => return bad_request(message),
                }
            };
            let request =
                if *decision == "approve" { Request::Approve { item } } else { Request::Deny { item, reason } };
            act(hub, request).await
        }
        ("GET", ["audit"]) => {
            let number = |key: &str| -> Result<Option<i64>, String> {
                match params.get(key) {
                    None => Ok(None),
                    Some(v) => v.parse().map(Some).map_err(|_| format!("`{key}` is a number, not {v:?}")),
                }
            };
            let (before, limit) = match (number("before"), number("limit")) {
                (Ok(before), Ok(limit)) => (before, limit.unwrap_or(100)),
                (Err(message), _) | (_, Err(message)) => return bad_request(message),
            };
            if !(1..=1000).contains(&limit) {
                return bad_request(format!("`limit` is from 1 to 1000, not {limit}"));
            }
            let query = AuditQuery {
                actor: params.get("actor").cloned(),
                target: params.get("target").cloned(),
                room: params.get("room").cloned(),
                before,
                limit: limit as usize,
            };
            stored(hub.store().audit(&query))
        }
        _ => error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such admin endpoint; see docs/admin-api.md".to_owned(),
        ),
    }
}

/// Carries out a moderation request as the admin API and answers it.
async fn act(hub: &Hub, request: Request) -> Response {
    match hub.apply_as_admin(request).await {
        Ok(()) => json(StatusCode::OK, &serde_json::json!({"ok": true})),
        Err(error) => {
            let status = match error.code {
                ErrorCode::NotFound => StatusCode::NOT_FOUND,
                ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            self::error(status, error.code, error.message)
        }
    }
}

/// A JSON answer from a store read.
fn stored<T: Serialize>(result: Result<T, crate::store::StoreError>) -> Response {
    match result {
        Ok(value) => json(StatusCode::OK, &value),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, e.to_string()),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))
}

/// `POST /admin/bans`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BanBody {
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    /// Seconds; absent for a permanent ban.
    #[serde(default)]
    duration: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /admin/mutes`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MuteBody {
    user: String,
    #[serde(default)]
    duration: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /admin/review/{id}/deny`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    #[serde(default)]
    reason: Option<String>,
}

/// Passes requests with the right bearer token; answers 401 (wrong or
/// missing token) or 404 (no token configured) otherwise.
fn authorized(hub: Arc<Hub>) -> impl Filter<Extract = ((),), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    warp::header::optional::<String>(AUTHORIZATION.as_str()).and_then(move |header: Option<String>| {
        let token = hub.policies().config.admin.token.clone();
        async move {
            if token.is_empty() {
                return Err(warp::reject::not_found());
            }
            let given = header.as_deref().and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
            if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                Ok(())
            } else {
                Err(warp::reject::custom(Unauthorized))
            }
        }
    })
}

/// A request without the right token.
#[derive(Debug)]
pub struct Unauthorized;

impl warp::reject::Reject for Unauthorized {}

/// The answer to [`Unauthorized`]: 401 and nothing else.
pub fn unauthorized() -> Response {
    let mut response = plain(StatusCode::UNAUTHORIZED, "unauthorized");
    response.headers_mut().insert(WWW_AUTHENTICATE, http::HeaderValue::from_static("Bearer"));
    response
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    response
}

fn plain(status: StatusCode, body: &'static str) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
}

/// An error answer: `{"error": "<code>", "message": "<text>"}`.
fn error(status: StatusCode, code: ErrorCode, message: String) -> Response {
    json(status, &serde_json::json!({"error": code.as_str(), "message": message}))
}

/// `400` for a malformed request.
fn bad_request(message: String) -> Response {
    error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
    }
}
