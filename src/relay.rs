//! Moving one exchange's bytes: the request body to the backend, the response back to the client.

use std::io;
use std::time::{Duration, Instant};

use crate::body::ChunkedDecoder;
use crate::buffers::{PooledBuffer, BODY_BUFFER};
use crate::cache::flights::FlightEnd;
use crate::cache::{Storability, StoredHeader};
use crate::client::{Upstream, UpstreamError};
use crate::http::{
    parse_response, write_response_head, RequestFraming, ResponseFraming, ResponseHead,
    ResponseOptions, Version,
};
use crate::lookup::FlightGuard;
use crate::metrics::ErrorKind;
use crate::proxy::{cache_decision, store, Exchange, Failure, Next};
use crate::shard::Shard;
use crate::splice::{self, Spliced, SPLICE_MIN};
use crate::stream::{tunnel, Conn, Push};

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

/// Whether the backend has begun a final answer while the request body is still being sent.
/// Costs a read only when its poll reported something; interim (1xx) answers do not count
/// (they are relayed ahead of the final one).
fn answered_early(upstream: &mut Upstream) -> bool {
    if !upstream.conn.has_pending() {
        match upstream.conn.take_reported_input() {
            Ok(Some(n)) if n > 0 => {}
            Ok(None) => return false,
            // Closed or failed: reading the answer will tell what (if anything) came.
            Ok(Some(_)) | Err(_) => return true,
        }
    }
    starts_final_status(upstream.conn.pending())
}

/// Whether `bytes` begin a status line whose status is not 1xx ("HTTP/1.1 413"); anything
/// that is not a status line counts too (reading it as the answer fails it as malformed).
fn starts_final_status(bytes: &[u8]) -> bool {
    const STATUS_AT: usize = b"HTTP/1.1 ".len();
    match bytes.get(STATUS_AT) {
        Some(b'1') => !bytes.starts_with(b"HTTP/1."),
        Some(_) => true,
        None => !b"HTTP/1.1 ".starts_with(bytes) && !b"HTTP/1.0 ".starts_with(bytes),
    }
}

/// What the backend said to `Expect: 100-continue`.
pub enum Continue {
    SendBody,
    Answered(Relayed),
}

/// Waits briefly for the backend's interim answer before the body is sent: `100 Continue`
/// (relayed to the client, which then sends its body), a final answer (relayed; the body is
/// never sent), or silence (send the body anyway).
pub async fn await_continue(
    ex: &Exchange<'_>,
    client: &mut Conn,
    upstream: &mut Upstream,
    wait: Duration,
) -> Result<Continue, Failure> {
    let deadline = glommio::timer::now() + wait;
    let mut resp = ResponseHead::default();
    loop {
        match read_response_head(upstream, ex.head.is_head, &mut resp, deadline).await {
            Ok(()) => {}
            Err(Failure::Upstream(e)) if e.kind == ErrorKind::Timeout => {
                return Ok(Continue::SendBody)
            }
            Err(other) => return Err(other),
        }
        if !resp.interim {
            let relayed = relay_response(ex, client, upstream, ex.head_timeout, false).await?;
            return Ok(Continue::Answered(relayed));
        }
        let is_continue = resp.status == 100;
        relay_interim(ex, client, upstream, &resp).await?;
        if is_continue {
            return Ok(Continue::SendBody);
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

/// How much of a streamed request body reached the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyForwarded {
    Whole,
    /// The backend answered before the body was all sent (RFC 9112 §9.5: a 413 or 401 while
    /// the client is still uploading): the rest is not forwarded, the answer is relayed, and
    /// neither connection carries another exchange.
    AnsweredEarly,
}

/// Streams a request body that was not buffered from the client to the backend.
pub async fn forward_body(
    shard: &Shard,
    client: &mut Conn,
    upstream: &mut Upstream,
    framing: RequestFraming,
) -> Result<BodyForwarded, Failure> {
    let mut remaining = match framing {
        RequestFraming::Length(n) => n,
        RequestFraming::Chunked => u64::MAX,
        RequestFraming::None => return Ok(BodyForwarded::Whole),
    };
    let mut decoder = ChunkedDecoder::new();
    client.set_read_timeout(Some(shard.config.client_idle_timeout));
    loop {
        if answered_early(upstream) {
            return Ok(BodyForwarded::AnsweredEarly);
        }
        if client.has_pending() {
            let take = match framing {
                RequestFraming::Chunked => decoder
                    .feed(client.pending(), |_| {})
                    .map_err(|_| Failure::ClientStatus(400))?,
                _ => client.pending().len().min(remaining as usize),
            };
            if let Err(e) = upstream.conn.write_all(&client.pending()[..take]).await {
                // A backend that answered and closed without reading the rest (its close
                // with unread bytes is a reset): the answer is still in the socket.
                if matches!(upstream.conn.try_fill(), Ok(Some(n)) if n > 0) {
                    return Ok(BodyForwarded::AnsweredEarly);
                }
                let kind = if e.kind() == io::ErrorKind::TimedOut {
                    ErrorKind::Timeout
                } else {
                    ErrorKind::Reset
                };
                return Err(upstream_failure(kind, upstream, e));
            }
            client.consume(take);
            if framing != RequestFraming::Chunked {
                remaining -= take as u64;
            }
        }
        let finished = match framing {
            RequestFraming::Chunked => decoder.is_done(),
            _ => remaining == 0,
        };
        if finished {
            return Ok(BodyForwarded::Whole);
        }
        match client.fill(crate::http::MAX_HEAD_BYTES).await {
            Ok(n) if n > 0 => {}
            _ => return Err(Failure::Client),
        }
    }
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
        read_response_head(upstream, head.is_head, &mut resp, deadline).await?;
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

/// Copies the response body to the client in its framing (or de-chunked for HTTP/1.0),
/// sending the already-rendered head (in `staged`) with the first bytes; copies it for the
/// cache too. Before each send, `staged` is topped up with whatever the backend has ready, so
/// a response leaves in as few sends as its arrival allows. `opts` are the head's: whether
/// the body is de-chunked, and whether the connection closes after it. `Err(())`: the client
/// went away.
async fn stream_body(
    client: &mut Conn,
    upstream: &mut Upstream,
    framing: ResponseFraming,
    opts: &ResponseOptions<'_>,
    mut staged: PooledBuffer<'_>,
    store: StoreCopy<'_, '_>,
    shard: &Shard,
) -> Result<BodyEnd, ()> {
    let (dechunk, closing) = (opts.dechunk, !opts.keep_alive);
    let max_store = shard.config.cache_max_object_bytes;
    let StoreCopy { plan, flight } = store;
    // A body copied for the cache has to pass through user space anyway.
    let may_splice = plan.is_none();
    let mut collect = |bytes: &[u8]| {
        if let Some(p) = plan {
            if p.body.len() + bytes.len() > max_store {
                *plan = None;
                // Too large after all (chunked, or delimited by the close): the requests
                // waiting for it to be stored need not wait for the rest.
                end_flight_unstored(flight);
            } else {
                p.body.extend_from_slice(bytes);
            }
        }
    };

    upstream
        .conn
        .set_read_timeout(Some(shard.config.body_idle_timeout()));
    match framing {
        ResponseFraming::None => send_last(client, &mut staged, closing)
            .await
            .map_err(|_| ())
            .map(|_| BodyEnd::Complete),
        ResponseFraming::Length(n) => {
            let mut remaining = n;
            loop {
                let take = (upstream.conn.pending().len() as u64).min(remaining) as usize;
                remaining -= take as u64;
                if may_splice && remaining >= SPLICE_MIN {
                    if let Some(end) =
                        splice_rest(client, upstream, &mut staged, take, remaining, shard).await
                    {
                        break end;
                    }
                }
                let chunk = &upstream.conn.pending()[..take];
                collect(chunk);
                staged.extend_from_slice(chunk);
                upstream.conn.consume(take);
                let topped = top_up(upstream, &mut staged, remaining, &mut collect);
                remaining -= topped.read;
                let sent = if remaining == 0 {
                    send_last(client, &mut staged, closing).await
                } else {
                    send_staged(client, &mut staged).await
                };
                if sent.is_err() {
                    break Err(());
                }
                if remaining == 0 {
                    break Ok(BodyEnd::Complete);
                }
                match topped.stop {
                    Stop::Full => continue,
                    Stop::Closed | Stop::Failed => break Ok(BodyEnd::Failed(ErrorKind::Reset)),
                    Stop::Empty => {}
                }
                if let Some(kind) = refill(upstream).await {
                    break Ok(BodyEnd::Failed(kind));
                }
            }
        }
        ResponseFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new();
            loop {
                let pending = upstream.conn.pending();
                let fed = decoder.feed(pending, |data| {
                    collect(data);
                    if dechunk {
                        staged.extend_from_slice(data);
                    }
                });
                let consumed = match fed {
                    Ok(c) => c,
                    Err(_) => {
                        let _ = client.write_all(&staged).await;
                        break Ok(BodyEnd::Failed(ErrorKind::BadResponse));
                    }
                };
                if !dechunk {
                    staged.extend_from_slice(&pending[..consumed]);
                }
                upstream.conn.consume(consumed);
                let mut stop = Stop::Empty;
                if !decoder.is_done() && staged.len() < BODY_BUFFER {
                    stop = match upstream.conn.try_fill() {
                        Ok(Some(0)) => Stop::Closed,
                        Ok(Some(_)) => continue,
                        Ok(None) => Stop::Empty,
                        Err(_) => Stop::Failed,
                    };
                }
                if send_staged(client, &mut staged).await.is_err() {
                    break Err(());
                }
                if decoder.is_done() {
                    break Ok(BodyEnd::Complete);
                }
                if let Stop::Closed | Stop::Failed = stop {
                    break Ok(BodyEnd::Failed(ErrorKind::Reset));
                }
                if let Some(kind) = refill(upstream).await {
                    break Ok(BodyEnd::Failed(kind));
                }
            }
        }
        ResponseFraming::Close => loop {
            let chunk = upstream.conn.pending();
            collect(chunk);
            staged.extend_from_slice(chunk);
            upstream.conn.clear();
            let topped = top_up(upstream, &mut staged, u64::MAX, &mut collect);
            if send_staged(client, &mut staged).await.is_err() {
                break Err(());
            }
            match topped.stop {
                Stop::Full => continue,
                Stop::Closed => break Ok(BodyEnd::Complete),
                Stop::Failed => break Ok(BodyEnd::Failed(ErrorKind::Reset)),
                Stop::Empty => {}
            }
            match upstream.conn.fill(crate::client::UPSTREAM_BUFFER).await {
                Ok(0) => break Ok(BodyEnd::Complete),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    break Ok(BodyEnd::Failed(ErrorKind::Timeout))
                }
                Err(_) => break Ok(BodyEnd::Failed(ErrorKind::Reset)),
            }
        },
    }
}

/// Sends `staged` (the head, and any body bytes gathered before) followed by the first
/// `already_read` bytes of the backend connection's buffer (body bytes read with the head),
/// and splices the `remaining` body bytes from the backend's socket to the client's (see
/// `splice`). `None` when no pipe or non-blocking socket can be had: the caller copies
/// instead, with nothing sent or consumed yet.
async fn splice_rest(
    client: &mut Conn,
    upstream: &mut Upstream,
    staged: &mut Vec<u8>,
    already_read: usize,
    remaining: u64,
    shard: &Shard,
) -> Option<Result<BodyEnd, ()>> {
    client.make_spliceable().ok()?;
    upstream.conn.make_spliceable().ok()?;
    let mut pipe = shard.pipes.take()?;
    let read_body = &upstream.conn.pending()[..already_read];
    if crate::stream::send_gathered(&mut client.stream, staged, read_body, Push::More)
        .await
        .is_err()
    {
        return Some(Err(()));
    }
    staged.clear();
    upstream.conn.consume(already_read);
    let end = splice::splice_exact(
        &mut upstream.conn.stream,
        &mut client.stream,
        remaining,
        &mut pipe,
    )
    .await;
    shard.pipes.put(pipe);
    Some(match end {
        Spliced::Complete => Ok(BodyEnd::Complete),
        Spliced::BackendClosed | Spliced::BackendFailed => Ok(BodyEnd::Failed(ErrorKind::Reset)),
        Spliced::BackendTimedOut => Ok(BodyEnd::Failed(ErrorKind::Timeout)),
        Spliced::ClientGone => Err(()),
    })
}

/// Sends the response's last bytes. When the connection closes right after, they go with
/// MSG_MORE: TCP holds the last segment until the close, whose FIN then travels in it instead
/// of a segment of its own.
async fn send_last(client: &mut Conn, staged: &mut Vec<u8>, closing: bool) -> io::Result<()> {
    if closing && !staged.is_empty() {
        crate::splice::send_more(&mut client.stream, staged).await?;
        staged.clear();
        return Ok(());
    }
    send_staged(client, staged).await
}

/// Sends what `staged` holds (if anything) and empties it for the next gather.
async fn send_staged(client: &mut Conn, staged: &mut Vec<u8>) -> io::Result<()> {
    if !staged.is_empty() {
        client.write_all(staged).await?;
        staged.clear();
    }
    Ok(())
}

/// Why `top_up` stopped reading.
enum Stop {
    /// `staged` is full or the limit was reached: send, then top up again.
    Full,
    /// Nothing more is ready: send, then wait for the backend.
    Empty,
    /// The backend closed the connection.
    Closed,
    /// The backend connection failed.
    Failed,
}

struct TopUp {
    read: u64,
    stop: Stop,
}

/// Appends to `staged` (up to `BODY_BUFFER`, and at most `limit` bytes) what the backend has
/// ready right now, without waiting, passing each piece to `collect` too. The connection's own
/// buffer must be empty.
fn top_up(
    upstream: &Upstream,
    staged: &mut Vec<u8>,
    limit: u64,
    collect: &mut impl FnMut(&[u8]),
) -> TopUp {
    let mut read = 0u64;
    loop {
        let room = (BODY_BUFFER.saturating_sub(staged.len()) as u64).min(limit - read) as usize;
        if room == 0 {
            return TopUp {
                read,
                stop: Stop::Full,
            };
        }
        let before = staged.len();
        let stop = match upstream.conn.try_read_into(staged, room) {
            Ok(Some(0)) => Stop::Closed,
            Ok(Some(n)) => {
                collect(&staged[before..]);
                read += n as u64;
                continue;
            }
            Ok(None) => Stop::Empty,
            Err(_) => Stop::Failed,
        };
        return TopUp { read, stop };
    }
}

/// The copy of a body kept for the cache, and the misses waiting for it.
struct StoreCopy<'p, 'f> {
    plan: &'p mut Option<StorePlan>,
    flight: Option<&'f FlightGuard>,
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

enum BodyEnd {
    Complete,
    Failed(ErrorKind),
}

/// Reads more of a response body; `Some(kind)` when the backend failed mid-body.
async fn refill(upstream: &mut Upstream) -> Option<ErrorKind> {
    match upstream.conn.fill(crate::client::UPSTREAM_BUFFER).await {
        Ok(0) => Some(ErrorKind::Reset),
        Ok(_) => None,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Some(ErrorKind::Timeout),
        Err(_) => Some(ErrorKind::Reset),
    }
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
    fn an_early_answer_is_a_final_status_or_anything_that_is_not_a_status_line() {
        let cases: [(&[u8], bool); 11] = [
            (b"HTTP/1.1 413", true),
            (b"HTTP/1.0 401 No", true),
            (b"HTTP/1.1 200", true),
            (b"junk", true),
            (b"HTTP/2", true),
            // Interim answers, and status lines too short to tell yet.
            (b"HTTP/1.1 100 Continue", false),
            (b"HTTP/1.1 103", false),
            (b"HTTP/1.1 ", false),
            (b"HTTP/1.", false),
            (b"H", false),
            (b"", false),
        ];
        for (bytes, expected) in cases {
            let shown = String::from_utf8_lossy(bytes);
            assert_eq!(starts_final_status(bytes), expected, "{shown:?}");
        }
    }

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
