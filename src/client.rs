//! Per-shard backend connections: connect with a deadline, and a keep-alive pool per server.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;

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
            detail: detail.to_string(),
        }
    }

    /// Maps an I/O error on an established connection to its kind.
    pub fn from_io(err: &io::Error, reused: bool, request_sent: bool) -> Self {
        let kind = if err.kind() == io::ErrorKind::TimedOut {
            ErrorKind::Timeout
        } else {
            ErrorKind::Reset
        };
        UpstreamError::new(kind, reused, request_sent, err)
    }
}

/// One connection to a backend, with its receive buffer.
pub struct Upstream {
    pub conn: Conn,
    pub addr: SocketAddr,
    /// Taken from the pool rather than freshly connected.
    pub reused: bool,
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
            })
        }
        Err(e) => Err(UpstreamError::new(ErrorKind::Connect, false, false, e)),
    }
}

struct Idle {
    upstream: Upstream,
    since: Instant,
}

/// Idle keep-alive connections of one shard, per server address.
#[derive(Default)]
pub struct Pool {
    idle: HashMap<SocketAddr, Vec<Idle>>,
}

impl Pool {
    /// Takes the most recently used idle connection to `addr` that is still within the pool's
    /// idle timeout.
    pub fn take(&mut self, addr: SocketAddr, now: Instant) -> Option<Upstream> {
        let list = self.idle.get_mut(&addr)?;
        while let Some(idle) = list.pop() {
            if now.duration_since(idle.since) < POOL_IDLE_TIMEOUT {
                let mut upstream = idle.upstream;
                upstream.reused = true;
                return Some(upstream);
            }
        }
        None
    }

    /// Returns a connection whose exchange completed cleanly.
    pub fn put(&mut self, upstream: Upstream, now: Instant) {
        if upstream.conn.has_pending() {
            return; // stray bytes after a complete response: the connection is out of sync
        }
        let list = self.idle.entry(upstream.addr).or_default();
        if list.len() < POOL_MAX_IDLE_PER_SERVER {
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
