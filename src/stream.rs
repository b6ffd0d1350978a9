//! A glommio TCP stream with its own reusable receive buffer, and a two-way byte tunnel.

use std::io;
use std::os::unix::io::AsRawFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;

/// A connection and the bytes read from it but not yet consumed: `buf[start..end]`.
pub struct Conn {
    pub stream: TcpStream,
    pub buf: Vec<u8>,
    pub start: usize,
    pub end: usize,
    /// The socket was made non-blocking for splice(2) (`make_spliceable`).
    spliceable: bool,
}

impl Conn {
    pub fn new(stream: TcpStream, capacity: usize) -> Self {
        Self::with_buffer(stream, vec![0; capacity])
    }

    /// A connection reading into `buf` (its length is the initial capacity).
    pub fn with_buffer(stream: TcpStream, buf: Vec<u8>) -> Self {
        Conn {
            stream,
            buf,
            start: 0,
            end: 0,
            spliceable: false,
        }
    }

    /// Readies the socket for `splice::splice_exact` (once per connection).
    pub fn make_spliceable(&mut self) -> io::Result<()> {
        if !self.spliceable {
            crate::splice::set_nonblocking(&self.stream)?;
            self.spliceable = true;
        }
        Ok(())
    }

    /// The receive buffer, for reuse once the connection is done.
    pub fn into_buffer(self) -> Vec<u8> {
        self.buf
    }

    /// Hands the receive buffer back while the connection idles with nothing pending, so that
    /// thousands of idle keep-alive connections hold no buffers; `restore_buffer` before the
    /// next read.
    pub fn release_buffer(&mut self) -> Vec<u8> {
        debug_assert!(!self.has_pending());
        self.clear();
        std::mem::take(&mut self.buf)
    }

    /// Gives a released connection a receive buffer again (its length is the capacity).
    pub fn restore_buffer(&mut self, buf: Vec<u8>) {
        debug_assert!(self.buf.is_empty() && !buf.is_empty());
        self.buf = buf;
    }

    /// Waits, under the read timeout, until the socket holds a byte, an end of stream or an
    /// error; reads nothing (a one-byte peek once the read poll reports it).
    pub async fn readable(&mut self) -> io::Result<()> {
        futures_lite::future::poll_fn(|cx| self.stream.poll_read_with(cx, 0, peek))
            .await
            .map(|_| ())
    }

    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Whether the buffer holds unconsumed bytes up to its end, with no room for more.
    pub fn is_full(&self) -> bool {
        self.start == 0 && self.end == self.buf.len()
    }

    /// Doubles a full buffer, up to `max_capacity`; false when it is that large already.
    pub fn grow(&mut self, max_capacity: usize) -> bool {
        if self.buf.len() >= max_capacity {
            return false;
        }
        let grown = (self.buf.len() * 2).clamp(1, max_capacity);
        self.buf.resize(grown, 0);
        true
    }

    pub fn has_pending(&self) -> bool {
        self.start < self.end
    }

    pub fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Drops every pending byte.
    pub fn clear(&mut self) {
        self.start = 0;
        self.end = 0;
    }

    /// Reads more bytes after the pending ones, growing the buffer (up to `max_capacity`) only
    /// when the pending bytes already fill it. `Ok(0)` means the peer closed.
    pub async fn fill(&mut self, max_capacity: usize) -> io::Result<usize> {
        self.fill_at_most(max_capacity, usize::MAX).await
    }

    /// `fill`, taking at most `limit` (> 0) bytes from the socket: whatever is behind them is
    /// left there for the caller to move some other way (splice).
    pub async fn fill_at_most(&mut self, max_capacity: usize, limit: usize) -> io::Result<usize> {
        debug_assert!(!self.buf.is_empty(), "read into a released buffer");
        if self.end == self.buf.len() && !self.compact() && !self.grow(max_capacity) {
            return Err(io::Error::other("receive buffer full"));
        }
        let stop = self.end.saturating_add(limit.max(1)).min(self.buf.len());
        let n = self.stream.read(&mut self.buf[self.end..stop]).await?;
        self.end += n;
        Ok(n)
    }

    /// Moves the pending bytes to the front of the buffer; false when they already start there
    /// (so only growing would make room).
    fn compact(&mut self) -> bool {
        if self.start == 0 {
            return false;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        true
    }

    /// An idle keep-alive connection's state between exchanges: keeps a read poll armed so
    /// that `arrived_while_idle` can tell whether anything came in meanwhile.
    pub fn go_idle(&mut self) {
        self.stream.watch_while_idle();
    }

    /// Whether anything arrived on this idle connection since its last exchange: bytes
    /// nobody asked for (a late or unsolicited response, a server's 408 before it closes), an
    /// end of stream or an error. Such a connection is out of step with its peer and must not
    /// carry another exchange. Costs a recv(2) only when the read poll has reported something
    /// since the connection was last drained.
    pub fn arrived_while_idle(&mut self) -> bool {
        self.has_pending() || !matches!(self.take_reported_input(), Ok(None))
    }

    /// Reads (without waiting) whatever arrived since the socket was last drained, when its
    /// read poll has reported anything; no system call otherwise. `Ok(None)`: nothing came,
    /// and the socket counts as drained again, so a stale report costs one recv(2), not one
    /// per call. `Ok(Some(0))`: the peer closed.
    pub fn take_reported_input(&mut self) -> io::Result<Option<usize>> {
        if !self.stream.may_have_input() {
            return Ok(None);
        }
        let had_room = self.end < self.buf.len() || self.start > 0;
        let got = self.try_fill()?;
        if got.is_none() && had_room {
            // A completion for bytes that were read already: nothing new.
            self.stream.assume_drained();
        }
        Ok(got)
    }

    /// Reads whatever the socket holds right now (at most `max` bytes) straight into `dst`'s
    /// spare room, without waiting and without going through this connection's buffer (which
    /// must be empty, or bytes would be reordered). `Ok(None)`: nothing ready; `Ok(Some(0))`:
    /// the peer closed.
    #[allow(unsafe_code)]
    pub fn try_read_into(&self, dst: &mut Vec<u8>, max: usize) -> io::Result<Option<usize>> {
        debug_assert!(!self.has_pending());
        dst.reserve(max);
        let spare = &mut dst.spare_capacity_mut()[..max];
        let got = recv_now(&self.stream, spare.as_mut_ptr().cast(), max)?;
        if let Some(n) = got {
            // SAFETY: the kernel initialised the first `n` bytes of the spare room.
            unsafe { dst.set_len(dst.len() + n) };
        }
        Ok(got)
    }

    /// Like `fill`, but only takes what the socket holds right now (`Ok(None)`: nothing ready,
    /// or the buffer is full).
    pub fn try_fill(&mut self) -> io::Result<Option<usize>> {
        if self.end == self.buf.len() && !self.compact() {
            return Ok(None);
        }
        let room = &mut self.buf[self.end..];
        let got = recv_now(&self.stream, room.as_mut_ptr(), room.len())?;
        self.end += got.unwrap_or(0);
        Ok(got)
    }

    /// Makes the close that ends this connection a reset (SO_LINGER 0) instead of a FIN: for
    /// a response whose end the client learns only from the close, a FIN after a body cut
    /// short would present it as complete.
    pub fn reset_on_close(&self) {
        let _ = socket2::SockRef::from(&self.stream).set_linger(Some(Duration::ZERO));
    }

    /// Sets how long the next read may wait (`None` = forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) {
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        let _ = self.stream.set_read_timeout(timeout);
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Writes some of `bytes`, waiting (under the write timeout) for room, unless the peer
    /// sends something first (bytes, a close, an error): `Ok(Some(n))` for `n` > 0 bytes
    /// written, `Ok(None)` when the socket turned readable while the write waited. A peer
    /// that stopped reading may be answering, and must not wait for the write timeout to be
    /// heard. Nothing is lost when the write is abandoned: sends are synchronous system calls.
    pub async fn write_or_hear(&mut self, bytes: &[u8]) -> io::Result<Option<usize>> {
        let stream = &mut self.stream;
        futures_lite::future::poll_fn(|cx| {
            match Pin::new(&mut *stream).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(written) => return Poll::Ready(written.map(Some)),
                Poll::Pending => {}
            }
            stream.poll_read_with(cx, 0, peek).map(|_| Ok(None))
        })
        .await
    }
}

/// Whether TCP may hold a send's last, partly filled segment back.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Push {
    /// Send everything now (the end of a response on a kept connection).
    Now,
    /// MSG_MORE: hold the tail to go out with what follows (a spliced body, or a close's FIN).
    More,
}

/// Sends `first` then `second` in one gathered sendmsg(2) per attempt, so that bytes kept
/// elsewhere (a stored body, a backend connection's receive buffer) go out behind a head
/// without first being copied next to it.
pub async fn send_gathered(
    to: &mut TcpStream,
    mut first: &[u8],
    mut second: &[u8],
    push: Push,
) -> io::Result<()> {
    while !first.is_empty() || !second.is_empty() {
        let sent = std::future::poll_fn(|cx| {
            to.poll_write_with(cx, |fd| send_gathered_now(fd, first, second, push))
        })
        .await?;
        if sent == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let from_first = sent.min(first.len());
        first = &first[from_first..];
        second = &second[sent - from_first..];
    }
    Ok(())
}

#[allow(unsafe_code)]
fn send_gathered_now(
    fd: std::os::fd::RawFd,
    first: &[u8],
    second: &[u8],
    push: Push,
) -> io::Result<usize> {
    let mut flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
    if push == Push::More {
        flags |= libc::MSG_MORE;
    }
    let iov = [
        libc::iovec {
            iov_base: first.as_ptr() as *mut libc::c_void,
            iov_len: first.len(),
        },
        libc::iovec {
            iov_base: second.as_ptr() as *mut libc::c_void,
            iov_len: second.len(),
        },
    ];
    // SAFETY: an all-zero msghdr is valid (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len();
    // The raw system call rather than glibc's sendmsg(), a pthread cancellation point (as
    // `recv_now`): this is also every closing connection's last send.
    // SAFETY: the iovecs point into live slices of their stated lengths, which sendmsg only
    // reads; `msg` outlives the call.
    let n = unsafe { libc::syscall(libc::SYS_sendmsg, fd, &msg as *const libc::msghdr, flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One non-blocking recv(2) into `len` bytes at `dst`: `Ok(None)` when nothing is ready.
/// (glommio's own read would arm an io_uring poll and wait; callers use this to top up a send
/// with bytes already queued, before deciding to wait.)
#[allow(unsafe_code)]
fn recv_now(stream: &TcpStream, dst: *mut u8, len: usize) -> io::Result<Option<usize>> {
    // The raw system call rather than glibc's recv(), a pthread cancellation point that
    // costs two atomic updates per call (as in the vendored glommio's send and recv).
    let (fd, flags) = (stream.as_raw_fd(), libc::MSG_DONTWAIT);
    let no_addr = std::ptr::null_mut::<libc::sockaddr>();
    // SAFETY: callers pass `len` writable bytes at `dst`; recvfrom writes at most `len` bytes
    // and, with a null address, nothing else.
    let n = unsafe { libc::syscall(libc::SYS_recvfrom, fd, dst, len, flags, no_addr, no_addr) };
    if n >= 0 {
        return Ok(Some(n as usize));
    }
    let err = io::Error::last_os_error();
    match err.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
        _ => Err(err),
    }
}

/// One direction of a tunnel: bytes read from one side, waiting to be written to the other.
struct Pipe {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    eof: bool,
    done: bool,
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            buf: vec![0; 16 * 1024],
            start: 0,
            end: 0,
            eof: false,
            done: false,
        }
    }

    /// Moves bytes from `from` to `to` until blocked; Ready(Err) ends the whole tunnel.
    fn poll_pump(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut TcpStream,
        to: &mut TcpStream,
        last_activity: &mut Instant,
        idle: Duration,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.start < self.end {
                match Pin::new(&mut *to).poll_write(cx, &self.buf[self.start..self.end]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        self.start += n;
                        *last_activity = Instant::now();
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if self.eof {
                // Half-close: the other side sees our EOF but may keep talking.
                let _ = Pin::new(&mut *to).poll_close(cx);
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            self.start = 0;
            self.end = 0;
            match Pin::new(&mut *from).poll_read(cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    self.end = n;
                    *last_activity = Instant::now();
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::TimedOut => {
                    if last_activity.elapsed() >= idle {
                        return Poll::Ready(Err(e));
                    }
                    // The other direction was busy: re-arm the read timer.
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// How long a tunnel keeps carrying the other direction once one side has closed: enough for
/// the answer to a WebSocket close handshake, not for a peer that never closes.
pub const TUNNEL_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Copies bytes both ways until either side closes (its EOF is passed on, and the other side
/// gets `TUNNEL_CLOSE_GRACE` to finish), either side fails, or nothing moved in either
/// direction for `idle`.
pub async fn tunnel(a: &mut TcpStream, b: &mut TcpStream, idle: Duration) {
    let _ = a.set_read_timeout(Some(idle));
    let _ = b.set_read_timeout(Some(idle));
    let mut a_to_b = Pipe::new();
    let mut b_to_a = Pipe::new();
    let mut last_activity = Instant::now();
    let failed = futures_lite::future::poll_fn(|cx| {
        let forward = a_to_b.poll_pump(cx, a, b, &mut last_activity, idle);
        let backward = b_to_a.poll_pump(cx, b, a, &mut last_activity, idle);
        match (forward, backward) {
            (Poll::Ready(Err(_)), _) | (_, Poll::Ready(Err(_))) => Poll::Ready(true),
            (Poll::Ready(Ok(())), _) | (_, Poll::Ready(Ok(()))) => Poll::Ready(false),
            _ => Poll::Pending,
        }
    })
    .await;
    if failed || (a_to_b.done && b_to_a.done) {
        return;
    }
    // One side closed: the other's last bytes still go through, for a moment.
    let (open, from, to) = if a_to_b.done {
        (&mut b_to_a, b, a)
    } else {
        (&mut a_to_b, a, b)
    };
    futures_lite::future::or(
        futures_lite::future::poll_fn(|cx| {
            open.poll_pump(cx, from, to, &mut last_activity, idle)
                .map(|_| ())
        }),
        glommio::timer::sleep(TUNNEL_CLOSE_GRACE),
    )
    .await;
}

/// recv(2) of one byte with MSG_PEEK: the byte stays for the next read.
#[allow(unsafe_code)]
fn peek(fd: std::os::unix::io::RawFd) -> io::Result<usize> {
    let mut byte = 0u8;
    // SAFETY: recv(2) writes at most one byte into `byte`, which outlives the call.
    let n = unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A gathered send larger than the socket takes at once: partial sends must resume at the
    /// right byte, whether they stop inside the first slice or the second.
    #[test]
    fn a_gathered_send_delivers_both_slices_in_order_through_partial_sends() {
        use std::io::Read;
        let first: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        let second: Vec<u8> = (0..2_000_000u32).map(|i| (i % 241) as u8).collect();
        let mut expected = first.clone();
        expected.extend_from_slice(&second);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let reader = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .expect("timeout");
            let mut got = Vec::new();
            let mut buf = [0u8; 1000];
            // Small reads with pauses keep the sender's buffer full, so its sends come up short.
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
                if got.len() % 100_000 < 1000 {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        });
        let (first_sent, second_sent) = (first.clone(), second.clone());
        std::thread::spawn(move || {
            let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .io_memory(crate::shard::IO_MEMORY)
                .make()
                .expect("an executor");
            executor.run(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                let _ = socket2::SockRef::from(&stream).set_send_buffer_size(4096);
                send_gathered(&mut stream, &first_sent, &second_sent, Push::Now)
                    .await
                    .expect("the whole gathered send");
            });
        })
        .join()
        .expect("sender");
        let got = reader.join().expect("reader");
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "bytes arrived out of order");
    }

    #[test]
    fn a_limited_fill_leaves_the_rest_in_the_socket_for_the_next_read() {
        use std::io::Write;
        let payload: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address");
        let (written_tx, written_rx) = std::sync::mpsc::channel();
        let sent = payload.clone();
        let writer = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            conn.write_all(&sent).expect("write");
            let _ = written_tx.send(());
            // Held open until the reader is done, so no EOF cuts a read short.
            std::thread::sleep(Duration::from_millis(500));
        });
        let got = std::thread::spawn(move || {
            let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .io_memory(crate::shard::IO_MEMORY)
                .make()
                .expect("an executor");
            executor.run(async move {
                let stream = TcpStream::connect(addr).await.expect("connect");
                let mut conn = Conn::new(stream, 16 * 1024);
                written_rx
                    .recv_timeout(Duration::from_secs(5))
                    .expect("the writer wrote everything");
                let first = conn
                    .fill_at_most(16 * 1024, 2048)
                    .await
                    .expect("first read");
                let second = conn.fill(16 * 1024).await.expect("second read");
                (first, second, conn.pending().to_vec())
            })
        })
        .join()
        .expect("reader");
        writer.join().expect("writer");
        let (first, second, bytes) = got;
        assert_eq!(first, 2048, "the limited read stops at its limit");
        assert_eq!(
            second,
            10_000 - 2048,
            "an unlimited read takes what was left"
        );
        assert!(bytes == payload, "bytes in order");
    }
}
