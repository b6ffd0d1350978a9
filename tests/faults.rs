//! Faults under load (SPEC §4–§6): a backend killed mid-run, a flapping agent link, the whole
//! server set replaced again and again, and slow or garbage-answering backends ejected and then
//! recovered. Client threads keep sending keep-alive GETs throughout, and every request's fate
//! is recorded: answered (with its status), failed (connection error), or hung (ran into the
//! client's read timeout).
//!
//! Everything is bounded: the load stops on a flag or after `LOAD_LIMIT`, every loop has a
//! count limit, and every wait a deadline. Only 127.0.0.1 is used. No assertion is on speed.

mod common;

use std::collections::HashMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Client threads per load.
const CLIENTS: usize = 6;
/// A request whose answer takes this long is counted as hung (the balancer's own deadlines,
/// `REQUEST_TIMEOUT` included, are all shorter in these tests).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(8);
/// Hard bound on one load run, whatever the test does meanwhile.
const LOAD_LIMIT: Duration = Duration::from_secs(40);
/// Hard bound on requests per client thread.
const MAX_REQUESTS_PER_CLIENT: usize = 200_000;
/// Shards for the tests that do not count ejections per shard.
const TWO_SHARDS: &str = "0-1";

// ---------------------------------------------------------------------------------------------
// Load: client threads doing keep-alive GETs

/// How one request ended.
#[derive(Debug, Clone)]
enum Fate {
    Answered { status: u16, body: String },
    Failed(String),
    Hung,
}

/// One request of a load run.
#[derive(Debug, Clone)]
struct Record {
    target: String,
    started: Instant,
    fate: Fate,
}

impl Record {
    fn is_ok(&self) -> bool {
        matches!(self.fate, Fate::Answered { status: 200, .. })
    }

    fn describe(&self) -> String {
        match &self.fate {
            Fate::Answered { status, body } => format!("{} -> {status} {body:?}", self.target),
            Fate::Failed(why) => format!("{} -> failed: {why}", self.target),
            Fate::Hung => format!("{} -> hung", self.target),
        }
    }
}

/// Client threads sending GETs over keep-alive connections until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<Vec<Record>>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, prefix: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let threads = (0..clients)
            .map(|client| {
                let (stop, done) = (stop.clone(), done.clone());
                let prefix = format!("{prefix}/{client}");
                std::thread::spawn(move || client_loop(addr, &prefix, &stop, &done))
            })
            .collect();
        Load {
            stop,
            done,
            threads,
        }
    }

    /// Requests finished so far (any fate).
    fn done(&self) -> usize {
        self.done.load(SeqCst)
    }

    /// Waits until `more` requests beyond `from` have finished (bounded by `WAIT`).
    fn wait_progress(&self, from: usize, more: usize) {
        eventually(&format!("{more} more requests to finish"), || {
            self.done() >= from + more
        });
    }

    fn finish(self) -> Summary {
        self.stop.store(true, SeqCst);
        let mut records = Vec::new();
        for t in self.threads {
            records.extend(t.join().expect("client thread"));
        }
        Summary { records }
    }
}

fn client_loop(
    addr: SocketAddr,
    prefix: &str,
    stop: &AtomicBool,
    done: &AtomicUsize,
) -> Vec<Record> {
    let began = Instant::now();
    let mut records = Vec::new();
    let mut conn: Option<(TcpStream, BufReader<TcpStream>)> = None;
    for n in 0..MAX_REQUESTS_PER_CLIENT {
        if stop.load(SeqCst) || began.elapsed() > LOAD_LIMIT {
            break;
        }
        let target = format!("{prefix}/{n}");
        let started = Instant::now();
        let (fate, keep) = one_request(addr, &mut conn, &target);
        if !keep {
            conn = None;
        }
        records.push(Record {
            target,
            started,
            fate,
        });
        done.fetch_add(1, SeqCst);
    }
    records
}

/// Sends one GET on the kept connection (opening one if needed); the fate, and whether the
/// connection may be used again.
fn one_request(
    addr: SocketAddr,
    conn: &mut Option<(TcpStream, BufReader<TcpStream>)>,
    target: &str,
) -> (Fate, bool) {
    let started = Instant::now();
    if conn.is_none() {
        match TcpStream::connect_timeout(&addr, CLIENT_TIMEOUT) {
            Ok(s) => {
                s.set_read_timeout(Some(CLIENT_TIMEOUT)).unwrap();
                s.set_write_timeout(Some(CLIENT_TIMEOUT)).unwrap();
                let _ = s.set_nodelay(true);
                let reader = BufReader::new(s.try_clone().expect("clone client stream"));
                *conn = Some((s, reader));
            }
            Err(e) => return (Fate::Failed(format!("connect: {e}")), false),
        }
    }
    let (writer, reader) = conn.as_mut().expect("opened above");
    let raw = format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n");
    if let Err(e) = writer.write_all(raw.as_bytes()) {
        return (Fate::Failed(format!("write: {e}")), false);
    }
    match read_response(reader, false) {
        Some(resp) => {
            let keep = !resp
                .header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"));
            let fate = Fate::Answered {
                status: resp.status,
                body: resp.text(),
            };
            (fate, keep)
        }
        // `read_response` hides the error kind; a wait that used up the whole read timeout
        // is the hang this file looks for, anything sooner is a closed or reset connection.
        None if started.elapsed() >= CLIENT_TIMEOUT => (Fate::Hung, false),
        None => (
            Fate::Failed("connection ended without a response".into()),
            false,
        ),
    }
}

/// The records of a finished load run.
struct Summary {
    records: Vec<Record>,
}

impl Summary {
    fn failures(&self) -> Vec<&Record> {
        self.records.iter().filter(|r| !r.is_ok()).collect()
    }

    fn hung(&self) -> Vec<&Record> {
        self.records
            .iter()
            .filter(|r| matches!(r.fate, Fate::Hung))
            .collect()
    }

    /// Answers with status 200 per body.
    fn bodies(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for r in &self.records {
            if let Fate::Answered { status: 200, body } = &r.fate {
                *out.entry(body.clone()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Counts of each answered status (0 for failed, 1 for hung).
    fn statuses(&self) -> HashMap<u16, usize> {
        let mut out = HashMap::new();
        for r in &self.records {
            let key = match r.fate {
                Fate::Answered { status, .. } => status,
                Fate::Failed(_) => 0,
                Fate::Hung => 1,
            };
            *out.entry(key).or_insert(0) += 1;
        }
        out
    }

    fn describe(&self) -> String {
        let failures = self.failures();
        let shown: Vec<String> = failures.iter().take(10).map(|r| r.describe()).collect();
        format!(
            "{} requests, statuses {:?} (0 = failed, 1 = hung), bodies {:?}; first failures: {:#?}",
            self.records.len(),
            self.statuses(),
            self.bodies(),
            shown
        )
    }
}

fn assert_all_succeeded(summary: &Summary, what: &str) {
    assert!(
        summary.records.len() >= CLIENTS * 10,
        "{what}: too little load to mean anything: {}",
        summary.describe()
    );
    assert!(
        summary.failures().is_empty(),
        "{what}: every request succeeds: {}",
        summary.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// Admin helpers

fn servers_doc(lb: &Balancer) -> Value {
    let (status, body) = lb.admin_get("/servers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/servers is JSON")
}

fn ejected_shards(lb: &Balancer, addr: SocketAddr) -> Option<u64> {
    let doc = servers_doc(lb);
    doc["servers"]
        .as_array()?
        .iter()
        .find(|s| s["port"].as_u64() == Some(u64::from(addr.port())))?["ejected_shards"]
        .as_u64()
}

/// Waits until `check` holds, polling every 50 ms, for at most `limit`.
fn eventually_within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---------------------------------------------------------------------------------------------
// (a) A backend killed under steady load

/// A backend that can be killed like a crashed process: its listener closes and every open
/// connection ends at once, answered or not. It answers each request with its name after a
/// short pause, so requests are regularly in flight on it.
struct KillableBackend {
    addr: SocketAddr,
    served: Arc<AtomicUsize>,
    killed: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    raw: Option<RawBackend>,
}

impl KillableBackend {
    fn start(name: &'static str) -> KillableBackend {
        let served = Arc::new(AtomicUsize::new(0));
        let killed = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (s, k, c) = (served.clone(), killed.clone(), conns.clone());
        let handler: ConnHandler = Arc::new(move |conn: TcpStream| {
            let Ok(mut writer) = conn.try_clone() else {
                return;
            };
            if let Ok(copy) = conn.try_clone() {
                c.lock().unwrap().push(copy);
            }
            let mut reader = BufReader::new(conn);
            // Bounded: the connection's read timeout ends an idle one.
            while let Some(_head) = read_request(&mut reader) {
                if k.load(SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(2));
                if k.load(SeqCst) || writer.write_all(&ok(name.as_bytes())).is_err() {
                    return;
                }
                s.fetch_add(1, SeqCst);
            }
        });
        let raw = RawBackend::start(handler);
        KillableBackend {
            addr: raw.addr,
            served,
            killed,
            conns,
            raw: Some(raw),
        }
    }

    fn served(&self) -> usize {
        self.served.load(SeqCst)
    }

    /// Ends every connection at once and closes the listener.
    fn kill(&mut self) {
        self.killed.store(true, SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        // Dropping the raw backend stops its accept loop, which closes the listener.
        self.raw.take();
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[test]
fn a_backend_killed_under_load_fails_only_requests_in_flight_on_it_and_none_hang() {
    let a = KillableBackend::start("a");
    let b = KillableBackend::start("b");
    let mut c = KillableBackend::start("c");
    let set = server_set(&[(a.addr, 1.0), (b.addr, 1.0), (c.addr, 1.0)]);
    let lb = Balancer::start(&[
        ("BACKENDS", set.as_str()),
        ("BALANCER_CPUS", TWO_SHARDS),
        ("REQUEST_TIMEOUT", "5"),
    ]);

    let load = Load::start(lb.addr, CLIENTS, "/kill");
    load.wait_progress(0, 300);
    std::thread::sleep(Duration::from_millis(1500));
    eventually("the doomed backend to serve some of the load", || {
        c.served() >= 20
    });
    c.kill();
    let killed_at = Instant::now();
    let at_kill = load.done();
    load.wait_progress(at_kill, 300);
    std::thread::sleep(Duration::from_millis(1500));
    let summary = load.finish();

    assert!(
        summary.hung().is_empty(),
        "no request hangs: {}",
        summary.describe()
    );
    let failures = summary.failures();
    // At most one request per client thread can be in flight at any moment, so at most that
    // many were on the killed backend; and a request that began after it was dead was never
    // in flight on it (a pooled connection it closed is never the cause of a client error).
    assert!(
        failures.len() <= CLIENTS,
        "only requests in flight on the killed backend may fail: {}",
        summary.describe()
    );
    for f in &failures {
        assert!(
            f.started < killed_at,
            "{} began after the kill and still failed; {}",
            f.describe(),
            summary.describe()
        );
    }
    let after: Vec<&Record> = summary
        .records
        .iter()
        .filter(|r| r.started >= killed_at)
        .collect();
    assert!(after.len() >= 300, "load continued after the kill");
    assert!(after.iter().all(|r| r.is_ok()), "{}", summary.describe());
    eprintln!(
        "backend killed under load: {} (failures allowed: in flight only)",
        summary.describe()
    );

    // A request each time: an ejection ends after 5 s, and only a failed request in the
    // probation that follows ejects the server again, so a slow check must keep traffic going.
    eventually("the killed backend to be ejected on some shard", || {
        let _ = get(lb.addr, "/poke");
        ejected_shards(&lb, c.addr).unwrap_or(0) >= 1
    });
    for i in 0..30 {
        let resp = get(lb.addr, &format!("/after-kill/{i}"));
        assert_eq!(
            resp.status,
            200,
            "request {i} after the kill: {}",
            resp.text()
        );
        assert!(
            resp.text() == "a" || resp.text() == "b",
            "only live backends answer: {}",
            resp.text()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// (b) The agent link dropped and restored every 200 ms

/// Binds `port` again, beside the `HeldPort::shared` that kept it (bounded retries).
fn rebind(port: u16) -> TcpListener {
    let deadline = Instant::now() + WAIT;
    loop {
        match reuseport_listener(port) {
            Ok(l) => return l,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot rebind agent port {port}: {e}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn applied_version(reply: &Value) -> u64 {
    reply["applied"]
        .as_u64()
        .unwrap_or_else(|| panic!("the set is applied: {reply}"))
}

#[test]
fn a_flapping_agent_link_fails_no_request() {
    let a = Backend::named("a");
    let b = Backend::named("b");
    let c = Backend::named("c");
    let sets = [
        server_set(&[(a.addr, 1.0), (b.addr, 2.0), (c.addr, 3.0)]),
        server_set(&[(a.addr, 3.0), (b.addr, 2.0), (c.addr, 1.0)]),
    ];
    let mut agent = Agent::start();
    let port = agent.port;
    let lb = Balancer::start(&[
        ("HOST_PORT_WS_DEPLOYMENT_AGENT", &agent.port_str()),
        ("AGENT_BACKOFF_MAX", "0.2"),
        ("BALANCER_CPUS", TWO_SHARDS),
    ]);
    let mut conn = agent.accept();
    let mut version = applied_version(&conn.push(&sets[0]));

    let load = Load::start(lb.addr, CLIENTS, "/flap");
    load.wait_progress(0, 100);
    const CYCLES: usize = 15;
    for cycle in 0..CYCLES {
        std::thread::sleep(Duration::from_millis(200));
        // Alternately a closing handshake and a plain TCP drop; every third cycle the agent
        // also goes away for 200 ms, so reconnect attempts are refused meanwhile.
        if cycle % 2 == 0 {
            conn.close();
        } else {
            drop(conn);
        }
        if cycle % 3 == 2 {
            // The port is held while the agent is away, so that nobody else takes it.
            let hold = HeldPort::shared(port);
            drop(agent);
            std::thread::sleep(Duration::from_millis(200));
            agent = Agent::on(rebind(port));
            drop(hold);
        }
        conn = agent.accept();
        let next = applied_version(&conn.push(&sets[(cycle + 1) % 2]));
        assert!(next > version, "versions count up: {version} then {next}");
        version = next;
    }
    let at_end = load.done();
    load.wait_progress(at_end, 100);
    let summary = load.finish();

    assert_all_succeeded(&summary, "agent link flapping");
    let bodies = summary.bodies();
    for name in ["a", "b", "c"] {
        assert!(
            bodies.get(name).copied().unwrap_or(0) > 0,
            "{name} served: {bodies:?}"
        );
    }
    let reconnects = lb.metric("balancer_agent_reconnects_total").unwrap_or(0.0);
    assert!(
        reconnects >= CYCLES as f64,
        "each drop was followed by a reconnect: {reconnects}"
    );
    assert_eq!(lb.metric("balancer_agent_connected"), Some(1.0));
    assert_eq!(servers_doc(&lb)["version"].as_u64(), Some(version));
    eprintln!(
        "agent flapping: {} cycles, {reconnects} reconnects; {}",
        CYCLES,
        summary.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// (c) The whole server set replaced under load

/// Two fresh backends named after generation `g`, each pausing a little before answering so
/// requests are in flight when their set is replaced.
fn generation(g: usize) -> Vec<Backend> {
    (0..2)
        .map(|i| {
            let name = format!("g{g}-{i}");
            Backend::start(Arc::new(move |_: &Seen| {
                Reply::Delay(
                    Duration::from_millis(3),
                    Box::new(Reply::Bytes(ok(name.as_bytes()))),
                )
            }))
        })
        .collect()
}

fn set_of(backends: &[Backend]) -> String {
    let servers: Vec<(SocketAddr, f64)> = backends.iter().map(|b| (b.addr, 1.0)).collect();
    server_set(&servers)
}

#[test]
fn replacing_the_whole_server_set_under_load_fails_no_request() {
    let agent = Agent::start();
    let lb = Balancer::start(&[
        ("HOST_PORT_WS_DEPLOYMENT_AGENT", &agent.port_str()),
        ("BALANCER_CPUS", TWO_SHARDS),
    ]);
    let mut conn = agent.accept();
    let mut generations: Vec<Vec<Backend>> = vec![generation(0)];
    applied_version(&conn.push(&set_of(&generations[0])));

    let load = Load::start(lb.addr, CLIENTS, "/replace");
    load.wait_progress(0, 100);
    const GENERATIONS: usize = 30;
    for g in 1..=GENERATIONS {
        std::thread::sleep(Duration::from_millis(100));
        let fresh = generation(g);
        applied_version(&conn.push(&set_of(&fresh)));
        generations.push(fresh);
        // Two sets ago is drained by now: stop it, closing the pooled connections to it.
        if g >= 2 {
            for backend in &mut generations[g - 2] {
                backend.stop();
            }
        }
    }
    let at_end = load.done();
    load.wait_progress(at_end, 100);
    let summary = load.finish();

    assert_all_succeeded(&summary, "server set replaced every 100 ms");
    let served_by = summary.bodies();
    let generations_seen: std::collections::HashSet<&str> = served_by
        .keys()
        .filter_map(|k| k.split('-').next())
        .collect();
    assert!(
        generations_seen.len() >= GENERATIONS / 2,
        "traffic followed the sets: {served_by:?}"
    );
    let last = format!("g{GENERATIONS}-");
    for i in 0..20 {
        let resp = get(lb.addr, &format!("/settled/{i}"));
        assert_eq!(resp.status, 200);
        assert!(
            resp.text().starts_with(&last),
            "{} after the last set",
            resp.text()
        );
    }
    eprintln!(
        "server set replaced {GENERATIONS} times: {} generations seen; {}",
        generations_seen.len(),
        summary.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// (d) A slow and a garbage-answering backend: ejected, then recovered

/// A backend that answers after `REQUEST_TIMEOUT` (1 s) until `fixed`, then at once.
fn slow_until(fixed: Arc<AtomicBool>) -> Backend {
    Backend::start(Arc::new(move |_: &Seen| {
        if fixed.load(SeqCst) {
            Reply::Bytes(ok(b"slow"))
        } else {
            Reply::Delay(
                Duration::from_millis(1500),
                Box::new(Reply::Bytes(ok(b"slow"))),
            )
        }
    }))
}

/// A backend that answers bytes that are not HTTP until `fixed`.
fn garbage_until(fixed: Arc<AtomicBool>) -> Backend {
    Backend::start(Arc::new(move |_: &Seen| {
        if fixed.load(SeqCst) {
            Reply::Bytes(ok(b"garbage"))
        } else {
            Reply::Bytes(b"SSH-2.0-OpenSSH_9.6\r\n\x00\x01\x02 not http\r\n\r\n".to_vec())
        }
    }))
}

#[test]
fn slow_and_garbage_backends_are_ejected_while_the_healthy_one_serves_then_recover() {
    let healthy = Backend::named("healthy");
    let slow_fixed = Arc::new(AtomicBool::new(false));
    let garbage_fixed = Arc::new(AtomicBool::new(false));
    let slow = slow_until(slow_fixed.clone());
    let garbage = garbage_until(garbage_fixed.clone());
    let set = server_set(&[(healthy.addr, 1.0), (slow.addr, 1.0), (garbage.addr, 1.0)]);
    // One shard, so three failures in a row on it eject a server everywhere.
    let lb = Balancer::start(&[("BACKENDS", set.as_str()), ("REQUEST_TIMEOUT", "1")]);

    let load = Load::start(lb.addr, 4, "/sick");
    eventually_within(
        Duration::from_secs(20),
        "the slow and the garbage backends to be ejected",
        || {
            ejected_shards(&lb, slow.addr) == Some(1)
                && ejected_shards(&lb, garbage.addr) == Some(1)
        },
    );
    // Fix both at once, so the first try after the 5 s ejection succeeds.
    slow_fixed.store(true, SeqCst);
    garbage_fixed.store(true, SeqCst);
    assert_eq!(ejected_shards(&lb, healthy.addr), Some(0));
    eventually("balancer_ejected_servers to count both", || {
        lb.metric("balancer_ejected_servers") == Some(2.0)
    });
    let timeouts = format!(
        "balancer_backend_errors_total{{backend=\"{}\",kind=\"timeout\"}}",
        slow.addr
    );
    let bad = format!(
        "balancer_backend_errors_total{{backend=\"{}\",kind=\"bad_response\"}}",
        garbage.addr
    );
    assert!(lb.metric(&timeouts).unwrap_or(0.0) >= 3.0, "{timeouts}");
    assert!(lb.metric(&bad).unwrap_or(0.0) >= 3.0, "{bad}");
    let (slow_before, garbage_before) = (slow.requests(), garbage.requests());
    let healthy_before = healthy.requests();

    // Ejection is 5 s; one late failure at most doubles it. Recovery = traffic again.
    eventually_within(
        Duration::from_secs(25),
        "the fixed backends to receive traffic again",
        || slow.requests() > slow_before + 5 && garbage.requests() > garbage_before + 5,
    );
    eventually_within(
        Duration::from_secs(5),
        "the ejections to be cleared",
        || {
            ejected_shards(&lb, slow.addr) == Some(0)
                && ejected_shards(&lb, garbage.addr) == Some(0)
                && lb.metric("balancer_ejected_servers") == Some(0.0)
        },
    );
    let recovered_at = Instant::now();
    let at_recovery = load.done();
    load.wait_progress(at_recovery, 100);
    let summary = load.finish();

    assert!(summary.hung().is_empty(), "{}", summary.describe());
    assert!(
        healthy.requests() > healthy_before,
        "the healthy backend kept serving"
    );
    // Before the fix: 200 from the healthy backend, 504 for a timeout, 502 for garbage; a
    // request is never retried after a timeout or a bad response (SPEC §6).
    for r in &summary.records {
        match &r.fate {
            Fate::Answered { status: 200, .. }
            | Fate::Answered {
                status: 502 | 504, ..
            } => {}
            _ => panic!("{}; {}", r.describe(), summary.describe()),
        }
    }
    let after: Vec<&Record> = summary
        .records
        .iter()
        .filter(|r| r.started >= recovered_at)
        .collect();
    assert!(after.iter().all(|r| r.is_ok()), "{}", summary.describe());
    let bodies_after: std::collections::HashSet<String> = after
        .iter()
        .filter_map(|r| match &r.fate {
            Fate::Answered { body, .. } => Some(body.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        bodies_after.len(),
        3,
        "all three serve again: {bodies_after:?}"
    );
    eprintln!("slow and garbage backends: {}", summary.describe());
}
