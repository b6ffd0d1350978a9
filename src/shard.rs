//! One glommio executor per CPU: its listener, its balancer, pool and cache, set updates and drain.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use futures_lite::AsyncReadExt;
use glommio::net::{TcpListener, UnixStream};
use glommio::{LocalExecutorBuilder, Placement};
use log::{debug, info, warn};

use crate::balancer::{Backend, Balancer, Pick};
use crate::buffers::{BufferPool, BODY_BUFFER};
use crate::cache::flights::{Flights, MAX_PASS_MEMORY};
use crate::cache::{shard_capacity, Cache};
use crate::client::Pool;
use crate::config::Config;
use crate::metrics::{BackendStats, ShardMetrics};
use crate::proxy::CLIENT_BUFFER;
use crate::splice::PipePool;

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

/// Which of the process's listeners a startup error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Http,
    Admin,
}

/// Why a shard could not start; each message says what to do.
#[derive(Debug)]
pub enum StartupError {
    PortInUse(SocketAddr, Listener),
    Bind(SocketAddr, io::Error),
    MemlockTooLow(u64),
    IoUring(String),
    Thread(io::Error),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::PortInUse(addr, listener) => {
                let (what, variable) = match listener {
                    Listener::Http => ("", "HOST_PORT_HTTP_BALANCER"),
                    Listener::Admin => (" (admin listener)", "ADMIN_PORT (or ADMIN_PORT=off)"),
                };
                write!(
                    f,
                    "cannot listen on {addr}{what}: the port is already in use by another program; stop it or choose another port with {variable} (BALANCER_REUSE_PORT=on shares a port only with another balancer that set it too, for a seamless restart)"
                )
            }
            StartupError::Bind(addr, e) => match e.raw_os_error() {
                Some(libc::EADDRNOTAVAIL) => write!(
                    f,
                    "cannot listen on {addr}: no network interface of this host has that address; set BALANCER_BIND to one of its addresses, or 0.0.0.0 for all of them"
                ),
                Some(libc::EACCES) => write!(
                    f,
                    "cannot listen on {addr}: ports below 1024 need root or CAP_NET_BIND_SERVICE (setcap cap_net_bind_service=+ep on the binary, or AmbientCapabilities=CAP_NET_BIND_SERVICE in the systemd unit); or choose a port from 1024 up"
                ),
                _ => write!(f, "cannot listen on {addr}: {e}"),
            },
            StartupError::MemlockTooLow(limit) => write!(
                f,
                "the memlock limit is too low ({limit} bytes; io_uring needs at least 524288): raise it with `ulimit -l 8192`, LimitMEMLOCK=8M in the systemd unit, or memlock in /etc/security/limits.conf"
            ),
            StartupError::IoUring(e) => write!(
                f,
                "io_uring is unavailable ({e}): run on Linux 5.13 or newer with io_uring enabled (sysctl kernel.io_uring_disabled=0) and not blocked by seccomp"
            ),
            StartupError::Thread(e) => write!(f, "cannot start a shard thread: {e}"),
        }
    }
}

/// One-shot broadcast inside a shard: shutdown wakes the accept loop and idle connections.
/// Every keep-alive wait registers here, so waiters live in a slab (a slot index each, reused
/// through a free list) rather than a hash map.
#[derive(Default)]
pub struct Signal {
    fired: Cell<bool>,
    waiters: RefCell<Vec<Option<Waker>>>,
    free_slots: RefCell<Vec<usize>>,
}

impl Signal {
    pub fn fire(&self) {
        self.fired.set(true);
        let wakers: Vec<Waker> = self
            .waiters
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in wakers {
            w.wake();
        }
    }
    pub fn is_fired(&self) -> bool {
        self.fired.get()
    }
    /// A future that completes once the signal fires.
    pub fn wait(&self) -> SignalWait<'_> {
        SignalWait {
            signal: self,
            slot: None,
        }
    }

    /// Runs `work` until it completes (`Some`) or the signal fires first (`None`).
    pub async fn unless_fired<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        futures_lite::future::or(async { Some(work.await) }, async {
            self.wait().await;
            None
        })
        .await
    }
    /// Waiters currently registered.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.waiters.borrow().iter().filter(|w| w.is_some()).count()
    }
}

pub struct SignalWait<'a> {
    signal: &'a Signal,
    slot: Option<usize>,
}

impl Future for SignalWait<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.signal.fired.get() {
            return Poll::Ready(());
        }
        let mut waiters = self.signal.waiters.borrow_mut();
        let slot = match self.slot {
            Some(slot) => slot,
            None => match self.signal.free_slots.borrow_mut().pop() {
                Some(slot) => slot,
                None => {
                    waiters.push(None);
                    waiters.len() - 1
                }
            },
        };
        match &mut waiters[slot] {
            Some(w) if w.will_wake(cx.waker()) => {}
            entry => *entry = Some(cx.waker().clone()),
        }
        drop(waiters);
        self.slot = Some(slot);
        Poll::Pending
    }
}

impl Drop for SignalWait<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            if let (Ok(mut waiters), Ok(mut free)) = (
                self.signal.waiters.try_borrow_mut(),
                self.signal.free_slots.try_borrow_mut(),
            ) {
                waiters[slot] = None;
                free.push(slot);
            }
        }
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
        let old: HashMap<Arc<str>, Arc<BackendStats>> = self
            .backend_stats
            .borrow()
            .iter()
            .map(|s| (s.label.clone(), s.clone()))
            .collect();
        let stats: Vec<Arc<BackendStats>> = update
            .backends
            .iter()
            .map(|b| match old.get(&b.label) {
                Some(s) => {
                    s.set_score(b.score);
                    s.clone()
                }
                None => Arc::new(BackendStats::new(b.label.clone(), b.score)),
            })
            .collect();
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
                let listener = match bind(addr) {
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

/// The shard's listener: `SO_REUSEPORT` so every shard (and a successor process during a
/// restart) shares the port, and `SO_REUSEADDR` so the sockets this process leaves in
/// TIME_WAIT do not block whoever binds the port next.
#[allow(unsafe_code)]
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::{FromRawFd, IntoRawFd};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    // Non-blocking: the (patched) glommio listener then accepts with one accept(2) per
    // connection and polls only when the queue is empty.
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it, which saves a setsockopt(2) per connection.
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    // Accepted sockets also inherit delayed acknowledgements: the kernel then acknowledges
    // a new connection's first request with the response instead of in a segment of its own
    // (HAProxy's tcp-smart-accept); without a response within 40 ms it acknowledges anyway.
    // After listen(2), which resets the acknowledgement state.
    socket.set_quickack(false)?;
    // SAFETY: `into_raw_fd` hands over sole ownership of a listening socket descriptor.
    Ok(unsafe { TcpListener::from_raw_fd(socket.into_raw_fd()) })
}

/// Fails with `PortInUse` when any other socket listens on `addr`, `SO_REUSEPORT` or not:
/// the shards' own listeners share their port with whoever else set that option (a second
/// balancer started by mistake would silently take a share of the traffic), so without
/// `BALANCER_REUSE_PORT=on` the port is first bound alone, then released for them.
pub fn ensure_port_free(addr: SocketAddr, listener: Listener) -> Result<(), StartupError> {
    use socket2::{Domain, Socket, Type};
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .map_err(|e| StartupError::Bind(addr, e))?;
    // As the real listeners: TIME_WAIT leftovers of an earlier process are no conflict.
    probe
        .set_reuse_address(true)
        .map_err(|e| StartupError::Bind(addr, e))?;
    probe
        .bind(&addr.into())
        .map_err(|e| bind_error(addr, listener, e))
}

pub fn bind_error(addr: SocketAddr, listener: Listener, e: io::Error) -> StartupError {
    if e.kind() == io::ErrorKind::AddrInUse {
        StartupError::PortInUse(addr, listener)
    } else {
        StartupError::Bind(addr, e)
    }
}

/// Sets up (and closes) a one-entry io_uring. glommio panics, inside a lazily built probe of
/// the kernel's operations, when the kernel refuses io_uring (no support, `sysctl
/// kernel.io_uring_disabled`, a seccomp profile such as Docker's default), and the process
/// would abort with that message; asked first, the refusal becomes `StartupError::IoUring`.
#[allow(unsafe_code)]
pub fn check_io_uring() -> Result<(), StartupError> {
    // struct io_uring_params: 120 bytes the kernel reads and fills in; zero asks for defaults.
    let mut params = [0u64; 15];
    // SAFETY: io_uring_setup(2) reads and writes the 120 bytes of `params`, which outlive the
    // call, and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(StartupError::IoUring(format!("io_uring_setup: {e}")));
    }
    // SAFETY: `fd` is the descriptor io_uring_setup just returned; nothing else holds it.
    unsafe { libc::close(fd as libc::c_int) };
    Ok(())
}

fn executor_error(e: glommio::GlommioError<()>) -> StartupError {
    match e {
        glommio::GlommioError::ReactorError(glommio::ReactorErrorKind::MemLockLimit(limit, _)) => {
            StartupError::MemlockTooLow(limit)
        }
        other => StartupError::IoUring(other.to_string()),
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
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;

    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn poll(wait: &mut SignalWait<'_>, waker: &Waker) -> Poll<()> {
        Pin::new(wait).poll(&mut Context::from_waker(waker))
    }

    #[test]
    fn fire_wakes_every_pending_waiter_once_and_later_waits_complete_at_once() {
        let signal = Signal::default();
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut a = signal.wait();
        let mut b = signal.wait();
        assert!(poll(&mut a, &waker).is_pending());
        assert!(poll(&mut b, &waker).is_pending());
        assert!(
            poll(&mut a, &waker).is_pending(),
            "a re-poll keeps one registration"
        );
        assert_eq!(signal.waiting(), 2);
        signal.fire();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
        assert!(poll(&mut a, &waker).is_ready());
        assert!(poll(&mut signal.wait(), &waker).is_ready());
    }

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

    #[test]
    fn dropped_waiters_free_their_slot_for_the_next_one() {
        let signal = Signal::default();
        let waker = Waker::noop();
        for _ in 0..1000 {
            let mut w = signal.wait();
            assert!(poll(&mut w, waker).is_pending());
            assert_eq!(signal.waiting(), 1);
        }
        assert_eq!(signal.waiting(), 0);
        assert_eq!(
            signal.waiters.borrow().len(),
            1,
            "one slot, reused 1000 times"
        );
    }
}
