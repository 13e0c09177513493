//! Who may connect: the global connection cap, the per-IP cap, and the
//! client address (the socket's, or the one a trusted proxy forwarded).
//!
//! A [`Ticket`] is held for as long as its connection lives, through the
//! upgrade; dropping it frees the slots it took.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderMap;
use ipnet::IpNet;

use crate::config::ServerConfig;
use crate::lock;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `server.max_connections` connections are open.
    ServerFull,
    /// `server.max_connections_per_ip` connections are open from this address.
    TooManyFromAddress,
}

impl Refusal {
    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ServerFull => "server_full",
            Refusal::TooManyFromAddress => "per_ip_limit",
        }
    }
}

/// Connection admission state, shared by the accept loop and the upgrade.
#[derive(Debug)]
pub struct Admission {
    /// Open connections (TCP connections, whether or not upgraded).
    open: AtomicUsize,
    /// Most open connections.
    max_open: usize,
    /// Open connections per client address; entries at zero are removed, so
    /// the map holds only addresses that have a connection open.
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    /// Most open connections per client address.
    max_per_ip: u32,
    /// Peers whose `X-Forwarded-For` header is believed.
    trusted_proxies: Vec<IpNet>,
}

/// Slots held by one connection; dropping it frees them.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    /// The address whose per-IP slot this ticket holds: the socket peer's,
    /// or, behind a trusted proxy, the forwarded client's (taken at the
    /// upgrade). Every ticket holds a global slot.
    ip: Option<IpAddr>,
}

impl Ticket {
    /// Behind a trusted proxy, takes the per-IP slot of the forwarded client
    /// address for this connection.
    pub fn admit_forwarded(&mut self, client: IpAddr) -> Result<(), Refusal> {
        if self.ip.is_none() {
            self.ip = Some(self.admission.take_ip_slot(client)?);
        }
        Ok(())
    }
}

impl Admission {
    /// Admission rules from `[server]`.
    pub fn new(config: &ServerConfig) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max_open: config.max_connections,
            per_ip: Mutex::default(),
            max_per_ip: config.max_connections_per_ip,
            trusted_proxies: config.trusted_proxies.clone(),
        }
    }

    /// Admits a new TCP connection from `peer`. Connections from a trusted
    /// proxy count against the global cap only: their per-IP slot is taken
    /// at the upgrade, for the forwarded address ([`Ticket::admit_forwarded`]).
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Ticket, Refusal> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max_open {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::ServerFull);
        }
        let mut ticket = Ticket { admission: self.clone(), ip: None };
        if !self.is_trusted_proxy(peer) {
            ticket.ip = Some(self.take_ip_slot(peer)?);
        }
        Ok(ticket)
    }

    fn take_ip_slot(&self, ip: IpAddr) -> Result<IpAddr, Refusal> {
        let mut per_ip = lock(&self.per_ip);
        let count = per_ip.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            if *count == 0 {
                per_ip.remove(&ip);
            }
            return Err(Refusal::TooManyFromAddress);
        }
        *count += 1;
        Ok(ip)
    }

    /// Whether `peer` is a configured trusted proxy.
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// The client's address: the socket peer, or, when the peer is a trusted
    /// proxy, the right-most address in `X-Forwarded-For` that is not itself
    /// a trusted proxy (addresses further left can be forged by the client).
    /// A hop that is not an address ends the walk at the trusted proxy that
    /// wrote it: what lies to its left cannot be believed. IPv4-mapped IPv6
    /// addresses (`::ffff:a.b.c.d`) count as the IPv4 address.
    pub fn client_addr(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.ip().to_canonical();
        if !self.is_trusted_proxy(client) {
            return client;
        }
        let values: Vec<Option<&str>> =
            headers.get_all("x-forwarded-for").iter().map(|value| value.to_str().ok()).collect();
        let hops = values.iter().rev().flat_map(|value| match value {
            Some(value) => value.rsplit(',').map(|hop| hop.trim().parse::<IpAddr>().ok()).collect(),
            None => vec![None],
        });
        for hop in hops {
            let Some(ip) = hop else { break };
            client = ip.to_canonical();
            if !self.is_trusted_proxy(client) {
                break;
            }
        }
        client
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut per_ip = lock(&self.admission.per_ip);
            if let Some(count) = per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission(max: usize, per_ip: u32, proxies: &[&str]) -> Arc<Admission> {
        Arc::new(Admission::new(&ServerConfig {
            max_connections: max,
            max_connections_per_ip: per_ip,
            trusted_proxies: proxies.iter().map(|p| p.parse().unwrap()).collect(),
            ..ServerConfig::default()
        }))
    }

    #[test]
    fn caps_are_enforced_and_freed_on_drop() {
        let admission = admission(3, 2, &[]);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let t1 = admission.admit(a).unwrap();
        let _t2 = admission.admit(a).unwrap();
        assert_eq!(admission.admit(a).unwrap_err(), Refusal::TooManyFromAddress);
        let _t3 = admission.admit(b).unwrap();
        assert_eq!(admission.admit(b).unwrap_err(), Refusal::ServerFull);
        drop(t1);
        let _t4 = admission.admit(a).unwrap();
        assert_eq!(admission.open(), 3, "the refused attempts left nothing behind");
        assert_eq!(admission.admit(b).unwrap_err(), Refusal::ServerFull);
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let admission = admission(10, 10, &["10.0.0.0/8"]);
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.1.1.1".parse().unwrap());
        let proxy: SocketAddr = "10.0.0.5:4000".parse().unwrap();
        let stranger: SocketAddr = "198.51.100.1:4000".parse().unwrap();
        assert_eq!(admission.client_addr(proxy, &headers), "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(admission.client_addr(stranger, &headers), stranger.ip());
        assert_eq!(admission.client_addr(proxy, &HeaderMap::new()), proxy.ip());
        // A hop that is not an address: nothing to its left is believed.
        for (forwarded, client) in [
            ("1.1.1.1, garbage", "10.0.0.5"),
            ("1.1.1.1, ", "10.0.0.5"),
            ("1.1.1.1, unknown, 10.1.1.1", "10.1.1.1"),
            ("3.3.3.3:5555", "10.0.0.5"),
            ("::ffff:203.0.113.9", "203.0.113.9"),
            ("203.0.113.7, ::ffff:10.1.1.1", "203.0.113.7"),
        ] {
            let mut headers = HeaderMap::new();
            headers.insert("x-forwarded-for", forwarded.parse().unwrap());
            assert_eq!(admission.client_addr(proxy, &headers), client.parse::<IpAddr>().unwrap(), "{forwarded}");
        }
        // Two headers are one list, the last header's entries right-most.
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", "6.6.6.6".parse().unwrap());
        headers.append("x-forwarded-for", "203.0.113.8, 10.2.2.2".parse().unwrap());
        assert_eq!(admission.client_addr(proxy, &headers), "203.0.113.8".parse::<IpAddr>().unwrap());
        let mapped: SocketAddr = "[::ffff:10.0.0.5]:4000".parse().unwrap();
        assert_eq!(admission.client_addr(mapped, &headers), "203.0.113.8".parse::<IpAddr>().unwrap(), "mapped proxy");
        // A trusted proxy's own connection takes no per-IP slot.
        let _tickets: Vec<_> = (0..10).map(|_| admission.admit(proxy.ip()).unwrap()).collect();
        assert_eq!(admission.admit(proxy.ip()).unwrap_err(), Refusal::ServerFull);
    }
}
