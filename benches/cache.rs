//! Cache benches: hit lookup and insert-with-eviction, S3-FIFO against the plain-LRU baseline.

use std::hint::black_box;
use std::rc::Rc;
use std::time::{Duration, Instant};

use balancer::cache::lru_baseline::Lru;
use balancer::cache::{Cache, CacheKey, CachedResponse, Lookup};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

const HOST: &[u8] = b"static.example.com";
const SIZES: [usize; 2] = [1_000, 100_000];
const TTL: Duration = Duration::from_secs(3600);

fn targets(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| format!("/assets/{i:08}/app.js?v=3").into_bytes())
        .collect()
}

fn response(body: &Rc<[u8]>, now: Instant) -> CachedResponse {
    CachedResponse::new(200, Vec::new(), Rc::clone(body), now, TTL)
}

/// Every lookup hits: the cache holds exactly the keys being read.
fn get_hit(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache_get_hit");
    let now = Instant::now();
    let body: Rc<[u8]> = Rc::from(&b"body"[..]);
    for n in SIZES {
        let keys = targets(n);
        let mut cache = Cache::new(n);
        let mut lru = Lru::new(n);
        for target in &keys {
            cache.insert(HOST, target, None, false, response(&body, now), now);
            lru.insert(CacheKey::new(HOST, target), Rc::new(response(&body, now)));
        }
        group.bench_function(BenchmarkId::new("s3fifo", n), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % n;
                let hit = cache.get(HOST, &keys[i], None, now);
                assert!(matches!(hit, Lookup::Hit(_)), "prefilled key missed");
                black_box(hit)
            })
        });
        group.bench_function(BenchmarkId::new("lru", n), |b| {
            let mut i = 0;
            b.iter(|| {
                i = (i + 1) % n;
                let hit = lru.get(&CacheKey::new(HOST, &keys[i])).cloned();
                assert!(hit.is_some(), "prefilled key missed");
                black_box(hit)
            })
        });
    }
    group.finish();
}

/// A full cache takes new keys from a pool four times its size: every insert evicts.
fn insert_evict(c: &mut Criterion) {
    let mut group = c.benchmark_group("cache_insert_evict");
    let now = Instant::now();
    let body: Rc<[u8]> = Rc::from(&b"body"[..]);
    for n in SIZES {
        let pool = targets(4 * n);
        let mut cache = Cache::new(n);
        let mut lru = Lru::new(n);
        for target in &pool[..n] {
            cache.insert(HOST, target, None, false, response(&body, now), now);
            lru.insert(CacheKey::new(HOST, target), Rc::new(response(&body, now)));
        }
        group.bench_function(BenchmarkId::new("s3fifo", n), |b| {
            let mut i = n;
            b.iter(|| {
                i = (i + 1) % pool.len();
                cache.insert(HOST, &pool[i], None, false, response(&body, now), now);
            })
        });
        group.bench_function(BenchmarkId::new("lru", n), |b| {
            let mut i = n;
            b.iter(|| {
                i = (i + 1) % pool.len();
                lru.insert(CacheKey::new(HOST, &pool[i]), Rc::new(response(&body, now)));
            })
        });
        assert!(cache.len() <= n && lru.len() <= n);
    }
    group.finish();
}

criterion_group!(benches, get_hit, insert_evict);
criterion_main!(benches);
