//! The `wardroom` binary: parses the command line, sets up logging and
//! signals, and runs the server or a tool. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use wardroom::server::{Server, ServerBuilder};

/// A WebSocket chat server for moderated communities.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file.
    #[arg(long, short, global = true, default_value = "config.toml")]
    config: PathBuf,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Run,
    /// Check a configuration file and list every problem in it.
    Check {
        /// The file to check (defaults to --config).
        path: Option<PathBuf>,
    },
    /// Run messages from stdin (plain lines, or JSON lines with user, roles,
    /// room and content) through the config's filters and print, per
    /// message, the verdict, the deciding filter and shadow-mode verdicts.
    Replay,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check { path } => check(&path.unwrap_or(cli.config)),
        Command::Replay => replay(&cli.config),
        Command::Run => match run(&cli.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wardroom: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// The server with the built-in filters and the bundled plugins.
fn builder() -> ServerBuilder {
    let builder = Server::builder();
    #[cfg(feature = "link-guard")]
    let builder = builder.register(wardroom_link_guard::register);
    #[cfg(feature = "repeat-guard")]
    let builder = builder.register(wardroom_repeat_guard::register);
    builder
}

fn check(path: &std::path::Path) -> ExitCode {
    match builder().load_file(path) {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(problems) => {
            eprint!("{problems}");
            ExitCode::FAILURE
        }
    }
}

fn replay(path: &std::path::Path) -> ExitCode {
    let server = match builder().load_file(path) {
        Ok(server) => server,
        Err(problems) => {
            eprint!("{problems}");
            return ExitCode::FAILURE;
        }
    };
    let policies = server.policies();
    match wardroom::replay::run(&policies.pipeline, std::io::stdin().lock(), std::io::stdout().lock()) {
        Ok(refused) => {
            eprintln!("{refused} message(s) refused");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wardroom replay: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let server = builder().load_file(path).map_err(|problems| anyhow::anyhow!("{problems}"))?;
    let config = server.config();
    let server = server.with_log_level(wardroom::logging::init(&config.log));
    // One worker: the current-thread scheduler does the same work with less
    // bookkeeping (no work stealing, no cross-thread wake-ups).
    let mut runtime = match config.server.workers {
        1 => tokio::runtime::Builder::new_current_thread(),
        workers => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if workers > 0 {
                builder.worker_threads(workers);
            }
            builder
        }
    };
    let runtime = runtime.enable_all().build().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.server.bind)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.bind))?;
        server.run(listener, shutdown_signal()).await?;
        Ok(())
    })
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
