//! The cache in front of the proxy: serve hits, and coalesce concurrent misses for one key.
//!
//! The first miss for a key on a shard becomes the *leader* and goes to a backend; later
//! misses for the same key wait (at most `REQUEST_TIMEOUT`) for the leader to finish, then look
//! again. If the leader's response was stored they are served from the cache; if not, they
//! are forwarded normally — a waiter is never failed because of the leader.

use std::rc::Rc;
use std::time::Instant;

use crate::cache::{is_cacheable_request, CacheKey, CachedResponse, Lookup};
use crate::http::{RequestFraming, RequestHead, Version};
use crate::proxy::{CacheCandidate, Next};
use crate::shard::{Shard, Signal};
use crate::stream::Conn;

/// What the cache decided for one request.
pub enum CacheStep {
    /// Answered from the cache.
    Served(Next),
    /// Go to a backend. A candidate means the response may be stored; a guard means this
    /// request leads the misses for its key (dropping the guard releases the waiters).
    Forward(Option<CacheCandidate>, Option<FlightGuard>),
}

/// Held by the leading miss; on drop (whatever the outcome) wakes the waiters.
pub struct FlightGuard {
    shard: Rc<Shard>,
    key: CacheKey,
    signal: Rc<Signal>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.shard.flights.borrow_mut().remove(&self.key);
        self.signal.fire();
    }
}

/// Looks the request up in the shard's cache; serves a hit, or says how to forward.
pub async fn consult(
    shard: &Rc<Shard>,
    client: &mut Conn,
    head: &RequestHead,
    started: Instant,
) -> CacheStep {
    let buf = client.pending();
    let cacheable = shard.cache.borrow().capacity() > 0
        && matches!(
            head.framing,
            RequestFraming::None | RequestFraming::Length(0)
        )
        && is_cacheable_request(head.method(buf), head.path(buf), head.has_authorization);
    if !cacheable {
        return CacheStep::Forward(None, None);
    }
    let host = head.host_for_key(buf);
    let target = head.path(buf);
    let accept_encoding = head.header(buf, "accept-encoding");
    // A hit is looked up from the request's own bytes; only a miss copies them out.
    if let Some(entry) = get(shard, host, target, accept_encoding) {
        return CacheStep::Served(serve_hit(shard, client, head, &entry, started).await);
    }
    let candidate = CacheCandidate {
        host: host.to_vec(),
        target: target.to_vec(),
        accept_encoding: accept_encoding.map(<[u8]>::to_vec),
    };
    let key = CacheKey::new(&candidate.host, &candidate.target);
    let leader = shard.flights.borrow().get(&key).cloned();
    match leader {
        Some(signal) => {
            let wait = async {
                signal.wait().await;
                Ok(())
            };
            let _ = glommio::timer::timeout(shard.config.request_timeout, wait).await;
            let ae = candidate.accept_encoding.as_deref();
            if let Some(entry) = get(shard, &candidate.host, &candidate.target, ae) {
                return CacheStep::Served(serve_hit(shard, client, head, &entry, started).await);
            }
            shard.metrics.cache_misses.inc();
            CacheStep::Forward(Some(candidate), None)
        }
        None => {
            shard.metrics.cache_misses.inc();
            let signal = Rc::new(Signal::default());
            shard
                .flights
                .borrow_mut()
                .insert(key.clone(), signal.clone());
            let guard = FlightGuard {
                shard: shard.clone(),
                key,
                signal,
            };
            CacheStep::Forward(Some(candidate), Some(guard))
        }
    }
}

fn get(
    shard: &Shard,
    host: &[u8],
    target: &[u8],
    accept_encoding: Option<&[u8]>,
) -> Option<Rc<CachedResponse>> {
    let lookup = shard
        .cache
        .borrow_mut()
        .get(host, target, accept_encoding, Instant::now());
    match lookup {
        Lookup::Hit(entry) => Some(entry),
        Lookup::Miss => None,
    }
}

async fn serve_hit(
    shard: &Shard,
    client: &mut Conn,
    head: &RequestHead,
    entry: &CachedResponse,
    started: Instant,
) -> Next {
    shard.metrics.cache_hits.inc();
    let keep_alive = head.keep_alive && !shard.shutdown.is_fired();
    let mut out = shard.body_buffers.take();
    render_hit(entry, head, keep_alive, &mut out);
    client.consume(head.head_len);
    let written = client.write_all(&out).await.is_ok();
    shard
        .metrics
        .record_request(entry.status, started.elapsed());
    if written && keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// A cached response rendered for the client: stored headers plus Age and X-Cache.
fn render_hit(entry: &CachedResponse, head: &RequestHead, keep_alive: bool, out: &mut Vec<u8>) {
    use std::io::Write as _;
    let body = if head.is_head {
        &[][..]
    } else {
        &entry.body[..]
    };
    out.reserve(256 + body.len());
    let _ = write!(
        out,
        "HTTP/1.1 {} {}\r\n",
        entry.status,
        crate::http::reason_phrase(entry.status)
    );
    for (name, value) in &entry.headers {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    let _ = write!(
        out,
        "Age: {}\r\nX-Cache: HIT\r\nContent-Length: {}\r\n",
        entry.age(Instant::now()),
        entry.body.len()
    );
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    } else if head.version == Version::Http10 {
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}
