//! One attempt to serve a request through one server: take a pooled connection or open one,
//! send the request (and its body, after `100 Continue` if asked), relay the answer, and put
//! the connection back when it is clean.

use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use log::debug;

use crate::balancer::Pick;
use crate::client::{connect, Upstream, UpstreamError};
use crate::http::{RequestFraming, RequestHead};
use crate::lookup::{CacheCandidate, FlightGuard};
use crate::metrics::ErrorKind;
use crate::relay::{relay_response, Relayed};
use crate::shard::Shard;
use crate::stream::Conn;

/// How long to wait for a backend's `100 Continue` before sending the body anyway (as curl does).
const EXPECT_WAIT: Duration = Duration::from_secs(1);
/// Connect attempts give up after this (or REQUEST_TIMEOUT if shorter), then try another server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How the request body travels.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum BodyPlan {
    /// No body, or one small enough that it is inside `request` (replayable).
    Buffered,
    /// Streamed from the client after the head; cannot be replayed.
    Streamed(RequestFraming),
}

/// Why an exchange with one server ended without a response reaching the client.
pub enum Failure {
    /// The backend failed before the client received anything: may be retried.
    Upstream(UpstreamError),
    /// The client went away: close.
    Client,
    /// An answer of the balancer's own with this status, then close: the client broke its
    /// request body's framing, or the response cannot be delivered to it as it is.
    ClientStatus(u16),
}

/// One attempt to serve a request through one server.
pub struct Exchange<'a> {
    pub shard: &'a Rc<Shard>,
    pub head: &'a RequestHead,
    pub request: &'a [u8],
    pub plan: BodyPlan,
    pub candidate: Option<&'a CacheCandidate>,
    /// Present when this request leads the cache misses for its key.
    pub flight: Option<&'a FlightGuard>,
    pub head_timeout: Duration,
    pub started: Instant,
}

impl Exchange<'_> {
    /// Whether the request may be sent a second time after the backend took it and answered
    /// nothing (SPEC §6): an idempotent method without a body. Only such a request goes on a
    /// pooled connection, so a backend that closed one while idle (or reads a POST, then
    /// dies) never makes a request run twice, nor fail when it needs not.
    pub fn replayable(&self) -> bool {
        self.plan == BodyPlan::Buffered && may_send_twice(self.head)
    }

    pub async fn run(&self, client: &mut Conn, pick: &Pick) -> Result<Relayed, Failure> {
        let addr = pick.backend.addr;
        let replayable = self.replayable();
        let mut upstream = self.checkout(addr, replayable).await?;
        let outcome = self
            .send_and_relay(client, &mut upstream, self.head_timeout)
            .await;
        match outcome {
            // A pooled connection the backend had already closed: the request never reached
            // it, so send it again on a fresh connection. Not a failure of the server.
            Err(Failure::Upstream(e))
                if e.reused && replayable && e.kind == ErrorKind::Reset && !e.response_started =>
            {
                debug!("stale pooled connection to {addr}; retrying on a fresh one");
                let mut fresh = self.connect(addr).await?;
                self.send_and_relay(client, &mut fresh, self.head_timeout)
                    .await
                    .map(|r| self.release(fresh, r, pick))
            }
            other => other.map(|r| self.release(upstream, r, pick)),
        }
    }

    /// Pools the connection if it may carry another request: not when the server was drained
    /// or removed while this one was in flight (its idle connections were closed then).
    fn release(&self, upstream: Upstream, relayed: Relayed, pick: &Pick) -> Relayed {
        if relayed.reusable && self.shard.balancer.borrow().still_routes(pick) {
            self.shard
                .pool
                .borrow_mut()
                .put(upstream, glommio::timer::now());
        }
        relayed
    }

    /// A pooled connection when the request can be replayed should it turn out stale; a
    /// fresh one otherwise, because a backend may close an idle connection at any moment
    /// and a request with a body, or a POST, must not be sent twice.
    async fn checkout(&self, addr: SocketAddr, replayable: bool) -> Result<Upstream, Failure> {
        if !replayable {
            return self.connect(addr).await;
        }
        // The request's start time is recent enough for a 30 s idle check, and saves a clock read.
        let pooled = self.shard.pool.borrow_mut().take(addr, self.started);
        match pooled {
            Some(upstream) => {
                self.shard.metrics.upstream_reused.inc();
                Ok(upstream)
            }
            None => self.connect(addr).await,
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Upstream, Failure> {
        let timeout = self.head_timeout.min(CONNECT_TIMEOUT);
        let upstream = connect(addr, timeout).await.map_err(Failure::Upstream)?;
        // A backend that takes no byte of a request (a body larger than the socket buffers)
        // for REQUEST_TIMEOUT has not answered in that time either: 504, never a hang.
        let _ = upstream
            .conn
            .stream
            .set_write_timeout(Some(self.shard.config.request_timeout));
        self.shard.metrics.upstream_created.inc();
        Ok(upstream)
    }

    async fn send_and_relay(
        &self,
        client: &mut Conn,
        upstream: &mut Upstream,
        timeout: Duration,
    ) -> Result<Relayed, Failure> {
        let reused = upstream.reused;
        let sent_err = |e: io::Error| Failure::Upstream(UpstreamError::from_io(&e, reused, true));
        upstream
            .conn
            .write_all(self.request)
            .await
            .map_err(sent_err)?;
        let mut body_sent = self.plan == BodyPlan::Buffered;
        if let BodyPlan::Streamed(framing) = self.plan {
            if self.head.expect_continue {
                match crate::relay::await_continue(self, client, upstream, EXPECT_WAIT).await? {
                    crate::relay::Continue::SendBody => {}
                    crate::relay::Continue::Answered(relayed) => return Ok(relayed),
                }
            }
            let forwarded = crate::relay::forward_body(self, client, upstream, framing).await?;
            body_sent = forwarded == crate::relay::BodyForwarded::Whole;
        }
        relay_response(self, client, upstream, timeout, body_sent).await
    }
}

/// SPEC §6: only an idempotent method without a body may reach a backend twice.
/// `Content-Length: 0` is an empty body (RFC 9110 §8.6): such a request is as safe to replay
/// as one without the header.
pub fn may_send_twice(head: &RequestHead) -> bool {
    head.idempotent
        && matches!(
            head.framing,
            RequestFraming::None | RequestFraming::Length(0)
        )
}
