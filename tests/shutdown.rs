//! Graceful shutdown and seamless restart (SPEC §9, §8 `/healthz`): stop accepting at once,
//! let in-flight requests finish, close idle connections, exit 0; a second process on the same
//! port takes over without a failed request.

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// How long the slow backend holds each `/slow` request when a test checks something while it
/// is in flight: long enough that, on a slow machine, those checks are done well before it ends.
const SLOW: Duration = Duration::from_secs(5);
/// How long it holds it when nothing is checked meanwhile.
const SHORT: Duration = Duration::from_secs(2);
/// Bound on a drain plus exit once in-flight work is done (the drain itself is capped at 30 s).
const EXIT_LIMIT: Duration = Duration::from_secs(20);

/// A backend that answers `/slow` with `slow` after `hold`, and any other path at once (a
/// probe that reaches it before the listener closes then gets a quick answer, and is not
/// mistaken for the in-flight request).
fn slow_backend(hold: Duration) -> Backend {
    Backend::start(Arc::new(move |seen: &Seen| {
        if seen.target == "/slow" {
            Reply::Delay(hold, Box::new(Reply::Bytes(ok(b"slow"))))
        } else {
            Reply::Bytes(ok(b"quick"))
        }
    }))
}

/// A balancer in front of `backend`.
fn balancer_for(backend: SocketAddr, extra: &[(&str, &str)]) -> Balancer {
    let set = server_set(&[(backend, 1.0)]);
    let mut env = vec![("BACKENDS", set.as_str())];
    env.extend_from_slice(extra);
    Balancer::start(&env)
}

/// Starts a slow request on its own thread and waits until the backend holds it.
fn in_flight_request(balancer: &Balancer, backend: &Backend) -> JoinHandle<Response> {
    let addr = balancer.addr;
    let handle = std::thread::spawn(move || get(addr, "/slow"));
    eventually("the backend to receive the slow request", || {
        backend.requests() == 1
    });
    handle
}

/// Whether a new connection to `addr` is refused: connect fails, or the connection is reset or
/// closed before any answer to a request.
fn new_connection_refused(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return true;
    };
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    if s.write_all(b"GET /new HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return true;
    }
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
        ),
    }
}

#[test]
fn in_flight_request_completes_after_sigterm_and_the_process_exits_0() {
    let backend = slow_backend(SHORT);
    let mut balancer = balancer_for(backend.addr, &[]);
    let slow = in_flight_request(&balancer, &backend);
    balancer.signal("TERM");
    let resp = slow.join().expect("client thread");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "slow");
    assert_eq!(
        balancer.wait_exit(EXIT_LIMIT),
        Some(0),
        "log:\n{}",
        balancer.log_text()
    );
}

#[test]
fn new_connections_are_refused_while_a_request_drains() {
    let backend = slow_backend(SLOW);
    let mut balancer = balancer_for(backend.addr, &[]);
    let slow = in_flight_request(&balancer, &backend);
    balancer.signal("TERM");
    balancer.wait_log("stops accepting");
    eventually("new connections to be refused", || {
        new_connection_refused(balancer.addr)
    });
    assert!(
        !slow.is_finished(),
        "the listener should close at once, while the slow request is still in flight"
    );
    assert_eq!(slow.join().expect("client thread").status, 200);
    assert_eq!(balancer.wait_exit(EXIT_LIMIT), Some(0));
}

#[test]
fn healthz_answers_503_while_draining() {
    let backend = slow_backend(SLOW);
    let mut balancer = balancer_for(backend.addr, &[]);
    assert_eq!(balancer.admin_get("/healthz").0, 200);
    let slow = in_flight_request(&balancer, &backend);
    balancer.signal("TERM");
    eventually("/healthz to report draining", || {
        balancer.admin_get("/healthz").0 == 503
    });
    assert!(!slow.is_finished(), "still draining when /healthz said 503");
    assert_eq!(slow.join().expect("client thread").status, 200);
    assert_eq!(balancer.wait_exit(EXIT_LIMIT), Some(0));
}

#[test]
fn sigint_on_an_idle_balancer_exits_0() {
    let backend = Backend::named("idle");
    let mut balancer = balancer_for(backend.addr, &[]);
    assert_eq!(get(balancer.addr, "/").status, 200);
    assert_eq!(
        balancer.signal_and_wait("INT", WAIT),
        Some(0),
        "log:\n{}",
        balancer.log_text()
    );
}

/// Once the process has exited, nothing may still listen on its port: a listening socket kept
/// alive by the io_uring ring after exit (it used to linger ~10 ms) takes connections into a
/// queue nobody accepts from, and a restart on the same port would lose them.
#[test]
fn the_port_stops_listening_by_the_time_the_process_exits() {
    let backend = Backend::named("idle");
    for _ in 0..3 {
        let mut balancer = balancer_for(backend.addr, &[("BALANCER_CPUS", "0,1")]);
        assert_eq!(get(balancer.addr, "/").status, 200);
        assert_eq!(balancer.signal_and_wait("TERM", WAIT), Some(0));
        assert!(
            TcpStream::connect_timeout(&balancer.addr, Duration::from_secs(2)).is_err(),
            "a connection was taken after the balancer exited"
        );
    }
}

#[test]
fn idle_keep_alive_connections_are_closed_on_shutdown() {
    let backend = Backend::named("kept");
    let mut balancer = balancer_for(backend.addr, &[]);
    let stream = connect(balancer.addr);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    writer
        .write_all(b"GET /a HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let resp = read_response(&mut reader, false).expect("a response");
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("connection").is_none(),
        "kept alive: {:?}",
        resp.headers
    );
    balancer.signal("TERM");
    let mut buf = [0u8; 64];
    let n = reader
        .read(&mut buf)
        .expect("EOF on the idle connection, not a timeout");
    assert_eq!(n, 0, "no bytes, just the close");
    assert_eq!(balancer.wait_exit(EXIT_LIMIT), Some(0));
}

/// The outcome of one new-connection request during the restart.
enum Outcome {
    Ok,
    Failed(String),
}

fn one_request(addr: SocketAddr) -> Outcome {
    let mut s = match TcpStream::connect_timeout(&addr, WAIT) {
        Ok(s) => s,
        Err(e) => return Outcome::Failed(format!("connect: {e}")),
    };
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    if let Err(e) = s.write_all(b"GET /r HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n") {
        return Outcome::Failed(format!("write: {e}"));
    }
    let mut reader = BufReader::new(s);
    if let Err(e) = reader.fill_buf() {
        return Outcome::Failed(format!("read: {e}"));
    }
    match read_response(&mut reader, false) {
        Some(r) if r.status == 200 => Outcome::Ok,
        Some(r) => Outcome::Failed(format!("status {}", r.status)),
        None => Outcome::Failed("closed without a response".into()),
    }
}

/// Tries to make the kernel hand connections queued on a closing listener to another listener
/// of the same SO_REUSEPORT group (possible only as root); returns whether it is on.
fn enable_tcp_migrate_req() -> bool {
    let path = "/proc/sys/net/ipv4/tcp_migrate_req";
    if std::fs::read_to_string(path).is_ok_and(|v| v.trim() == "1") {
        return true;
    }
    std::fs::write(path, "1").is_ok()
}

#[test]
fn seamless_restart_on_the_same_port_loses_no_request() {
    let migrate = enable_tcp_migrate_req();
    let backend = Backend::named("up");
    // The old process picks its own port; the new one binds the same port beside it.
    let mut old = balancer_for(backend.addr, &[]);
    let addr = old.addr;
    let port = addr.port().to_string();
    let env = [
        ("HOST_PORT_HTTP_BALANCER", port.as_str()),
        ("BALANCER_REUSE_PORT", "on"),
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(SeqCst) && Instant::now() < deadline {
                let _ = tx.send(one_request(addr));
            }
        })
    };
    let wait_for_requests =
        |n: usize, rx: &mpsc::Receiver<Outcome>, outcomes: &mut Vec<Outcome>| {
            for _ in 0..n {
                outcomes.push(
                    rx.recv_timeout(WAIT)
                        .expect("the client keeps making requests"),
                );
            }
        };
    let mut outcomes = Vec::new();
    wait_for_requests(20, &rx, &mut outcomes);

    let new = balancer_for(backend.addr, &env);
    assert_eq!(new.addr, addr);
    wait_for_requests(20, &rx, &mut outcomes);
    old.signal("TERM");
    assert_eq!(
        old.wait_exit(EXIT_LIMIT),
        Some(0),
        "old log:\n{}",
        old.log_text()
    );
    wait_for_requests(50, &rx, &mut outcomes);
    stop.store(true, SeqCst);
    client.join().expect("client thread");
    outcomes.extend(rx.try_iter());

    let failures: Vec<&String> = outcomes
        .iter()
        .filter_map(|o| match o {
            Outcome::Failed(why) => Some(why),
            Outcome::Ok => None,
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the restart (tcp_migrate_req on: {migrate}): {failures:?}",
        failures.len(),
        outcomes.len()
    );
    assert_eq!(
        get(addr, "/after").text(),
        "up",
        "the new process serves afterwards"
    );
}

/// Writes a GET on a connection that has sent nothing yet; the reader for its answer.
fn send_first_request(stream: TcpStream) -> BufReader<TcpStream> {
    let mut writer = stream.try_clone().unwrap();
    writer
        .write_all(b"GET /late HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    BufReader::new(stream)
}

#[test]
fn connection_opened_before_sigterm_gets_its_first_request_served() {
    // A client that connected just before the signal has not sent its request yet; it is not
    // an idle keep-alive connection, and a restart must not lose its request.
    let backend = Backend::named("first");
    let mut balancer = balancer_for(backend.addr, &[]);
    let stream = connect(balancer.addr);
    // The connection is accepted and waits for its first byte (a request on another
    // connection shows the accept loop has run since).
    assert_eq!(get(balancer.addr, "/probe").status, 200);
    balancer.signal("TERM");
    // The first request's grace (500 ms from the accept) is for a request already on its way:
    // write it at once, and only then check that the balancer was draining when it went out.
    balancer.wait_log("stops accepting");
    let mut reader = send_first_request(stream);
    assert_eq!(
        balancer.admin_get("/healthz").0,
        503,
        "the request went out while draining"
    );
    let resp =
        read_response(&mut reader, false).expect("the first request is answered, not dropped");
    assert_eq!(resp.status, 200);
    assert_eq!(balancer.wait_exit(EXIT_LIMIT), Some(0));
}

#[test]
fn the_first_request_grace_runs_from_the_accept_whenever_the_signal_comes() {
    // The signal comes half-way through the connection's 500 ms; the request a little later,
    // still inside it. (The wait cancelled by the signal once made the rest of the grace
    // count from its own start, closing the connection at once.)
    let backend = Backend::named("late-first");
    let mut balancer = balancer_for(backend.addr, &[]);
    let stream = connect(balancer.addr);
    assert_eq!(get(balancer.addr, "/probe").status, 200);
    std::thread::sleep(Duration::from_millis(250));
    balancer.signal("TERM");
    std::thread::sleep(Duration::from_millis(100));
    let mut reader = send_first_request(stream);
    let resp = read_response(&mut reader, false).expect("served within the grace");
    assert_eq!(resp.status, 200);
    assert_eq!(balancer.wait_exit(EXIT_LIMIT), Some(0));
}

#[test]
fn a_connection_silent_since_well_before_sigterm_is_idle_and_does_not_hold_the_exit() {
    // Opened, never used: past the first request's grace it is as idle as a kept-alive
    // connection between requests, so the drain closes it at once instead of waiting on it.
    let backend = Backend::named("silent");
    let mut balancer = balancer_for(backend.addr, &[]);
    let mut silent = connect(balancer.addr);
    assert_eq!(get(balancer.addr, "/probe").status, 200);
    std::thread::sleep(Duration::from_millis(1200));
    balancer.signal("TERM");
    // Well under the 2 s the drain used to give every unused connection.
    assert_eq!(balancer.wait_exit(Duration::from_millis(1000)), Some(0));
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        matches!(silent.read(&mut buf), Ok(0) | Err(_)),
        "closed without an answer"
    );
}

#[test]
fn sigterm_while_the_process_starts_drains_it_and_exits_0() {
    // The signal goes out the moment the first log line appears, before any shard has started:
    // a process that installed its handlers only once serving was killed by it (status 143).
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_balancer"))
        .env_clear()
        .env("HOST_PORT_HTTP_BALANCER", "0")
        .env("ADMIN_PORT", "0")
        .env("BALANCER_BIND", "127.0.0.1")
        .env("BALANCER_CPUS", "0")
        .env(
            "BACKENDS",
            server_set(&[("127.0.0.1:9".parse().unwrap(), 1.0)]),
        )
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("binary starts");
    let pid = child.id() as libc::pid_t;
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
    let mut first = String::new();
    stderr.read_line(&mut first).expect("a first log line");
    assert!(first.contains("starting balancer"), "{first}");
    // SAFETY: kill(2) on our own child, which has not been waited for, so its pid is still ours.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);

    let deadline = Instant::now() + EXIT_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waitable") {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{first}{rest}");
    assert!(rest.contains("received SIGTERM"), "{rest}");
}
