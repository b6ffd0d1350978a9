//! Hostile clients (SPEC §6): hundreds of slowloris and idle keep-alive connections do not stop
//! normal clients from being served, the head and body limits still hold meanwhile, and CR, LF
//! or NUL in what a client sends can never inject a header into what a backend receives. Also:
//! a bad chunk size or a request-shaped GET body smuggles nothing, and an absolute-form target
//! naming the admin listener goes to a backend like any other.
//!
//! The siege tests open about 600 connections to one single-shard balancer; they check the
//! open-files limit first and raise the soft limit to the hard one (with `prlimit`) when it is
//! too low, or fewer connections are used. Everything binds 127.0.0.1, every loop is bounded in
//! count and time, and every wait has a deadline; nothing asserts on speed.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// Slowloris connections kept open at once, and idle keep-alive connections.
const SLOWLORIS: usize = 300;
const IDLE: usize = 300;
/// Seconds a client has to complete its head in the siege tests.
const HEADER_TIMEOUT: &str = "2";
/// Bound on the whole slowloris run, whatever the test does meanwhile.
const SIEGE_LIMIT: Duration = Duration::from_secs(60);
/// Bound on connections the slowloris driver opens over its whole run.
const MAX_SLOWLORIS_OPENS: usize = 5_000;

// ---------------------------------------------------------------------------------------------
// Open-files limit

/// The soft and hard `RLIMIT_NOFILE` of process `pid`, from /proc.
fn nofile_limits(pid: &str) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut nums = line["Max open files".len()..].split_whitespace();
    let parse = |v: Option<&str>| match v? {
        "unlimited" => Some(u64::MAX),
        v => v.parse().ok(),
    };
    Some((parse(nums.next())?, parse(nums.next())?))
}

/// How many connections of each kind a siege may open: `SLOWLORIS` and `IDLE` when the
/// open-files limit allows (raising the soft limit to the hard one if needed; the balancer,
/// started afterwards, inherits it), fewer otherwise.
fn connections_allowed() -> usize {
    // Per connection of each kind: the test's socket (and a clone for idle ones), the
    // balancer's socket; siege tests may run in parallel in this process. Plus a margin.
    let needed = |n: usize| (4 * 2 * n + 2 * n + 512) as u64;
    let Some((soft, hard)) = nofile_limits("self") else {
        eprintln!(
            "cannot read the open-files limit; using {} connections",
            SLOWLORIS / 3
        );
        return SLOWLORIS / 3;
    };
    let want = needed(SLOWLORIS.max(IDLE));
    if soft >= want {
        return SLOWLORIS.min(IDLE);
    }
    if hard >= want {
        // Raising the soft limit of one's own process up to the hard limit needs no privilege.
        let raised = std::process::Command::new("prlimit")
            .args([
                "--pid",
                &std::process::id().to_string(),
                &format!("--nofile={want}:{hard}"),
            ])
            .status()
            .is_ok_and(|s| s.success());
        if raised && nofile_limits("self").is_some_and(|(s, _)| s >= want) {
            eprintln!("note: raised the open-files soft limit from {soft} to {want} for the siege");
            return SLOWLORIS.min(IDLE);
        }
    }
    let mut n = SLOWLORIS.min(IDLE);
    while n > 10 && needed(n) > soft {
        n /= 2;
    }
    eprintln!(
        "note: open-files limit {soft} (hard {hard}) is low: using {n} connections of each kind"
    );
    n
}

// ---------------------------------------------------------------------------------------------
// The siege: slowloris connections kept open by one driver thread, idle keep-alive connections

/// How the slowloris connections ended.
#[derive(Debug, Default)]
struct SlowlorisEnd {
    opened: usize,
    answered_408: usize,
    closed_without_answer: usize,
    other_answers: Vec<String>,
    still_open: usize,
    most_open: usize,
}

/// One slowloris connection: it sent a partial head and adds one byte now and then.
struct Loris {
    stream: TcpStream,
    got: Vec<u8>,
}

/// Counts the driver shares with the test while it runs.
#[derive(Default)]
struct SlowlorisGauge {
    opened: AtomicUsize,
    open_now: AtomicUsize,
}

struct Slowloris {
    replace: Arc<AtomicBool>,
    gauge: Arc<SlowlorisGauge>,
    thread: Option<JoinHandle<SlowlorisEnd>>,
}

impl Slowloris {
    /// Opens `count` slowloris connections and keeps that many open (a connection the
    /// balancer ends is replaced) until `finish`.
    fn start(addr: SocketAddr, count: usize) -> Slowloris {
        let replace = Arc::new(AtomicBool::new(true));
        let gauge = Arc::new(SlowlorisGauge::default());
        let (r, g) = (replace.clone(), gauge.clone());
        let thread = std::thread::spawn(move || slowloris_driver(addr, count, &r, &g));
        let s = Slowloris {
            replace,
            gauge,
            thread: Some(thread),
        };
        // open_now, not opened: the test reads open_now next, and `opened` runs ahead of it
        // while the driver is still in its opening loop.
        eventually("the slowloris connections to open", || {
            s.open_now() >= count
        });
        s
    }

    fn open_now(&self) -> usize {
        self.gauge.open_now.load(SeqCst)
    }

    /// Stops replacing connections and waits (bounded) for the open ones to be ended.
    fn finish(mut self) -> SlowlorisEnd {
        self.replace.store(false, SeqCst);
        self.thread
            .take()
            .expect("finished once")
            .join()
            .expect("slowloris driver")
    }
}

impl Drop for Slowloris {
    fn drop(&mut self) {
        self.replace.store(false, SeqCst);
    }
}

const SLOWLORIS_HEAD: &[u8] = b"GET /slowloris HTTP/1.1\r\nHost: test\r\nX-Slow: ";

fn open_loris(addr: SocketAddr) -> Option<Loris> {
    let mut stream = TcpStream::connect_timeout(&addr, WAIT).ok()?;
    stream.write_all(SLOWLORIS_HEAD).ok()?;
    stream.set_nonblocking(true).ok()?;
    Some(Loris {
        stream,
        got: Vec::new(),
    })
}

/// Reads what has arrived; true once the connection has ended.
fn loris_ended(l: &mut Loris) -> bool {
    let mut buf = [0u8; 1024];
    for _ in 0..16 {
        match l.stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => l.got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    false
}

fn slowloris_driver(
    addr: SocketAddr,
    count: usize,
    replace: &AtomicBool,
    gauge: &SlowlorisGauge,
) -> SlowlorisEnd {
    let began = Instant::now();
    let mut end = SlowlorisEnd::default();
    let mut open: Vec<Loris> = Vec::new();
    let mut drain_deadline = None;
    for tick in 0u64.. {
        let replacing = replace.load(SeqCst) && began.elapsed() < SIEGE_LIMIT;
        if !replacing && drain_deadline.is_none() {
            // The header timeout is 2 s from the first byte: all are ended well within WAIT.
            drain_deadline = Some(Instant::now() + WAIT);
        }
        if drain_deadline.is_some_and(|d| Instant::now() >= d) || (!replacing && open.is_empty()) {
            break;
        }
        while replacing && open.len() < count && end.opened < MAX_SLOWLORIS_OPENS {
            match open_loris(addr) {
                Some(l) => {
                    open.push(l);
                    end.opened += 1;
                    gauge.opened.store(end.opened, SeqCst);
                }
                None => break,
            }
        }
        end.most_open = end.most_open.max(open.len());
        gauge.open_now.store(open.len(), SeqCst);
        // Each connection adds one byte about every 500 ms (every tenth 50 ms tick).
        let mut i = 0;
        while i < open.len() {
            let l = &mut open[i];
            let mut ended = loris_ended(l);
            if !ended && (i as u64 + tick).is_multiple_of(10) && l.got.is_empty() {
                ended = l.stream.write_all(b"a").is_err() && loris_ended(l);
            }
            if ended {
                let l = open.swap_remove(i);
                let text = String::from_utf8_lossy(&l.got);
                if text.is_empty() {
                    end.closed_without_answer += 1;
                } else if text.starts_with("HTTP/1.1 408 ") {
                    end.answered_408 += 1;
                } else {
                    end.other_answers
                        .push(text.lines().next().unwrap_or("").to_string());
                }
            } else {
                i += 1;
            }
        }
        gauge.open_now.store(open.len(), SeqCst);
        std::thread::sleep(Duration::from_millis(50));
    }
    end.still_open = open.len();
    end
}

/// Idle keep-alive connections: each has had one answered request and then says nothing.
struct Idle {
    conns: Vec<(TcpStream, BufReader<TcpStream>)>,
}

impl Idle {
    fn open(addr: SocketAddr, count: usize) -> Idle {
        let mut conns = Vec::with_capacity(count);
        for i in 0..count {
            let stream = connect(addr);
            let mut writer = stream.try_clone().expect("clone client stream");
            let mut reader = BufReader::new(stream);
            let target = format!("/idle/{i}");
            writer
                .write_all(format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
                .unwrap();
            let resp = read_response(&mut reader, false).expect("idle connection's first answer");
            assert_eq!(resp.status, 200, "{target}");
            conns.push((writer, reader));
        }
        Idle { conns }
    }

    /// One more request on every idle connection: each is still open and served.
    fn all_still_served(&mut self) {
        for (i, (writer, reader)) in self.conns.iter_mut().enumerate() {
            let target = format!("/idle/{i}/again");
            writer
                .write_all(format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
                .unwrap_or_else(|e| panic!("idle connection {i} was closed: {e}"));
            let resp = read_response(reader, false)
                .unwrap_or_else(|| panic!("idle connection {i} got no second answer"));
            assert_eq!(resp.status, 200, "{target}");
            assert_eq!(resp.text(), target);
        }
    }
}

/// A backend that answers every request with its request-target as the body.
fn echo_target() -> Handler {
    Arc::new(|seen: &Seen| Reply::Bytes(ok(seen.target.as_bytes())))
}

/// A single-shard balancer (the hardest case: one event loop carries every connection) in
/// front of an echo backend, with a 2 s header timeout and a long idle timeout.
fn besieged() -> (Backend, Balancer) {
    let backend = Backend::start(echo_target());
    let set = server_set(&[(backend.addr, 1.0)]);
    let lb = Balancer::start(&[
        ("BACKENDS", set.as_str()),
        ("CLIENT_HEADER_TIMEOUT", HEADER_TIMEOUT),
        ("CLIENT_IDLE_TIMEOUT", "120"),
    ]);
    (backend, lb)
}

/// The balancer's resident memory and open descriptors, for the record.
fn footprint(lb: &Balancer) -> String {
    let pid = lb.pid();
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l["VmRSS:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    format!("VmRSS {rss}, {fds} open descriptors")
}

/// Checks what the slowloris connections got: a 408 (or, rarely, a plain close), never an
/// answer from a backend, and none left open past the header timeout.
fn assert_slowloris_ended(end: &SlowlorisEnd, backend: &Backend) {
    assert_eq!(
        end.still_open, 0,
        "every slowloris connection is ended: {end:?}"
    );
    assert!(end.other_answers.is_empty(), "only 408s: {end:?}");
    assert!(
        end.answered_408 >= end.opened * 9 / 10,
        "slowloris connections get 408 before the close: {end:?}"
    );
    let reached = backend
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.target.starts_with("/slowloris"))
        .count();
    assert_eq!(reached, 0, "no slowloris head reached the backend");
}

#[test]
fn normal_clients_are_served_while_slowloris_and_idle_connections_are_open() {
    let n = connections_allowed();
    let (backend, lb) = besieged();
    let mut idle = Idle::open(lb.addr, n);
    let loris = Slowloris::start(lb.addr, n);
    let under_siege = footprint(&lb);

    // Normal clients: fresh connections and keep-alive ones, from several threads, until the
    // balancer has ended the first wave of slowloris connections and the driver replaced them.
    let open_at_start = loris.open_now();
    let clients: Vec<JoinHandle<usize>> = (0..4)
        .map(|t| {
            let addr = lb.addr;
            let gauge = loris.gauge.clone();
            std::thread::spawn(move || {
                let stream = connect(addr);
                let mut writer = stream.try_clone().unwrap();
                let mut reader = BufReader::new(stream);
                let deadline = Instant::now() + 2 * WAIT;
                let mut i = 0;
                while i < 40 || (gauge.opened.load(SeqCst) < 2 * n && Instant::now() < deadline) {
                    let target = format!("/normal/{t}/{i}");
                    let resp = if i % 2 == 0 {
                        get(addr, &target)
                    } else {
                        writer
                            .write_all(
                                format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes(),
                            )
                            .unwrap();
                        read_response(&mut reader, false).expect("keep-alive answer")
                    };
                    assert_eq!(resp.status, 200, "{target}");
                    assert_eq!(resp.text(), target);
                    i += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                i
            })
        })
        .collect();
    let served: usize = clients
        .into_iter()
        .map(|c| c.join().expect("a normal client was not served"))
        .sum();
    let open_at_end = loris.open_now();
    idle.all_still_served();

    let end = loris.finish();
    eprintln!(
        "siege of {n} slowloris + {n} idle: {served} normal requests served; slowloris open \
         {open_at_start} at the start of the normal traffic, {open_at_end} at its end; \
         balancer under siege: {under_siege}; {end:?}"
    );
    assert!(
        open_at_start >= n * 9 / 10,
        "the siege was on: {open_at_start}"
    );
    assert_slowloris_ended(&end, &backend);
    let normal = backend
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.target.starts_with("/normal/"))
        .count();
    assert_eq!(normal, served);
    assert!(
        end.opened >= 2 * n,
        "normal clients were served through a wave of 408s and replacements: {end:?}"
    );
}

/// Reads until the connection ends (bounded by the stream's read timeout).
fn read_to_close(reader: &mut impl Read) -> Vec<u8> {
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return rest,
            Ok(n) => rest.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return rest,
            Err(e) => panic!("the connection did not close: {e}"),
        }
    }
}

/// Sends `raw`, expects the balancer's own `status` reply and then the end of the connection.
fn assert_refused(lb: &Balancer, raw: &[u8], status: u16, what: &str) {
    let mut s = connect(lb.addr);
    // The peer may close before it has read everything; that is a refusal too.
    let _ = s.write_all(raw);
    let mut reader = BufReader::new(s);
    let resp =
        read_response(&mut reader, false).unwrap_or_else(|| panic!("{what}: no {status} answer"));
    assert_eq!(resp.status, status, "{what}: {}", resp.text());
    assert!(resp.body.len() < 1024, "{what}: short own reply");
    if status == 400 || status == 408 {
        let rest = read_to_close(&mut reader);
        assert!(rest.is_empty(), "{what}: nothing after the {status}");
    }
}

#[test]
fn header_and_body_limits_hold_while_slowloris_and_idle_connections_are_open() {
    let n = connections_allowed();
    let (backend, lb) = besieged();
    let _idle = Idle::open(lb.addr, n);
    let loris = Slowloris::start(lb.addr, n);

    let big_value = "v".repeat(65 * 1024);
    let head_too_big = format!("GET /big HTTP/1.1\r\nHost: test\r\nX-Big: {big_value}\r\n\r\n");
    assert_refused(&lb, head_too_big.as_bytes(), 431, "a 65 KiB head");
    let mut many = String::from("GET /many HTTP/1.1\r\nHost: test\r\n");
    for i in 0..100 {
        many.push_str(&format!("X-F{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_refused(&lb, many.as_bytes(), 431, "101 header fields");
    let long_target = format!(
        "GET /{} HTTP/1.1\r\nHost: test\r\n\r\n",
        "t".repeat(8 * 1024 + 1)
    );
    assert_refused(&lb, long_target.as_bytes(), 414, "a target over 8 KiB");
    assert_refused(
        &lb,
        b"POST /cl HTTP/1.1\r\nHost: test\r\nContent-Length: 184467440737095516160\r\n\r\nx",
        400,
        "a Content-Length beyond 64 bits",
    );
    assert_refused(
        &lb,
        b"POST /te HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n\
          10000000000000000\r\nx\r\n0\r\n\r\n",
        400,
        "a chunk size beyond 64 bits",
    );
    assert_refused(
        &lb,
        b"POST /both HTTP/1.1\r\nHost: test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "both Content-Length and Transfer-Encoding",
    );

    // A 4 MiB upload still streams through intact.
    let body = pattern(4 << 20, 7);
    let mut s = connect(lb.addr);
    s.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let resp = read_response(&mut BufReader::new(s), false).expect("upload answered");
    assert_eq!(resp.status, 200);
    let seen = backend.last_seen().expect("the upload reached the backend");
    assert_eq!(seen.target, "/upload");
    assert_eq!((seen.body_len, seen.body_hash), (body.len(), hash(&body)));

    // "/te" is left out: a chunked body streams, so its head may reach the backend before the
    // bad chunk size is read (the chunk itself never does, see
    // `a_bad_chunk_size_is_never_forwarded_and_the_backend_connection_is_closed`).
    let refused = ["/big", "/many", "/cl", "/both"];
    let reached: Vec<String> = backend
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| refused.contains(&s.target.as_str()) || s.target.len() > 8 * 1024)
        .map(|s| format!("{} {} body {}", s.method, s.target, s.body_len))
        .collect();
    assert!(
        reached.is_empty(),
        "refused requests reached the backend: {reached:?}"
    );
    let end = loris.finish();
    assert_slowloris_ended(&end, &backend);
}

// ---------------------------------------------------------------------------------------------
// CR, LF and NUL in forwarded values

/// Raw heads a backend received, in order.
type Heads = Arc<Mutex<Vec<Vec<u8>>>>;

/// A backend that records every request head byte for byte and answers 200 `ok`; requests
/// carry no body here.
fn recording_backend() -> (RawBackend, Heads) {
    let heads: Heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    let backend = RawBackend::start(Arc::new(move |conn: TcpStream| {
        let Ok(mut writer) = conn.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(conn);
        // Bounded: each read waits at most WAIT (set by RawBackend); 1,000 requests at most.
        for _ in 0..1000 {
            let mut head = Vec::new();
            loop {
                let mut line = Vec::new();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                head.extend_from_slice(&line);
                if line == b"\r\n" || line == b"\n" || head.len() > 128 * 1024 {
                    break;
                }
            }
            h.lock().unwrap().push(head);
            if writer.write_all(&ok(b"ok")).is_err() {
                return;
            }
        }
    }));
    (backend, heads)
}

/// Field lines of a raw head (request line left out), split strictly on CRLF.
fn field_lines(head: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(head);
    text.split("\r\n")
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// A head is clean when its only CR and LF bytes are CRLF line ends, it has no NUL, and
/// every field line is `name: value` with a token name.
fn assert_clean_head(head: &[u8]) {
    let shown = String::from_utf8_lossy(head);
    assert!(!head.contains(&0), "NUL forwarded: {shown:?}");
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(
                head.get(i + 1),
                Some(&b'\n'),
                "bare CR forwarded: {shown:?}"
            ),
            b'\n' => assert_eq!(
                i.checked_sub(1).map(|j| head[j]),
                Some(b'\r'),
                "bare LF forwarded: {shown:?}"
            ),
            _ => {}
        }
    }
    for line in field_lines(head) {
        let (name, _) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("field line without a colon: {line:?} in {shown:?}"));
        assert!(
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)),
            "bad field name {name:?} in {shown:?}"
        );
    }
}

fn injected(head: &[u8]) -> bool {
    field_lines(head)
        .iter()
        .any(|l| l.to_ascii_lowercase().starts_with("x-injected"))
}

/// Requests that try to smuggle `X-Injected` (or a NUL) through a forwarded value.
const REFUSED_WITH_400: &[(&str, &[u8])] = &[
    (
        "bare CR inside X-Forwarded-For",
        b"GET /a HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 1.2.3.4\rX-Injected: 1\r\n\r\n",
    ),
    (
        "CR CR LF after X-Forwarded-For",
        b"GET /a HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 1.2.3.4\r\r\nX-Injected: 1\r\n\r\n",
    ),
    (
        "NUL inside X-Forwarded-For",
        b"GET /a HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 1.2.3.4\0X-Injected: 1\r\n\r\n",
    ),
    (
        "NUL alone inside a value",
        b"GET /a HTTP/1.1\r\nHost: test\r\nX-Custom: a\0b\r\n\r\n",
    ),
    (
        "bare CR inside Host",
        b"GET /a HTTP/1.1\r\nHost: test\rX-Injected: 1\r\n\r\n",
    ),
    (
        "NUL inside Host",
        b"GET /a HTTP/1.1\r\nHost: te\0st\r\n\r\n",
    ),
    (
        "folded continuation of X-Forwarded-For",
        b"GET /a HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 1.2.3.4\r\n X-Injected: 1\r\n\r\n",
    ),
    (
        "NUL in a field name",
        b"GET /a HTTP/1.1\r\nHost: test\r\nX-Inj\0ected: 1\r\n\r\n",
    ),
    (
        "CRLF inside an absolute-form target",
        b"GET http://test/a\r\nX-Injected: 1 HTTP/1.1\r\nHost: test\r\n\r\n",
    ),
    (
        "bare CR inside an absolute-form authority",
        b"GET http://te\rX-Injected:1/a HTTP/1.1\r\nHost: test\r\n\r\n",
    ),
    (
        "NUL inside an absolute-form authority",
        b"GET http://te\0st/a HTTP/1.1\r\nHost: test\r\n\r\n",
    ),
    (
        "NUL inside an origin-form target",
        b"GET /a\0b HTTP/1.1\r\nHost: test\r\n\r\n",
    ),
];

#[test]
fn cr_lf_or_nul_in_forwarded_values_gets_400_and_nothing_reaches_the_backend() {
    let (backend, heads) = recording_backend();
    let lb = Balancer::start(&[("BACKENDS", &server_set(&[(backend.addr, 1.0)]))]);
    for (what, raw) in REFUSED_WITH_400 {
        assert_refused(&lb, raw, 400, what);
        assert!(
            heads.lock().unwrap().is_empty(),
            "{what}: reached the backend"
        );
    }
    // Control: the same balancer forwards a clean request, extending X-Forwarded-For.
    let resp = request(
        lb.addr,
        "GET /clean HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    let heads = heads.lock().unwrap();
    assert_eq!(heads.len(), 1, "only the control request was forwarded");
    assert_clean_head(&heads[0]);
    let xff: Vec<String> = field_lines(&heads[0])
        .into_iter()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-forwarded-for:"))
        .collect();
    assert_eq!(xff, ["X-Forwarded-For: 1.2.3.4, 127.0.0.1"]);
}

#[test]
fn encoded_or_lf_only_line_breaks_never_inject_a_header_the_balancer_did_not_see() {
    let (backend, heads) = recording_backend();
    let lb = Balancer::start(&[("BACKENDS", &server_set(&[(backend.addr, 1.0)]))]);
    // (case, request, whether a forwarded head may carry X-Injected as a field of its own)
    let cases: &[(&str, &[u8], bool)] = &[
        (
            "percent-encoded CRLF in X-Forwarded-For",
            b"GET /a HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 1.2.3.4%0d%0aX-Injected: 1\r\nConnection: close\r\n\r\n",
            false,
        ),
        (
            "percent-encoded CRLF in the target",
            b"GET /a%0d%0aX-Injected:%201 HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
            false,
        ),
        // RFC 9112 §2.2 lets a recipient take a bare LF as a line end: then X-Injected is a
        // field the client sent, and what matters is that the backend is told exactly what the
        // balancer understood (CRLF line ends, the appended address last in X-Forwarded-For).
        (
            "bare LF ending X-Forwarded-For",
            b"GET /a HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 1.2.3.4\nX-Injected: 1\r\nConnection: close\r\n\r\n",
            true,
        ),
    ];
    for (what, raw, may_carry) in cases {
        let before = heads.lock().unwrap().len();
        let mut s = connect(lb.addr);
        s.write_all(raw).unwrap();
        let resp = read_response(&mut BufReader::new(s), false).expect("an answer");
        let heads = heads.lock().unwrap();
        match resp.status {
            // Refused outright: nothing reached the backend.
            400 => assert_eq!(heads.len(), before, "{what}: refused yet forwarded"),
            200 => {
                assert_eq!(heads.len(), before + 1, "{what}: forwarded once");
                let head = heads.last().expect("forwarded");
                eprintln!("{what}: forwarded as {:?}", String::from_utf8_lossy(head));
                assert_clean_head(head);
                assert!(*may_carry || !injected(head), "{what}: header injected");
                let xff: Vec<String> = field_lines(head)
                    .into_iter()
                    .filter(|l| l.to_ascii_lowercase().starts_with("x-forwarded-for:"))
                    .collect();
                assert_eq!(xff.len(), 1, "{what}: {xff:?}");
                assert!(
                    xff[0].ends_with(", 127.0.0.1") || xff[0] == "X-Forwarded-For: 127.0.0.1",
                    "{what}: the client address ends X-Forwarded-For: {xff:?}"
                );
            }
            other => panic!("{what}: {other} {}", resp.text()),
        }
    }
}

#[test]
fn cr_or_nul_in_a_backend_response_header_never_reaches_the_client() {
    for (what, answer) in [
        (
            "bare CR",
            &b"HTTP/1.1 200 OK\r\nX-Evil: a\rSet-Cookie: stolen=1\r\nContent-Length: 2\r\n\r\nok"[..],
        ),
        (
            "NUL",
            &b"HTTP/1.1 200 OK\r\nX-Evil: a\0Set-Cookie: stolen=1\r\nContent-Length: 2\r\n\r\nok"[..],
        ),
    ] {
        let answer = answer.to_vec();
        let backend = Backend::start(Arc::new(move |_: &Seen| Reply::Bytes(answer.clone())));
        let lb = Balancer::start(&[("BACKENDS", &server_set(&[(backend.addr, 1.0)]))]);
        let resp = get(lb.addr, "/evil");
        assert_eq!(resp.status, 502, "{what}: {resp:?}");
        assert!(resp.header("set-cookie").is_none(), "{what}");
        assert!(resp.header("x-evil").is_none(), "{what}");
    }
}

/// A backend that records every byte it receives on each connection until the connection
/// ends (or 2 s pass) and never answers.
fn listening_backend() -> (RawBackend, Heads) {
    let streams: Heads = Arc::new(Mutex::new(Vec::new()));
    let st = streams.clone();
    let backend = RawBackend::start(Arc::new(move |mut conn: TcpStream| {
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        let mut all = Vec::new();
        let mut buf = [0u8; 4096];
        let ended = loop {
            match conn.read(&mut buf) {
                Ok(0) => break true,
                Ok(n) => all.extend_from_slice(&buf[..n]),
                Err(e) => break e.kind() == ErrorKind::ConnectionReset,
            }
        };
        if ended {
            all.extend_from_slice(b"<closed>");
        }
        st.lock().unwrap().push(all);
    }));
    (backend, streams)
}

#[test]
fn a_bad_chunk_size_is_never_forwarded_and_the_backend_connection_is_closed() {
    let (backend, streams) = listening_backend();
    let lb = Balancer::start(&[("BACKENDS", &server_set(&[(backend.addr, 1.0)]))]);
    let bad_lines = [
        // A chunk size that wraps to 0 in a 64-bit parser.
        ("10000000000000000", "a chunk size beyond 64 bits"),
        // Extensions two parsers can split differently (RFC 9112 §7.1.1 allows neither).
        ("5;a=b\"c\"", "a quote inside a token extension value"),
        ("5;a=\"b\"x", "bytes after a quoted extension value"),
        ("5;\"a\"", "a quoted extension name"),
    ];
    for (line, what) in bad_lines {
        // The bad line, then a request to smuggle.
        let raw = format!(
            "POST /te HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n\
             {line}\r\nGET /smuggled HTTP/1.1\r\nHost: test\r\n\r\n0\r\n\r\n"
        );
        assert_refused(&lb, raw.as_bytes(), 400, what);
    }
    // The balancer may refuse before it connects to a backend, or after it sent the head; in
    // the second case that connection must end, never to carry another request.
    std::thread::sleep(Duration::from_millis(300));
    eventually("every backend connection to end", || {
        streams.lock().unwrap().len() == backend.accepts.load(SeqCst)
    });
    for stream in streams.lock().unwrap().iter() {
        let got = String::from_utf8_lossy(stream);
        for (line, what) in bad_lines {
            assert!(!got.contains(line), "{what} forwarded: {got:?}");
        }
        assert!(
            !got.contains("/smuggled"),
            "smuggled request forwarded: {got:?}"
        );
        assert!(
            got.ends_with("<closed>"),
            "the backend connection is closed: {got:?}"
        );
    }
}

#[test]
fn a_get_whose_body_looks_like_a_request_is_one_request() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        let body = seen.target.as_bytes();
        let mut out = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nCache-Control: max-age=60\r\n\r\n",
            body.len()
        )
        .into_bytes();
        out.extend_from_slice(body);
        Reply::Bytes(out)
    }));
    let lb = Balancer::start(&[("BACKENDS", &server_set(&[(backend.addr, 1.0)]))]);
    // A cached entry for the target, so a HIT would be answered without reading the body.
    assert_eq!(get(lb.addr, "/a.css").text(), "/a.css");
    let smuggled = "GET /smuggled.css HTTP/1.1\r\nHost: test\r\n\r\n";
    let raw = format!(
        "GET /a.css HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n{smuggled}\
         GET /next.txt HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
        smuggled.len()
    );
    let mut s = connect(lb.addr);
    s.write_all(raw.as_bytes()).unwrap();
    let mut reader = BufReader::new(s);
    let first = read_response(&mut reader, false).expect("first answer");
    assert_eq!((first.status, first.text().as_str()), (200, "/a.css"));
    let second = read_response(&mut reader, false).expect("second answer");
    assert_eq!((second.status, second.text().as_str()), (200, "/next.txt"));
    assert!(read_to_close(&mut reader).is_empty(), "no third answer");
    let seen = backend.seen.lock().unwrap();
    assert!(seen.iter().all(|s| s.target != "/smuggled.css"), "{seen:?}");
    let with_body = seen
        .iter()
        .find(|s| s.body_len > 0)
        .expect("the GET's body was forwarded");
    assert_eq!(with_body.body_len, smuggled.len());
}

#[test]
fn an_absolute_form_target_naming_the_admin_listener_reaches_a_backend_not_the_admin() {
    let backend = Backend::start(echo_target());
    let lb = Balancer::start(&[("BACKENDS", &server_set(&[(backend.addr, 1.0)]))]);
    let admin = lb.admin.expect("admin listener");
    for path in ["/servers", "/metrics"] {
        let resp = request(
            lb.addr,
            &format!(
                "GET http://{admin}{path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"
            ),
        );
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.text(),
            path,
            "the backend answered, not the admin listener"
        );
        let seen = backend.last_seen().expect("forwarded to the backend");
        assert_eq!(seen.header("host"), Some(admin.to_string().as_str()));
    }
}
