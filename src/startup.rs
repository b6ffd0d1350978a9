//! Starting up: binding the listeners and checking io_uring, and each way that can fail,
//! said in a sentence that tells the operator what to do.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use glommio::net::TcpListener;

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
                    "cannot listen on {addr}{what}: the port is already in use by another program; stop it or choose another port with {variable} (BALANCER_REUSE_PORT=on shares a port with a process of the same user that set SO_REUSEPORT too, such as another balancer in a seamless restart)"
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

/// How long a connection that sends nothing waits in the kernel before a listener with
/// `TCP_DEFER_ACCEPT` hands it over: that time counts toward its idle timeout.
pub const DEFER_ACCEPT_SILENCE: Duration = Duration::from_secs(1);

/// The shard's listener: `SO_REUSEPORT` so every shard (and a successor process during a
/// restart) shares the port, and `SO_REUSEADDR` so the sockets this process leaves in
/// TIME_WAIT do not block whoever binds the port next. With `defer_accept`, a connection is
/// queued for accept only once its first bytes have arrived (`TCP_DEFER_ACCEPT`): the shard
/// is not woken for the handshake's last ACK, and the (patched) glommio listener reads the
/// request straight away instead of arming a poll for it first.
#[allow(unsafe_code)]
pub fn bind(addr: SocketAddr, defer_accept: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
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
    if defer_accept {
        // In whole seconds; the kernel hands over a connection that has sent nothing after
        // its first SYN-ACK retransmission (the initial RTO, 1 s), so it is not held for long.
        let seconds = DEFER_ACCEPT_SILENCE.as_secs() as libc::c_int;
        // SAFETY: a valid descriptor, and an option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_DEFER_ACCEPT,
                std::ptr::from_ref(&seconds).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
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

pub fn executor_error(e: glommio::GlommioError<()>) -> StartupError {
    match e {
        glommio::GlommioError::ReactorError(glommio::ReactorErrorKind::MemLockLimit(limit, _)) => {
            StartupError::MemlockTooLow(limit)
        }
        other => StartupError::IoUring(other.to_string()),
    }
}
