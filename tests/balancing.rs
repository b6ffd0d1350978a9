//! Black-box balancing: score-proportional routing, draining, upstream connection reuse,
//! passive health (ejection) and panic mode (SPEC §5), and the `/servers` document (SPEC §8).

mod common;

use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use common::*;

fn servers_doc(lb: &Balancer) -> serde_json::Value {
    let (status, body) = lb.admin_get("/servers");
    assert_eq!(status, 200, "/servers answers 200; body: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/servers is JSON ({e}): {body}"))
}

/// The `/servers` entry for `addr`.
fn server_entry(doc: &serde_json::Value, addr: SocketAddr) -> serde_json::Value {
    doc["servers"]
        .as_array()
        .expect("servers is an array")
        .iter()
        .find(|s| s["port"].as_u64() == Some(u64::from(addr.port())))
        .unwrap_or_else(|| panic!("no /servers entry for {addr}: {doc}"))
        .clone()
}

#[test]
fn the_only_backend_receives_every_request() {
    let a = Backend::named("a");
    let lb = Balancer::serving(&[(a.addr, 1.0)]);
    for _ in 0..5 {
        let resp = get(lb.addr, "/only");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "a");
    }
    assert_eq!(a.requests(), 5);
    assert_eq!(
        a.last_seen().expect("the backend saw a request").target,
        "/only"
    );
}

#[test]
fn traffic_splits_in_proportion_to_scores() {
    let light = Backend::named("light");
    let heavy = Backend::named("heavy");
    let lb = Balancer::serving(&[(light.addr, 1.0), (heavy.addr, 3.0)]);
    let n = 2000;
    let counts = spread(lb.addr, n);
    let light_n = counts.get("light").copied().unwrap_or(0);
    let heavy_n = counts.get("heavy").copied().unwrap_or(0);
    assert_eq!(
        light_n + heavy_n,
        n,
        "every answer came from a backend: {counts:?}"
    );
    let share = light_n as f64 / n as f64;
    // Expected 0.25; the band is about five standard deviations wide on each side.
    assert!(
        (0.20..=0.30).contains(&share),
        "score 1 of 4 got share {share:.3} ({counts:?})"
    );
}

#[test]
fn a_server_with_score_zero_gets_no_requests() {
    let live = Backend::named("live");
    let draining = Backend::named("draining");
    let lb = Balancer::serving(&[(live.addr, 1.0), (draining.addr, 0.0)]);
    let counts = spread(lb.addr, 200);
    assert_eq!(counts.get("live").copied(), Some(200), "{counts:?}");
    assert_eq!(draining.requests(), 0);
}

#[test]
fn sequential_keep_alive_requests_reuse_upstream_connections() {
    let a = Backend::named("a");
    let lb = Balancer::serving(&[(a.addr, 1.0)]);
    let reused_metric = "balancer_upstream_connections_reused_total";
    let before = lb.metric(reused_metric).unwrap_or(0.0);
    let counts = spread(lb.addr, 200);
    assert_eq!(counts.get("a").copied(), Some(200));
    assert_eq!(a.requests(), 200);
    assert!(
        a.accepts() < 10,
        "200 sequential requests opened {} backend connections",
        a.accepts()
    );
    eventually("the reused-connections counter to count the reuses", || {
        lb.metric(reused_metric).unwrap_or(0.0) - before >= 190.0
    });
}

#[test]
fn a_stopped_backend_is_ejected_and_no_client_sees_an_error() {
    let healthy = Backend::named("healthy");
    let mut doomed = Backend::named("doomed");
    let lb = Balancer::serving(&[(healthy.addr, 1.0), (doomed.addr, 1.0)]);

    let warm = spread(lb.addr, 20);
    assert_eq!(warm.values().sum::<usize>(), 20);
    doomed.stop();
    // The backend's connection threads notice the stop within their 200 ms read timeout and
    // close; from then on its pooled connections are dead and new ones are refused.
    std::thread::sleep(Duration::from_millis(500));

    // Fresh client connections each time, so every request is a new routing decision.
    for i in 0..60 {
        let resp = get(lb.addr, &format!("/after-stop/{i}"));
        assert_eq!(
            resp.status,
            200,
            "request {i} after the stop: {}",
            resp.text()
        );
    }
    let doomed_before = doomed.requests();
    for i in 0..40 {
        let resp = get(lb.addr, &format!("/settled/{i}"));
        assert_eq!(
            resp.status,
            200,
            "request {i} once settled: {}",
            resp.text()
        );
        assert_eq!(resp.text(), "healthy");
    }
    assert_eq!(
        doomed.requests(),
        doomed_before,
        "the stopped backend served nothing more"
    );

    // A request each time: an ejection ends after 5 s, and only a failed request in the
    // probation that follows ejects the server again, so a slow check must keep traffic going.
    eventually(
        "/servers to show the refused server ejected on the one shard",
        || {
            let _ = get(lb.addr, "/poke");
            server_entry(&servers_doc(&lb), doomed.addr)["ejected_shards"].as_u64() == Some(1)
        },
    );
    let doc = servers_doc(&lb);
    assert_eq!(
        server_entry(&doc, healthy.addr)["ejected_shards"].as_u64(),
        Some(0),
        "{doc}"
    );
    let label = format!(
        "balancer_backend_errors_total{{backend=\"{}\",kind=\"connect\"}}",
        doomed.addr
    );
    let connect_errors = lb.metric(&label).unwrap_or(0.0);
    assert!(connect_errors >= 3.0, "{label} is {connect_errors}");
}

#[test]
fn with_every_backend_failing_requests_are_still_attempted() {
    let closing: Handler = Arc::new(|_| Reply::Close);
    let a = Backend::start(closing.clone());
    let b = Backend::start(closing);
    let lb = Balancer::serving(&[(a.addr, 1.0), (b.addr, 1.0)]);
    let attempts = || a.requests() + b.requests();

    // Enough failures to eject both servers (3 in a row each).
    for i in 0..6 {
        let resp = get(lb.addr, &format!("/eject/{i}"));
        assert_eq!(resp.status, 502, "request {i}: {}", resp.text());
    }
    let before = attempts();
    for i in 0..6 {
        let resp = get(lb.addr, &format!("/panic/{i}"));
        assert_eq!(
            resp.status,
            502,
            "panic mode attempts a backend instead of answering 503; request {i}: {}",
            resp.text()
        );
    }
    assert!(
        attempts() >= before + 6,
        "each request in panic mode reached a backend ({} -> {})",
        before,
        attempts()
    );
}

#[test]
fn in_panic_mode_the_first_success_ends_that_servers_ejection() {
    use std::sync::atomic::Ordering::Relaxed;
    let closing: Handler = Arc::new(|_| Reply::Close);
    let recovered = Arc::new(AtomicBool::new(false));
    let b_handler: Handler = {
        let recovered = recovered.clone();
        Arc::new(move |_| match recovered.load(Relaxed) {
            true => Reply::Bytes(ok(b"b")),
            false => Reply::Close,
        })
    };
    let a = Backend::start(closing);
    let b = Backend::start(b_handler);
    let lb = Balancer::serving(&[(a.addr, 1.0), (b.addr, 1.0)]);
    for i in 0..6 {
        assert_eq!(
            get(lb.addr, &format!("/eject/{i}")).status,
            502,
            "request {i}"
        );
    }
    assert_eq!(lb.metric("balancer_ejected_servers"), Some(2.0));

    // Panic mode routes to both; b answers again. Its first success (the request's own or a
    // retry's) must end b's ejection there and then, not when its 5 s run out.
    recovered.store(true, Relaxed);
    let first = get(lb.addr, "/first");
    assert_eq!(first.status, 200, "{}", first.text());
    let doc = servers_doc(&lb);
    assert_eq!(
        server_entry(&doc, b.addr)["ejected_shards"].as_u64(),
        Some(0),
        "{doc}"
    );
    assert_eq!(
        server_entry(&doc, a.addr)["ejected_shards"].as_u64(),
        Some(1),
        "{doc}"
    );
    assert_eq!(lb.metric("balancer_ejected_servers"), Some(1.0));
    // Panic mode is over: the still-ejected server gets nothing.
    let a_before = a.requests();
    for i in 0..20 {
        let resp = get(lb.addr, &format!("/after/{i}"));
        assert_eq!(
            (resp.status, resp.text()),
            (200, "b".to_owned()),
            "request {i}"
        );
    }
    assert_eq!(
        a.requests(),
        a_before,
        "no request reached the ejected server"
    );
}

/// A backend that answers each request on a connection only once `go` is set, and records
/// when the balancer closes a connection to it.
fn gated_backend(go: Arc<AtomicBool>, closed: Arc<AtomicUsize>) -> RawBackend {
    RawBackend::start(Arc::new(move |conn: TcpStream| {
        // Longer than `eventually` waits: only the balancer may end the connection in time.
        let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        let mut writer = conn;
        while read_request(&mut reader).is_some() {
            while !go.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            if writer.write_all(&ok(b"gated")).is_err() {
                return;
            }
        }
        closed.fetch_add(1, SeqCst);
    }))
}

#[test]
fn a_connection_busy_when_its_server_is_drained_is_closed_after_its_response() {
    for drained_by in ["score 0", "removal"] {
        let go = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicUsize::new(0));
        let old = gated_backend(go.clone(), closed.clone());
        let new = Backend::named("new");
        let agent = Agent::start();
        let port = agent.port_str();
        let lb = Balancer::start(&[("HOST_PORT_WS_DEPLOYMENT_AGENT", port.as_str())]);
        let mut conn = agent.accept();
        conn.push(&server_set(&[(old.addr, 1.0)]));

        let addr = lb.addr;
        let in_flight = std::thread::spawn(move || get(addr, "/slow"));
        eventually("the request to reach the old server", || {
            old.accepts.load(SeqCst) == 1
        });
        let next = match drained_by {
            "score 0" => server_set(&[(old.addr, 0.0), (new.addr, 1.0)]),
            _ => server_set(&[(new.addr, 1.0)]),
        };
        conn.push(&next);
        go.store(true, SeqCst);
        let resp = in_flight.join().expect("client thread");
        assert_eq!(
            (resp.status, resp.text()),
            (200, "gated".to_owned()),
            "{drained_by}"
        );
        // Its connection was not pooled: the balancer closes it as soon as the response is
        // through, not when the pool's idle timeout (30 s) runs out.
        eventually("the drained server's connection to be closed", || {
            closed.load(SeqCst) == 1
        });
        assert_eq!(get(lb.addr, "/next").text(), "new", "{drained_by}");
    }
}

#[test]
fn servers_document_lists_every_server_with_its_state() {
    let a = Backend::named("a");
    let b = Backend::named("b");
    let lb = Balancer::serving(&[(a.addr, 1.5), (b.addr, 0.0)]);
    assert_eq!(get(lb.addr, "/").status, 200);

    let doc = servers_doc(&lb);
    assert_eq!(
        doc["version"].as_u64(),
        Some(1),
        "a BACKENDS set is version 1: {doc}"
    );
    let servers = doc["servers"].as_array().expect("servers is an array");
    assert_eq!(servers.len(), 2, "{doc}");
    for (addr, score) in [(a.addr, 1.5), (b.addr, 0.0)] {
        let s = server_entry(&doc, addr);
        assert_eq!(s["host"].as_str(), Some("127.0.0.1"), "{s}");
        assert_eq!(s["port"].as_u64(), Some(u64::from(addr.port())), "{s}");
        assert_eq!(s["score"].as_f64(), Some(score), "{s}");
        assert_eq!(s["ejected_shards"].as_u64(), Some(0), "{s}");
        assert!(s["in_flight"].is_u64(), "in_flight is a count: {s}");
    }
    eventually("no request in flight once answered", || {
        let doc = servers_doc(&lb);
        server_entry(&doc, a.addr)["in_flight"].as_u64() == Some(0)
    });
}

#[test]
fn a_refused_server_is_reported_in_the_ejected_gauge() {
    let healthy = Backend::named("healthy");
    // Held (bound, not listening) for the whole test: refused, and nobody else's meanwhile.
    let dead = HeldPort::refusing();
    let lb = Balancer::serving(&[(healthy.addr, 1.0), (dead.addr, 1.0)]);
    for i in 0..30 {
        let resp = get(lb.addr, &format!("/probe/{i}"));
        assert_eq!(
            resp.status, 200,
            "connect failures are retried; request {i}"
        );
        assert_eq!(resp.text(), "healthy");
    }
    // A request each time: an ejection ends after 5 s, and only a failed request in the
    // probation that follows ejects the server again, so a slow check must keep traffic going.
    eventually(
        "balancer_ejected_servers to count the refused server",
        || {
            let _ = get(lb.addr, "/poke");
            lb.metric("balancer_ejected_servers") == Some(1.0)
        },
    );
}
