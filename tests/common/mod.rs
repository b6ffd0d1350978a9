//! Shared black-box test harness: the real binary, real backends, a real WebSocket agent.
//!
//! Everything binds 127.0.0.1 on free ports, every wait has a deadline, and every process or
//! thread started here is stopped on `Drop`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Upper bound for any single wait in a test.
pub const WAIT: Duration = Duration::from_secs(10);

/// The resolver options every child balancer gets: a name lookup (of a `.invalid` host, say)
/// gives up after one try of 1 s when a nameserver does not answer, instead of glibc's default
/// 5 s times 2 attempts, which a test's deadline may not cover.
const RES_OPTIONS: (&str, &str) = ("RES_OPTIONS", "timeout:1 attempts:1");

/// A running balancer process with its log captured.
pub struct Balancer {
    child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Balancer {
    /// Starts the binary with `HOST_PORT_HTTP_BALANCER=0`, `ADMIN_PORT=0` and one CPU unless
    /// `env` says otherwise, and waits for `listening on ADDR`.
    pub fn start(env: &[(&str, &str)]) -> Balancer {
        Self::try_start(env).unwrap_or_else(|log| panic!("balancer did not start; log:\n{log}"))
    }

    /// Starts the binary with `BACKENDS` set to `servers` (address, score).
    pub fn serving(servers: &[(SocketAddr, f64)]) -> Balancer {
        Self::start(&[("BACKENDS", &server_set(servers))])
    }

    pub fn try_start(env: &[(&str, &str)]) -> Result<Balancer, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_balancer"));
        cmd.env_clear()
            .env(RES_OPTIONS.0, RES_OPTIONS.1)
            .env("HOST_PORT_HTTP_BALANCER", "0")
            .env("ADMIN_PORT", "0")
            .env("BALANCER_BIND", "127.0.0.1")
            .env("BALANCER_CPUS", "0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line.clone());
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut addr = None;
        let mut admin = None;
        let wants_admin = !env.iter().any(|(k, v)| *k == "ADMIN_PORT" && *v == "off");
        while addr.is_none() || (wants_admin && admin.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = after(&line, "listening on ") {
                        addr = a.parse().ok();
                    }
                    if let Some(a) = after(&line, "admin on ") {
                        admin = a.parse().ok();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(log.lock().unwrap().join("\n"));
                }
            }
        }
        Ok(Balancer {
            child,
            addr: addr.expect("checked above"),
            admin,
            log,
        })
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until a log line contains `needle`; returns that line.
    pub fn wait_log(&self, needle: &str) -> String {
        self.wait_log_count(needle, 1)
    }

    /// Waits until `count` log lines contain `needle`; returns the last of them.
    pub fn wait_log_count(&self, needle: &str, count: usize) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let log = self.log.lock().unwrap();
                let hits: Vec<&String> = log.iter().filter(|l| l.contains(needle)).collect();
                if hits.len() >= count {
                    return hits[count - 1].clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {count} log lines with {needle:?}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal and waits (bounded) for the exit status.
    pub fn signal_and_wait(&mut self, signal: &str, limit: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
        self.wait_exit(limit)
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Fine-grained, so a test can check the state right after the exit.
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// GET on the admin listener; (status, body).
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        let admin = self.admin.expect("admin listener is on");
        let resp = request(
            admin,
            &format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"),
        );
        (
            resp.status,
            String::from_utf8_lossy(&resp.body).into_owned(),
        )
    }

    /// The value of one metric sample (exact name with labels), if present.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, text) = self.admin_get("/metrics");
        text.lines()
            .find(|l| l.starts_with(sample) && l[sample.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let i = line.find(marker)?;
    Some(
        line[i + marker.len()..]
            .split_whitespace()
            .next()?
            .trim_end_matches(','),
    )
}

/// Runs the binary to completion (for configuration errors); (exit code, stdout, stderr).
pub fn run_to_exit<V: AsRef<std::ffi::OsStr>>(
    env: &[(&str, V)],
    args: &[&str],
) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_balancer"));
    cmd.env_clear()
        .env(RES_OPTIONS.0, RES_OPTIONS.1)
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// HTTP client helpers

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Opens a client connection with bounded read and write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, WAIT).expect("connect to balancer");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    s
}

/// Opens a client connection to the balancer: (writer, reader) over one socket.
pub fn open(balancer: &Balancer) -> (TcpStream, BufReader<TcpStream>) {
    let stream = connect(balancer.addr);
    let writer = stream.try_clone().expect("clone client stream");
    (writer, BufReader::new(stream))
}

/// Sends raw request bytes on a new connection and reads one response.
pub fn request(addr: SocketAddr, raw: &str) -> Response {
    let mut s = connect(addr);
    s.write_all(raw.as_bytes()).unwrap();
    let mut reader = BufReader::new(s);
    read_response(&mut reader, raw.starts_with("HEAD ")).expect("a response")
}

/// `GET path` with a Host header on a new connection.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
}

/// `GET target` on an open keep-alive connection; panics when no complete response comes.
pub fn get_on(writer: &mut TcpStream, reader: &mut BufReader<TcpStream>, target: &str) -> Response {
    write!(writer, "GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    read_response(reader, false).unwrap_or_else(|| panic!("no response to {target}"))
}

/// Reads one response (Content-Length, chunked or close-delimited). None on EOF before a head.
pub fn read_response<R: BufRead>(r: &mut R, head_request: bool) -> Option<Response> {
    loop {
        let (status, headers) = read_head(r)?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let mut body = Vec::new();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        if head_request || status == 204 || status == 304 || status == 101 {
        } else if header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            body = read_chunked(r)?;
        } else if let Some(len) = header("content-length") {
            let len: usize = len.trim().parse().ok()?;
            body.resize(len, 0);
            r.read_exact(&mut body).ok()?;
        } else {
            r.read_to_end(&mut body).ok()?;
        }
        return Some(Response {
            status,
            headers,
            body,
        });
    }
}

/// Reads a status line and headers.
pub fn read_head<R: BufRead>(r: &mut R) -> Option<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if r.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':')?;
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    Some((status, headers))
}

fn read_chunked<R: BufRead>(r: &mut R) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).ok()?;
        let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            loop {
                line.clear();
                r.read_line(&mut line).ok()?;
                if line.trim().is_empty() {
                    return Some(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..]).ok()?;
        line.clear();
        r.read_line(&mut line).ok()?;
    }
}

/// FNV-1a, enough to compare large bodies without keeping two copies.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A deterministic pseudo-random byte pattern of `len` bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}

// ---------------------------------------------------------------------------------------------
// Test backends

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub target: String,
    pub headers: Vec<(String, String)>,
    pub body_len: usize,
    pub body_hash: u64,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How a backend answers one request. Return raw bytes to write; `None` closes at once.
pub type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

pub enum Reply {
    /// Write these bytes, then keep the connection open for more requests.
    Bytes(Vec<u8>),
    /// Write these bytes, then close.
    BytesThenClose(Vec<u8>),
    /// Close without answering.
    Close,
    /// Wait, then answer.
    Delay(Duration, Box<Reply>),
    /// Write each piece after its pause (a response that trickles in), then keep the
    /// connection open for more requests.
    Paced(Vec<(Duration, Vec<u8>)>),
    /// Generate `len` bytes of pattern(seed), write the head, then stream them in 64 KiB writes.
    Stream {
        head: Vec<u8>,
        len: usize,
        seed: u64,
        chunked: bool,
    },
}

/// A small HTTP/1.1 backend on 127.0.0.1 that records what it sees.
pub struct Backend {
    pub addr: SocketAddr,
    pub accepts: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// `200 OK` with the backend's name as the body, keep-alive.
pub fn named(name: &'static str) -> Handler {
    Arc::new(move |_seen| Reply::Bytes(ok(name.as_bytes())))
}

/// A 200 response with a Content-Length body.
pub fn ok(body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

impl Backend {
    pub fn start(handler: Handler) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind backend");
        Self::with_listener(listener, handler)
    }

    pub fn named(name: &'static str) -> Backend {
        Self::start(named(name))
    }

    pub fn with_listener(listener: TcpListener, handler: Handler) -> Backend {
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, r, s, st) = (
            accepts.clone(),
            requests.clone(),
            seen.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !st.load(SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        a.fetch_add(1, SeqCst);
                        let (h, r, s, st) = (handler.clone(), r.clone(), s.clone(), st.clone());
                        std::thread::spawn(move || serve_backend_conn(conn, h, r, s, st));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Backend {
            addr,
            accepts,
            requests,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn requests(&self) -> usize {
        self.requests.load(SeqCst)
    }

    pub fn accepts(&self) -> usize {
        self.accepts.load(SeqCst)
    }

    pub fn last_seen(&self) -> Option<Seen> {
        self.seen.lock().unwrap().last().cloned()
    }

    /// Stops accepting and closes the listener (open connections end as their threads see it).
    pub fn stop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_backend_conn(
    conn: TcpStream,
    handler: Handler,
    requests: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let _ = conn.set_nodelay(true);
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    let idle_deadline = || Instant::now() + Duration::from_secs(30);
    let mut deadline = idle_deadline();
    loop {
        if stop.load(SeqCst) || Instant::now() > deadline {
            return;
        }
        let head = match read_request_head(&mut reader) {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        deadline = idle_deadline();
        let (method, target, headers) = head;
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _): &&(String, String)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let _ = reader.get_ref().set_read_timeout(Some(WAIT));
        let body = if header("transfer-encoding").is_some() {
            read_chunked(&mut reader).unwrap_or_default()
        } else if let Some(len) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            if header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
                let _ = writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            let mut body = vec![0; len];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            body
        } else {
            Vec::new()
        };
        let _ = reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)));
        let seen_now = Seen {
            method,
            target,
            headers,
            body_len: body.len(),
            body_hash: hash(&body),
        };
        // `seen` first: a test that waits on `requests` then reads `seen` must find this one.
        seen.lock().unwrap().push(seen_now.clone());
        requests.fetch_add(1, SeqCst);
        let mut reply = handler(&seen_now);
        loop {
            match reply {
                Reply::Delay(d, next) => {
                    std::thread::sleep(d);
                    reply = *next;
                }
                Reply::Bytes(b) => {
                    if writer.write_all(&b).is_err() {
                        return;
                    }
                    break;
                }
                Reply::Paced(pieces) => {
                    for (pause, piece) in pieces {
                        std::thread::sleep(pause);
                        if writer.write_all(&piece).is_err() {
                            return;
                        }
                    }
                    break;
                }
                Reply::BytesThenClose(b) => {
                    let _ = writer.write_all(&b);
                    let _ = writer.shutdown(std::net::Shutdown::Both);
                    return;
                }
                Reply::Close => {
                    let _ = writer.shutdown(std::net::Shutdown::Both);
                    return;
                }
                Reply::Stream {
                    head,
                    len,
                    seed,
                    chunked,
                } => {
                    // Generated before the head goes out, so that a slow generation (50 MiB
                    // in a debug build) is not a stall in the middle of the response.
                    let data = pattern(len, seed);
                    if writer.write_all(&head).is_err() {
                        return;
                    }
                    for piece in data.chunks(64 * 1024) {
                        let ok = if chunked {
                            writer
                                .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                                .and_then(|_| writer.write_all(piece))
                                .and_then(|_| writer.write_all(b"\r\n"))
                        } else {
                            writer.write_all(piece)
                        };
                        if ok.is_err() {
                            return;
                        }
                    }
                    if chunked && writer.write_all(b"0\r\n\r\n").is_err() {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

type RequestHeadParts = (String, String, Vec<(String, String)>);

fn read_request_head<R: BufRead>(r: &mut R) -> std::io::Result<Option<RequestHeadParts>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let l = h.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    Ok(Some((method, target, headers)))
}

/// Counts how many of `n` GETs each backend body answered with.
pub fn spread(addr: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    let stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for _ in 0..n {
        writer
            .write_all(b"GET /spread HTTP/1.1\r\nHost: test\r\n\r\n")
            .unwrap();
        let resp = read_response(&mut reader, false).expect("response");
        *counts.entry(resp.text()).or_insert(0) += 1;
    }
    counts
}

/// A JSON server set for `BACKENDS` or an agent message.
pub fn server_set(servers: &[(SocketAddr, f64)]) -> String {
    let entries: Vec<String> = servers
        .iter()
        .map(|(a, s)| {
            format!(
                "{{\"host\":\"{}\",\"port\":{},\"score\":{}}}",
                a.ip(),
                a.port(),
                s
            )
        })
        .collect();
    format!("{{\"servers\":[{}]}}", entries.join(","))
}

/// Waits until `check` holds, polling; panics with `what` at the deadline.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// A deployment agent: a real tungstenite WebSocket server

/// A WebSocket server the balancer connects to. Each accepted connection is handed to the
/// test as an `AgentConn`.
pub struct Agent {
    pub port: u16,
    conns: mpsc::Receiver<AgentConn>,
    stop: Arc<AtomicBool>,
    pub connects: Arc<AtomicUsize>,
}

pub struct AgentConn {
    ws: tungstenite::WebSocket<TcpStream>,
}

impl Agent {
    /// On a free port, with `SO_REUSEPORT`: a `HeldPort::shared` can keep the port while the
    /// agent is away, and `reuseport_listener` bind it again.
    pub fn start() -> Agent {
        Self::on(reuseport_listener(0).expect("bind agent"))
    }

    pub fn on(listener: TcpListener) -> Agent {
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(AtomicUsize::new(0));
        let (st, c) = (stop.clone(), connects.clone());
        std::thread::spawn(move || {
            while !st.load(SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(WAIT));
                        if let Ok(ws) = tungstenite::accept(s) {
                            c.fetch_add(1, SeqCst);
                            if tx.send(AgentConn { ws }).is_err() {
                                return;
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Agent {
            port,
            conns: rx,
            stop,
            connects,
        }
    }

    /// Waits for the balancer to connect.
    pub fn accept(&self) -> AgentConn {
        self.conns
            .recv_timeout(WAIT)
            .expect("the balancer connects to the agent")
    }

    pub fn port_str(&self) -> String {
        self.port.to_string()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
    }
}

impl AgentConn {
    pub fn send_text(&mut self, text: &str) {
        self.ws
            .send(tungstenite::Message::text(text))
            .expect("send to balancer");
    }

    /// A text frame carrying `bytes` as they are, valid UTF-8 or not.
    pub fn send_text_frame_bytes(&mut self, bytes: &[u8]) {
        use tungstenite::protocol::frame::{coding::Data, coding::OpCode, Frame};
        let frame = Frame::message(bytes.to_vec(), OpCode::Data(Data::Text), true);
        self.ws
            .send(tungstenite::Message::Frame(frame))
            .expect("send to balancer");
    }

    pub fn send_binary(&mut self, bytes: &[u8]) {
        self.ws
            .send(tungstenite::Message::binary(bytes.to_vec()))
            .expect("send to balancer");
    }

    /// Next text message from the balancer, parsed as JSON (pongs and pings skipped).
    pub fn recv_json(&mut self) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no reply from the balancer");
            match self.ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    return serde_json::from_str(t.as_str()).expect("reply is JSON")
                }
                Ok(_) => continue,
                Err(e) => panic!("agent connection failed: {e}"),
            }
        }
    }

    /// Sends a snapshot and returns the balancer's reply.
    pub fn push(&mut self, text: &str) -> serde_json::Value {
        self.send_text(text);
        self.recv_json()
    }

    /// Sends a ping and waits for the matching pong.
    pub fn ping(&mut self, payload: &[u8]) -> bool {
        self.ws
            .send(tungstenite::Message::Ping(payload.to_vec().into()))
            .expect("ping");
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            match self.ws.read() {
                Ok(tungstenite::Message::Pong(p)) => return p.as_ref() == payload,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
        false
    }

    /// Reads until the balancer's close frame; its code (`None` for a close without one).
    pub fn recv_close_code(&mut self) -> Option<u16> {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no close from the balancer");
            match self.ws.read() {
                Ok(tungstenite::Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(e) => panic!("the connection ended without a close frame: {e}"),
            }
        }
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}

// ---------------------------------------------------------------------------------------------
// Signals without waiting, held ports, raw backends, a WebSocket echo backend

impl Balancer {
    /// Sends a signal and returns at once (the process keeps draining meanwhile).
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }
}

/// A port on 127.0.0.1 held, for as long as this value lives, by a socket that is bound but
/// not listening: a connection to `addr` is refused, and no other socket (another test's
/// backend, a client's ephemeral port) takes the port meanwhile, as one could after binding
/// port 0 and letting it go.
pub struct HeldPort {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

impl HeldPort {
    /// Held alone: a dead address that refuses connections.
    pub fn refusing() -> HeldPort {
        Self::bind(0, false)
    }

    /// Held with `SO_REUSEPORT` (and without `SO_REUSEADDR`), so that only listeners that set
    /// `SO_REUSEPORT` too, the balancer's and `reuseport_listener`'s, can bind the port beside
    /// it. `port` 0 picks a free one.
    pub fn shared(port: u16) -> HeldPort {
        Self::bind(port, true)
    }

    fn bind(port: u16, reuse_port: bool) -> HeldPort {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("a TCP socket");
        socket.set_reuse_port(reuse_port).expect("SO_REUSEPORT");
        let want = SocketAddr::from(([127, 0, 0, 1], port));
        socket
            .bind(&want.into())
            .unwrap_or_else(|e| panic!("hold port {port} on 127.0.0.1: {e}"));
        let addr = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .expect("the held address");
        HeldPort {
            addr,
            _socket: socket,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// A listener on 127.0.0.1:`port` with `SO_REUSEPORT`, so that it can bind a port a
/// `HeldPort::shared` holds.
pub fn reuseport_listener(port: u16) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// Reads one request head (method, target, headers) as a backend would; None on EOF or error.
pub fn read_request<R: BufRead>(r: &mut R) -> Option<RequestHeadParts> {
    read_request_head(r).ok().flatten()
}

/// How a `RawBackend` serves one accepted connection (it owns the socket).
pub type ConnHandler = Arc<dyn Fn(TcpStream) + Send + Sync>;

/// A backend that holds each request until the test sends on the returned channel (one
/// send releases one request, answered 200 "held"), so a request can be kept in flight.
pub fn held_backend() -> (RawBackend, mpsc::Sender<()>) {
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let release_rx = Mutex::new(release_rx);
    let backend = RawBackend::start(Arc::new(move |conn: TcpStream| {
        let mut writer = conn.try_clone().unwrap();
        let mut reader = BufReader::new(conn);
        while read_request(&mut reader).is_some() {
            if release_rx.lock().unwrap().recv_timeout(WAIT).is_err() {
                return;
            }
            let _ = writer.write_all(&ok(b"held"));
        }
    }));
    (backend, release_tx)
}

/// A backend that hands each accepted connection to a test-written function, for exchanges
/// the programmable `Backend` cannot express (answering before reading a body, and so on).
pub struct RawBackend {
    pub addr: SocketAddr,
    pub accepts: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RawBackend {
    pub fn start(handler: ConnHandler) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind raw backend");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, st) = (accepts.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        a.fetch_add(1, SeqCst);
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(WAIT));
                        let _ = conn.set_write_timeout(Some(WAIT));
                        let h = handler.clone();
                        std::thread::spawn(move || h(conn));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        RawBackend {
            addr,
            accepts,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Request headers of each WebSocket handshake a `WsEcho` accepted.
pub type HandshakeLog = Arc<Mutex<Vec<Vec<(String, String)>>>>;

/// A WebSocket echo server (tungstenite, one std thread per connection). It echoes text and
/// binary messages; the text message `close` makes it start the closing handshake itself
/// (code 1000, reason `bye`).
pub struct WsEcho {
    pub addr: SocketAddr,
    /// Request headers of every accepted handshake.
    pub handshakes: HandshakeLog,
    /// Closing handshakes the client started (its close frame arrived first).
    pub closed_by_client: Arc<AtomicUsize>,
    /// Closing handshakes this server started and the client acknowledged.
    pub close_acknowledged: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WsEcho {
    pub fn start() -> WsEcho {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind websocket backend");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let closed_by_client = Arc::new(AtomicUsize::new(0));
        let close_acknowledged = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, c, k, st) = (
            handshakes.clone(),
            closed_by_client.clone(),
            close_acknowledged.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            while !st.load(SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(WAIT));
                        let _ = conn.set_write_timeout(Some(WAIT));
                        let (h, c, k) = (h.clone(), c.clone(), k.clone());
                        std::thread::spawn(move || ws_echo_conn(conn, h, c, k));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        WsEcho {
            addr,
            handshakes,
            closed_by_client,
            close_acknowledged,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for WsEcho {
    fn drop(&mut self) {
        self.stop.store(true, SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// The handshake callback's error type is tungstenite's, large by its design.
#[allow(clippy::result_large_err)]
fn ws_echo_conn(
    conn: TcpStream,
    handshakes: HandshakeLog,
    closed_by_client: Arc<AtomicUsize>,
    close_acknowledged: Arc<AtomicUsize>,
) {
    use tungstenite::handshake::server::{Request, Response};
    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::protocol::CloseFrame;
    use tungstenite::Message;
    let record = |req: &Request, resp: Response| {
        let headers = req
            .headers()
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        handshakes.lock().unwrap().push(headers);
        Ok(resp)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(conn, record) else {
        return;
    };
    let mut we_closed = false;
    loop {
        match ws.read() {
            Ok(Message::Text(t)) if t.as_str() == "close" => {
                we_closed = true;
                let frame = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "bye".into(),
                };
                if ws.close(Some(frame)).is_err() {
                    return;
                }
            }
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(m).is_err() {
                    return;
                }
            }
            Ok(Message::Close(_)) => {
                if we_closed {
                    close_acknowledged.fetch_add(1, SeqCst);
                } else {
                    closed_by_client.fetch_add(1, SeqCst);
                }
                // Flushes the reply (if any); the server closes TCP first (RFC 6455).
                let _ = ws.flush();
                return;
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
