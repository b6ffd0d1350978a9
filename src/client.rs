//! Per-shard backend connections: connect with a deadline, and a keep-alive pool per server.

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;
use glommio::GlommioError;

use crate::http::ResponseHead;
use crate::metrics::ErrorKind;
use crate::stream::Conn;

/// How long an idle pooled connection is kept. Shorter than the keep-alive timeout of most
/// servers (nginx 75 s, Apache 5–15 s is the exception, handled by the stale retry).
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per server per shard; more than this are closed on release.
pub const POOL_MAX_IDLE_PER_SERVER: usize = 512;
/// Size of a backend connection's receive buffer.
pub const UPSTREAM_BUFFER: usize = 16 * 1024;

/// A failure talking to a backend, with what the retry rules need to know.
#[derive(Debug)]
pub struct UpstreamError {
    pub kind: ErrorKind,
    /// The connection came from the pool: a close before any response byte may just mean the
    /// backend timed the idle connection out.
    pub reused: bool,
    /// Some of the request reached the backend (so a non-idempotent request must not be retried).
    pub request_sent: bool,
    /// Part of a response head had arrived: the backend did answer, so this was no stale
    /// pooled connection.
    pub response_started: bool,
    /// The balancer itself ran out of something (descriptors, memory) before reaching the
    /// backend: nothing to hold against the server, and no other server would fare better.
    pub local: bool,
    pub detail: String,
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} error: {}", self.kind.label(), self.detail)
    }
}

impl UpstreamError {
    pub fn new(
        kind: ErrorKind,
        reused: bool,
        request_sent: bool,
        detail: impl fmt::Display,
    ) -> Self {
        UpstreamError {
            kind,
            reused,
            request_sent,
            response_started: false,
            local: false,
            detail: detail.to_string(),
        }
    }

    /// Maps an I/O error on an established connection to its kind.
    pub fn from_io(err: &io::Error, reused: bool, request_sent: bool) -> Self {
        UpstreamError::new(ErrorKind::of_io(err), reused, request_sent, err)
    }
}

/// One connection to a backend, with its receive buffer.
pub struct Upstream {
    pub conn: Conn,
    pub addr: SocketAddr,
    /// Taken from the pool rather than freshly connected.
    pub reused: bool,
    /// The last response head read on this connection, kept so that the next one parses
    /// into its field list instead of allocating one per response.
    pub response_head: ResponseHead,
    /// The last response on this connection had a body the relay could splice, so the next
    /// one is expected to be large too and its head is read in a small first read (see
    /// `relay::SMALL_HEAD_READ`).
    pub expect_large_body: bool,
}

/// Opens a connection, mapping failures (including the deadline) to `connect` errors.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Upstream, UpstreamError> {
    match TcpStream::connect_timeout(addr, timeout).await {
        Ok(stream) => {
            // Requests are written whole; Nagle would only add latency.
            let _ = stream.set_nodelay(true);
            Ok(Upstream {
                conn: Conn::new(stream, UPSTREAM_BUFFER),
                addr,
                reused: false,
                response_head: ResponseHead::default(),
                expect_large_body: false,
            })
        }
        Err(e) => {
            let os_error = match &e {
                GlommioError::IoError(e) | GlommioError::EnhancedIoError { source: e, .. } => {
                    e.raw_os_error()
                }
                _ => None,
            };
            let mut error = UpstreamError::new(ErrorKind::Connect, false, false, e);
            error.local = is_local_shortage(os_error);
            Err(error)
        }
    }
}

/// Errors that say this process (or host) is out of a resource, not that a server failed.
fn is_local_shortage(os_error: Option<i32>) -> bool {
    matches!(
        os_error,
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

struct Idle {
    upstream: Upstream,
    since: Instant,
}

/// Idle keep-alive connections of one shard, per server address.
#[derive(Default)]
pub struct Pool {
    idle: HashMap<SocketAddr, Vec<Idle>, BuildHasherDefault<AddrHasher>>,
}

/// The pool is looked up twice per request with keys that come from our own server set, not
/// from clients, so SipHash's flooding resistance buys nothing; this hash mixes each word with
/// MurmurHash3's 64-bit finaliser (two multiplies), enough for a handful of addresses.
#[derive(Default)]
pub struct AddrHasher(u64);

fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

impl Hasher for AddrHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, word: u64) {
        // The rotation keeps equal words at different positions from cancelling out.
        self.0 = fmix64(self.0.rotate_left(23) ^ word);
    }
    fn write_u32(&mut self, word: u32) {
        self.write_u64(u64::from(word));
    }
    fn write_u16(&mut self, word: u16) {
        self.write_u64(u64::from(word));
    }
    fn write_u8(&mut self, word: u8) {
        self.write_u64(u64::from(word));
    }
    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl Pool {
    /// Takes the most recently used idle connection to `addr` that is still within the pool's
    /// idle timeout and on which nothing arrived while it was idle (closing the others: bytes
    /// there would be read as the next request's response, by whichever client sent it).
    pub fn take(&mut self, addr: SocketAddr, now: Instant) -> Option<Upstream> {
        let list = self.idle.get_mut(&addr)?;
        while let Some(idle) = list.pop() {
            let mut upstream = idle.upstream;
            if now.duration_since(idle.since) >= POOL_IDLE_TIMEOUT {
                continue;
            }
            if upstream.conn.arrived_while_idle() {
                log::debug!(
                    "closing an idle connection to {addr}: the backend sent or closed something while it was idle"
                );
                continue;
            }
            upstream.reused = true;
            return Some(upstream);
        }
        None
    }

    /// Returns a connection whose exchange completed cleanly.
    pub fn put(&mut self, mut upstream: Upstream, now: Instant) {
        if upstream.conn.has_pending() {
            return; // stray bytes after a complete response: the connection is out of sync
        }
        let list = self.idle.entry(upstream.addr).or_default();
        if list.len() < POOL_MAX_IDLE_PER_SERVER {
            upstream.conn.go_idle();
            list.push(Idle {
                upstream,
                since: now,
            });
        }
    }

    /// Closes every idle connection to `addr` (the server was removed or is draining).
    pub fn close_idle(&mut self, addr: SocketAddr) {
        self.idle.remove(&addr);
    }

    /// Closes idle connections older than the pool timeout.
    pub fn sweep(&mut self, now: Instant) {
        self.idle.retain(|_, list| {
            list.retain(|i| now.duration_since(i.since) < POOL_IDLE_TIMEOUT);
            !list.is_empty()
        });
    }

    /// Closes everything (shutdown).
    pub fn clear(&mut self) {
        self.idle.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    #[test]
    fn addr_hash_is_deterministic_and_spreads_ports_and_hosts() {
        let build = BuildHasherDefault::<AddrHasher>::default();
        let mut seen = HashSet::new();
        for host in 1..=50u8 {
            for port in [80u16, 81, 8080, 9001, 65535] {
                let v4: SocketAddr = (std::net::Ipv4Addr::new(10, 0, 0, host), port).into();
                let v6: SocketAddr = (
                    std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, host.into()),
                    port,
                )
                    .into();
                for addr in [v4, v6] {
                    assert_eq!(build.hash_one(addr), build.hash_one(addr));
                    seen.insert(build.hash_one(addr));
                }
            }
        }
        assert_eq!(
            seen.len(),
            500,
            "no collisions among 500 distinct addresses"
        );
    }
}
