//! The cache in front of the proxy: serve hits, coalesce concurrent misses for one key, and
//! store the responses the cache rules allow.
//!
//! The first miss for a key on a shard leads and goes to a backend; later misses for the
//! same key wait for it (see `cache::flights`), then look again. If the leader's response was
//! stored they are served from the cache; if it may not be stored, they are released as soon
//! as its head says so and forwarded themselves, and the key's next misses skip the wait for a
//! while. A waiter waits at most `REQUEST_TIMEOUT`; one whose leader timed out waiting for a
//! response head has only the rest of its own `REQUEST_TIMEOUT` left, so a silent backend
//! costs it one timeout, not two.

use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::cache::flights::{Flight, FlightEnd, Join};
use crate::cache::{
    is_cacheable_request, storability, CacheKey, CachedResponse, Lookup, Storability,
};
use crate::http::{write_hit_head, write_not_modified_head, RequestFraming, RequestHead};
use crate::proxy::Next;
use crate::shard::Shard;
use crate::stream::{send_gathered, Conn, Push};

/// Below this much of its `REQUEST_TIMEOUT` left, a waiter whose leader timed out answers 504
/// at once rather than try a backend it cannot wait for.
const MIN_HEAD_WAIT: Duration = Duration::from_millis(1);

/// The parts of a cacheable request's key, copied out of the client buffer on a miss.
pub struct CacheCandidate {
    pub host: Vec<u8>,
    pub target: Vec<u8>,
    pub accept_encoding: Option<Vec<u8>>,
}

/// Stores a completed response if the cache rules allow it.
pub fn store(
    shard: &Shard,
    candidate: &CacheCandidate,
    status: u16,
    plan: crate::relay::StorePlan,
) {
    let now = Instant::now();
    let body = Rc::from(plan.body.into_boxed_slice());
    let response =
        CachedResponse::new(status, plan.headers, body, now, plan.ttl).arrived_aged(plan.age);
    let mut cache = shard.cache.borrow_mut();
    cache.insert(
        &candidate.host,
        &candidate.target,
        candidate.accept_encoding.as_deref(),
        plan.vary_accept_encoding,
        response,
        now,
    );
    shard.metrics.cache_entries.set(cache.len() as u64);
    shard.metrics.cache_evictions.set(cache.stats().evictions);
}

/// Whether a response may be stored (SPEC §7), given its status and headers.
pub fn cache_decision(
    shard: &Shard,
    status: u16,
    headers: &[(&[u8], &[u8])],
    body_len: Option<u64>,
) -> Storability {
    storability(
        status,
        headers,
        body_len,
        shard.config.cache_ttl,
        shard.config.cache_max_object_bytes,
    )
}

/// What the cache decided for one request.
pub enum CacheStep {
    /// Answered from the cache.
    Served(Next),
    /// Go to a backend.
    Forward(Forward),
    /// It waited its whole `REQUEST_TIMEOUT` on a leader that got no response head: 504.
    TimedOut,
}

/// How to forward a request the cache did not answer.
pub struct Forward {
    /// Present when the response may be stored.
    pub candidate: Option<CacheCandidate>,
    /// Present when this request leads the misses for its key.
    pub flight: Option<FlightGuard>,
    /// How long to wait for the response head: `REQUEST_TIMEOUT`, or what is left of it.
    pub head_timeout: Duration,
}

impl Forward {
    fn plain(shard: &Shard, candidate: Option<CacheCandidate>) -> Self {
        Forward {
            candidate,
            flight: None,
            head_timeout: shard.config.request_timeout,
        }
    }
}

/// Held by the leading miss. The exchange ends it as soon as it knows how (dropping it ends it
/// as `Done`), which wakes the waiters.
pub struct FlightGuard {
    shard: Rc<Shard>,
    key: CacheKey,
    flight: Rc<Flight>,
}

impl FlightGuard {
    /// The leader's response head has arrived (see `Flight::mark_answered`).
    pub fn answered(&self) {
        self.flight.mark_answered();
    }

    pub fn end(&self, end: FlightEnd) {
        self.shard
            .flights
            .borrow_mut()
            .end(&self.key, &self.flight, end, glommio::timer::now());
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.end(FlightEnd::Done);
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
        return CacheStep::Forward(Forward::plain(shard, None));
    }
    let host = head.host_for_key(buf);
    let target = head.path(buf);
    // Every line of it: the backend sees them all, so a key made of the first alone would
    // let `gzip` + `br` lines store a `br` body under `gzip`.
    let accept_encoding = head.combined_header(buf, "accept-encoding");
    let accept_encoding = accept_encoding.as_deref();
    // A hit is looked up from the request's own bytes; only a miss copies them out.
    if let Some((entry, now)) = get(shard, host, target, accept_encoding) {
        return CacheStep::Served(serve_hit(shard, client, head, &entry, now, started).await);
    }
    let candidate = CacheCandidate {
        host: host.to_vec(),
        target: target.to_vec(),
        accept_encoding: accept_encoding.map(<[u8]>::to_vec),
    };
    let key = CacheKey::new(&candidate.host, &candidate.target);
    let mut deadline = started + shard.config.request_timeout;
    // A HEAD's response is not stored, so GETs must not wait for one; nor is a conditional or
    // partial request's 304, 412 or 206, which says nothing about whether the resource may
    // be stored. They still wait for a flight that is running, and are served from what it
    // stores.
    let may_lead = head.is_plain_get();
    // Flights are per URL until one stores another `Accept-Encoding` variant than this
    // request's; then, for a while, per variant, so each variant's misses share one fetch.
    let variant_key = key.with_accept_encoding(candidate.accept_encoding.as_deref());
    let mut flight_key = if shard.flights.borrow().variant_flights(&key, Instant::now()) {
        variant_key.clone()
    } else {
        key.clone()
    };
    let (mut split, mut retried) = (false, false);
    loop {
        let join = shard
            .flights
            .borrow_mut()
            .join(&flight_key, may_lead, glommio::timer::now());
        match join {
            Join::Wait(flight) => {
                let waited = glommio::timer::timeout(
                    deadline.saturating_duration_since(Instant::now()),
                    async {
                        flight.ended().await;
                        Ok(())
                    },
                )
                .await;
                let ae = candidate.accept_encoding.as_deref();
                if let Some((entry, now)) = get(shard, &candidate.host, &candidate.target, ae) {
                    return CacheStep::Served(
                        serve_hit(shard, client, head, &entry, now, started).await,
                    );
                }
                // The leader's client left before its response was stored: one waiter leads
                // the next attempt and the others wait for it, rather than each going to the
                // backend. That is another fetch, with a REQUEST_TIMEOUT of its own.
                if waited.is_ok() && flight.end() == FlightEnd::Abandoned {
                    deadline = Instant::now() + shard.config.request_timeout;
                    if !may_lead {
                        yield_once().await;
                    }
                    continue;
                }
                // The leader is done and nothing here is stored for this request: it stored
                // another `Accept-Encoding` variant, or it failed. Rather than all going to
                // the backend at once, the waiters lead or wait once more: on a flight of
                // their own variant when the URL has variants stored (it is then remembered
                // as varying), else on the same key. At most once for each reason, so entries
                // that cannot be found (gone at once) never make waiters queue behind each
                // other for long. Each such fetch has a REQUEST_TIMEOUT of its own, so a
                // healthy backend never times them out.
                if waited.is_ok() && flight.end() == FlightEnd::Done {
                    let now = Instant::now();
                    let varies = shard
                        .cache
                        .borrow()
                        .has_variants(&candidate.host, &candidate.target);
                    let next = if varies && flight_key != variant_key && !split {
                        split = true;
                        shard.flights.borrow_mut().remember_varies(&key, now);
                        Some(variant_key.clone())
                    } else if !retried {
                        retried = true;
                        Some(flight_key.clone())
                    } else {
                        None
                    };
                    if let Some(next) = next {
                        flight_key = next;
                        deadline = now + shard.config.request_timeout;
                        if !may_lead {
                            yield_once().await;
                        }
                        continue;
                    }
                }
                shard.metrics.cache_misses.inc();
                // The backend gave the leader no response head, as far as this waiter's own
                // REQUEST_TIMEOUT goes: the leader timed out, or it is still waiting when the
                // waiter's time is up (the leader starts its clock only once connected). The
                // waiter then has only what is left of its time: a slow backend costs it one
                // timeout, not two.
                let leader_unanswered = match flight.end() {
                    FlightEnd::TimedOut => true,
                    FlightEnd::Running => waited.is_err() && !flight.is_answered(),
                    FlightEnd::Done | FlightEnd::NotStored | FlightEnd::Abandoned => false,
                };
                let mut forward = Forward::plain(shard, Some(candidate));
                if leader_unanswered {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left < MIN_HEAD_WAIT {
                        return CacheStep::TimedOut;
                    }
                    forward.head_timeout = left;
                }
                return CacheStep::Forward(forward);
            }
            Join::Pass => {
                shard.metrics.cache_misses.inc();
                return CacheStep::Forward(Forward::plain(shard, Some(candidate)));
            }
            Join::Lead(flight) => {
                shard.metrics.cache_misses.inc();
                // A fetch has its own REQUEST_TIMEOUT, also when its client waited for another
                // first (SPEC §6: the timeout bounds a backend's answer; a healthy backend must
                // not be timed out, nor a dead one go uncounted, for a wait elsewhere).
                let mut forward = Forward::plain(shard, Some(candidate));
                forward.flight = Some(FlightGuard {
                    shard: shard.clone(),
                    key: flight_key,
                    flight,
                });
                return CacheStep::Forward(forward);
            }
        }
    }
}

/// Lets every other task that is ready run before this one goes on: a waiter that may not
/// lead (HEAD, conditional, Range), woken with the plain GETs that waited too, lets one of
/// them lead the next fetch before it looks for one.
async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await;
}

/// A fresh entry, and the instant it was found fresh at (its `Age` is taken at that instant).
fn get(
    shard: &Shard,
    host: &[u8],
    target: &[u8],
    accept_encoding: Option<&[u8]>,
) -> Option<(Rc<CachedResponse>, Instant)> {
    let now = Instant::now();
    let lookup = shard
        .cache
        .borrow_mut()
        .get(host, target, accept_encoding, now);
    match lookup {
        Lookup::Hit(entry) => Some((entry, now)),
        Lookup::Miss => None,
    }
}

async fn serve_hit(
    shard: &Shard,
    client: &mut Conn,
    head: &RequestHead,
    entry: &CachedResponse,
    now: Instant,
    started: Instant,
) -> Next {
    shard.metrics.cache_hits.inc();
    let keep_alive = head.keep_alive && !shard.shutdown.is_fired();
    let mut out = shard.body_buffers.take();
    let age = entry.age(now);
    let not_modified = head.is_conditional() && {
        let buf = client.pending();
        let if_none_match = head.combined_header(buf, "if-none-match");
        let if_modified_since = head.combined_header(buf, "if-modified-since");
        entry.not_modified(if_none_match.as_deref(), if_modified_since.as_deref())
    };
    let (status, body) = if not_modified {
        let fields = entry.headers.iter().map(|(n, v)| (&n[..], &v[..]));
        write_not_modified_head(fields, age, keep_alive, head.version, &mut out);
        (304, &[][..])
    } else {
        let body = &entry.body[..];
        write_hit_head(
            entry.stored_head(),
            age,
            body.len(),
            keep_alive,
            head.version,
            &mut out,
        );
        (entry.status, if head.is_head { &[][..] } else { body })
    };
    client.consume(head.head_len);
    // The body goes out from the entry itself: a hit copies only its head.
    let written = send_gathered(&mut client.stream, &out, body, Push::Now)
        .await
        .is_ok();
    shard.count_request(status, started);
    if written && keep_alive {
        Next::KeepAlive
    } else {
        Next::Close
    }
}
