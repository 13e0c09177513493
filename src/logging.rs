//! Log output as `[log]` describes it: the format, chosen at start-up, and
//! the level, which a reload changes while the server runs.
//!
//! The format stays as started: switching it live would leave the spans
//! already open (one per connection) without the fields the new format
//! looks for, so a change of `log.format` is reported as needing a restart.

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

use crate::config::{LogConfig, LogFormat};

/// The environment variable whose filter, when set, wins over `[log] level`.
pub const ENV: &str = "RUST_LOG";

/// The installed log output's level, for reloads to change.
pub struct LogLevel {
    /// Swaps the filter of the installed subscriber.
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set at start-up: it stays in force and `[log] level`
    /// is not used.
    from_env: bool,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevel").field("from_env", &self.from_env).finish()
    }
}

/// Installs the global log output for `log` (the filter from `RUST_LOG` when
/// that is set) and returns its level control. Call once, at start-up.
pub fn init(log: &LogConfig) -> LogLevel {
    let from_env = EnvFilter::try_from_env(ENV).ok();
    let from_env_set = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(&log.level));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let registry = tracing_subscriber::registry().with(filter);
    match log.format {
        LogFormat::Pretty => registry.with(fmt::layer().with_ansi(ansi)).init(),
        LogFormat::Json => registry.with(fmt::layer().json().with_ansi(ansi)).init(),
    }
    LogLevel { handle, from_env: from_env_set }
}

impl LogLevel {
    /// Applies a new `[log] level` (already checked to be a valid filter),
    /// unless `RUST_LOG` decides the level.
    pub fn set(&self, level: &str) {
        if self.from_env {
            tracing::info!(level = ?level, "{ENV} is set and overrides [log] level; not changing the log level");
            return;
        }
        match EnvFilter::try_new(level) {
            Ok(filter) => match self.handle.reload(filter) {
                Ok(()) => tracing::info!(level = ?level, "log level changed"),
                Err(e) => tracing::warn!(error = %e, "cannot change the log level"),
            },
            Err(e) => tracing::warn!(error = %e, level = ?level, "not a valid log filter; keeping the log level"),
        }
    }
}
