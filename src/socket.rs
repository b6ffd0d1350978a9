//! The agent thread: a blocking WebSocket client that follows the deployment agent's server set.
//!
//! Each text message is validated (`queue`), resolved (`resolve`), broadcast to every shard and
//! acknowledged once every shard routes by it. The connection is retried forever with
//! exponential backoff; the last good set keeps serving meanwhile.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use log::{info, warn};
use tungstenite::{Message, WebSocket};

use crate::admin::Status;
use crate::backoff::Backoff;
use crate::config::AgentEndpoint;
use crate::queue::{parse_snapshot, Rejection};
use crate::resolve::resolve;
use crate::shard::{ShardCommand, ShardHandle, Update};

/// First reconnect delay; doubles up to AGENT_BACKOFF_MAX.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
/// How long a connect or the WebSocket handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The socket read timeout: how often the thread wakes to ping, check liveness and shutdown.
const TICK: Duration = Duration::from_millis(250);
/// With nothing received for this long, the balancer pings the agent...
const PING_AFTER: Duration = Duration::from_secs(15);
/// ...and with nothing received for this long, it gives up on the connection as half-dead.
const DEAD_AFTER: Duration = Duration::from_secs(45);
/// A shard that has not acknowledged a set after this long is reported (it should take < 1 ms).
const ACK_WARN_AFTER: Duration = Duration::from_secs(1);

/// Why a connection to the agent ended.
#[derive(Debug)]
pub enum AgentError {
    Connect(io::Error),
    Handshake(String),
    Closed,
    Silent(Duration),
    Protocol(tungstenite::Error),
    /// A message over the WebSocket limits (tungstenite's: 16 MiB a frame, 64 MiB a message).
    TooLarge(String),
    ShuttingDown,
}

impl std::fmt::Display for AgentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentError::Connect(e) => write!(f, "cannot connect: {e}"),
            AgentError::Handshake(e) => write!(f, "websocket handshake failed: {e}"),
            AgentError::Closed => write!(f, "connection closed by the agent"),
            AgentError::Silent(d) => write!(f, "nothing received for {}s", d.as_secs()),
            AgentError::Protocol(e) => write!(f, "{e}"),
            AgentError::TooLarge(e) => write!(f, "closed after a message too large ({e})"),
            AgentError::ShuttingDown => write!(f, "shutting down"),
        }
    }
}

/// What the agent thread needs: where to connect, whom to tell, and what to publish.
pub struct AgentLink {
    pub endpoint: AgentEndpoint,
    pub backoff_max: Duration,
    pub target_port: u16,
    pub shards: Vec<ShardHandle>,
    pub acks: Receiver<(usize, u64)>,
    pub status: Arc<Status>,
}

/// Starts the agent thread. It runs until the process shuts down.
pub fn spawn(link: AgentLink) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("agent".into())
        .spawn(move || link.run())
}

impl AgentLink {
    fn run(mut self) {
        let url = self.endpoint.url();
        let mut backoff = Backoff::new(INITIAL_BACKOFF, self.backoff_max);
        let mut rng = fastrand::Rng::new();
        loop {
            let mut delivered = false;
            let reason = match self.connect(&url) {
                Ok(mut ws) => {
                    info!("connected to deployment agent {url}");
                    self.status.global.agent_connected.set(1);
                    let reason = self.session(&mut ws, &mut delivered);
                    self.status.global.agent_connected.set(0);
                    let _ = ws.close(None);
                    let _ = ws.flush();
                    reason
                }
                Err(e) => e,
            };
            if matches!(reason, AgentError::ShuttingDown) || self.status.shutting_down.load(Relaxed)
            {
                return;
            }
            if delivered {
                backoff.reset();
            }
            let delay = backoff.next_delay(&mut rng);
            info!(
                "deployment agent {url} disconnected ({reason}); next retry in {}ms",
                delay.as_millis()
            );
            if !self.sleep(delay) {
                return;
            }
            self.status.global.agent_reconnects.inc();
        }
    }

    /// Sleeps in short slices so shutdown is noticed; false when shutting down.
    fn sleep(&self, total: Duration) -> bool {
        let end = Instant::now() + total;
        loop {
            if self.status.shutting_down.load(Relaxed) {
                return false;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(TICK));
        }
    }

    fn connect(&self, url: &str) -> Result<WebSocket<TcpStream>, AgentError> {
        let stream = connect_any(&self.endpoint.host, self.endpoint.port)?;
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(CONNECT_TIMEOUT))
            .map_err(AgentError::Connect)?;
        stream
            .set_write_timeout(Some(CONNECT_TIMEOUT))
            .map_err(AgentError::Connect)?;
        let (ws, _) = tungstenite::client::client(url, stream).map_err(|e| {
            // The read timeout surfaces as an interrupted (WouldBlock) handshake: say so.
            AgentError::Handshake(match e {
                tungstenite::HandshakeError::Interrupted(_) => {
                    format!("no answer within {}s", CONNECT_TIMEOUT.as_secs_f64())
                }
                tungstenite::HandshakeError::Failure(e) => e.to_string(),
            })
        })?;
        ws.get_ref()
            .set_read_timeout(Some(TICK))
            .map_err(AgentError::Connect)?;
        Ok(ws)
    }

    /// Reads messages until the connection ends; `delivered` tells whether a valid snapshot came.
    fn session(&mut self, ws: &mut WebSocket<TcpStream>, delivered: &mut bool) -> AgentError {
        let mut last_heard = Instant::now();
        let mut pinged = false;
        loop {
            if self.status.shutting_down.load(Relaxed) {
                return AgentError::ShuttingDown;
            }
            let reply = match ws.read() {
                Ok(Message::Text(text)) => Some(self.on_snapshot(text.as_str(), delivered)),
                Ok(Message::Binary(_)) => Some(self.reject(&Rejection::BinaryFrame.to_string())),
                Ok(Message::Close(_)) => return AgentError::Closed,
                // Pings are answered by tungstenite itself (flushed below).
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => None,
                // A text message that is not UTF-8 is a message that is not JSON: rejected like
                // any other (SPEC §4), when tungstenite has consumed all of it and its
                // connection stays usable (RFC 6455 would have it failed; the SPEC keeps it).
                Err(tungstenite::Error::Utf8(detail))
                    if utf8_error_left_connection_usable(&detail) =>
                {
                    Some(self.reject(&Rejection::NotUtf8.to_string()))
                }
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    let silent = last_heard.elapsed();
                    if silent >= DEAD_AFTER {
                        return AgentError::Silent(silent);
                    }
                    if silent >= PING_AFTER && !pinged {
                        pinged = true;
                        if let Err(e) = ws.send(Message::Ping(Default::default())) {
                            return AgentError::Protocol(e);
                        }
                    }
                    continue;
                }
                Err(tungstenite::Error::ConnectionClosed)
                | Err(tungstenite::Error::AlreadyClosed) => return AgentError::Closed,
                Err(tungstenite::Error::Capacity(e)) => {
                    reject_oversized(ws, &self.reject(&format!("message too large: {e}")));
                    return AgentError::TooLarge(e.to_string());
                }
                Err(e) => return AgentError::Protocol(e),
            };
            last_heard = Instant::now();
            pinged = false;
            if let Err(e) = answer(ws, reply) {
                return AgentError::Protocol(e);
            }
        }
    }

    fn reject(&self, reason: &str) -> String {
        warn!("rejected server set from deployment agent: {reason}");
        serde_json::json!({ "rejected": reason }).to_string()
    }

    /// Validates, resolves and applies one snapshot; returns the reply for the agent.
    fn on_snapshot(&mut self, text: &str, delivered: &mut bool) -> String {
        let arrived = Instant::now();
        let set = match parse_snapshot(text, self.target_port) {
            Ok(set) => set,
            Err(rejection) => return self.reject(&rejection.to_string()),
        };
        let parsed = Instant::now();
        let backends = match resolve(&set) {
            Ok(b) => b,
            Err(reason) => return self.reject(&reason),
        };
        let resolved = Instant::now();
        let version = self.status.global.server_set_version.get() + 1;
        let servers = backends.len();
        let routed = self.broadcast(Arc::new(Update { version, backends }));
        // Published after the measurement: dropping the previous set is not propagation.
        self.status.publish_set(version, set);
        *delivered = true;
        info!(
            "applied server set version={version} servers={servers} propagation={}us \
             parse={}us resolve={}us shards={}us",
            (routed - arrived).as_micros(),
            (parsed - arrived).as_micros(),
            (resolved - parsed).as_micros(),
            (routed - resolved).as_micros(),
        );
        serde_json::json!({ "applied": version, "servers": servers }).to_string()
    }

    /// Sends a set to every shard and returns when the last one acknowledged it (or when
    /// shutdown makes waiting pointless).
    fn broadcast(&mut self, update: Arc<Update>) -> Instant {
        let version = update.version;
        for shard in &self.shards {
            shard.send(ShardCommand::Apply(update.clone()));
        }
        let started = Instant::now();
        let mut pending = self.shards.len();
        let mut acked = vec![false; self.shards.len()];
        let mut warned = false;
        while pending > 0 {
            match self.acks.recv_timeout(TICK) {
                Ok((shard, v)) if v >= version => {
                    if let Some(done) = acked.get_mut(shard).filter(|done| !**done) {
                        *done = true;
                        pending -= 1;
                    }
                }
                Ok(_) => {}
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    if !warned && started.elapsed() >= ACK_WARN_AFTER {
                        warned = true;
                        warn!(
                            "server set version={version} still not applied by {pending} of {} shards",
                            self.shards.len()
                        );
                    }
                    if self.status.shutting_down.load(Relaxed) {
                        break;
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            }
        }
        Instant::now()
    }
}

/// Whether tungstenite 0.30 reported invalid UTF-8 after consuming the whole message, so the
/// next read starts cleanly at the next message. That is the case for an unfragmented text
/// frame (`str::Utf8Error` text) and for a fragmented one that ends mid-character
/// (`incomplete string:`). Invalid bytes inside a fragmented message are reported (as the
/// replacement characters) while tungstenite may still hold the partial message and append
/// later fragments to it, which could yield a spliced text that parses; that case, and any
/// wording this does not know, keeps ending the connection. The unit tests below pin these
/// wordings, so a tungstenite upgrade that changes them fails there first.
fn utf8_error_left_connection_usable(detail: &str) -> bool {
    [
        "invalid utf-8 sequence",
        "incomplete utf-8 byte sequence",
        "incomplete string:",
    ]
    .iter()
    .any(|prefix| detail.starts_with(prefix))
}

/// Connects to the first address of `host` that accepts, so a name with both an IPv6 and an
/// IPv4 address works whichever one the agent listens on.
fn connect_any(host: &str, port: u16) -> Result<TcpStream, AgentError> {
    let addrs = (host, port)
        .to_socket_addrs()
        .map_err(AgentError::Connect)?;
    let mut last = io::Error::other("host has no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = e,
        }
    }
    Err(AgentError::Connect(last))
}

/// Answers a message over the size limits, whose rest cannot be skipped (tungstenite stops
/// reading at its header, and what follows would be read as frames): the rejection, then a
/// close with 1009 "message too big" (RFC 6455 §7.4.1). The rest of it is read and dropped
/// for a while, so the agent, still sending, gets both instead of a reset.
fn reject_oversized(ws: &mut WebSocket<TcpStream>, reply: &str) {
    use std::io::Read;
    use tungstenite::protocol::frame::coding::CloseCode;
    use tungstenite::protocol::CloseFrame;
    let _ = ws.send(Message::text(reply));
    let _ = ws.close(Some(CloseFrame {
        code: CloseCode::Size,
        reason: "message too large".into(),
    }));
    let _ = ws.flush();
    let until = Instant::now() + Duration::from_secs(2);
    let mut sink = [0u8; 64 * 1024];
    while Instant::now() < until {
        match ws.get_mut().read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// Sends `reply` (if any) and flushes what tungstenite queued (pong answers included).
fn answer(ws: &mut WebSocket<TcpStream>, reply: Option<String>) -> tungstenite::Result<()> {
    if let Some(reply) = reply {
        ws.send(Message::text(reply))?;
    }
    ws.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Cursor, Read, Write};
    use tungstenite::protocol::Role;

    /// Frames "sent by the agent" to read, and a sink for the balancer's own writes.
    struct Wire(Cursor<Vec<u8>>);

    impl Read for Wire {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.read(buf)
        }
    }

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A client-side WebSocket reading `frames` (unmasked, as a server sends them).
    fn client_reading(frames: &[&[u8]]) -> WebSocket<Wire> {
        WebSocket::from_raw_socket(Wire(Cursor::new(frames.concat())), Role::Client, None)
    }

    fn utf8_detail(result: tungstenite::Result<Message>) -> String {
        match result {
            Err(tungstenite::Error::Utf8(detail)) => detail,
            other => panic!("expected a UTF-8 error, got {other:?}"),
        }
    }

    fn text(result: tungstenite::Result<Message>) -> String {
        match result {
            Ok(Message::Text(t)) => t.as_str().to_owned(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }

    /// Reads `bad` (frames making one message that is not UTF-8) then a text frame "ok":
    /// the error must count as leaving the connection usable, and "ok" must read cleanly.
    fn assert_usable_after(bad: &[&[u8]]) {
        let mut frames = bad.to_vec();
        frames.push(b"\x81\x02ok");
        let mut ws = client_reading(&frames);
        let detail = utf8_detail(ws.read());
        assert!(utf8_error_left_connection_usable(&detail), "{detail}");
        assert_eq!(text(ws.read()), "ok");
    }

    #[test]
    fn invalid_utf8_in_a_whole_text_frame_leaves_the_connection_usable() {
        assert_usable_after(&[b"\x81\x02\xff\xfe"]);
    }

    #[test]
    fn truncated_character_in_a_whole_text_frame_leaves_the_connection_usable() {
        assert_usable_after(&[b"\x81\x02a\xc3"]);
    }

    #[test]
    fn fragmented_message_ending_mid_character_leaves_the_connection_usable() {
        assert_usable_after(&[b"\x01\x01a", b"\x80\x01\xc3"]);
    }

    #[test]
    fn invalid_bytes_inside_a_fragmented_message_are_not_treated_as_usable() {
        // tungstenite keeps "[" buffered and would deliver "[]" once the last fragment comes.
        let mut ws = client_reading(&[b"\x01\x01[", b"\x00\x01\xff", b"\x80\x01]"]);
        let detail = utf8_detail(ws.read());
        assert!(!utf8_error_left_connection_usable(&detail), "{detail}");
    }
}
