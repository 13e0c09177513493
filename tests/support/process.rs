//! The `wardroom` binary as a separate process: started on a config file,
//! its address read from its JSON log, stopped with SIGTERM or SIGKILL.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A running server process; killed if dropped while running.
pub struct ServerProcess {
    child: Option<Child>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts `wardroom --config <path>` (the config should bind port 0 and
    /// log JSON) and waits for it to say where it listens.
    pub fn start(binary: &str, config: &Path) -> Self {
        let (server, rx) = Self::spawn(binary, config, Some("info"));
        // Keep draining the log so the process never blocks on a full pipe.
        std::thread::spawn(move || while rx.recv().is_ok() {});
        server
    }

    /// Like [`ServerProcess::start`], without `RUST_LOG` (so `[log] level`
    /// decides), and returning the log lines that follow `listening`.
    pub fn start_with_log(binary: &str, config: &Path) -> (Self, mpsc::Receiver<String>) {
        Self::spawn(binary, config, None)
    }

    fn spawn(binary: &str, config: &Path, rust_log: Option<&str>) -> (Self, mpsc::Receiver<String>) {
        let mut command = Command::new(binary);
        command.arg("--config").arg(config).stdout(Stdio::piped()).stderr(Stdio::inherit());
        match rust_log {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        let mut child = command.spawn().expect("start wardroom");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut server = ServerProcess { child: Some(child), addr: SocketAddr::from(([0, 0, 0, 0], 0)) };
        server.addr = loop {
            let line = rx.recv_timeout(Duration::from_secs(30)).expect("a log line saying where it listens");
            let Ok(line) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
            if line["fields"]["message"] == "listening" {
                break line["fields"]["addr"].as_str().and_then(|a| a.parse().ok()).expect("addr field");
            }
        };
        (server, rx)
    }

    /// `ws://…/ws` with a query string.
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.addr)
    }

    /// SIGTERM, then waits; returns whether it exited 0.
    pub fn terminate(mut self) -> bool {
        let Some(mut child) = self.child.take() else { return false };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        child.wait().is_ok_and(|s| s.success())
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill_9(mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
