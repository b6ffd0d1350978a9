//! Turns a validated server set into addresses: IP literals directly, host names through DNS.
//!
//! Runs on the agent thread (and on the main thread for `BACKENDS`), never on a shard, because
//! name resolution blocks.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use crate::balancer::Backend;
use crate::queue::ServerSet;

/// Resolves every entry; the first host that does not resolve rejects the whole set, with a
/// message in the same shape as the other rejections.
pub fn resolve(set: &ServerSet) -> Result<Vec<Backend>, String> {
    let mut backends = Vec::with_capacity(set.servers.len());
    for (index, entry) in set.servers.iter().enumerate() {
        let addr = match entry.host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, entry.port),
            Err(_) => (entry.host.as_str(), entry.port)
                .to_socket_addrs()
                .ok()
                .and_then(|mut addrs| addrs.next())
                .ok_or_else(|| {
                    format!(
                        "entry {index}: field host: value \"{}\": cannot be resolved",
                        entry.host
                    )
                })?,
        };
        backends.push(Backend {
            label: Arc::from(entry.label()),
            addr,
            score: entry.score,
        });
    }
    Ok(backends)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::ServerEntry;

    fn entry(host: &str, port: u16) -> ServerEntry {
        ServerEntry {
            host: host.into(),
            port,
            score: 1.0,
        }
    }

    #[test]
    fn ip_literals_resolve_without_dns() {
        let set = ServerSet {
            servers: vec![entry("127.0.0.1", 8080), entry("::1", 9000)],
        };
        let backends = resolve(&set).expect("literals resolve");
        assert_eq!(backends[0].addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(&*backends[0].label, "127.0.0.1:8080");
        assert_eq!(backends[1].addr, "[::1]:9000".parse().unwrap());
    }

    #[test]
    fn localhost_resolves_by_name() {
        let set = ServerSet {
            servers: vec![entry("localhost", 81)],
        };
        let backends = resolve(&set).expect("localhost resolves");
        assert!(backends[0].addr.ip().is_loopback());
        assert_eq!(&*backends[0].label, "localhost:81");
    }

    #[test]
    fn unresolvable_name_names_the_entry() {
        let set = ServerSet {
            servers: vec![entry("127.0.0.1", 1), entry("no-such-host.invalid", 80)],
        };
        let err = resolve(&set).unwrap_err();
        assert!(err.starts_with("entry 1: field host"), "{err}");
    }
}
