//! HTTP routes, served by warp: `/ws` (the WebSocket upgrade), `/healthz`,
//! `/readyz`, `/metrics`, and the admin API ([`crate::admin`]).
//!
//! warp does the routing; the upgrade itself is finished here (see
//! `docs/design.md`): the handshake is answered with `101`, and once hyper
//! hands the socket back, the raw `TcpStream` goes to [`crate::connection`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::header::{CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_VERSION, UPGRADE};
use http::{HeaderMap, HeaderValue, StatusCode};
use hyper::upgrade::OnUpgrade;
use serde::Deserialize;
use warp::Filter;
use warp::reply::Response;

use crate::admin;
use crate::admission::{Admission, Ticket};
use crate::hub::{self, Hub};
use crate::lock;
use crate::ws::handshake::{self, HandshakeError};
use wardroom_plugin_api::Connection;

/// The pending upgrade of a request, put in its extensions by the accept
/// loop (warp's own filters take only `Clone` extensions).
#[derive(Clone, Default)]
pub struct UpgradeSlot(Arc<Mutex<Option<OnUpgrade>>>);

impl UpgradeSlot {
    /// Wraps a request's pending upgrade.
    pub fn new(on_upgrade: OnUpgrade) -> Self {
        Self(Arc::new(Mutex::new(Some(on_upgrade))))
    }

    fn take(&self) -> Option<OnUpgrade> {
        lock(&self.0).take()
    }
}

/// The TCP connection a request arrived on, put in request extensions by the
/// accept loop: the peer's address and the connection's admission ticket,
/// which an upgrade takes over for the life of the WebSocket.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The socket's peer address.
    pub addr: SocketAddr,
    /// The admission ticket, until an upgrade takes it.
    pub ticket: Arc<Mutex<Option<Ticket>>>,
}

/// Query parameters of `/ws`.
#[derive(Debug, Default, Deserialize)]
struct WsQuery {
    /// Requested nickname.
    nick: Option<String>,
    /// A signed token (JWT) identifying the user.
    token: Option<String>,
}

/// Every route of the server.
pub fn routes(
    hub: Arc<Hub>,
    admission: Arc<Admission>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let admin_hub = hub.clone();
    let metrics_hub = hub.clone();
    let metrics_admission = admission.clone();
    let metrics = warp::path("metrics").and(warp::path::end()).map(move || {
        let body = metrics_hub.metrics.render(&metrics_hub.snapshot(metrics_admission.open()));
        let mut response = Response::new(body.into());
        response
            .headers_mut()
            .insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
        response
    });

    let healthz = warp::path("healthz").and(warp::path::end()).map(|| plain(StatusCode::OK, "ok"));

    let web_hub = hub.clone();
    let web = warp::path::tail().and_then(move |tail: warp::path::Tail| {
        let enabled = web_hub.policies().config.web.enabled;
        async move {
            match crate::web::asset(tail.as_str()).filter(|_| enabled) {
                Some(asset) => Ok(asset.response()),
                None => Err(warp::reject::not_found()),
            }
        }
    });

    let ready_hub = hub.clone();
    let readyz = warp::path("readyz").and(warp::path::end()).map(move || match ready_hub.not_ready() {
        Some(why) => plain(StatusCode::SERVICE_UNAVAILABLE, why),
        None => plain(StatusCode::OK, "ready"),
    });

    let ws = warp::path("ws")
        .and(warp::path::end())
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::query::<WsQuery>().or(warp::any().map(WsQuery::default)).unify())
        .and(warp::ext::optional::<UpgradeSlot>())
        .and(warp::ext::get::<Peer>())
        .map(move |headers: HeaderMap, query: WsQuery, slot: Option<UpgradeSlot>, peer: Peer| {
            upgrade(&hub, &admission, &headers, query, slot, peer)
        });

    warp::get()
        .and(healthz.or(readyz).unify().or(metrics).unify().or(ws).unify().or(web).unify())
        .or(admin::routes(admin_hub))
        .unify()
        .recover(|rejection: warp::Rejection| async move {
            if rejection.find::<admin::Unauthorized>().is_some() {
                return Ok::<_, Infallible>(admin::unauthorized());
            }
            let status = if rejection.is_not_found() {
                StatusCode::NOT_FOUND
            } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
                StatusCode::METHOD_NOT_ALLOWED
            } else {
                StatusCode::BAD_REQUEST
            };
            Ok(plain(status, status.canonical_reason().unwrap_or("error")))
        })
        .unify()
}

fn plain(status: StatusCode, body: &'static str) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
}

/// Answers an upgrade request and, once hyper hands the socket back, serves
/// the connection.
fn upgrade(
    hub: &Arc<Hub>,
    admission: &Arc<Admission>,
    headers: &HeaderMap,
    query: WsQuery,
    slot: Option<UpgradeSlot>,
    peer: Peer,
) -> Response {
    if hub.is_closing() {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "server shutting down");
    }
    let accept = match handshake::accept(headers) {
        Ok(accept) => accept,
        Err(HandshakeError::Version) => {
            let mut response = plain(StatusCode::UPGRADE_REQUIRED, "only WebSocket version 13 is supported");
            response.headers_mut().insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            return response;
        }
        Err(_) => return plain(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade request"),
    };
    let Some(on_upgrade) = slot.and_then(|slot| slot.take()) else {
        return plain(StatusCode::BAD_REQUEST, "a WebSocket upgrade needs HTTP/1.1");
    };
    let Ok(accept) = HeaderValue::from_str(&accept) else {
        return plain(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade request");
    };

    // Behind a trusted proxy, the per-address limit applies to the
    // forwarded client address, which is known only now.
    let client_ip = admission.client_addr(peer.addr, headers);
    let mut ticket = lock(&peer.ticket).take();
    if admission.is_trusted_proxy(peer.addr.ip())
        && let Some(ticket) = &mut ticket
        && let Err(refusal) = ticket.admit_forwarded(client_ip)
    {
        hub.metrics.refused(refusal);
        *lock(&peer.ticket) = None;
        return plain(StatusCode::TOO_MANY_REQUESTS, "too many connections from your address");
    }

    // Browsers send one Origin; with two, a check of the first alone could
    // be passed with an allowed one in front of the real one.
    if headers.get_all(http::header::ORIGIN).iter().nth(1).is_some() {
        return plain(StatusCode::BAD_REQUEST, "more than one Origin header");
    }
    let origin = headers.get(http::header::ORIGIN).and_then(|v| v.to_str().ok());
    let outcome = hub.policies().pipeline.on_connect(&Connection { addr: client_ip, origin, user_id: None });
    hub.record_outcome(&outcome, client_ip, None);
    if !outcome.verdict.lets_through() {
        let error = hub::refusal(outcome.verdict);
        tracing::debug!(addr = %client_ip, origin = ?origin, code = error.code.as_str(), "connection refused by policy");
        let status =
            if error.code.as_str() == "rate_limited" { StatusCode::TOO_MANY_REQUESTS } else { StatusCode::FORBIDDEN };
        let mut response = Response::new(error.message.into());
        *response.status_mut() = status;
        return response;
    }

    let client = hub.new_client(client_ip);
    let task_client = client.clone();
    let hub = hub.clone();
    let task = tokio::spawn(crate::connection::upgrade(hub, task_client, on_upgrade, query.nick, query.token, ticket));
    client.set_task_if_unset(task.abort_handle());

    let mut response = Response::default();
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let response_headers = response.headers_mut();
    response_headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    response_headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    response_headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
    response
}
