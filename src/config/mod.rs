//! The configuration: one TOML file, its schema, and loading it with every
//! problem reported at its place in the file.
//!
//! Loading is one path used everywhere (start-up, `wardroom check`): parse the
//! text, deserialize it into [`Config`], run the semantic checks, and either
//! return the whole config or every [`Problem`] found.

pub mod duration;
mod load;

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::pipeline::FilterEntry;

pub use duration::parse as parse_duration;
pub use load::{Problem, Problems, load_file, parse, parse_then};

/// The whole configuration file. Every section is optional; a missing key takes
/// the default documented in `docs/configuration.md`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where to listen.
    pub server: ServerConfig,
    /// Size limits enforced by the WebSocket layer and the outbound queues.
    pub limits: LimitsConfig,
    /// Room limits and history.
    pub rooms: RoomsConfig,
    /// Connection deadlines.
    pub timeouts: TimeoutsConfig,
    /// Nickname rules for guests.
    pub nicknames: NicknamesConfig,
    /// Log output.
    pub log: LogConfig,
    /// Identity: guests, tokens, roles.
    pub auth: AuthConfig,
    /// Durable storage.
    pub store: StoreConfig,
    /// Strikes, the escalation ladder and default sanctions.
    pub moderation: crate::moderation::ModerationConfig,
    /// The admin HTTP API.
    pub admin: AdminConfig,
    /// The browser client served at `/`.
    pub web: WebConfig,
    /// How config changes are picked up.
    pub reload: ReloadConfig,
    /// Several nodes as one chat server, over a Redis broker; absent for a
    /// single node (the default). Changing it needs a restart.
    pub cluster: Option<ClusterConfig>,
    /// The policy pipeline, in run order.
    pub filters: Vec<FilterEntry>,
}

/// `[auth]`: who may connect and as whom.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether clients without a token may connect, with a nickname.
    pub guests: bool,
    /// Shared secret for HS256 tokens (empty: HS256 tokens are refused).
    pub jwt_secret: String,
    /// PEM file with the RSA public key for RS256 tokens.
    pub jwt_public_key: Option<std::path::PathBuf>,
    /// Required `iss` claim, if set.
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim, if set.
    pub jwt_audience: Option<String>,
    /// Roles granted to user ids: `"user-42" = ["moderator"]`.
    pub roles: std::collections::BTreeMap<String, Vec<String>>,
    /// Names guests may not use, nor anything that looks like them.
    pub reserved_nicks: Vec<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            guests: true,
            jwt_secret: String::new(),
            jwt_public_key: None,
            jwt_issuer: None,
            jwt_audience: None,
            roles: Default::default(),
            reserved_nicks: ["admin", "administrator", "moderator", "mod", "staff", "system", "root", "wardroom"]
                .into_iter()
                .map(str::to_owned)
                .collect(),
        }
    }
}

/// `[store]`: where history, bans, mutes, the review queue and the audit
/// log are kept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The SQLite database file (created on first run, with its directory).
    pub path: std::path::PathBuf,
    /// A PostgreSQL database (`postgres://user@host:5432/dbname`) instead of
    /// the SQLite file; set `path` or `url`, not both.
    pub url: Option<String>,
    /// `full`: every commit is on disk before it is acknowledged (survives
    /// power loss); `normal`: commits survive a crash of the process but
    /// maybe not of the machine.
    pub synchronous: Synchronous,
    /// Messages kept per room (older ones are deleted); 0 keeps all.
    pub retain_per_room: u64,
    /// Messages older than this are deleted; absent keeps them forever.
    #[serde(default, with = "duration::optional")]
    pub retain_for: Option<Duration>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: std::path::PathBuf::from("wardroom.db"),
            url: None,
            synchronous: Synchronous::Full,
            retain_per_room: 10_000,
            retain_for: None,
        }
    }
}

impl StoreConfig {
    /// Checks of `[store]` that need to know which keys the file sets
    /// (`present("store.path")`); `(dotted key, message)` for each problem.
    fn problems(&self, present: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if let Some(url) = &self.url {
            if present("store.path") {
                problems.push((
                    "store.url".to_owned(),
                    "cannot be set together with store.path: set path for SQLite or url for PostgreSQL".to_owned(),
                ));
            }
            if let Err(message) = crate::store::postgres::parse_url(url) {
                problems.push(("store.url".to_owned(), message));
            }
        }
        problems
    }
}

/// SQLite's `synchronous` setting, as offered in `[store]`; with PostgreSQL,
/// `normal` turns `synchronous_commit` off for the writer's session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync at every commit.
    Full,
    /// fsync at checkpoints only (WAL): safe against process crashes.
    Normal,
}

/// `[cluster]`: this node is one of several sharing rooms, presence and
/// moderation through a Redis broker (and one PostgreSQL store).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The Redis server every node uses: `redis://host:6379` (or
    /// `redis://:password@host:6379/0`).
    pub broker: String,
    /// Namespace of every key and channel this cluster uses, so several
    /// clusters can share one Redis.
    pub prefix: String,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self { broker: String::new(), prefix: "wardroom".to_owned() }
    }
}

impl ClusterConfig {
    /// Problems with `[cluster]` given the rest of the config, as
    /// `(dotted key, message)`.
    fn problems(&self, store: &StoreConfig) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        if self.broker.is_empty() {
            problems.push((
                "cluster".to_owned(),
                "a cluster needs a broker: set [cluster] broker = \"redis://host:6379\"".to_owned(),
            ));
        } else if let Err(e) = redis::Client::open(self.broker.as_str()) {
            problems.push(("cluster.broker".to_owned(), format!("is not a Redis URL (redis://host:port): {e}")));
        }
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':');
        if self.prefix.is_empty() || self.prefix.len() > 64 || !self.prefix.chars().all(allowed) {
            problems.push((
                "cluster.prefix".to_owned(),
                format!("must be 1 to 64 letters, digits, `_`, `-`, `.` or `:`, got {:?}", self.prefix),
            ));
        }
        if store.url.is_none() {
            problems.push((
                "cluster".to_owned(),
                "a cluster needs a shared store: set [store] url = \"postgres://…\" (every node uses the same database)"
                    .to_owned(),
            ));
        }
        problems
    }
}

/// `[web]`: the chat page served at `/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebConfig {
    /// Serve the web client (its files are built into the binary).
    pub enabled: bool,
}

impl Default for WebConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// `[reload]`: how a running server picks up config changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// Reload when the file changes; when false, only on SIGHUP or
    /// `POST /admin/reload`. Changing it needs a restart.
    pub watch: bool,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self { watch: true }
    }
}

/// `[admin]`: the admin HTTP API under `/admin/`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token for `/admin/` requests; the admin API is off when empty.
    pub token: String,
}

/// `[server]`: the listening socket and who may connect to it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port to listen on. Changing it needs a restart.
    pub bind: SocketAddr,
    /// Runtime worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// Most TCP connections open at once (HTTP and WebSocket).
    pub max_connections: usize,
    /// Most connections open at once from one client address.
    pub max_connections_per_ip: u32,
    /// How long a client may take to send a request's headers.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    /// Proxies whose `X-Forwarded-For` header gives the client address:
    /// addresses (`"10.0.0.7"`) or networks (`"10.0.0.0/8"`).
    #[serde(deserialize_with = "ip_networks")]
    pub trusted_proxies: Vec<IpNet>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            workers: 0,
            max_connections: 16_384,
            max_connections_per_ip: 128,
            header_read_timeout: Duration::from_secs(10),
            trusted_proxies: Vec::new(),
        }
    }
}

/// Parses a list of addresses or networks into networks, each element on
/// its own, so that every wrong one is reported at its place.
fn ip_networks<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    /// One element: an address or a network.
    struct Network(IpNet);

    impl<'de> Deserialize<'de> for Network {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            // A visitor, so that the error is raised while the element is
            // read and carries the element's place in the file.
            struct Visitor;
            impl serde::de::Visitor<'_> for Visitor {
                type Value = Network;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("an IP address or a network such as \"10.0.0.0/8\"")
                }
                fn visit_str<E: serde::de::Error>(self, entry: &str) -> Result<Network, E> {
                    entry
                        .parse::<IpNet>()
                        .or_else(|_| entry.parse::<std::net::IpAddr>().map(IpNet::from))
                        .map(Network)
                        .map_err(|_| {
                            E::custom(format!(
                                "{entry:?} is neither an IP address nor a network such as \"10.0.0.0/8\""
                            ))
                        })
                }
            }
            deserializer.deserialize_str(Visitor)
        }
    }

    Ok(Vec::<Network>::deserialize(deserializer)?.into_iter().map(|network| network.0).collect())
}

/// Smallest `limits.outbound_queue`: the two frames a message is answered
/// with (its echo and its `ack`) must fit in the queue together, since the
/// writer may not have taken the first when the second arrives.
pub const MIN_OUTBOUND_QUEUE: usize = 2;

/// Most `limits.outbound_queue_bytes` (1 GiB).
pub const MAX_OUTBOUND_QUEUE_BYTES: usize = 1 << 30;

/// Room for a message's echo around its content (room, nick, user id,
/// ids, the frame header) and for its `ack`: `limits.outbound_queue_bytes`
/// must hold two largest messages and this much more (see
/// [`LimitsConfig::min_outbound_queue_bytes`]).
const OUTBOUND_REPLY_SLACK: usize = 4096;

/// `[limits]`: sizes, enforced before anything is buffered whole.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest single WebSocket frame a client may send, in bytes.
    pub max_frame_bytes: usize,
    /// Largest WebSocket message (all fragments together), in bytes.
    pub max_message_bytes: usize,
    /// Frames that may wait for one client before it is closed as a slow consumer.
    pub outbound_queue: usize,
    /// Bytes that may wait for one client before it is closed as a slow
    /// consumer (a single frame is always let in, however large).
    pub outbound_queue_bytes: usize,
    /// Requests other than messages (`join`, `leave`, `nick`, `history`,
    /// `report`, a member's moderation requests) one connection may make
    /// per minute, sustained; 0 for no limit.
    pub requests_per_minute: u32,
    /// How many of those requests may come at once.
    pub requests_burst: u32,
}

impl LimitsConfig {
    /// Smallest `outbound_queue_bytes` for these limits. The reader pauses
    /// at half the budget, so one message's replies (its echo, up to
    /// `max_message_bytes` plus the envelope, and its `ack`) must fit in
    /// the other half.
    pub fn min_outbound_queue_bytes(&self) -> usize {
        2 * (self.max_message_bytes + OUTBOUND_REPLY_SLACK)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 16 * 1024,
            max_message_bytes: 16 * 1024,
            outbound_queue: 1024,
            outbound_queue_bytes: 4 * 1024 * 1024,
            requests_per_minute: 120,
            requests_burst: 40,
        }
    }
}

/// `[rooms]`: how many rooms, how big, and how much history each keeps.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Rooms that may exist at once.
    pub max_rooms: usize,
    /// Members one room may hold.
    pub max_members: usize,
    /// Rooms one connection may be in at once.
    pub max_rooms_per_connection: usize,
    /// Longest room name, in characters.
    pub max_name_chars: usize,
    /// Messages a room keeps for `joined` and `history`.
    pub history_kept: usize,
    /// Messages sent in `joined`.
    pub history_on_join: usize,
    /// Largest page a `history` request returns.
    pub history_page_max: usize,
    /// Rooms larger than this send no presence events and list only this many
    /// members in `joined`, so that a crowd joining does not cost O(n²) frames.
    pub presence_max_members: usize,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            max_rooms: 10_000,
            max_members: 20_000,
            max_rooms_per_connection: 20,
            max_name_chars: 64,
            history_kept: 1_000,
            history_on_join: 50,
            history_page_max: 200,
            presence_max_members: 1_000,
        }
    }
}

/// `[timeouts]`: deadlines, written as `"10s"`, `"500ms"`, `"2m"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// A client must send its first frame within this time of the upgrade.
    #[serde(with = "duration")]
    pub first_frame: Duration,
    /// The server pings a client that has been quiet for this long.
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// A client from which nothing (not even a pong) arrives for this long is closed.
    #[serde(with = "duration")]
    pub idle: Duration,
    /// How long a closing connection may take to finish the close handshake.
    #[serde(with = "duration")]
    pub close: Duration,
    /// On shutdown, how long clients get to receive what is queued for them.
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            first_frame: Duration::from_secs(10),
            ping_interval: Duration::from_secs(30),
            idle: Duration::from_secs(75),
            close: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// `[nicknames]`: what a guest may call themselves.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NicknamesConfig {
    /// Shortest nickname, in characters.
    pub min_chars: usize,
    /// Longest nickname, in characters.
    pub max_chars: usize,
}

impl Default for NicknamesConfig {
    fn default() -> Self {
        Self { min_chars: 2, max_chars: 24 }
    }
}

/// `[log]`: log format and default level.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `pretty` for people, `json` for log collectors.
    pub format: LogFormat,
    /// Filter used when `RUST_LOG` is not set, e.g. `info` or `wardroom=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, level: "info".to_owned() }
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

impl Config {
    /// The files this config names and is built from (today only
    /// `[auth] jwt_public_key`), so that a reload notices when one of them
    /// changes even though the config text did not. The store's database is
    /// not one: it is data, and `[store]` needs a restart anyway.
    pub fn referenced_files(&self) -> Vec<&std::path::Path> {
        self.auth.jwt_public_key.iter().map(std::path::PathBuf::as_path).collect()
    }

    /// Semantic checks that serde cannot express: ranges and relations between
    /// keys. Returns `(dotted key, message)` for every violation.
    fn semantic_problems(&self) -> Vec<(String, String)> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, key: &str, message: String| {
            if !ok {
                problems.push((key.to_owned(), message));
            }
        };
        let server = &self.server;
        check(
            server.workers <= 1024,
            "server.workers",
            format!("must be at most 1024 (0 = one per core), got {}", server.workers),
        );
        check(
            server.max_connections >= 1,
            "server.max_connections",
            format!("must be at least 1, got {}", server.max_connections),
        );
        check(
            server.max_connections_per_ip >= 1,
            "server.max_connections_per_ip",
            format!("must be at least 1, got {}", server.max_connections_per_ip),
        );
        check(
            server.header_read_timeout >= Duration::from_millis(10),
            "server.header_read_timeout",
            format!("must be at least 10ms, got {:?}", server.header_read_timeout),
        );
        let limits = &self.limits;
        check(
            (16..=16 * 1024 * 1024).contains(&limits.max_frame_bytes),
            "limits.max_frame_bytes",
            format!("must be between 16 and 16777216, got {}", limits.max_frame_bytes),
        );
        check(
            (16..=64 * 1024 * 1024).contains(&limits.max_message_bytes),
            "limits.max_message_bytes",
            format!("must be between 16 and 67108864, got {}", limits.max_message_bytes),
        );
        check(
            limits.max_message_bytes >= limits.max_frame_bytes,
            "limits.max_message_bytes",
            format!(
                "must be at least limits.max_frame_bytes ({}), got {}",
                limits.max_frame_bytes, limits.max_message_bytes
            ),
        );
        check(
            (MIN_OUTBOUND_QUEUE..=1_000_000).contains(&limits.outbound_queue),
            "limits.outbound_queue",
            format!(
                "must be between {MIN_OUTBOUND_QUEUE} and 1000000 (a message is answered with its echo and its `ack`, \
                 and the queue must hold both), got {}",
                limits.outbound_queue
            ),
        );
        let min_bytes = limits.min_outbound_queue_bytes();
        check(
            (min_bytes..=MAX_OUTBOUND_QUEUE_BYTES).contains(&limits.outbound_queue_bytes),
            "limits.outbound_queue_bytes",
            format!(
                "must be between {min_bytes} (twice limits.max_message_bytes plus {}: a message's echo and its \
                 `ack` must fit in half the budget) and {MAX_OUTBOUND_QUEUE_BYTES}, got {}",
                2 * OUTBOUND_REPLY_SLACK,
                limits.outbound_queue_bytes
            ),
        );
        check(
            limits.requests_per_minute <= 60_000,
            "limits.requests_per_minute",
            format!("must be at most 60000 (0 for no limit), got {}", limits.requests_per_minute),
        );
        check(
            limits.requests_burst >= 1,
            "limits.requests_burst",
            format!("must be at least 1, got {}", limits.requests_burst),
        );

        let rooms = &self.rooms;
        for (key, value) in [
            ("rooms.max_rooms", rooms.max_rooms),
            ("rooms.max_members", rooms.max_members),
            ("rooms.max_rooms_per_connection", rooms.max_rooms_per_connection),
            ("rooms.max_name_chars", rooms.max_name_chars),
            ("rooms.history_page_max", rooms.history_page_max),
        ] {
            check(value >= 1, key, format!("must be at least 1, got {value}"));
        }
        check(
            rooms.history_on_join <= rooms.history_kept,
            "rooms.history_on_join",
            format!("must not exceed rooms.history_kept ({}), got {}", rooms.history_kept, rooms.history_on_join),
        );

        let t = &self.timeouts;
        for (key, value) in [
            ("timeouts.first_frame", t.first_frame),
            ("timeouts.ping_interval", t.ping_interval),
            ("timeouts.idle", t.idle),
            ("timeouts.close", t.close),
        ] {
            check(value >= Duration::from_millis(10), key, format!("must be at least 10ms, got {value:?}"));
        }
        check(
            t.idle > t.ping_interval,
            "timeouts.idle",
            format!(
                "must be longer than timeouts.ping_interval ({:?}) or every client times out before it is pinged, got {:?}",
                t.ping_interval, t.idle
            ),
        );

        let n = &self.nicknames;
        check(n.min_chars >= 1, "nicknames.min_chars", format!("must be at least 1, got {}", n.min_chars));
        check(
            n.max_chars >= n.min_chars && n.max_chars <= 64,
            "nicknames.max_chars",
            format!("must be between nicknames.min_chars ({}) and 64, got {}", n.min_chars, n.max_chars),
        );
        problems.extend(self.moderation.problems());
        if let Some(cluster) = &self.cluster {
            problems.extend(cluster.problems(&self.store));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            problems.push(("log.level".to_owned(), format!("is not a valid log filter: {e}")));
        }
        problems
    }
}
