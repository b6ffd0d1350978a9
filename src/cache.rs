//! Per-shard static-resource cache: the key, storage, TTL expiry and S3-FIFO eviction (SPEC §7).
//!
//! Single-threaded by design (one `Cache` per shard, no locks, no I/O); time is a parameter.
//! Memory bound per shard: `capacity` entries × the largest stored object (the caller enforces
//! `CACHE_MAX_OBJECT_BYTES`), plus a ghost list of `capacity` 8-byte key hashes.
//!
//! Eviction is S3-FIFO (Yang et al., SOSP 2023): new keys enter a small FIFO (~10 %); keys hit
//! while there move to the main FIFO, the rest leave and are remembered in a ghost FIFO of key
//! hashes; a key found in the ghost enters the main FIFO directly. The main FIFO is a CLOCK with
//! a 2-bit frequency. Hits only bump a counter: no list moves, unlike LRU.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::rc::Rc;
use std::time::{Duration, Instant};

use slab::{List, Slab, NIL};

pub mod flights;
#[doc(hidden)]
pub mod lru_baseline;
mod rules;
mod slab;

pub use rules::{is_cacheable_request, storability, Storability, CACHEABLE_EXTENSIONS};
use rules::{list_elements, MAX_DELTA_SECONDS};

/// A stored response header: (name, value).
pub type StoredHeader = (Box<[u8]>, Box<[u8]>);

/// Response headers never stored: hop-by-hop ones, framing (the cache re-frames from the body),
/// the cache's own `Age`/`X-Cache`, and `Set-Cookie` (one client's cookie must never reach another).
const UNSTORED_HEADERS: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "age",
    "x-cache",
    "set-cookie",
];

/// Per-shard share of the process-wide capacity: ⌈total / shards⌉ (SPEC §7).
pub fn shard_capacity(total: usize, shards: usize) -> usize {
    total.div_ceil(shards.max(1))
}

/// Cache key: the lower-cased Host, the request-target (path and query), and, for responses that
/// vary on it, the request's `Accept-Encoding`. The method is not part of it: `HEAD` and `GET`
/// share entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheKey {
    /// Lower-cased host followed by the target, in one allocation.
    bytes: Vec<u8>,
    host_len: usize,
    variant: Variant,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Variant {
    /// The key of a request before any `Vary` is known.
    #[default]
    Primary,
    /// One `Accept-Encoding` (normalised; `None` when the request had none).
    AcceptEncoding(Option<Box<[u8]>>),
}

/// Hashes the key's bytes in one `write` (and a variant's value in a second): a derived hash
/// would also feed the vector's length, `host_len` and the variant's tag through SipHash, a
/// third of the hashing a hit does. Keys that differ only there still differ by `Eq`, and a
/// variant's value is hashed, so many `Accept-Encoding` variants of one URL do not collide.
impl Hash for CacheKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(&self.bytes);
        if let Variant::AcceptEncoding(encoding) = &self.variant {
            state.write_u8(0xff);
            state.write(encoding.as_deref().unwrap_or_default());
        }
    }
}

impl CacheKey {
    /// The primary key of a request (the one to coalesce concurrent misses on).
    pub fn new(host: &[u8], target: &[u8]) -> Self {
        let mut key = CacheKey {
            bytes: Vec::with_capacity(host.len() + target.len()),
            ..CacheKey::default()
        };
        key.set_primary(host, target);
        key
    }

    /// Makes this the primary key of a request, reusing its allocation.
    fn set_primary(&mut self, host: &[u8], target: &[u8]) {
        self.bytes.clear();
        self.bytes.extend(host.iter().map(u8::to_ascii_lowercase));
        self.bytes.extend_from_slice(target);
        self.host_len = host.len();
        self.variant = Variant::Primary;
    }

    /// This key narrowed to one `Accept-Encoding` value, lower-cased with whitespace removed so
    /// that `gzip, br` and `GZIP,br` share an entry.
    pub fn with_accept_encoding(&self, accept_encoding: Option<&[u8]>) -> Self {
        let normalised = accept_encoding.map(|v| {
            v.iter()
                .filter(|b| !b.is_ascii_whitespace())
                .map(u8::to_ascii_lowercase)
                .collect()
        });
        CacheKey {
            variant: Variant::AcceptEncoding(normalised),
            ..self.primary()
        }
    }

    /// The lower-cased host.
    pub fn host(&self) -> &[u8] {
        &self.bytes[..self.host_len]
    }

    /// The request-target: path and query.
    pub fn target(&self) -> &[u8] {
        &self.bytes[self.host_len..]
    }

    fn primary(&self) -> Self {
        CacheKey {
            bytes: self.bytes.clone(),
            host_len: self.host_len,
            variant: Variant::Primary,
        }
    }
}

/// A stored response, shared by every hit through `Rc`.
#[derive(Debug, Clone)]
pub struct CachedResponse {
    /// Always 200 in practice (see [`storability`]).
    pub status: u16,
    /// As stored: the caller passes response headers already stripped of hop-by-hop ones; the
    /// cache also drops `Content-Length`, `Transfer-Encoding`, `Age`, `X-Cache`, `Connection`
    /// (and the fields it names), the other hop-by-hop fields, and `Set-Cookie`.
    pub headers: Vec<StoredHeader>,
    /// The whole body; the hit path re-frames it with `Content-Length`.
    pub body: Rc<[u8]>,
    /// The status line and `headers` as a hit sends them, rendered when stored (see `insert`).
    stored_head: Box<[u8]>,
    /// When it was stored.
    pub stored_at: Instant,
    /// Its `Age` when it arrived, in seconds: a hit's `Age` is this plus its time stored.
    pub age_on_arrival: u64,
    /// First instant at which it is no longer served.
    pub expires_at: Instant,
}

impl CachedResponse {
    /// A response stored at `now` that stays fresh for `ttl` (an unrepresentable deadline is
    /// clamped to 2^31 s; failing that, the response is born expired and never stored).
    pub fn new(
        status: u16,
        headers: Vec<StoredHeader>,
        body: Rc<[u8]>,
        now: Instant,
        ttl: Duration,
    ) -> Self {
        let expires_at = now
            .checked_add(ttl)
            .or_else(|| now.checked_add(Duration::from_secs(MAX_DELTA_SECONDS)))
            .unwrap_or(now);
        CachedResponse {
            status,
            headers,
            body,
            stored_head: Box::default(),
            stored_at: now,
            age_on_arrival: 0,
            expires_at,
        }
    }

    /// The same response, which arrived `age` seconds old (RFC 9111 §4.2.3).
    pub fn arrived_aged(self, age: u64) -> Self {
        CachedResponse {
            age_on_arrival: age,
            ..self
        }
    }

    /// The value of the `Age` header on a hit: its age on arrival plus whole seconds since.
    pub fn age(&self, now: Instant) -> u64 {
        self.age_on_arrival
            .saturating_add(now.saturating_duration_since(self.stored_at).as_secs())
    }

    /// The status line and stored fields, as every hit sends them (`http::write_stored_head`).
    pub fn stored_head(&self) -> &[u8] {
        &self.stored_head
    }

    /// Whether a GET or HEAD with these conditions is answered 304 (`http::not_modified`).
    pub fn not_modified(
        &self,
        if_none_match: Option<&[u8]>,
        if_modified_since: Option<&[u8]>,
    ) -> bool {
        let field = |name: &[u8]| {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| &v[..])
        };
        crate::http::not_modified(
            if_none_match,
            if_modified_since,
            field(b"etag"),
            field(b"last-modified"),
        )
    }

    /// Expired at and after `expires_at`.
    pub fn is_expired(&self, now: Instant) -> bool {
        now >= self.expires_at
    }
}

/// Drops every header in [`UNSTORED_HEADERS`] and those that `Connection` names.
fn strip_unstored_headers(headers: &mut Vec<StoredHeader>) {
    let named: Vec<Box<[u8]>> = headers
        .iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case(b"connection"))
        .flat_map(|(_, value)| list_elements(value).map(Box::from))
        .collect();
    headers.retain(|(name, _)| {
        !UNSTORED_HEADERS
            .iter()
            .any(|h| h.as_bytes().eq_ignore_ascii_case(name))
            && !named.iter().any(|n| n.eq_ignore_ascii_case(name))
    });
}

/// Result of a cache read.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// A fresh stored response: serve it with `Age` and `X-Cache: HIT`.
    Hit(Rc<CachedResponse>),
    /// Nothing fresh stored for this request.
    Miss,
}

/// Counters for `/metrics`.
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct CacheStats {
    /// `get` calls that returned a fresh entry.
    pub hits: u64,
    /// `get` calls that did not (expired entries included).
    pub misses: u64,
    /// Live entries removed to make room; expiry removals are not evictions.
    pub evictions: u64,
}

/// Frequency cap: two bits per entry.
const MAX_FREQ: u8 = 3;

struct Entry {
    /// Shared with the index, so a key is stored once.
    key: Rc<CacheKey>,
    response: Rc<CachedResponse>,
    /// Copies of `response.expires_at` and the key's hash (for the ghost), kept here so that
    /// expiry checks and evictions need not touch the response or rehash the key.
    expires_at: Instant,
    hash: u64,
    freq: u8,
    in_main: bool,
}

/// One shard's cache: at most `capacity` entries, S3-FIFO eviction, expiry by deadline.
pub struct Cache {
    capacity: usize,
    /// The small FIFO's share (~10 %); while it holds at least this many, eviction starts there.
    small_target: usize,
    index: HashMap<Rc<CacheKey>, usize>,
    slab: Slab<Entry>,
    small: List,
    main: List,
    ghost: Ghost,
    /// Deadlines, earliest first (mini-redis): `purge_expired` walks only what is due.
    expiries: BTreeSet<(Instant, usize)>,
    /// Primary key -> live `Accept-Encoding` variants: tells `get` to look for a variant.
    variants: HashMap<CacheKey, usize>,
    /// The key `get` looks up with, kept so that a hit allocates nothing.
    probe: CacheKey,
    stats: CacheStats,
}

impl Cache {
    /// A cache of at most `capacity` entries; 0 disables it (`get` misses without counting,
    /// `insert` does nothing).
    pub fn new(capacity: usize) -> Self {
        let small_target = (capacity / 10).max(1);
        Cache {
            capacity,
            small_target,
            index: HashMap::with_capacity(capacity.min(1 << 16)),
            slab: Slab::default(),
            small: List::default(),
            main: List::default(),
            ghost: Ghost::new(capacity.saturating_sub(small_target)),
            expiries: BTreeSet::new(),
            variants: HashMap::new(),
            probe: CacheKey::default(),
            stats: CacheStats::default(),
        }
    }

    /// Whether the URL has responses stored per `Accept-Encoding` variant (its backend sent
    /// `Vary: Accept-Encoding`).
    pub fn has_variants(&self, host: &[u8], target: &[u8]) -> bool {
        self.variants.contains_key(&CacheKey::new(host, target))
    }

    /// The fresh response for this request, if any. A plain entry wins; otherwise, when the
    /// stored response varied on `Accept-Encoding`, the variant for `accept_encoding`. An expired
    /// entry is removed, never returned. Counts a hit or a miss.
    pub fn get(
        &mut self,
        host: &[u8],
        target: &[u8],
        accept_encoding: Option<&[u8]>,
        now: Instant,
    ) -> Lookup {
        if self.capacity == 0 {
            return Lookup::Miss;
        }
        let mut primary = std::mem::take(&mut self.probe);
        primary.set_primary(host, target);
        let mut found = self.lookup(&primary, now);
        if found.is_none() && self.variants.contains_key(&primary) {
            found = self.lookup(&primary.with_accept_encoding(accept_encoding), now);
        }
        self.probe = primary;
        match found {
            Some(response) => {
                self.stats.hits += 1;
                Lookup::Hit(response)
            }
            None => {
                self.stats.misses += 1;
                Lookup::Miss
            }
        }
    }

    /// Stores `response` (already judged by [`storability`]; its headers are stripped here).
    /// With `vary_accept_encoding`, it is stored under the request's `Accept-Encoding` and any
    /// plain entry for the URL is dropped; a plain entry shadows older variants until it goes.
    /// Re-inserting a key replaces its response in place. A full cache first reclaims an expired
    /// entry, else evicts one. An already expired response is not stored. Never insert the answer
    /// to a `HEAD`: the key has no method, so a bodiless entry would answer later `GET`s.
    pub fn insert(
        &mut self,
        host: &[u8],
        target: &[u8],
        accept_encoding: Option<&[u8]>,
        vary_accept_encoding: bool,
        mut response: CachedResponse,
        now: Instant,
    ) {
        if self.capacity == 0 || response.is_expired(now) {
            return;
        }
        strip_unstored_headers(&mut response.headers);
        let mut stored_head = Vec::new();
        let fields = response.headers.iter().map(|(n, v)| (&n[..], &v[..]));
        crate::http::write_stored_head(response.status, fields, &mut stored_head);
        response.stored_head = stored_head.into_boxed_slice();
        let response = Rc::new(response);
        let primary = CacheKey::new(host, target);
        let key = if vary_accept_encoding {
            if let Some(&slot) = self.index.get(&primary) {
                self.remove(slot);
            }
            primary.with_accept_encoding(accept_encoding)
        } else {
            primary
        };
        if let Some(&slot) = self.index.get(&key) {
            let entry = self.slab.get_mut(slot);
            self.expiries.remove(&(entry.expires_at, slot));
            entry.expires_at = response.expires_at;
            entry.response = response;
            self.expiries.insert((entry.expires_at, slot));
            return;
        }
        if self.index.len() >= self.capacity {
            self.make_room(now);
        }
        let hash = self.index.hasher().hash_one(&key);
        let in_main = self.ghost.contains(hash);
        if vary_accept_encoding {
            *self.variants.entry(key.primary()).or_insert(0) += 1;
        }
        let expires_at = response.expires_at;
        let key = Rc::new(key);
        let slot = self.slab.insert(Entry {
            key: Rc::clone(&key),
            response,
            expires_at,
            hash,
            freq: 0,
            in_main,
        });
        let list = if in_main {
            &mut self.main
        } else {
            &mut self.small
        };
        self.slab.push_front(list, slot);
        self.index.insert(key, slot);
        self.expiries.insert((expires_at, slot));
    }

    /// Removes every expired entry; returns the next expiry deadline, if any (the GC task sleeps
    /// until then, capped by the caller).
    pub fn purge_expired(&mut self, now: Instant) -> Option<Instant> {
        while let Some(&(deadline, slot)) = self.expiries.first() {
            if deadline > now {
                return Some(deadline);
            }
            self.remove(slot);
        }
        None
    }

    /// Entries held now (for the `balancer_cache_entries` gauge).
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// True when no entry is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Most entries held at once (0: disabled).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Hit, miss and eviction counters since creation.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// A fresh entry's response, counting the hit toward its frequency; removes an expired one.
    fn lookup(&mut self, key: &CacheKey, now: Instant) -> Option<Rc<CachedResponse>> {
        let slot = *self.index.get(key)?;
        let entry = self.slab.get_mut(slot);
        if now >= entry.expires_at {
            self.remove(slot);
            return None;
        }
        entry.freq = (entry.freq + 1).min(MAX_FREQ);
        Some(Rc::clone(&entry.response))
    }

    fn make_room(&mut self, now: Instant) {
        // A dead entry goes before any live one: no eviction needed.
        if let Some(&(deadline, slot)) = self.expiries.first() {
            if deadline <= now {
                self.remove(slot);
                return;
            }
        }
        self.evict();
    }

    /// Removes exactly one live entry (the cache is non-empty when called).
    fn evict(&mut self) {
        loop {
            let from_small = self.small.len >= self.small_target || self.main.len == 0;
            let slot = if from_small {
                self.small.tail
            } else {
                self.main.tail
            };
            if slot == NIL {
                return;
            }
            let entry = self.slab.get_mut(slot);
            if from_small && entry.freq > 0 {
                // Hit while on probation: promote, with its bits cleared.
                entry.freq = 0;
                entry.in_main = true;
                self.slab.unlink(&mut self.small, slot);
                self.slab.push_front(&mut self.main, slot);
            } else if !from_small && entry.freq > 0 {
                // CLOCK: a recently hit entry gets another lap, one bit poorer.
                entry.freq -= 1;
                self.slab.unlink(&mut self.main, slot);
                self.slab.push_front(&mut self.main, slot);
            } else {
                if from_small {
                    self.ghost.push(entry.hash);
                }
                self.remove(slot);
                self.stats.evictions += 1;
                return;
            }
        }
    }

    fn remove(&mut self, slot: usize) {
        let list = if self.slab.get(slot).in_main {
            &mut self.main
        } else {
            &mut self.small
        };
        self.slab.unlink(list, slot);
        let entry = self.slab.take(slot);
        self.index.remove(&entry.key);
        self.expiries.remove(&(entry.expires_at, slot));
        if let Variant::AcceptEncoding(_) = entry.key.variant {
            let primary = entry.key.primary();
            if let Some(count) = self.variants.get_mut(&primary) {
                *count -= 1;
                if *count == 0 {
                    self.variants.remove(&primary);
                }
            }
        }
    }
}

/// Ghost FIFO: hashes of keys recently evicted from the small FIFO (no data).
struct Ghost {
    order: VecDeque<u64>,
    members: HashMap<u64, u32>,
    capacity: usize,
}

impl Ghost {
    fn new(capacity: usize) -> Self {
        Ghost {
            order: VecDeque::new(),
            members: HashMap::new(),
            capacity,
        }
    }

    fn contains(&self, hash: u64) -> bool {
        self.members.contains_key(&hash)
    }

    fn push(&mut self, hash: u64) {
        if self.capacity == 0 {
            return;
        }
        if self.order.len() >= self.capacity {
            if let Some(old) = self.order.pop_front() {
                if let Some(n) = self.members.get_mut(&old) {
                    *n -= 1;
                    if *n == 0 {
                        self.members.remove(&old);
                    }
                }
            }
        }
        self.order.push_back(hash);
        *self.members.entry(hash).or_insert(0) += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::lru_baseline::Lru;
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    fn response(now: Instant, ttl: Duration, body: &[u8]) -> CachedResponse {
        CachedResponse::new(200, Vec::new(), Rc::from(body), now, ttl)
    }

    fn body_of(lookup: Lookup) -> Option<Vec<u8>> {
        match lookup {
            Lookup::Hit(r) => Some(r.body.to_vec()),
            Lookup::Miss => None,
        }
    }

    #[test]
    fn key_includes_host_path_and_query() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        cache.insert(
            b"a.test",
            b"/x.css?v=1",
            None,
            false,
            response(now, TTL, b"1"),
            now,
        );
        assert_eq!(
            body_of(cache.get(b"a.test", b"/x.css?v=1", None, now)),
            Some(b"1".to_vec())
        );
        assert!(body_of(cache.get(b"b.test", b"/x.css?v=1", None, now)).is_none());
        assert!(body_of(cache.get(b"a.test", b"/y.css?v=1", None, now)).is_none());
        assert!(body_of(cache.get(b"a.test", b"/x.css?v=2", None, now)).is_none());
        assert!(body_of(cache.get(b"a.test", b"/x.css", None, now)).is_none());
    }

    #[test]
    fn host_is_case_insensitive_in_the_key() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        cache.insert(
            b"Example.COM",
            b"/x.js",
            None,
            false,
            response(now, TTL, b"1"),
            now,
        );
        assert!(body_of(cache.get(b"example.com", b"/x.js", None, now)).is_some());
        assert_eq!(
            CacheKey::new(b"Example.COM", b"/X.js").host(),
            b"example.com"
        );
        assert_eq!(CacheKey::new(b"Example.COM", b"/X.js").target(), b"/X.js");
    }

    #[test]
    fn path_is_case_sensitive_in_the_key() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        cache.insert(b"h", b"/x.js", None, false, response(now, TTL, b"1"), now);
        assert!(body_of(cache.get(b"h", b"/X.js", None, now)).is_none());
    }

    #[test]
    fn accept_encoding_joins_the_key_when_the_response_varies_on_it() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        cache.insert(
            b"h",
            b"/a.js",
            Some(b"gzip"),
            true,
            response(now, TTL, b"gz"),
            now,
        );
        cache.insert(
            b"h",
            b"/a.js",
            Some(b"br"),
            true,
            response(now, TTL, b"br"),
            now,
        );
        assert_eq!(cache.len(), 2);
        assert_eq!(
            body_of(cache.get(b"h", b"/a.js", Some(b"gzip"), now)),
            Some(b"gz".to_vec())
        );
        assert_eq!(
            body_of(cache.get(b"h", b"/a.js", Some(b"br"), now)),
            Some(b"br".to_vec())
        );
    }

    #[test]
    fn request_without_accept_encoding_misses_the_gzip_variant() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        cache.insert(
            b"h",
            b"/a.js",
            Some(b"gzip"),
            true,
            response(now, TTL, b"gz"),
            now,
        );
        assert!(body_of(cache.get(b"h", b"/a.js", None, now)).is_none());
        assert!(body_of(cache.get(b"h", b"/a.js", Some(b"identity"), now)).is_none());
    }

    #[test]
    fn accept_encoding_is_ignored_when_the_response_does_not_vary() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        cache.insert(
            b"h",
            b"/a.js",
            Some(b"gzip"),
            false,
            response(now, TTL, b"x"),
            now,
        );
        assert!(body_of(cache.get(b"h", b"/a.js", None, now)).is_some());
        assert!(body_of(cache.get(b"h", b"/a.js", Some(b"br"), now)).is_some());
    }

    #[test]
    fn accept_encoding_variants_ignore_case_and_whitespace() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        cache.insert(
            b"h",
            b"/a.js",
            Some(b"gzip, br"),
            true,
            response(now, TTL, b"x"),
            now,
        );
        assert!(body_of(cache.get(b"h", b"/a.js", Some(b"GZIP,br"), now)).is_some());
    }

    #[test]
    fn varying_response_replaces_a_plain_entry() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        cache.insert(
            b"h",
            b"/a.js",
            None,
            false,
            response(now, TTL, b"plain"),
            now,
        );
        cache.insert(
            b"h",
            b"/a.js",
            Some(b"gzip"),
            true,
            response(now, TTL, b"gz"),
            now,
        );
        assert_eq!(cache.len(), 1);
        assert!(body_of(cache.get(b"h", b"/a.js", Some(b"br"), now)).is_none());
    }

    #[test]
    fn expired_entry_is_never_served() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        let ttl = Duration::from_secs(10);
        cache.insert(b"h", b"/a.js", None, false, response(now, ttl, b"x"), now);
        assert!(
            body_of(cache.get(b"h", b"/a.js", None, now + ttl - Duration::from_nanos(1))).is_some()
        );
        assert!(body_of(cache.get(b"h", b"/a.js", None, now + ttl)).is_none());
        assert_eq!(cache.len(), 0, "the expired entry is removed on read");
        cache.insert(b"h", b"/a.js", None, false, response(now, ttl, b"x"), now);
        assert!(body_of(cache.get(b"h", b"/a.js", None, now + ttl * 3)).is_none());
    }

    #[test]
    fn expired_variant_is_never_served() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        let ttl = Duration::from_secs(10);
        cache.insert(
            b"h",
            b"/a.js",
            Some(b"gzip"),
            true,
            response(now, ttl, b"x"),
            now,
        );
        assert!(body_of(cache.get(b"h", b"/a.js", Some(b"gzip"), now + ttl)).is_none());
        assert!(cache.is_empty());
    }

    #[test]
    fn already_expired_response_is_not_stored() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        cache.insert(
            b"h",
            b"/a.js",
            None,
            false,
            response(now, TTL, b"x"),
            now + TTL,
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn purge_expired_removes_due_entries_and_returns_the_next_deadline() {
        let now = Instant::now();
        let mut cache = Cache::new(16);
        for (i, secs) in [5u64, 10, 20].into_iter().enumerate() {
            let target = format!("/{i}.js");
            let r = response(now, Duration::from_secs(secs), b"x");
            cache.insert(b"h", target.as_bytes(), None, false, r, now);
        }
        assert_eq!(cache.purge_expired(now), Some(now + Duration::from_secs(5)));
        assert_eq!(cache.len(), 3);
        let next = cache.purge_expired(now + Duration::from_secs(10));
        assert_eq!(next, Some(now + Duration::from_secs(20)));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.purge_expired(now + Duration::from_secs(20)), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn purge_expired_on_an_empty_cache_returns_none() {
        assert_eq!(Cache::new(4).purge_expired(Instant::now()), None);
    }

    #[test]
    fn capacity_is_never_exceeded_under_random_inserts() {
        let now = Instant::now();
        let mut rng = fastrand::Rng::with_seed(7);
        for capacity in [1, 2, 3, 10, 97] {
            let mut cache = Cache::new(capacity);
            for step in 0..5_000u64 {
                let target = format!("/{}.js", rng.u32(0..300));
                let at = now + Duration::from_millis(step);
                let ttl = Duration::from_millis(rng.u64(1..2_000));
                let (ae, vary): (Option<&[u8]>, bool) = match rng.u8(0..4) {
                    0 => (Some(b"gzip"), true),
                    1 => (None, true),
                    _ => (None, false),
                };
                if rng.bool() {
                    cache.get(b"h", target.as_bytes(), ae, at);
                } else {
                    let r = response(at, ttl, b"x");
                    cache.insert(b"h", target.as_bytes(), ae, vary, r, at);
                }
                assert!(cache.len() <= capacity, "len {} > {capacity}", cache.len());
                assert_eq!(cache.len(), cache.small.len + cache.main.len);
                assert_eq!(cache.len(), cache.expiries.len());
            }
        }
    }

    #[test]
    fn zero_capacity_disables_the_cache() {
        let now = Instant::now();
        let mut cache = Cache::new(0);
        cache.insert(b"h", b"/a.js", None, false, response(now, TTL, b"x"), now);
        assert!(cache.is_empty());
        assert!(body_of(cache.get(b"h", b"/a.js", None, now)).is_none());
        assert_eq!(cache.stats(), CacheStats::default());
        assert_eq!(cache.capacity(), 0);
    }

    #[test]
    fn eviction_is_counted_and_expiry_is_not() {
        let now = Instant::now();
        let mut cache = Cache::new(2);
        for target in ["/1.js", "/2.js", "/3.js"] {
            let r = response(now, TTL, b"x");
            cache.insert(b"h", target.as_bytes(), None, false, r, now);
        }
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.stats().evictions, 1);
        cache.purge_expired(now + TTL);
        assert!(cache.is_empty());
        assert_eq!(cache.stats().evictions, 1);
    }

    #[test]
    fn expired_entry_is_reclaimed_before_a_live_one_is_evicted() {
        let now = Instant::now();
        let mut cache = Cache::new(2);
        let short = Duration::from_secs(1);
        cache.insert(
            b"h",
            b"/short.js",
            None,
            false,
            response(now, short, b"x"),
            now,
        );
        cache.insert(
            b"h",
            b"/long.js",
            None,
            false,
            response(now, TTL, b"x"),
            now,
        );
        let later = now + short;
        cache.insert(
            b"h",
            b"/new.js",
            None,
            false,
            response(later, TTL, b"x"),
            later,
        );
        assert!(body_of(cache.get(b"h", b"/long.js", None, later)).is_some());
        assert!(body_of(cache.get(b"h", b"/new.js", None, later)).is_some());
        assert_eq!(cache.stats().evictions, 0);
    }

    #[test]
    fn head_and_get_share_one_entry() {
        // The key has no method: a GET-filled entry answers HEAD, so the glue must never store
        // a HEAD response (it has no body); SPEC §7.
        assert!(is_cacheable_request(b"HEAD", b"/a.js", false));
        let now = Instant::now();
        let mut cache = Cache::new(4);
        cache.insert(
            b"h",
            b"/a.js",
            None,
            false,
            response(now, TTL, b"body"),
            now,
        );
        assert_eq!(
            body_of(cache.get(b"h", b"/a.js", None, now)),
            Some(b"body".to_vec())
        );
    }

    #[test]
    fn stored_headers_drop_hop_by_hop_framing_age_and_cookies() {
        let now = Instant::now();
        let mut cache = Cache::new(4);
        let headers = [
            ("Content-Type", "text/css"),
            ("Content-Length", "4"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "keep-alive, X-Private"),
            ("X-Private", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Age", "30"),
            ("X-Cache", "HIT"),
            ("Set-Cookie", "a=b"),
            ("ETag", "\"v1\""),
        ];
        let headers = headers
            .iter()
            .map(|(n, v)| (Box::from(n.as_bytes()), Box::from(v.as_bytes())))
            .collect();
        let r = CachedResponse::new(200, headers, Rc::from(&b"body"[..]), now, TTL);
        cache.insert(b"h", b"/a.css", None, false, r, now);
        let Lookup::Hit(hit) = cache.get(b"h", b"/a.css", None, now) else {
            panic!("stored entry missed");
        };
        let names: Vec<&[u8]> = hit.headers.iter().map(|(n, _)| &n[..]).collect();
        assert_eq!(names, [&b"Content-Type"[..], &b"ETag"[..]]);
    }

    #[test]
    fn hits_and_misses_are_counted() {
        let now = Instant::now();
        let mut cache = Cache::new(4);
        cache.get(b"h", b"/a.js", None, now);
        cache.insert(b"h", b"/a.js", None, false, response(now, TTL, b"x"), now);
        cache.get(b"h", b"/a.js", None, now);
        cache.get(b"h", b"/a.js", None, now);
        cache.get(b"h", b"/a.js", None, now + TTL);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.evictions), (2, 2, 0));
    }

    #[test]
    fn reinserting_a_key_replaces_its_response_and_deadline() {
        let now = Instant::now();
        let mut cache = Cache::new(4);
        cache.insert(b"h", b"/a.js", None, false, response(now, TTL, b"old"), now);
        let later = now + Duration::from_secs(30);
        cache.insert(
            b"h",
            b"/a.js",
            None,
            false,
            response(later, TTL, b"new"),
            later,
        );
        assert_eq!(cache.len(), 1);
        assert_eq!(
            body_of(cache.get(b"h", b"/a.js", None, now + TTL)),
            Some(b"new".to_vec())
        );
        assert_eq!(cache.purge_expired(now + TTL), Some(later + TTL));
    }

    #[test]
    fn age_counts_whole_seconds_since_storing() {
        let now = Instant::now();
        let r = response(now, TTL, b"x");
        assert_eq!(r.age(now), 0);
        assert_eq!(r.age(now + Duration::from_millis(2_999)), 2);
        assert_eq!(r.age(now - Duration::from_secs(1)), 0);
    }

    #[test]
    fn shard_capacity_rounds_up() {
        let cases = [
            (1024, 4, 256),
            (1025, 4, 257),
            (1, 8, 1),
            (0, 4, 0),
            (10, 3, 4),
            (5, 0, 5),
        ];
        for (total, shards, want) in cases {
            assert_eq!(shard_capacity(total, shards), want, "{total}/{shards}");
        }
    }

    #[test]
    fn frequently_hit_entries_survive_a_scan_of_one_time_keys() {
        let now = Instant::now();
        let mut cache = Cache::new(100);
        for i in 0..50 {
            let target = format!("/hot{i}.js");
            cache.insert(
                b"h",
                target.as_bytes(),
                None,
                false,
                response(now, TTL, b"x"),
                now,
            );
            cache.get(b"h", target.as_bytes(), None, now);
        }
        for i in 0..10_000 {
            let target = format!("/scan{i}.js");
            cache.insert(
                b"h",
                target.as_bytes(),
                None,
                false,
                response(now, TTL, b"x"),
                now,
            );
        }
        for i in 0..50 {
            let target = format!("/hot{i}.js");
            assert!(
                body_of(cache.get(b"h", target.as_bytes(), None, now)).is_some(),
                "{target}"
            );
        }
    }

    #[test]
    fn key_remembered_by_the_ghost_returns_straight_to_the_main_queue() {
        let now = Instant::now();
        let mut cache = Cache::new(10);
        for i in 0..11 {
            let target = format!("/{i}.js");
            cache.insert(
                b"h",
                target.as_bytes(),
                None,
                false,
                response(now, TTL, b"x"),
                now,
            );
        }
        assert!(
            body_of(cache.get(b"h", b"/0.js", None, now)).is_none(),
            "oldest was evicted"
        );
        cache.insert(b"h", b"/0.js", None, false, response(now, TTL, b"x"), now);
        let slot = cache.index[&CacheKey::new(b"h", b"/0.js")];
        assert!(cache.slab.get(slot).in_main);
    }

    #[test]
    fn new_key_starts_on_probation_in_the_small_queue() {
        let now = Instant::now();
        let mut cache = Cache::new(10);
        cache.insert(b"h", b"/a.js", None, false, response(now, TTL, b"x"), now);
        let slot = cache.index[&CacheKey::new(b"h", b"/a.js")];
        assert!(!cache.slab.get(slot).in_main);
    }

    #[test]
    fn lru_baseline_evicts_the_least_recently_used() {
        let mut lru = Lru::new(2);
        lru.insert(1, "a");
        lru.insert(2, "b");
        assert_eq!(lru.get(&1), Some(&"a"));
        lru.insert(3, "c");
        assert_eq!(lru.get(&2), None);
        assert_eq!((lru.len(), lru.evictions), (2, 1));
    }

    /// Zipf(s) over `keys` ranks by inverse CDF on precomputed cumulative weights.
    fn zipf_trace(keys: usize, requests: usize, s: f64, seed: u64) -> Vec<u32> {
        let mut cumulative = Vec::with_capacity(keys);
        let mut total = 0.0;
        for rank in 1..=keys {
            total += 1.0 / (rank as f64).powf(s);
            cumulative.push(total);
        }
        let mut rng = fastrand::Rng::with_seed(seed);
        (0..requests)
            .map(|_| {
                let u = rng.f64() * total;
                cumulative.partition_point(|&c| c < u).min(keys - 1) as u32
            })
            .collect()
    }

    /// (S3-FIFO hit ratio, LRU hit ratio) for a trace, both read-through with the same keys.
    fn hit_ratios(trace: &[u32], capacity: usize) -> (f64, f64) {
        let now = Instant::now();
        let targets: Vec<String> = (0..=*trace.iter().max().unwrap_or(&0))
            .map(|k| format!("/static/{k}.js"))
            .collect();
        let body: Rc<[u8]> = Rc::from(&b"x"[..]);
        let mut cache = Cache::new(capacity);
        let mut lru = Lru::new(capacity);
        let mut lru_hits = 0u64;
        for &k in trace {
            let target = targets[k as usize].as_bytes();
            if let Lookup::Miss = cache.get(b"h", target, None, now) {
                let r = CachedResponse::new(200, Vec::new(), Rc::clone(&body), now, TTL);
                cache.insert(b"h", target, None, false, r, now);
            }
            let key = CacheKey::new(b"h", target);
            if lru.get(&key).is_some() {
                lru_hits += 1;
            } else {
                lru.insert(key, Rc::clone(&body));
            }
        }
        let n = trace.len() as f64;
        (cache.stats().hits as f64 / n, lru_hits as f64 / n)
    }

    fn compare_with_lru(keys: usize, requests: usize, s: f64) {
        let trace = zipf_trace(keys, requests, s, 42);
        for percent in [1, 10] {
            let capacity = keys * percent / 100;
            let (s3fifo, lru) = hit_ratios(&trace, capacity);
            println!(
                "zipf s={s} keys={keys} requests={requests} seed=42 capacity={capacity} ({percent}%): \
                 s3-fifo {:.2}% lru {:.2}%",
                s3fifo * 100.0,
                lru * 100.0
            );
            assert!(s3fifo > lru, "s3-fifo {s3fifo} <= lru {lru} at {percent}%");
        }
    }

    #[test]
    fn s3fifo_beats_lru_on_a_zipf_trace_at_one_and_ten_percent() {
        compare_with_lru(20_000, 200_000, 0.9);
    }

    #[test]
    #[ignore = "about 15 s in debug; run with --ignored"]
    fn s3fifo_beats_lru_on_a_large_zipf_trace() {
        compare_with_lru(100_000, 1_000_000, 0.9);
    }
}
