//! Black-box tests of the static cache (SPEC §7) and its metrics (SPEC §8) through the real binary.
//!
//! Every backend counts the requests it sees, so "served from the cache" is proven by a count
//! that does not move, never by timing.

mod common;

use std::io::{BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------------------------
// Helpers

/// A raw HTTP/1.1 response with a Content-Length body.
fn response(status: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n").into_bytes();
    for (name, value) in headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// The body the test origins answer for a request target.
fn body_for(target: &str) -> String {
    format!("content of {target}")
}

/// A backend answering every request with `status`, `headers` and a body naming the target.
fn origin_with(status: &'static str, headers: &'static [(&'static str, &'static str)]) -> Backend {
    Backend::start(Arc::new(move |seen: &Seen| {
        Reply::Bytes(response(status, headers, body_for(&seen.target).as_bytes()))
    }))
}

/// A backend answering 200 with `headers` and a body naming the target.
fn origin(headers: &'static [(&'static str, &'static str)]) -> Backend {
    origin_with("200 OK", headers)
}

/// A balancer (one shard, as the harness defaults to) in front of one backend.
fn balancer(backend: &Backend, env: &[(&str, &str)]) -> Balancer {
    let set = server_set(&[(backend.addr, 1.0)]);
    let mut all = vec![("BACKENDS", set.as_str())];
    all.extend_from_slice(env);
    Balancer::start(&all)
}

/// The raw bytes of one request; `Host: test` unless `headers` names a Host.
fn raw_request(method: &str, target: &str, headers: &[(&str, &str)], close: bool) -> String {
    let mut raw = format!("{method} {target} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        raw.push_str("Host: test\r\n");
    }
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    if close {
        raw.push_str("Connection: close\r\n");
    }
    raw.push_str("\r\n");
    raw
}

/// One request with extra header fields, on a new connection.
fn send(lb: &Balancer, method: &str, target: &str, headers: &[(&str, &str)]) -> Response {
    request(lb.addr, &raw_request(method, target, headers, true))
}

fn fetch(lb: &Balancer, target: &str) -> Response {
    send(lb, "GET", target, &[])
}

fn x_cache(r: &Response) -> Option<&str> {
    r.header("X-Cache")
}

fn count_headers(r: &Response, name: &str) -> usize {
    r.headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .count()
}

fn metric(lb: &Balancer, sample: &str) -> f64 {
    lb.metric(sample)
        .unwrap_or_else(|| panic!("metric {sample} is exposed"))
}

/// Asserts that `target` is fetched twice from the backend and never answered from the cache.
fn assert_not_stored(backend: &Backend, lb: &Balancer, target: &str) {
    let before = backend.requests();
    for _ in 0..2 {
        let r = fetch(lb, target);
        assert_ne!(
            x_cache(&r),
            Some("HIT"),
            "{target} was served from the cache"
        );
    }
    assert_eq!(
        backend.requests() - before,
        2,
        "both GETs of {target} reach the backend"
    );
}

/// Asserts a first GET of `target` is a MISS from the backend and a second a HIT without it.
fn assert_stored(backend: &Backend, lb: &Balancer, target: &str) {
    let before = backend.requests();
    let first = fetch(lb, target);
    assert_eq!(first.status, 200, "{target}");
    assert_eq!(x_cache(&first), Some("MISS"), "first GET of {target}");
    let second = fetch(lb, target);
    assert_eq!(second.status, 200, "{target}");
    assert_eq!(x_cache(&second), Some("HIT"), "second GET of {target}");
    assert_eq!(second.text(), body_for(target), "{target}");
    assert_eq!(
        backend.requests() - before,
        1,
        "only the miss of {target} reaches the backend"
    );
}

/// A gate a backend handler blocks on (bounded by `WAIT`) until the test opens it.
#[derive(Default)]
struct Gate {
    open: Mutex<bool>,
    cond: Condvar,
}

impl Gate {
    fn wait(&self) {
        let deadline = Instant::now() + WAIT;
        let mut open = self.open.lock().unwrap();
        while !*open {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            open = self.cond.wait_timeout(open, left).unwrap().0;
        }
    }

    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.cond.notify_all();
    }
}

/// Sends `n` concurrent GETs of `target` (one connection each); returns once every request is
/// written, with the threads that collect the responses.
fn concurrent_gets(
    lb: &Balancer,
    target: &'static str,
    n: usize,
) -> Vec<std::thread::JoinHandle<Response>> {
    concurrent_gets_with(lb, target, &[], n)
}

/// `concurrent_gets` with extra header fields.
fn concurrent_gets_with(
    lb: &Balancer,
    target: &'static str,
    headers: &[(&'static str, &'static str)],
    n: usize,
) -> Vec<std::thread::JoinHandle<Response>> {
    let sent = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (addr, sent, headers) = (lb.addr, sent.clone(), headers.to_vec());
            std::thread::spawn(move || {
                let mut s = connect(addr);
                s.write_all(raw_request("GET", target, &headers, true).as_bytes())
                    .unwrap();
                sent.fetch_add(1, SeqCst);
                read_response(&mut BufReader::new(s), false).expect("a response")
            })
        })
        .collect();
    eventually("every client sent its request", || sent.load(SeqCst) == n);
    handles
}

// ---------------------------------------------------------------------------------------------
// Hits and misses

#[test]
fn css_get_is_a_miss_then_a_hit_that_touches_no_backend() {
    let backend = origin(&[("Content-Type", "text/css")]);
    let lb = balancer(&backend, &[]);

    let first = fetch(&lb, "/a.css");
    assert_eq!(first.status, 200);
    assert_eq!(x_cache(&first), Some("MISS"));
    assert_eq!(first.text(), body_for("/a.css"));

    let second = fetch(&lb, "/a.css");
    assert_eq!(second.status, 200);
    assert_eq!(x_cache(&second), Some("HIT"));
    assert!(
        second.header("Age").is_some(),
        "a hit carries Age: {second:?}"
    );
    assert_eq!(second.text(), body_for("/a.css"));
    assert_eq!(backend.requests(), 1, "the hit touched no backend");
}

#[test]
fn hit_carries_the_stored_headers_and_one_content_length() {
    let backend = origin(&[("Content-Type", "text/css"), ("ETag", "\"v1\"")]);
    let lb = balancer(&backend, &[]);
    fetch(&lb, "/styled.css");

    let hit = fetch(&lb, "/styled.css");
    assert_eq!(x_cache(&hit), Some("HIT"));
    assert_eq!(hit.header("Content-Type"), Some("text/css"));
    assert_eq!(hit.header("ETag"), Some("\"v1\""));
    assert_eq!(count_headers(&hit, "Content-Length"), 1, "{hit:?}");
    assert_eq!(count_headers(&hit, "X-Cache"), 1, "{hit:?}");
    assert_eq!(count_headers(&hit, "Age"), 1, "{hit:?}");
    assert_eq!(
        hit.header("Content-Length"),
        Some(body_for("/styled.css").len().to_string().as_str())
    );
}

#[test]
fn a_conditional_hit_whose_validators_match_gets_304_without_a_body() {
    const MODIFIED: &str = "Tue, 15 Nov 1994 08:12:31 GMT";
    let backend = origin(&[
        ("Content-Type", "text/css"),
        ("ETag", "W/\"v1\""),
        ("Last-Modified", MODIFIED),
        ("Cache-Control", "max-age=60"),
        ("X-Origin-Note", "kept on a 200 only"),
    ]);
    let lb = balancer(&backend, &[]);
    assert_eq!(x_cache(&fetch(&lb, "/v.css")), Some("MISS"));
    let before = backend.requests();

    // On one keep-alive connection: each 304 must end where its head ends.
    let (mut writer, mut reader) = open(&lb);
    let mut ask = |method: &str, headers: &[(&str, &str)]| {
        writer
            .write_all(raw_request(method, "/v.css", headers, false).as_bytes())
            .unwrap();
        read_response(&mut reader, method == "HEAD").expect("a response")
    };
    for (method, headers) in [
        ("GET", vec![("If-None-Match", "\"v1\"")]),
        ("GET", vec![("If-None-Match", "\"x\", W/\"v1\"")]),
        ("GET", vec![("If-None-Match", "*")]),
        ("GET", vec![("If-Modified-Since", MODIFIED)]),
        ("HEAD", vec![("If-None-Match", "\"v1\"")]),
    ] {
        let r = ask(method, &headers);
        assert_eq!(r.status, 304, "{method} {headers:?}: {r:?}");
        assert_eq!(x_cache(&r), Some("HIT"));
        assert_eq!(r.header("ETag"), Some("W/\"v1\""));
        assert_eq!(r.header("Last-Modified"), Some(MODIFIED));
        assert_eq!(r.header("Cache-Control"), Some("max-age=60"));
        assert!(r.header("Age").is_some(), "{r:?}");
        assert_eq!(r.header("Content-Length"), None, "{r:?}");
        assert_eq!(r.header("X-Origin-Note"), None, "{r:?}");
    }
    // Validators that do not match: the whole response, from the cache.
    for headers in [
        vec![("If-None-Match", "\"v2\"")],
        // If-None-Match decides alone, even when If-Modified-Since would match.
        vec![("If-None-Match", "\"v2\""), ("If-Modified-Since", MODIFIED)],
        vec![("If-Modified-Since", "Wed, 16 Nov 1994 08:12:31 GMT")],
    ] {
        let r = ask("GET", &headers);
        assert_eq!(r.status, 200, "{headers:?}");
        assert_eq!(x_cache(&r), Some("HIT"));
        assert_eq!(r.text(), body_for("/v.css"));
    }
    assert_eq!(
        backend.requests(),
        before,
        "every answer came from the cache"
    );
}

#[test]
fn age_counts_whole_seconds_since_the_entry_was_stored() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    fetch(&lb, "/aged.css");
    std::thread::sleep(Duration::from_millis(1100));

    let hit = fetch(&lb, "/aged.css");
    assert_eq!(x_cache(&hit), Some("HIT"));
    let age: u64 = hit
        .header("Age")
        .expect("Age")
        .parse()
        .expect("Age is an integer");
    assert!(
        age >= 1,
        "more than a second passed since the entry was stored, Age={age}"
    );
    assert_eq!(backend.requests(), 1);
}

#[test]
fn a_response_that_arrives_aged_keeps_its_age_and_expires_by_it() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        let lifetime = if seen.target.starts_with("/stale") {
            "50"
        } else {
            "52"
        };
        Reply::Bytes(response(
            "200 OK",
            &[
                ("Age", "50"),
                ("Cache-Control", &format!("max-age={lifetime}")),
            ],
            body_for(&seen.target).as_bytes(),
        ))
    }));
    let lb = balancer(&backend, &[]);
    let age = |r: &Response| -> u64 { r.header("Age").expect("Age").parse().expect("integer") };

    let miss = fetch(&lb, "/upstream-aged.css");
    assert_eq!((x_cache(&miss), age(&miss)), (Some("MISS"), 50));
    let hit = fetch(&lb, "/upstream-aged.css");
    assert_eq!(x_cache(&hit), Some("HIT"));
    assert!(
        (50..52).contains(&age(&hit)),
        "Age went back to {}",
        age(&hit)
    );
    // 52 s of lifetime, 50 of them spent before it arrived: gone 2 s after it was stored.
    std::thread::sleep(Duration::from_millis(2100));
    let again = fetch(&lb, "/upstream-aged.css");
    assert_eq!(x_cache(&again), Some("MISS"), "served past its lifetime");
    assert_eq!(backend.requests(), 2);

    // One whose Age already reaches its lifetime is not stored at all.
    for _ in 0..2 {
        assert_eq!(x_cache(&fetch(&lb, "/stale.css")), Some("MISS"));
    }
}

#[test]
fn a_backends_x_cache_never_doubles_the_balancers() {
    let backend = origin(&[("X-Cache", "HIT from upstream")]);
    let lb = balancer(&backend, &[]);
    for expected in ["MISS", "HIT"] {
        let r = fetch(&lb, "/x-cache.css");
        assert_eq!(count_headers(&r, "X-Cache"), 1, "{r:?}");
        assert_eq!(x_cache(&r), Some(expected));
    }
}

#[test]
fn hits_are_served_in_order_on_a_keep_alive_connection() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    let (mut writer, mut reader) = open(&lb);
    for (i, expected) in ["MISS", "HIT", "HIT"].into_iter().enumerate() {
        writer
            .write_all(raw_request("GET", "/ka.js", &[], false).as_bytes())
            .unwrap();
        let r = read_response(&mut reader, false).expect("a response");
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(x_cache(&r), Some(expected), "request {i}");
        assert_eq!(r.text(), body_for("/ka.js"), "request {i}");
    }
    assert_eq!(backend.requests(), 1);
}

#[test]
fn pipelined_requests_are_answered_in_order_from_a_miss_then_hits() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    let (mut writer, mut reader) = open(&lb);
    let pipeline = [
        raw_request("GET", "/pipe.css", &[], false),
        raw_request("GET", "/pipe.css", &[], false),
        raw_request("GET", "/other.css", &[], false),
        raw_request("GET", "/pipe.css", &[], true),
    ]
    .concat();
    writer.write_all(pipeline.as_bytes()).unwrap();
    for (i, (target, expected)) in [
        ("/pipe.css", "MISS"),
        ("/pipe.css", "HIT"),
        ("/other.css", "MISS"),
        ("/pipe.css", "HIT"),
    ]
    .into_iter()
    .enumerate()
    {
        let r = read_response(&mut reader, false).expect("a response");
        assert_eq!(x_cache(&r), Some(expected), "response {i}");
        assert_eq!(r.text(), body_for(target), "response {i}");
    }
    assert_eq!(backend.requests(), 2);
}

#[test]
fn http10_client_gets_a_hit_and_the_connection_closes() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    fetch(&lb, "/old.css");

    let mut s = connect(lb.addr);
    s.write_all(b"GET /old.css HTTP/1.0\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .expect("the balancer closes the connection");
    let r = read_response(&mut &raw[..], false).expect("a response");
    assert_eq!(r.status, 200);
    assert_eq!(x_cache(&r), Some("HIT"));
    assert_eq!(r.text(), body_for("/old.css"));
    assert_eq!(backend.requests(), 1);
}

#[test]
fn close_delimited_response_is_stored_and_served_with_a_length() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        let mut out = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n".to_vec();
        out.extend_from_slice(body_for(&seen.target).as_bytes());
        Reply::BytesThenClose(out)
    }));
    let lb = balancer(&backend, &[]);
    assert_eq!(fetch(&lb, "/eof.txt").text(), body_for("/eof.txt"));

    let hit = fetch(&lb, "/eof.txt");
    assert_eq!(x_cache(&hit), Some("HIT"));
    assert_eq!(hit.text(), body_for("/eof.txt"));
    assert_eq!(
        hit.header("Content-Length"),
        Some(body_for("/eof.txt").len().to_string().as_str())
    );
    assert_eq!(backend.requests(), 1);
}

#[test]
fn every_extension_group_is_cached() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    for target in [
        "/app.js",
        "/mod.mjs",
        "/app.js.map",
        "/logo.png",
        "/photo.jpg",
        "/photo.jpeg",
        "/anim.gif",
        "/icon.svg",
        "/favicon.ico",
        "/pic.webp",
        "/pic.avif",
        "/font.woff",
        "/font.woff2",
        "/font.ttf",
        "/font.otf",
        "/robots.txt",
        "/dir/deep/site.css?v=3",
    ] {
        assert_stored(&backend, &lb, target);
    }
}

#[test]
fn paths_without_a_cacheable_extension_are_never_cached() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    for target in [
        "/page.html",
        "/a.css.bak",
        "/noext",
        "/page?file=a.css",
        "/styles.css/",
        "/",
    ] {
        let before = backend.requests();
        for _ in 0..2 {
            let r = fetch(&lb, target);
            assert_eq!(r.status, 200, "{target}");
            assert_eq!(
                x_cache(&r),
                None,
                "{target} is not a cacheable request: {r:?}"
            );
        }
        assert_eq!(
            backend.requests() - before,
            2,
            "every GET of {target} reaches the backend"
        );
    }
}

#[test]
fn post_is_never_cached_nor_answered_from_a_get_entry() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    for _ in 0..2 {
        let r = send(&lb, "POST", "/form.css", &[("Content-Length", "0")]);
        assert_eq!(r.status, 200);
        assert_eq!(x_cache(&r), None, "{r:?}");
    }
    assert_eq!(backend.requests(), 2);

    assert_stored(&backend, &lb, "/posted.css");
    let r = send(&lb, "POST", "/posted.css", &[("Content-Length", "0")]);
    assert_ne!(x_cache(&r), Some("HIT"));
    assert_eq!(
        backend.requests(),
        4,
        "the POST after a cached GET reaches the backend"
    );
    assert_eq!(backend.last_seen().unwrap().method, "POST");
}

#[test]
fn hit_and_miss_counters_move() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    let hits = metric(&lb, "balancer_cache_hits_total");
    let misses = metric(&lb, "balancer_cache_misses_total");

    fetch(&lb, "/counted.css");
    assert_eq!(metric(&lb, "balancer_cache_misses_total"), misses + 1.0);
    assert_eq!(metric(&lb, "balancer_cache_hits_total"), hits);
    fetch(&lb, "/counted.css");
    fetch(&lb, "/counted.css");
    assert_eq!(metric(&lb, "balancer_cache_hits_total"), hits + 2.0);
    assert_eq!(metric(&lb, "balancer_cache_misses_total"), misses + 1.0);
    eventually("the entries gauge counts the stored response", || {
        metric(&lb, "balancer_cache_entries") == 1.0
    });
}

// ---------------------------------------------------------------------------------------------
// Authorization

#[test]
fn authorized_request_never_reads_the_cache() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    assert_stored(&backend, &lb, "/private.css");

    let r = send(
        &lb,
        "GET",
        "/private.css",
        &[("Authorization", "Bearer secret")],
    );
    assert_eq!(r.status, 200);
    assert_ne!(x_cache(&r), Some("HIT"), "{r:?}");
    assert_eq!(
        backend.requests(),
        2,
        "the authorized request reaches the backend"
    );
    assert_eq!(
        backend.last_seen().unwrap().header("Authorization"),
        Some("Bearer secret")
    );
}

#[test]
fn authorized_miss_never_writes_the_cache() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    send(&lb, "GET", "/mine.css", &[("authorization", "Basic dTpw")]);
    assert_eq!(backend.requests(), 1);

    let r = fetch(&lb, "/mine.css");
    assert_eq!(
        x_cache(&r),
        Some("MISS"),
        "nothing was stored by the authorized request"
    );
    assert_eq!(backend.requests(), 2);
    assert_eq!(x_cache(&fetch(&lb, "/mine.css")), Some("HIT"));
    assert_eq!(backend.requests(), 2);
}

// ---------------------------------------------------------------------------------------------
// Responses that are not stored

#[test]
fn not_found_is_not_stored() {
    let backend = origin_with("404 Not Found", &[("Cache-Control", "max-age=60")]);
    let lb = balancer(&backend, &[]);
    let before = backend.requests();
    for _ in 0..2 {
        let r = fetch(&lb, "/missing.css");
        assert_eq!(r.status, 404);
        assert_ne!(x_cache(&r), Some("HIT"));
    }
    assert_eq!(backend.requests() - before, 2);
}

#[test]
fn response_with_set_cookie_is_not_stored() {
    let backend = origin(&[
        ("Set-Cookie", "session=abc"),
        ("Cache-Control", "max-age=60"),
    ]);
    let lb = balancer(&backend, &[]);
    assert_not_stored(&backend, &lb, "/cookie.css");
}

#[test]
fn cache_control_no_store_is_not_stored() {
    let backend = origin(&[("Cache-Control", "no-store")]);
    let lb = balancer(&backend, &[]);
    assert_not_stored(&backend, &lb, "/no-store.css");
}

#[test]
fn cache_control_private_is_not_stored() {
    let backend = origin(&[("Cache-Control", "max-age=60, private")]);
    let lb = balancer(&backend, &[]);
    assert_not_stored(&backend, &lb, "/private.js");
}

#[test]
fn cache_control_no_cache_is_not_stored() {
    let backend = origin(&[("Cache-Control", "public, no-cache")]);
    let lb = balancer(&backend, &[]);
    assert_not_stored(&backend, &lb, "/no-cache.png");
}

#[test]
fn vary_cookie_is_not_stored() {
    let backend = origin(&[("Vary", "Cookie")]);
    let lb = balancer(&backend, &[]);
    assert_not_stored(&backend, &lb, "/vary-cookie.css");
}

#[test]
fn vary_naming_another_field_besides_accept_encoding_is_not_stored() {
    let backend = origin(&[("Vary", "Accept-Encoding, User-Agent")]);
    let lb = balancer(&backend, &[]);
    assert_not_stored(&backend, &lb, "/vary-ua.css");
}

#[test]
fn body_over_cache_max_object_bytes_is_not_stored() {
    let backend = Backend::start(Arc::new(|_: &Seen| {
        Reply::Bytes(response("200 OK", &[], &[b'x'; 101]))
    }));
    let lb = balancer(&backend, &[("CACHE_MAX_OBJECT_BYTES", "100")]);
    for _ in 0..2 {
        let r = fetch(&lb, "/big.css");
        assert_eq!(r.body.len(), 101);
        assert_ne!(x_cache(&r), Some("HIT"));
    }
    assert_eq!(backend.requests(), 2);
}

#[test]
fn body_of_exactly_cache_max_object_bytes_is_stored() {
    let backend = Backend::start(Arc::new(|_: &Seen| {
        Reply::Bytes(response("200 OK", &[], &[b'x'; 100]))
    }));
    let lb = balancer(&backend, &[("CACHE_MAX_OBJECT_BYTES", "100")]);
    fetch(&lb, "/edge.css");
    let hit = fetch(&lb, "/edge.css");
    assert_eq!(x_cache(&hit), Some("HIT"));
    assert_eq!(hit.body, vec![b'x'; 100]);
    assert_eq!(backend.requests(), 1);
}

/// A hit's body goes out from the stored entry in gathered sends that the socket takes in
/// parts when the client reads slowly: every byte must arrive once and in order, and the
/// answers pipelined behind it (a HEAD hit, then a GET hit) must start where it ends.
#[test]
fn a_megabyte_hit_reaches_a_slow_reader_whole_with_its_pipelined_successors() {
    let body = Arc::new(pattern(1 << 20, 7));
    let stored = Arc::clone(&body);
    let backend = Backend::start(Arc::new(move |_: &Seen| {
        Reply::Bytes(response("200 OK", &[], &stored))
    }));
    let lb = balancer(&backend, &[]);
    assert_eq!(x_cache(&fetch(&lb, "/bundle.js")), Some("MISS"));
    let (mut writer, mut reader) = open(&lb);
    let pipeline = [
        raw_request("GET", "/bundle.js", &[], false),
        raw_request("HEAD", "/bundle.js", &[], false),
        raw_request("GET", "/bundle.js", &[], true),
    ]
    .concat();
    writer.write_all(pipeline.as_bytes()).unwrap();
    // Let the balancer fill the socket before anything is read.
    std::thread::sleep(Duration::from_millis(200));
    let first = read_response(&mut reader, false).expect("the first hit");
    assert_eq!(x_cache(&first), Some("HIT"));
    assert_eq!(first.body.len(), body.len());
    assert!(
        first.body == *body,
        "the first hit's body differs from the stored one"
    );
    let head = read_response(&mut reader, true).expect("the HEAD hit");
    assert_eq!(x_cache(&head), Some("HIT"));
    assert_eq!(head.header("Content-Length"), Some("1048576"));
    assert!(head.body.is_empty());
    let last = read_response(&mut reader, false).expect("the last hit");
    assert_eq!(x_cache(&last), Some("HIT"));
    assert!(
        last.body == *body,
        "the last hit's body differs from the stored one"
    );
    assert_eq!(backend.requests(), 1);
}

/// A backend streaming a chunked body of `len` pattern bytes.
fn chunked_origin(len: usize) -> Backend {
    Backend::start(Arc::new(move |_: &Seen| Reply::Stream {
        head: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec(),
        len,
        seed: 7,
        chunked: true,
    }))
}

#[test]
fn chunked_body_over_cache_max_object_bytes_is_not_stored() {
    let backend = chunked_origin(200_000);
    let lb = balancer(&backend, &[("CACHE_MAX_OBJECT_BYTES", "100000")]);
    for _ in 0..2 {
        let r = fetch(&lb, "/stream.js");
        assert_eq!(
            hash(&r.body),
            hash(&pattern(200_000, 7)),
            "the body passes whole"
        );
        assert_ne!(x_cache(&r), Some("HIT"));
    }
    assert_eq!(backend.requests(), 2);
}

#[test]
fn chunked_body_within_cache_max_object_bytes_is_stored_whole() {
    let backend = chunked_origin(150_000);
    let lb = balancer(&backend, &[("CACHE_MAX_OBJECT_BYTES", "200000")]);
    fetch(&lb, "/stream.js");
    let hit = fetch(&lb, "/stream.js");
    assert_eq!(x_cache(&hit), Some("HIT"));
    assert_eq!(hash(&hit.body), hash(&pattern(150_000, 7)));
    assert_eq!(backend.requests(), 1);
}

// ---------------------------------------------------------------------------------------------
// The key: Host, path, query, and Accept-Encoding under Vary

#[test]
fn vary_accept_encoding_stores_one_entry_per_encoding() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        let encoding = seen.header("Accept-Encoding").unwrap_or("none").to_string();
        Reply::Bytes(response(
            "200 OK",
            &[("Vary", "Accept-Encoding")],
            encoding.as_bytes(),
        ))
    }));
    let lb = balancer(&backend, &[]);
    for encoding in ["gzip", "br"] {
        let r = send(&lb, "GET", "/v.js", &[("Accept-Encoding", encoding)]);
        assert_eq!(x_cache(&r), Some("MISS"), "{encoding}");
        assert_eq!(r.text(), encoding);
    }
    assert_eq!(
        backend.requests(),
        2,
        "each encoding reached the backend once"
    );
    for encoding in ["gzip", "br", "gzip", "br"] {
        let r = send(&lb, "GET", "/v.js", &[("Accept-Encoding", encoding)]);
        assert_eq!(x_cache(&r), Some("HIT"), "{encoding}");
        assert_eq!(r.text(), encoding, "the hit is the entry for {encoding}");
    }
    assert_eq!(backend.requests(), 2);
}

#[test]
fn repeated_accept_encoding_lines_are_keyed_as_one_list() {
    // The backend picks br when any Accept-Encoding line offers it, as servers do.
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        let offers_br = seen
            .headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("accept-encoding") && v.contains("br"));
        let encoding = if offers_br { "br" } else { "gzip" };
        Reply::Bytes(response(
            "200 OK",
            &[("Vary", "Accept-Encoding"), ("Content-Encoding", encoding)],
            encoding.as_bytes(),
        ))
    }));
    let lb = balancer(&backend, &[]);
    let two_lines = [("Accept-Encoding", "gzip"), ("Accept-Encoding", "br")];
    let r = send(&lb, "GET", "/ae.js", &two_lines);
    assert_eq!((x_cache(&r), r.text().as_str()), (Some("MISS"), "br"));
    // Stored for "gzip,br", not for the first line's "gzip": a gzip-only client is not served br.
    let r = send(&lb, "GET", "/ae.js", &[("Accept-Encoding", "gzip")]);
    assert_eq!((x_cache(&r), r.text().as_str()), (Some("MISS"), "gzip"));
    let r = send(&lb, "GET", "/ae.js", &[("Accept-Encoding", "gzip, br")]);
    assert_eq!((x_cache(&r), r.text().as_str()), (Some("HIT"), "br"));
    let r = send(&lb, "GET", "/ae.js", &two_lines);
    assert_eq!((x_cache(&r), r.text().as_str()), (Some("HIT"), "br"));
    let r = send(&lb, "GET", "/ae.js", &[("Accept-Encoding", "gzip")]);
    assert_eq!((x_cache(&r), r.text().as_str()), (Some("HIT"), "gzip"));
    assert_eq!(backend.requests(), 2);
}

#[test]
fn query_is_part_of_the_key() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    for target in ["/q.css?v=1", "/q.css?v=2"] {
        let r = fetch(&lb, target);
        assert_eq!(x_cache(&r), Some("MISS"), "{target}");
    }
    assert_eq!(backend.requests(), 2);
    for target in ["/q.css?v=1", "/q.css?v=2"] {
        let r = fetch(&lb, target);
        assert_eq!(x_cache(&r), Some("HIT"), "{target}");
        assert_eq!(r.text(), body_for(target));
    }
    assert_eq!(backend.requests(), 2);
}

#[test]
fn host_is_part_of_the_key() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        let host = seen.header("Host").unwrap_or("").to_string();
        Reply::Bytes(response("200 OK", &[], host.as_bytes()))
    }));
    let lb = balancer(&backend, &[]);
    for host in ["one.example", "two.example"] {
        let r = send(&lb, "GET", "/h.css", &[("Host", host)]);
        assert_eq!(x_cache(&r), Some("MISS"), "{host}");
    }
    assert_eq!(backend.requests(), 2, "two hosts, two backend requests");
    for host in ["one.example", "two.example"] {
        let r = send(&lb, "GET", "/h.css", &[("Host", host)]);
        assert_eq!(x_cache(&r), Some("HIT"), "{host}");
        assert_eq!(r.text(), host, "each host gets its own entry");
    }
    assert_eq!(backend.requests(), 2);
}

// ---------------------------------------------------------------------------------------------
// Lifetime

#[test]
fn max_age_entry_expires_and_is_never_served_expired() {
    let backend = origin(&[("Cache-Control", "max-age=1")]);
    let lb = balancer(&backend, &[]);
    assert_stored(&backend, &lb, "/short.css");
    std::thread::sleep(Duration::from_millis(1500));

    let r = fetch(&lb, "/short.css");
    assert_eq!(
        x_cache(&r),
        Some("MISS"),
        "the expired entry is not served: {r:?}"
    );
    assert_eq!(backend.requests(), 2);
}

#[test]
fn s_maxage_beats_max_age() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        let cc = if seen.target.starts_with("/long") {
            "max-age=1, s-maxage=300"
        } else {
            "s-maxage=1, max-age=300"
        };
        Reply::Bytes(response(
            "200 OK",
            &[("Cache-Control", cc)],
            body_for(&seen.target).as_bytes(),
        ))
    }));
    let lb = balancer(&backend, &[]);
    assert_stored(&backend, &lb, "/long.css");
    assert_stored(&backend, &lb, "/short.css");
    std::thread::sleep(Duration::from_millis(1500));

    assert_eq!(
        x_cache(&fetch(&lb, "/long.css")),
        Some("HIT"),
        "s-maxage=300 keeps it"
    );
    assert_eq!(backend.requests(), 2);
    assert_eq!(
        x_cache(&fetch(&lb, "/short.css")),
        Some("MISS"),
        "s-maxage=1 expired it"
    );
    assert_eq!(backend.requests(), 3);
}

#[test]
fn max_age_zero_is_not_stored() {
    let backend = origin(&[("Cache-Control", "max-age=0")]);
    let lb = balancer(&backend, &[]);
    assert_not_stored(&backend, &lb, "/zero.css");
}

#[test]
fn cache_ttl_is_the_lifetime_without_max_age() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[("CACHE_TTL", "1")]);
    assert_stored(&backend, &lb, "/ttl.css");
    std::thread::sleep(Duration::from_millis(1500));

    assert_eq!(x_cache(&fetch(&lb, "/ttl.css")), Some("MISS"));
    assert_eq!(backend.requests(), 2);
}

#[test]
fn cache_ttl_zero_stores_nothing_without_max_age() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[("CACHE_TTL", "0")]);
    assert_not_stored(&backend, &lb, "/ttl0.css");
}

// ---------------------------------------------------------------------------------------------
// HEAD

#[test]
fn head_is_answered_from_a_get_entry_without_a_body() {
    let backend = origin(&[("Content-Type", "text/css")]);
    let lb = balancer(&backend, &[]);
    fetch(&lb, "/head.css");
    assert_eq!(backend.requests(), 1);

    // A HEAD then a GET on one connection: a body leaked after the HEAD would corrupt the GET.
    let (mut writer, mut reader) = open(&lb);
    writer
        .write_all(raw_request("HEAD", "/head.css", &[], false).as_bytes())
        .unwrap();
    let head = read_response(&mut reader, true).expect("a HEAD response");
    assert_eq!(head.status, 200);
    assert_eq!(x_cache(&head), Some("HIT"));
    assert_eq!(
        head.header("Content-Length"),
        Some(body_for("/head.css").len().to_string().as_str())
    );
    writer
        .write_all(raw_request("GET", "/head.css", &[], true).as_bytes())
        .unwrap();
    let get = read_response(&mut reader, false).expect("a GET response");
    assert_eq!(get.status, 200);
    assert_eq!(get.text(), body_for("/head.css"));
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(
        rest.is_empty(),
        "no stray bytes after the GET: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(backend.requests(), 1, "HEAD and GET hit the cache");
}

#[test]
fn head_miss_does_not_store_a_bodiless_entry_for_get() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    let head = send(&lb, "HEAD", "/h.js", &[]);
    assert_eq!(head.status, 200);
    assert_eq!(backend.requests(), 1);

    let get = fetch(&lb, "/h.js");
    assert_eq!(
        x_cache(&get),
        Some("MISS"),
        "the HEAD stored nothing: {get:?}"
    );
    assert_eq!(get.text(), body_for("/h.js"));
    assert_eq!(backend.requests(), 2);
    let hit = fetch(&lb, "/h.js");
    assert_eq!(x_cache(&hit), Some("HIT"));
    assert_eq!(hit.text(), body_for("/h.js"));
    assert_eq!(backend.requests(), 2);
}

// ---------------------------------------------------------------------------------------------
// Capacity and GC

#[test]
fn capacity_zero_disables_the_cache() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[("CACHE_CAPACITY", "0")]);
    for _ in 0..3 {
        let r = fetch(&lb, "/off.css");
        assert_eq!(r.status, 200);
        assert_ne!(x_cache(&r), Some("HIT"));
    }
    assert_eq!(backend.requests(), 3);
    assert_eq!(metric(&lb, "balancer_cache_entries"), 0.0);
    assert_eq!(metric(&lb, "balancer_cache_hits_total"), 0.0);
}

#[test]
fn capacity_bounds_the_entries_and_counts_evictions() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[("CACHE_CAPACITY", "3")]);
    for i in 0..10 {
        let r = fetch(&lb, &format!("/c{i}.css"));
        assert_eq!(r.status, 200);
    }
    eventually("10 entries into 3 slots count evictions", || {
        metric(&lb, "balancer_cache_evictions_total") > 0.0
    });
    let entries = metric(&lb, "balancer_cache_entries");
    assert!(
        entries <= 3.0,
        "one shard holds at most 3 entries, has {entries}"
    );
    assert!(entries > 0.0, "something is cached");
}

#[test]
fn each_shard_gets_a_rounded_up_share_of_the_capacity() {
    let backend = origin(&[]);
    let set = server_set(&[(backend.addr, 1.0)]);
    let env = [
        ("BACKENDS", set.as_str()),
        ("CACHE_CAPACITY", "1"),
        ("BALANCER_CPUS", "0-1"),
    ];
    let Ok(lb) = Balancer::try_start(&env) else {
        eprintln!("skipped: this machine cannot run shards on CPUs 0 and 1");
        return;
    };
    // ⌈1 / 2⌉ = 1 entry per shard: whichever shard a connection lands on, it caches.
    for _ in 0..20 {
        assert_eq!(fetch(&lb, "/shared.css").status, 200);
    }
    let sent = backend.requests();
    assert!(
        (1..=2).contains(&sent),
        "at most one miss per shard, saw {sent}"
    );
}

#[test]
fn cache_metric_families_have_their_types() {
    let backend = origin(&[]);
    let lb = balancer(&backend, &[]);
    let (status, text) = lb.admin_get("/metrics");
    assert_eq!(status, 200);
    for (family, kind) in [
        ("balancer_cache_hits_total", "counter"),
        ("balancer_cache_misses_total", "counter"),
        ("balancer_cache_evictions_total", "counter"),
        ("balancer_cache_entries", "gauge"),
    ] {
        let line = format!("# TYPE {family} {kind}");
        assert!(text.lines().any(|l| l == line), "missing {line:?}");
    }
}

#[test]
fn expired_entries_are_collected_without_further_requests() {
    let backend = origin(&[("Cache-Control", "max-age=1")]);
    let lb = balancer(&backend, &[]);
    for i in 0..3 {
        fetch(&lb, &format!("/gc{i}.css"));
    }
    // The gauge moves just after the response is written, so it may lag the client a little.
    eventually("the entries gauge counts the 3 stored responses", || {
        metric(&lb, "balancer_cache_entries") == 3.0
    });

    // Expired after 1 s, removed by the GC task within its 10 s period.
    let deadline = Instant::now() + Duration::from_secs(13);
    loop {
        let entries = metric(&lb, "balancer_cache_entries");
        if entries == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "entries gauge stuck at {entries}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(backend.requests(), 3);
}

// ---------------------------------------------------------------------------------------------
// Safety

#[test]
fn responses_with_set_cookie_never_reach_another_client() {
    let issued = Arc::new(AtomicUsize::new(0));
    let counter = issued.clone();
    let backend = Backend::start(Arc::new(move |_: &Seen| {
        let n = counter.fetch_add(1, SeqCst) + 1;
        let cookie = format!("session=user{n}");
        Reply::Bytes(response(
            "200 OK",
            &[
                ("Set-Cookie", &cookie),
                ("Cache-Control", "public, max-age=300"),
            ],
            cookie.as_bytes(),
        ))
    }));
    let lb = balancer(&backend, &[]);
    let first = send(&lb, "GET", "/me.js", &[("Cookie", "login=alice")]);
    assert_eq!(first.header("Set-Cookie"), Some("session=user1"));

    let second = send(&lb, "GET", "/me.js", &[("Cookie", "login=bob")]);
    assert_eq!(
        second.header("Set-Cookie"),
        Some("session=user2"),
        "{second:?}"
    );
    assert_eq!(second.text(), "session=user2");
    let third = fetch(&lb, "/me.js");
    assert_eq!(
        third.header("Set-Cookie"),
        Some("session=user3"),
        "{third:?}"
    );
    assert_eq!(
        backend.requests(),
        3,
        "no response with Set-Cookie was reused"
    );
}

#[test]
fn content_varying_on_cookie_is_never_shared() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        let cookie = seen.header("Cookie").unwrap_or("anonymous").to_string();
        Reply::Bytes(response(
            "200 OK",
            &[("Vary", "Cookie"), ("Cache-Control", "max-age=300")],
            cookie.as_bytes(),
        ))
    }));
    let lb = balancer(&backend, &[]);
    let alice = send(&lb, "GET", "/profile.js", &[("Cookie", "user=alice")]);
    assert_eq!(alice.text(), "user=alice");

    let bob = send(&lb, "GET", "/profile.js", &[("Cookie", "user=bob")]);
    assert_eq!(bob.text(), "user=bob", "bob never sees alice's answer");
    assert_eq!(fetch(&lb, "/profile.js").text(), "anonymous");
    assert_eq!(backend.requests(), 3);
}

#[test]
fn absolute_form_target_is_keyed_by_its_authority() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        let host = seen.header("Host").unwrap_or("").to_string();
        Reply::Bytes(response("200 OK", &[], host.as_bytes()))
    }));
    let lb = balancer(&backend, &[]);
    let r = send(
        &lb,
        "GET",
        "http://other.example/abs.css",
        &[("Host", "test")],
    );
    assert_eq!(r.text(), "other.example");

    let plain = send(&lb, "GET", "/abs.css", &[("Host", "test")]);
    assert_eq!(x_cache(&plain), Some("MISS"), "Host test has no entry yet");
    assert_eq!(plain.text(), "test");
    let other = send(&lb, "GET", "/abs.css", &[("Host", "other.example")]);
    assert_eq!(x_cache(&other), Some("HIT"));
    assert_eq!(other.text(), "other.example");
    assert_eq!(backend.requests(), 2);
}

#[test]
fn hop_by_hop_headers_are_not_in_the_cached_answer() {
    let backend = origin(&[
        ("Connection", "X-Hop"),
        ("X-Hop", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("Content-Type", "text/css"),
    ]);
    let lb = balancer(&backend, &[]);
    fetch(&lb, "/hop.css");

    let hit = fetch(&lb, "/hop.css");
    assert_eq!(x_cache(&hit), Some("HIT"));
    assert_eq!(
        hit.header("Content-Type"),
        Some("text/css"),
        "end-to-end headers stay"
    );
    assert_eq!(hit.header("Keep-Alive"), None, "{hit:?}");
    assert_eq!(
        hit.header("X-Hop"),
        None,
        "a Connection-named header was stored: {hit:?}"
    );
    assert_eq!(backend.requests(), 1);
}

// ---------------------------------------------------------------------------------------------
// Coalescing

#[test]
fn concurrent_misses_for_one_key_make_one_backend_request() {
    let gate = Arc::new(Gate::default());
    let held = gate.clone();
    let body = pattern(20_000, 11);
    let reply = response("200 OK", &[("Cache-Control", "max-age=300")], &body);
    let backend = Backend::start(Arc::new(move |_: &Seen| {
        held.wait();
        Reply::Bytes(reply.clone())
    }));
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);

    let clients = concurrent_gets(&lb, "/hot.css", 20);
    eventually("the leader reaches the backend", || backend.requests() >= 1);
    // Let the balancer read the other requests while the leader's answer is held back.
    std::thread::sleep(Duration::from_millis(500));
    gate.open();

    for (i, client) in clients.into_iter().enumerate() {
        let r = client.join().expect("client thread");
        assert_eq!(r.status, 200, "client {i}");
        assert_eq!(hash(&r.body), hash(&body), "client {i} got the same body");
    }
    assert_eq!(
        backend.requests(),
        1,
        "20 concurrent misses made one backend request"
    );
}

/// A conditional miss may get a 304, which says nothing about whether the resource may be
/// stored: it must neither make plain misses wait for it nor mark the key as not storable.
#[test]
fn a_conditional_miss_neither_leads_nor_stops_coalescing() {
    let body = pattern(5_000, 13);
    let stored = response(
        "200 OK",
        &[("Cache-Control", "max-age=300"), ("ETag", "\"v\"")],
        &body,
    );
    let not_modified = b"HTTP/1.1 304 Not Modified\r\nETag: \"v\"\r\n\r\n".to_vec();
    let backend = origin_by_header("If-None-Match", not_modified, stored);
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);
    let revalidate = [("If-None-Match", "\"v\"")];

    // A conditional miss, then a burst of plain ones: one backend request for the burst.
    let r = send(&lb, "GET", "/after.css", &revalidate);
    assert_eq!((r.status, x_cache(&r)), (304, Some("MISS")));
    let burst = concurrent_gets(&lb, "/after.css", 5);
    for client in burst {
        assert_eq!(hash(&client.join().expect("client").body), hash(&body));
    }
    assert_eq!(backend.requests(), 2, "the conditional miss and one leader");

    // A conditional miss in flight when plain ones come: they do not wait for its 304.
    let conditional = concurrent_gets_with(&lb, "/during.css", &revalidate, 1);
    eventually("the conditional miss reaches the backend", || {
        backend.requests() >= 3
    });
    let plain = concurrent_gets(&lb, "/during.css", 4);
    let r = only(conditional);
    assert_eq!(r.status, 304);
    assert_all_get(&body, plain);
    assert_eq!(
        backend.requests(),
        4,
        "the conditional miss and one leader for the 4 plain ones"
    );
}

/// The response of the one client in `clients`.
fn only(clients: Vec<std::thread::JoinHandle<Response>>) -> Response {
    let mut clients = clients.into_iter();
    let client = clients.next().expect("one client");
    assert!(clients.next().is_none(), "one client only");
    client.join().expect("client")
}

/// Asserts every client got 200 with `body`.
fn assert_all_get(body: &[u8], clients: Vec<std::thread::JoinHandle<Response>>) {
    for (i, client) in clients.into_iter().enumerate() {
        let r = client.join().expect("client");
        assert_eq!((r.status, hash(&r.body)), (200, hash(body)), "client {i}");
    }
}

/// A backend answering, after 400 ms, `with` to requests that carry the `header` field and
/// `without` to the others.
fn origin_by_header(header: &'static str, with: Vec<u8>, without: Vec<u8>) -> Backend {
    Backend::start(Arc::new(move |seen: &Seen| {
        let reply = if seen.header(header).is_some() {
            with.clone()
        } else {
            without.clone()
        };
        Reply::Delay(Duration::from_millis(400), Box::new(Reply::Bytes(reply)))
    }))
}

/// A storable response whose body names the request's `Accept-Encoding` (or "none"), with
/// `Vary: Accept-Encoding`.
fn varying_reply(seen: &Seen) -> Vec<u8> {
    let coding = seen.header("Accept-Encoding").unwrap_or("none");
    response(
        "200 OK",
        &[
            ("Cache-Control", "max-age=300"),
            ("Vary", "Accept-Encoding"),
        ],
        coding.as_bytes(),
    )
}

/// A backend answering `varying_reply` after `delay`.
fn varying_origin(delay: Duration) -> Backend {
    Backend::start(Arc::new(move |seen: &Seen| {
        let reply = varying_reply(seen);
        Reply::Delay(delay, Box::new(Reply::Bytes(reply)))
    }))
}

/// Flights are per URL, entries per `Accept-Encoding` variant: waiters for other variants
/// than the leader's must not all go to the backend once it is done, but share one fetch
/// per variant.
#[test]
fn waiters_for_other_variants_than_the_leaders_share_one_fetch_per_variant() {
    let backend = varying_origin(Duration::from_millis(400));
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);
    let gzip = concurrent_gets_with(&lb, "/v.js", &[("Accept-Encoding", "gzip")], 1);
    eventually("the gzip leader reaches the backend", || {
        backend.requests() >= 1
    });
    let br = concurrent_gets_with(&lb, "/v.js", &[("Accept-Encoding", "br")], 3);
    let plain = concurrent_gets(&lb, "/v.js", 3);
    let text = |c: std::thread::JoinHandle<Response>| c.join().expect("client").text();
    assert!(gzip.into_iter().all(|c| text(c) == "gzip"));
    assert!(br.into_iter().all(|c| text(c) == "br"));
    assert!(plain.into_iter().all(|c| text(c) == "none"));
    assert_eq!(backend.requests(), 3, "one request per variant");
}

/// A waiter that leads its variant's fetch after waiting for another variant gives the backend
/// a whole `REQUEST_TIMEOUT` (a healthy backend slower than half of it must not get 504s), and
/// once the URL is known to vary, later misses join their own variant's fetch at once.
#[test]
fn a_variant_fetch_after_a_wait_has_a_whole_timeout_and_later_misses_join_it() {
    let backend = varying_origin(Duration::from_millis(1200));
    let lb = balancer(
        &backend,
        &[("BALANCER_CPUS", "0"), ("REQUEST_TIMEOUT", "2")],
    );
    let br = [("Accept-Encoding", "br")];
    let gzip = concurrent_gets_with(&lb, "/slow.js", &[("Accept-Encoding", "gzip")], 1);
    eventually("the gzip leader reaches the backend", || {
        backend.requests() >= 1
    });
    let early = concurrent_gets_with(&lb, "/slow.js", &br, 2);
    eventually("a br waiter leads its variant's fetch", || {
        backend.requests() >= 2
    });
    let late = concurrent_gets_with(&lb, "/slow.js", &br, 2);
    let text = |c: std::thread::JoinHandle<Response>| {
        let r = c.join().expect("client");
        format!("{} {}", r.status, r.text())
    };
    assert!(gzip.into_iter().all(|c| text(c) == "200 gzip"));
    for client in early.into_iter().chain(late) {
        assert_eq!(text(client), "200 br");
    }
    assert_eq!(backend.requests(), 2, "one fetch per variant");
}

/// A `Range` (or precondition) miss may get a 206 (or 412), which says nothing about whether
/// the resource may be stored: plain misses must not wait for it, nor be kept from the cache.
#[test]
fn a_range_miss_never_leads_the_plain_misses() {
    let body = pattern(5_000, 14);
    let whole = response("200 OK", &[("Cache-Control", "max-age=300")], &body);
    let partial = b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes 0-0/5000\r\nContent-Length: 1\r\n\r\nx".to_vec();
    let backend = origin_by_header("Range", partial, whole);
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);
    let ranged = concurrent_gets_with(&lb, "/r.css", &[("Range", "bytes=0-0")], 1);
    eventually("the range miss reaches the backend", || {
        backend.requests() >= 1
    });
    let plain = concurrent_gets(&lb, "/r.css", 4);
    assert_eq!(only(ranged).status, 206);
    assert_all_get(&body, plain);
    assert_eq!(backend.requests(), 2, "the range miss and one leader");
    assert_eq!(x_cache(&fetch(&lb, "/r.css")), Some("HIT"));
}

/// The first client of a burst gives up before the answer comes: its fetch is abandoned, and
/// the requests that waited for it must not then all go to the backend at once; one of them
/// leads a new fetch and the others are served from what it stores.
#[test]
fn waiters_elect_a_new_leader_when_the_first_client_leaves() {
    let body = pattern(20_000, 12);
    let reply = response("200 OK", &[("Cache-Control", "max-age=300")], &body);
    // Each fetch answers within REQUEST_TIMEOUT, the two of them together do not: the new
    // leader's fetch has a whole REQUEST_TIMEOUT of its own, for its waiters too.
    let backend = Backend::start(Arc::new(move |_: &Seen| {
        Reply::Delay(
            Duration::from_millis(1200),
            Box::new(Reply::Bytes(reply.clone())),
        )
    }));
    let lb = balancer(
        &backend,
        &[("BALANCER_CPUS", "0"), ("REQUEST_TIMEOUT", "2")],
    );
    let mut first = connect(lb.addr);
    first
        .write_all(raw_request("GET", "/abandoned.css", &[], false).as_bytes())
        .unwrap();
    eventually("the first request reaches the backend", || {
        backend.requests() >= 1
    });
    // HEADs first: they may not lead, and must wait for the GET that does.
    let heads: Vec<_> = (0..2)
        .map(|_| {
            let addr = lb.addr;
            let handle = std::thread::spawn(move || {
                let mut s = connect(addr);
                s.write_all(raw_request("HEAD", "/abandoned.css", &[], true).as_bytes())
                    .unwrap();
                read_response(&mut BufReader::new(s), true).expect("a response")
            });
            std::thread::sleep(Duration::from_millis(30));
            handle
        })
        .collect();
    let waiters = concurrent_gets(&lb, "/abandoned.css", 6);
    // The first client leaves while the backend still holds its answer; its connection
    // reset, so the answer cannot be delivered.
    std::thread::sleep(Duration::from_millis(100));
    socket2::SockRef::from(&first)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(first);
    for (i, waiter) in waiters.into_iter().enumerate() {
        let r = waiter.join().expect("client thread");
        assert_eq!(r.status, 200, "waiter {i}");
        assert_eq!(hash(&r.body), hash(&body), "waiter {i}");
    }
    for head in heads {
        let r = head.join().expect("client thread");
        assert_eq!((r.status, r.body.len()), (200, 0));
    }
    assert!(
        backend.requests() <= 2,
        "{} backend requests: the abandoned fetch and one more at most",
        backend.requests()
    );
}

/// A leader that fails (502) stored nothing: its waiters share one more fetch rather than all
/// going to the backend, and the URL is not taken for one that varies by `Accept-Encoding`.
#[test]
fn waiters_of_a_failed_leader_share_one_retry() {
    let body = pattern(5_000, 15);
    let reply = response("200 OK", &[("Cache-Control", "max-age=1")], &body);
    let first = Arc::new(AtomicBool::new(true));
    let backend = Backend::start(Arc::new(move |_: &Seen| {
        let failed = first.swap(false, SeqCst);
        let answer = if failed {
            Reply::Close
        } else {
            Reply::Bytes(reply.clone())
        };
        Reply::Delay(Duration::from_millis(400), Box::new(answer))
    }));
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);
    let leader = concurrent_gets(&lb, "/f.js", 1);
    eventually("the leader reaches the backend", || backend.requests() >= 1);
    let burst = |lb: &Balancer| {
        let mut clients = Vec::new();
        for coding in ["gzip", "br", "zstd", "gzip, br"] {
            clients.extend(concurrent_gets_with(
                lb,
                "/f.js",
                &[("Accept-Encoding", coding)],
                2,
            ));
        }
        clients
    };
    let waiters = burst(&lb);
    assert_eq!(only(leader).status, 502);
    assert_all_get(&body, waiters);
    assert_eq!(backend.requests(), 2, "the failed fetch and one more");
    // Expired: one fetch for a burst of every encoding, as for any URL that does not vary.
    std::thread::sleep(Duration::from_millis(1100));
    for client in burst(&lb) {
        assert_eq!(client.join().expect("client").status, 200);
    }
    assert_eq!(backend.requests(), 3, "one fetch for the second burst");
}

/// A leader that fails on a URL that varies: its waiters of every variant share one more fetch
/// each (the URL-wide retry stores one variant, then each other variant one fetch), and its
/// HEAD waiters, which may not lead, wait for a plain GET's fetch instead of each going to the
/// backend.
#[test]
fn waiters_of_a_failed_leader_on_a_varying_url_share_one_fetch_per_variant() {
    let first = Arc::new(AtomicBool::new(true));
    let backend = Backend::start(Arc::new(move |seen: &Seen| {
        let reply = varying_reply(seen);
        let answer = if first.swap(false, SeqCst) {
            Reply::Close
        } else {
            Reply::Bytes(reply)
        };
        Reply::Delay(Duration::from_millis(400), Box::new(answer))
    }));
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);
    let leader = concurrent_gets(&lb, "/fv.js", 1);
    eventually("the leader reaches the backend", || backend.requests() >= 1);
    let heads: Vec<_> = (0..3)
        .map(|_| {
            let addr = lb.addr;
            std::thread::spawn(move || {
                let mut s = connect(addr);
                s.write_all(raw_request("HEAD", "/fv.js", &[], true).as_bytes())
                    .unwrap();
                read_response(&mut BufReader::new(s), true).expect("a response")
            })
        })
        .collect();
    let mut gets = Vec::new();
    for coding in ["gzip", "br"] {
        gets.push((
            coding,
            concurrent_gets_with(&lb, "/fv.js", &[("Accept-Encoding", coding)], 3),
        ));
    }
    gets.push(("none", concurrent_gets(&lb, "/fv.js", 3)));
    assert_eq!(only(leader).status, 502);
    for (coding, clients) in gets {
        for client in clients {
            assert_eq!(client.join().expect("client").text(), coding);
        }
    }
    for head in heads {
        assert_eq!(head.join().expect("client").status, 200);
    }
    assert!(
        backend.requests() <= 4,
        "{} backend requests: the failed one and one per variant",
        backend.requests()
    );
}

#[test]
fn waiters_are_forwarded_when_the_leader_response_is_not_storable() {
    let gate = Arc::new(Gate::default());
    let held = gate.clone();
    let first = Arc::new(AtomicBool::new(true));
    let backend = Backend::start(Arc::new(move |seen: &Seen| {
        if first.swap(false, SeqCst) {
            held.wait();
        }
        let reply = response(
            "200 OK",
            &[("Cache-Control", "no-store")],
            body_for(&seen.target).as_bytes(),
        );
        Reply::Delay(Duration::from_millis(300), Box::new(Reply::Bytes(reply)))
    }));
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);

    let clients = concurrent_gets(&lb, "/nostore.css", 5);
    eventually("the leader reaches the backend", || backend.requests() >= 1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        backend.requests(),
        1,
        "the other misses wait for the leader"
    );
    gate.open();

    for (i, client) in clients.into_iter().enumerate() {
        let r = client.join().expect("client thread");
        assert_eq!(r.status, 200, "client {i} was forwarded, not failed");
        assert_eq!(r.text(), body_for("/nostore.css"), "client {i}");
    }
    assert_eq!(
        backend.requests(),
        5,
        "every waiter was forwarded to the backend"
    );
}

#[test]
fn waiters_are_released_by_an_unstorable_head_before_its_body_arrives() {
    let first = Arc::new(AtomicBool::new(true));
    let backend = Backend::start(Arc::new(move |seen: &Seen| {
        let body = body_for(&seen.target);
        let reply = response("200 OK", &[("Cache-Control", "private")], body.as_bytes());
        if first.swap(false, SeqCst) {
            // The leader's head says "not storable" at once; its body comes much later.
            let split = reply.len() - body.len();
            Reply::Paced(vec![
                (Duration::from_millis(200), reply[..split].to_vec()),
                (Duration::from_secs(4), reply[split..].to_vec()),
            ])
        } else {
            Reply::Bytes(reply)
        }
    }));
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);

    let mut clients = concurrent_gets(&lb, "/private.css", 4);
    eventually("every waiter reaches the backend", || {
        backend.requests() == 4
    });
    let leader = clients
        .iter()
        .position(|c| !c.is_finished())
        .expect("the leader's body is still held back");
    let leader = clients.remove(leader);
    for (i, client) in clients.into_iter().enumerate() {
        let r = client.join().expect("client thread");
        assert_eq!(r.status, 200, "waiter {i}");
        assert_eq!(r.text(), body_for("/private.css"), "waiter {i}");
    }
    assert!(
        !leader.is_finished(),
        "the waiters did not wait for the leader's body"
    );
    let r = leader.join().expect("leader thread");
    assert_eq!(r.text(), body_for("/private.css"));
}

#[test]
fn waiters_are_released_once_a_chunked_body_outgrows_the_cache() {
    let first = Arc::new(AtomicBool::new(true));
    let backend = Backend::start(Arc::new(move |_: &Seen| {
        let head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        let mut chunk = format!("{:x}\r\n", 64 * 1024).into_bytes();
        chunk.extend_from_slice(&[b'm'; 64 * 1024]);
        chunk.extend_from_slice(b"\r\n");
        let last = b"0\r\n\r\n".to_vec();
        if first.swap(false, SeqCst) {
            // 1.25 MiB at once, over CACHE_MAX_OBJECT_BYTES (1 MiB); the end much later.
            let mut start = head;
            for _ in 0..20 {
                start.extend_from_slice(&chunk);
            }
            Reply::Paced(vec![
                (Duration::from_millis(200), start),
                (Duration::from_secs(4), last),
            ])
        } else {
            let mut whole = head;
            whole.extend_from_slice(&chunk);
            whole.extend_from_slice(&last);
            Reply::Bytes(whole)
        }
    }));
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);

    let mut clients = concurrent_gets(&lb, "/large.map", 3);
    eventually("the waiters reach the backend", || backend.requests() == 3);
    let leader = clients
        .iter()
        .position(|c| !c.is_finished())
        .expect("the leader's body is still coming");
    let leader = clients.remove(leader);
    for client in clients {
        assert_eq!(client.join().expect("client thread").body.len(), 64 * 1024);
    }
    assert!(
        !leader.is_finished(),
        "the waiters did not wait for the leader's end"
    );
    assert_eq!(leader.join().expect("leader").body.len(), 20 * 64 * 1024);
}

#[test]
fn a_key_whose_response_was_not_storable_is_fetched_concurrently_next_time() {
    let gate = Arc::new(Gate::default());
    let held = gate.clone();
    let calls = Arc::new(AtomicUsize::new(0));
    let holding = Arc::new(AtomicUsize::new(0));
    let (counted, held_now) = (calls.clone(), holding.clone());
    let backend = Backend::start(Arc::new(move |seen: &Seen| {
        if counted.fetch_add(1, SeqCst) > 0 {
            held_now.fetch_add(1, SeqCst);
            held.wait();
        }
        Reply::Bytes(response(
            "404 Not Found",
            &[],
            body_for(&seen.target).as_bytes(),
        ))
    }));
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);

    assert_eq!(fetch(&lb, "/missing.css").status, 404);
    // The 404 was not stored: the next misses go to the backend together, not one by one.
    let clients = concurrent_gets(&lb, "/missing.css", 5);
    // Bounded well inside the gate's own limit, which would release a queue of them too.
    let deadline = Instant::now() + WAIT / 2;
    while holding.load(SeqCst) < 5 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        holding.load(SeqCst),
        5,
        "the five misses reached the backend together"
    );
    gate.open();
    for (i, client) in clients.into_iter().enumerate() {
        assert_eq!(
            client.join().expect("client thread").status,
            404,
            "client {i}"
        );
    }
}

#[test]
fn a_head_miss_does_not_make_gets_wait_for_it() {
    let gate = Arc::new(Gate::default());
    let held = gate.clone();
    let head_answered = Arc::new(AtomicBool::new(false));
    let get_came_first = Arc::new(AtomicBool::new(false));
    let (answered, first) = (head_answered.clone(), get_came_first.clone());
    let backend = Backend::start(Arc::new(move |seen: &Seen| {
        if seen.method == "HEAD" {
            held.wait();
            answered.store(true, SeqCst);
        } else {
            first.store(!answered.load(SeqCst), SeqCst);
        }
        Reply::Bytes(response(
            "200 OK",
            &[("Cache-Control", "max-age=300")],
            body_for(&seen.target).as_bytes(),
        ))
    }));
    let lb = balancer(&backend, &[("BALANCER_CPUS", "0")]);

    let mut head = connect(lb.addr);
    head.write_all(raw_request("HEAD", "/both.css", &[], true).as_bytes())
        .unwrap();
    eventually("the HEAD reaches the backend", || backend.requests() == 1);
    let get = fetch(&lb, "/both.css");
    gate.open();
    assert_eq!(get.status, 200);
    assert_eq!(get.text(), body_for("/both.css"));
    assert!(
        get_came_first.load(SeqCst),
        "the GET waited for the HEAD's answer"
    );
    let answer = read_response(&mut BufReader::new(head), true).expect("HEAD answered");
    assert_eq!(answer.status, 200);
    // The GET's response was stored; the HEAD's could not have been.
    assert_eq!(x_cache(&fetch(&lb, "/both.css")), Some("HIT"));
}

#[test]
fn a_waiter_answered_504_with_its_leader_gets_one_answer_per_request() {
    let gate = Arc::new(Gate::default());
    let held = gate.clone();
    let backend = Backend::start(Arc::new(move |seen: &Seen| {
        if seen.target.ends_with(".css") {
            held.wait();
        }
        Reply::Bytes(response("200 OK", &[], body_for(&seen.target).as_bytes()))
    }));
    let lb = balancer(
        &backend,
        &[("BALANCER_CPUS", "0"), ("REQUEST_TIMEOUT", "1")],
    );
    for round in 0..3 {
        let target = format!("/together-{round}.css");
        let other = format!("/after-{round}");
        // Sent back to back, so that the waiter's REQUEST_TIMEOUT ends with the leader's.
        let mut leader = connect(lb.addr);
        let mut waiter = connect(lb.addr);
        leader
            .write_all(raw_request("GET", &target, &[], false).as_bytes())
            .unwrap();
        let mut pipelined = raw_request("GET", &target, &[], false);
        pipelined.push_str(&raw_request("GET", &other, &[], false));
        waiter.write_all(pipelined.as_bytes()).unwrap();
        let sent = Instant::now();

        let mut leader = BufReader::new(leader);
        assert_eq!(
            read_response(&mut leader, false).expect("leader").status,
            504
        );
        let mut waiter = BufReader::new(waiter);
        assert_eq!(
            read_response(&mut waiter, false).expect("waiter").status,
            504
        );
        // One REQUEST_TIMEOUT (1 s) for both, not one for the leader and a second for the
        // waiter's own attempt.
        let waited = sent.elapsed();
        assert!(
            waited < Duration::from_millis(1800),
            "round {round}: {waited:?}"
        );
        let next = read_response(&mut waiter, false).expect("the pipelined answer");
        assert_eq!(
            next.text(),
            body_for(&other),
            "round {round}: one answer per request"
        );
    }
    gate.open();
}

#[test]
fn waiters_on_a_timed_out_miss_get_504_within_their_own_request_timeout() {
    let gate = Arc::new(Gate::default());
    let held = gate.clone();
    let backend = Backend::start(Arc::new(move |seen: &Seen| {
        held.wait();
        Reply::Bytes(response("200 OK", &[], body_for(&seen.target).as_bytes()))
    }));
    let lb = balancer(
        &backend,
        &[("BALANCER_CPUS", "0"), ("REQUEST_TIMEOUT", "2")],
    );

    let leader = concurrent_gets(&lb, "/slow.css", 1);
    eventually("the leader reaches the backend", || backend.requests() == 1);
    std::thread::sleep(Duration::from_millis(600));
    let asked = Instant::now();
    let waiters = concurrent_gets(&lb, "/slow.css", 3);
    for (i, client) in leader.into_iter().chain(waiters).enumerate() {
        assert_eq!(
            client.join().expect("client thread").status,
            504,
            "client {i}"
        );
    }
    // Each waiter waited ~1.4 s for the leader, then tried the backend for the ~0.6 s left of
    // its REQUEST_TIMEOUT (not 2 s more: 3.4 s in all).
    let waited = asked.elapsed();
    gate.open();
    assert!(
        waited < Duration::from_millis(2900),
        "waiters answered after {waited:?}"
    );
    assert_eq!(backend.requests(), 4, "each waiter tried the backend once");
    // Running out of a shortened REQUEST_TIMEOUT is not held against the server.
    let (_, servers) = lb.admin_get("/servers");
    let doc: serde_json::Value = serde_json::from_str(&servers).expect("/servers is JSON");
    assert_eq!(doc["servers"][0]["ejected_shards"], 0, "{servers}");
    let timeouts = format!(
        "balancer_backend_errors_total{{backend=\"{}\",kind=\"timeout\"}}",
        backend.addr
    );
    assert_eq!(
        lb.metric(&timeouts),
        Some(1.0),
        "only the leader's timeout counts"
    );
}
