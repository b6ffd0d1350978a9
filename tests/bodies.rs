//! Request and response bodies stream through byte for byte: large uploads and downloads with
//! Content-Length or chunked framing, small bodies, and `Expect: 100-continue`.

mod common;

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;

use common::*;

const BIG: usize = 50 * 1024 * 1024;

/// One backend behind one balancer.
fn proxy(handler: Handler) -> (Backend, Balancer) {
    let backend = Backend::start(handler);
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    (backend, balancer)
}

/// A backend that answers every request with `200 stored` once it has read the body.
fn store() -> Handler {
    Arc::new(|_: &Seen| Reply::Bytes(ok(b"stored")))
}

/// Asserts the backend saw exactly `body`.
fn assert_backend_got(backend: &Backend, body: &[u8]) {
    let seen = backend.last_seen().expect("backend saw the request");
    assert_eq!(seen.body_len, body.len(), "body length at the backend");
    assert_eq!(seen.body_hash, hash(body), "body bytes at the backend");
}

#[test]
fn a_50_mib_upload_with_content_length_arrives_intact() {
    let (backend, balancer) = proxy(store());
    let body = pattern(BIG, 1);
    let (mut writer, mut reader) = open(&balancer);
    writer
        .write_all(
            format!("PUT /upload HTTP/1.1\r\nHost: test\r\nContent-Length: {BIG}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    writer
        .write_all(&body)
        .expect("the balancer takes the whole body");
    let resp = read_response(&mut reader, false).expect("a response to the upload");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "stored");
    assert_backend_got(&backend, &body);
}

#[test]
fn a_50_mib_chunked_upload_arrives_intact() {
    let (backend, balancer) = proxy(store());
    let body = pattern(BIG, 2);
    let (mut writer, mut reader) = open(&balancer);
    writer
        .write_all(b"POST /upload HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    // Uneven chunk sizes, so chunk boundaries fall anywhere in the balancer's buffers.
    let sizes = [1, 4096, 65536, 100_003, 7, 1 << 20];
    let mut sent = 0;
    let mut i = 0;
    while sent < body.len() {
        let n = sizes[i % sizes.len()].min(body.len() - sent);
        writer.write_all(format!("{n:x}\r\n").as_bytes()).unwrap();
        writer.write_all(&body[sent..sent + n]).unwrap();
        writer.write_all(b"\r\n").unwrap();
        sent += n;
        i += 1;
    }
    writer.write_all(b"0\r\n\r\n").unwrap();
    let resp = read_response(&mut reader, false).expect("a response to the upload");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_backend_got(&backend, &body);
}

/// Sends `GET path` on an open client connection and asserts a complete 200 whose body is
/// exactly `expected`.
fn assert_download(
    writer: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    path: &str,
    expected: &[u8],
) {
    writer
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .unwrap();
    let resp = read_response(reader, false).expect("a complete response");
    assert_eq!(resp.status, 200, "{path}");
    assert_eq!(resp.body.len(), expected.len(), "{path}: body length");
    assert_eq!(hash(&resp.body), hash(expected), "{path}: body bytes");
}

#[test]
fn a_50_mib_download_with_content_length_arrives_intact() {
    let (_backend, balancer) = proxy(Arc::new(|_: &Seen| {
        Reply::Stream {
        head: format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\nContent-Type: application/octet-stream\r\n\r\n")
            .into_bytes(),
        len: BIG,
        seed: 3,
        chunked: false,
    }
    }));
    let (mut writer, mut reader) = open(&balancer);
    assert_download(&mut writer, &mut reader, "/download", &pattern(BIG, 3));
}

#[test]
fn a_50_mib_chunked_download_arrives_intact() {
    let (_backend, balancer) = proxy(Arc::new(|_: &Seen| {
        Reply::Stream {
        head: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n"
            .to_vec(),
        len: BIG,
        seed: 4,
        chunked: true,
    }
    }));
    let (mut writer, mut reader) = open(&balancer);
    assert_download(&mut writer, &mut reader, "/download", &pattern(BIG, 4));
}

#[test]
fn a_small_post_body_arrives_intact() {
    let (backend, balancer) = proxy(store());
    let body = pattern(1024, 5);
    let (mut writer, mut reader) = open(&balancer);
    writer
        .write_all(b"POST /form HTTP/1.1\r\nHost: test\r\nContent-Length: 1024\r\n\r\n")
        .unwrap();
    writer.write_all(&body).unwrap();
    let resp = read_response(&mut reader, false).expect("a response to the POST");
    assert_eq!(resp.status, 200);
    assert_backend_got(&backend, &body);
}

/// Sends a head with `Expect: 100-continue`, waits for `100 Continue` before the body, then
/// expects a 200 and the body intact at the backend.
fn upload_after_continue(len: usize, seed: u64) {
    let (backend, balancer) = proxy(store());
    let body = pattern(len, seed);
    let (mut writer, mut reader) = open(&balancer);
    writer
        .write_all(
            format!("PUT /expect HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: {len}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    let (status, _) = read_head(&mut reader).expect("an interim response before the body is sent");
    assert_eq!(
        status, 100,
        "the client is told to continue before it sends the body"
    );
    writer.write_all(&body).unwrap();
    let resp = read_response(&mut reader, false).expect("a final response");
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_backend_got(&backend, &body);
}

#[test]
fn an_expect_100_continue_upload_gets_100_then_200_with_the_body_intact() {
    upload_after_continue(1024 * 1024, 6);
}

#[test]
fn a_small_expect_100_continue_upload_gets_100_then_200_with_the_body_intact() {
    upload_after_continue(1024, 7);
}

/// A backend that answers each request on a connection with a 200 KiB body written in uneven
/// pieces with pauses between some of them, in the framing the request path names
/// (`/length`, `/chunked`, or `/close`: delimited by closing the connection). The balancer
/// gathers what has arrived before each send; bytes must still come out exact and in order,
/// and a connection must stay usable after a response that ended mid-gather.
fn trickling_backend() -> RawBackend {
    RawBackend::start(Arc::new(|conn: TcpStream| {
        let _ = conn.set_nodelay(true);
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        while let Some((_method, path, _headers)) = read_request(&mut reader) {
            let body = pattern(TRICKLE, 9);
            let head = match path.as_str() {
                "/length" => format!("HTTP/1.1 200 OK\r\nContent-Length: {TRICKLE}\r\n\r\n"),
                "/chunked" => "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
                _ => "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".into(),
            };
            if writer.write_all(head.as_bytes()).is_err() {
                return;
            }
            let sizes = [1, 700, 16_384, 3, 65_536, 10_000, 1];
            let (mut sent, mut i) = (0, 0);
            while sent < body.len() {
                let n = sizes[i % sizes.len()].min(body.len() - sent);
                let piece = &body[sent..sent + n];
                let written = if path == "/chunked" {
                    let mut framed = format!("{n:x}\r\n").into_bytes();
                    framed.extend_from_slice(piece);
                    framed.extend_from_slice(b"\r\n");
                    writer.write_all(&framed)
                } else {
                    writer.write_all(piece)
                };
                if written.is_err() {
                    return;
                }
                sent += n;
                i += 1;
                if i % 3 == 0 {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
            }
            if path == "/chunked" && writer.write_all(b"0\r\n\r\n").is_err() {
                return;
            }
            if path == "/close" {
                return;
            }
        }
    }))
}

const TRICKLE: usize = 200 * 1024;

#[test]
fn bodies_arriving_in_uneven_pieces_with_pauses_come_out_exact_in_every_framing() {
    let backend = trickling_backend();
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let expected = pattern(TRICKLE, 9);
    let (mut writer, mut reader) = open(&balancer);
    // Twice each on one client connection: the second proves the first left no stray bytes;
    // the close-delimited one ends the connection, so it comes last.
    for path in ["/length", "/chunked", "/length", "/chunked", "/close"] {
        assert_download(&mut writer, &mut reader, path, &expected);
    }
}

/// A backend's last bytes and its FIN often arrive together. On a pooled connection the read
/// poll stays armed across requests (the vendored glommio's multishot poll), and one poll
/// completion reports both: the read that returns the bytes must not be taken to have drained
/// the socket, or the EOF is never read and the exchange waits out REQUEST_TIMEOUT (30 s here)
/// instead of failing at once. A response head cut short by the close shows it: the balancer
/// reads it through the poll, needs more, and must see the EOF.
#[test]
fn a_response_head_cut_short_by_a_close_fails_at_once_on_a_pooled_connection() {
    let (_backend, balancer) = proxy(Arc::new(|seen: &Seen| {
        if seen.target == "/cut-short" {
            Reply::BytesThenClose(b"HTTP/1.1 200 OK\r\nContent-Le".to_vec())
        } else {
            Reply::Bytes(ok(b"kept alive"))
        }
    }));
    let (mut writer, mut reader) = open(&balancer);
    for target in ["/first", "/second"] {
        let resp = get_on(&mut writer, &mut reader, target);
        assert_eq!((resp.status, resp.text().as_str()), (200, "kept alive"));
    }
    // The answer must come before the client's read timeout, not after REQUEST_TIMEOUT.
    let started = std::time::Instant::now();
    let resp = get_on(&mut writer, &mut reader, "/cut-short");
    assert_eq!(resp.status, 502, "{}", resp.text());
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

// Content-Length bodies with 32 KiB or more still to come after the head are spliced from the
// backend's socket to the client's through a per-shard pipe (src/splice.rs). The downloads
// above cover the whole-body case; these cover the ends a splice can come to early.

const SPLICED: usize = 4 * 1024 * 1024;

/// `/cut` announces SPLICED bytes, sends 200 KiB and closes; anything else gets SPLICED bytes
/// of pattern(seed = path length).
fn cutting_backend() -> RawBackend {
    RawBackend::start(Arc::new(|conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        while let Some((_method, path, _headers)) = read_request(&mut reader) {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {SPLICED}\r\n\r\n");
            let body = pattern(SPLICED, path.len() as u64);
            let sent = if path == "/cut" { 200 * 1024 } else { SPLICED };
            if writer.write_all(head.as_bytes()).is_err()
                || writer.write_all(&body[..sent]).is_err()
            {
                return;
            }
            if path == "/cut" {
                return;
            }
        }
    }))
}

#[test]
fn a_backend_closing_part_way_through_a_spliced_body_ends_the_client_connection() {
    let backend = cutting_backend();
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = open(&balancer);
    writer
        .write_all(b"GET /cut HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let (status, _) = read_head(&mut reader).expect("the head is relayed");
    assert_eq!(status, 200);
    // The client gets what the backend sent, then the connection ends (no hang until a
    // timeout: the read timeout is WAIT, far below the balancer's 30 s REQUEST_TIMEOUT).
    let mut body = Vec::new();
    let read = std::io::Read::read_to_end(&mut reader, &mut body);
    assert!(read.is_ok() || !body.is_empty(), "{read:?}");
    assert_eq!(body.len(), 200 * 1024, "exactly the bytes the backend sent");
    assert_eq!(hash(&body), hash(&pattern(SPLICED, 4)[..200 * 1024]));
    // A whole spliced body still comes through afterwards.
    let (mut writer, mut reader) = open(&balancer);
    assert_download(&mut writer, &mut reader, "/whole", &pattern(SPLICED, 6));
}

#[test]
fn clients_leaving_part_way_through_spliced_bodies_leave_no_stale_bytes_behind() {
    let backend = cutting_backend();
    // The harness runs one shard, so every request shares its pipe pool.
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    for _ in 0..5 {
        let (mut writer, mut reader) = open(&balancer);
        writer
            .write_all(b"GET /leave HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let (status, _) = read_head(&mut reader).expect("the head is relayed");
        assert_eq!(status, 200);
        let mut some = vec![0u8; 100 * 1024];
        std::io::Read::read_exact(&mut reader, &mut some).unwrap();
        // Leaves with most of the body undelivered, some of it likely in the pipe.
        drop((writer, reader));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // A pipe left holding bytes must not be reused: they would open the next body.
    let (mut writer, mut reader) = open(&balancer);
    for path in ["/after-1", "/after-22", "/after-333"] {
        assert_download(
            &mut writer,
            &mut reader,
            path,
            &pattern(SPLICED, path.len() as u64),
        );
    }
}

#[test]
fn a_spliced_body_on_a_closing_connection_arrives_whole_then_the_connection_ends() {
    // Every byte must arrive and the connection must end right after them (copied bodies on
    // closing connections hold their last bytes for the FIN; spliced ones must not lose any).
    let backend = cutting_backend();
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    for request in [
        "GET /whole HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        "GET /whole HTTP/1.0\r\nHost: test\r\n\r\n",
    ] {
        let (mut writer, mut reader) = open(&balancer);
        writer.write_all(request.as_bytes()).unwrap();
        let resp = read_response(&mut reader, false).expect("a complete response");
        assert_eq!(resp.status, 200, "{request}");
        assert_eq!(hash(&resp.body), hash(&pattern(SPLICED, 6)), "{request}");
        let mut rest = Vec::new();
        let read = std::io::Read::read_to_end(&mut reader, &mut rest);
        assert!(
            matches!(read, Ok(0)),
            "{request}: {read:?}, then {} bytes",
            rest.len()
        );
    }
}

/// Serves, in one write per response (so the whole response waits in the balancer's socket):
/// `/big` 64 KiB, `/medium` 20 KiB, `/tiny` 5 bytes, `/chunked` 50 KiB chunked, and
/// `/fat-head` 10 KiB behind a 6 KiB head ending in `X-Last: here`. Bodies are
/// pattern(len, seed = path length).
fn mixed_sizes_backend() -> RawBackend {
    RawBackend::start(Arc::new(|conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        while let Some((_method, path, _headers)) = read_request(&mut reader) {
            let seed = path.len() as u64;
            let mut response = match path.as_str() {
                "/chunked" => {
                    let body = pattern(50 * 1024, seed);
                    let mut r = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                    for piece in body.chunks(7_000) {
                        r.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                        r.extend_from_slice(piece);
                        r.extend_from_slice(b"\r\n");
                    }
                    r.extend_from_slice(b"0\r\n\r\n");
                    r
                }
                other => {
                    let len = match other {
                        "/big" => 64 * 1024,
                        "/medium" => 20 * 1024,
                        "/fat-head" => 10 * 1024,
                        _ => 5,
                    };
                    let mut r =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\n").into_bytes();
                    if other == "/fat-head" {
                        for i in 0..60 {
                            r.extend_from_slice(
                                format!("X-Pad-{i}: {}\r\n", "p".repeat(90)).as_bytes(),
                            );
                        }
                        r.extend_from_slice(b"X-Last: here\r\n");
                    }
                    r.extend_from_slice(b"\r\n");
                    r.extend_from_slice(&pattern(len, seed));
                    r
                }
            };
            if writer.write_all(&response).is_err() {
                return;
            }
            response.clear();
        }
    }))
}

/// After a large (spliced) body, the next head on that backend connection is read with a
/// small first read so the next large body stays in the socket (src/relay.rs,
/// SMALL_HEAD_READ). Whatever follows a large body — a head longer than that first read,
/// a medium body, a chunked one, a tiny one — must come out whole, on the same backend
/// connection, in either order.
#[test]
fn responses_of_every_size_after_large_bodies_come_out_whole_on_one_backend_connection() {
    let backend = mixed_sizes_backend();
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = open(&balancer);
    let sizes = [
        ("/big", 64 * 1024),
        ("/fat-head", 10 * 1024),
        ("/big", 64 * 1024),
        ("/big", 64 * 1024),
        ("/medium", 20 * 1024),
        ("/big", 64 * 1024),
        ("/chunked", 50 * 1024),
        ("/big", 64 * 1024),
        ("/tiny", 5),
        ("/big", 64 * 1024),
        ("/fat-head", 10 * 1024),
        ("/medium", 20 * 1024),
    ];
    for (path, len) in sizes {
        let resp = get_on(&mut writer, &mut reader, path);
        assert_eq!(resp.status, 200, "{path}");
        assert_eq!(resp.body.len(), len, "{path}: body length");
        assert_eq!(
            hash(&resp.body),
            hash(&pattern(len, path.len() as u64)),
            "{path}: body bytes"
        );
        if path == "/fat-head" {
            assert_eq!(resp.header("X-Last"), Some("here"), "the head's last field");
            assert_eq!(resp.header("X-Pad-59").map(str::len), Some(90));
        }
    }
    assert_eq!(
        backend.accepts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "every response came over one pooled backend connection"
    );
}

/// Answers `413` right after each request head, without reading the body: then closes
/// (`/then-close`: with the body unread, the close is a reset) or reads and discards the
/// body (`/then-read`) before the next request.
fn early_answering_backend() -> RawBackend {
    RawBackend::start(Arc::new(|conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        while let Some((_method, path, headers)) = read_request(&mut reader) {
            let close = path == "/then-close";
            let answer = format!(
                "HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\n{}\r\ntoo large",
                if close { "Connection: close\r\n" } else { "" }
            );
            if writer.write_all(answer.as_bytes()).is_err() || close {
                return;
            }
            let len: usize = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            if std::io::copy(
                &mut std::io::Read::take(&mut reader, len as u64),
                &mut std::io::sink(),
            )
            .is_err()
            {
                return;
            }
        }
    }))
}

/// Writes `mib` MiB of request body on `writer` as fast as the socket takes them, on a thread
/// of its own; stops at the first failed write (the balancer closed the connection).
fn upload_mib_in_background(mut writer: TcpStream, mib: usize) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let piece = vec![b'u'; 1 << 20];
        for _ in 0..mib {
            if writer.write_all(&piece).is_err() {
                return;
            }
        }
    })
}

/// Uploads `UPLOAD` bytes to `path` in paced pieces on a new connection while reading the
/// answer; returns the answer's status and how much of the body had been written when the
/// answer's head arrived.
fn upload_until_answered(balancer: &Balancer, path: &str) -> (u16, usize) {
    const UPLOAD: usize = 4 * 1024 * 1024;
    let (mut writer, mut reader) = open(balancer);
    writer
        .write_all(
            format!("POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {UPLOAD}\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
    let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let progress = written.clone();
    let uploader = std::thread::spawn(move || {
        let piece = pattern(64 * 1024, 1);
        while progress.load(std::sync::atomic::Ordering::SeqCst) < UPLOAD {
            // Paced: the whole upload takes over a second, the answer comes at once.
            if writer.write_all(&piece).is_err() {
                return;
            }
            progress.fetch_add(piece.len(), std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    });
    let (status, _) = read_head(&mut reader).expect("an answer");
    let at = written.load(std::sync::atomic::Ordering::SeqCst);
    drop(reader);
    let _ = uploader.join();
    (status, at)
}

/// RFC 9112 §9.5: a backend may answer before the request body is complete. The answer
/// reaches the client while it is still uploading (the rest of the body is not forwarded),
/// and a backend that then closes with the body unread (a reset) has answered, not failed:
/// the client gets its 413, not a 502, and no upload can get a healthy backend ejected.
#[test]
fn a_backend_answering_an_upload_early_is_relayed_at_once_and_not_counted_as_failing() {
    let backend = early_answering_backend();
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    for path in ["/then-read", "/then-close"] {
        for _ in 0..4 {
            let (status, written) = upload_until_answered(&balancer, path);
            assert_eq!(status, 413, "{path}");
            assert!(
                written < 4 * 1024 * 1024,
                "{path}: the answer came only after the whole upload"
            );
        }
    }
    assert_eq!(
        balancer.metric("balancer_ejected_servers"),
        Some(0.0),
        "early answers are not failures"
    );
    let resp = get(balancer.addr, "/then-read");
    assert_eq!(resp.status, 413, "the backend still serves");
}

/// The client pauses mid-upload (a body sent in bursts, or a client that waits to see whether
/// the server wants the rest): a backend's early answer must still reach it at once, not
/// when the next burst comes or after CLIENT_IDLE_TIMEOUT (60 s here) with nothing at all.
#[test]
fn an_early_answer_reaches_a_client_that_paused_its_upload() {
    let backend = early_answering_backend();
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    for sent in [0usize, 1000] {
        let (mut writer, mut reader) = open(&balancer);
        let head = "POST /then-read HTTP/1.1\r\nHost: test\r\nContent-Length: 1000000\r\n\r\n";
        writer.write_all(head.as_bytes()).unwrap();
        writer.write_all(&pattern(sent, 2)).unwrap();
        // The client now waits (for at most the helpers' read timeout) with the body unsent.
        let (status, headers) = read_head(&mut reader).expect("the early answer, while paused");
        assert_eq!(status, 413, "after {sent} body bytes");
        assert!(
            headers
                .iter()
                .any(|(n, v)| n.eq_ignore_ascii_case("connection") && v == "close"),
            "the rest of the body is not read: the connection closes ({headers:?})"
        );
    }
}

/// Interim answers during an upload (a `100 Continue` nobody asked for, a 23 KB `103 Early
/// Hints`) are relayed as they come and do not stop the upload: a backend that reads the whole body
/// gets all of it and its final answer arrives behind them; one that sends `100` and `413` in
/// one write and stops reading has its `413` relayed at once (not a 504 after
/// REQUEST_TIMEOUT counted against it).
#[test]
fn interim_answers_during_an_upload_are_relayed_and_the_upload_goes_on() {
    const UPLOAD: usize = 2_000_000;
    let backend = RawBackend::start(Arc::new(|conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        let Some((_, path, _)) = read_request(&mut reader) else {
            return;
        };
        if path == "/refuse" {
            let _ = writer.write_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 413 Nope\r\nContent-Length: 2\r\nConnection: close\r\n\r\nno",
            );
            std::thread::sleep(std::time::Duration::from_secs(3));
            return;
        }
        let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        // The raw body: 40 chunks of 50,000 bytes ("c350\r\n" ... "\r\n") and the last one.
        let raw = if path == "/chunked" {
            UPLOAD + 40 * 8 + 5
        } else {
            UPLOAD
        };
        let mut got = 0usize;
        let mut hinted = false;
        let mut buf = vec![0u8; 64 * 1024];
        while got < raw {
            match std::io::Read::read(&mut reader, &mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
            if !hinted && got >= UPLOAD / 4 {
                hinted = true;
                // Longer than a backend connection's 16 KiB buffer.
                let links = "</s.css>; rel=preload, ".repeat(1000);
                let _ = writer.write_all(
                    format!("HTTP/1.1 103 Early Hints\r\nLink: {links}\r\n\r\n").as_bytes(),
                );
            }
        }
        let body = (got - (raw - UPLOAD)).to_string();
        let _ = writer.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }));
    let balancer = Balancer::start(&[
        ("BACKENDS", &server_set(&[(backend.addr, 1.0)])),
        ("REQUEST_TIMEOUT", "5"),
    ]);
    for chunked in [false, true] {
        let (mut writer, mut reader) = open(&balancer);
        let framing = if chunked {
            "Transfer-Encoding: chunked"
        } else {
            "Content-Length: 2000000"
        };
        writer
            .write_all(
                format!(
                    "POST /{} HTTP/1.1\r\nHost: test\r\n{framing}\r\n\r\n",
                    if chunked { "chunked" } else { "length" }
                )
                .as_bytes(),
            )
            .unwrap();
        let uploader = std::thread::spawn(move || {
            let piece = pattern(50_000, 3);
            for _ in 0..UPLOAD / piece.len() {
                let sent = if chunked {
                    writer
                        .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                        .and_then(|()| writer.write_all(&piece))
                        .and_then(|()| writer.write_all(b"\r\n"))
                } else {
                    writer.write_all(&piece)
                };
                if sent.is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            if chunked {
                let _ = writer.write_all(b"0\r\n\r\n");
            }
        });
        let statuses: Vec<u16> = (0..2)
            .map(|_| read_head(&mut reader).expect("an interim answer").0)
            .collect();
        assert_eq!(statuses, [100, 103], "chunked: {chunked}");
        let resp = read_response(&mut reader, false).expect("the final answer");
        assert_eq!(resp.status, 200, "chunked: {chunked}");
        assert_eq!(
            resp.text(),
            UPLOAD.to_string(),
            "every body byte reached the backend"
        );
        let _ = uploader.join();
    }
    let (mut writer, mut reader) = open(&balancer);
    writer
        .write_all(b"POST /refuse HTTP/1.1\r\nHost: test\r\nContent-Length: 20000000\r\n\r\n")
        .unwrap();
    let uploader = upload_mib_in_background(writer, 20);
    let (first, _) = read_head(&mut reader).expect("the interim answer");
    assert_eq!(first, 100);
    let resp = read_response(&mut reader, false).expect("the early final answer");
    assert_eq!(resp.status, 413, "relayed at once, not a 504");
    drop(reader);
    let _ = uploader.join();
    let timeouts = format!(
        "balancer_backend_errors_total{{backend=\"{}\",kind=\"timeout\"}}",
        backend.addr
    );
    assert_eq!(
        balancer.metric(&timeouts).unwrap_or(0.0),
        0.0,
        "an early answer is not a failure"
    );
}

/// A backend that stops reading an upload (its socket buffers fill, the balancer's send
/// waits for room) and answers a second later is heard at once, not when the send gives up
/// after REQUEST_TIMEOUT (30 s here).
#[test]
fn an_early_answer_from_a_backend_that_stopped_reading_is_relayed_at_once() {
    let backend = RawBackend::start(Arc::new(|conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        if read_request(&mut reader).is_none() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
        let _ = writer.write_all(b"HTTP/1.1 413 Nope\r\nContent-Length: 2\r\n\r\nno");
        // Open, unread, until the test is over.
        std::thread::sleep(std::time::Duration::from_secs(12));
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = open(&balancer);
    writer
        .write_all(b"POST /big HTTP/1.1\r\nHost: test\r\nContent-Length: 200000000\r\n\r\n")
        .unwrap();
    let uploader = upload_mib_in_background(writer, 200);
    let resp = read_response(&mut reader, false).expect("the early answer, within the wait");
    assert_eq!(resp.status, 413);
    assert_eq!(resp.text(), "no");
    drop(reader);
    let _ = uploader.join();
}

/// A large early answer (an 8 MiB 413 page) to a client that uploads as fast as it can
/// arrives whole: the close after it must not become a reset that destroys its unsent tail.
#[test]
fn a_large_early_answer_to_a_fast_uploader_arrives_whole() {
    const PAGE: usize = 8 << 20;
    let backend = RawBackend::start(Arc::new(|conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        if read_request(&mut reader).is_none() {
            return;
        }
        // Some of the body, then no more: the balancer's sends wait for room when it answers.
        let mut some = vec![0u8; 100_000];
        let _ = std::io::Read::read_exact(&mut reader, &mut some);
        std::thread::sleep(std::time::Duration::from_millis(500));
        let mut head =
            format!("HTTP/1.1 413 Too Large\r\nContent-Length: {PAGE}\r\n\r\n").into_bytes();
        head.extend_from_slice(&pattern(PAGE, 9));
        let _ = writer.write_all(&head);
        std::thread::sleep(std::time::Duration::from_secs(5));
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let (mut writer, mut reader) = open(&balancer);
    writer
        .write_all(b"POST /big HTTP/1.1\r\nHost: test\r\nContent-Length: 100000000\r\n\r\n")
        .unwrap();
    let uploader = upload_mib_in_background(writer, 95);
    let resp = read_response(&mut reader, false).expect("the whole early answer");
    assert_eq!(resp.status, 413);
    assert_eq!(resp.body.len(), PAGE);
    assert!(resp.body == pattern(PAGE, 9), "the page arrived intact");
    drop(reader);
    let _ = uploader.join();
}

/// A backend that stops reading an upload and never answers: the upload cannot complete (its
/// bytes fill both sockets' buffers), so the wait is bounded by REQUEST_TIMEOUT like any
/// wait for an answer: a 504, and the request leaves `in_flight`.
#[test]
fn an_upload_the_backend_stops_reading_ends_in_504_after_request_timeout() {
    let (stop, hold) = std::sync::mpsc::channel::<()>();
    let hold = std::sync::Mutex::new(hold);
    let stalled = RawBackend::start(Arc::new(move |conn: TcpStream| {
        let mut first = [0u8; 4096];
        let _ = std::io::Read::read(&mut &conn, &mut first);
        // Never reads again; keeps the connection open until the test ends.
        let _ = hold
            .lock()
            .unwrap()
            .recv_timeout(std::time::Duration::from_secs(30));
        drop(conn);
    }));
    let balancer = Balancer::start(&[
        ("BACKENDS", &server_set(&[(stalled.addr, 1.0)])),
        ("REQUEST_TIMEOUT", "1"),
    ]);
    // Far more than the sockets on the way can hold, so the upload can only stall.
    const UPLOAD: usize = 256 * 1024 * 1024;
    let (mut writer, mut reader) = open(&balancer);
    let head = format!("POST /stalled HTTP/1.1\r\nHost: test\r\nContent-Length: {UPLOAD}\r\n\r\n");
    writer.write_all(head.as_bytes()).unwrap();
    let uploader = upload_mib_in_background(writer, UPLOAD >> 20);
    let (status, _) = read_head(&mut reader).expect("an answer");
    assert_eq!(status, 504);
    drop(reader);
    let _ = uploader.join();
    eventually("the request to leave in_flight", || {
        let (_, body) = balancer.admin_get("/servers");
        body.contains("\"in_flight\":0")
    });
    drop(stop);
}
