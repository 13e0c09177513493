//! The admin HTTP API under `/admin/`, documented in `docs/admin-api.md`.
//!
//! Every request needs `Authorization: Bearer <admin.token>`; the token is
//! compared in constant time. A wrong or missing token gets 401 and nothing
//! else; with no token configured the API does not exist (404).

use std::convert::Infallible;
use std::sync::Arc;

use http::StatusCode;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use serde::Serialize;
use warp::Filter;
use warp::reply::Response;

use crate::hub::Hub;

/// The admin routes.
pub fn routes(
    hub: Arc<Hub>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let authorized = authorized(hub.clone());
    let status_hub = hub.clone();
    let reload_status = warp::get().map(move || json(StatusCode::OK, &status_hub.reloader().status()));
    let reload = warp::post().and_then(move || {
        let hub = hub.clone();
        async move {
            let reloader = hub.reloader().clone();
            let status = tokio::task::spawn_blocking(move || reloader.reload()).await;
            Ok::<_, Infallible>(match status {
                Ok(status) => json(StatusCode::OK, &Some(status)),
                Err(_) => plain(StatusCode::INTERNAL_SERVER_ERROR, "the reload failed unexpectedly"),
            })
        }
    });
    warp::path("admin")
        .and(authorized)
        .and(warp::path("reload").and(warp::path::end()).and(reload_status.or(reload).unify()))
        .map(|(), response| response)
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
