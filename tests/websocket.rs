//! WebSocket through the balancer: a real tungstenite client, a real tungstenite echo backend,
//! and what happens to `Upgrade` requests that do not become a tunnel (SPEC §6).

mod common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use common::*;
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::{Message, WebSocket};

/// A WebSocket client connected to the echo backend through the balancer.
fn ws_client(balancer: &Balancer, path: &str) -> WebSocket<TcpStream> {
    let stream = connect(balancer.addr);
    let url = format!("ws://{}{path}", balancer.addr);
    let (ws, response) = tungstenite::client(url.as_str(), stream)
        .expect("websocket handshake through the balancer");
    assert_eq!(response.status().as_u16(), 101);
    ws
}

/// Next data message (pings and pongs skipped), with the stream's read timeout as deadline.
fn next_message(ws: &mut WebSocket<TcpStream>) -> Message {
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no message within {WAIT:?}");
        match ws.read().expect("read a message") {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

/// Reads until the WebSocket reports the connection closed; returns the close frames seen.
fn read_until_closed(
    ws: &mut WebSocket<TcpStream>,
) -> Vec<Option<tungstenite::protocol::CloseFrame>> {
    let deadline = Instant::now() + WAIT;
    let mut closes = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "connection not closed within {WAIT:?}"
        );
        match ws.read() {
            Ok(Message::Close(frame)) => closes.push(frame),
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => return closes,
            Err(e) => panic!("expected a clean close, got {e}"),
        }
    }
}

#[test]
fn text_message_is_echoed_through_the_tunnel() {
    let echo = WsEcho::start();
    let balancer = Balancer::serving(&[(echo.addr, 1.0)]);
    let mut ws = ws_client(&balancer, "/chat");
    ws.send(Message::text("hello through the balancer"))
        .unwrap();
    assert_eq!(
        next_message(&mut ws),
        Message::text("hello through the balancer")
    );
}

#[test]
fn binary_message_is_echoed_through_the_tunnel() {
    let echo = WsEcho::start();
    let balancer = Balancer::serving(&[(echo.addr, 1.0)]);
    let mut ws = ws_client(&balancer, "/bin");
    let payload: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
    ws.send(Message::binary(payload.clone())).unwrap();
    assert_eq!(next_message(&mut ws), Message::binary(payload));
}

#[test]
fn upgrade_headers_reach_the_backend() {
    let echo = WsEcho::start();
    let balancer = Balancer::serving(&[(echo.addr, 1.0)]);
    let mut ws = ws_client(&balancer, "/room/7?user=a");
    ws.send(Message::text("x")).unwrap();
    next_message(&mut ws);
    let handshakes = echo.handshakes.lock().unwrap().clone();
    assert_eq!(handshakes.len(), 1);
    let header = |name: &str| {
        handshakes[0]
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    assert_eq!(header("upgrade").as_deref(), Some("websocket"));
    assert!(header("connection").is_some_and(|v| v.contains("upgrade")));
    assert!(header("sec-websocket-key").is_some());
    assert!(header("x-forwarded-for").is_some());
}

#[test]
fn one_mebibyte_message_is_echoed_intact() {
    let echo = WsEcho::start();
    let balancer = Balancer::serving(&[(echo.addr, 1.0)]);
    let mut ws = ws_client(&balancer, "/big");
    let payload = pattern(1 << 20, 11);
    ws.send(Message::binary(payload.clone())).unwrap();
    match next_message(&mut ws) {
        Message::Binary(got) => {
            assert_eq!(got.len(), payload.len());
            assert_eq!(hash(&got), hash(&payload));
        }
        other => panic!("expected a binary message, got {other:?}"),
    }
}

#[test]
fn a_thousand_small_messages_are_echoed_in_order() {
    let echo = WsEcho::start();
    let balancer = Balancer::serving(&[(echo.addr, 1.0)]);
    let mut ws = ws_client(&balancer, "/many");
    for i in 0..1000 {
        ws.send(Message::text(format!("message {i}"))).unwrap();
    }
    for i in 0..1000 {
        assert_eq!(
            next_message(&mut ws),
            Message::text(format!("message {i}")),
            "message {i}"
        );
    }
}

#[test]
fn close_started_by_the_client_completes_and_the_connection_ends() {
    let echo = WsEcho::start();
    let balancer = Balancer::serving(&[(echo.addr, 1.0)]);
    let mut ws = ws_client(&balancer, "/bye");
    ws.send(Message::text("before close")).unwrap();
    next_message(&mut ws);
    ws.close(None).unwrap();
    let closes = read_until_closed(&mut ws);
    assert_eq!(
        closes.len(),
        1,
        "the backend's close reply reaches the client"
    );
    eventually("the backend to see the client's close", || {
        echo.closed_by_client.load(SeqCst) == 1
    });
}

#[test]
fn close_started_by_the_server_reaches_the_client() {
    let echo = WsEcho::start();
    let balancer = Balancer::serving(&[(echo.addr, 1.0)]);
    let mut ws = ws_client(&balancer, "/bye");
    ws.send(Message::text("close")).unwrap();
    let closes = read_until_closed(&mut ws);
    let frame = closes
        .first()
        .cloned()
        .flatten()
        .expect("the server's close frame reaches the client");
    assert_eq!(frame.code, CloseCode::Normal);
    assert_eq!(frame.reason.as_str(), "bye");
    eventually("the client's close reply to reach the backend", || {
        echo.close_acknowledged.load(SeqCst) == 1
    });
}

#[test]
fn tunnel_client_sees_eof_after_the_backend_closes() {
    let echo = WsEcho::start();
    let balancer = Balancer::serving(&[(echo.addr, 1.0)]);
    let mut ws = ws_client(&balancer, "/bye");
    ws.send(Message::text("close")).unwrap();
    read_until_closed(&mut ws);
    let mut raw = ws.into_inner();
    let mut buf = [0u8; 64];
    let n = raw.read(&mut buf).expect("EOF, not a timeout");
    assert_eq!(n, 0, "no bytes after the closing handshake");
}

#[test]
fn non_101_answer_to_an_upgrade_is_relayed_as_a_normal_response() {
    let backend = Backend::start(std::sync::Arc::new(|_seen: &Seen| {
        Reply::Bytes(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nContent-Type: text/plain\r\n\r\nno socket".to_vec())
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let stream = connect(balancer.addr);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let resp = read_response(&mut reader, false).expect("a response");
    assert_eq!(resp.status, 403);
    assert_eq!(resp.text(), "no socket");
    let seen = backend.last_seen().expect("the backend saw the request");
    assert_eq!(
        seen.header("upgrade")
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("websocket")
    );
    // Still plain HTTP afterwards: the next request on the same connection is answered.
    writer
        .write_all(b"GET /after HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let next = read_response(&mut reader, false).expect("a second response on the same connection");
    assert_eq!(next.status, 403);
    assert_eq!(backend.requests(), 2);
}

#[test]
fn h2c_upgrade_is_removed_and_the_request_forwarded_as_plain_http() {
    let backend = Backend::named("plain");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let resp = request(
        balancer.addr,
        "GET /h2 HTTP/1.1\r\nHost: test\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
         Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "plain");
    assert!(resp.header("upgrade").is_none());
    let seen = backend.last_seen().expect("the backend saw the request");
    assert_eq!(seen.target, "/h2");
    assert!(
        seen.header("upgrade").is_none(),
        "Upgrade removed: {:?}",
        seen.headers
    );
    assert!(
        seen.header("http2-settings").is_none(),
        "fields named by Connection removed: {:?}",
        seen.headers
    );
    assert!(
        !seen
            .header("connection")
            .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")),
        "no Connection: upgrade: {:?}",
        seen.headers
    );
}

#[test]
fn tunnel_stays_open_through_a_pause_between_messages() {
    let echo = WsEcho::start();
    let balancer = Balancer::serving(&[(echo.addr, 1.0)]);
    let mut ws = ws_client(&balancer, "/slow");
    std::thread::sleep(Duration::from_millis(300));
    ws.send(Message::text("after a pause")).unwrap();
    assert_eq!(next_message(&mut ws), Message::text("after a pause"));
}

/// A backend that switches protocols and then never closes: after the client's EOF it keeps
/// writing a byte every 50 ms until a write fails (the balancer closed its side: then it sets
/// `cut_off`) or 10 s pass.
fn never_closing_upgrade_backend(cut_off: std::sync::Arc<AtomicBool>) -> RawBackend {
    RawBackend::start(std::sync::Arc::new(move |conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        if read_request(&mut reader).is_none() {
            return;
        }
        let head = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                    Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
        if writer.write_all(head.as_bytes()).is_err() {
            return;
        }
        let mut buf = [0u8; 1024];
        while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if writer.write_all(b"x").is_err() {
                cut_off.store(true, SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }))
}

/// SPEC §6: the tunnel lasts "until either side closes". A client that closes must not leave
/// the tunnel (and its two sockets, and a shutdown's drain) waiting on a backend that never
/// closes: the balancer passes the EOF on, lets the backend's last bytes through for a moment,
/// then closes both sides.
#[test]
fn a_tunnel_ends_when_the_client_closes_even_if_the_backend_never_does() {
    let cut_off = std::sync::Arc::new(AtomicBool::new(false));
    let backend = never_closing_upgrade_backend(cut_off.clone());
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let mut client = connect(balancer.addr);
    client
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let (status, _) = read_head(&mut reader).expect("the 101 head");
    assert_eq!(status, 101);
    client.shutdown(std::net::Shutdown::Write).unwrap();
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => assert!(
                started.elapsed() < Duration::from_secs(5),
                "the tunnel still carries the backend's bytes 5 s after the client closed"
            ),
            // A reset also ends the tunnel for the client.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the tunnel did not end after the client closed: {e}"),
        }
    }
    eventually("the backend to see its connection closed", || {
        cut_off.load(SeqCst)
    });
}
