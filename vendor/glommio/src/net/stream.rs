// Unless explicitly stated otherwise all files in this repository are licensed
// under the MIT/Apache-2.0 License, at your convenience
//
// This product includes software developed at Datadog (https://www.datadoghq.com/). Copyright 2020 Datadog, Inc.
//
use crate::{
    reactor::Reactor,
    sys::{self, Source, SourceType},
};
use futures_lite::ready;
use nix::sys::socket::MsgFlags;
use std::{
    cell::Cell,
    io,
    net::Shutdown,
    os::unix::io::{AsRawFd, FromRawFd, RawFd},
    rc::{Rc, Weak},
    task::{Context, Poll, RawWakerVTable, Waker},
    time::{Duration, Instant},
};

type Result<T> = crate::Result<T, ()>;

/// Root trait for socket stream receive buffer
pub trait RxBuf {
    fn read(&mut self, buf: &mut [u8]) -> usize;
    fn peek(&self, buf: &mut [u8]) -> usize;
    fn is_empty(&self) -> bool;
    fn as_bytes(&self) -> &[u8];
    fn consume(&mut self, amt: usize);
    fn buffer_size(&self) -> usize;
    fn handle_result(&mut self, result: usize);
    fn unfilled(&mut self) -> &mut [u8];
}

#[derive(Debug, Default)]
pub struct NonBuffered;

impl RxBuf for NonBuffered {
    fn read(&mut self, _buf: &mut [u8]) -> usize {
        0
    }

    fn peek(&self, _buf: &mut [u8]) -> usize {
        0
    }

    fn is_empty(&self) -> bool {
        true
    }

    fn as_bytes(&self) -> &[u8] {
        &[]
    }

    fn consume(&mut self, _amt: usize) {}

    fn buffer_size(&self) -> usize {
        0
    }

    fn handle_result(&mut self, _result: usize) {}

    fn unfilled(&mut self) -> &mut [u8] {
        &mut []
    }
}

/// Trait for receive buffer implementations
pub trait Buffered: RxBuf {}

/// Non-shared fixed sized receive buffer allocated
/// when buffered stream is created
#[derive(Debug)]
pub struct Preallocated {
    buf: Vec<u8>,
    head: usize,
    tail: usize,
    cap: usize,
}

impl Preallocated {
    const DEFAULT_BUFFER_SIZE: usize = 8192;

    /// Creates a fixed sized receive buffer
    pub fn new(size: usize) -> Self {
        Self {
            buf: vec![0; size],
            tail: 0,
            head: 0,
            cap: size,
        }
    }
}

impl Default for Preallocated {
    fn default() -> Self {
        Self::new(Self::DEFAULT_BUFFER_SIZE)
    }
}

impl Preallocated {
    fn len(&self) -> usize {
        self.tail - self.head
    }
}

impl Buffered for Preallocated {}

impl RxBuf for Preallocated {
    fn read(&mut self, buf: &mut [u8]) -> usize {
        let sz = std::cmp::min(self.len(), buf.len());
        if sz > 0 {
            buf[..sz].copy_from_slice(&self.buf[self.head..self.head + sz]);
            self.head += sz;
        }
        sz
    }

    fn peek(&self, buf: &mut [u8]) -> usize {
        let sz = std::cmp::min(self.len(), buf.len());
        if sz > 0 {
            buf[..sz].copy_from_slice(&self.buf[self.head..self.head + sz]);
        }
        sz
    }

    fn is_empty(&self) -> bool {
        self.head >= self.tail
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.head..self.tail]
    }

    fn consume(&mut self, amt: usize) {
        self.head += std::cmp::min(self.len(), amt);
    }

    fn buffer_size(&self) -> usize {
        self.cap
    }

    fn handle_result(&mut self, result: usize) {
        self.tail += result;
    }

    fn unfilled(&mut self) -> &mut [u8] {
        if self.len() == 0 {
            self.head = 0;
            self.tail = 0;
        }
        &mut self.buf[self.tail..]
    }
}

/// balancer patch: a lazily re-armed I/O timeout. glommio inserted a reactor timer each time a
/// read or write had to wait and removed it as soon as the wait ended: two ordered-map updates
/// per wait, on every keep-alive request. Here a timer stays armed after its wait ends, and a
/// later wait reuses it when it fires no later than that wait's own deadline; when it fires
/// early, `check` re-arms it for what is left of the wait. A connection busier than its timeout
/// therefore touches the timer map about once per timeout period instead of twice per wait.
/// A timer that fires between waits only wakes the last waiting task spuriously.
#[derive(Debug)]
struct Timeout {
    id: u64,
    timeout: Cell<Option<Duration>>,
    /// The deadline of the timer armed in the reactor, if one may still be armed.
    armed: Cell<Option<Instant>>,
    /// Identifies the waker the armed timer wakes (`Waker::data`, `Waker::vtable`).
    armed_waker: Cell<(*const (), *const RawWakerVTable)>,
    /// When the current wait started; `None` between waits.
    waiting_since: Cell<Option<Instant>>,
}

impl Timeout {
    fn new(id: u64) -> Self {
        Self {
            id,
            timeout: Cell::new(None),
            armed: Cell::new(None),
            armed_waker: Cell::new((std::ptr::null(), std::ptr::null())),
            waiting_since: Cell::new(None),
        }
    }

    fn get(&self) -> Option<Duration> {
        self.timeout.get()
    }

    fn set(&self, dur: Option<Duration>) -> Result<()> {
        if let Some(dur) = dur.as_ref() {
            if dur.as_nanos() == 0 {
                return Err(io::Error::from_raw_os_error(libc::EINVAL).into());
            }
        }
        self.timeout.set(dur);
        // balancer patch: a new timeout starts a new wait. A wait dropped unfinished (a read
        // raced against another future and cancelled) never reaches `end_wait`, and the next
        // wait would otherwise count its new timeout from the dropped one's start.
        self.waiting_since.set(None);
        Ok(())
    }

    /// The operation has to wait: make sure a timer wakes `waker` by this wait's deadline.
    fn maybe_set_timer(&self, reactor: &Reactor, waker: &Waker) {
        let Some(timeout) = self.timeout.get() else {
            return;
        };
        let started = match self.waiting_since.get() {
            Some(started) => started,
            None => {
                // The executor's turn clock: a timer that fired has a deadline before it,
                // which is what `still_armed` relies on.
                let now = crate::timer::now();
                self.waiting_since.set(Some(now));
                now
            }
        };
        let deadline = started + timeout;
        let fingerprint = (waker.data(), waker.vtable() as *const RawWakerVTable);
        match self.armed.get() {
            Some(armed) if armed <= deadline && self.still_armed(reactor, armed) => {
                if self.armed_waker.get() != fingerprint {
                    reactor.replace_timer_waker(self.id, armed, waker.clone());
                    self.armed_waker.set(fingerprint);
                }
            }
            _ => {
                reactor.insert_timer(self.id, deadline, waker.clone());
                self.armed.set(Some(deadline));
                self.armed_waker.set(fingerprint);
            }
        }
    }

    /// Whether the timer armed for `armed` has not fired yet.
    fn still_armed(&self, reactor: &Reactor, armed: Instant) -> bool {
        // Timers fire only once their deadline has passed; the clock read of the wait's start
        // usually proves that without a map lookup.
        matches!(self.waiting_since.get(), Some(started) if armed > started)
            || reactor.timer_exists(&(armed, self.id))
    }

    /// The wait is over; the armed timer, if any, is left for the next wait.
    fn end_wait(&self) {
        self.waiting_since.set(None);
    }

    /// Called when a waiting operation is polled again: fails it once its deadline has passed.
    fn check(&self, reactor: &Reactor) -> io::Result<()> {
        let (Some(armed), Some(started)) = (self.armed.get(), self.waiting_since.get()) else {
            return Ok(());
        };
        if reactor.timer_exists(&(armed, self.id)) {
            return Ok(());
        }
        reactor.remove_timer(self.id);
        self.armed.set(None);
        let expired = self
            .timeout
            .get()
            .is_some_and(|timeout| started.elapsed() >= timeout);
        if expired {
            self.waiting_since.set(None);
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "Operation timed out",
            ));
        }
        // Fired early (it was armed by an earlier wait): `maybe_set_timer` re-arms it.
        Ok(())
    }

    /// The stream is going away: leave nothing in the reactor.
    fn disarm(&self, reactor: &Reactor) {
        if self.armed.take().is_some() {
            reactor.remove_timer(self.id);
        }
    }
}

#[derive(Debug)]
pub(crate) struct NonBufferedStream<S> {
    reactor: Weak<Reactor>,
    stream: S,
    source_tx: Option<Source>,
    source_rx: Option<Source>,
    write_timeout: Timeout,
    read_timeout: Timeout,
    /// balancer patch: whether a read may find data (see `poll_read`).
    rx_ready: Cell<bool>,
    /// balancer patch: a poll completion reported a hang-up or an error (see `poll_read`).
    rx_hang_up: Cell<bool>,
}

impl<S: AsRawFd> NonBufferedStream<S> {
    fn init(&mut self) {
        let reactor = self.reactor.upgrade().unwrap();
        let stream_fd = self.stream.as_raw_fd();
        self.source_rx = Some(reactor.poll_read_ready(stream_fd));
    }

    pub(crate) fn try_peek(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        super::yolo_peek(self.stream.as_raw_fd(), buf)
    }

    pub(crate) async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        let source = self.reactor.upgrade().unwrap().recv(
            self.stream.as_raw_fd(),
            buf.len(),
            MsgFlags::MSG_PEEK,
        );

        let sz = source.collect_rw().await?;
        match source.extract_source_type() {
            SourceType::SockRecv(mut src) => {
                buf[0..sz].copy_from_slice(&src.take().unwrap().as_bytes()[0..sz]);
            }
            _ => unreachable!(),
        }
        Ok(sz)
    }

    /// balancer patch: reads are driven by a readiness flag instead of a fresh one-shot
    /// poll per wait. A read is attempted only while the socket may hold data (a full buffer
    /// last time, or a poll completion since); a short read means the socket was drained,
    /// so the next read waits without a recv(2) that would fail with EAGAIN. Anything that
    /// arrives after a completion was made wakes the poll again, so it cannot be missed.
    /// A hang-up or an error is different: it stays pending after a short read returns the
    /// data before it and wakes nobody again, so once a completion reports one, reads are
    /// attempted until recv(2) itself reports it.
    /// The poll armed when a stream is created is one-shot (a connection read once, then
    /// closed, never needs cancelling); any later wait arms a multishot poll that stays armed
    /// for the stream's life, so a keep-alive connection submits no io_uring operation per
    /// read at all.
    pub(crate) fn poll_read(
        &mut self,
        cx: &Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let fd = self.stream.as_raw_fd();
        let len = buf.len();
        self.poll_read_with(cx, len, || super::yolo_recv(fd, buf))
    }

    /// balancer patch: `poll_read` with another non-blocking system call in place of
    /// recv(2) (splice(2) into a pipe): `op` returns `None` when it would block, and moving
    /// fewer than `drained_below` bytes means the socket was drained (a short read). Readiness,
    /// timeout and hang-up handling are `poll_read`'s.
    pub(crate) fn poll_read_with(
        &mut self,
        cx: &Context<'_>,
        drained_below: usize,
        op: impl FnOnce() -> Option<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        self.absorb_poll_completion();

        if self.rx_ready.get() {
            if let Some(result) = op() {
                self.read_timeout.end_wait();
                let result = poll_err!(result);
                if result < drained_below {
                    self.assume_drained();
                }
                return Poll::Ready(Ok(result));
            }
            self.assume_drained();
        }

        let reactor = self.reactor.upgrade().unwrap();
        let reactor = reactor.as_ref();
        poll_err!(self.read_timeout.check(reactor));

        if self.source_rx.is_none() {
            self.source_rx = Some(reactor.poll_read_multishot(self.stream.as_raw_fd()));
        }

        let source = self.source_rx.as_ref().unwrap();
        source.add_waiter_single(cx.waker());
        self.read_timeout.maybe_set_timer(reactor, cx.waker());
        Poll::Pending
    }

    pub(crate) fn poll_write(&mut self, cx: &Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let fd = self.stream.as_raw_fd();
        self.poll_write_with(cx, || super::yolo_send(fd, buf))
    }

    /// balancer patch: takes in the read poll's latest completion, if any: the socket may now
    /// hold data, or a hang-up or an error.
    fn absorb_poll_completion(&mut self) {
        if let Some(source) = self.source_rx.as_ref() {
            if let Some(result) = source.take_result() {
                self.rx_ready.set(true);
                let hang_up = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
                if result.is_ok_and(|mask| mask as libc::c_short & hang_up != 0) {
                    self.rx_hang_up.set(true);
                }
            }
            if !source.is_armed() {
                // A one-shot poll completed, or the kernel ended a multishot one.
                self.source_rx = None;
            }
        }
    }

    /// balancer patch: the stream goes idle between exchanges (a pooled connection): makes
    /// sure a read poll stays armed, so that anything arriving before the next exchange (bytes
    /// nobody asked for, a hang-up) is reported to `may_have_input`.
    pub(crate) fn watch_while_idle(&mut self) {
        self.absorb_poll_completion();
        if self.source_rx.is_none() {
            if let Some(reactor) = self.reactor.upgrade() {
                self.source_rx = Some(reactor.poll_read_multishot(self.stream.as_raw_fd()));
            }
        }
    }

    /// balancer patch: whether a read may find something (bytes, a hang-up or an error)
    /// since the socket was last drained, as far as the read poll has reported; reads nothing.
    pub(crate) fn may_have_input(&mut self) -> bool {
        self.absorb_poll_completion();
        self.rx_ready.get()
    }

    /// balancer patch: the socket is drained (a short read or EAGAIN here, or the caller knows
    /// from its protocol that nothing more is due until it asks): the next read waits for a
    /// poll completion instead of trying a recv(2) first. Bytes that arrive later complete
    /// the poll as usual, and a pending hang-up still keeps reads going.
    pub(crate) fn assume_drained(&self) {
        if !self.rx_hang_up.get() {
            self.rx_ready.set(false);
        }
    }

    /// balancer patch: `poll_write` with another non-blocking system call in place of
    /// send(2) (splice(2) out of a pipe); `op` returns `None` when it would block.
    pub(crate) fn poll_write_with(
        &mut self,
        cx: &Context<'_>,
        op: impl FnOnce() -> Option<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        // On the write path, we always start with calling `op` (a `send`), because
        // it is very likely to success. It could be a waste if it already timed
        // out since the last `poll_write`, but it would not cost much more to
        // give it one last chance in this case.
        if let Some(result) = op() {
            self.write_timeout.end_wait();
            self.source_tx.take();
            return Poll::Ready(result);
        }

        let reactor = self.reactor.upgrade().unwrap();
        let reactor = reactor.as_ref();
        poll_err!(self.write_timeout.check(reactor));

        let no_pending_poll = self
            .source_tx
            .as_ref()
            .map(|src| src.result().is_some())
            .unwrap_or(true);

        if no_pending_poll {
            self.source_tx = Some(reactor.poll_write_ready(self.stream.as_raw_fd()));
        }

        let source = self.source_tx.as_ref().unwrap();
        source.add_waiter_single(cx.waker());
        self.write_timeout.maybe_set_timer(reactor, cx.waker());
        Poll::Pending
    }

    pub(crate) fn poll_close(&mut self, _: &Context<'_>) -> Poll<io::Result<()>> {
        self.source_tx.take();
        Poll::Ready(sys::shutdown(self.stream.as_raw_fd(), Shutdown::Write))
    }

    /// io_uring has support for shutdown now, but it is not in any released
    /// kernel. Even with my "let's use latest" policy it would be crazy to
    /// mandate a kernel that doesn't even exist. So in preparation for that
    /// we'll sync-emulate this but already on an async wrapper
    pub(crate) fn poll_shutdown(
        &self,
        _cx: &mut Context<'_>,
        how: Shutdown,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(sys::shutdown(self.stream.as_raw_fd(), how))
    }
}

/// balancer patch: timers are left armed between waits (see `Timeout`), so a stream removes
/// its own when it goes away.
impl<S> Drop for NonBufferedStream<S> {
    fn drop(&mut self) {
        if let Some(reactor) = self.reactor.upgrade() {
            self.read_timeout.disarm(&reactor);
            self.write_timeout.disarm(&reactor);
        }
    }
}

#[derive(Debug)]
pub(crate) struct GlommioStream<S, B> {
    stream: NonBufferedStream<S>,
    rx_buf: B,
    rx_done: Cell<bool>,
}

impl<S> From<socket2::Socket> for GlommioStream<S, NonBuffered>
where
    S: AsRawFd + From<socket2::Socket> + Unpin,
{
    fn from(socket: socket2::Socket) -> Self {
        GlommioStream::with_socket(socket, false)
    }
}

impl<S> GlommioStream<S, NonBuffered>
where
    S: AsRawFd + From<socket2::Socket>,
{
    /// balancer patch: `readable` for a socket that holds data already (accepted from a
    /// listener with `TCP_DEFER_ACCEPT`): its first read is a recv(2) straight away, with no
    /// poll armed first; should it find nothing, it arms one then. Otherwise a poll is armed
    /// now, for the first read.
    fn with_socket(socket: socket2::Socket, readable: bool) -> Self {
        let reactor = crate::executor().reactor();
        let mut stream = NonBufferedStream {
            reactor: Rc::downgrade(&reactor),
            stream: socket.into(),
            source_tx: None,
            source_rx: None,
            write_timeout: Timeout::new(reactor.register_timer()),
            read_timeout: Timeout::new(reactor.register_timer()),
            rx_ready: Cell::new(readable),
            rx_hang_up: Cell::new(false),
        };
        if !readable {
            stream.init();
        }
        GlommioStream {
            stream,
            rx_buf: NonBuffered,
            rx_done: Cell::new(false),
        }
    }
}

impl<S: AsRawFd> AsRawFd for GlommioStream<S, NonBuffered> {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.stream.as_raw_fd()
    }
}

impl<S> FromRawFd for GlommioStream<S, NonBuffered>
where
    S: AsRawFd + FromRawFd + From<socket2::Socket> + Unpin,
{
    unsafe fn from_raw_fd(fd: RawFd) -> Self {
        let socket = socket2::Socket::from_raw_fd(fd);
        GlommioStream::from(socket)
    }
}

impl<S> GlommioStream<S, NonBuffered>
where
    S: AsRawFd + FromRawFd + From<socket2::Socket> + Unpin,
{
    /// balancer patch: a stream whose socket holds data already (see `with_socket`).
    pub(crate) unsafe fn from_raw_fd_readable(fd: RawFd) -> Self {
        GlommioStream::with_socket(socket2::Socket::from_raw_fd(fd), true)
    }
}

impl<S> GlommioStream<S, NonBuffered> {
    pub(crate) fn buffered_with<B: Buffered>(self, rx_buf: B) -> GlommioStream<S, B> {
        GlommioStream {
            stream: self.stream,
            rx_buf,
            rx_done: self.rx_done,
        }
    }
}

impl<S: AsRawFd, B: RxBuf> GlommioStream<S, B> {
    /// Receives data on the socket from the remote address to which it is
    /// connected, without removing that data from the queue.
    ///
    /// On success, returns the number of bytes peeked.
    /// Successive calls return the same data. This is accomplished by passing
    /// `MSG_PEEK` as a flag to the underlying `recv` system call.
    pub(crate) async fn peek(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut pos = self.rx_buf.peek(buf);
        if pos < buf.len() && !self.rx_done.get() {
            if let Some(result) = self.stream.try_peek(&mut buf[pos..]) {
                match result {
                    Err(e) => return Err(e),
                    Ok(len) => {
                        pos += len;
                        if len == 0 {
                            self.rx_done.set(true);
                        }
                    }
                }
            }
        }
        if pos > 0 || self.rx_done.get() {
            return Ok(pos);
        }
        self.stream.peek(buf).await
    }

    pub(crate) fn poll_read(
        &mut self,
        cx: &Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if self.rx_buf.is_empty() {
            if buf.len() >= self.rx_buf.buffer_size() {
                return self.stream.poll_read(cx, buf);
            }
            if !self.rx_done.get() {
                poll_err!(ready!(self.poll_replenish_buffer(cx)));
            }
        }
        Poll::Ready(Ok(self.rx_buf.read(buf)))
    }

    fn poll_replenish_buffer(&mut self, cx: &Context<'_>) -> Poll<io::Result<usize>> {
        let result = poll_err!(ready!(self.stream.poll_read(cx, self.rx_buf.unfilled())));
        self.rx_buf.handle_result(result);
        if result == 0 {
            self.rx_done.set(true);
        }
        Poll::Ready(Ok(result))
    }

    pub(crate) fn poll_write(&mut self, cx: &Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.stream.poll_write(cx, buf)
    }

    /// balancer patch: see `NonBufferedStream::poll_read_with`. Bytes already in the
    /// receive buffer would be skipped, so it must be empty.
    pub(crate) fn poll_read_with(
        &mut self,
        cx: &Context<'_>,
        drained_below: usize,
        op: impl FnOnce() -> Option<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if !self.rx_buf.is_empty() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffered bytes would be skipped",
            )));
        }
        self.stream.poll_read_with(cx, drained_below, op)
    }

    /// balancer patch: see `NonBufferedStream::assume_drained`.
    pub(crate) fn assume_drained(&self) {
        self.stream.assume_drained();
    }

    /// balancer patch: see `NonBufferedStream::watch_while_idle`.
    pub(crate) fn watch_while_idle(&mut self) {
        self.stream.watch_while_idle();
    }

    /// balancer patch: see `NonBufferedStream::may_have_input`; bytes already in the receive
    /// buffer count as input.
    pub(crate) fn may_have_input(&mut self) -> bool {
        !self.rx_buf.is_empty() || self.stream.may_have_input()
    }

    /// balancer patch: see `NonBufferedStream::poll_write_with`.
    pub(crate) fn poll_write_with(
        &mut self,
        cx: &Context<'_>,
        op: impl FnOnce() -> Option<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        self.stream.poll_write_with(cx, op)
    }

    pub(crate) fn poll_flush(&self, _cx: &Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    pub(crate) fn poll_close(&mut self, cx: &Context<'_>) -> Poll<io::Result<()>> {
        self.stream.poll_close(cx)
    }

    pub(crate) fn poll_shutdown(
        &self,
        cx: &mut Context<'_>,
        how: Shutdown,
    ) -> Poll<io::Result<()>> {
        self.stream.poll_shutdown(cx, how)
    }

    pub(crate) fn set_write_timeout(&self, dur: Option<Duration>) -> Result<()> {
        self.stream.write_timeout.set(dur)
    }

    pub(crate) fn set_read_timeout(&self, dur: Option<Duration>) -> Result<()> {
        self.stream.read_timeout.set(dur)
    }

    pub(crate) fn write_timeout(&self) -> Option<Duration> {
        self.stream.write_timeout.get()
    }

    pub(crate) fn read_timeout(&self) -> Option<Duration> {
        self.stream.read_timeout.get()
    }

    pub(crate) fn stream(&self) -> &S {
        &self.stream.stream
    }
}

impl<S: AsRawFd, B: Buffered> GlommioStream<S, B> {
    pub(crate) fn poll_fill_buf(&mut self, cx: &Context<'_>) -> Poll<io::Result<&[u8]>> {
        if self.rx_buf.is_empty() {
            poll_err!(ready!(self.poll_replenish_buffer(cx)));
        }
        Poll::Ready(Ok(self.rx_buf.as_bytes()))
    }

    pub(crate) fn consume(&mut self, amt: usize) {
        self.rx_buf.consume(amt);
    }
}
