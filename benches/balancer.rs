//! Benchmarks of server selection: `Balancer::pick` against a naive linear scan, and `rebuild`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use balancer::balancer::{Backend, Balancer};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

/// `count` servers with scores 1..=4 (plus a fraction, so no two sums tie).
fn backends(count: usize) -> Vec<Backend> {
    (0..count)
        .map(|i| {
            let addr = SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 80));
            Backend {
                label: addr.to_string().into(),
                addr,
                score: (i % 4) as f64 + 1.0 + (i % 7) as f64 / 10.0,
            }
        })
        .collect()
}

/// The baseline: cumulative weights scanned from the start, O(n) per pick.
struct Naive {
    cumulative: Vec<f64>,
}

impl Naive {
    fn new(backends: &[Backend]) -> Self {
        let mut total = 0.0;
        let cumulative = backends
            .iter()
            .map(|b| {
                total += b.score;
                total
            })
            .collect();
        Self { cumulative }
    }

    fn pick(&self, rng: &mut fastrand::Rng) -> Option<usize> {
        let point = rng.f64() * self.cumulative.last()?;
        self.cumulative.iter().position(|&c| c > point)
    }
}

fn pick(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for count in [10, 1_000, 10_000] {
        let servers = backends(count);
        let naive = Naive::new(&servers);
        let balancer = Balancer::new(servers, Instant::now());
        let mut rng = fastrand::Rng::with_seed(1);
        group.bench_with_input(BenchmarkId::new("balancer", count), &count, |b, _| {
            b.iter(|| balancer.pick(&mut rng, |_| true).map(|p| p.index))
        });
        group.bench_with_input(BenchmarkId::new("naive_linear", count), &count, |b, _| {
            b.iter(|| naive.pick(&mut rng))
        });
    }
    // A retry: the server tried first is excluded (usually a cheap second draw).
    let balancer = Balancer::new(backends(10_000), Instant::now());
    let tried = balancer.backends().nth(1234).map(|b| b.addr);
    let mut rng = fastrand::Rng::with_seed(2);
    group.bench_function(BenchmarkId::new("balancer_retry", 10_000), |b| {
        b.iter(|| {
            balancer
                .pick(&mut rng, |s| Some(s.addr) != tried)
                .map(|p| p.index)
        })
    });
    group.finish();
}

fn rebuild(c: &mut Criterion) {
    let mut balancer = Balancer::new(backends(10_000), Instant::now());
    c.bench_function("rebuild/10000", |b| {
        b.iter(|| balancer.rebuild(black_box(Instant::now())))
    });
}

criterion_group!(benches, pick, rebuild);
criterion_main!(benches);
