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
        .and(warp::body::content_length_limit(MAX_BODY))
        .and(warp::body::bytes())
        .then(move |(), method: Method, tail: warp::path::Tail, query: String, body: bytes::Bytes| {
            let hub = hub.clone();
            async move {
                let segments: Vec<&str> = tail.as_str().split('/').filter(|s| !s.is_empty()).collect();
                handle(&hub, &method, &segments, &query, &body).await
            }
        })
}

/// Dispatches one admin request.
async fn handle(hub: &Arc<Hub>, method: &Method, path: &[&str], query: &str, body: &[u8]) -> Response {
    let params: HashMap<String, String> = serde_urlencoded::from_str(query).unwrap_or_default();
    match (method.as_str(), path) {
        ("GET", ["reload"]) => json(StatusCode::OK, &hub.reloader().status()),
        ("POST", ["reload"]) => {
            let reloader = hub.reloader().clone();
            match tokio::task::spawn_blocking(move || reloader.reload()).await {
                Ok(status) => json(StatusCode::OK, &status),
                Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "the reload failed unexpectedly"),
            }
        }
        ("GET", ["rooms"]) => json(StatusCode::OK, &hub.room_overview()),
        ("GET", ["bans"]) => {
            let active = params.get("all").is_none_or(|v| v != "true");
            stored(hub.store().bans(active.then(now_ms)))
        }
        ("POST", ["bans"]) => match parse::<BanBody>(body) {
            Ok(b) => act(hub, Request::Ban { user: b.user, ip: b.ip, duration: b.duration, reason: b.reason }).await,
            Err(message) => plain_owned(StatusCode::BAD_REQUEST, message),
        },
        ("DELETE", ["bans", id]) => match id.parse::<i64>() {
            Ok(id) => act(hub, Request::Unban { user: None, ip: None, ban: Some(id) }).await,
            Err(_) => plain(StatusCode::BAD_REQUEST, "a ban id is a number"),
        },
        ("GET", ["mutes"]) => json(StatusCode::OK, &hub.moderation.mutes(now_ms())),
        ("POST", ["mutes"]) => match parse::<MuteBody>(body) {
            Ok(m) => act(hub, Request::Mute { user: m.user, duration: m.duration, reason: m.reason }).await,
            Err(message) => plain_owned(StatusCode::BAD_REQUEST, message),
        },
        ("DELETE", ["mutes", user]) => act(hub, Request::Unmute { user: (*user).to_owned() }).await,
        ("GET", ["review"]) => {
            let status = match params.get("status").map(String::as_str) {
                None => Some(ReviewStatus::Pending),
                Some("all") => None,
                Some(name) => match ReviewStatus::parse(name) {
                    Some(status) => Some(status),
                    None => return plain_owned(StatusCode::BAD_REQUEST, format!("unknown status {name:?}")),
                },
            };
            stored(hub.store().review_items(status))
        }
        ("POST", ["review", id, decision @ ("approve" | "deny")]) => {
            let Ok(item) = id.parse::<i64>() else {
                return plain(StatusCode::BAD_REQUEST, "a review item id is a number");
            };
            let reason = parse::<DecisionBody>(body).ok().and_then(|b| b.reason);
            let request =
                if *decision == "approve" { Request::Approve { item } } else { Request::Deny { item, reason } };
            act(hub, request).await
        }
        ("GET", ["audit"]) => {
            let number = |key: &str| params.get(key).and_then(|v| v.parse::<i64>().ok());
            let query = AuditQuery {
                actor: params.get("actor").cloned(),
                target: params.get("target").cloned(),
                room: params.get("room").cloned(),
                before: number("before"),
                limit: number("limit").map_or(100, |n| n.clamp(1, 1000) as usize),
            };
            stored(hub.store().audit(&query))
        }
        _ => plain(StatusCode::NOT_FOUND, "no such admin endpoint; see docs/admin-api.md"),
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
            json(status, &serde_json::json!({"error": error.code.as_str(), "message": error.message}))
        }
    }
}

/// A JSON answer from a store read.
fn stored<T: Serialize>(result: Result<T, crate::store::StoreError>) -> Response {
    match result {
        Ok(value) => json(StatusCode::OK, &value),
        Err(e) => plain_owned(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
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

fn plain_owned(status: StatusCode, body: String) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
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
