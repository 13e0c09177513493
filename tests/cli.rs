//! The `wardroom` binary: `check`, `--config`, the start-up log line, and
//! shutdown on SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::Client;

/// Kills the server if the test fails before stopping it.
struct KillOnDrop(Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wardroom() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wardroom"))
}

/// A config file (with a database in the same directory) for one test.
fn temp_config(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("wardroom-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config.toml");
    std::fs::write(&path, format!("{text}\n[store]\npath = {:?}\n", dir.join("wardroom.db"))).expect("write config");
    path
}

#[test]
fn check_reports_every_mistake_with_line_column_and_key() {
    let path = temp_config(
        "three-mistakes",
        "[server]\nbind = \"not an address\"\n\n[limits]\nmax_frame_bytes = 8\n\n[rooms]\nmax_romos = 3\n",
    );
    let output = wardroom().arg("check").arg(&path).output().expect("run wardroom check");
    assert!(!output.status.success(), "a bad config must fail the check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("config.toml:")).collect();
    assert_eq!(lines.len(), 4, "header + three problems:\n{stderr}");
    assert!(lines[0].ends_with("3 problems"), "{stderr}");
    for (line, column, key, what) in [
        (2, 8, "server.bind", "invalid socket address"),
        (5, 1, "limits.max_frame_bytes", "must be between 16 and"),
        (8, 1, "rooms.max_romos", "unknown field `max_romos`, expected one of `max_rooms`"),
    ] {
        let needle = format!("config.toml:{line}:{column}: `{key}`: {what}");
        assert!(stderr.contains(&needle), "missing {needle:?} in:\n{stderr}");
    }
}

#[test]
fn check_lists_every_problem_inside_filter_entries_and_arrays_at_its_own_key() {
    let path = temp_config(
        "nested-mistakes",
        "[server]\ntrusted_proxies = [\"10.0.0.0/33\", \"nonsense\", \"10.0.0.1\"]\n\n\
         [[filters]]\nkind = \"rate\"\nper_user = { per_minut = 30, brust = 5 }\n\n\
         [[filters]]\nkind = \"size\"\nmax_bytes = 10\nenforced = false\nexempt_role = [\"moderator\"]\n\n\
         [[filters]]\nid = \"short\"\nkind = \"size\"\nmax_chars = \"ten\"\n",
    );
    let output = wardroom().arg("check").arg(&path).output().expect("run wardroom check");
    assert!(!output.status.success(), "a bad config must fail the check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = [
        (2, 20, "server.trusted_proxies[0]", "\"10.0.0.0/33\" is neither an IP address nor a network"),
        (2, 35, "server.trusted_proxies[1]", "\"nonsense\" is neither an IP address nor a network"),
        (6, 14, "filters[0].per_user.per_minut", "filter `rate` (rate): unknown field `per_minut`"),
        (6, 30, "filters[0].per_user.brust", "filter `rate` (rate): unknown field `brust`"),
        (11, 1, "filters[1].enforced", "filter `size` (size): unknown field `enforced`"),
        (12, 1, "filters[1].exempt_role", "filter `size` (size): unknown field `exempt_role`"),
        (17, 1, "filters[2].max_chars", "filter `short` (size): invalid type: string \"ten\""),
    ];
    let problems: Vec<&str> = stderr.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(problems.len(), expected.len(), "one line per problem, and nothing else:\n{stderr}");
    assert!(stderr.lines().next().is_some_and(|l| l.ends_with("7 problems")), "{stderr}");
    for ((line, column, key, what), problem) in expected.into_iter().zip(problems) {
        let needle = format!("config.toml:{line}:{column}: `{key}`: {what}");
        assert!(problem.contains(&needle), "expected {needle:?}, got {problem:?} in:\n{stderr}");
    }
    assert!(stderr.contains("(or a key of every entry: `kind`, `id`, `enabled`, `enforce`"), "{stderr}");
}

#[test]
fn check_accepts_the_shipped_config() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml");
    let output = wardroom().args(["check", shipped]).output().expect("run wardroom check");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_logs_its_address_serves_chat_and_exits_0_on_sigterm() {
    let path = temp_config("run", "[server]\nbind = \"127.0.0.1:0\"\n[log]\nformat = \"json\"\n");
    let child = wardroom()
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start wardroom");
    let mut child = KillOnDrop(Some(child));
    let stdout = child.0.as_mut().and_then(|c| c.stdout.take()).expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let addr = loop {
        let line = rx.recv_timeout(Duration::from_secs(20)).expect("a log line saying where it listens");
        let line: serde_json::Value = serde_json::from_str(&line).expect("every log line is JSON");
        if line["fields"]["message"] == "listening" {
            break line["fields"]["addr"].as_str().expect("addr field").to_owned();
        }
    };

    let mut client = Client::connect(&format!("ws://{addr}/ws?nick=Ops")).await;
    client.join("lobby").await;
    client.post("lobby", "hello from the binary").await;

    let mut child = child.0.take().expect("child");
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill");
    assert!(status.success());
    assert_eq!(client.expect_close().await, (1001, "server shutting down".to_owned()));
    let exit = tokio::task::spawn_blocking(move || child.wait()).await.expect("join").expect("wait");
    assert!(exit.success(), "exit status {exit:?}");
}

#[test]
fn replay_prints_the_verdict_filter_and_shadow_verdicts_per_message() {
    let path = temp_config(
        "replay",
        "[[filters]]\nkind = \"profanity\"\nwords = [\"fuck\"]\nrules = [{ words = [\"darn\"], action = \"mask\" }]\n\n\
         [[filters]]\nid = \"strict-size\"\nkind = \"size\"\nmax_chars = 10\nenforce = false\n",
    );
    let mut child = wardroom()
        .args(["replay", "--config"])
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run wardroom replay");
    let input = "hello\nf.u.c.k you\n{\"user\":\"ann\",\"room\":\"x\",\"content\":\"oh darn it, again\"}\n";
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes()).expect("write stdin");
    let output = child.wait_with_output().expect("replay output");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let reports: Vec<serde_json::Value> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON object per line"))
        .collect();
    assert_eq!(reports.len(), 3);
    assert_eq!(reports[0]["verdict"], "allow");
    assert_eq!((&reports[1]["verdict"], &reports[1]["filter"]), (&"reject".into(), &"profanity".into()));
    assert_eq!(reports[2]["verdict"], "modified");
    assert_eq!(reports[2]["delivered"], "oh **** it, again");
    assert_eq!(reports[2]["shadow"][0]["filter"], "strict-size");
    assert_eq!(reports[2]["shadow"][0]["code"], "too_large");
    assert!(String::from_utf8_lossy(&output.stderr).contains("1 message(s) refused"));
}
