//! Black-box error handling: the balancer's own answers (503, 502, 504), the retry rules, and
//! backends that fail mid-response or close pooled connections (SPEC §6).

mod common;

use std::collections::HashMap;
use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn closing() -> Handler {
    Arc::new(|_| Reply::Close)
}

/// The targets a backend saw, with how many times each.
fn targets(backend: &Backend) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for seen in backend.seen.lock().unwrap().iter() {
        *out.entry(seen.target.clone()).or_insert(0) += 1;
    }
    out
}

/// Reads until the peer closes. Panics if nothing closes the connection within the read
/// timeout (a hang); a reset counts as closed.
fn read_until_closed<R: Read>(r: &mut R) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the client connection hung after {} body bytes", out.len())
            }
            Err(_) => return out,
        }
    }
}

/// Whether a chunked body contains its terminating zero-size chunk.
fn has_last_chunk(mut body: &[u8]) -> bool {
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return false;
        };
        let line = String::from_utf8_lossy(&body[..eol]);
        let Ok(size) = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
        else {
            return false;
        };
        if size == 0 {
            return true;
        }
        let next = eol + 2 + size + 2;
        if body.len() < next {
            return false;
        }
        body = &body[next..];
    }
}

#[test]
fn an_empty_server_set_answers_503_with_a_short_text_body() {
    let lb = Balancer::start(&[("BACKENDS", "[]")]);
    let resp = get(lb.addr, "/nothing");
    assert_eq!(resp.status, 503);
    let content_type = resp.header("content-type").unwrap_or("");
    assert!(
        content_type.starts_with("text/plain"),
        "content-type {content_type:?}"
    );
    assert!(
        !resp.body.is_empty() && resp.body.len() < 1024,
        "body {:?}",
        resp.text()
    );
}

#[test]
fn a_502_for_a_request_read_whole_keeps_the_client_connection() {
    let dead = HeldPort::refusing();
    let lb = Balancer::serving(&[(dead.addr, 1.0)]);
    let (mut writer, mut reader) = open(&lb);
    // Pipelined: both are answered, and the connection stays usable after them.
    writer
        .write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nPOST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
        .unwrap();
    for target in ["/a", "/b"] {
        let resp = read_response(&mut reader, false).expect("an answer");
        assert_eq!(resp.status, 502, "{target}");
        assert_eq!(
            resp.header("connection"),
            None,
            "{target} keeps the connection"
        );
    }
    assert_eq!(get_on(&mut writer, &mut reader, "/c").status, 502);

    // An HTTP/1.0 keep-alive client is told so.
    writer
        .write_all(b"GET /d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut reader, false).expect("an answer");
    assert_eq!(resp.header("connection"), Some("keep-alive"));

    // A body still streaming in (over the 64 KiB buffered) cannot be skipped: close.
    let mut big = format!(
        "POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
        200_000
    )
    .into_bytes();
    big.extend_from_slice(&[b'x'; 200_000]);
    let _ = writer.write_all(&big);
    let resp = read_response(&mut reader, false).expect("an answer");
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("connection"), Some("close"));
}

#[test]
fn an_error_answer_to_a_head_request_has_no_body_on_a_kept_connection() {
    let lb = Balancer::start(&[("BACKENDS", "[]")]);
    let (mut writer, mut reader) = open(&lb);
    writer
        .write_all(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\nGET /y HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let head = read_response(&mut reader, true).expect("the HEAD answer");
    assert_eq!(head.status, 503);
    assert_eq!(head.header("connection"), None, "kept alive");
    let get = read_response(&mut reader, false).expect("the GET answer");
    assert_eq!(
        get.status, 503,
        "the GET's answer follows the HEAD's head directly"
    );
    assert!(get.text().starts_with("503"), "{get:?}");
}

#[test]
fn a_backend_answering_408_and_keeping_the_connection_is_relayed_not_retried() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        if seen.target == "/warm" {
            Reply::Bytes(ok(b"warm"))
        } else {
            Reply::Bytes(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 4\r\n\r\nslow".to_vec())
        }
    }));
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = open(&lb);
    assert_eq!(get_on(&mut writer, &mut reader, "/warm").status, 200);
    assert_eq!(get_on(&mut writer, &mut reader, "/answer").status, 408);
    assert_eq!(
        backend.requests(),
        2,
        "the 408 was the backend's answer, not a stale connection"
    );
}

#[test]
fn every_backend_refusing_connections_answers_502() {
    // Held (bound, not listening) for the whole test: refused, and nobody else's meanwhile.
    let (dead_a, dead_b) = (HeldPort::refusing(), HeldPort::refusing());
    let lb = Balancer::serving(&[(dead_a.addr, 1.0), (dead_b.addr, 1.0)]);
    for i in 0..5 {
        let resp = get(lb.addr, &format!("/refused/{i}"));
        assert_eq!(resp.status, 502, "request {i}: {}", resp.text());
        assert!(resp.body.len() < 1024);
        assert!(resp
            .header("content-type")
            .unwrap_or("")
            .starts_with("text/plain"));
    }
}

#[test]
fn a_backend_that_never_answers_gets_504_after_the_request_timeout() {
    let slow = Backend::start(Arc::new(|_| {
        Reply::Delay(Duration::from_secs(6), Box::new(Reply::Bytes(ok(b"late"))))
    }));
    let lb = Balancer::start(&[
        ("BACKENDS", &server_set(&[(slow.addr, 1.0)])),
        ("REQUEST_TIMEOUT", "1"),
    ]);
    let resp = get(lb.addr, "/slow");
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert!(resp.body.len() < 1024);
    assert_eq!(slow.requests(), 1);
}

/// `REQUEST_TIMEOUT` bounds the wait for the response head (SPEC §3), not the body: a body
/// that trickles in with pauses longer than it, after a prompt head, arrives whole.
#[test]
fn a_body_slower_than_the_request_timeout_is_relayed_whole_after_a_prompt_head() {
    let pause = Duration::from_millis(1300);
    let trickling = Backend::start(Arc::new(move |_| {
        Reply::Paced(vec![
            (
                Duration::ZERO,
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nfir".to_vec(),
            ),
            (pause, b"st,".to_vec()),
            (pause, b"end".to_vec()),
        ])
    }));
    let lb = Balancer::start(&[
        ("BACKENDS", &server_set(&[(trickling.addr, 1.0)])),
        ("REQUEST_TIMEOUT", "1"),
    ]);
    let resp = get(lb.addr, "/trickle");
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.text(), "first,end");
    assert_eq!(trickling.requests(), 1, "no retry");
    let timeouts = format!(
        "balancer_backend_errors_total{{backend=\"{}\",kind=\"timeout\"}}",
        trickling.addr
    );
    assert_eq!(lb.metric(&timeouts).unwrap_or(0.0), 0.0, "{timeouts}");
}

#[test]
fn a_get_the_backend_closes_without_answering_is_retried_on_another_server() {
    let closer = Backend::start(closing());
    let good = Backend::named("good");
    let lb = Balancer::serving(&[(closer.addr, 1.0), (good.addr, 1.0)]);
    let n = 20;
    for i in 0..n {
        let resp = get(lb.addr, &format!("/get/{i}"));
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        assert_eq!(resp.text(), "good");
    }
    let closer_saw = targets(&closer);
    let good_saw = targets(&good);
    assert!(
        !closer_saw.is_empty(),
        "the closing server was tried at least once"
    );
    for (target, times) in &closer_saw {
        assert_eq!(*times, 1, "{target} reached the closing server once");
    }
    for i in 0..n {
        assert_eq!(good_saw.get(&format!("/get/{i}")), Some(&1), "{good_saw:?}");
    }
}

#[test]
fn a_post_with_a_body_the_backend_closes_on_is_not_retried() {
    let closer = Backend::start(closing());
    let good = Backend::named("good");
    // The closing server is picked first almost always, before it is ejected.
    let lb = Balancer::serving(&[(closer.addr, 9.0), (good.addr, 1.0)]);
    let mut reached_closer = 0;
    for i in 0..10 {
        let target = format!("/post/{i}");
        let body = "name=value&n=1";
        let resp = request(
            lb.addr,
            &format!(
                "POST {target} HTTP/1.1\r\nHost: test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        );
        let closer_saw = targets(&closer).contains_key(&target);
        let good_saw = targets(&good).contains_key(&target);
        if closer_saw {
            reached_closer += 1;
            assert_eq!(
                resp.status,
                502,
                "{target} hit the closing server: {}",
                resp.text()
            );
            assert!(!good_saw, "{target} was replayed on the other server");
        } else {
            assert_eq!(
                resp.status, 200,
                "{target} went straight to the good server"
            );
        }
    }
    assert!(
        reached_closer > 0,
        "no POST was routed to the closing server"
    );
}

#[test]
fn a_request_reaches_at_most_three_servers() {
    let backends: Vec<Backend> = (0..4).map(|_| Backend::start(closing())).collect();
    let servers: Vec<(SocketAddr, f64)> = backends.iter().map(|b| (b.addr, 1.0)).collect();
    let lb = Balancer::serving(&servers);
    for i in 0..8 {
        let target = format!("/retry/{i}");
        let resp = get(lb.addr, &target);
        assert_eq!(resp.status, 502, "{target}: {}", resp.text());
        let reached: Vec<usize> = backends
            .iter()
            .map(|b| targets(b).get(&target).copied().unwrap_or(0))
            .collect();
        assert!(
            reached.iter().all(|&n| n <= 1),
            "{target} was retried on a server already tried: {reached:?}"
        );
        let servers_tried = reached.iter().sum::<usize>();
        assert!(
            servers_tried <= 3,
            "{target} reached {servers_tried} servers: {reached:?}"
        );
        if i == 0 {
            // Nothing is ejected yet, so a GET is tried once and retried twice.
            assert_eq!(servers_tried, 3, "{target} reached {reached:?}");
        }
    }
}

#[test]
fn a_malformed_backend_response_answers_502() {
    let garbage = Backend::start(Arc::new(|_| {
        Reply::Bytes(b"NOT-HTTP garbage here\r\nno: status line\r\n\r\n".to_vec())
    }));
    let lb = Balancer::serving(&[(garbage.addr, 1.0)]);
    let resp = get(lb.addr, "/garbage");
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert!(resp.body.len() < 1024);
}

#[test]
fn a_backend_dying_mid_body_closes_the_client_connection_short() {
    let declared = 100_000;
    let dying = Backend::start(Arc::new(move |_| {
        let mut bytes =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n").into_bytes();
        bytes.extend_from_slice(&pattern(1000, 7));
        Reply::BytesThenClose(bytes)
    }));
    let lb = Balancer::serving(&[(dying.addr, 1.0)]);
    let mut client = connect(lb.addr);
    client
        .write_all(b"GET /big HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(client);
    let (status, headers) = read_head(&mut reader).expect("a response head");
    let body = read_until_closed(&mut reader);
    if status == 200 {
        let length = headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
            .map(|(_, v)| v.as_str());
        assert_eq!(length, Some("100000"), "the backend's length is forwarded");
        assert!(
            body.len() < declared,
            "got {} of {declared} bytes",
            body.len()
        );
        assert_eq!(
            &body[..],
            &pattern(1000, 7)[..body.len()],
            "the bytes that arrived are right"
        );
    } else {
        assert_eq!(
            status, 502,
            "either the head was forwarded or the balancer answered 502"
        );
    }
}

#[test]
fn a_backend_dying_mid_chunked_body_never_sends_the_last_chunk() {
    let dying = Backend::start(Arc::new(|_| {
        let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for seed in 0..2 {
            bytes.extend_from_slice(b"400\r\n");
            bytes.extend_from_slice(&pattern(1024, seed));
            bytes.extend_from_slice(b"\r\n");
        }
        Reply::BytesThenClose(bytes)
    }));
    let lb = Balancer::serving(&[(dying.addr, 1.0)]);
    let mut client = connect(lb.addr);
    client
        .write_all(b"GET /chunks HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut reader = BufReader::new(client);
    let (status, headers) = read_head(&mut reader).expect("a response head");
    let body = read_until_closed(&mut reader);
    if status == 200 {
        let chunked = headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("transfer-encoding")
                && v.to_ascii_lowercase().contains("chunked")
        });
        assert!(
            chunked,
            "a chunked response stays chunked, so truncation shows: {headers:?}"
        );
        assert!(!has_last_chunk(&body), "the client got a terminating chunk");
    } else {
        assert_eq!(
            status, 502,
            "either the head was forwarded or the balancer answered 502"
        );
    }
}

/// How a client reading a body until the connection closes saw the close.
#[derive(Debug, PartialEq)]
enum CloseSeen {
    /// A FIN: to such a client, the body looks complete.
    Clean,
    /// A reset: the body is known to be cut short.
    Reset,
}

fn read_until_close_seen<R: Read>(r: &mut R) -> (Vec<u8>, CloseSeen) {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (out, CloseSeen::Clean),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("the client connection hung after {} body bytes", out.len())
            }
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
                return (out, CloseSeen::Reset);
            }
        }
    }
}

/// Sends `request` and asserts that a 200 relayed from a backend that then dies reaches the
/// client as a body ended by a reset, never by a clean close (a 502 before the head is fine).
fn assert_cut_short_body_ends_in_a_reset(lb: &Balancer, request: &[u8]) {
    let mut client = connect(lb.addr);
    client.write_all(request).unwrap();
    let mut reader = BufReader::new(client);
    let (status, headers) = read_head(&mut reader).expect("a response head");
    if status != 200 {
        assert_eq!(
            status, 502,
            "either the head was forwarded or the balancer answered 502"
        );
        return;
    }
    let framed = headers.iter().any(|(n, _)| {
        n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("transfer-encoding")
    });
    assert!(
        !framed,
        "the body is delimited by the close here: {headers:?}"
    );
    let (_, seen) = read_until_close_seen(&mut reader);
    assert_eq!(
        seen,
        CloseSeen::Reset,
        "a cut-short body must not end like a complete one"
    );
}

#[test]
fn a_backend_dying_mid_chunked_body_resets_an_http_1_0_client() {
    // An HTTP/1.0 client gets the body de-chunked, delimited by the close.
    let dying = Backend::start(Arc::new(|_| {
        let mut bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        bytes.extend_from_slice(b"64\r\n");
        bytes.extend_from_slice(&pattern(100, 3));
        bytes.extend_from_slice(b"\r\n");
        Reply::BytesThenClose(bytes)
    }));
    let lb = Balancer::serving(&[(dying.addr, 1.0)]);
    assert_cut_short_body_ends_in_a_reset(&lb, b"GET /chunks HTTP/1.0\r\nHost: test\r\n\r\n");
}

#[test]
fn a_backend_resetting_a_close_delimited_body_resets_the_client() {
    // The backend delimits its body by closing, so a FIN from it is a complete body; a reset
    // part way is not, and must not reach the client as a FIN.
    let resetting = RawBackend::start(Arc::new(|conn: std::net::TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        if read_request(&mut reader).is_none() {
            return;
        }
        let mut bytes = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_vec();
        bytes.extend_from_slice(&pattern(100, 5));
        let _ = writer.write_all(&bytes);
        std::thread::sleep(Duration::from_millis(50));
        let _ = socket2::SockRef::from(&writer).set_linger(Some(Duration::ZERO));
    }));
    let lb = Balancer::serving(&[(resetting.addr, 1.0)]);
    for request in [
        &b"GET /close HTTP/1.1\r\nHost: test\r\n\r\n"[..],
        &b"GET /close HTTP/1.0\r\nHost: test\r\n\r\n"[..],
    ] {
        assert_cut_short_body_ends_in_a_reset(&lb, request);
    }
}

#[test]
fn gets_on_connections_the_backend_closed_while_pooled_never_fail() {
    // Keep-alive answers (no `Connection: close`), but the backend closes right after each.
    let backend = Backend::start(Arc::new(|_| Reply::BytesThenClose(ok(b"fine"))));
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = open(&lb);
    for i in 0..50 {
        writer
            .write_all(format!("GET /pooled/{i} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
            .unwrap();
        let resp = read_response(&mut reader, false)
            .unwrap_or_else(|| panic!("no response to request {i}"));
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        assert_eq!(resp.text(), "fine");
    }
    assert_eq!(backend.requests(), 50);
}

/// The answer the raw test backends below give to `path`: `for {path}`, keep-alive.
fn answer_for(path: &str) -> String {
    let body = format!("for {path}");
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// After its response, writes more on the connection once it is idle in the balancer's pool:
/// a second, unasked-for response after `/then-a-stray-response`, or (as some servers do on
/// idle keep-alive connections) `408` and a close after `/then-408`. Every response's body
/// names the path it answers.
fn backend_speaking_out_of_turn() -> RawBackend {
    RawBackend::start(Arc::new(|conn: std::net::TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        while let Some((_method, path, _headers)) = read_request(&mut reader) {
            if writer.write_all(answer_for(&path).as_bytes()).is_err() {
                return;
            }
            let late = match path.as_str() {
                "/then-a-stray-response" => {
                    "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Stray: 1\r\n\r\nstray"
                }
                "/then-408" => {
                    "HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
                }
                _ => continue,
            };
            std::thread::sleep(Duration::from_millis(100));
            let _ = writer.write_all(late.as_bytes());
            if path == "/then-408" {
                return;
            }
        }
    }))
}

/// Bytes that arrive on a pooled connection between exchanges are out of step with the
/// requests: read as the next response they would reach whichever client is served next
/// (and every later response on that connection would be one behind). Such a connection is
/// closed instead, on its first reuse and on later ones, and the next client gets its own
/// answer.
#[test]
fn bytes_a_backend_sends_on_an_idle_pooled_connection_never_reach_a_client() {
    let backend = backend_speaking_out_of_turn();
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    let get_alone = |path: &str| {
        let resp = get(lb.addr, path);
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        assert_eq!(
            resp.text(),
            format!("for {path}"),
            "{path} got another answer"
        );
        assert_eq!(resp.header("X-Stray"), None, "{path}");
    };
    for round in 0..4 {
        for trigger in ["/then-408", "/then-a-stray-response"] {
            // After a 408 the backend closes, so the next trigger is the first exchange on a
            // fresh backend connection unless a warm-up came before it.
            if round % 2 == 1 {
                get_alone(&format!("/warm-{round}"));
            }
            get_alone(trigger);
            std::thread::sleep(Duration::from_millis(300));
            get_alone(&format!("/next-{round}"));
            get_alone(&format!("/after-{round}"));
        }
    }
}

/// A backend whose `/large-then-stray` answer is a body large enough to be spliced, followed in
/// the same write by a response nobody asked for; `/large-overlong` sends 100 bytes more than its
/// Content-Length. Any other path gets `for {path}`.
fn backend_overrunning_large_bodies() -> RawBackend {
    RawBackend::start(Arc::new(|conn: std::net::TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        while let Some((_method, path, _headers)) = read_request(&mut reader) {
            let reply = match path.as_str() {
                "/large-then-stray" | "/large-overlong" => {
                    let mut r =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {LARGE}\r\n\r\n").into_bytes();
                    r.extend_from_slice(&pattern(LARGE, 3));
                    if path == "/large-then-stray" {
                        r.extend_from_slice(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Stray: 1\r\n\r\nstray",
                        );
                    } else {
                        r.extend_from_slice(&[b'x'; 100]);
                    }
                    r
                }
                _ => answer_for(&path).into_bytes(),
            };
            if writer.write_all(&reply).is_err() {
                return;
            }
        }
    }))
}

/// Large enough to be spliced (not copied through user space).
const LARGE: usize = 200_000;

#[test]
fn bytes_a_backend_sends_beyond_a_spliced_body_never_reach_a_client() {
    let backend = backend_overrunning_large_bodies();
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    for round in 0..3 {
        for overrun in ["/large-then-stray", "/large-overlong"] {
            // One after the other on new client connections (the backend connection pooled)...
            let large = get(lb.addr, overrun);
            assert_eq!(large.status, 200, "{overrun}");
            assert_eq!(hash(&large.body), hash(&pattern(LARGE, 3)), "{overrun}");
            let next = get(lb.addr, &format!("/next-{round}"));
            assert_eq!(next.status, 200, "after {overrun}: {}", next.text());
            assert_eq!(next.text(), format!("for /next-{round}"), "after {overrun}");
            assert_eq!(next.header("X-Stray"), None);

            // ...and pipelined on one client connection.
            let mut client = connect(lb.addr);
            let pipelined = format!(
                "GET {overrun} HTTP/1.1\r\nHost: t\r\n\r\nGET /piped-{round} HTTP/1.1\r\nHost: t\r\n\r\n"
            );
            client.write_all(pipelined.as_bytes()).unwrap();
            let mut reader = BufReader::new(client);
            let large = read_response(&mut reader, false).expect("the large response");
            assert_eq!(hash(&large.body), hash(&pattern(LARGE, 3)), "{overrun}");
            let piped = read_response(&mut reader, false).expect("the pipelined response");
            assert_eq!(piped.status, 200, "after {overrun}: {}", piped.text());
            assert_eq!(
                piped.text(),
                format!("for /piped-{round}"),
                "after {overrun}"
            );
        }
    }
}

#[test]
fn posts_on_connections_the_backend_closed_while_pooled_never_fail() {
    let backend = Backend::start(Arc::new(|_| {
        let mut reply = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n".to_vec();
        reply.extend_from_slice(b"done");
        Reply::BytesThenClose(reply)
    }));
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = open(&lb);
    for i in 0..50 {
        let body = format!("payload {i}");
        writer
            .write_all(
                format!(
                    "POST /pooled/{i} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .unwrap();
        let resp = read_response(&mut reader, false)
            .unwrap_or_else(|| panic!("no response to request {i}"));
        assert_eq!(resp.status, 200, "request {i}: {}", resp.text());
        assert_eq!(resp.text(), "done");
    }
    assert_eq!(backend.requests(), 50);
}

/// A backend that answers GETs on any connection; a POST it reads whole and then closes the
/// connection without a word (it died while handling it); the second request on a connection
/// that is not a POST it answers with a 408 and a close, as a backend whose idle timeout fires
/// just as the request arrives.
fn backend_dying_on_posts_and_timing_out_reused_connections(posts: Arc<AtomicUsize>) -> RawBackend {
    RawBackend::start(Arc::new(move |conn: std::net::TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        let mut served = 0;
        while let Some((method, path, headers)) = read_request(&mut reader) {
            if method == "POST" {
                posts.fetch_add(1, SeqCst);
                let len = headers
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len];
                let _ = reader.read_exact(&mut body);
                return;
            }
            if served == 1 && path.starts_with("/crossed") {
                let _ = writer.write_all(
                    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                );
                return;
            }
            if writer.write_all(answer_for(&path).as_bytes()).is_err() {
                return;
            }
            served += 1;
        }
    }))
}

#[test]
fn a_post_the_backend_took_and_never_answered_is_not_sent_again() {
    let posts = Arc::new(AtomicUsize::new(0));
    let backend = backend_dying_on_posts_and_timing_out_reused_connections(posts.clone());
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = open(&lb);
    // A warm pooled connection that the POST could have been sent on.
    assert_eq!(get_on(&mut writer, &mut reader, "/warm").status, 200);
    writer
        .write_all(b"POST /pay HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\n1234")
        .unwrap();
    let resp = read_response(&mut reader, false).expect("an answer");
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert_eq!(posts.load(SeqCst), 1, "the payment ran once");
}

#[test]
fn a_408_crossing_a_request_on_a_reused_connection_is_retried_on_a_fresh_one() {
    let backend =
        backend_dying_on_posts_and_timing_out_reused_connections(Arc::new(AtomicUsize::new(0)));
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    for round in 0..3 {
        let (mut writer, mut reader) = open(&lb);
        assert_eq!(
            get_on(&mut writer, &mut reader, &format!("/warm-{round}")).status,
            200
        );
        let target = format!("/crossed-{round}");
        let resp = get_on(&mut writer, &mut reader, &target);
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.text(), format!("for {target}"));
    }
}

/// Sends `method` (with `Content-Length: len(body)` when `body` is given) through a balancer
/// whose likely first pick closes without answering, until one request reaches it; returns that
/// request's status and whether the other server saw it too.
fn outcome_after_a_close(method: &str, body: Option<&str>) -> Option<(u16, bool)> {
    outcome_after_a_failure(closing(), method, body)
}

/// [`outcome_after_a_close`] with a likely first pick that fails as `failing` does.
fn outcome_after_a_failure(
    failing: Handler,
    method: &str,
    body: Option<&str>,
) -> Option<(u16, bool)> {
    let failing_backend = Backend::start(failing);
    let good = Backend::start(Arc::new(|seen: &Seen| {
        if seen.method == "HEAD" {
            Reply::Bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n".to_vec())
        } else {
            Reply::Bytes(ok(b"good"))
        }
    }));
    // The failing server is picked first almost always (and is ejected only after 3 failures).
    let lb = Balancer::serving(&[(failing_backend.addr, 9.0), (good.addr, 1.0)]);
    let framing = body.map_or(String::new(), |b| {
        format!("Content-Length: {}\r\n", b.len())
    });
    for attempt in 0..5 {
        let target = format!("/{method}/{attempt}");
        let resp = request(
            lb.addr,
            &format!(
                "{method} {target} HTTP/1.1\r\nHost: test\r\n{framing}Connection: close\r\n\r\n{}",
                body.unwrap_or("")
            ),
        );
        if targets(&failing_backend).contains_key(&target) {
            return Some((resp.status, targets(&good).contains_key(&target)));
        }
    }
    None
}

/// Checks each (method, body) case against the expected (status, replayed on the other server).
fn check_close_outcomes(cases: &[(&str, Option<&str>)], expected: (u16, bool)) {
    let mut failures = Vec::new();
    for &(method, body) in cases {
        match outcome_after_a_close(method, body) {
            Some(got) if got == expected => {}
            Some((status, replayed)) => failures.push(format!(
                "{method} with body {body:?}: status {status}, replayed on the other server: \
                 {replayed}; expected {expected:?}"
            )),
            None => failures.push(format!("{method}: never routed to the closing server")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn idempotent_requests_without_a_body_are_retried_after_a_close() {
    check_close_outcomes(
        &[
            ("GET", None),
            ("HEAD", None),
            ("OPTIONS", None),
            ("DELETE", None),
            ("PUT", None),
        ],
        (200, true),
    );
}

/// SPEC §6 allows a retry only "before any response byte": a backend that started its head
/// and then closed may have acted on the request, so even a GET is not replayed.
#[test]
fn a_get_the_backend_closes_on_after_part_of_the_head_is_not_retried() {
    let partial_head =
        Arc::new(|_: &Seen| Reply::BytesThenClose(b"HTTP/1.1 200 OK\r\nContent-Le".to_vec()));
    assert_eq!(
        outcome_after_a_failure(partial_head, "GET", None),
        Some((502, false))
    );
}

#[test]
fn an_empty_content_length_body_does_not_prevent_a_retry() {
    // `Content-Length: 0` declares zero-length content: the request has no body (RFC 9110 §8.6).
    check_close_outcomes(
        &[("GET", Some("")), ("PUT", Some("")), ("DELETE", Some(""))],
        (200, true),
    );
}

#[test]
fn requests_with_a_body_or_unsafe_methods_are_not_retried_after_a_close() {
    check_close_outcomes(
        &[
            ("PUT", Some("replace=1")),
            ("DELETE", Some("reason=x")),
            ("POST", None),
            ("POST", Some("a=1")),
            ("PATCH", Some("b=2")),
        ],
        (502, false),
    );
}

#[test]
fn large_uploads_on_connections_the_backend_closed_while_pooled_never_fail() {
    // Bodies too large to buffer for a replay, so the pool must not hand out a dead connection.
    let backend = Backend::start(Arc::new(|_| Reply::BytesThenClose(ok(b"stored"))));
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = open(&lb);
    let len = 256 * 1024;
    for i in 0..10 {
        let body = pattern(len, i);
        writer
            .write_all(
                format!("PUT /upload/{i} HTTP/1.1\r\nHost: test\r\nContent-Length: {len}\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
        writer.write_all(&body).unwrap();
        let resp = read_response(&mut reader, false)
            .unwrap_or_else(|| panic!("no response to upload {i}"));
        assert_eq!(resp.status, 200, "upload {i}: {}", resp.text());
        let seen = backend.last_seen().expect("the backend saw the upload");
        assert_eq!(
            (seen.body_len, seen.body_hash),
            (len, hash(&body)),
            "upload {i}"
        );
    }
    assert_eq!(backend.requests(), 10);
}

#[test]
fn chunked_uploads_on_connections_the_backend_closed_while_pooled_never_fail() {
    let backend = Backend::start(Arc::new(|_| Reply::BytesThenClose(ok(b"stored"))));
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = open(&lb);
    for i in 0..20 {
        writer
            .write_all(
                format!(
                    "POST /chunked/{i} HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
        let resp = read_response(&mut reader, false)
            .unwrap_or_else(|| panic!("no response to upload {i}"));
        assert_eq!(resp.status, 200, "upload {i}: {}", resp.text());
    }
    assert_eq!(backend.requests(), 20);
}

/// Descriptors in use by process `pid`.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

#[test]
fn running_out_of_descriptors_is_a_503_not_a_backend_failure() {
    let backend = Backend::named("up");
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    let pid = lb.pid();
    // Three client connections accepted, then no descriptor left for anything else.
    let before = open_descriptors(pid);
    let clients: Vec<_> = (0..3).map(|_| connect(lb.addr)).collect();
    eventually("the three connections to be accepted", || {
        open_descriptors(pid) >= before + 3
    });
    // A new descriptor takes the lowest free number, which must be under the limit: with a
    // limit of 3 (stdin, stdout, stderr) every new one fails, holes in the table or not.
    let limit = |new: Option<libc::rlimit>| {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let new_ptr = new
            .as_ref()
            .map_or(std::ptr::null(), |n| n as *const libc::rlimit);
        // SAFETY: prlimit(2) on our own child, with valid rlimit structs to read and fill.
        let set =
            unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_NOFILE, new_ptr, &mut old) };
        assert_eq!(set, 0, "prlimit: {}", std::io::Error::last_os_error());
        old
    };
    let normal = limit(None);
    limit(Some(libc::rlimit {
        rlim_cur: 3,
        rlim_max: normal.rlim_max,
    }));

    for (i, client) in clients.into_iter().enumerate() {
        let mut writer = client.try_clone().unwrap();
        let mut reader = BufReader::new(client);
        let resp = get_on(&mut writer, &mut reader, &format!("/starved/{i}"));
        assert_eq!(resp.status, 503, "request {i}: {}", resp.text());
    }
    limit(Some(normal));
    let (_, servers) = lb.admin_get("/servers");
    assert!(servers.contains("\"ejected_shards\":0"), "{servers}");
    let connect_errors = format!(
        "balancer_backend_errors_total{{backend=\"{}\",kind=\"connect\"}}",
        backend.addr
    );
    assert_eq!(lb.metric(&connect_errors).unwrap_or(0.0), 0.0);
    let warnings = lb
        .log_text()
        .lines()
        .filter(|l| l.contains("raise the descriptor limit"))
        .count();
    assert_eq!(
        warnings,
        1,
        "one warning for three failures:\n{}",
        lb.log_text()
    );
}

/// A connection idle for over a second gives its receive buffer back until bytes arrive
/// (README, Tuning); requests after such a pause, first ones included, are served as usual.
#[test]
fn requests_after_a_pause_longer_than_the_buffer_grace_are_served() {
    let backend = Backend::named("up");
    let lb = Balancer::serving(&[(backend.addr, 1.0)]);
    let pause = Duration::from_millis(1300);
    let (mut writer, mut reader) = open(&lb);
    std::thread::sleep(pause);
    assert_eq!(get_on(&mut writer, &mut reader, "/first").status, 200);
    std::thread::sleep(pause);
    // A head whose first bytes end the pause and whose rest follows.
    writer.write_all(b"GET /split HTT").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    writer.write_all(b"P/1.1\r\nHost: t\r\n\r\n").unwrap();
    let resp = read_response(&mut reader, false).expect("an answer");
    assert_eq!(resp.text(), "up");
    assert_eq!(get_on(&mut writer, &mut reader, "/third").status, 200);
}
