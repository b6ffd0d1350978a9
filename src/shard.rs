//! One glommio executor per CPU: its listener, its balancer, pool and cache, set updates and drain.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use futures_lite::AsyncReadExt;
use glommio::net::{TcpListener, UnixStream};
use glommio::{LocalExecutorBuilder, Placement};
use log::{debug, info, warn};

use crate::balancer::{Backend, Balancer, Pick};
use crate::buffers::{BufferPool, ListPool, BODY_BUFFER};
use crate::cache::flights::{Flights, MAX_PASS_MEMORY};
use crate::cache::{shard_capacity, Cache};
use crate::client::Pool;
use crate::config::Config;
use crate::http::{HeaderRange, MAX_HEADERS};
use crate::metrics::{BackendStats, ShardMetrics};
use crate::proxy::CLIENT_BUFFER;
use crate::signal::Signal;
use crate::splice::PipePool;
use crate::startup::{bind, bind_error, executor_error, Listener, StartupError};

/// Warnings about running out of descriptors come at most this often per shard.
const SHORTAGE_WARNING_PERIOD: Duration = Duration::from_secs(10);

/// How long in-flight requests may take to finish after a shutdown signal.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Memory glommio registers with io_uring per shard. It serves file DMA, which the balancer
/// does not do (sockets read into our own buffers), so the 64 KiB minimum keeps every shard
/// far below the default 8 MiB memlock limit.
pub(crate) const IO_MEMORY: usize = 64 * 1024;
/// Cap of the cache GC task's sleep: expired entries are gone within this period.
const CACHE_GC_INTERVAL: Duration = Duration::from_secs(5);
/// How often each shard recomputes its selection table (ends ejections) and sweeps its pool.
const REBUILD_INTERVAL: Duration = Duration::from_secs(1);

/// A server set broadcast to every shard.
#[derive(Debug)]
pub struct Update {
    pub version: u64,
    pub backends: Vec<Backend>,
}

pub enum ShardCommand {
    Apply(Arc<Update>),
    Shutdown,
}

/// The sending side of one shard's command channel, usable from any thread.
pub struct ShardHandle {
    tx: Sender<ShardCommand>,
    wake: StdUnixStream,
}

impl ShardHandle {
    /// Queues a command and wakes the shard at once (a byte on its socketpair), so shards
    /// never poll for updates.
    pub fn send(&self, command: ShardCommand) {
        if self.tx.send(command).is_ok() {
            // A full socket buffer means a wake-up is already pending: nothing is lost.
            let _ = (&self.wake).write(&[1]);
        }
    }

    pub fn try_clone(&self) -> io::Result<ShardHandle> {
        Ok(ShardHandle {
            tx: self.tx.clone(),
            wake: self.wake.try_clone()?,
        })
    }
}

/// A warning that can repeat many times a second (descriptors exhausted: every accept and
/// every connect fails): logged at most once per period, saying how many were not.
pub struct WarnEvery {
    period: Duration,
    last: Cell<Option<Instant>>,
    suppressed: Cell<u64>,
}

impl WarnEvery {
    pub fn new(period: Duration) -> Self {
        WarnEvery {
            period,
            last: Cell::new(None),
            suppressed: Cell::new(0),
        }
    }

    /// Calls `log` with the number of occurrences not logged since the last one, unless one
    /// was logged less than a period ago.
    pub fn warn(&self, log: impl FnOnce(u64)) {
        self.warn_at(Instant::now(), log);
    }

    fn warn_at(&self, now: Instant, log: impl FnOnce(u64)) {
        match self.last.get() {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                self.suppressed.set(self.suppressed.get() + 1);
            }
            _ => {
                log(self.suppressed.replace(0));
                self.last.set(Some(now));
            }
        }
    }
}

/// Everything one shard owns. Tasks share it through `Rc`; borrows never cross an `.await`.
pub struct Shard {
    pub id: usize,
    pub config: Arc<Config>,
    pub balancer: RefCell<Balancer>,
    /// Counters of the servers in `balancer`, in the same order.
    pub backend_stats: RefCell<Vec<Arc<BackendStats>>>,
    /// Counters of servers the latest sets removed, for as long as an exchange holds them.
    removed_stats: RefCell<Vec<Weak<BackendStats>>>,
    pub pool: RefCell<Pool>,
    pub cache: RefCell<Cache>,
    pub rng: RefCell<fastrand::Rng>,
    pub metrics: Arc<ShardMetrics>,
    pub shutdown: Signal,
    pub active_connections: Cell<usize>,
    /// Cache misses being fetched right now, and keys not worth waiting on (see `flights`).
    pub flights: RefCell<Flights>,
    /// Large buffers for streaming response bodies (see `buffers`).
    pub body_buffers: BufferPool,
    /// Receive buffers of client connections.
    pub client_buffers: BufferPool,
    /// Pipes for splicing large response bodies (see `splice`).
    pub pipes: PipePool,
    /// Requests as forwarded to a backend (head, plus a body small enough to replay); one
    /// grown by a large body is freed rather than kept.
    pub request_buffers: BufferPool,
    /// Field lists of request heads, one per client connection.
    pub field_lists: ListPool<HeaderRange>,
    /// Out of descriptors (or memory) on accept or connect: warned about every 10 s at most.
    pub shortage: WarnEvery,
}

impl Shard {
    /// Counts an answered request. `started` and the end are both read from the executor's
    /// turn clock, as NGINX times requests with the time it caches per event-loop turn: each
    /// reading of the real clock costs a request ~1 % of its CPU here, and the turn clock is
    /// off by at most one turn (microseconds) against buckets of half a millisecond and more.
    pub fn count_request(&self, status: u16, started: Instant) {
        let elapsed = glommio::timer::now().saturating_duration_since(started);
        self.metrics.record_request(status, elapsed);
    }

    /// The counters of a picked server, also for picks made before the latest set change.
    pub fn stats_for(&self, pick: &Pick) -> Option<Arc<BackendStats>> {
        let stats = self.backend_stats.borrow();
        if pick.generation == self.balancer.borrow().generation() {
            if let Some(s) = stats.get(pick.index) {
                return Some(s.clone());
            }
        }
        stats
            .iter()
            .find(|s| s.label == pick.backend.label)
            .cloned()
    }

    fn apply(&self, update: &Update) {
        let now = Instant::now();
        let retired = self
            .balancer
            .borrow_mut()
            .replace(update.backends.clone(), now);
        {
            let mut pool = self.pool.borrow_mut();
            for addr in retired {
                pool.close_idle(addr);
            }
        }
        // A server removed while requests to it were in flight, then added back before they
        // ended, keeps its counters: those requests still count in its `in_flight`.
        let mut old: HashMap<Arc<str>, Arc<BackendStats>> = self
            .removed_stats
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .chain(self.backend_stats.borrow().iter().cloned())
            .map(|s| (s.label.clone(), s))
            .collect();
        let stats: Vec<Arc<BackendStats>> = update
            .backends
            .iter()
            .map(|b| match old.remove(&b.label) {
                Some(s) => {
                    s.set_score(b.score);
                    s
                }
                None => Arc::new(BackendStats::new(b.label.clone(), b.score)),
            })
            .collect();
        // Alive only while an exchange still holds them.
        *self.removed_stats.borrow_mut() = old.values().map(Arc::downgrade).collect();
        self.metrics.set_backends(stats.clone());
        *self.backend_stats.borrow_mut() = stats;
        self.refresh_ejected();
        self.metrics.applied_version.set(update.version);
    }

    /// Publishes which servers are ejected on this shard (for `/servers` and the gauge).
    pub fn refresh_ejected(&self) {
        let balancer = self.balancer.borrow();
        for (i, s) in self.backend_stats.borrow().iter().enumerate() {
            s.ejected.store(balancer.is_ejected(i), Relaxed);
        }
    }
}

/// What `start` hands back for one running shard.
pub struct RunningShard {
    pub handle: ShardHandle,
    pub thread: std::thread::JoinHandle<()>,
    pub local_addr: SocketAddr,
    pub metrics: Arc<ShardMetrics>,
}

/// Starts one shard pinned to `cpu`, listening on `addr`, routing by `initial` until told
/// otherwise. Returns once its listener is bound (or with the reason it could not start).
pub fn start(
    id: usize,
    cpu: usize,
    addr: SocketAddr,
    config: Arc<Config>,
    initial: Arc<Update>,
    acks: Sender<(usize, u64)>,
) -> Result<RunningShard, StartupError> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (wake_tx, wake_rx) = StdUnixStream::pair().map_err(StartupError::Thread)?;
    wake_tx
        .set_nonblocking(true)
        .map_err(StartupError::Thread)?;
    let metrics = Arc::new(ShardMetrics::default());
    let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
    let thread_metrics = metrics.clone();
    let thread = std::thread::Builder::new()
        .name(format!("shard-{id}"))
        .spawn(move || {
            let executor = match LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("shard-{id}"))
                .io_memory(IO_MEMORY)
                .make()
            {
                Ok(ex) => ex,
                Err(e) => {
                    let _ = ready_tx.send(Err(executor_error(e)));
                    return;
                }
            };
            executor.run(async move {
                let listener = match bind(addr, config.defer_accept) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(bind_error(addr, Listener::Http, e)));
                        return;
                    }
                };
                let local = listener.local_addr().unwrap_or(addr);
                let shard = Rc::new(Shard {
                    id,
                    balancer: RefCell::new(Balancer::new(Vec::new(), Instant::now())),
                    backend_stats: RefCell::new(Vec::new()),
                    removed_stats: RefCell::new(Vec::new()),
                    pool: RefCell::new(Pool::default()),
                    cache: RefCell::new(Cache::new(shard_capacity(
                        config.cache_capacity,
                        config.cpus.len(),
                    ))),
                    rng: RefCell::new(fastrand::Rng::new()),
                    metrics: thread_metrics,
                    shutdown: Signal::default(),
                    active_connections: Cell::new(0),
                    flights: RefCell::new(Flights::new(config.cache_ttl.min(MAX_PASS_MEMORY))),
                    body_buffers: BufferPool::new(BODY_BUFFER, 32),
                    client_buffers: BufferPool::new(CLIENT_BUFFER, 256),
                    pipes: PipePool::default(),
                    request_buffers: BufferPool::new(4 * 1024, 256),
                    field_lists: ListPool::new(256, MAX_HEADERS),
                    shortage: WarnEvery::new(SHORTAGE_WARNING_PERIOD),
                    config,
                });
                shard.apply(&initial);
                let _ = ready_tx.send(Ok(local));
                run(shard, listener, wake_rx, rx, acks).await;
            });
        })
        .map_err(StartupError::Thread)?;
    match ready_rx.recv() {
        Ok(Ok(local_addr)) => Ok(RunningShard {
            handle: ShardHandle { tx, wake: wake_tx },
            thread,
            local_addr,
            metrics,
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(StartupError::IoUring(
                "the shard thread stopped during startup".into(),
            ))
        }
    }
}

async fn run(
    shard: Rc<Shard>,
    listener: TcpListener,
    wake: StdUnixStream,
    commands: Receiver<ShardCommand>,
    acks: Sender<(usize, u64)>,
) {
    glommio::spawn_local(watch_commands(shard.clone(), wake, commands, acks)).detach();
    glommio::spawn_local(rebuild_periodically(shard.clone())).detach();
    if shard.cache.borrow().capacity() > 0 {
        glommio::spawn_local(purge_cache_periodically(shard.clone())).detach();
    }

    loop {
        let accepted = shard
            .shutdown
            .unless_fired(listener.accept_with_peer())
            .await;
        match accepted {
            None => break,
            Some(Ok((stream, peer))) => spawn_connection(&shard, stream, peer),
            Some(Err(e)) => {
                // EMFILE and friends: back off briefly instead of spinning.
                shard.shortage.warn(|suppressed| {
                    warn!(
                        "accept failed on shard {}: {e} ({suppressed} more such failures since \
                         the last warning); raise the descriptor limit (LimitNOFILE, ulimit -n)",
                        shard.id
                    )
                });
                glommio::timer::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    // Connections that completed the handshake before the listener closes would be reset
    // with it: take them now and serve them like the rest.
    while let Some(Ok((stream, peer))) =
        futures_lite::future::poll_once(listener.accept_with_peer()).await
    {
        spawn_connection(&shard, stream, peer);
    }
    drop(listener);
    // The listener's readiness poll (io_uring) holds the socket open until the reactor has
    // cancelled it, which takes a turn of the executor loop; a shard with nothing to drain
    // would otherwise exit first and leave the socket listening, taking connections it never
    // accepts, until the kernel tears the ring down after the process is gone.
    glommio::timer::sleep(Duration::from_millis(1)).await;
    drain(&shard).await;
}

fn spawn_connection(shard: &Rc<Shard>, stream: glommio::net::TcpStream, peer: Option<SocketAddr>) {
    let peer = peer.or_else(|| stream.peer_addr().ok());
    // Counted before the task first runs, so a drain starting right now waits for it.
    shard
        .active_connections
        .set(shard.active_connections.get() + 1);
    let shard = shard.clone();
    glommio::spawn_local(async move {
        crate::proxy::serve(&shard, stream, peer).await;
        shard
            .active_connections
            .set(shard.active_connections.get() - 1);
    })
    .detach();
}

/// Lets in-flight requests finish (idle connections close as soon as they see the signal).
async fn drain(shard: &Shard) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while shard.active_connections.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    if shard.active_connections.get() > 0 {
        warn!(
            "shard {} stopping with {} connections still open after {}s",
            shard.id,
            shard.active_connections.get(),
            DRAIN_TIMEOUT.as_secs()
        );
    }
    shard.pool.borrow_mut().clear();
}

async fn watch_commands(
    shard: Rc<Shard>,
    wake: StdUnixStream,
    commands: Receiver<ShardCommand>,
    acks: Sender<(usize, u64)>,
) {
    let mut wake = match into_glommio(wake) {
        Ok(w) => w,
        Err(e) => {
            warn!("shard {} cannot watch for updates: {e}", shard.id);
            return;
        }
    };
    let mut buf = [0u8; 64];
    loop {
        while let Ok(command) = commands.try_recv() {
            match command {
                ShardCommand::Apply(update) => {
                    shard.apply(&update);
                    debug!(
                        "shard {} routes by version={} servers={}",
                        shard.id,
                        update.version,
                        update.backends.len()
                    );
                    let _ = acks.send((shard.id, update.version));
                }
                ShardCommand::Shutdown => {
                    info!("shard {} stops accepting and drains", shard.id);
                    shard.shutdown.fire();
                }
            }
        }
        match wake.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[allow(unsafe_code)]
fn into_glommio(stream: StdUnixStream) -> io::Result<UnixStream> {
    use std::os::fd::{FromRawFd, IntoRawFd};
    stream.set_nonblocking(true)?;
    // SAFETY: the descriptor comes from `into_raw_fd`, so ownership moves to the glommio stream
    // and nothing else closes it.
    Ok(unsafe { UnixStream::from_raw_fd(stream.into_raw_fd()) })
}

async fn rebuild_periodically(shard: Rc<Shard>) {
    while !shard.shutdown.is_fired() {
        glommio::timer::sleep(REBUILD_INTERVAL).await;
        let now = Instant::now();
        shard.balancer.borrow_mut().rebuild(now);
        shard.refresh_ejected();
        shard.pool.borrow_mut().sweep(now);
    }
}

async fn purge_cache_periodically(shard: Rc<Shard>) {
    while !shard.shutdown.is_fired() {
        let now = Instant::now();
        let next = shard.cache.borrow_mut().purge_expired(now);
        shard
            .metrics
            .cache_entries
            .set(shard.cache.borrow().len() as u64);
        let sleep = next
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or(CACHE_GC_INTERVAL)
            .clamp(Duration::from_millis(10), CACHE_GC_INTERVAL);
        glommio::timer::sleep(sleep).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An executor as a shard builds one, on whatever CPU the test thread runs.
    fn unpinned_executor() -> glommio::LocalExecutor {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(IO_MEMORY)
            .make()
            .expect("an executor for the test")
    }

    /// Deadlines are computed from glommio's turn clock (`glommio::timer::now`), so it must
    /// move on across every wait and never run ahead of the real clock, and a thread whose
    /// executor is gone must not keep its last reading.
    #[test]
    fn the_turn_clock_follows_the_real_clock_and_is_dropped_with_the_executor() {
        let nap = Duration::from_millis(30);
        std::thread::spawn(move || {
            let executor = unpinned_executor();
            executor.run(async move {
                let before = glommio::timer::now();
                assert!(before <= Instant::now());
                glommio::timer::sleep(nap).await;
                let after = glommio::timer::now();
                assert!(after >= before + nap, "read again after the sleep");
                assert!(after <= Instant::now());
            });
            drop(executor);
            let first = glommio::timer::now();
            std::thread::sleep(nap);
            assert!(glommio::timer::now() >= first + nap, "the real clock again");
        })
        .join()
        .expect("the turn clock holds its promises");
    }

    /// The kernel raises IORING_SQ_TASKRUN just after queueing task work, so the work can run
    /// (and the flag be cleared) in between, leaving the flag raised with nothing behind it
    /// until more task work comes. liburing's completion peek entered the kernel until the
    /// flag cleared, so a shard spun there for good once traffic stopped (seen in a load
    /// test: CPU at 100 %, no request answered). With the flag raised by hand, the executor
    /// must still get through its turns; a watchdog bounds the wait.
    #[test]
    fn a_stale_task_run_flag_does_not_stall_the_executor() {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let executor = unpinned_executor();
            executor.run(async move {
                for _ in 0..3 {
                    glommio::testing::raise_stale_task_run_flag();
                    glommio::timer::sleep(Duration::from_millis(2)).await;
                    glommio::executor().yield_now().await;
                }
            });
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(20))
            .expect("the executor finished its turns instead of spinning in the peek");
    }

    #[test]
    fn a_repeated_warning_is_logged_once_per_period_with_the_count_it_skipped() {
        let warning = WarnEvery::new(Duration::from_secs(10));
        let t = Instant::now();
        let logged = RefCell::new(Vec::new());
        for offset in [0, 1, 5, 9, 10, 11, 25] {
            warning.warn_at(t + Duration::from_secs(offset), |skipped| {
                logged.borrow_mut().push((offset, skipped))
            });
        }
        assert_eq!(*logged.borrow(), [(0, 0), (10, 3), (25, 1)]);
    }
}
