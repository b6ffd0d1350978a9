//! Limits on what a client may send and how long it may take: head size, field count,
//! request-target length, header and idle timeouts, and the shape of the balancer's own replies.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Bound on the timeout tests' waits: the timeouts are 1 s or 2 s.
const TIMEOUT_WAIT: Duration = Duration::from_secs(5);

/// A backend that answers every request with its request-target as the body.
fn echo_target() -> Handler {
    Arc::new(|seen: &Seen| Reply::Bytes(ok(seen.target.as_bytes())))
}

/// One backend behind one balancer started with `env`.
fn proxy(env: &[(&str, &str)]) -> (Backend, Balancer) {
    let backend = Backend::start(echo_target());
    let set = server_set(&[(backend.addr, 1.0)]);
    let mut all = vec![("BACKENDS", set.as_str())];
    all.extend_from_slice(env);
    let balancer = Balancer::start(&all);
    (backend, balancer)
}

/// The balancer's own replies carry `status`, are text/plain, and have a body under 1 KiB.
fn assert_own_reply(resp: &Response, status: u16) {
    assert_eq!(resp.status, status, "{resp:?}");
    let content_type = resp.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("text/plain"),
        "content-type of {resp:?}"
    );
    assert!(resp.body.len() < 1024, "body of {} bytes", resp.body.len());
}

/// Reads until the connection ends; returns the bytes that came before the end.
fn read_until_closed(stream: &mut TcpStream, what: &str) -> Vec<u8> {
    stream.set_read_timeout(Some(TIMEOUT_WAIT)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return got,
            Err(e) => panic!(
                "{what}: the connection was not closed within {TIMEOUT_WAIT:?} ({e}); got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// A request with `Host` plus `fields` more header fields of `value_len` bytes each.
fn request_with_fields(fields: usize, value_len: usize) -> String {
    let value = "v".repeat(value_len);
    let mut raw = String::from("GET /fields HTTP/1.1\r\nHost: test\r\n");
    for i in 0..fields {
        raw.push_str(&format!("X-Field-{i}: {value}\r\n"));
    }
    raw.push_str("Connection: close\r\n\r\n");
    raw
}

#[test]
fn a_request_head_over_64_kib_gets_431() {
    let (backend, balancer) = proxy(&[]);
    // 70 fields of about 1 KiB: over the byte limit, under the field-count limit.
    let raw = request_with_fields(70, 1000);
    assert!(raw.len() > 64 * 1024);
    let resp = request(balancer.addr, &raw);
    assert_own_reply(&resp, 431);
    assert_eq!(backend.requests(), 0);
}

#[test]
fn a_request_head_under_64_kib_is_forwarded() {
    let (backend, balancer) = proxy(&[]);
    let raw = request_with_fields(60, 1000);
    assert!(raw.len() < 63 * 1024);
    let resp = request(balancer.addr, &raw);
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(backend.requests(), 1);
}

#[test]
fn a_request_with_over_100_header_fields_gets_431() {
    let (backend, balancer) = proxy(&[]);
    // Host, Connection and 99 more: 101 fields.
    let resp = request(balancer.addr, &request_with_fields(99, 4));
    assert_own_reply(&resp, 431);
    assert_eq!(backend.requests(), 0);
}

#[test]
fn a_request_with_exactly_100_header_fields_is_forwarded() {
    let (backend, balancer) = proxy(&[]);
    // Host, Connection and 98 more: 100 fields.
    let resp = request(balancer.addr, &request_with_fields(98, 4));
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(backend.requests(), 1);
}

#[test]
fn a_request_target_over_8_kib_gets_414() {
    let (backend, balancer) = proxy(&[]);
    let target = format!("/{}", "a".repeat(8 * 1024));
    assert_eq!(target.len(), 8 * 1024 + 1);
    let resp = request(
        balancer.addr,
        &format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    );
    assert_own_reply(&resp, 414);
    assert_eq!(backend.requests(), 0);
}

#[test]
fn a_request_target_of_exactly_8_kib_is_forwarded() {
    let (backend, balancer) = proxy(&[]);
    let target = format!("/{}", "a".repeat(8 * 1024 - 1));
    let resp = request(
        balancer.addr,
        &format!("GET {target} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), target);
    assert_eq!(backend.requests(), 1);
}

#[test]
fn a_client_that_stalls_mid_head_gets_408_and_the_connection_closes() {
    let (backend, balancer) = proxy(&[("CLIENT_HEADER_TIMEOUT", "1")]);
    let (mut writer, mut reader) = open(&balancer);
    reader
        .get_ref()
        .set_read_timeout(Some(TIMEOUT_WAIT))
        .unwrap();
    writer
        .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\n")
        .unwrap();
    let resp = read_response(&mut reader, false).expect("a 408 within a few seconds");
    assert_own_reply(&resp, 408);
    let mut rest = Vec::new();
    match reader.read_to_end(&mut rest) {
        Ok(_) => assert!(
            rest.is_empty(),
            "bytes after the 408: {:?}",
            String::from_utf8_lossy(&rest)
        ),
        Err(e) => assert_eq!(
            e.kind(),
            ErrorKind::ConnectionReset,
            "the connection closes after the 408: {e}"
        ),
    }
    assert_eq!(backend.requests(), 0);
}

#[test]
fn a_client_that_trickles_its_head_gets_408_counted_from_the_first_byte() {
    let (backend, balancer) = proxy(&[("CLIENT_HEADER_TIMEOUT", "1")]);
    let (mut writer, mut reader) = open(&balancer);
    reader
        .get_ref()
        .set_read_timeout(Some(TIMEOUT_WAIT))
        .unwrap();
    writer
        .write_all(b"GET /slow HTTP/1.1\r\nHost: test\r\nX-Slow: ")
        .unwrap();
    // A byte every 100 ms keeps the connection busy but never completes the head.
    let stop = Arc::new(AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            for _ in 0..(TIMEOUT_WAIT.as_millis() / 100 + 10) {
                if stop.load(SeqCst) || writer.write_all(b"a").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let resp = read_response(&mut reader, false);
    stop.store(true, SeqCst);
    trickle.join().expect("trickling thread");
    let resp = resp.expect("a 408 within a few seconds although bytes keep arriving");
    assert_own_reply(&resp, 408);
    assert_eq!(backend.requests(), 0);
}

#[test]
fn a_connection_idle_before_its_first_request_is_closed_silently() {
    let (_backend, balancer) = proxy(&[("CLIENT_IDLE_TIMEOUT", "1")]);
    let mut stream = connect(balancer.addr);
    let got = read_until_closed(&mut stream, "an idle new connection");
    assert!(
        got.is_empty(),
        "an idle close sends nothing, got {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// Whether the server side of a connection to `port` still waits in the kernel (SYN_RECV in
/// /proc/net/tcp): with `TCP_DEFER_ACCEPT`, until its first bytes arrive.
fn waits_in_the_kernel(port: u16) -> bool {
    let local = format!(":{port:04X}");
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        fields.len() > 3 && fields[1].ends_with(&local) && fields[3] == "03"
    })
}

#[test]
fn with_deferred_accept_a_silent_connection_still_closes_after_the_idle_timeout() {
    let (_backend, balancer) = proxy(&[
        ("CLIENT_IDLE_TIMEOUT", "2"),
        ("BALANCER_DEFER_ACCEPT", "on"),
    ]);
    let connected = std::time::Instant::now();
    let mut stream = connect(balancer.addr);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        waits_in_the_kernel(balancer.addr.port()),
        "a connection that sent nothing is not handed over yet"
    );
    let got = read_until_closed(&mut stream, "a silent deferred connection");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    // The second it spent in the kernel counts toward its idle time: about 2 s, not 3.
    let took = connected.elapsed();
    assert!(
        (Duration::from_millis(1500)..Duration::from_millis(2800)).contains(&took),
        "closed after {took:?}"
    );
}

#[test]
fn with_deferred_accept_requests_are_served_also_after_a_silence() {
    let (backend, balancer) = proxy(&[("BALANCER_DEFER_ACCEPT", "on")]);
    for i in 0..20 {
        let resp = get(balancer.addr, &format!("/new/{i}"));
        assert_eq!((resp.status, resp.text()), (200, format!("/new/{i}")));
    }
    // Handed over after the kernel's wait with nothing to read: the first read finds nothing
    // and waits for the request like any other.
    let mut stream = connect(balancer.addr);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!waits_in_the_kernel(balancer.addr.port()));
    stream
        .write_all(b"GET /late HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let got = read_until_closed(&mut stream, "a late request");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("/late"), "{text}");
    assert_eq!(backend.requests(), 21);
}

#[test]
fn a_client_that_stops_sending_its_body_gets_408() {
    let (backend, balancer) = proxy(&[("CLIENT_IDLE_TIMEOUT", "1")]);
    let stalled: [(&str, Vec<u8>); 3] = [
        // Small enough to be read whole before it is forwarded.
        (
            "content-length",
            b"POST /cl HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n0123456789".to_vec(),
        ),
        (
            "chunked",
            b"POST /chunked HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
                .to_vec(),
        ),
        // Large: streamed to the backend as it comes.
        ("streamed", {
            let mut raw =
                b"POST /big HTTP/1.1\r\nHost: test\r\nContent-Length: 10000000\r\n\r\n".to_vec();
            raw.extend(std::iter::repeat_n(b'x', 200_000));
            raw
        }),
    ];
    for (what, raw) in stalled {
        let mut stream = connect(balancer.addr);
        stream.write_all(&raw).unwrap();
        let got = read_until_closed(&mut stream, what);
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 408"), "{what}: {text}");
    }
    assert_eq!(backend.requests(), 0, "no request completed at the backend");
}

#[test]
fn an_idle_keep_alive_connection_is_closed_silently_after_a_request() {
    let (_backend, balancer) = proxy(&[("CLIENT_IDLE_TIMEOUT", "1")]);
    let (mut writer, mut reader) = open(&balancer);
    writer
        .write_all(b"GET /once HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut reader, false).expect("a response");
    assert_eq!(resp.status, 200);
    assert!(
        reader.buffer().is_empty(),
        "bytes after the response: {:?}",
        reader.buffer()
    );
    let got = read_until_closed(&mut writer, "an idle keep-alive connection");
    assert!(
        got.is_empty(),
        "an idle close sends nothing, got {:?}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn a_bad_request_reply_is_short_text_plain() {
    let (_backend, balancer) = proxy(&[]);
    let resp = request(
        balancer.addr,
        "GET / HTTP/1.1\r\nHost: test\r\nBad Name: x\r\n\r\n",
    );
    assert_own_reply(&resp, 400);
}

#[test]
fn no_server_to_take_the_request_gets_a_short_text_plain_503() {
    let balancer = Balancer::start(&[("BACKENDS", "{\"servers\":[]}")]);
    let resp = get(balancer.addr, "/anything");
    assert_own_reply(&resp, 503);
}

/// A backend that answers `/delay/<ms>` after that many milliseconds, anything else at once.
fn delaying() -> Handler {
    Arc::new(|seen: &Seen| {
        let reply = Reply::Bytes(ok(seen.target.as_bytes()));
        match seen.target.strip_prefix("/delay/").map(str::parse::<u64>) {
            Some(Ok(ms)) => Reply::Delay(Duration::from_millis(ms), Box::new(reply)),
            _ => reply,
        }
    })
}

// I/O timers stay armed between waits and are reused while they fire no later than the next
// wait's deadline (the vendored glommio's lazy `Timeout`). These two tests pin down that a
// timer left by an earlier wait, firing in the middle of a later one, neither cuts the later
// wait short nor lets it run past its own deadline.

#[test]
fn a_backend_wait_outlives_the_deadline_of_the_request_before_it_on_the_same_connection() {
    let backend = Backend::start(delaying());
    let set = server_set(&[(backend.addr, 1.0)]);
    // 2 s rather than 1 s: each margin below is then 0.6 s or more, for slow CI machines.
    let balancer = Balancer::start(&[("BACKENDS", set.as_str()), ("REQUEST_TIMEOUT", "2")]);
    let (mut writer, mut reader) = open(&balancer);
    // Arms the pooled backend connection's read timer for about now + 2 s.
    assert_eq!(get_on(&mut writer, &mut reader, "/fast").status, 200);
    std::thread::sleep(Duration::from_millis(1000));
    // Waits from ~1 s to ~2.4 s: the first timer fires at ~2 s, inside this wait's own 2 s.
    let resp = get_on(&mut writer, &mut reader, "/delay/1400");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "/delay/1400");
    assert_eq!(
        backend.accepts(),
        1,
        "both requests used one pooled connection"
    );
    // And the timeout still holds once the timer has been re-armed.
    let resp = get_on(&mut writer, &mut reader, "/delay/5000");
    assert_eq!(resp.status, 504, "{}", resp.text());
}

#[test]
fn an_idle_wait_outlives_the_deadline_of_the_idle_wait_before_it() {
    // 2 s with 1.3 s pauses: 0.7 s of slack each way, for slow CI machines.
    let (_backend, balancer) = proxy(&[("CLIENT_IDLE_TIMEOUT", "2")]);
    let (mut writer, mut reader) = open(&balancer);
    assert_eq!(get_on(&mut writer, &mut reader, "/first").status, 200);
    // Each pause is inside the idle timeout but the two together are not: a timer armed for
    // the first pause fires during the second, which must not close the connection.
    for target in ["/second", "/third"] {
        std::thread::sleep(Duration::from_millis(1300));
        let resp = get_on(&mut writer, &mut reader, target);
        assert_eq!(resp.status, 200, "{target}: {}", resp.text());
        assert_eq!(resp.text(), target);
    }
    let got = read_until_closed(&mut writer, "an idle keep-alive connection");
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
}
