//! Running the server: the accept loop, the sweeper, and shutdown.
//!
//! warp's own `serve()` sets no header-read timeout, so connections are
//! accepted here and each is served by hyper's HTTP/1 connection with the
//! warp routes as its service.

use std::future::Future;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::admission::Admission;
use crate::config::Config;
use crate::hub::Hub;
use crate::transport::{self, Peer, UpgradeSlot};

/// A configured Wardroom server, ready to run on a listener.
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let server = wardroom::Server::new(wardroom::config::Config::default());
/// server.run(listener, async { let _ = tokio::signal::ctrl_c().await; }).await
/// # }
/// ```
#[derive(Debug)]
pub struct Server {
    /// The configuration to run with.
    config: Arc<Config>,
}

impl Server {
    /// A server with this configuration.
    pub fn new(config: Config) -> Self {
        Self { config: Arc::new(config) }
    }

    /// Serves on `listener` until `shutdown` resolves, then closes every
    /// client with 1001 (after what is queued for it), waits up to the
    /// shutdown grace period, and returns.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let addr = listener.local_addr()?;
        let hub = Arc::new(Hub::new(self.config.clone()));
        let admission = Arc::new(Admission::new(&self.config.server));
        let sweeper = tokio::spawn(sweep(hub.clone()));
        let accept =
            tokio::spawn(accept_loop(listener, hub.clone(), admission, self.config.server.header_read_timeout));
        tracing::info!(%addr, "listening");

        shutdown.await;
        let grace = self.config.timeouts.shutdown_grace;
        tracing::info!(clients = hub.client_count(), ?grace, "shutting down");
        hub.close_all();
        if tokio::time::timeout(grace, hub.wait_empty()).await.is_err() {
            tracing::warn!(clients = hub.client_count(), "grace period over; dropping remaining clients");
            hub.abort_all();
            hub.wait_empty().await;
        }
        accept.abort();
        sweeper.abort();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Runs the hub's deadline sweeps for as long as the server runs.
async fn sweep(hub: Arc<Hub>) {
    loop {
        let pause = hub.sweep();
        tokio::time::sleep(pause).await;
    }
}

/// Accepts connections and serves HTTP on each. Dropping this future (on
/// shutdown) drops every connection still speaking HTTP; upgraded
/// connections live in their own tasks, owned by the hub.
async fn accept_loop(listener: TcpListener, hub: Arc<Hub>, admission: Arc<Admission>, header_read_timeout: Duration) {
    let routes = warp::service(transport::routes(hub.clone(), admission.clone()));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => match admission.admit(addr.ip()) {
                    Ok(ticket) => {
                        let peer = Peer { addr, ticket: Arc::new(Mutex::new(Some(ticket))) };
                        connections.spawn(serve_http(stream, peer, header_read_timeout, routes.clone()));
                    }
                    Err(refusal) => {
                        hub.metrics.refused(refusal);
                        tracing::debug!(%addr, reason = refusal.as_str(), "connection refused");
                    }
                },
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Serves HTTP/1 on one connection, with upgrades.
async fn serve_http<S>(stream: TcpStream, peer: Peer, header_read_timeout: Duration, routes: S)
where
    S: tower_service::Service<
            http::Request<Incoming>,
            Response = warp::reply::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let addr = peer.addr;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    let service = service_fn(move |mut request: http::Request<Incoming>| {
        if request.headers().contains_key(http::header::UPGRADE) {
            let on_upgrade = hyper::upgrade::on(&mut request);
            request.extensions_mut().insert(UpgradeSlot::new(on_upgrade));
        }
        request.extensions_mut().insert(peer.clone());
        routes.clone().call(request)
    });
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    if let Err(e) = connection.await {
        tracing::debug!(peer = %addr, error = %e, "http connection ended with an error");
    }
}
