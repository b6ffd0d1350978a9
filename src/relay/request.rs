//! The request body on its way to the backend, and what the backend says before it is all
//! sent: `100 Continue`, other interim answers, or a final answer given early.

use std::time::Duration;

use super::{
    read_response_head, relay_interim, relay_response, upstream_failure, Relayed,
    UPSTREAM_BUFFER_MAX,
};
use crate::body::ChunkedDecoder;
use crate::client::Upstream;
use crate::exchange::{Exchange, Failure};
use crate::http::{parse_response, RequestFraming, ResponseHead};
use crate::metrics::ErrorKind;
use crate::stream::Conn;

/// Relays the interim (1xx) answers the backend has sent while the request body is on its
/// way, and tells whether it has begun a final answer (or closed, failed, or sent something
/// malformed, which reading the answer will judge). Reads only what the read poll reported:
/// no system call otherwise. Every interim head it finds is relayed and consumed, so bytes
/// behind one (another hint, an early 413) are seen, and nothing is left in the socket to
/// wake the caller's wait for the client again and again.
async fn hear_backend(
    ex: &Exchange<'_>,
    client: &mut Conn,
    upstream: &mut Upstream,
) -> Result<bool, Failure> {
    loop {
        match upstream.conn.take_reported_input() {
            Ok(Some(0)) | Err(_) => return Ok(true),
            Ok(_) => {}
        }
        let pending = upstream.conn.pending();
        if pending.is_empty() {
            return Ok(false);
        }
        if starts_final_status(pending) {
            return Ok(true);
        }
        let mut resp = ResponseHead::default();
        match parse_response(pending, ex.head.is_head, &mut resp) {
            Ok(true) if resp.interim => relay_interim(ex, client, upstream, &resp).await?,
            // A 101 nobody asked for, or a malformed head: the relay fails it.
            Ok(true) | Err(_) => return Ok(true),
            // A long interim head (a 103 with many links): room for the rest of it, up to
            // the size at which the relay refuses any head.
            Ok(false) if upstream.conn.is_full() => {
                if !upstream.conn.grow(UPSTREAM_BUFFER_MAX) {
                    return Ok(true);
                }
            }
            Ok(false) => return Ok(false),
        }
    }
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
    ex: &Exchange<'_>,
    client: &mut Conn,
    upstream: &mut Upstream,
    framing: RequestFraming,
) -> Result<BodyForwarded, Failure> {
    let shard = ex.shard;
    let mut remaining = match framing {
        RequestFraming::Length(n) => n,
        RequestFraming::Chunked => u64::MAX,
        RequestFraming::None => return Ok(BodyForwarded::Whole),
    };
    let mut decoder = ChunkedDecoder::new();
    client.set_read_timeout(Some(shard.config.client_idle_timeout));
    // The client's read timeout bounds the wait for its body; the backend is only watched.
    upstream.conn.set_read_timeout(None);
    loop {
        if hear_backend(ex, client, upstream).await? {
            return Ok(BodyForwarded::AnsweredEarly);
        }
        if client.has_pending() {
            let take = match framing {
                RequestFraming::Chunked => decoder
                    .feed(client.pending(), |_| {})
                    .map_err(|_| Failure::ClientStatus(400))?,
                _ => client.pending().len().min(remaining as usize),
            };
            let mut written = 0;
            while written < take {
                match upstream
                    .conn
                    .write_or_hear(&client.pending()[written..take])
                    .await
                {
                    Ok(Some(n)) => written += n,
                    // The backend spoke while its socket had no room for more of the body.
                    Ok(None) => {
                        if hear_backend(ex, client, upstream).await? {
                            return Ok(BodyForwarded::AnsweredEarly);
                        }
                    }
                    Err(e) => {
                        // A backend that answered and closed without reading the rest (its
                        // close with unread bytes is a reset): the answer is still in the socket.
                        if matches!(upstream.conn.try_fill(), Ok(Some(n)) if n > 0) {
                            return Ok(BodyForwarded::AnsweredEarly);
                        }
                        return Err(upstream_failure(ErrorKind::of_io(&e), upstream, e));
                    }
                }
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
        // While the client's next bytes are awaited, the backend may answer (it need not wait
        // for a body it refuses, and the client may be waiting for that answer before it
        // sends more): whichever comes first. The top of the loop tells an answer from an
        // interim one; the backend's read is cancelled harmlessly, as it reads nothing.
        let waited = futures_lite::future::or(
            async { Some(client.fill(crate::http::MAX_HEAD_BYTES).await) },
            async {
                let _ = upstream.conn.readable().await;
                None
            },
        )
        .await;
        match waited {
            None => {}
            Some(Ok(n)) if n > 0 => {}
            Some(read) => return Err(crate::proxy::body_read_failure(read)),
        }
    }
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
}
