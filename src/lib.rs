//! balancer — a thread-per-core HTTP/1.1 load balancer for dedicated Linux hosts with io_uring.
//!
//! # Architecture
//!
//! One process, four kinds of thread:
//!
//! - **Shards** (`shard`): one glommio executor pinned to each CPU of `BALANCER_CPUS`. Every
//!   shard binds its own `SO_REUSEPORT` listener on the same port, so the kernel spreads
//!   connections over them, and owns everything a request touches: its copy of the
//!   `balancer::Balancer` (selection table and passive health), its `client::Pool` of backend
//!   connections, its `cache::Cache` and its `metrics::ShardMetrics`. The request path
//!   (`proxy`, `lookup`, `exchange`, `relay`) takes no lock and never talks to another shard.
//! - **The agent thread** (`socket`): a blocking tungstenite client to the deployment agent.
//!   Each text message is validated (`queue`), resolved (`resolve`) and broadcast to every
//!   shard over a crossbeam channel plus a one-byte wake-up on a socketpair, so a shard
//!   applies a new set within microseconds without polling. Shards acknowledge on a second
//!   channel; the agent is answered `{"applied": V}` once every shard routes by set V.
//! - **The admin thread** (`admin`): `/metrics`, `/servers` and `/healthz` on 127.0.0.1,
//!   reading the shards' relaxed atomics.
//! - **The main thread** (`main.rs`): parses `config`, starts everything, waits for
//!   SIGTERM/SIGINT and drains.
//!
//! Pure modules (`config`, `queue`, `balancer`, `backoff`, `http`, `body`, `cache`,
//! `metrics`, `buffers`) take time and randomness as parameters and do no I/O; glue modules
//! (`shard`, `proxy`, `lookup`, `exchange`, `relay`, `client`, `stream`, `splice`, `socket`,
//! `admin`, `resolve`, `startup`) do I/O and hold no policy; `signal` is the shard's
//! shutdown broadcast. A shard's I/O buffers (`buffers`) are pooled last-in first-out, so
//! the request path reuses memory still in the CPU cache instead of allocating per request.
#![deny(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod balancer;
pub mod body;
pub mod buffers;
pub mod cache;
pub mod client;
pub mod config;
pub mod exchange;
pub mod http;
pub mod lookup;
pub mod metrics;
pub mod proxy;
pub mod queue;
pub mod relay;
pub mod resolve;
pub mod shard;
pub mod signal;
pub mod socket;
pub mod splice;
pub mod startup;
pub mod stream;
