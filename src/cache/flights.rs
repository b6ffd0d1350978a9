//! Concurrent misses for one key: who fetches, who waits, and which keys not to wait on.
//!
//! The first miss for a key *leads*: it goes to a backend while later misses wait for it, so a
//! popular resource that just expired costs the backends one request, not one per client.
//! Waiting only pays when the answer can be stored, so a key whose response turned out not
//! storable (`Set-Cookie`, `private`, a 404, too large) is remembered for a while as *pass*:
//! its misses go straight to a backend, concurrently, instead of queueing behind each other
//! (Varnish calls this hit-for-miss). A pass does not stop a later response from being stored.
//!
//! No I/O and no clock: time is a parameter.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::CacheKey;
use crate::signal::Signal;

/// How many keys a shard remembers as pass; past it, new ones are not remembered (they only
/// lose coalescing's queueing, never correctness).
pub const MAX_PASS_KEYS: usize = 4096;

/// A key passes for `CACHE_TTL`, at most this long: a resource may become storable (a 404
/// deployed), and it should be coalesced again soon after.
pub const MAX_PASS_MEMORY: Duration = Duration::from_secs(120);

/// How a leader's fetch ended, as its waiters need to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlightEnd {
    /// Still fetching.
    Running,
    /// Finished; whatever it stored is in the cache (maybe nothing, if it failed).
    Done,
    /// The response may not be stored: waiters go to a backend themselves.
    NotStored,
    /// No response head within `REQUEST_TIMEOUT`: a waiter has been waiting for that same
    /// answer, so its own attempt gets only what is left of its `REQUEST_TIMEOUT`.
    TimedOut,
    /// The leader's client went away before the response was stored: the waiters elect a new
    /// leader among themselves instead of all going to the backend.
    Abandoned,
}

/// One leader's fetch, shared with its waiters.
pub struct Flight {
    end: std::cell::Cell<FlightEnd>,
    /// The leader has its response head.
    answered: std::cell::Cell<bool>,
    signal: Signal,
}

impl Flight {
    fn new() -> Self {
        Flight {
            end: std::cell::Cell::new(FlightEnd::Running),
            answered: std::cell::Cell::new(false),
            signal: Signal::default(),
        }
    }

    pub fn end(&self) -> FlightEnd {
        self.end.get()
    }

    /// Records that the leader's response head arrived: a waiter whose own REQUEST_TIMEOUT
    /// runs out before that has waited that long for a head, like the leader.
    pub fn mark_answered(&self) {
        self.answered.set(true);
    }

    pub fn is_answered(&self) -> bool {
        self.answered.get()
    }

    /// Completes once the leader has ended.
    pub async fn ended(&self) {
        self.signal.wait().await;
    }
}

/// What a miss should do.
pub enum Join {
    /// Fetch, and end the flight when done (see [`Flights::end`]).
    Lead(Rc<Flight>),
    /// Wait for this flight, then look again.
    Wait(Rc<Flight>),
    /// Fetch without leading: the key's responses are not stored, or the request cannot lead.
    Pass,
}

/// A shard's flights and pass memory.
pub struct Flights {
    leading: HashMap<CacheKey, Rc<Flight>>,
    /// Keys that pass, by a keyed hash of the key, until when: a key may be 64 KiB (a Host
    /// header), and 4096 of them must not pin 256 MiB. Two keys sharing a hash only cost the
    /// second one its coalescing.
    pass: HashMap<u64, Instant>,
    /// URLs whose stored responses vary by `Accept-Encoding`, by the same hash, until when:
    /// their misses fetch per variant (`variant_flights`), not all behind one variant's fetch.
    varies: HashMap<u64, Instant>,
    hasher: RandomState,
    pass_for: Duration,
}

impl Flights {
    /// `pass_for`: how long a key whose response was not storable skips waiting.
    pub fn new(pass_for: Duration) -> Self {
        Flights {
            leading: HashMap::new(),
            pass: HashMap::new(),
            varies: HashMap::new(),
            hasher: RandomState::new(),
            pass_for,
        }
    }

    /// A miss for `key`. `may_lead`: false for a request whose response could not be stored
    /// anyway (HEAD), which must not make GETs wait for nothing.
    pub fn join(&mut self, key: &CacheKey, may_lead: bool, now: Instant) -> Join {
        if let Some(flight) = self.leading.get(key) {
            return Join::Wait(flight.clone());
        }
        let hash = self.hasher.hash_one(key);
        match self.pass.get(&hash) {
            Some(until) if *until > now => return Join::Pass,
            Some(_) if may_lead => {
                self.pass.remove(&hash);
            }
            _ => {}
        }
        if !may_lead {
            return Join::Pass;
        }
        let flight = Rc::new(Flight::new());
        self.leading.insert(key.clone(), flight.clone());
        Join::Lead(flight)
    }

    /// The leader of `key` is done: its waiters wake and, for `NotStored`, the key passes for
    /// a while. Ending a flight twice keeps the first end.
    pub fn end(&mut self, key: &CacheKey, flight: &Rc<Flight>, end: FlightEnd, now: Instant) {
        if flight.end.get() != FlightEnd::Running {
            return;
        }
        flight.end.set(end);
        flight.signal.fire();
        if self.leading.get(key).is_some_and(|f| Rc::ptr_eq(f, flight)) {
            self.leading.remove(key);
        }
        if end == FlightEnd::NotStored {
            self.remember_pass(key, now);
        }
    }

    fn remember_pass(&mut self, key: &CacheKey, now: Instant) {
        let hash = self.hasher.hash_one(key);
        remember(&mut self.pass, hash, now, now + self.pass_for);
    }

    /// The URL of `key` was found to store its responses per `Accept-Encoding` variant (a
    /// waiter found the leader's variant, not its own): for a while, its misses coalesce per
    /// variant from the start.
    pub fn remember_varies(&mut self, key: &CacheKey, now: Instant) {
        let hash = self.hasher.hash_one(key);
        remember(&mut self.varies, hash, now, now + self.pass_for);
    }

    /// Whether the URL of `key` was lately found to vary (`remember_varies`).
    pub fn variant_flights(&self, key: &CacheKey, now: Instant) -> bool {
        self.varies
            .get(&self.hasher.hash_one(key))
            .is_some_and(|until| *until > now)
    }

    /// Keys remembered as pass (expired ones included until they are swept).
    pub fn pass_keys(&self) -> usize {
        self.pass.len()
    }
}

/// Remembers `hash` until `until` in a map bounded by `MAX_PASS_KEYS` (expired entries are
/// swept when it is full; past that, new ones are not remembered).
fn remember(map: &mut HashMap<u64, Instant>, hash: u64, now: Instant, until: Instant) {
    if map.len() >= MAX_PASS_KEYS {
        map.retain(|_, until| *until > now);
        if map.len() >= MAX_PASS_KEYS {
            return;
        }
    }
    map.insert(hash, until);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_found_to_vary_is_remembered_for_a_while() {
        let mut flights = Flights::new(Duration::from_secs(10));
        let (now, url, other) = (
            Instant::now(),
            CacheKey::new(b"h", b"/a.js"),
            CacheKey::new(b"h", b"/b.js"),
        );
        assert!(!flights.variant_flights(&url, now));
        flights.remember_varies(&url, now);
        assert!(flights.variant_flights(&url, now + Duration::from_secs(9)));
        assert!(!flights.variant_flights(&url, now + Duration::from_secs(10)));
        assert!(!flights.variant_flights(&other, now));
    }

    fn key(target: &str) -> CacheKey {
        CacheKey::new(b"example.com", target.as_bytes())
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_first_miss_leads_and_later_ones_wait_for_it() {
        let mut flights = Flights::new(secs(60));
        let t = Instant::now();
        let Join::Lead(leader) = flights.join(&key("/a.css"), true, t) else {
            panic!("first miss must lead")
        };
        let Join::Wait(waited) = flights.join(&key("/a.css"), true, t) else {
            panic!("second miss must wait")
        };
        assert!(Rc::ptr_eq(&leader, &waited));
        assert!(matches!(
            flights.join(&key("/b.css"), true, t),
            Join::Lead(_)
        ));
        flights.end(&key("/a.css"), &leader, FlightEnd::Done, t);
        assert_eq!(waited.end(), FlightEnd::Done);
        assert!(waited.signal.is_fired());
        assert!(matches!(
            flights.join(&key("/a.css"), true, t),
            Join::Lead(_)
        ));
    }

    #[test]
    fn a_key_whose_response_was_not_stored_passes_until_its_memory_expires() {
        let mut flights = Flights::new(secs(60));
        let t = Instant::now();
        let Join::Lead(leader) = flights.join(&key("/a.css"), true, t) else {
            panic!()
        };
        flights.end(&key("/a.css"), &leader, FlightEnd::NotStored, t);
        assert_eq!(leader.end(), FlightEnd::NotStored);
        assert!(matches!(
            flights.join(&key("/a.css"), true, t + secs(59)),
            Join::Pass
        ));
        assert!(matches!(
            flights.join(&key("/a.css"), true, t + secs(60)),
            Join::Lead(_)
        ));
        assert_eq!(flights.pass_keys(), 0);
    }

    #[test]
    fn a_request_that_may_not_lead_waits_for_a_leader_or_passes() {
        let mut flights = Flights::new(secs(60));
        let t = Instant::now();
        assert!(matches!(flights.join(&key("/a.css"), false, t), Join::Pass));
        // It left nothing behind: a GET after it still leads.
        assert!(matches!(
            flights.join(&key("/a.css"), true, t),
            Join::Lead(_)
        ));
        assert!(matches!(
            flights.join(&key("/a.css"), false, t),
            Join::Wait(_)
        ));
    }

    #[test]
    fn ending_a_flight_twice_keeps_the_first_end() {
        let mut flights = Flights::new(secs(60));
        let t = Instant::now();
        let Join::Lead(leader) = flights.join(&key("/a.css"), true, t) else {
            panic!()
        };
        flights.end(&key("/a.css"), &leader, FlightEnd::TimedOut, t);
        flights.end(&key("/a.css"), &leader, FlightEnd::NotStored, t);
        assert_eq!(leader.end(), FlightEnd::TimedOut);
        assert_eq!(flights.pass_keys(), 0);
        // A stale leader ending does not remove the flight that replaced it.
        let Join::Lead(second) = flights.join(&key("/a.css"), true, t) else {
            panic!()
        };
        let stale = Rc::new(Flight::new());
        flights.end(&key("/a.css"), &stale, FlightEnd::Done, t);
        assert!(matches!(
            flights.join(&key("/a.css"), true, t),
            Join::Wait(f) if Rc::ptr_eq(&f, &second)
        ));
    }

    #[test]
    fn pass_memory_is_bounded_and_sweeps_expired_keys_first() {
        let mut flights = Flights::new(secs(10));
        let t = Instant::now();
        let pass = |flights: &mut Flights, target: &str, now: Instant| {
            let Join::Lead(f) = flights.join(&key(target), true, now) else {
                panic!("{target} must lead")
            };
            flights.end(&key(target), &f, FlightEnd::NotStored, now);
        };
        for i in 0..MAX_PASS_KEYS {
            pass(&mut flights, &format!("/{i}.css"), t);
        }
        assert_eq!(flights.pass_keys(), MAX_PASS_KEYS);
        // Full and nothing expired: the next key is not remembered.
        pass(&mut flights, "/late.css", t + secs(1));
        assert_eq!(flights.pass_keys(), MAX_PASS_KEYS);
        assert!(matches!(
            flights.join(&key("/late.css"), true, t + secs(1)),
            Join::Lead(_)
        ));
        // Once the first ones expired, they make room; a running flight is never swept.
        let Join::Lead(_running) = flights.join(&key("/running.css"), true, t + secs(11)) else {
            panic!()
        };
        pass(&mut flights, "/later.css", t + secs(11));
        assert_eq!(flights.pass_keys(), 1);
        assert!(matches!(
            flights.join(&key("/later.css"), true, t + secs(12)),
            Join::Pass
        ));
        assert!(matches!(
            flights.join(&key("/running.css"), true, t + secs(12)),
            Join::Wait(_)
        ));
    }
}
