//! A response body on its way to the client: copied in as few sends as its arrival allows,
//! de-chunked for HTTP/1.0, copied for the cache, or spliced when it is large.

use std::io;

use super::{end_flight_unstored, StorePlan};
use crate::body::ChunkedDecoder;
use crate::buffers::{PooledBuffer, BODY_BUFFER};
use crate::client::Upstream;
use crate::http::{ResponseFraming, ResponseOptions};
use crate::lookup::FlightGuard;
use crate::metrics::ErrorKind;
use crate::shard::Shard;
use crate::splice::{self, Spliced, SPLICE_MIN};
use crate::stream::{Conn, Push};

/// Copies the response body to the client in its framing (or de-chunked for HTTP/1.0),
/// sending the already-rendered head (in `staged`) with the first bytes; copies it for the
/// cache too. Before each send, `staged` is topped up with whatever the backend has ready, so
/// a response leaves in as few sends as its arrival allows. `opts` are the head's: whether
/// the body is de-chunked, and whether the connection closes after it. `Err(())`: the client
/// went away.
pub(super) async fn stream_body(
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
                Err(e) => break Ok(BodyEnd::Failed(ErrorKind::of_io(&e))),
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
pub(super) struct StoreCopy<'p, 'f> {
    pub plan: &'p mut Option<StorePlan>,
    pub flight: Option<&'f FlightGuard>,
}

pub(super) enum BodyEnd {
    Complete,
    Failed(ErrorKind),
}

/// Reads more of a response body; `Some(kind)` when the backend failed mid-body.
async fn refill(upstream: &mut Upstream) -> Option<ErrorKind> {
    match upstream.conn.fill(crate::client::UPSTREAM_BUFFER).await {
        Ok(0) => Some(ErrorKind::Reset),
        Ok(_) => None,
        Err(e) => Some(ErrorKind::of_io(&e)),
    }
}
