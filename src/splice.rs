//! Large response bodies moved from the backend's socket to the client's with splice(2)
//! through a pipe, so that their bytes never enter user space.
//!
//! Copying a body through a buffer costs two copies per byte in the kernel (out of the
//! backend's socket, into the client's); on a 64 KiB response those copies are most of the
//! proxy's CPU. splice(2) hands the socket buffer's pages to a pipe and from the pipe to the
//! client's socket by reference. Pipes come from a per-shard pool: one is needed only while a
//! body is being spliced, and one that is not empty after a failed transfer is closed, not
//! reused.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use glommio::net::TcpStream;

use crate::stream::{send_gathered, Push};

/// Bodies with at least this many bytes still to come from the backend are spliced. Below
/// it, the extra system calls of splicing (one more send for the head, two splices instead
/// of one read and one send) cost more than the copies they save.
pub const SPLICE_MIN: u64 = 32 * 1024;

/// Capacity asked for each pipe: how much of a body can be in flight between the two sockets.
const PIPE_BYTES: usize = 256 * 1024;

/// Pipes kept for reuse per shard (more exist only while that many bodies splice at once).
const KEEP: usize = 32;

/// A pipe and how many bytes it holds.
pub struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    held: usize,
}

impl Pipe {
    #[allow(unsafe_code)]
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // A bigger pipe moves a body in fewer splices; the default (64 KiB) still works, so a
        // refusal (pipe-max-size, or the per-user pipe memory limit) is not an error.
        // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory.
        unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        Ok(Pipe {
            read,
            write,
            held: 0,
        })
    }
}

/// A shard's idle pipes, handed out last-in first-out.
#[derive(Default)]
pub struct PipePool {
    idle: RefCell<Vec<Pipe>>,
}

impl PipePool {
    /// An empty pipe, or `None` when none can be made (out of descriptors): the caller copies
    /// instead.
    pub fn take(&self) -> Option<Pipe> {
        if let Some(pipe) = self.idle.borrow_mut().pop() {
            return Some(pipe);
        }
        Pipe::new().ok()
    }

    /// Keeps `pipe` for reuse if it is empty; a pipe still holding bytes is closed.
    pub fn put(&self, pipe: Pipe) {
        let mut idle = self.idle.borrow_mut();
        if pipe.held == 0 && idle.len() < KEEP {
            idle.push(pipe);
        }
    }

    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.borrow().len()
    }
}

/// How a spliced body ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Spliced {
    Complete,
    /// The backend closed before the whole body came.
    BackendClosed,
    /// The backend sent nothing for its read timeout.
    BackendTimedOut,
    /// Reading from the backend failed.
    BackendFailed,
    /// The client went away (or stopped reading for its write timeout).
    ClientGone,
}

/// Moves exactly `len` bytes from `from` to `to` through `pipe`, waiting on either socket as
/// needed with its own timeouts. Both sockets must be non-blocking (`set_nonblocking`), and
/// `from` must hold no buffered bytes of its own (bytes already read go out before this).
pub async fn splice_exact(
    from: &mut TcpStream,
    to: &mut TcpStream,
    len: u64,
    pipe: &mut Pipe,
) -> Spliced {
    let mut left = len;
    while left > 0 {
        let want = left.min(PIPE_BYTES as u64) as usize;
        let pipe_in = pipe.write.as_raw_fd();
        // A short splice may mean a full pipe rather than a drained socket: only EAGAIN says
        // the socket is drained.
        let moved =
            poll_fn(|cx| from.poll_read_with(cx, 0, |fd| splice(fd, pipe_in, want, false))).await;
        match moved {
            Ok(0) => return Spliced::BackendClosed,
            Ok(n) => {
                left -= n as u64;
                pipe.held += n;
                // Not `assume_drained` once the whole body is in, although nothing more is
                // due: a backend may have sent more than it announced, and those bytes must
                // keep the socket readable so the pool sees them and never hands the
                // connection to another exchange.
            }
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Spliced::BackendTimedOut,
            Err(_) => return Spliced::BackendFailed,
        }
        while pipe.held > 0 {
            let (pipe_out, held) = (pipe.read.as_raw_fd(), pipe.held);
            // More is coming: let TCP fill segments instead of pushing each splice.
            let more = left > 0;
            match poll_fn(|cx| to.poll_write_with(cx, |fd| splice(pipe_out, fd, held, more))).await
            {
                Ok(0) | Err(_) => return Spliced::ClientGone,
                Ok(n) => pipe.held -= n,
            }
        }
    }
    Spliced::Complete
}

/// Sends all of `bytes` with MSG_MORE: TCP holds them (a response head) to go out in the same
/// segment as what follows (a spliced body, or the FIN of a close).
pub async fn send_more(to: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    send_gathered(to, bytes, &[], Push::More).await
}

/// Makes a socket non-blocking, which splice(2) needs on its socket end (glommio's own reads
/// and writes ask per call, and leave the socket blocking).
pub fn set_nonblocking(stream: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(stream).set_nonblocking(true)
}

#[allow(unsafe_code)]
fn splice(from: RawFd, to: RawFd, len: usize, more: bool) -> io::Result<usize> {
    let mut flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    if more {
        flags |= libc::SPLICE_F_MORE;
    }
    let none = std::ptr::null_mut::<libc::loff_t>();
    // SAFETY: no offsets are passed (both ends are a socket or a pipe); the kernel moves
    // bytes between the two descriptors and touches no memory of ours.
    let n = unsafe { libc::splice(from, none, to, none, len, flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_empty_pipes_are_kept_and_at_most_keep_of_them() {
        let pool = PipePool::default();
        let mut used = pool.take().expect("a pipe");
        used.held = 10;
        pool.put(used);
        assert_eq!(pool.idle(), 0, "a pipe holding bytes is closed");
        let pipes: Vec<Pipe> = (0..KEEP + 3).filter_map(|_| pool.take()).collect();
        assert_eq!(pipes.len(), KEEP + 3);
        for pipe in pipes {
            pool.put(pipe);
        }
        assert_eq!(pool.idle(), KEEP);
    }

    #[test]
    fn a_pipe_moves_bytes_without_blocking_when_empty() {
        let pipe = Pipe::new().expect("a pipe");
        let payload = b"through the pipe";
        // SAFETY: writing from and reading into live buffers of the given lengths.
        #[allow(unsafe_code)]
        let (wrote, read, again) = unsafe {
            let wrote = libc::write(
                pipe.write.as_raw_fd(),
                payload.as_ptr().cast(),
                payload.len(),
            );
            let mut buf = [0u8; 64];
            let read = libc::read(pipe.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
            assert_eq!(&buf[..payload.len()], payload);
            let again = libc::read(pipe.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len());
            (wrote, read, again)
        };
        assert_eq!(wrote, payload.len() as isize);
        assert_eq!(read, payload.len() as isize);
        assert_eq!(again, -1, "an empty non-blocking pipe does not block");
    }
}
