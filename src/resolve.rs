//! Turns a validated server set into addresses: IP literals directly, host names through DNS.
//!
//! Runs on the agent thread (and on the main thread for `BACKENDS`), never on a shard, because
//! name resolution blocks.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;

use crate::balancer::Backend;
use crate::queue::{ServerEntry, ServerSet};

/// Resolves every entry; the first host that does not resolve rejects the whole set, with a
/// message in the same shape as the other rejections.
///
/// This runs inside the propagation window of every snapshot (up to 10,000 entries), so the
/// label is written into one reused buffer and copied once into its `Arc<str>`, rather than
/// allocated twice through [`ServerEntry::label`].
pub fn resolve(set: &ServerSet) -> Result<Vec<Backend>, String> {
    let mut backends = Vec::with_capacity(set.servers.len());
    let mut label = String::with_capacity(64);
    // One lookup per name, however many ports of it the set lists.
    let mut names: HashMap<&str, IpAddr> = HashMap::new();
    for (index, entry) in set.servers.iter().enumerate() {
        let ip = match entry.host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => match names.get(entry.host.as_str()) {
                Some(&ip) => ip,
                None => {
                    let ip = lookup(&entry.host).ok_or_else(|| {
                        format!(
                            "entry {index}: field host: value \"{}\": cannot be resolved",
                            entry.host
                        )
                    })?;
                    names.insert(&entry.host, ip);
                    ip
                }
            },
        };
        let addr = SocketAddr::new(ip, entry.port);
        write_label(&mut label, entry);
        backends.push(Backend {
            label: Arc::from(label.as_str()),
            addr,
            score: entry.score,
        });
    }
    Ok(backends)
}

/// The first address of a host name (blocking DNS), if it has one.
fn lookup(host: &str) -> Option<IpAddr> {
    (host, 0)
        .to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .map(|addr| addr.ip())
}

/// Writes [`ServerEntry::label`] into `out`, replacing what it held.
fn write_label(out: &mut String, entry: &ServerEntry) {
    out.clear();
    if entry.host.contains(':') {
        let _ = write!(out, "[{}]:{}", entry.host, entry.port);
    } else {
        let _ = write!(out, "{}:{}", entry.host, entry.port);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn labels_match_server_entry_label() {
        let mut out = String::from("left over");
        for (host, port) in [
            ("127.0.0.1", 1),
            ("::1", 65535),
            ("2001:db8::1", 8080),
            ("backend-1.internal", 80),
        ] {
            let entry = entry(host, port);
            write_label(&mut out, &entry);
            assert_eq!(out, entry.label());
        }
    }

    #[test]
    fn one_name_with_several_ports_keeps_each_port() {
        let set = ServerSet {
            servers: vec![entry("localhost", 81), entry("localhost", 82)],
        };
        let backends = resolve(&set).expect("localhost resolves");
        assert_eq!(backends[0].addr.ip(), backends[1].addr.ip());
        assert_eq!((backends[0].addr.port(), backends[1].addr.port()), (81, 82));
        assert_eq!(&*backends[1].label, "localhost:82");
    }
}
