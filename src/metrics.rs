//! Per-shard counters written without locks by one shard, merged and rendered as Prometheus text.
//!
//! Each shard owns one [`ShardMetrics`] behind an `Arc`; only that shard writes it (relaxed
//! atomics, so an increment is a single uncontended instruction) and the admin thread reads
//! every shard's copy when it renders `/metrics`. Per-backend counters live in
//! [`BackendStats`], one per server per shard, created when a server set is applied.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds (seconds) of the request-duration histogram buckets.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Kinds of backend error, as the `kind` label of `balancer_backend_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect = 0,
    Reset = 1,
    Timeout = 2,
    BadResponse = 3,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 4] = [
        ErrorKind::Connect,
        ErrorKind::Reset,
        ErrorKind::Timeout,
        ErrorKind::BadResponse,
    ];

    /// The kind of an I/O error on an established backend connection: a timeout, or
    /// anything else, which the connection cannot recover from (a reset).
    pub fn of_io(err: &std::io::Error) -> ErrorKind {
        if err.kind() == std::io::ErrorKind::TimedOut {
            ErrorKind::Timeout
        } else {
            ErrorKind::Reset
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Reset => "reset",
            ErrorKind::Timeout => "timeout",
            ErrorKind::BadResponse => "bad_response",
        }
    }
}

/// A counter with a single writer: relaxed atomics keep it lock-free and readable elsewhere.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    pub fn set(&self, v: u64) {
        self.0.store(v, Relaxed);
    }
}

/// One server's counters on one shard.
#[derive(Debug)]
pub struct BackendStats {
    pub label: Arc<str>,
    pub requests: Counter,
    pub errors: [Counter; 4],
    pub in_flight: AtomicI64,
    pub ejected: AtomicBool,
    /// The server's current score as f64 bits (scores change without resetting counters).
    score_bits: AtomicU64,
}

impl BackendStats {
    pub fn new(label: Arc<str>, score: f64) -> Self {
        BackendStats {
            label,
            requests: Counter::default(),
            errors: Default::default(),
            in_flight: AtomicI64::new(0),
            ejected: AtomicBool::new(false),
            score_bits: AtomicU64::new(score.to_bits()),
        }
    }
    pub fn score(&self) -> f64 {
        f64::from_bits(self.score_bits.load(Relaxed))
    }
    pub fn set_score(&self, score: f64) {
        self.score_bits.store(score.to_bits(), Relaxed);
    }
    pub fn error(&self, kind: ErrorKind) {
        self.errors[kind as usize].inc();
    }
}

/// Everything one shard counts.
#[derive(Debug)]
pub struct ShardMetrics {
    /// Indexed by status code (100..=599); index 0 collects anything else.
    requests_by_code: Vec<Counter>,
    duration_buckets: [Counter; DURATION_BUCKETS.len()],
    duration_count: Counter,
    duration_sum_micros: Counter,
    pub upstream_created: Counter,
    pub upstream_reused: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_evictions: Counter,
    pub cache_entries: Counter,
    pub applied_version: Counter,
    /// The servers of the set this shard routes by; replaced (not mutated) on each new set,
    /// so the lock is taken only when a set is applied and when the admin renders.
    backends: Mutex<Vec<Arc<BackendStats>>>,
}

impl Default for ShardMetrics {
    fn default() -> Self {
        ShardMetrics {
            requests_by_code: (0..600).map(|_| Counter::default()).collect(),
            duration_buckets: Default::default(),
            duration_count: Counter::default(),
            duration_sum_micros: Counter::default(),
            upstream_created: Counter::default(),
            upstream_reused: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_evictions: Counter::default(),
            cache_entries: Counter::default(),
            applied_version: Counter::default(),
            backends: Mutex::new(Vec::new()),
        }
    }
}

impl ShardMetrics {
    /// Counts one answered request with its status and how long it took.
    pub fn record_request(&self, status: u16, elapsed: Duration) {
        let slot = if (100..600).contains(&status) {
            status as usize
        } else {
            0
        };
        self.requests_by_code[slot].inc();
        let secs = elapsed.as_secs_f64();
        if let Some(i) = DURATION_BUCKETS.iter().position(|b| secs <= *b) {
            self.duration_buckets[i].inc();
        }
        self.duration_count.inc();
        self.duration_sum_micros.add(elapsed.as_micros() as u64);
    }

    /// Installs the per-backend counters of a newly applied set.
    pub fn set_backends(&self, backends: Vec<Arc<BackendStats>>) {
        if let Ok(mut guard) = self.backends.lock() {
            *guard = backends;
        }
    }

    pub fn backends(&self) -> Vec<Arc<BackendStats>> {
        self.backends.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

/// Process-wide state kept by the agent thread.
#[derive(Debug, Default)]
pub struct GlobalMetrics {
    pub agent_connected: Counter,
    pub agent_reconnects: Counter,
    pub server_set_version: Counter,
}

/// One server's numbers merged over every shard (for `/servers` and the share gauges).
#[derive(Debug, Clone, PartialEq)]
pub struct MergedBackend {
    pub label: Arc<str>,
    pub score: f64,
    pub requests: u64,
    pub errors: [u64; 4],
    pub in_flight: i64,
    pub ejected_shards: usize,
}

/// Merges per-shard backend counters by label, in the order of the first shard's set.
pub fn merge_backends(shards: &[Arc<ShardMetrics>]) -> Vec<MergedBackend> {
    let mut merged: Vec<MergedBackend> = Vec::new();
    let mut index = std::collections::HashMap::<Arc<str>, usize>::new();
    for shard in shards {
        for b in shard.backends() {
            let i = *index.entry(b.label.clone()).or_insert_with(|| {
                merged.push(MergedBackend {
                    label: b.label.clone(),
                    score: b.score(),
                    requests: 0,
                    errors: [0; 4],
                    in_flight: 0,
                    ejected_shards: 0,
                });
                merged.len() - 1
            });
            let m = &mut merged[i];
            m.requests += b.requests.get();
            for (k, e) in b.errors.iter().enumerate() {
                m.errors[k] += e.get();
            }
            m.in_flight += b.in_flight.load(Relaxed).max(0);
            m.ejected_shards += usize::from(b.ejected.load(Relaxed));
        }
    }
    merged
}

/// Renders the Prometheus text exposition of every family SPEC §8 lists.
pub fn render(shards: &[Arc<ShardMetrics>], global: &GlobalMetrics) -> String {
    let mut out = String::with_capacity(4096);
    let sum = |f: &dyn Fn(&ShardMetrics) -> u64| shards.iter().map(|s| f(s)).sum::<u64>();

    family(
        &mut out,
        "balancer_requests_total",
        "counter",
        "Requests answered, by status code.",
    );
    for code in 100..600 {
        let n = sum(&|s| s.requests_by_code[code].get());
        if n > 0 {
            let _ = writeln!(out, "balancer_requests_total{{code=\"{code}\"}} {n}");
        }
    }

    family(
        &mut out,
        "balancer_request_duration_seconds",
        "histogram",
        "Time from a complete request head to the end of the response.",
    );
    let mut cumulative = 0;
    for (i, bound) in DURATION_BUCKETS.iter().enumerate() {
        cumulative += sum(&|s| s.duration_buckets[i].get());
        let _ = writeln!(
            out,
            "balancer_request_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}"
        );
    }
    let count = sum(&|s| s.duration_count.get());
    let _ = writeln!(
        out,
        "balancer_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
    );
    let micros = sum(&|s| s.duration_sum_micros.get());
    let _ = writeln!(
        out,
        "balancer_request_duration_seconds_sum {}",
        micros as f64 / 1e6
    );
    let _ = writeln!(out, "balancer_request_duration_seconds_count {count}");

    let backends = merge_backends(shards);
    family(
        &mut out,
        "balancer_backend_requests_total",
        "counter",
        "Requests sent to each backend.",
    );
    for b in &backends {
        let _ = writeln!(
            out,
            "balancer_backend_requests_total{{backend=\"{}\"}} {}",
            escape(&b.label),
            b.requests
        );
    }
    family(
        &mut out,
        "balancer_backend_errors_total",
        "counter",
        "Backend failures, by kind.",
    );
    for b in &backends {
        for kind in ErrorKind::ALL {
            let _ = writeln!(
                out,
                "balancer_backend_errors_total{{backend=\"{}\",kind=\"{}\"}} {}",
                escape(&b.label),
                kind.label(),
                b.errors[kind as usize]
            );
        }
    }

    let simple: [(&str, &str, &str, u64); 10] = [
        (
            "balancer_upstream_connections_created_total",
            "counter",
            "Backend connections opened.",
            sum(&|s| s.upstream_created.get()),
        ),
        (
            "balancer_upstream_connections_reused_total",
            "counter",
            "Requests sent on a pooled backend connection.",
            sum(&|s| s.upstream_reused.get()),
        ),
        (
            "balancer_cache_hits_total",
            "counter",
            "Requests answered from the cache.",
            sum(&|s| s.cache_hits.get()),
        ),
        (
            "balancer_cache_misses_total",
            "counter",
            "Cacheable requests not in the cache.",
            sum(&|s| s.cache_misses.get()),
        ),
        (
            "balancer_cache_evictions_total",
            "counter",
            "Entries evicted to make room.",
            sum(&|s| s.cache_evictions.get()),
        ),
        (
            "balancer_cache_entries",
            "gauge",
            "Entries in the cache.",
            sum(&|s| s.cache_entries.get()),
        ),
        (
            "balancer_agent_connected",
            "gauge",
            "1 while the deployment agent is connected.",
            global.agent_connected.get(),
        ),
        (
            "balancer_agent_reconnects_total",
            "counter",
            "Reconnect attempts to the deployment agent.",
            global.agent_reconnects.get(),
        ),
        (
            "balancer_server_set_version",
            "gauge",
            "Version of the server set in use.",
            global.server_set_version.get(),
        ),
        (
            "balancer_ejected_servers",
            "gauge",
            "Servers ejected on at least one shard.",
            backends.iter().filter(|b| b.ejected_shards > 0).count() as u64,
        ),
    ];
    for (name, kind, help, value) in simple {
        family(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }

    let total_requests: u64 = backends.iter().map(|b| b.requests).sum();
    family(
        &mut out,
        "balancer_backend_score_share",
        "gauge",
        "Share of traffic each backend's score asks for.",
    );
    let scores: Vec<f64> = backends.iter().map(|b| b.score).collect();
    for (b, share) in backends.iter().zip(score_shares(&scores)) {
        let _ = writeln!(
            out,
            "balancer_backend_score_share{{backend=\"{}\"}} {}",
            escape(&b.label),
            Sample(share)
        );
    }
    family(
        &mut out,
        "balancer_backend_traffic_share",
        "gauge",
        "Share of requests each backend received since it joined the set.",
    );
    for b in &backends {
        let share = if total_requests > 0 {
            b.requests as f64 / total_requests as f64
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "balancer_backend_traffic_share{{backend=\"{}\"}} {}",
            escape(&b.label),
            Sample(share)
        );
    }
    out
}

/// Each score's share of their sum. Scores are finite but may each be near `f64::MAX`, so
/// they are scaled by the largest first: their plain sum would overflow to infinity and
/// every share would read 0.
fn score_shares(scores: &[f64]) -> Vec<f64> {
    let largest = scores.iter().copied().fold(0.0, f64::max);
    if largest <= 0.0 {
        return vec![0.0; scores.len()];
    }
    let total: f64 = scores.iter().map(|s| s / largest).sum();
    scores.iter().map(|s| (s / largest) / total).collect()
}

/// A sample value in the exposition format: plain decimals for ordinary magnitudes, an
/// exponent for tiny or huge ones (Rust's `Display` never uses one, so a share of 1e-308
/// would print as 300-odd digits).
struct Sample(f64);

impl std::fmt::Display for Sample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let magnitude = self.0.abs();
        if magnitude == 0.0 || (1e-6..1e15).contains(&magnitude) {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{:e}", self.0)
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Label values escape backslash, double quote and newline (exposition format rules).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_io_error_is_a_timeout_or_a_reset() {
        use std::io::{Error, ErrorKind as Io};
        assert_eq!(
            ErrorKind::of_io(&Error::from(Io::TimedOut)),
            ErrorKind::Timeout
        );
        for other in [
            Io::ConnectionReset,
            Io::BrokenPipe,
            Io::UnexpectedEof,
            Io::Other,
        ] {
            assert_eq!(
                ErrorKind::of_io(&Error::from(other)),
                ErrorKind::Reset,
                "{other:?}"
            );
        }
    }

    #[test]
    fn request_counts_merge_over_shards_by_code() {
        let a = Arc::new(ShardMetrics::default());
        let b = Arc::new(ShardMetrics::default());
        a.record_request(200, Duration::from_millis(2));
        b.record_request(200, Duration::from_millis(3));
        b.record_request(503, Duration::from_micros(10));
        let text = render(&[a, b], &GlobalMetrics::default());
        assert!(text.contains("balancer_requests_total{code=\"200\"} 2\n"));
        assert!(text.contains("balancer_requests_total{code=\"503\"} 1\n"));
        assert!(text.contains("balancer_request_duration_seconds_count 3\n"));
        assert!(text.contains("balancer_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("balancer_request_duration_seconds_bucket{le=\"0.0025\"} 2\n"));
    }

    #[test]
    fn backends_merge_by_label_and_count_ejected_shards() {
        let label: Arc<str> = Arc::from("10.0.0.1:80");
        let shards: Vec<Arc<ShardMetrics>> =
            (0..2).map(|_| Arc::new(ShardMetrics::default())).collect();
        for (i, s) in shards.iter().enumerate() {
            let stats = Arc::new(BackendStats::new(label.clone(), 3.0));
            stats.requests.add(5);
            stats.error(ErrorKind::Timeout);
            stats.ejected.store(i == 0, Relaxed);
            s.set_backends(vec![stats]);
        }
        let merged = merge_backends(&shards);
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].requests, 10);
        assert_eq!(merged[0].errors[ErrorKind::Timeout as usize], 2);
        assert_eq!(merged[0].ejected_shards, 1);
        let text = render(&shards, &GlobalMetrics::default());
        assert!(text.contains("balancer_ejected_servers 1\n"));
        assert!(text.contains(
            "balancer_backend_errors_total{backend=\"10.0.0.1:80\",kind=\"timeout\"} 2\n"
        ));
        assert!(text.contains("balancer_backend_score_share{backend=\"10.0.0.1:80\"} 1\n"));
    }

    #[test]
    fn score_shares_survive_scores_whose_sum_overflows() {
        assert_eq!(score_shares(&[1e308, 1e308]), vec![0.5, 0.5]);
        assert_eq!(score_shares(&[3.0, 1.0]), vec![0.75, 0.25]);
        assert_eq!(score_shares(&[0.0, 0.0]), vec![0.0, 0.0]);
        assert_eq!(score_shares(&[]), Vec::<f64>::new());
        let tiny = score_shares(&[f64::MAX, 1.0]);
        assert_eq!(tiny[0], 1.0);
        assert!(tiny[1] > 0.0 && tiny[1] < 1e-300, "{tiny:?}");
    }

    #[test]
    fn samples_print_compactly_and_parse_back() {
        for (value, text) in [
            (0.0, "0"),
            (1.0, "1"),
            (0.25, "0.25"),
            (1e-308, "1e-308"),
            (5e-7, "5e-7"),
            (2e20, "2e20"),
        ] {
            let printed = Sample(value).to_string();
            assert_eq!(printed, text);
            assert_eq!(printed.parse::<f64>().ok(), Some(value));
        }
    }

    #[test]
    fn huge_scores_render_shares_that_add_up() {
        let shard = Arc::new(ShardMetrics::default());
        shard.set_backends(vec![
            Arc::new(BackendStats::new(Arc::from("a:80"), 1e308)),
            Arc::new(BackendStats::new(Arc::from("b:80"), 1e308)),
        ]);
        let text = render(&[shard], &GlobalMetrics::default());
        assert!(text.contains("balancer_backend_score_share{backend=\"a:80\"} 0.5\n"));
        assert!(text.contains("balancer_backend_score_share{backend=\"b:80\"} 0.5\n"));
    }

    #[test]
    fn every_sample_line_belongs_to_a_declared_family() {
        let s = Arc::new(ShardMetrics::default());
        s.record_request(200, Duration::from_millis(1));
        let text = render(&[s], &GlobalMetrics::default());
        let mut declared = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.push(rest.split(' ').next().unwrap_or("").to_string());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap_or("");
                let base = name
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count");
                assert!(
                    declared.iter().any(|d| d == name || d == base),
                    "undeclared sample {line}"
                );
                let value = line.rsplit(' ').next().unwrap_or("");
                assert!(value.parse::<f64>().is_ok(), "bad value in {line}");
            }
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
