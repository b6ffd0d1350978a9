//! The corners of HTTP/1.1 through the balancer (SPEC §6): `Expect: 100-continue`, interim
//! responses, bodiless responses, `Connection: close` both ways, chunked trailers, `OPTIONS *`,
//! absolute-form targets and `CONNECT`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{mpsc, Arc, Mutex};

use common::*;

/// A client connection split into a writer and a buffered reader.
fn client(balancer: &Balancer) -> (TcpStream, BufReader<TcpStream>) {
    let stream = connect(balancer.addr);
    (stream.try_clone().unwrap(), BufReader::new(stream))
}

/// Reads everything until the balancer closes the connection.
fn read_to_eof<R: Read>(r: &mut R) -> Vec<u8> {
    let mut all = Vec::new();
    r.read_to_end(&mut all)
        .expect("the connection closes (EOF, not a timeout)");
    all
}

/// Splits a raw response into (head, body) at the first blank line.
fn split_response(raw: &[u8]) -> (String, Vec<u8>) {
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    (
        String::from_utf8_lossy(&raw[..at]).into_owned(),
        raw[at + 4..].to_vec(),
    )
}

/// Decodes a chunked body; (data, trailer lines).
fn dechunk(mut body: &[u8]) -> (Vec<u8>, Vec<String>) {
    let mut data = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size_text = String::from_utf8_lossy(&body[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
            .expect("hex chunk size");
        body = &body[line_end + 2..];
        if size == 0 {
            let rest = String::from_utf8_lossy(body).into_owned();
            assert!(
                rest.ends_with("\r\n\r\n") || rest == "\r\n",
                "chunked body ends with a blank line: {rest:?}"
            );
            let trailers = rest
                .split("\r\n")
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            return (data, trailers);
        }
        data.extend_from_slice(&body[..size]);
        assert_eq!(&body[size..size + 2], b"\r\n", "chunk data ends with CRLF");
        body = &body[size + 2..];
    }
}

/// A backend that reads one request head, answers with `answer` without reading any body,
/// then reports how many bytes arrived after the head until the balancer closed the connection.
fn rejecting_backend(answer: &'static [u8]) -> (RawBackend, mpsc::Receiver<usize>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let backend = RawBackend::start(Arc::new(move |conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        if read_request(&mut reader).is_none() {
            return;
        }
        writer.write_all(answer).unwrap();
        let mut after_head = reader.buffer().len();
        reader.consume(after_head);
        let mut buf = [0u8; 4096];
        loop {
            match reader.get_mut().read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => after_head += n,
            }
        }
        let _ = tx.lock().unwrap().send(after_head);
    }));
    (backend, rx)
}

#[test]
fn expect_continue_client_gets_100_then_200_and_the_body_arrives_intact() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        Reply::Bytes(ok(
            format!("{} {:x}", seen.body_len, seen.body_hash).as_bytes()
        ))
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let body = pattern(100_000, 3);
    let (mut writer, mut reader) = client(&balancer);
    writer
        .write_all(
            format!(
                "POST /upload HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
    let (interim, _) = read_head(&mut reader).expect("an interim answer before the body is sent");
    assert_eq!(interim, 100);
    writer.write_all(&body).unwrap();
    let resp = read_response(&mut reader, false).expect("the final response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), format!("{} {:x}", body.len(), hash(&body)));
    let seen = backend.last_seen().unwrap();
    assert_eq!(
        seen.header("expect"),
        Some("100-continue"),
        "Expect is forwarded"
    );
}

#[test]
fn expect_answered_417_reaches_the_waiting_client_and_no_body_reaches_the_backend() {
    let (backend, received) =
        rejecting_backend(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = client(&balancer);
    writer
        .write_all(b"PUT /big HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 5000000\r\n\r\n")
        .unwrap();
    let resp =
        read_response(&mut reader, false).expect("the backend's final answer, without a body sent");
    assert_eq!(resp.status, 417);
    let after_head = received
        .recv_timeout(WAIT)
        .expect("the backend connection ends");
    assert_eq!(after_head, 0, "the backend received body bytes");
}

#[test]
fn expect_answered_413_stops_an_eager_body_before_the_backend() {
    let (backend, received) = rejecting_backend(
        b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n",
    );
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = client(&balancer);
    // A client that does not wait: head and the start of its body in one write.
    let mut eager = b"POST /big HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: 1000000\r\n\r\n".to_vec();
    eager.extend_from_slice(&pattern(32 * 1024, 5));
    writer.write_all(&eager).unwrap();
    let resp = read_response(&mut reader, false).expect("the backend's final answer");
    assert_eq!(resp.status, 413);
    assert_eq!(resp.text(), "too big\n");
    let after_head = received
        .recv_timeout(WAIT)
        .expect("the backend connection ends");
    assert_eq!(after_head, 0, "the backend received body bytes");
}

#[test]
fn early_hints_reach_the_client_before_the_final_response() {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let backend = RawBackend::start(Arc::new(move |conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        if read_request(&mut reader).is_none() {
            return;
        }
        writer
            .write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
            .unwrap();
        // The final answer is written only once the client has seen the hint.
        if release_rx.lock().unwrap().recv_timeout(WAIT).is_ok() {
            let _ = writer.write_all(&ok(b"final"));
        }
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = client(&balancer);
    writer
        .write_all(b"GET /page HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let (status, headers) = read_head(&mut reader).expect("the interim response");
    assert_eq!(status, 103);
    assert!(
        headers
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case("link") && v == "</style.css>; rel=preload"),
        "{headers:?}"
    );
    release_tx.send(()).unwrap();
    let resp = read_response(&mut reader, false).expect("the final response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "final");
}

/// A backend that sends an interim answer and then closes has begun answering: the request
/// is not sent again (not even on a fresh connection after a pooled one), and the client
/// sees the interim answer once, then 502.
#[test]
fn a_backend_closing_after_an_interim_answer_is_not_retried() {
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = seen.clone();
    let backend = RawBackend::start(Arc::new(move |conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        while let Some((_, path, _)) = read_request(&mut reader) {
            log.lock().unwrap().push(path.clone());
            if path == "/hint-then-close" {
                let _ = writer.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n");
                return;
            }
            if writer.write_all(&ok(b"pooled")).is_err() {
                return;
            }
        }
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = client(&balancer);
    // The first request leaves a pooled connection behind for the second.
    writer
        .write_all(b"GET /first HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let first = read_response(&mut reader, false).expect("first response");
    assert_eq!(first.text(), "pooled");
    writer
        .write_all(b"GET /hint-then-close HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let (status, _) = read_head(&mut reader).expect("the interim answer");
    assert_eq!(status, 103);
    let (status, _) = read_head(&mut reader).expect("the final answer");
    assert_eq!(status, 502, "one interim answer, then 502");
    let paths = seen.lock().unwrap().clone();
    assert_eq!(paths, ["/first", "/hint-then-close"], "sent once");
}

/// Sends `first` and then a plain GET on one connection; returns both responses. The second
/// one proves that no stray body bytes followed the first.
fn two_on_one_connection(
    balancer: &Balancer,
    first: &str,
    first_is_head: bool,
) -> (Response, Response) {
    let (mut writer, mut reader) = client(balancer);
    writer.write_all(first.as_bytes()).unwrap();
    let a = read_response(&mut reader, first_is_head).expect("first response");
    writer
        .write_all(b"GET /next HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let b = read_response(&mut reader, false).expect("second response on the same connection");
    (a, b)
}

/// A backend answering `special` to the path `/special` and `200 next` to anything else.
fn special_backend(special: &'static [u8]) -> Backend {
    Backend::start(Arc::new(move |seen: &Seen| {
        if seen.target == "/special" {
            Reply::Bytes(special.to_vec())
        } else {
            Reply::Bytes(ok(b"next"))
        }
    }))
}

#[test]
fn head_response_carries_no_body() {
    let backend = special_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nContent-Type: text/plain\r\n\r\n",
    );
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (head, next) = two_on_one_connection(
        &balancer,
        "HEAD /special HTTP/1.1\r\nHost: test\r\n\r\n",
        true,
    );
    assert_eq!(head.status, 200);
    assert_eq!(next.status, 200);
    assert_eq!(next.text(), "next");
}

#[test]
fn no_content_response_carries_no_body() {
    let backend = special_backend(b"HTTP/1.1 204 No Content\r\nX-Done: yes\r\n\r\n");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (first, next) = two_on_one_connection(
        &balancer,
        "DELETE /special HTTP/1.1\r\nHost: test\r\n\r\n",
        false,
    );
    assert_eq!(first.status, 204);
    assert_eq!(first.header("x-done"), Some("yes"));
    assert!(
        first.header("transfer-encoding").is_none(),
        "{:?}",
        first.headers
    );
    assert_eq!(next.text(), "next");
}

#[test]
fn not_modified_response_carries_no_body() {
    let backend =
        special_backend(b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\nContent-Length: 50\r\n\r\n");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (first, next) = two_on_one_connection(
        &balancer,
        "GET /special HTTP/1.1\r\nHost: test\r\nIf-None-Match: \"v1\"\r\n\r\n",
        false,
    );
    assert_eq!(first.status, 304);
    assert_eq!(first.header("etag"), Some("\"v1\""));
    assert!(
        first.header("transfer-encoding").is_none(),
        "{:?}",
        first.headers
    );
    assert_eq!(next.text(), "next");
}

#[test]
fn client_connection_close_is_answered_with_connection_close_then_eof() {
    let backend = Backend::named("bye");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = client(&balancer);
    writer
        .write_all(b"GET /x HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut reader, false).expect("a response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "bye");
    assert_eq!(
        resp.header("connection")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("close")
    );
    assert!(
        read_to_eof(&mut reader).is_empty(),
        "nothing after the response"
    );
}

#[test]
fn backend_connection_close_keeps_the_client_connection_alive() {
    let backend = Backend::start(Arc::new(|_seen: &Seen| {
        Reply::BytesThenClose(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nonce".to_vec(),
        )
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = client(&balancer);
    for i in 0..3 {
        writer
            .write_all(b"GET /x HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let resp = read_response(&mut reader, false)
            .unwrap_or_else(|| panic!("response {i} on the same client connection"));
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "once");
        assert!(
            !resp
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close")),
            "the backend's Connection: close is hop-by-hop: {:?}",
            resp.headers
        );
    }
    assert_eq!(
        backend.accepts(),
        3,
        "a fresh backend connection per request"
    );
}

const CHUNKED_WITH_TRAILER: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n\
5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc123\r\n\r\n";

#[test]
fn chunked_trailers_reach_an_http11_client() {
    let backend = Backend::start(Arc::new(|_seen: &Seen| {
        Reply::Bytes(CHUNKED_WITH_TRAILER.to_vec())
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = client(&balancer);
    writer
        .write_all(b"GET /t HTTP/1.1\r\nHost: test\r\nTE: trailers\r\nConnection: close\r\n\r\n")
        .unwrap();
    let raw = read_to_eof(&mut reader);
    let (head, body) = split_response(&raw);
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let (data, trailers) = dechunk(&body);
    assert_eq!(data, b"hello world");
    assert_eq!(trailers, vec!["X-Checksum: abc123".to_string()]);
}

#[test]
fn chunked_trailers_are_dropped_for_an_http10_client() {
    let backend = Backend::start(Arc::new(|_seen: &Seen| {
        Reply::Bytes(CHUNKED_WITH_TRAILER.to_vec())
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = client(&balancer);
    writer
        .write_all(b"GET /t HTTP/1.0\r\nHost: test\r\n\r\n")
        .unwrap();
    let raw = read_to_eof(&mut reader);
    let (head, body) = split_response(&raw);
    assert!(
        !head.to_ascii_lowercase().contains("transfer-encoding"),
        "{head}"
    );
    assert_eq!(
        body, b"hello world",
        "close-delimited body without chunk framing or trailers"
    );
}

/// A body with a transfer coding besides chunked (`gzip, chunked`) reaches an HTTP/1.1 client
/// with its Transfer-Encoding; an HTTP/1.0 client, which must get no Transfer-Encoding, gets
/// 502 rather than gzip bytes presented as plain content; and it is never cached, since a hit
/// would present them so too.
#[test]
fn a_gzip_transfer_coded_body_is_never_presented_as_plain() {
    let backend = Backend::start(Arc::new(|_seen: &Seen| {
        Reply::Bytes(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/css\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n"
                .to_vec(),
        )
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    for _ in 0..2 {
        let (mut writer, mut reader) = client(&balancer);
        writer
            .write_all(b"GET /site.css HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
            .unwrap();
        let raw = read_to_eof(&mut reader);
        let (head, _) = split_response(&raw);
        let lower = head.to_ascii_lowercase();
        assert!(lower.contains("transfer-encoding: gzip, chunked"), "{head}");
        assert!(lower.contains("x-cache: miss"), "never stored: {head}");
    }
    let (mut writer, mut reader) = client(&balancer);
    writer
        .write_all(b"GET /site.css HTTP/1.0\r\nHost: test\r\n\r\n")
        .unwrap();
    let (status, _) = read_head(&mut reader).expect("an answer");
    assert_eq!(status, 502);
}

#[test]
fn options_asterisk_is_forwarded_and_answered() {
    let backend = Backend::start(Arc::new(|_seen: &Seen| {
        Reply::Bytes(
            b"HTTP/1.1 200 OK\r\nAllow: GET, HEAD, OPTIONS\r\nContent-Length: 0\r\n\r\n".to_vec(),
        )
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let resp = request(
        balancer.addr,
        "OPTIONS * HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("allow"), Some("GET, HEAD, OPTIONS"));
    let seen = backend.last_seen().expect("the backend saw the request");
    assert_eq!(
        (seen.method.as_str(), seen.target.as_str()),
        ("OPTIONS", "*")
    );
}

#[test]
fn absolute_form_target_is_forwarded_in_origin_form_with_its_authority_as_host() {
    let backend = Backend::named("abs");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let resp = request(
        balancer.addr,
        "GET http://example.org:8080/p/q?x=1 HTTP/1.1\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    let seen = backend.last_seen().expect("the backend saw the request");
    assert_eq!(seen.target, "/p/q?x=1");
    assert_eq!(seen.header("host"), Some("example.org:8080"));
    assert_eq!(
        seen.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
            .count(),
        1
    );
}

#[test]
fn connect_is_refused_with_405() {
    let backend = Backend::named("never");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let resp = request(
        balancer.addr,
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    );
    assert_eq!(resp.status, 405);
    assert!(resp
        .header("content-type")
        .is_some_and(|v| v.starts_with("text/plain")));
    assert!(resp.body.len() < 1024);
    assert_eq!(backend.requests(), 0, "CONNECT never reaches a backend");
}
