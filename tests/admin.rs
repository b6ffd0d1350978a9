//! The admin listener (SPEC §8): `/metrics` in the Prometheus text format with every family
//! the spec names, counters that move with traffic, `/servers`, `/healthz`, 404 elsewhere, and
//! a listener that exists only on 127.0.0.1 (or not at all with `ADMIN_PORT=off`).

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::*;

// ---------------------------------------------------------------------------------------------
// A strict reader of the Prometheus text exposition format (version 0.0.4)

#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

impl Sample {
    fn label(&self, name: &str) -> Option<&str> {
        self.labels.get(name).map(String::as_str)
    }
}

/// A parsed exposition: the declared type of each family and every sample in order.
#[derive(Debug)]
struct Exposition {
    types: HashMap<String, String>,
    samples: Vec<Sample>,
}

impl Exposition {
    /// The one sample with this name whose labels include all of `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut hits = self
            .samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)));
        let first = hits.next()?;
        assert!(hits.next().is_none(), "more than one {name}{labels:?}");
        Some(first.value)
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?}"))
    }

    fn samples_of(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }
}

fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses a sample value: a float, `+Inf`, `-Inf` or `NaN`.
fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if text
            .chars()
            .all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) =>
        {
            text.parse().ok()
        }
        _ => None,
    }
}

/// Parses `{a="x",b="y"}` at the start of `text`; returns the labels and the rest.
fn parse_labels<'a>(text: &'a str, line: &str) -> (BTreeMap<String, String>, &'a str) {
    let mut labels = BTreeMap::new();
    let mut rest = text.strip_prefix('{').expect("labels open with {");
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return (labels, after);
        }
        let eq = rest
            .find('=')
            .unwrap_or_else(|| panic!("label without '=': {line}"));
        let name = &rest[..eq];
        assert!(is_label_name(name), "bad label name {name:?}: {line}");
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .unwrap_or_else(|| panic!("label value not quoted: {line}"));
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => panic!("bad escape {other:?} in label value: {line}"),
                },
                Some((_, '\n')) | None => panic!("unterminated label value: {line}"),
                Some((_, c)) => value.push(c),
            }
        };
        assert!(
            labels.insert(name.to_string(), value).is_none(),
            "label {name} repeated: {line}"
        );
        rest = &rest[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else {
            assert!(rest.starts_with('}'), "labels not separated by ',': {line}");
        }
    }
}

/// The family a sample name belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> Option<&'a str> {
    if types.contains_key(name) {
        return Some(name);
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        matches!(
            types.get(base).map(String::as_str),
            Some("histogram" | "summary")
        )
        .then_some(base)
    })
}

/// Parses the whole text, panicking with the offending line on any departure from the format.
fn parse_exposition(text: &str) -> Exposition {
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps: HashSet<String> = HashSet::new();
    let mut samples = Vec::new();
    let mut finished_families: HashSet<String> = HashSet::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            match (words.next(), words.next(), words.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    assert!(is_metric_name(name), "bad metric name in {line}");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                        "unknown type in {line}"
                    );
                    assert!(
                        !samples
                            .iter()
                            .any(|s: &Sample| family_of(&s.name, &types) == Some(name)
                                || s.name == name),
                        "TYPE after samples of its family: {line}"
                    );
                    assert!(
                        types.insert(name.to_string(), kind.to_string()).is_none(),
                        "second TYPE line: {line}"
                    );
                }
                (Some("HELP"), Some(name), _) => {
                    assert!(is_metric_name(name), "bad metric name in {line}");
                    assert!(helps.insert(name.to_string()), "second HELP line: {line}");
                }
                _ => {} // any other comment
            }
            continue;
        }
        let name_end = line
            .find(['{', ' '])
            .unwrap_or_else(|| panic!("no value: {line}"));
        let name = &line[..name_end];
        assert!(is_metric_name(name), "bad metric name in {line}");
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..], line)
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let mut fields = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("value not separated by one space: {line}"))
            .split(' ');
        let value_text = fields.next().unwrap_or("");
        let value =
            parse_value(value_text).unwrap_or_else(|| panic!("bad value {value_text:?}: {line}"));
        if let Some(ts) = fields.next() {
            assert!(ts.parse::<i64>().is_ok(), "bad timestamp in {line}");
        }
        assert!(fields.next().is_none(), "trailing fields: {line}");
        let family = family_of(name, &types)
            .unwrap_or_else(|| panic!("sample without a declared # TYPE: {line}"))
            .to_string();
        if current.as_deref() != Some(family.as_str()) {
            assert!(
                !finished_families.contains(&family),
                "samples of {family} are not contiguous: {line}"
            );
            if let Some(previous) = current.replace(family.clone()) {
                finished_families.insert(previous);
            }
        }
        if types[&family] == "counter" {
            assert!(
                value >= 0.0 && value.is_finite(),
                "counter below zero or not finite: {line}"
            );
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    let exposition = Exposition { types, samples };
    check_histograms(&exposition);
    exposition
}

/// A histogram series' buckets as (upper bound, cumulative count).
type Buckets = Vec<(f64, f64)>;

/// Each histogram series: `le` buckets in increasing order with cumulative (non-decreasing)
/// counts, ending with `le="+Inf"` equal to `_count`, and a `_sum`.
fn check_histograms(e: &Exposition) {
    for (family, _) in e.types.iter().filter(|(_, kind)| *kind == "histogram") {
        let bucket_name = format!("{family}_bucket");
        let mut series: BTreeMap<Vec<(String, String)>, Buckets> = BTreeMap::new();
        for s in e.samples_of(&bucket_name) {
            let le = s
                .label("le")
                .unwrap_or_else(|| panic!("{bucket_name} without le"));
            let bound = parse_value(le).unwrap_or_else(|| panic!("bad le {le:?}"));
            let key: Vec<(String, String)> = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series.entry(key).or_default().push((bound, s.value));
        }
        assert!(!series.is_empty(), "histogram {family} has no buckets");
        for (key, buckets) in series {
            for pair in buckets.windows(2) {
                assert!(
                    pair[0].0 < pair[1].0,
                    "{family}{key:?}: le not increasing: {buckets:?}"
                );
                assert!(
                    pair[0].1 <= pair[1].1,
                    "{family}{key:?}: buckets not cumulative: {buckets:?}"
                );
            }
            let last = buckets.last().expect("at least one bucket");
            assert_eq!(
                last.0,
                f64::INFINITY,
                "{family}{key:?}: last bucket is not le=\"+Inf\""
            );
            let labels: Vec<(&str, &str)> =
                key.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let count = e.get(&format!("{family}_count"), &labels);
            assert_eq!(
                last.1, count,
                "{family}{key:?}: +Inf bucket differs from _count"
            );
            assert!(
                e.value(&format!("{family}_sum"), &labels).is_some(),
                "{family}{key:?}: no _sum"
            );
        }
    }
}

fn scrape(balancer: &Balancer) -> Exposition {
    let (status, text) = balancer.admin_get("/metrics");
    assert_eq!(status, 200);
    parse_exposition(&text)
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn label(addr: SocketAddr) -> String {
    format!("{}:{}", addr.ip(), addr.port())
}

/// Sends `n` GETs of `path` on one keep-alive connection; returns their statuses.
fn keep_alive_gets(addr: SocketAddr, path: &str, n: usize) -> Vec<u16> {
    let stream = connect(addr);
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    (0..n)
        .map(|_| {
            writer
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
                .unwrap();
            read_response(&mut reader, false)
                .expect("a response")
                .status
        })
        .collect()
}

/// Polls `/metrics` until `check` holds for the parsed exposition.
fn eventually_metrics(balancer: &Balancer, what: &str, check: impl Fn(&Exposition) -> bool) {
    eventually(what, || check(&scrape(balancer)));
}

// ---------------------------------------------------------------------------------------------
// /metrics

#[test]
fn metrics_follow_the_prometheus_text_format() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    keep_alive_gets(balancer.addr, "/x", 5);
    let admin = balancer.admin.expect("admin listener");
    let resp = request(
        admin,
        "GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("content-type")
            .is_some_and(|v| v.starts_with("text/plain")),
        "{:?}",
        resp.headers
    );
    let text = String::from_utf8(resp.body).expect("UTF-8 exposition");
    let exposition = parse_exposition(&text);
    assert!(!exposition.samples.is_empty());
}

#[test]
fn metrics_name_every_family_of_the_spec_with_its_type() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    keep_alive_gets(balancer.addr, "/x", 1);
    let e = scrape(&balancer);
    let spec = [
        ("balancer_requests_total", "counter"),
        ("balancer_request_duration_seconds", "histogram"),
        ("balancer_backend_requests_total", "counter"),
        ("balancer_backend_errors_total", "counter"),
        ("balancer_upstream_connections_created_total", "counter"),
        ("balancer_upstream_connections_reused_total", "counter"),
        ("balancer_cache_hits_total", "counter"),
        ("balancer_cache_misses_total", "counter"),
        ("balancer_cache_evictions_total", "counter"),
        ("balancer_cache_entries", "gauge"),
        ("balancer_agent_connected", "gauge"),
        ("balancer_agent_reconnects_total", "counter"),
        ("balancer_server_set_version", "gauge"),
        ("balancer_ejected_servers", "gauge"),
        ("balancer_backend_score_share", "gauge"),
        ("balancer_backend_traffic_share", "gauge"),
    ];
    for (name, kind) in spec {
        assert_eq!(
            e.types.get(name).map(String::as_str),
            Some(kind),
            "family {name}"
        );
    }
}

#[test]
fn metrics_carry_the_labels_of_the_spec() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    keep_alive_gets(balancer.addr, "/x", 1);
    let b = label(backend.addr);
    eventually_metrics(&balancer, "a code-labelled request count", |e| {
        e.value("balancer_requests_total", &[("code", "200")])
            .is_some()
    });
    let e = scrape(&balancer);
    for name in [
        "balancer_backend_requests_total",
        "balancer_backend_score_share",
        "balancer_backend_traffic_share",
    ] {
        assert!(
            e.value(name, &[("backend", &b)]).is_some(),
            "{name} for backend {b}"
        );
    }
    let kinds: HashSet<&str> = e
        .samples_of("balancer_backend_errors_total")
        .iter()
        .filter(|s| s.label("backend") == Some(b.as_str()))
        .filter_map(|s| s.label("kind"))
        .collect();
    assert_eq!(
        kinds,
        HashSet::from(["connect", "reset", "timeout", "bad_response"])
    );
    assert_eq!(
        e.get("balancer_server_set_version", &[]),
        1.0,
        "BACKENDS is version 1"
    );
    assert_eq!(
        e.get("balancer_agent_connected", &[]),
        0.0,
        "no agent configured"
    );
}

#[test]
fn requests_total_counts_answers_by_status_code() {
    let backend = Backend::start(Arc::new(|seen: &Seen| {
        if seen.target == "/missing" {
            Reply::Bytes(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec())
        } else {
            Reply::Bytes(ok(b"here"))
        }
    }));
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let before = scrape(&balancer);
    let ok_before = before
        .value("balancer_requests_total", &[("code", "200")])
        .unwrap_or(0.0);
    let missing_before = before
        .value("balancer_requests_total", &[("code", "404")])
        .unwrap_or(0.0);
    keep_alive_gets(balancer.addr, "/here", 3);
    keep_alive_gets(balancer.addr, "/missing", 2);
    eventually_metrics(&balancer, "3 more 200s and 2 more 404s", |e| {
        e.value("balancer_requests_total", &[("code", "200")]) == Some(ok_before + 3.0)
            && e.value("balancer_requests_total", &[("code", "404")]) == Some(missing_before + 2.0)
    });
}

#[test]
fn backend_requests_total_counts_requests_per_backend() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let b = label(backend.addr);
    let before = scrape(&balancer).get("balancer_backend_requests_total", &[("backend", &b)]);
    keep_alive_gets(balancer.addr, "/x", 7);
    eventually_metrics(&balancer, "7 more backend requests", |e| {
        e.get("balancer_backend_requests_total", &[("backend", &b)]) == before + 7.0
    });
}

#[test]
fn upstream_connections_are_counted_as_created_then_reused() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let before = scrape(&balancer);
    let created_before = before.get("balancer_upstream_connections_created_total", &[]);
    let reused_before = before.get("balancer_upstream_connections_reused_total", &[]);
    keep_alive_gets(balancer.addr, "/x", 10);
    let e = scrape(&balancer);
    let created = e.get("balancer_upstream_connections_created_total", &[]) - created_before;
    let reused = e.get("balancer_upstream_connections_reused_total", &[]) - reused_before;
    assert!(created >= 1.0, "created moved by {created}");
    assert!(reused >= 1.0, "reused moved by {reused}");
    assert!(
        created + reused >= 10.0,
        "every request used a created or reused connection"
    );
    assert_eq!(
        created,
        backend.accepts() as f64,
        "created counts the backend's accepts"
    );
}

#[test]
fn request_duration_histogram_counts_every_request() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let before = scrape(&balancer).get("balancer_request_duration_seconds_count", &[]);
    keep_alive_gets(balancer.addr, "/x", 6);
    eventually_metrics(&balancer, "6 more observations", |e| {
        e.get("balancer_request_duration_seconds_count", &[]) == before + 6.0
            && e.get(
                "balancer_request_duration_seconds_bucket",
                &[("le", "+Inf")],
            ) == before + 6.0
            && e.get("balancer_request_duration_seconds_sum", &[]) > 0.0
    });
}

#[test]
fn score_share_follows_the_scores() {
    let (a, b) = (Backend::named("a"), Backend::named("b"));
    let balancer = Balancer::serving(&[(a.addr, 1.0), (b.addr, 3.0)]);
    let e = scrape(&balancer);
    let share_a = e.get(
        "balancer_backend_score_share",
        &[("backend", &label(a.addr))],
    );
    let share_b = e.get(
        "balancer_backend_score_share",
        &[("backend", &label(b.addr))],
    );
    assert!((share_a - 0.25).abs() < 1e-9, "score share of a: {share_a}");
    assert!((share_b - 0.75).abs() < 1e-9, "score share of b: {share_b}");
}

#[test]
fn traffic_share_approaches_the_score_share_after_traffic() {
    let (a, b) = (Backend::named("a"), Backend::named("b"));
    let balancer = Balancer::serving(&[(a.addr, 1.0), (b.addr, 3.0)]);
    let statuses = keep_alive_gets(balancer.addr, "/x", 2000);
    assert!(statuses.iter().all(|s| *s == 200));
    let e = scrape(&balancer);
    let share_a = e.get(
        "balancer_backend_traffic_share",
        &[("backend", &label(a.addr))],
    );
    let share_b = e.get(
        "balancer_backend_traffic_share",
        &[("backend", &label(b.addr))],
    );
    // 2000 picks at p = 0.25: one standard deviation of the share is about 0.01.
    assert!(
        (share_a - 0.25).abs() < 0.05,
        "traffic share of a: {share_a}"
    );
    assert!(
        (share_b - 0.75).abs() < 0.05,
        "traffic share of b: {share_b}"
    );
    assert!((share_a + share_b - 1.0).abs() < 1e-9);
}

// ---------------------------------------------------------------------------------------------
// /servers, /healthz, other paths

#[test]
fn servers_lists_each_server_with_its_score_ejections_and_in_flight_count() {
    let (a, b) = (Backend::named("a"), Backend::named("b"));
    let balancer = Balancer::serving(&[(a.addr, 1.0), (b.addr, 3.5)]);
    let (status, body) = balancer.admin_get("/servers");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).expect("/servers is JSON");
    assert_eq!(doc["version"], 1);
    let servers = doc["servers"].as_array().expect("a servers array");
    assert_eq!(servers.len(), 2);
    for (entry, (addr, score)) in servers.iter().zip([(a.addr, 1.0), (b.addr, 3.5)]) {
        let fields: HashSet<&str> = entry
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            fields,
            HashSet::from(["host", "port", "score", "ejected_shards", "in_flight"]),
            "{entry}"
        );
        assert_eq!(entry["host"].as_str(), Some(addr.ip().to_string().as_str()));
        assert_eq!(entry["port"].as_u64(), Some(u64::from(addr.port())));
        assert_eq!(entry["score"].as_f64(), Some(score));
        assert_eq!(entry["ejected_shards"].as_u64(), Some(0));
        assert_eq!(entry["in_flight"].as_u64(), Some(0));
    }
}

#[test]
fn servers_shows_a_request_in_flight_while_the_backend_holds_it() {
    let (backend, release_tx) = held_backend();
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let in_flight = || {
        let (_, body) = balancer.admin_get("/servers");
        let doc: serde_json::Value = serde_json::from_str(&body).expect("/servers is JSON");
        doc["servers"][0]["in_flight"]
            .as_u64()
            .expect("in_flight is a number")
    };
    let addr = balancer.addr;
    let client = std::thread::spawn(move || get(addr, "/held"));
    eventually("in_flight to show the held request", || in_flight() == 1);
    release_tx.send(()).unwrap();
    assert_eq!(client.join().expect("client thread").text(), "held");
    eventually("in_flight to return to 0", || in_flight() == 0);
}

#[test]
fn healthz_answers_200_while_serving() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    assert_eq!(balancer.admin_get("/healthz").0, 200);
}

/// `GET path` on the admin listener, answered within `limit`: (status line, or the error).
/// Sends `raw` on a new admin connection and returns all it answers, up to its close.
fn admin_exchange(admin: SocketAddr, raw: &str) -> String {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut all = Vec::new();
    std::io::Read::read_to_end(&mut s, &mut all).unwrap();
    String::from_utf8_lossy(&all).into_owned()
}

fn admin_status_within(admin: SocketAddr, path: &str, limit: Duration) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&admin, limit).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(line.trim_end().to_string())
}

#[test]
fn slow_or_idle_admin_clients_never_delay_healthz() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let admin = balancer.admin.expect("admin listener");
    // Idle connections and one trickling a byte at a time: each used to hold the one admin
    // thread for its 2 s read timeout (or, trickling, for ever).
    let idle: Vec<TcpStream> = (0..5).map(|_| TcpStream::connect(admin).unwrap()).collect();
    let mut trickle = TcpStream::connect(admin).unwrap();
    trickle.write_all(b"GET /hea").unwrap();
    for _ in 0..3 {
        let answer = admin_status_within(admin, "/healthz", Duration::from_millis(1500));
        assert_eq!(answer.as_deref(), Ok("HTTP/1.1 200 OK"));
        trickle.write_all(b"l").unwrap();
    }
    // The trickler's head never completes: it is answered 408 within its deadline.
    trickle.set_read_timeout(Some(WAIT)).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(trickle).read_line(&mut line);
    assert!(line.starts_with("HTTP/1.1 408"), "{line:?}");
    drop(idle);
}

/// Opens the 32 admin connections the limit allows and waits until a 33rd is refused.
fn take_every_admin_slot(admin: SocketAddr) -> Vec<TcpStream> {
    let idle: Vec<TcpStream> = (0..32)
        .map(|_| TcpStream::connect(admin).unwrap())
        .collect();
    eventually("the 32 idle connections to be taken", || {
        admin_status_within(admin, "/healthz", Duration::from_secs(2)).as_deref()
            == Ok("HTTP/1.1 503 Service Unavailable")
    });
    idle
}

#[test]
fn admin_connections_beyond_the_limit_get_503_at_once() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let admin = balancer.admin.expect("admin listener");
    let idle = take_every_admin_slot(admin);
    drop(idle);
    eventually("healthz once they are gone", || {
        admin_status_within(admin, "/healthz", Duration::from_secs(2)).as_deref()
            == Ok("HTTP/1.1 200 OK")
    });
}

#[test]
fn every_admin_connection_beyond_the_limit_reads_its_whole_503() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let admin = balancer.admin.expect("admin listener");
    let idle = take_every_admin_slot(admin);
    // Requests sent at once and a moment after connecting: a request that reaches a socket the
    // refusal already closed (or that the refusal closes unread) draws a reset, which can
    // destroy the 503 before the client reads it.
    let mut failures = Vec::new();
    for i in 0..60 {
        let mut s = TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        if i % 2 == 1 {
            std::thread::sleep(Duration::from_millis(20));
        }
        // A HEAD gets the head alone, here as everywhere (RFC 9110 §9.3.2), also one with
        // more fields than the admin parses. Bare LFs and an empty line first: read as the
        // admin reads any request.
        let crowded = format!("HEAD /healthz HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(70));
        let (request, end) = match i % 5 {
            2 => ("HEAD /healthz HTTP/1.1\r\nHost: a\r\n\r\n", "close\r\n\r\n"),
            3 => ("\r\nHEAD /healthz HTTP/1.1\nHost: a\n\n", "close\r\n\r\n"),
            4 => (crowded.as_str(), "close\r\n\r\n"),
            _ => (
                "GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n",
                "\r\n\r\ntoo many admin connections\n",
            ),
        };
        let sent = s.write_all(request.as_bytes());
        let mut all = Vec::new();
        let read = std::io::Read::read_to_end(&mut s, &mut all);
        let text = String::from_utf8_lossy(&all);
        let whole = text.starts_with("HTTP/1.1 503 ") && text.ends_with(end);
        if sent.is_err() || read.is_err() || !whole {
            failures.push(format!("{i}: sent {sent:?}, read {read:?}: {text:?}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    drop(idle);
}

#[test]
fn a_bad_admin_head_request_gets_its_error_without_a_body() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let admin = balancer.admin.expect("admin listener");
    let crowded = format!("HEAD /healthz HTTP/1.1\r\n{}\r\n", "X-A: b\r\n".repeat(70));
    let text = admin_exchange(admin, &crowded);
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(
        text.ends_with("\r\n\r\n"),
        "a body followed the head: {text}"
    );
}

#[test]
fn admin_head_requests_get_the_head_alone() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let admin = balancer.admin.expect("admin listener");
    for path in ["/healthz", "/metrics", "/servers"] {
        let text = admin_exchange(admin, &format!("HEAD {path} HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{path}: {text}");
        assert!(
            text.ends_with("\r\n\r\n"),
            "{path}: a body followed the head: {text}"
        );
        assert!(
            !text.contains("Content-Length: 0\r\n"),
            "{path}: the GET's length"
        );
    }
}

#[test]
fn other_methods_get_405_with_the_allowed_ones() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    let admin = balancer.admin.expect("admin listener");
    for method in ["POST", "DELETE"] {
        let text = admin_exchange(
            admin,
            &format!("{method} /metrics HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n"),
        );
        assert!(text.starts_with("HTTP/1.1 405 "), "{method}: {text}");
        // RFC 9110 §15.5.6: a 405 MUST list the supported methods.
        assert!(
            text.contains("\r\nAllow: GET, HEAD\r\n"),
            "{method}: {text}"
        );
    }
}

#[test]
fn unknown_admin_path_is_404() {
    let backend = Backend::named("a");
    let balancer = Balancer::serving(&[(backend.addr, 1.0)]);
    assert_eq!(balancer.admin_get("/nope").0, 404);
    assert_eq!(balancer.admin_get("/metrics/extra").0, 404);
}

// ---------------------------------------------------------------------------------------------
// Where the admin listener exists

/// The machine's non-loopback addresses, from `hostname -I`.
fn non_loopback_addresses() -> Vec<IpAddr> {
    let Ok(out) = std::process::Command::new("hostname").arg("-I").output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|w| w.parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect()
}

#[test]
fn admin_listener_answers_only_on_loopback() {
    let backend = Backend::named("a");
    // The HTTP listener on every address shows that the machine's addresses are reachable.
    let balancer = Balancer::start(&[
        ("BACKENDS", &server_set(&[(backend.addr, 1.0)])),
        ("BALANCER_BIND", "0.0.0.0"),
    ]);
    let admin = balancer.admin.expect("admin listener");
    assert!(admin.ip().is_loopback(), "admin on {admin}");
    assert!(balancer
        .wait_log("admin on ")
        .contains("admin on 127.0.0.1:"));
    let addresses = non_loopback_addresses();
    if addresses.is_empty() {
        eprintln!("no non-loopback address on this machine: reachability from outside not checked");
        return;
    }
    for ip in addresses {
        if ip.is_ipv4() {
            let http = SocketAddr::new(ip, balancer.addr.port());
            let reached = TcpStream::connect_timeout(&http, Duration::from_secs(2));
            assert!(
                reached.is_ok(),
                "control: the HTTP listener is reachable on {http}"
            );
        }
        let outside = SocketAddr::new(ip, admin.port());
        let attempt = TcpStream::connect_timeout(&outside, Duration::from_secs(2));
        assert!(attempt.is_err(), "the admin listener answered on {outside}");
    }
}

#[test]
fn admin_port_off_starts_no_admin_listener() {
    let backend = Backend::named("a");
    let mut balancer = Balancer::start(&[
        ("BACKENDS", &server_set(&[(backend.addr, 1.0)])),
        ("ADMIN_PORT", "off"),
    ]);
    assert!(balancer.admin.is_none());
    assert_eq!(get(balancer.addr, "/x").status, 200);
    // Read the whole log of a finished process, so a late line cannot be missed.
    assert_eq!(balancer.signal_and_wait("TERM", WAIT), Some(0));
    balancer.wait_log("stopped");
    let log = balancer.log_text();
    assert!(!log.contains("admin on"), "log:\n{log}");
    assert!(
        log.contains("admin=off"),
        "the startup summary says so; log:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// The format reader itself refuses what it must (so the checks above are not vacuous)

#[test]
#[should_panic(expected = "without a declared # TYPE")]
fn format_reader_refuses_a_sample_without_a_type() {
    parse_exposition("# HELP x_total things\nx_total 1\n");
}

#[test]
#[should_panic(expected = "not cumulative")]
fn format_reader_refuses_a_histogram_that_is_not_cumulative() {
    parse_exposition(
        "# TYPE h histogram\nh_bucket{le=\"0.1\"} 3\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 3\nh_sum 1\nh_count 3\n",
    );
}

#[test]
#[should_panic(expected = "differs from _count")]
fn format_reader_refuses_an_inf_bucket_that_differs_from_count() {
    parse_exposition(
        "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 3\nh_sum 1\nh_count 4\n",
    );
}

#[test]
#[should_panic(expected = "not contiguous")]
fn format_reader_refuses_interleaved_families() {
    parse_exposition("# TYPE a gauge\n# TYPE b gauge\na 1\nb 2\na{x=\"y\"} 3\n");
}

#[test]
fn format_reader_accepts_escaped_labels_and_timestamps() {
    let e = parse_exposition(
        "# TYPE g gauge\ng{path=\"a\\\"b\\\\c\\nd\",k=\"v\",} -1.5e3 1700000000000\n",
    );
    assert_eq!(e.get("g", &[("path", "a\"b\\c\nd"), ("k", "v")]), -1500.0);
}
