//! Command-line options, parsed by hand (`--name value` or `--name=value`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

/// Usage text printed by `--help` and after a bad option.
pub const USAGE: &str = "\
wardroom-loadgen: open-loop load generator for WebSocket chat servers (loopback only)

USAGE: wardroom-loadgen [OPTIONS]

Target
  --url URL             ws://HOST:PORT/PATH of the server   [ws://127.0.0.1:8080/ws]
  --host HOST           override the URL's host (127.0.0.0/8, ::1 or localhost)
  --port PORT           override the URL's port
  --also-port PORT      a second server (another node of a cluster) on the same
                        host: odd-numbered clients connect there, so half the
                        senders and half the receivers are on each node
  --server-pid PID      report the server's RSS (VmRSS) and CPU from /proc/PID

Load
  --clients N           connections to open                 [100]
  --rooms R             rooms r0..r{R-1}; client i joins r{i % R} [1]
  --senders M           the first M clients send messages   [min(10, N)]
  --rate MSGS           total offered messages per second, spread evenly over
                        the senders on a fixed schedule (open loop) [1000]
  --size BYTES          message content size                [64]
  --warmup SECS         sending before the measurement window [2]
  --duration SECS       measurement window (idle mode: how long to hold) [10]
  --drain SECS          wait after the window for in-flight messages [2]
  --connect-rate N      new connections per second          [2000]
  --sources N           bind client sockets to 127.0.0.1 .. 127.0.0.N
                        (each source address has ~28k ephemeral ports) [1]

Modes and output
  --idle                connect and join, send nothing; report the server's
                        RSS per connection after --settle seconds
  --settle SECS         idle mode: wait before sampling RSS [3]
  --json                also print one JSON line with the results
  --ack                 send every message with a `ref` and measure the time
                        to its `ack` (the server acknowledges only once the
                        message is durably stored)
  --busy-poll           never sleep in epoll: the generator's CPU stays at
                        100 %, and the server stops paying for waking it up
                        after every write (a cross-CPU wake-up, expensive in
                        a VM), as it would not for remote clients; judge
                        saturation by the backlog line, not the CPU figure
  -h, --help            this text
";

/// Everything a run needs, validated.
#[derive(Debug, Clone)]
pub struct Options {
    /// Display form of the target, `ws://host:port/path`.
    pub url: String,
    /// The server's address (always loopback).
    pub addr: SocketAddr,
    /// The `Host` header value.
    pub host_header: String,
    /// Request path (with query, if any) before `nick=` is appended.
    pub path: String,
    /// A second node (address and `Host` header) for odd-numbered clients.
    pub also: Option<(SocketAddr, String)>,
    /// Connections to open.
    pub clients: usize,
    /// Rooms the clients are spread over.
    pub rooms: usize,
    /// How many of the first clients send.
    pub senders: usize,
    /// Offered messages per second, all senders together.
    pub rate: f64,
    /// Content bytes per message.
    pub size: usize,
    /// Sending time before the measurement window.
    pub warmup: Duration,
    /// The measurement window (idle mode: the hold time).
    pub duration: Duration,
    /// Time after the window to collect in-flight deliveries.
    pub drain: Duration,
    /// Idle mode: time between the last join and the RSS sample.
    pub settle: Duration,
    /// New connections per second.
    pub connect_rate: f64,
    /// Number of source addresses (127.0.0.1 ..= 127.0.0.N).
    pub sources: u8,
    /// Server process to observe.
    pub server_pid: Option<u32>,
    /// Connect and join only.
    pub idle: bool,
    /// Print a JSON line too.
    pub json: bool,
    /// Keep the runtime busy so it polls sockets without sleeping.
    pub busy_poll: bool,
    /// Ask for and time acknowledgements.
    pub ack: bool,
}

/// Parses the arguments (without the program name). `Ok(None)` means help
/// was asked for.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Options>, String> {
    let mut url = "ws://127.0.0.1:8080/ws".to_owned();
    let mut host: Option<String> = None;
    let mut port: Option<u16> = None;
    let mut also_port: Option<u16> = None;
    let mut clients = 100usize;
    let mut rooms = 1usize;
    let mut senders: Option<usize> = None;
    let mut rate = 1000.0f64;
    let mut size = 64usize;
    let mut warmup = 2.0f64;
    let mut duration = 10.0f64;
    let mut drain = 2.0f64;
    let mut settle = 3.0f64;
    let mut connect_rate = 2000.0f64;
    let mut sources = 1u8;
    let mut server_pid = None;
    let mut idle = false;
    let mut json = false;
    let mut busy_poll = false;
    let mut ack = false;

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (arg.clone(), None),
        };
        match name.as_str() {
            "-h" | "--help" => return Ok(None),
            "--idle" => idle = true,
            "--json" => json = true,
            "--busy-poll" => busy_poll = true,
            "--ack" => ack = true,
            _ => {
                let value = match inline {
                    Some(v) => v,
                    None => args.next().ok_or_else(|| format!("{name} needs a value"))?,
                };
                match name.as_str() {
                    "--url" => url = value,
                    "--host" => host = Some(value),
                    "--port" => port = Some(number(&name, &value)?),
                    "--also-port" => also_port = Some(number(&name, &value)?),
                    "--clients" => clients = number(&name, &value)?,
                    "--rooms" => rooms = number(&name, &value)?,
                    "--senders" => senders = Some(number(&name, &value)?),
                    "--rate" => rate = number(&name, &value)?,
                    "--size" => size = number(&name, &value)?,
                    "--warmup" => warmup = number(&name, &value)?,
                    "--duration" => duration = number(&name, &value)?,
                    "--drain" => drain = number(&name, &value)?,
                    "--settle" => settle = number(&name, &value)?,
                    "--connect-rate" => connect_rate = number(&name, &value)?,
                    "--sources" => sources = number(&name, &value)?,
                    "--server-pid" => server_pid = Some(number(&name, &value)?),
                    _ => return Err(format!("unknown option {name}")),
                }
            }
        }
    }

    let (url_host, url_port, path) = split_url(&url)?;
    let host = host.unwrap_or(url_host);
    let port = port.unwrap_or(url_port);
    let ip = loopback_ip(&host)?;
    let addr = SocketAddr::new(ip, port);
    let host_header_for = |port: u16| match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    };
    let host_header = host_header_for(port);
    let also = also_port.map(|p| (SocketAddr::new(ip, p), host_header_for(p)));
    let url = match also_port {
        Some(p) => format!("ws://{host_header}{path} + port {p}"),
        None => format!("ws://{host_header}{path}"),
    };

    if clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if rooms == 0 || rooms > clients {
        return Err(format!("--rooms must be between 1 and --clients ({clients})"));
    }
    let senders = senders.unwrap_or(clients.min(10));
    if senders > clients {
        return Err(format!("--senders ({senders}) exceeds --clients ({clients})"));
    }
    if !(rate.is_finite() && rate >= 0.0) {
        return Err("--rate must be a non-negative number".into());
    }
    if !(connect_rate.is_finite() && connect_rate > 0.0) {
        return Err("--connect-rate must be positive".into());
    }
    if size > 60_000 {
        return Err("--size must be at most 60000 bytes".into());
    }
    if sources == 0 || sources == 255 {
        return Err("--sources must be between 1 and 254".into());
    }
    if sources > 1 && !ip.is_ipv4() {
        return Err("--sources needs an IPv4 target".into());
    }
    Ok(Some(Options {
        url,
        addr,
        host_header,
        path,
        also,
        clients,
        rooms,
        senders,
        rate,
        size,
        warmup: seconds("--warmup", warmup)?,
        duration: seconds("--duration", duration)?,
        drain: seconds("--drain", drain)?,
        settle: seconds("--settle", settle)?,
        connect_rate,
        sources,
        server_pid,
        idle,
        json,
        busy_poll,
        ack,
    }))
}

/// Parses a number, naming the option on failure.
fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, String> {
    value.trim().parse().map_err(|_| format!("{name}: {value:?} is not a valid number"))
}

/// A non-negative number of seconds.
fn seconds(name: &str, secs: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{name} must be a non-negative number of seconds"))
}

/// Splits `ws://host[:port][/path]` into host, port (default 80) and path
/// (default `/`).
fn split_url(url: &str) -> Result<(String, u16, String), String> {
    let rest = url.strip_prefix("ws://").ok_or_else(|| format!("--url {url:?}: only ws:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| format!("--url {url:?}: unclosed '['"))?;
        (h.to_owned(), after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), Some(p)),
            None => (authority.to_owned(), None),
        }
    };
    let port = match port {
        Some(p) => number("--url port", p)?,
        None => 80,
    };
    Ok((host, port, path))
}

/// Resolves `host` and refuses anything that is not a loopback address.
fn loopback_ip(host: &str) -> Result<IpAddr, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse::<IpAddr>().map_err(|_| format!("host {host:?} must be a literal loopback address or localhost"))?
    };
    let ok = match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST,
    };
    if ok { Ok(ip) } else { Err(format!("refusing non-loopback target {ip}: only 127.0.0.0/8 and ::1 are allowed")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(args: &[&str]) -> Options {
        match parse(args.iter().map(|s| (*s).to_owned())) {
            Ok(Some(o)) => o,
            other => panic!("{args:?}: {other:?}"),
        }
    }

    #[test]
    fn defaults_and_overrides() {
        let o = parse_ok(&[]);
        assert_eq!(o.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((o.clients, o.senders, o.path.as_str()), (100, 10, "/ws"));
        let o = parse_ok(&["--url", "ws://localhost:9000/chat?x=1", "--clients=5", "--rate", "2.5"]);
        assert_eq!(o.addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!((o.clients, o.senders, o.rate), (5, 5, 2.5));
        assert_eq!(o.path, "/chat?x=1");
        let o = parse_ok(&["--url", "ws://[::1]:8090/ws", "--port", "8091"]);
        assert_eq!(o.addr, "[::1]:8091".parse().unwrap());
        assert_eq!(o.url, "ws://[::1]:8091/ws");
        assert!(o.also.is_none());
        let o = parse_ok(&["--port", "8081", "--also-port=8082"]);
        let (also, host) = o.also.expect("a second node");
        assert_eq!((also, host.as_str()), ("127.0.0.1:8082".parse().unwrap(), "127.0.0.1:8082"));
        assert_eq!(o.url, "ws://127.0.0.1:8081/ws + port 8082");
    }

    #[test]
    fn refuses_non_loopback_and_bad_values() {
        for args in [
            &["--url", "ws://10.0.0.1:8080/ws"][..],
            &["--host", "192.168.1.2"],
            &["--host", "example.com"],
            &["--url", "wss://127.0.0.1/ws"],
            &["--clients", "0"],
            &["--clients", "5", "--senders", "6"],
            &["--rooms", "0"],
            &["--sources", "0"],
            &["--bogus", "1"],
            &["--rate"],
        ] {
            let owned = args.iter().map(|s| (*s).to_owned());
            assert!(parse(owned).is_err(), "{args:?} should be refused");
        }
        assert!(parse_ok(&["--host", "127.3.4.5"]).addr.ip().is_loopback());
    }
}
