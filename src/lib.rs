//! Wardroom: a WebSocket chat server for moderated communities.
//!
//! Start a server from an already-bound listener and a shutdown future, so
//! that tests can bind port 0:
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let server = wardroom::Server::builder().load_file("config.toml")?;
//! let listener = tokio::net::TcpListener::bind(server.config().server.bind).await?;
//! server.run(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//!
//! - [`config`]: the TOML schema, and loading it with every problem reported
//!   at its line and column.
//! - [`policy`]: the running config and pipeline as one snapshot, and the
//!   one reload path (file watcher and SIGHUP).
//! - [`pipeline`]: the `[[filters]]`, built through the plugin registry and
//!   run in order, with shadow mode, room scopes and exempt roles.
//! - [`filters`]: the built-in filters (origin, size, rate, profanity, slow mode).
//! - [`server`]: the accept loop (hyper HTTP/1 with a header-read timeout),
//!   the deadline sweeper, and shutdown.
//! - [`admission`]: connection caps (global, per address) and the client
//!   address behind trusted proxies.
//! - [`logging`]: the log output from `[log]`, its level changed by reloads.
//! - [`metrics`]: counters and the `/metrics` text.
//! - [`admin`]: the admin HTTP API (bearer token).
//! - [`web`]: the browser client's files, built in, served at `/`.
//! - [`transport`]: the warp routes (`/ws`, `/healthz`, `/readyz`) and the
//!   WebSocket upgrade, plus `/metrics`.
//! - [`connection`]: one upgraded connection: reader and writer over the raw socket.
//! - [`ws`]: the WebSocket protocol: handshake, frame encoding and parsing.
//! - [`protocol`]: the JSON frames of protocol v1 and the error codes.
//! - [`hub`]: rooms, nicknames, presence, message ids and fan-out.
//! - [`cluster`]: several nodes as one server over a Redis broker: message
//!   ids and delivery, presence, moderation effects, heartbeats.
//! - [`moderation`]: bans, mutes, strikes and the ladder, room locks and slow
//!   mode, the review queue, reports, deletion, and the audit log.
//! - [`outbox`]: one client's bounded queue of outgoing frames.
//! - [`client`]: one connected client as the hub sees it.
//! - [`identity`]: tokens (JWT), roles, and the look-alike nickname check.
//! - [`names`]: nickname and room-name rules.
//! - [`store`]: durable state behind the `Store` trait; SQLite by default.
//! - [`replay`]: `wardroom replay`, messages through the pipeline offline.

pub mod admin;
pub mod admission;
pub mod client;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod filters;
pub mod hub;
pub mod identity;
pub mod logging;
pub mod metrics;
pub mod moderation;
pub mod names;
pub mod outbox;
pub mod pipeline;
pub mod policy;
pub mod protocol;
pub mod replay;
pub mod server;
pub mod store;
pub mod transport;
pub mod web;
pub mod ws;

pub use server::Server;

/// Locks a mutex, ignoring poisoning: every critical section in this crate
/// leaves its data consistent at each step, so a panic elsewhere does not
/// make the data unusable.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
