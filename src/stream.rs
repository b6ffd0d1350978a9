//! A glommio TCP stream with its own reusable receive buffer, and a two-way byte tunnel.

use std::io;
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
}

impl Conn {
    pub fn new(stream: TcpStream, capacity: usize) -> Self {
        Conn {
            stream,
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
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
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < max_capacity {
                let grown = (self.buf.len() * 2).min(max_capacity);
                self.buf.resize(grown, 0);
            } else {
                return Err(io::Error::other("receive buffer full"));
            }
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Sets how long the next read may wait (`None` = forever).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) {
        let timeout = timeout.map(|t| t.max(Duration::from_millis(1)));
        let _ = self.stream.set_read_timeout(timeout);
    }

    pub async fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
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

/// Copies bytes both ways until both sides have closed, either side fails, or nothing moved
/// in either direction for `idle`.
pub async fn tunnel(a: &mut TcpStream, b: &mut TcpStream, idle: Duration) {
    let _ = a.set_read_timeout(Some(idle));
    let _ = b.set_read_timeout(Some(idle));
    let mut a_to_b = Pipe::new();
    let mut b_to_a = Pipe::new();
    let mut last_activity = Instant::now();
    futures_lite::future::poll_fn(|cx| {
        let forward = a_to_b.poll_pump(cx, a, b, &mut last_activity, idle);
        if let Poll::Ready(Err(_)) = forward {
            return Poll::Ready(());
        }
        let backward = b_to_a.poll_pump(cx, b, a, &mut last_activity, idle);
        if let Poll::Ready(Err(_)) = backward {
            return Poll::Ready(());
        }
        if a_to_b.done && b_to_a.done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
}
