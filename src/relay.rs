//! Moving one exchange's bytes: the request body to the backend, the response back to the client.
//! This module reads the response head and decides how the response travels (kept for the
//! cache, spliced, tunnelled); `request` sends the request body, `response_body` moves the
//! response body.

mod request;
mod response_body;

pub use request::{await_continue, forward_body, BodyForwarded, Continue};

use std::io;
use std::time::{Duration, Instant};

use crate::cache::flights::FlightEnd;
use crate::cache::{Storability, StoredHeader};
use crate::client::{Upstream, UpstreamError};
use crate::exchange::{Exchange, Failure};
use crate::http::{
    parse_response, write_response_head, ResponseFraming, ResponseHead, ResponseOptions, Version,
};
use crate::lookup::FlightGuard;
use crate::lookup::{cache_decision, store};
use crate::metrics::ErrorKind;
use crate::proxy::Next;
use crate::splice::SPLICE_MIN;
use crate::stream::{tunnel, Conn};
use response_body::{stream_body, BodyEnd, StoreCopy};

/// A backend's receive buffer may grow to hold a head this large (then the head is refused).
const UPSTREAM_BUFFER_MAX: usize = crate::http::MAX_HEAD_BYTES + 16 * 1024;
/// The first read of a response head on a connection whose last body was large (spliced).
/// Reading the usual 16 KiB would take up to 16 KiB of body with the head, and those bytes
/// cross user space twice (copied in, then sent back out) where spliced ones do not; 2 KiB
/// holds a typical head (a longer one takes another read) and leaves the body in the socket.
/// A small response after a large one pays with an extra `recv` when it is over 2 KiB.
pub const SMALL_HEAD_READ: usize = 2 * 1024;
/// Upgraded (WebSocket) tunnels close after this long without a byte in either direction.
pub const TUNNEL_IDLE: Duration = Duration::from_secs(3600);

/// A response that reached the client (completely, or cut short by a failure mid-body).
pub struct Relayed {
    pub status: u16,
    pub next: Next,
    /// The backend connection is in a clean state and may go back to the pool.
    pub reusable: bool,
    /// The backend failed after the response had started (counted, but no retry is possible).
    pub backend_error: Option<ErrorKind>,
}

impl Relayed {
    fn cut_short(status: u16, kind: Option<ErrorKind>) -> Self {
        Relayed {
            status,
            next: Next::Close,
            reusable: false,
            backend_error: kind,
        }
    }
}

fn upstream_failure(
    kind: ErrorKind,
    upstream: &Upstream,
    detail: impl std::fmt::Display,
) -> Failure {
    let mut e = UpstreamError::new(kind, upstream.reused, true, detail);
    e.response_started = upstream.conn.has_pending();
    Failure::Upstream(e)
}

/// Reads until a complete response head is buffered (left unconsumed), or the deadline passes.
async fn read_response_head(
    upstream: &mut Upstream,
    request_was_head: bool,
    resp: &mut ResponseHead,
    deadline: Instant,
) -> Result<(), Failure> {
    loop {
        if upstream.conn.has_pending() {
            match parse_response(upstream.conn.pending(), request_was_head, resp) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(upstream_failure(ErrorKind::BadResponse, upstream, e)),
            }
        }
        let left = deadline.saturating_duration_since(glommio::timer::now());
        if left.is_zero() {
            return Err(upstream_failure(
                ErrorKind::Timeout,
                upstream,
                "no response head in time",
            ));
        }
        upstream.conn.set_read_timeout(Some(left));
        let first_read = if upstream.expect_large_body && !upstream.conn.has_pending() {
            SMALL_HEAD_READ
        } else {
            usize::MAX
        };
        match upstream
            .conn
            .fill_at_most(UPSTREAM_BUFFER_MAX, first_read)
            .await
        {
            Ok(0) => {
                return Err(upstream_failure(
                    ErrorKind::Reset,
                    upstream,
                    "closed before the response head",
                ))
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                return Err(upstream_failure(
                    ErrorKind::Timeout,
                    upstream,
                    "no response head in time",
                ))
            }
            Err(e) if e.to_string().contains("receive buffer full") => {
                return Err(upstream_failure(
                    ErrorKind::BadResponse,
                    upstream,
                    "response head too large",
                ))
            }
            Err(e) => return Err(upstream_failure(ErrorKind::Reset, upstream, e)),
        }
    }
}

async fn relay_interim(
    ex: &Exchange<'_>,
    client: &mut Conn,
    upstream: &mut Upstream,
    resp: &ResponseHead,
) -> Result<(), Failure> {
    // HTTP/1.0 clients do not understand interim responses (RFC 9110 §15.2).
    if ex.head.version == Version::Http11 {
        let mut out = Vec::with_capacity(resp.head_len);
        let opts = ResponseOptions {
            keep_alive: true,
            client_version: Version::Http11,
            dechunk: false,
            extra: &[],
        };
        write_response_head(resp, upstream.conn.pending(), &opts, &mut out);
        client.write_all(&out).await.map_err(|_| Failure::Client)?;
    }
    upstream.conn.consume(resp.head_len);
    Ok(())
}

/// Relays the backend's response (interim ones first) to the client.
pub async fn relay_response(
    ex: &Exchange<'_>,
    client: &mut Conn,
    upstream: &mut Upstream,
    timeout: Duration,
    body_sent: bool,
) -> Result<Relayed, Failure> {
    let shard = ex.shard;
    let head = ex.head;
    let deadline = glommio::timer::now() + timeout;
    // Handed back below once the response is relayed whole (the connection may be reused);
    // on any other outcome the connection is closed and its head goes with it.
    let mut resp = std::mem::take(&mut upstream.response_head);
    let mut interim_relayed = false;
    loop {
        read_response_head(upstream, head.is_head, &mut resp, deadline)
            .await
            .map_err(|failure| match failure {
                // The client has an interim answer from this backend: the exchange began, and
                // a retry would have the backend do the work twice and the client see the
                // interim answer twice.
                Failure::Upstream(mut e) if interim_relayed => {
                    e.response_started = true;
                    Failure::Upstream(e)
                }
                other => other,
            })?;
        if !resp.interim {
            break;
        }
        relay_interim(ex, client, upstream, &resp).await?;
        interim_relayed = true;
    }
    let status = resp.status;
    if let Some(flight) = ex.flight {
        flight.answered();
    }
    // Only one that closes: a backend answering 408 to requests as such is relayed.
    if status == 408 && !resp.keep_alive && upstream.reused && !interim_relayed && ex.replayable() {
        // A backend's idle timeout that crossed the request on its way: the connection was
        // stale, and the caller sends the request again on a fresh one (as browsers do).
        return Err(Failure::Upstream(UpstreamError::new(
            ErrorKind::Reset,
            true,
            true,
            "408 on a reused connection: the backend had timed it out",
        )));
    }

    if resp.upgraded {
        if !head.websocket_upgrade {
            return Err(upstream_failure(
                ErrorKind::BadResponse,
                upstream,
                "101 to a request that asked for no upgrade",
            ));
        }
        return Ok(switch_protocols(ex, client, upstream, &resp).await);
    }
    if resp.transfer_coded
        && head.version == Version::Http10
        && resp.framing != ResponseFraming::None
    {
        // Only chunked can be taken off for an HTTP/1.0 client (which must get no
        // Transfer-Encoding); a body still gzip-coded would reach it as if it were plain.
        end_flight_unstored(ex.flight);
        return Err(Failure::ClientStatus(502));
    }

    let dechunk = head.version == Version::Http10 && resp.framing == ResponseFraming::Chunked;
    let keep_alive = head.keep_alive
        && body_sent
        && !shard.shutdown.is_fired()
        && resp.framing != ResponseFraming::Close
        && !dechunk;

    let pending = upstream.conn.pending();
    let mut store_plan = plan_store(ex, &resp, pending);
    if store_plan.is_none() {
        end_flight_unstored(ex.flight);
    }
    let large_body = splices_after_small_head_read(resp.framing, store_plan.is_some());
    let extra: &[(&str, &str)] = if ex.candidate.is_some() {
        &[("X-Cache", "MISS")]
    } else {
        &[]
    };
    let mut out = shard.body_buffers.take();
    let opts = ResponseOptions {
        keep_alive,
        client_version: head.version,
        dechunk,
        extra,
    };
    write_response_head(&resp, pending, &opts, &mut out);
    upstream.conn.consume(resp.head_len);

    let body = stream_body(
        client,
        upstream,
        resp.framing,
        &opts,
        out,
        StoreCopy {
            plan: &mut store_plan,
            flight: ex.flight,
        },
        shard,
    )
    .await;
    shard.count_request(status, ex.started);
    match body {
        Err(()) => {
            // The client left mid-body: nothing is stored for the waiters (if any) either.
            if let Some(flight) = ex.flight {
                flight.end(FlightEnd::Abandoned);
            }
            Ok(Relayed::cut_short(status, None))
        }
        Ok(BodyEnd::Failed(kind)) => {
            // A client told the body's length, or reading chunks, sees it cut short by the
            // missing bytes or last chunk; one reading until the close needs a reset to tell
            // (SPEC §6: never a body presented as complete).
            if dechunk || resp.framing == ResponseFraming::Close {
                client.reset_on_close();
            }
            Ok(Relayed::cut_short(status, Some(kind)))
        }
        Ok(BodyEnd::Complete) => {
            match (ex.candidate, store_plan) {
                (Some(candidate), Some(plan)) => store(shard, candidate, status, plan),
                // Over CACHE_MAX_OBJECT_BYTES only once its body arrived.
                _ => end_flight_unstored(ex.flight),
            }
            let next = if keep_alive {
                Next::KeepAlive
            } else if body_sent {
                Next::Close
            } else {
                Next::Linger
            };
            let reusable = resp.keep_alive && body_sent && resp.framing != ResponseFraming::Close;
            upstream.response_head = resp;
            upstream.expect_large_body = large_body;
            Ok(Relayed {
                status,
                next,
                reusable,
                backend_error: None,
            })
        }
    }
}

/// Releases the requests waiting on this cache miss to go to a backend themselves, at once:
/// nothing will be stored for them to wait for.
fn end_flight_unstored(flight: Option<&FlightGuard>) {
    if let Some(flight) = flight {
        flight.end(FlightEnd::NotStored);
    }
}

/// Whether a response framed like this one would have (nearly) all its body spliced were its
/// head read with `SMALL_HEAD_READ`: then the next response on the connection is read that way.
/// A body copied for the cache crosses user space anyway, so it does not count.
fn splices_after_small_head_read(framing: ResponseFraming, copied_for_cache: bool) -> bool {
    !copied_for_cache
        && matches!(framing, ResponseFraming::Length(n) if n >= SPLICE_MIN + SMALL_HEAD_READ as u64)
}

/// The copy to keep for the cache, when the request was a cacheable miss and the response
/// may be stored (SPEC §7).
fn plan_store(ex: &Exchange<'_>, resp: &ResponseHead, pending: &[u8]) -> Option<StorePlan> {
    let shard = ex.shard;
    let status = resp.status;
    let head = ex.head;
    if let (Some(_), false) = (ex.candidate, head.is_head) {
        let headers: Vec<(&[u8], &[u8])> = resp.headers(pending).collect();
        let body_len = match resp.framing {
            ResponseFraming::Length(n) => Some(n),
            ResponseFraming::None => Some(0),
            _ => None,
        };
        if let Storability::Store {
            ttl,
            age,
            vary_accept_encoding,
        } = cache_decision(shard, status, &headers, body_len)
        {
            // Unfiltered: the cache strips hop-by-hop fields itself, including those that
            // this response's Connection header names.
            let kept = headers
                .iter()
                .map(|(n, v)| (Box::from(*n), Box::from(*v)))
                .collect::<Vec<StoredHeader>>();
            return Some(StorePlan {
                headers: kept,
                vary_accept_encoding,
                ttl,
                age,
                body: Vec::new(),
            });
        }
    }
    None
}

/// A response body being copied for the cache while it streams to the client.
pub struct StorePlan {
    pub headers: Vec<StoredHeader>,
    pub vary_accept_encoding: bool,
    pub ttl: Duration,
    /// Seconds old on arrival (its `Age`).
    pub age: u64,
    pub body: Vec<u8>,
}

/// `101 Switching Protocols` to a WebSocket request: relay the head, then tunnel bytes.
async fn switch_protocols(
    ex: &Exchange<'_>,
    client: &mut Conn,
    upstream: &mut Upstream,
    resp: &ResponseHead,
) -> Relayed {
    let mut out = Vec::with_capacity(resp.head_len + 64);
    let opts = ResponseOptions {
        keep_alive: true,
        client_version: Version::Http11,
        dechunk: false,
        extra: &[],
    };
    write_response_head(resp, upstream.conn.pending(), &opts, &mut out);
    upstream.conn.consume(resp.head_len);
    out.extend_from_slice(upstream.conn.pending());
    upstream.conn.clear();
    ex.shard.count_request(101, ex.started);
    if client.write_all(&out).await.is_err() {
        return Relayed::cut_short(101, None);
    }
    if client.has_pending() {
        let early = client.pending().to_vec();
        client.consume(early.len());
        if upstream.conn.write_all(&early).await.is_err() {
            return Relayed::cut_short(101, None);
        }
    }
    tunnel(&mut client.stream, &mut upstream.conn.stream, TUNNEL_IDLE).await;
    Relayed::cut_short(101, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_body_that_would_be_spliced_after_a_small_head_read_predicts_a_large_next_one() {
        let big = SPLICE_MIN + SMALL_HEAD_READ as u64;
        assert!(splices_after_small_head_read(
            ResponseFraming::Length(big),
            false
        ));
        assert!(splices_after_small_head_read(
            ResponseFraming::Length(64 * 1024),
            false
        ));
        // One byte short: the body left behind a full small read could fall under SPLICE_MIN.
        assert!(!splices_after_small_head_read(
            ResponseFraming::Length(big - 1),
            false
        ));
        // Copied for the cache, it crossed user space anyway.
        assert!(!splices_after_small_head_read(
            ResponseFraming::Length(big),
            true
        ));
        // Only Content-Length bodies are spliced.
        for framing in [
            ResponseFraming::Chunked,
            ResponseFraming::Close,
            ResponseFraming::None,
        ] {
            assert!(
                !splices_after_small_head_read(framing, false),
                "{framing:?}"
            );
        }
    }
}
