//! The admin listener on 127.0.0.1: `/metrics`, `/servers`, `/healthz`, on its own thread.
//!
//! It only reads what shards publish (atomics) and what the agent thread stores, so it never
//! touches the request path. Requests are tiny and rare, so a blocking thread is enough.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::debug;

use crate::metrics::{merge_backends, render, GlobalMetrics, ShardMetrics};
use crate::queue::ServerSet;

/// Process-wide state shared by main, the agent thread and the admin thread.
#[derive(Default)]
pub struct Status {
    pub shards: Vec<Arc<ShardMetrics>>,
    pub global: GlobalMetrics,
    pub shutting_down: AtomicBool,
    /// The set every shard routes by, with the hosts as the agent (or BACKENDS) named them.
    current: Mutex<ServerSet>,
}

impl Status {
    pub fn new(shards: Vec<Arc<ShardMetrics>>) -> Self {
        Status {
            shards,
            ..Status::default()
        }
    }

    /// Records a set that every shard now routes by.
    pub fn publish_set(&self, version: u64, set: ServerSet) {
        if let Ok(mut current) = self.current.lock() {
            *current = set;
        }
        self.global.server_set_version.set(version);
    }

    /// The `/servers` document (SPEC §8).
    pub fn servers_json(&self) -> String {
        let set = self.current.lock().map(|s| s.clone()).unwrap_or_default();
        let merged = merge_backends(&self.shards);
        let servers: Vec<serde_json::Value> = set
            .servers
            .iter()
            .map(|entry| {
                let label = entry.label();
                let stats = merged.iter().find(|m| *m.label == *label);
                serde_json::json!({
                    "host": entry.host,
                    "port": entry.port,
                    "score": entry.score,
                    "ejected_shards": stats.map_or(0, |s| s.ejected_shards),
                    "in_flight": stats.map_or(0, |s| s.in_flight),
                })
            })
            .collect();
        serde_json::json!({
            "version": self.global.server_set_version.get(),
            "servers": servers,
        })
        .to_string()
    }
}

/// Binds the admin listener on 127.0.0.1 only; it is never reachable from another host.
/// `SO_REUSEPORT` (as on the HTTP port) lets a new process started with
/// `BALANCER_REUSE_PORT=on` bind it beside a draining one (the caller checks the port is free
/// otherwise).
pub fn bind(port: u16) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// Most admin connections served at once; past it a new one gets a 503 at once.
const MAX_CONNECTIONS: usize = 32;
/// Most refused connections lingering at once (see `refuse`); past it a refusal closes at once.
const MAX_REFUSING: usize = 32;
/// How long a refused connection is given to finish sending and close.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const REFUSAL: &str = "too many admin connections\n";
/// A request head must arrive whole within this, however it trickles in.
const HEAD_DEADLINE: Duration = Duration::from_secs(2);
/// Each write of the answer must make progress within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves admin requests until the process exits. Each connection has a thread of its own, so
/// a client that is slow to send or to read (or many of them, up to `MAX_CONNECTIONS`) never
/// delays another's `/healthz`.
pub fn spawn(
    listener: TcpListener,
    status: Arc<Status>,
) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let open = Arc::new(AtomicUsize::new(0));
            let refusing = Arc::new(AtomicUsize::new(0));
            for stream in listener.incoming() {
                match stream {
                    Ok(stream) => serve_concurrently(stream, &status, &open, &refusing),
                    Err(e) => {
                        debug!("admin accept failed: {e}");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })
}

fn serve_concurrently(
    mut stream: TcpStream,
    status: &Arc<Status>,
    open: &Arc<AtomicUsize>,
    refusing: &Arc<AtomicUsize>,
) {
    if open.fetch_add(1, Relaxed) >= MAX_CONNECTIONS {
        open.fetch_sub(1, Relaxed);
        if refusing.fetch_add(1, Relaxed) < MAX_REFUSING {
            let guard = OpenGuard(refusing.clone());
            let spawned = std::thread::Builder::new()
                .name("admin-refuse".into())
                .spawn(move || {
                    let _guard = guard;
                    refuse(stream);
                });
            if let Err(e) = spawned {
                debug!("cannot start an admin refusal thread: {e}");
            }
            return;
        }
        refusing.fetch_sub(1, Relaxed);
        // Past both limits: never blocks the accept loop (what does not fit the socket buffer
        // is dropped), and a request arriving after this close may reset the 503 away.
        let _ = stream.set_nonblocking(true);
        let _ = respond(&mut stream, 503, "text/plain", REFUSAL);
        return;
    }
    let (status, guard) = (status.clone(), OpenGuard(open.clone()));
    let spawned = std::thread::Builder::new()
        .name("admin-conn".into())
        .spawn(move || {
            let _guard = guard;
            if let Err(e) = handle(stream, &status) {
                debug!("admin request failed: {e}");
            }
        });
    if let Err(e) = spawned {
        debug!("cannot start an admin connection thread: {e}");
    }
}

/// Answers 503 and closes gently. A socket closed with unread bytes, or one that receives
/// bytes after its close, sends a reset, and a reset can destroy the 503 before the client
/// reads it (or turn its read into an error): so the request is read first (a `HEAD` gets
/// the head alone), and what follows is read and dropped until the client closes, all within
/// `REFUSAL_LINGER`.
fn refuse(mut stream: TcpStream) {
    let deadline = Instant::now() + REFUSAL_LINGER;
    let mut head = Vec::new();
    read_until(&mut stream, deadline, &mut head, |h| {
        h.len() == KEPT || head_is_in(h)
    });
    let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
    if answer(&mut stream, &head, 503, REFUSAL).is_ok() {
        let _ = stream.shutdown(std::net::Shutdown::Write);
        read_until(&mut stream, deadline, &mut head, |_| false);
    }
}

/// Whether a request head is all in, or cannot be one, as `handle` would parse it.
fn head_is_in(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    !matches!(req.parse(head), Ok(httparse::Status::Partial))
}

/// Whether a request (complete or not, parseable or not) asks for `HEAD`: its first line
/// after any empty ones, as httparse reads it.
fn is_head_request(head: &[u8]) -> bool {
    let start = head.iter().position(|&b| b != b'\r' && b != b'\n');
    start.is_some_and(|i| head[i..].starts_with(b"HEAD "))
}

/// An error answer to what was read of a request: the head alone to a `HEAD`.
fn answer(stream: &mut TcpStream, request: &[u8], status: u16, body: &str) -> io::Result<()> {
    if is_head_request(request) {
        write_head(stream, status, "text/plain", body.len())?;
        return stream.flush();
    }
    respond(stream, status, "text/plain", body)
}

/// What a refusal keeps of a request: enough for its request line.
const KEPT: usize = 8192;

/// Reads until `done` holds for what was read (only its first `KEPT` bytes are kept), the
/// peer closes, or `deadline` passes.
fn read_until(
    stream: &mut TcpStream,
    deadline: Instant,
    seen: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> bool,
) {
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = KEPT.saturating_sub(seen.len()).min(n);
                seen.extend_from_slice(&buf[..room]);
                if done(seen) {
                    return;
                }
            }
        }
    }
}

/// Counts a connection out when its thread ends, whichever way.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

fn handle(mut stream: TcpStream, status: &Status) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let deadline = Instant::now() + HEAD_DEADLINE;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let (method, path) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let read = if left.is_zero() {
            Err(io::ErrorKind::TimedOut.into())
        } else {
            stream.set_read_timeout(Some(left))?;
            stream.read(&mut buf[len..])
        };
        let n = match read {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return answer(&mut stream, &buf[..len], 408, "request timeout\n")
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => {
                break (
                    req.method.unwrap_or("").to_string(),
                    req.path.unwrap_or("").to_string(),
                )
            }
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => return answer(&mut stream, &buf[..len], 400, "bad request\n"),
        }
    };
    let path = path.split('?').next().unwrap_or("");
    if method != "GET" && method != "HEAD" {
        return respond(&mut stream, 405, "text/plain", "method not allowed\n");
    }
    let (status, content_type, body) = match path {
        "/metrics" => (
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            render(&status.shards, &status.global),
        ),
        "/servers" => (200, "application/json", status.servers_json()),
        "/healthz" if status.shutting_down.load(Relaxed) => {
            (503, "text/plain", "shutting down\n".to_owned())
        }
        "/healthz" => (200, "text/plain", "ok\n".to_owned()),
        _ => (404, "text/plain", "not found\n".to_owned()),
    };
    if method == "HEAD" {
        // The head alone (RFC 9110 §9.3.2), its Content-Length that of the GET's body.
        write_head(&mut stream, status, content_type, body.len())?;
        return stream.flush();
    }
    respond(&mut stream, status, content_type, &body)
}

fn write_head(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    len: usize,
) -> io::Result<()> {
    let reason = crate::http::reason_phrase(status);
    // RFC 9110 §15.5.6: a 405 lists the methods the target supports.
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len}\r\n{allow}Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes())
}

fn respond(stream: &mut TcpStream, status: u16, content_type: &str, body: &str) -> io::Result<()> {
    write_head(stream, status, content_type, body.len())?;
    stream.write_all(body.as_bytes())?;
    stream.flush()
}
