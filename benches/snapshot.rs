//! Benchmarks of applying a new server set: parsing a 10,000-server snapshot and swapping it in.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use balancer::balancer::{Backend, Balancer};
use balancer::queue::parse_snapshot;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const SERVERS: usize = 10_000;

fn snapshot_text(count: usize) -> String {
    let entries: Vec<String> = (0..count)
        .map(|i| {
            format!(
                r#"{{"host":"10.{}.{}.{}","port":{},"score":{}.5,"zone":"eu-west-1"}}"#,
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255,
                8000 + i % 100,
                i % 9
            )
        })
        .collect();
    format!(r#"{{"servers":[{}]}}"#, entries.join(","))
}

/// The backends a shard would build from the snapshot (IP hosts need no resolution).
fn backends(text: &str) -> Vec<Backend> {
    let set = parse_snapshot(text, 80).expect("the bench snapshot is valid");
    set.servers
        .iter()
        .map(|s| {
            let ip = s.host.parse().expect("the bench snapshot uses IP literals");
            Backend {
                label: s.label().into(),
                addr: SocketAddr::new(ip, s.port),
                score: s.score,
            }
        })
        .collect()
}

fn parse(c: &mut Criterion) {
    let text = snapshot_text(SERVERS);
    c.bench_function("parse_snapshot/10000", |b| {
        b.iter(|| parse_snapshot(black_box(&text), 80).map(|set| set.servers.len()))
    });
}

fn replace(c: &mut Criterion) {
    let next = backends(&snapshot_text(SERVERS));
    let mut balancer = Balancer::new(next.clone(), Instant::now());
    // `replace` rebuilds the table itself; the same servers every time, so every server's
    // health is looked up and carried over (the common case for a score change).
    c.bench_function("replace_and_rebuild/10000", |b| {
        b.iter_batched(
            || next.clone(),
            |set| balancer.replace(set, Instant::now()).len(),
            BatchSize::LargeInput,
        )
    });
}

criterion_group!(benches, parse, replace);
criterion_main!(benches);
