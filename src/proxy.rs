//! One client connection: read a head, answer from the cache or pick a server, forward, relay.
//!
//! Every decision about bytes (framing, rewriting, cacheability, what a failure means) is made
//! by the pure modules; this file sequences the I/O and the retry loop, and `exchange` runs
//! each attempt on one server.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use glommio::net::TcpStream;
use log::{debug, warn};

use crate::balancer::{Outcome, Pick};
use crate::body::ChunkedDecoder;
use crate::cache::flights::FlightEnd;
use crate::client::UpstreamError;
use crate::exchange::{may_send_twice, BodyPlan, Exchange, Failure};
use crate::http::{
    parse_request, write_error_head_for, write_error_response_for, write_forward_request,
    HttpError, RequestFraming, RequestHead, Version,
};
use crate::lookup::CacheStep;
use crate::metrics::ErrorKind;
use crate::shard::Shard;
use crate::startup::DEFER_ACCEPT_SILENCE;
use crate::stream::Conn;

/// What a read of the client's request body that brought nothing means: a client silent for
/// CLIENT_IDLE_TIMEOUT is told so with 408, as NGINX's `client_body_timeout` does, rather than
/// left to find its connection closed; a client that closed or failed is gone.
pub fn body_read_failure(read: io::Result<usize>) -> Failure {
    match read {
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Failure::ClientStatus(408),
        _ => Failure::Client,
    }
}

/// Initial receive buffer of a client connection; grows only for large heads.
pub const CLIENT_BUFFER: usize = 16 * 1024;
/// A head may fill the buffer up to the head limit plus room to detect going over it.
const CLIENT_BUFFER_MAX: usize = crate::http::MAX_HEAD_BYTES + 16 * 1024;
/// Request bodies up to this size are read whole before forwarding, so the request can be
/// replayed on another server or on a fresh connection after a stale pooled one.
pub const REPLAYABLE_BODY: u64 = 64 * 1024;
/// Each request gets at most this many retries, each on a server not tried yet.
const MAX_RETRIES: usize = 2;
/// After answering with an error on a connection that may still carry unread request bytes,
/// keep reading (and discarding) them this long so the client sees our answer, not a reset.
const LINGER: Duration = Duration::from_secs(2);

/// How long after its accept a connection's first request may still start once draining has
/// begun. A client sends its request right behind the handshake, so a request on its way when
/// the listener closed arrives within this; a connection silent for longer is idle, and is
/// closed like the idle keep-alive ones (and does not hold the process's exit).
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(500);
/// How long a connection waits for its next request with its receive buffer; idle longer, it
/// gives the buffer back until bytes arrive (an idle connection then costs no 16 KiB).
const IDLE_WITH_BUFFER: Duration = Duration::from_secs(1);

/// What happens to the client connection after a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    KeepAlive,
    Close,
    /// Answered, but the connection may hold unread request bytes: close gently.
    Linger,
}

/// Serves one accepted client connection until it closes.
pub async fn serve(shard: &Rc<Shard>, stream: TcpStream, peer: Option<SocketAddr>) {
    // TCP_NODELAY comes from the listener (Linux copies it to accepted sockets).
    let _ = stream.set_write_timeout(Some(shard.config.client_idle_timeout));
    let client_ip = peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |p| p.ip());
    let mut client = Conn::with_buffer(stream, shard.client_buffers.take_filled());
    let mut head = RequestHead {
        headers: shard.field_lists.take(),
        ..RequestHead::default()
    };
    let mut first_request_until = Some(glommio::timer::now() + FIRST_REQUEST_GRACE);
    loop {
        let read = read_head(shard, &mut client, &mut head, first_request_until.take()).await;
        let next = match read {
            HeadRead::Ready => {
                let started = glommio::timer::now();
                handle_request(shard, &mut client, &head, client_ip, started).await
            }
            HeadRead::Closed => Next::Close,
            HeadRead::Failed(error) => {
                debug!("rejecting request from {client_ip}: {error}");
                // The head did not parse, but its method may have: a HEAD gets no body. Empty
                // lines before a request line are ignored (RFC 9112 §2.2), here as by the parser.
                let pending = client.pending();
                let line = pending.iter().position(|b| !matches!(b, b'\r' | b'\n'));
                let head_only = line.is_some_and(|at| pending[at..].starts_with(b"HEAD "));
                let now = glommio::timer::now();
                respond_error(shard, &mut client, error.status(), head_only, now).await;
                Next::Linger
            }
        };
        match next {
            Next::KeepAlive if !shard.shutdown.is_fired() => continue,
            Next::KeepAlive | Next::Close => {
                // Bytes the client sent after this request (pipelined behind a
                // `Connection: close`) and left unread would make the close a reset, which can
                // destroy the response on its way: close in stages then (RFC 9112 §9.6). No
                // system call when the read poll reported nothing.
                client.clear();
                if client.arrived_while_idle() {
                    linger(&mut client).await;
                }
                break;
            }
            Next::Linger => {
                linger(&mut client).await;
                break;
            }
        }
    }
    shard.client_buffers.put_filled(client.into_buffer());
    shard.field_lists.put(head.headers);
}

enum HeadRead {
    Ready,
    Closed,
    Failed(HttpError),
}

struct RequestTimeout;

impl From<RequestTimeout> for HttpError {
    fn from(_: RequestTimeout) -> Self {
        HttpError::RequestTimeout
    }
}

/// Reads until a complete head is buffered. Idle connections (no byte of a next request) wait
/// up to CLIENT_IDLE_TIMEOUT and close silently, or at once on shutdown; a started head must
/// complete within CLIENT_HEADER_TIMEOUT of its first byte. `first_request_until` is given
/// for a connection's first request: on shutdown it may still start until then.
async fn read_head(
    shard: &Shard,
    client: &mut Conn,
    head: &mut RequestHead,
    first_request_until: Option<Instant>,
) -> HeadRead {
    let first = first_request_until.is_some();
    let config = &shard.config;
    let mut deadline = None;
    let mut idle_deadline = None;
    loop {
        if client.has_pending() {
            match parse_request(client.pending(), head) {
                Ok(true) => return HeadRead::Ready,
                Ok(false) => {}
                Err(e) => return HeadRead::Failed(e),
            }
            // Deadlines go by the executor's turn clock (one clock read per turn, not several
            // per request); it lags by at most one turn, which a timeout in seconds absorbs.
            let now = glommio::timer::now();
            let deadline = *deadline.get_or_insert(now + config.client_header_timeout);
            let left = deadline.saturating_duration_since(now);
            if left.is_zero() {
                return HeadRead::Failed(RequestTimeout.into());
            }
            client.set_read_timeout(Some(left));
            match client.fill(CLIENT_BUFFER_MAX).await {
                Ok(0) => return HeadRead::Closed,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    return HeadRead::Failed(RequestTimeout.into())
                }
                Err(_) => return HeadRead::Closed,
            }
        } else if shard.shutdown.is_fired() {
            // Draining: idle connections close, but a connection accepted just before the
            // listener closed still gets the first request that was on its way.
            let left = first_request_until.map_or(Duration::ZERO, |until| {
                until.saturating_duration_since(glommio::timer::now())
            });
            if left.is_zero() {
                return HeadRead::Closed;
            }
            client.set_read_timeout(Some(config.client_idle_timeout.min(left)));
            match client.fill(CLIENT_BUFFER_MAX).await {
                Ok(n) if n > 0 => {}
                _ => return HeadRead::Closed,
            }
        } else {
            // A deferred connection with nothing to read yet has been silent for about a
            // second already, in the kernel (see `startup::bind`): that counts too.
            let silent_before = match first && config.defer_accept {
                true => DEFER_ACCEPT_SILENCE,
                false => Duration::ZERO,
            };
            let idle = config.client_idle_timeout.saturating_sub(silent_before);
            let idle_until = *idle_deadline.get_or_insert_with(|| glommio::timer::now() + idle);
            // A busy connection's next request comes soon: wait for it with the buffer ready.
            // At least a moment, so that bytes already there are still read.
            let grace = idle.min(IDLE_WITH_BUFFER).max(Duration::from_millis(1));
            client.set_read_timeout(Some(grace));
            let read = shard
                .shutdown
                .unless_fired(client.fill(CLIENT_BUFFER_MAX))
                .await;
            match read {
                // The header deadline starts when a head turns out to be incomplete (the
                // `get_or_insert_with` above): most heads arrive whole, and need no clock read.
                Some(Ok(n)) if n > 0 => {}
                Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                    let left = idle_until.saturating_duration_since(glommio::timer::now());
                    if left.is_zero() {
                        return HeadRead::Closed;
                    }
                    // Idle for a while: hold no buffer until something arrives.
                    shard.client_buffers.put_filled(client.release_buffer());
                    client.set_read_timeout(Some(left));
                    let ready = shard.shutdown.unless_fired(client.readable()).await;
                    client.restore_buffer(shard.client_buffers.take_filled());
                    match ready {
                        Some(Ok(())) => {}
                        None if first => continue,
                        _ => return HeadRead::Closed,
                    }
                }
                // Shutdown while waiting for a first request: the grace branch above serves it.
                None if first => continue,
                _ => return HeadRead::Closed,
            }
        }
    }
}

/// Sends a response the balancer makes itself and counts it.
/// `head_only` for a HEAD request: its answer has no body (RFC 9110 §9.3.2).
pub async fn respond_error(
    shard: &Shard,
    client: &mut Conn,
    status: u16,
    head_only: bool,
    started: Instant,
) {
    let out = own_answer(status, false, Version::Http11, head_only);
    let _ = client.write_all(&out).await;
    shard.count_request(status, started);
}

/// A response the balancer makes itself: only its head when it answers a HEAD (RFC 9110
/// §9.3.2), whose body on a kept connection would be read as the next response.
fn own_answer(status: u16, keep_alive: bool, client_version: Version, head_only: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    if head_only {
        write_error_head_for(status, keep_alive, client_version, &mut out);
    } else {
        write_error_response_for(status, keep_alive, client_version, &mut out);
    }
    out
}

/// Answers a request the balancer could not forward (502, 503, 504). When the request was
/// read whole (no body, or a buffered one), the client keeps its connection, as NGINX and
/// Envoy do: a backend outage then costs clients no reconnections, and requests pipelined
/// behind this one are still answered. A body still on its way means closing.
async fn respond_unforwarded(
    shard: &Shard,
    client: &mut Conn,
    head: &RequestHead,
    read_whole: bool,
    status: u16,
    started: Instant,
) -> Next {
    let keep_alive = read_whole && head.keep_alive && !shard.shutdown.is_fired();
    let out = own_answer(status, keep_alive, head.version, head.is_head);
    let written = client.write_all(&out).await.is_ok();
    shard.count_request(status, started);
    match (keep_alive, written) {
        (true, true) => Next::KeepAlive,
        (true, false) => Next::Close,
        (false, _) => Next::Linger,
    }
}

/// Half-closes, then discards what the client still sends for a moment, so that a client
/// still writing its request reads our answer instead of a connection reset. Bounded by time
/// only: a cap on the bytes discarded let a fast uploader's unread bytes turn the close into
/// a reset, which destroys whatever of a large answer (an early 413 with a body) the kernel
/// had not sent yet.
async fn linger(client: &mut Conn) {
    let _ = client.stream.shutdown(std::net::Shutdown::Write).await;
    let deadline = Instant::now() + LINGER;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        client.clear();
        client.set_read_timeout(Some(left));
        match client.fill(CLIENT_BUFFER).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

async fn handle_request(
    shard: &Rc<Shard>,
    client: &mut Conn,
    head: &RequestHead,
    client_ip: IpAddr,
    started: Instant,
) -> Next {
    let forward = match crate::lookup::consult(shard, client, head, started).await {
        CacheStep::Served(next) => return next,
        CacheStep::TimedOut => {
            // The request (it has no body) is answered here: its bytes must not be read again.
            client.consume(head.head_len);
            return respond_unforwarded(shard, client, head, true, 504, started).await;
        }
        CacheStep::Forward(forward) => forward,
    };

    // The request as the backend will see it, built once and replayed on retries.
    let mut request = shard.request_buffers.take();
    write_forward_request(head, client.pending(), client_ip, &mut request);
    let plan = match head.framing {
        RequestFraming::None => BodyPlan::Buffered,
        // An empty body is complete already: nothing waits for `100 Continue`.
        RequestFraming::Length(n) if n <= REPLAYABLE_BODY && (!head.expect_continue || n == 0) => {
            match read_body_whole(shard, client, head.head_len, n as usize).await {
                Ok(()) => {
                    let body = &client.pending()[head.head_len..head.head_len + n as usize];
                    request.extend_from_slice(body);
                    client.consume(n as usize);
                    BodyPlan::Buffered
                }
                Err(Failure::ClientStatus(status)) => {
                    respond_error(shard, client, status, head.is_head, started).await;
                    return Next::Linger;
                }
                Err(_) => return Next::Close,
            }
        }
        RequestFraming::Chunked if !head.expect_continue => {
            match read_chunked_whole(shard, client, head.head_len).await {
                Ok(Some(len)) => {
                    let body = &client.pending()[head.head_len..head.head_len + len];
                    request.extend_from_slice(body);
                    client.consume(len);
                    BodyPlan::Buffered
                }
                Ok(None) => BodyPlan::Streamed(RequestFraming::Chunked),
                Err(Failure::ClientStatus(status)) => {
                    respond_error(shard, client, status, head.is_head, started).await;
                    return Next::Linger;
                }
                Err(_) => return Next::Close,
            }
        }
        framing => BodyPlan::Streamed(framing),
    };
    client.consume(head.head_len);
    // An answer of our own (502, 503, 504) may keep the connection only when nothing of this
    // request is left to read.
    let read_whole = plan == BodyPlan::Buffered;

    // Servers already tried for this request (no allocation on the request path).
    let mut tried = [None::<SocketAddr>; MAX_RETRIES + 1];
    let mut attempts = 0;
    let mut last_error: Option<UpstreamError> = None;
    loop {
        // An ejection ends when its period does, not at the next periodic rebuild.
        if shard
            .balancer
            .borrow_mut()
            .release_due(glommio::timer::now())
        {
            shard.refresh_ejected();
        }
        let pick = {
            let balancer = shard.balancer.borrow();
            let mut rng = shard.rng.borrow_mut();
            balancer.pick(&mut rng, |b| !tried[..attempts].contains(&Some(b.addr)))
        };
        let Some(pick) = pick else {
            let status = match &last_error {
                None => 503,
                Some(e) if e.kind == ErrorKind::Timeout => 504,
                Some(_) => 502,
            };
            if last_error.is_none() {
                debug!("no server can take a request from {client_ip}: 503");
            }
            return respond_unforwarded(shard, client, head, read_whole, status, started).await;
        };
        tried[attempts] = Some(pick.backend.addr);
        attempts += 1;
        let stats = shard.stats_for(&pick);
        if let Some(s) = &stats {
            s.requests.inc();
            s.in_flight.fetch_add(1, Relaxed);
        }
        let exchange = Exchange {
            shard,
            head,
            request: &request[..],
            plan,
            candidate: forward.candidate.as_ref(),
            flight: forward.flight.as_ref(),
            head_timeout: forward.head_timeout,
            started,
        };
        let result = exchange.run(client, &pick).await;
        if let Some(s) = &stats {
            s.in_flight.fetch_sub(1, Relaxed);
        }
        match result {
            Ok(relayed) => {
                record(shard, &pick, Outcome::Success);
                if let Some(kind) = relayed.backend_error {
                    if let Some(s) = &stats {
                        s.error(kind);
                    }
                }
                debug!(
                    "{client_ip} {} -> {} {} in {:?}",
                    String::from_utf8_lossy(
                        &request[..request.iter().position(|&c| c == b'\r').unwrap_or(0)]
                    ),
                    relayed.status,
                    pick.backend.label,
                    started.elapsed()
                );
                return relayed.next;
            }
            Err(Failure::Client) => {
                if let Some(flight) = &forward.flight {
                    flight.end(FlightEnd::Abandoned);
                }
                return Next::Close;
            }
            Err(Failure::ClientStatus(status)) => {
                respond_error(shard, client, status, head.is_head, started).await;
                return Next::Linger;
            }
            Err(Failure::Upstream(error)) if error.local => {
                shard.shortage.warn(|suppressed| {
                    warn!(
                        "shard {}: cannot open a connection to {}: {} ({suppressed} more such \
                         failures since the last warning); raise the descriptor limit \
                         (LimitNOFILE, ulimit -n)",
                        shard.id, pick.backend.label, error.detail
                    )
                });
                return respond_unforwarded(shard, client, head, read_whole, 503, started).await;
            }
            Err(Failure::Upstream(error)) => {
                debug!("backend {} failed: {error}", pick.backend.label);
                // A waiter on a timed-out cache miss had less than REQUEST_TIMEOUT: running
                // out of it says nothing against the server.
                let shortened = forward.head_timeout < shard.config.request_timeout;
                if !(error.kind == ErrorKind::Timeout && shortened) {
                    if let Some(s) = &stats {
                        s.error(error.kind);
                    }
                    record(shard, &pick, Outcome::Failure);
                }
                // A failed connect sent nothing, so anything may go elsewhere; a reset after
                // sending only idempotent requests without a body, and only before any
                // response byte (a backend that began answering may have acted on it).
                let retry = attempts <= MAX_RETRIES
                    && match error.kind {
                        ErrorKind::Connect | ErrorKind::Reset => {
                            !error.request_sent || (may_send_twice(head) && !error.response_started)
                        }
                        ErrorKind::Timeout | ErrorKind::BadResponse => false,
                    };
                if !retry {
                    let status = if error.kind == ErrorKind::Timeout {
                        if let Some(flight) = &forward.flight {
                            flight.end(FlightEnd::TimedOut);
                        }
                        504
                    } else {
                        502
                    };
                    return respond_unforwarded(shard, client, head, read_whole, status, started)
                        .await;
                }
                last_error = Some(error);
            }
        }
    }
}

fn record(shard: &Shard, pick: &Pick, outcome: Outcome) {
    let changed = shard
        .balancer
        .borrow_mut()
        .record(pick, outcome, glommio::timer::now());
    if changed {
        shard.refresh_ejected();
    }
}

/// Reads until `len` body bytes follow the head in the client buffer.
async fn read_body_whole(
    shard: &Shard,
    client: &mut Conn,
    head_len: usize,
    len: usize,
) -> Result<(), Failure> {
    client.set_read_timeout(Some(shard.config.client_idle_timeout));
    while client.pending().len() < head_len + len {
        match client.fill(head_len + len + CLIENT_BUFFER).await {
            Ok(n) if n > 0 => {}
            read => return Err(body_read_failure(read)),
        }
    }
    Ok(())
}

/// Reads a chunked body that ends within REPLAYABLE_BODY bytes; its raw length, or `None`
/// when it is longer (the bytes read so far stay buffered for streaming).
async fn read_chunked_whole(
    shard: &Shard,
    client: &mut Conn,
    head_len: usize,
) -> Result<Option<usize>, Failure> {
    let mut decoder = ChunkedDecoder::new();
    let mut decoded = 0;
    client.set_read_timeout(Some(shard.config.client_idle_timeout));
    loop {
        let body = &client.pending()[head_len..];
        decoded += decoder
            .feed(&body[decoded..], |_| {})
            .map_err(|_| Failure::ClientStatus(400))?;
        if decoder.is_done() {
            return Ok(Some(decoded));
        }
        if decoded as u64 >= REPLAYABLE_BODY {
            return Ok(None);
        }
        let limit = head_len + REPLAYABLE_BODY as usize + CLIENT_BUFFER;
        match client.fill(limit).await {
            Ok(n) if n > 0 => {}
            read => return Err(body_read_failure(read)),
        }
    }
}
