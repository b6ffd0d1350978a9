//! The deployment agent link (SPEC §4): snapshots switch traffic, rejections keep the previous
//! set and the connection, acknowledgements carry versions, pings are answered, and the
//! balancer reconnects with capped exponential backoff while the last set keeps serving.
//!
//! Every test runs the real binary against real backends and a real tungstenite WebSocket
//! agent (`common::Agent`) on 127.0.0.1.

mod common;

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::time::{Duration, Instant};

use common::{
    eventually, get, held_backend, reuseport_listener, server_set, spread, Agent, AgentConn,
    Backend, Balancer, HeldPort, WAIT,
};
use serde_json::{json, Value};

/// The reconnect cap used by these tests, in the units of `AGENT_BACKOFF_MAX` and of the log.
const BACKOFF_MAX: &str = "0.4";
const BACKOFF_MAX_MS: u64 = 400;

/// A balancer connected to a fresh agent, with `BACKENDS` when `backends` is given.
fn with_agent(backends: Option<&str>, extra: &[(&str, &str)]) -> (Balancer, Agent, AgentConn) {
    let agent = Agent::start();
    let port = agent.port_str();
    let mut env = vec![
        ("HOST_PORT_WS_DEPLOYMENT_AGENT", port.as_str()),
        ("AGENT_BACKOFF_MAX", BACKOFF_MAX),
    ];
    if let Some(set) = backends {
        env.push(("BACKENDS", set));
    }
    env.extend_from_slice(extra);
    let balancer = Balancer::start(&env);
    let conn = agent.accept();
    (balancer, agent, conn)
}

/// A balancer serving backend `a` from `BACKENDS`, connected to a fresh agent.
fn serving(a: &Backend) -> (Balancer, Agent, AgentConn) {
    with_agent(Some(&server_set(&[(a.addr, 1.0)])), &[])
}

fn applied(version: u64, servers: usize) -> Value {
    json!({ "applied": version, "servers": servers })
}

/// The body of one fresh-connection GET, i.e. which backend answered.
fn who(balancer: &Balancer) -> String {
    get(balancer.addr, "/who").text()
}

/// `n` GETs over one keep-alive connection all answered by backend `name`.
fn all_from(balancer: &Balancer, n: usize, name: &str) {
    let counts = spread(balancer.addr, n);
    assert_eq!(
        counts.get(name),
        Some(&n),
        "every request to {name}: {counts:?}"
    );
}

/// The `/servers` document.
fn servers_doc(balancer: &Balancer) -> Value {
    let (status, body) = balancer.admin_get("/servers");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("/servers is JSON")
}

/// `count` servers on 127.0.0.1 with distinct ports (nothing needs to listen on them).
fn many_servers(count: usize) -> String {
    let entries: Vec<String> = (0..count)
        .map(|i| format!(r#"{{"host":"127.0.0.1","port":{},"score":1}}"#, 10_000 + i))
        .collect();
    format!(r#"{{"servers":[{}]}}"#, entries.join(","))
}

/// Every `next retry in Nms` delay logged so far, in order.
fn retry_delays(balancer: &Balancer) -> Vec<u64> {
    balancer
        .log_text()
        .lines()
        .filter_map(|line| line.split("next retry in ").nth(1))
        .map(|rest| {
            rest.trim_end_matches("ms")
                .parse()
                .unwrap_or_else(|_| panic!("a delay in ms: {rest:?}"))
        })
        .collect()
}

/// Waits until at least `count` retry delays were logged, and returns them all.
fn wait_retries(balancer: &Balancer, count: usize) -> Vec<u64> {
    balancer.wait_log_count("next retry in ", count);
    retry_delays(balancer)
}

/// `delay` is `base` with at most ±20 % jitter, and not above `AGENT_BACKOFF_MAX` (`max`).
fn assert_within(delay: u64, base: u64, max: u64, what: &str) {
    let (low, high) = (base * 8 / 10, (base * 12 / 10).min(max));
    assert!(
        (low..=high).contains(&delay),
        "{what}: {delay}ms not within {low}..={high}ms"
    );
}

/// Binds `port` again, beside the `HeldPort::shared` that kept it (bounded retries).
fn rebind(port: u16) -> TcpListener {
    let deadline = Instant::now() + WAIT;
    loop {
        match reuseport_listener(port) {
            Ok(listener) => return listener,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot bind agent port {port} again: {e}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots and traffic

#[test]
fn snapshot_switches_traffic_from_backends_set_to_agent_set() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    // Two shards: the acknowledgement promises that every one of them routes by the new set.
    let (balancer, _agent, mut conn) = with_agent(
        Some(&server_set(&[(a.addr, 1.0)])),
        &[("BALANCER_CPUS", "0-1")],
    );
    for _ in 0..10 {
        assert_eq!(who(&balancer), "A");
    }

    assert_eq!(conn.push(&server_set(&[(b.addr, 1.0)])), applied(2, 1));

    for _ in 0..20 {
        assert_eq!(who(&balancer), "B", "a fresh connection after the ack");
    }
    all_from(&balancer, 50, "B");
}

#[test]
fn split_follows_agent_scores() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let (balancer, _agent, mut conn) = serving(&a);
    const N: usize = 2_000;

    assert_eq!(
        conn.push(&server_set(&[(a.addr, 1.0), (b.addr, 3.0)])),
        applied(2, 2)
    );
    let counts = spread(balancer.addr, N);
    let share_b = counts.get("B").copied().unwrap_or(0) as f64 / N as f64;
    // Expected 0.75; the binomial standard deviation is ~0.01, so 0.05 is five of them.
    assert!((share_b - 0.75).abs() < 0.05, "1:3 split: {counts:?}");

    assert_eq!(
        conn.push(&server_set(&[(a.addr, 3.0), (b.addr, 1.0)])),
        applied(3, 2)
    );
    let counts = spread(balancer.addr, N);
    let share_b = counts.get("B").copied().unwrap_or(0) as f64 / N as f64;
    assert!((share_b - 0.25).abs() < 0.05, "3:1 split: {counts:?}");
}

#[test]
fn empty_list_makes_requests_get_503() {
    let a = Backend::named("A");
    let (balancer, _agent, mut conn) = serving(&a);
    assert_eq!(who(&balancer), "A");

    assert_eq!(conn.push(r#"{"servers":[]}"#), applied(2, 0));
    assert_eq!(get(balancer.addr, "/").status, 503);
    assert_eq!(conn.push("[]"), applied(3, 0), "the bare-array form too");
    assert_eq!(get(balancer.addr, "/").status, 503);

    assert_eq!(conn.push(&server_set(&[(a.addr, 1.0)])), applied(4, 1));
    assert_eq!(who(&balancer), "A", "servers again after the empty set");
}

#[test]
fn removed_server_gets_no_new_requests() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let (balancer, _agent, mut conn) = serving(&a);
    assert_eq!(
        conn.push(&server_set(&[(a.addr, 1.0), (b.addr, 1.0)])),
        applied(2, 2)
    );
    let counts = spread(balancer.addr, 200);
    assert!(
        counts.contains_key("A") && counts.contains_key("B"),
        "{counts:?}"
    );

    assert_eq!(conn.push(&server_set(&[(a.addr, 1.0)])), applied(3, 1));
    let before = b.requests();
    all_from(&balancer, 200, "A");
    assert_eq!(b.requests(), before, "the removed server saw new requests");
}

#[test]
fn a_server_added_back_while_its_requests_drain_still_counts_them_in_flight() {
    let (held, release_tx) = held_backend();
    let other = Backend::named("other");
    let (balancer, _agent, mut conn) = with_agent(None, &[]);
    assert_eq!(conn.push(&server_set(&[(held.addr, 1.0)])), applied(1, 1));
    let in_flight = |balancer: &Balancer| {
        let doc = servers_doc(balancer);
        let label = held.addr.port();
        doc["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .find(|s| s["port"] == label)
            .map(|s| s["in_flight"].as_u64().expect("in_flight is a number"))
    };
    let addr = balancer.addr;
    let client = std::thread::spawn(move || get(addr, "/held"));
    eventually("the held request in flight", || {
        in_flight(&balancer) == Some(1)
    });

    // Removed (it drains), then added back before its request ends.
    assert_eq!(conn.push(&server_set(&[(other.addr, 1.0)])), applied(2, 1));
    assert_eq!(in_flight(&balancer), None, "a removed server is not listed");
    let both = server_set(&[(other.addr, 1.0), (held.addr, 1.0)]);
    assert_eq!(conn.push(&both), applied(3, 2));
    eventually("the re-added server to count its draining request", || {
        in_flight(&balancer) == Some(1)
    });
    release_tx.send(()).unwrap();
    assert_eq!(client.join().expect("client thread").text(), "held");
    eventually("in_flight back to 0", || in_flight(&balancer) == Some(0));
}

#[test]
fn zero_score_server_gets_no_new_requests() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let (balancer, _agent, mut conn) = serving(&a);
    assert_eq!(
        conn.push(&server_set(&[(a.addr, 1.0), (b.addr, 0.0)])),
        applied(2, 2)
    );
    all_from(&balancer, 200, "A");
    assert_eq!(b.requests(), 0);
}

#[test]
fn host_names_are_resolved() {
    // Listen where "localhost" resolves first, so the test holds whatever /etc/hosts says.
    let ip = ("localhost", 0)
        .to_socket_addrs()
        .expect("localhost resolves")
        .next()
        .expect("localhost has an address")
        .ip();
    let b = Backend::with_listener(
        TcpListener::bind((ip, 0)).expect("bind on localhost"),
        common::named("B"),
    );
    let a = Backend::named("A");
    let (balancer, _agent, mut conn) = serving(&a);

    let set = format!(r#"[{{"host":"localhost","port":{},"score":1}}]"#, b.port());
    assert_eq!(conn.push(&set), applied(2, 1));
    all_from(&balancer, 20, "B");
    let doc = servers_doc(&balancer);
    assert_eq!(doc["servers"][0]["host"], "localhost", "{doc}");
}

#[test]
fn entry_without_port_uses_target_port_and_unknown_fields_are_ignored() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let target = b.port().to_string();
    let (balancer, _agent, mut conn) = with_agent(
        Some(&server_set(&[(a.addr, 1.0)])),
        &[("TARGET_PORT", target.as_str())],
    );
    let reply = conn.push(r#"{"epoch":9,"servers":[{"host":"127.0.0.1","score":1,"zone":"eu"}]}"#);
    assert_eq!(reply, applied(2, 1));
    all_from(&balancer, 20, "B");
}

// ---------------------------------------------------------------------------------------------
// Rejections: each keeps the previous set, the connection and the version count

/// What `assert_rejected` sends: a text message, a binary frame, or a text frame whose
/// payload is not UTF-8.
enum Sent<'a> {
    Text(&'a str),
    Binary,
    NotUtf8,
}

impl<'a> From<Option<&'a str>> for Sent<'a> {
    fn from(message: Option<&'a str>) -> Self {
        message.map_or(Sent::Binary, Sent::Text)
    }
}

/// Serves A from BACKENDS, switches to B (version 2), sends `message` and checks the
/// rejection, the warning, that B still serves, that the version did not move, and that the
/// same connection then gets version 3 applied.
fn assert_rejected<'a>(message: impl Into<Sent<'a>>, reason_starts: &str) {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let (balancer, agent, mut conn) = serving(&a);
    assert_eq!(conn.push(&server_set(&[(b.addr, 1.0)])), applied(2, 1));

    let reply = match message.into() {
        Sent::Text(text) => conn.push(text),
        Sent::Binary => {
            conn.send_binary(br#"{"servers":[]}"#);
            conn.recv_json()
        }
        Sent::NotUtf8 => {
            conn.send_text_frame_bytes(b"{\"servers\": [\"\xff\xfe\"]}");
            conn.recv_json()
        }
    };
    let reason = reply["rejected"]
        .as_str()
        .unwrap_or_else(|| panic!("a rejection: {reply}"));
    assert!(
        reason.starts_with(reason_starts),
        "reason {reason:?} should start with {reason_starts:?}"
    );
    assert_eq!(reply.as_object().map(|o| o.len()), Some(1), "{reply}");
    let warning = balancer.wait_log(reason);
    assert!(warning.contains("WARN"), "{warning}");

    all_from(&balancer, 20, "B");
    assert_eq!(servers_doc(&balancer)["version"], 2);
    assert_eq!(balancer.metric("balancer_server_set_version"), Some(2.0));

    assert_eq!(
        conn.push(&server_set(&[(a.addr, 1.0)])),
        applied(3, 1),
        "same connection"
    );
    assert_eq!(agent.connects.load(std::sync::atomic::Ordering::SeqCst), 1);
    all_from(&balancer, 20, "A");
}

/// A message over the WebSocket size limit (16 MiB a frame) cannot be skipped, so the
/// connection cannot stay open as for other rejections; the agent still gets its answer, then
/// a close saying why (1009), and the balancer reconnects with the previous set serving.
#[test]
fn a_message_over_the_size_limit_is_rejected_then_the_link_is_reopened() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let (balancer, agent, mut conn) = serving(&a);
    assert_eq!(conn.push(&server_set(&[(b.addr, 1.0)])), applied(2, 1));
    // Valid but for its size: an unknown field padding it past 16 MiB.
    let padding = "x".repeat(17 << 20);
    let huge = format!(
        r#"{{"padding":"{padding}","servers":[{{"host":"127.0.0.1","port":{},"score":1}}]}}"#,
        a.port()
    );
    conn.send_text(&huge);
    let reply = conn.recv_json();
    let reason = reply["rejected"]
        .as_str()
        .unwrap_or_else(|| panic!("a rejection: {reply}"));
    assert!(reason.starts_with("message too large"), "{reason}");
    assert_eq!(conn.recv_close_code(), Some(1009), "1009: message too big");
    let warning = balancer.wait_log(reason);
    assert!(warning.contains("WARN"), "{warning}");
    all_from(&balancer, 20, "B");
    let mut again = agent.accept();
    assert_eq!(again.push(&server_set(&[(a.addr, 1.0)])), applied(3, 1));
    all_from(&balancer, 20, "A");
}

#[test]
fn rejects_text_that_is_not_json() {
    assert_rejected(Some(r#"{"servers": [ nope"#), "not valid json: ");
}

#[test]
fn rejects_json_that_is_not_a_snapshot() {
    assert_rejected(Some(r#"{"backends":[]}"#), "not a server snapshot");
}

#[test]
fn rejects_bad_entry_naming_index_and_field() {
    assert_rejected(
        Some(r#"[{"host":"127.0.0.1","port":1,"score":1},{"host":"a b","score":1}]"#),
        r#"entry 1: field host: value "a b": must be an ip address or a dns name"#,
    );
}

#[test]
fn rejects_duplicate_host_and_port() {
    assert_rejected(
        Some(
            r#"[{"host":"127.0.0.1","port":9,"score":1},{"host":"127.0.0.1","port":9,"score":2}]"#,
        ),
        "entry 1: duplicate server 127.0.0.1:9",
    );
}

#[test]
fn rejects_port_out_of_range() {
    assert_rejected(
        Some(r#"[{"host":"127.0.0.1","port":70000,"score":1}]"#),
        "entry 0: field port: value 70000: must be an integer from 1 to 65535",
    );
}

#[test]
fn rejects_port_zero() {
    assert_rejected(
        Some(r#"[{"host":"127.0.0.1","port":0,"score":1}]"#),
        "entry 0: field port: value 0: must be an integer from 1 to 65535",
    );
}

#[test]
fn rejects_negative_score() {
    assert_rejected(
        Some(r#"[{"host":"127.0.0.1","port":9,"score":-1}]"#),
        "entry 0: field score: value -1: must be a finite number >= 0",
    );
}

#[test]
fn rejects_score_that_is_not_a_number() {
    assert_rejected(
        Some(r#"[{"host":"127.0.0.1","port":9,"score":"x"}]"#),
        r#"entry 0: field score: value "x": must be a finite number >= 0"#,
    );
}

#[test]
fn rejects_missing_score() {
    assert_rejected(
        Some(r#"[{"host":"127.0.0.1","port":9}]"#),
        "entry 0: field score: value missing: is required",
    );
}

#[test]
fn rejects_host_that_does_not_resolve() {
    assert_rejected(
        Some(r#"[{"host":"no-such-host.invalid","port":9,"score":1}]"#),
        r#"entry 0: field host: value "no-such-host.invalid": cannot be resolved"#,
    );
}

#[test]
fn rejects_binary_frames() {
    assert_rejected(None, "binary frames are not accepted");
}

#[test]
fn rejects_a_text_frame_that_is_not_utf8_and_keeps_the_connection() {
    // Not UTF-8 is not JSON: rejected like any other such message (SPEC §4), not a dropped
    // connection.
    assert_rejected(Sent::NotUtf8, "not valid json: ");
}

#[test]
fn rejects_10001_servers_and_applies_10000() {
    let a = Backend::named("A");
    let (balancer, _agent, mut conn) = serving(&a);

    let reply = conn.push(&many_servers(10_001));
    assert_eq!(
        reply,
        json!({ "rejected": "too many servers: 10001 (limit 10000)" })
    );
    all_from(&balancer, 10, "A");

    assert_eq!(conn.push(&many_servers(10_000)), applied(2, 10_000));
    let doc = servers_doc(&balancer);
    assert_eq!(doc["version"], 2);
    assert_eq!(doc["servers"].as_array().map(Vec::len), Some(10_000));
    assert_eq!(balancer.metric("balancer_server_set_version"), Some(2.0));
    let line = balancer.wait_log("applied server set version=2 servers=10000");
    assert!(line.contains(" propagation="), "{line}");
}

// ---------------------------------------------------------------------------------------------
// Acknowledgements, versions, pings

#[test]
fn acks_count_up_from_2_after_a_backends_set() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let (balancer, _agent, mut conn) = serving(&a);
    assert_eq!(
        servers_doc(&balancer)["version"],
        1,
        "BACKENDS is version 1"
    );
    for version in 2..=5 {
        let score = version as f64;
        let reply = conn.push(&server_set(&[(a.addr, 1.0), (b.addr, score)]));
        assert_eq!(reply, applied(version, 2));
    }
}

#[test]
fn acks_count_up_from_1_without_backends() {
    let a = Backend::named("A");
    let (balancer, _agent, mut conn) = with_agent(None, &[]);
    assert_eq!(get(balancer.addr, "/").status, 503, "no set yet");
    assert_eq!(servers_doc(&balancer)["version"], 0);
    for version in 1..=4 {
        assert_eq!(
            conn.push(&server_set(&[(a.addr, version as f64)])),
            applied(version, 1)
        );
    }
    assert_eq!(who(&balancer), "A");
}

#[test]
fn servers_endpoint_and_version_metric_show_the_applied_set() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let (balancer, _agent, mut conn) = serving(&a);
    assert_eq!(balancer.metric("balancer_server_set_version"), Some(1.0));

    assert_eq!(
        conn.push(&server_set(&[(a.addr, 1.0), (b.addr, 3.5)])),
        applied(2, 2)
    );
    let doc = servers_doc(&balancer);
    assert_eq!(doc["version"], 2, "{doc}");
    let servers: Vec<(String, u64, f64)> = doc["servers"]
        .as_array()
        .expect("servers array")
        .iter()
        .map(|s| {
            (
                s["host"].as_str().expect("host").to_owned(),
                s["port"].as_u64().expect("port"),
                s["score"].as_f64().expect("score"),
            )
        })
        .collect();
    assert_eq!(
        servers,
        [
            ("127.0.0.1".to_owned(), u64::from(a.port()), 1.0),
            ("127.0.0.1".to_owned(), u64::from(b.port()), 3.5),
        ]
    );
    assert_eq!(balancer.metric("balancer_server_set_version"), Some(2.0));
    let line = balancer.wait_log("applied server set version=2 servers=2");
    assert!(line.contains(" propagation="), "{line}");
}

#[test]
fn pings_are_answered_with_the_same_payload() {
    let a = Backend::named("A");
    let (_balancer, _agent, mut conn) = serving(&a);
    assert!(conn.ping(b"hello agent"), "pong with the ping's payload");
    assert!(conn.ping(b""), "empty ping");
    // Still a working link afterwards.
    assert_eq!(conn.push(&server_set(&[(a.addr, 2.0)])), applied(2, 1));
    assert!(conn.ping(&[7; 125]), "largest control payload");
}

// ---------------------------------------------------------------------------------------------
// Reconnects

#[test]
fn agent_host_may_be_a_name() {
    let a = Backend::named("A");
    let agent = Agent::start();
    let port = agent.port_str();
    let balancer = Balancer::start(&[
        ("HOST_PORT_WS_DEPLOYMENT_AGENT", port.as_str()),
        ("DEPLOYMENT_AGENT_HOST", "localhost"),
    ]);
    let mut conn = agent.accept();
    assert_eq!(conn.push(&server_set(&[(a.addr, 1.0)])), applied(1, 1));
    assert_eq!(who(&balancer), "A");
}

#[test]
fn first_retry_is_after_about_100ms_when_the_agent_is_not_there() {
    let a = Backend::named("A");
    // A port with nothing listening, held for the whole test so that nobody else takes it.
    let dead = HeldPort::refusing();
    let port = dead.port().to_string();
    let balancer = Balancer::start(&[
        ("HOST_PORT_WS_DEPLOYMENT_AGENT", &port),
        ("AGENT_BACKOFF_MAX", "30"),
        ("BACKENDS", &server_set(&[(a.addr, 1.0)])),
    ]);
    let delays = wait_retries(&balancer, 3);
    assert_within(delays[0], 100, 30_000, "first retry");
    assert_within(delays[1], 200, 30_000, "second retry");
    assert_within(delays[2], 400, 30_000, "third retry");
    assert_eq!(who(&balancer), "A", "BACKENDS serves without an agent");
}

#[test]
fn an_agent_that_never_answers_the_handshake_is_reported_as_such() {
    let a = Backend::named("A");
    // Accepts the connection (the listen backlog does) but never reads or answers.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = mute.local_addr().unwrap().port().to_string();
    let balancer = Balancer::start(&[
        ("HOST_PORT_WS_DEPLOYMENT_AGENT", &port),
        ("BACKENDS", &server_set(&[(a.addr, 1.0)])),
    ]);
    let line = balancer.wait_log("websocket handshake failed");
    assert!(line.contains("no answer within 5s"), "{line}");
    assert!(line.contains("next retry in"), "{line}");
    assert_eq!(who(&balancer), "A", "BACKENDS serves meanwhile");
}

#[test]
fn reconnect_delays_double_and_stay_capped() {
    let a = Backend::named("A");
    let (balancer, agent, conn) = serving(&a);
    // Every connection ends without a snapshot, so the delay never resets.
    conn.close();
    for _ in 0..5 {
        agent.accept().close();
    }
    let delays = wait_retries(&balancer, 6);
    assert_within(delays[0], 100, BACKOFF_MAX_MS, "1st");
    assert_within(delays[1], 200, BACKOFF_MAX_MS, "2nd");
    for (i, &delay) in delays.iter().enumerate().skip(2) {
        assert_within(
            delay,
            BACKOFF_MAX_MS,
            BACKOFF_MAX_MS,
            &format!("retry {} at the cap", i + 1),
        );
    }
    assert!(
        delays.windows(2).take(2).all(|w| w[0] < w[1]),
        "growing: {delays:?}"
    );
    let line = balancer.wait_log("next retry in ");
    assert!(
        line.contains("INFO") && line.contains("disconnected"),
        "{line}"
    );
}

#[test]
fn reconnect_delay_resets_after_a_valid_snapshot() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let (balancer, agent, conn) = serving(&a);
    conn.close();
    agent.accept().close();
    agent.accept().close();
    let delays = wait_retries(&balancer, 3);
    assert_within(
        delays[2],
        400,
        BACKOFF_MAX_MS,
        "grown to the cap before the snapshot",
    );

    let mut conn = agent.accept();
    assert_eq!(conn.push(&server_set(&[(b.addr, 1.0)])), applied(2, 1));
    conn.close();
    let delays = wait_retries(&balancer, 4);
    assert_within(
        delays[3],
        100,
        BACKOFF_MAX_MS,
        "after a connection that delivered a set",
    );

    // A rejected message is not a valid snapshot: no reset.
    let mut conn = agent.accept();
    assert!(conn.push("nope")["rejected"].is_string());
    conn.close();
    let delays = wait_retries(&balancer, 5);
    assert_within(
        delays[4],
        200,
        BACKOFF_MAX_MS,
        "after a connection with only a rejected message",
    );
}

#[test]
fn last_set_keeps_serving_while_the_agent_is_away() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let (balancer, agent, mut conn) = serving(&a);
    assert_eq!(conn.push(&server_set(&[(b.addr, 1.0)])), applied(2, 1));

    conn.close();
    drop(agent);
    wait_retries(&balancer, 3);
    eventually("the agent gauge to drop", || {
        balancer.metric("balancer_agent_connected") == Some(0.0)
    });
    for _ in 0..20 {
        assert_eq!(who(&balancer), "B", "the agent's last set, not BACKENDS");
    }
    assert_eq!(servers_doc(&balancer)["version"], 2);
}

#[test]
fn agent_coming_back_is_reconnected_and_counted() {
    let a = Backend::named("A");
    let b = Backend::named("B");
    let c = Backend::named("C");
    let (balancer, agent, mut conn) = serving(&a);
    assert_eq!(conn.push(&server_set(&[(b.addr, 1.0)])), applied(2, 1));
    // The gauge is set right after the handshake; the answered push proves it has happened.
    assert_eq!(balancer.metric("balancer_agent_connected"), Some(1.0));
    assert_eq!(
        balancer.metric("balancer_agent_reconnects_total"),
        Some(0.0)
    );

    let port = agent.port;
    // Keeps the port while the agent is away (connects are refused), so nobody else takes it.
    let hold = HeldPort::shared(port);
    conn.close();
    drop(agent);
    let delays = wait_retries(&balancer, 4);
    assert!(
        delays.iter().all(|&d| d <= BACKOFF_MAX_MS),
        "nothing above the cap: {delays:?}"
    );
    eventually("reconnect attempts to be counted", || {
        balancer
            .metric("balancer_agent_reconnects_total")
            .unwrap_or(0.0)
            >= 3.0
    });
    assert_eq!(who(&balancer), "B");

    let agent = Agent::on(rebind(port));
    drop(hold);
    let mut conn = agent.accept();
    balancer.wait_log_count("connected to deployment agent", 2);
    eventually("the agent gauge to rise", || {
        balancer.metric("balancer_agent_connected") == Some(1.0)
    });
    assert_eq!(conn.push(&server_set(&[(c.addr, 1.0)])), applied(3, 1));
    all_from(&balancer, 20, "C");
}

// ---------------------------------------------------------------------------------------------
// Propagation delay (a measurement, not a test): run with
//   cargo test --release --test agent -- --ignored --nocapture propagation

/// Pushes 10,000-server sets to a two-shard balancer and prints the propagation delay the
/// balancer logs for each (arrival on the agent thread to the last shard's acknowledgement),
/// and the agent's round trip (send to acknowledgement received).
#[test]
#[ignore = "a measurement; run with --release --ignored --nocapture"]
fn propagation_of_10000_server_sets() {
    const PUSHES: u64 = 15;
    let (balancer, _agent, mut conn) = with_agent(None, &[("BALANCER_CPUS", "0-1")]);
    let sets: Vec<String> = (0..2)
        .map(|variant| {
            let entries: Vec<String> = (0..10_000)
                .map(|i| {
                    let addr = SocketAddr::from(([10, 1, (i >> 8) as u8, i as u8], 8080));
                    format!(
                        r#"{{"host":"{}","port":{},"score":{}}}"#,
                        addr.ip(),
                        addr.port(),
                        1 + (i + variant) % 7
                    )
                })
                .collect();
            format!(r#"{{"servers":[{}]}}"#, entries.join(","))
        })
        .collect();
    let mut round_trips = Vec::new();
    for version in 1..=PUSHES {
        let started = Instant::now();
        let reply = conn.push(&sets[version as usize % 2]);
        round_trips.push(started.elapsed().as_micros() as u64);
        assert_eq!(reply, applied(version, 10_000));
    }
    // One row per push: propagation and its parts, as the balancer logged them.
    const FIELDS: [&str; 4] = ["propagation", "parse", "resolve", "shards"];
    let rows: Vec<[u64; 4]> = (1..=PUSHES)
        .map(|v| {
            let line = balancer.wait_log(&format!("applied server set version={v} servers=10000"));
            FIELDS.map(|field| {
                line.split(&format!(" {field}="))
                    .nth(1)
                    .and_then(|rest| rest.split("us").next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("a {field} figure: {line}"))
            })
        })
        .collect();
    let median = |mut v: Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    println!("servers=10000 shards=2 pushes={PUSHES} (microseconds)");
    for (i, field) in FIELDS.iter().enumerate() {
        let column: Vec<u64> = rows.iter().map(|row| row[i]).collect();
        let max = column.iter().max().copied().unwrap_or(0);
        println!(
            "{field:>12}: median={:>7} max={max:>7} all={column:?}",
            median(column.clone())
        );
    }
    println!(
        "  round trip: median={:>7} (agent send to ack received)",
        median(round_trips)
    );
}
