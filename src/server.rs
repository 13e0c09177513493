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
use std::path::PathBuf;

use wardroom_plugin_api::Registry;

use crate::cluster::Cluster;
use crate::config::{Config, Problem, Problems};
use crate::filters;
use crate::hub::Hub;
use crate::pipeline::FilterStates;
use crate::policy::{self, Policies, Reloader};
use crate::store::Store;
use crate::transport::{self, Peer, UpgradeSlot};

/// A configured Wardroom server, ready to run on a listener.
///
/// Built with [`Server::builder`], which is where plugin crates register
/// their filters:
///
/// ```no_run
/// # async fn example() -> anyhow::Result<()> {
/// # fn my_plugin_register(_: &mut wardroom_plugin_api::Registry) {}
/// let server = wardroom::Server::builder()
///     .register(my_plugin_register)
///     .load_file("config.toml")?;
/// let listener = tokio::net::TcpListener::bind(server.config().server.bind).await?;
/// server.run(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Server {
    /// The running policies, and how to reload them.
    reloader: Arc<Reloader>,
}

/// Builds a [`Server`]: registers filter kinds, then loads the config.
#[derive(Debug)]
pub struct ServerBuilder {
    registry: Registry,
}

impl Server {
    /// A builder that knows the built-in filters.
    pub fn builder() -> ServerBuilder {
        let mut registry = Registry::new();
        filters::register(&mut registry);
        ServerBuilder { registry }
    }

    /// The configuration the server starts with.
    pub fn config(&self) -> Config {
        self.reloader.current().config.clone()
    }

    /// Lets config reloads change the level of the log output installed
    /// with [`crate::logging::init`].
    pub fn with_log_level(self, level: crate::logging::LogLevel) -> Self {
        self.reloader.control_log_level(level);
        self
    }

    /// The policies (config and built filters) the server starts with.
    pub fn policies(&self) -> Arc<Policies> {
        self.reloader.current().clone()
    }

    /// Serves on `listener` until `shutdown` resolves, then closes every
    /// client with 1001 (after what is queued for it), waits up to the
    /// shutdown grace period, and returns.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()>) -> io::Result<()> {
        let addr = listener.local_addr()?;
        let config = self.config();
        let store: Arc<dyn Store> = crate::store::open(&config.store).map_err(io::Error::other)?;
        let cluster = config.cluster.as_ref().map(Cluster::new).transpose().map_err(io::Error::other)?;
        let hub = Hub::new(self.reloader.clone(), store, cluster.clone()).map_err(io::Error::other)?;
        if let Some(cluster) = &cluster {
            cluster.start(&hub);
            tracing::info!(node = cluster.node(), "joining the cluster");
        }
        let admission = Arc::new(Admission::new(&config.server));
        let sweeper = tokio::spawn(sweep(hub.clone()));
        let watcher = tokio::spawn(policy::watch(self.reloader.clone()));
        let accept = tokio::spawn(accept_loop(listener, hub.clone(), admission, config.server.header_read_timeout));
        tracing::info!(%addr, filters = ?hub.policies().pipeline, "listening");

        shutdown.await;
        let grace = hub.policies().config.timeouts.shutdown_grace;
        tracing::info!(clients = hub.client_count(), ?grace, "shutting down");
        hub.close_all();
        if tokio::time::timeout(grace, hub.wait_empty()).await.is_err() {
            tracing::warn!(clients = hub.client_count(), "grace period over; dropping remaining clients");
            hub.abort_all();
            hub.wait_empty().await;
        }
        accept.abort();
        watcher.abort();
        sweeper.abort();
        if let Some(cluster) = hub.cluster() {
            cluster.stop().await;
        }
        tracing::info!("stopped");
        Ok(())
    }
}

impl ServerBuilder {
    /// Registers filter kinds, typically a plugin crate's `register`.
    pub fn register(mut self, plugin: impl FnOnce(&mut Registry)) -> Self {
        plugin(&mut self.registry);
        self
    }

    /// The registered filter kinds.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Loads and checks the config file (every problem is reported); the
    /// running server reloads it when it changes or on SIGHUP.
    pub fn load_file(self, path: impl Into<PathBuf>) -> Result<Server, Problems> {
        let path = path.into();
        let text = std::fs::read_to_string(&path).map_err(|e| Problems {
            path: path.clone(),
            problems: vec![Problem { line: 1, column: 1, key: None, message: format!("cannot read the file: {e}") }],
        })?;
        let (policies, states) = Policies::build(&text, &self.registry, &FilterStates::new())
            .map_err(|problems| Problems { path: path.clone(), problems })?;
        Ok(Server { reloader: Arc::new(Reloader::new(policies, states, self.registry, Some(path), text)) })
    }

    /// A server with a fixed configuration (no file to reload).
    pub fn with_config(self, config: Config) -> Result<Server, Problems> {
        let (policies, states) = Policies::from_config(config, &self.registry)
            .map_err(|problems| Problems { path: PathBuf::new(), problems })?;
        Ok(Server { reloader: Arc::new(Reloader::new(policies, states, self.registry, None, String::new())) })
    }
}

/// Runs the hub's deadline sweeps and the filters' housekeeping for as long
/// as the server runs.
async fn sweep(hub: Arc<Hub>) {
    const HOUSEKEEPING: Duration = Duration::from_secs(5);
    let mut last_housekeeping = tokio::time::Instant::now();
    loop {
        let pause = hub.sweep();
        if last_housekeeping.elapsed() >= HOUSEKEEPING {
            let policies = hub.policies();
            policies.pipeline.housekeeping();
            hub.moderation.prune(crate::protocol::now_ms(), policies.config.moderation.strike_decay);
            last_housekeeping = tokio::time::Instant::now();
        }
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
                // `::ffff:a.b.c.d` on a dual-stack listener is the IPv4 client
                // a.b.c.d: its bans, caps and logs use that address.
                Ok((stream, addr)) => match admission.admit(addr.ip().to_canonical()) {
                    Ok(ticket) => {
                        let addr = std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port());
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
        // hyper upgrades HTTP/1.1 only; an HTTP/1.0 request gets no slot,
        // and so a 400 instead of a 101 on a connection that then ends.
        if request.version() == http::Version::HTTP_11 && request.headers().contains_key(http::header::UPGRADE) {
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
