//! The web client in a real browser: a Wardroom server with a moderator,
//! profanity rules (reject, mask, hold), a size limit and a rate limit,
//! driven by `tests/browser/e2e.mjs` (Playwright with the system's headless
//! Chromium). Two pages chat; the script checks refusals, masks, holds and
//! approvals, mutes, slow mode, locks, rate limits, markup shown as text,
//! history paging, reconnection with backoff and catch-up (also across a
//! real restart of the server, which this test carries out when the script
//! asks), kicks and bans, keyboard use, labels and contrast, as the pages
//! show them.
//!
//! Needs Chromium (`/usr/bin/chromium`, or `CHROMIUM_PATH`), Node 20+ and
//! `tests/browser/node_modules`; the test runs `npm ci` there itself when
//! the packages are missing. Without them the test is skipped with a message
//! saying how to install them, unless the `CI` environment variable is set,
//! where it fails. Screenshots go to `target/browser-screenshots/`.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

const SECRET: &str = "browser-test-secret";

const CONFIG: &str = r#"
[auth]
jwt_secret = "browser-test-secret"
roles = { "mod-1" = ["moderator"] }

[rooms]
# Small, so that the page has to page back with `history` (scrolling up,
# and catching up after a reconnect).
history_on_join = 5

[moderation]
ladder = []

[[filters]]
kind = "profanity"
words = ["fuck"]
rules = [
    { regex = "\\d{7,}", action = "hold" },
    { words = ["darn"], action = "mask" },
]

[[filters]]
kind = "size"
max_chars = 500

# Only in the room "fast": a second message at once is refused.
[[filters]]
kind = "rate"
rooms = ["fast"]
per_user = { per_minute = 2, burst = 1 }
"#;

const INSTALL: &str = "`apt-get install -y chromium` and Node.js 20 or later with npm (Debian 12's own nodejs is \
18: use NodeSource or nodejs.org); the test runs `npm ci` in tests/browser itself";

/// How long the browser script may run before it is killed.
const SCRIPT_LIMIT: Duration = Duration::from_secs(180);

/// How long `npm ci` may take.
const NPM_LIMIT: Duration = Duration::from_secs(300);

fn moderator_token() -> String {
    let exp = (wardroom::protocol::now_ms() / 1000) as i64 + 3600;
    let claims = json!({"sub": "mod-1", "name": "Sentinel", "exp": exp});
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).expect("sign")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM_PATH").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|value| !value.is_empty())
}

/// `CONFIG` with its database at `db`.
fn config_with_store(db: &Path) -> String {
    format!("{CONFIG}\n[store]\npath = {:?}\n", db.display().to_string())
}

/// A server running in this process, on an address of our choice (so that
/// it can come back on the same port after a restart).
struct Running {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Running {
    async fn start(config: &str, addr: SocketAddr) -> Self {
        let config = wardroom::config::parse(config).unwrap_or_else(|problems| panic!("test config: {problems:?}"));
        let server = wardroom::Server::builder().with_config(config).unwrap_or_else(|problems| panic!("{problems}"));
        // After a restart, the old listener may take a moment to let go of the port.
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("cannot listen on {addr}: {e}"),
            }
        };
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(listener, async {
            let _ = stopped.await;
        }));
        Running { addr, stop, task }
    }

    /// Shuts down as SIGTERM would (every client gets 1001) and waits for the end.
    async fn shut_down(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the server stops within 30 s")
            .expect("the server task")
            .expect("the server ran without error");
    }
}

/// Runs `program args` in `dir` for at most `limit`; Ok if it exited 0,
/// else what it printed.
fn run_with_limit(program: &str, args: &[&str], dir: &Path, limit: Duration) -> Result<(), String> {
    let log = support::fresh_dir().join("output.txt");
    let file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(file.try_clone().map_err(|e| e.to_string())?)
        .stderr(file)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    match status {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!("{program} {} exited with {status}:\n{output}", args.join(" "))),
        None => Err(format!("{program} {} did not finish within {limit:?}:\n{output}", args.join(" "))),
    }
}

fn node_major_version() -> Option<u32> {
    let output = Command::new("node").arg("--version").stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim().strip_prefix('v')?.split('.').next()?.parse().ok()
}

/// What is missing to run the browser test, after installing the script's
/// npm packages (`npm ci`) if they are not there yet.
fn missing_prerequisites(script_dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if !chromium().is_file() {
        missing.push(format!("Chromium ({}; or set CHROMIUM_PATH)", chromium().display()));
    }
    match node_major_version() {
        None => missing.push("Node.js 20 or later (`node`)".to_owned()),
        Some(major) if major < 20 => missing.push(format!("Node.js 20 or later (found {major})")),
        Some(_) => {}
    }
    if missing.is_empty() && !script_dir.join("node_modules/playwright-core/package.json").is_file() {
        eprintln!("browser test: installing the npm packages of {} (npm ci)", script_dir.display());
        if let Err(problem) = run_with_limit("npm", &["ci", "--no-audit", "--no-fund"], script_dir, NPM_LIMIT) {
            missing.push(format!("the npm packages of tests/browser (`npm ci` failed: {problem})"));
        }
    }
    missing
}

/// The script's output as it comes: its stdout line by line (read on a
/// thread of its own), and all of its stderr at the end.
struct Script {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Script {
    fn start(root: &Path, base: &str, token: &str, screenshots: &Path) -> Self {
        let mut child = Command::new("node")
            .current_dir(root)
            .arg("tests/browser/e2e.mjs")
            .arg(base)
            .arg(token)
            .arg(screenshots)
            .env("CHROMIUM_PATH", chromium())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start node");
        let stdout = child.stdout.take().expect("node's stdout");
        let mut stderr = child.stderr.take().expect("node's stderr");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Script { child, lines, stderr }
    }

    fn answer(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("node's stdin");
        stdin.write_all(format!("{line}\n").as_bytes()).and_then(|()| stdin.flush()).expect("write to node");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_client_works_in_a_real_browser() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let missing = missing_prerequisites(&root.join("tests/browser"));
    if !missing.is_empty() {
        let message = format!("the browser test needs {}; install with: {INSTALL}", missing.join(", "));
        assert!(!in_ci(), "{message}");
        eprintln!("skipping the browser test: {message}");
        return;
    }

    let screenshots =
        Path::new(env!("CARGO_TARGET_TMPDIR")).parent().expect("the target directory").join("browser-screenshots");
    let data = support::fresh_dir();
    let config = config_with_store(&data.join("wardroom.db"));
    let mut server = Some(Running::start(&config, "127.0.0.1:0".parse().expect("address")).await);
    let addr = server.as_ref().map(|s| s.addr).expect("the server");
    let started = Instant::now();
    let mut script = Script::start(&root, &format!("http://{addr}"), &moderator_token(), &screenshots);

    let deadline = tokio::time::Instant::now() + SCRIPT_LIMIT;
    let mut restarts = 0;
    let mut timed_out = false;
    loop {
        match tokio::time::timeout_at(deadline, script.lines.recv()).await {
            Ok(Some(line)) if line == "@@restart" => {
                if let Some(running) = server.take() {
                    running.shut_down().await;
                }
                server = Some(Running::start(&config, addr).await);
                restarts += 1;
                println!("  (the test shut the server down and started it again on {addr})");
                script.answer("restarted");
            }
            Ok(Some(line)) => println!("{line}"),
            Ok(None) => break,
            Err(_) => {
                timed_out = true;
                let _ = script.child.kill();
                break;
            }
        }
    }
    // Its stdout is closed: node is closing the browser and about to exit.
    let status = loop {
        if let Some(status) = script.child.try_wait().expect("wait for node") {
            break status;
        }
        if tokio::time::Instant::now() > deadline + Duration::from_secs(10) {
            let _ = script.child.kill();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stderr = script.stderr.join().unwrap_or_default();
    println!("browser test: {:.1} s, {restarts} restart(s) of the server", started.elapsed().as_secs_f64());
    assert!(!timed_out, "the browser script was killed after {SCRIPT_LIMIT:?}:\n{stderr}");
    assert!(status.success(), "the browser test failed ({status}):\n{stderr}");
    assert_eq!(restarts, 1, "the script asks for one restart of the server");
    if let Some(running) = server {
        running.shut_down().await;
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// A GET over a plain socket: status, headers (lower-case names) and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send the request");
    let mut response = Vec::new();
    tokio::time::timeout(support::PATIENCE, stream.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("a complete head");
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut head_lines = head.lines();
    let status = head_lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|c| c.parse().ok());
    let headers = head_lines
        .filter_map(|l| l.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
        .collect();
    (status.expect("a status code"), headers, response[split + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    headers.iter().find(|(n, _)| n == name).map_or("", |(_, v)| v.as_str())
}

/// Without a browser: `/` serves the files of `web/` as built into the
/// binary, with a Content-Security-Policy that lets the page load nothing
/// from elsewhere, the files name no other site, and `[web] enabled =
/// false` turns them off.
#[tokio::test]
async fn the_web_client_is_built_in_self_contained_and_can_be_turned_off() {
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web");
    let data = support::fresh_dir();
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");

    let on = Running::start(&config_with_store(&data.join("on.db")), any).await;
    for (path, file, kind) in [
        ("/", "index.html", "text/html"),
        ("/index.html", "index.html", "text/html"),
        ("/app.js", "app.js", "text/javascript"),
        ("/style.css", "style.css", "text/css"),
    ] {
        let (status, headers, body) = get(on.addr, path).await;
        assert_eq!(status, 200, "GET {path}");
        assert!(header(&headers, "content-type").starts_with(kind), "GET {path}: {headers:?}");
        let csp = header(&headers, "content-security-policy");
        assert!(csp.contains("default-src 'self'") && csp.contains("script-src 'self'"), "GET {path}: {csp}");
        let on_disk = std::fs::read(web.join(file)).expect("read web/");
        assert!(body == on_disk, "GET {path} serves web/{file} as it is now (rebuild if it changed)");

        // No CDN, no web font, no other site: the only absolute URL is the SVG namespace.
        let text = String::from_utf8(on_disk).expect("UTF-8");
        for (at, _) in text.match_indices("://") {
            let svg = text[..at].ends_with("http") && text[at..].starts_with("://www.w3.org/2000/svg");
            let line = text[..at].lines().count();
            assert!(svg, "web/{file} names another site on line {line}");
        }
        assert!(!text.contains("@import") && !text.contains("@font-face"), "web/{file} loads more files");
    }
    assert_eq!(get(on.addr, "/nope.js").await.0, 404);
    on.shut_down().await;

    let off_config =
        format!("[web]\nenabled = false\n\n[store]\npath = {:?}\n", data.join("off.db").display().to_string());
    let off = Running::start(&off_config, any).await;
    for path in ["/", "/index.html", "/app.js", "/style.css"] {
        assert_eq!(get(off.addr, path).await.0, 404, "GET {path} with [web] enabled = false");
    }
    assert_eq!(get(off.addr, "/healthz").await.0, 200);
    off.shut_down().await;
    let _ = std::fs::remove_dir_all(&data);
}
