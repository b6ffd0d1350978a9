//! A self-contained demo: three backends, a deployment agent pushing changing scores, and the
//! balancer in between, showing traffic following the scores live. Everything it starts, it
//! stops. Run with `scripts/demo.sh` (or `cargo run --release --bin demo`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const NAMES: [&str; 3] = ["alpha", "bravo", "charlie"];
const REQUESTS_PER_PHASE: usize = 3000;
const WAIT: Duration = Duration::from_secs(10);

fn main() {
    if let Err(e) = run() {
        eprintln!("demo failed: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let stop = Arc::new(AtomicBool::new(false));
    let backends: Vec<SocketAddr> = NAMES
        .iter()
        .map(|name| start_backend(name, stop.clone()))
        .collect::<Result<_, _>>()?;
    let agent = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let agent_port = agent.local_addr().map_err(|e| e.to_string())?.port();

    let initial = snapshot(&backends, &[1.0, 1.0, 1.0]);
    let mut balancer = Balancer::start(&[
        ("HOST_PORT_HTTP_BALANCER", "0"),
        ("ADMIN_PORT", "0"),
        ("BALANCER_BIND", "127.0.0.1"),
        ("HOST_PORT_WS_DEPLOYMENT_AGENT", &agent_port.to_string()),
        ("BACKENDS", &initial),
        ("RUST_LOG", "info"),
    ])?;
    println!(
        "balancer listening on {} (admin on {})",
        balancer.addr, balancer.admin
    );
    println!("backends: {}", describe(&backends));

    phase(&balancer, "static BACKENDS, scores 1:1:1", &[1.0, 1.0, 1.0])?;

    agent.set_nonblocking(false).map_err(|e| e.to_string())?;
    let (conn, _) = agent.accept().map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(WAIT))
        .map_err(|e| e.to_string())?;
    let mut ws = tungstenite::accept(conn).map_err(|e| e.to_string())?;
    println!("deployment agent: balancer connected");
    for scores in [[1.0, 2.0, 3.0], [5.0, 1.0, 0.0], [0.0, 0.0, 1.0]] {
        let message = snapshot(&backends, &scores);
        ws.send(tungstenite::Message::text(message.clone()))
            .map_err(|e| e.to_string())?;
        let reply = loop {
            match ws.read().map_err(|e| e.to_string())? {
                tungstenite::Message::Text(t) => break t.to_string(),
                _ => continue,
            }
        };
        println!("\nagent pushed {message}\nbalancer replied {reply}");
        phase(
            &balancer,
            &format!("agent scores {}:{}:{}", scores[0], scores[1], scores[2]),
            &scores,
        )?;
    }
    let _ = ws.close(None);
    let _ = ws.flush();

    println!("\nstopping the balancer (SIGTERM) and the demo backends");
    let code = balancer.terminate();
    stop.store(true, SeqCst);
    println!("balancer exited with status {code:?}");
    Ok(())
}

fn describe(backends: &[SocketAddr]) -> String {
    NAMES
        .iter()
        .zip(backends)
        .map(|(n, a)| format!("{n}={a}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn snapshot(backends: &[SocketAddr], scores: &[f64]) -> String {
    let entries: Vec<String> = backends
        .iter()
        .zip(scores)
        .map(|(a, s)| {
            format!(
                "{{\"host\":\"{}\",\"port\":{},\"score\":{s}}}",
                a.ip(),
                a.port()
            )
        })
        .collect();
    format!("{{\"servers\":[{}]}}", entries.join(","))
}

/// Sends a batch of requests over a few keep-alive connections and prints the spread.
fn phase(balancer: &Balancer, title: &str, scores: &[f64]) -> Result<(), String> {
    let mut counts = [0usize; 3];
    let per_conn = REQUESTS_PER_PHASE / 4;
    let (tx, rx) = mpsc::channel();
    for _ in 0..4 {
        let (addr, tx) = (balancer.addr, tx.clone());
        std::thread::spawn(move || {
            let result = (|| -> Result<[usize; 3], String> {
                let mut local = [0usize; 3];
                let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
                stream
                    .set_read_timeout(Some(WAIT))
                    .map_err(|e| e.to_string())?;
                let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
                let mut reader = BufReader::new(stream);
                for _ in 0..per_conn {
                    writer
                        .write_all(b"GET /hello HTTP/1.1\r\nHost: demo\r\n\r\n")
                        .map_err(|e| e.to_string())?;
                    let body = read_response(&mut reader)?;
                    if let Some(i) = NAMES.iter().position(|n| body == *n) {
                        local[i] += 1;
                    }
                }
                Ok(local)
            })();
            let _ = tx.send(result);
        });
    }
    drop(tx);
    for result in rx {
        let local = result?;
        for i in 0..3 {
            counts[i] += local[i];
        }
    }
    let total: usize = counts.iter().sum();
    let score_total: f64 = scores.iter().sum();
    println!("\n== {title}: {total} requests");
    println!("   backend   score share   traffic share");
    for i in 0..3 {
        let want = if score_total > 0.0 {
            scores[i] / score_total
        } else {
            0.0
        };
        let got = counts[i] as f64 / total.max(1) as f64;
        let bar = "#".repeat((got * 40.0).round() as usize);
        println!(
            "   {:<8}  {:>10.1}%  {:>13.1}%  {bar}",
            NAMES[i],
            want * 100.0,
            got * 100.0
        );
    }
    Ok(())
}

fn read_response<R: BufRead>(r: &mut R) -> Result<String, String> {
    let mut line = String::new();
    let mut len = 0usize;
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(format!("unexpected response: {}", line.trim()));
    }
    loop {
        line.clear();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        let l = line.trim();
        if l.is_empty() {
            break;
        }
        if let Some((n, v)) = l.split_once(':') {
            if n.eq_ignore_ascii_case("content-length") {
                len = v
                    .trim()
                    .parse()
                    .map_err(|_| "bad content-length".to_string())?;
            }
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A tiny keep-alive HTTP backend answering its name.
fn start_backend(name: &'static str, stop: Arc<AtomicBool>) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        while !stop.load(SeqCst) {
            match listener.accept() {
                Ok((conn, _)) => {
                    let stop = stop.clone();
                    std::thread::spawn(move || serve(conn, name, stop));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    Ok(addr)
}

fn serve(conn: TcpStream, name: &str, stop: Arc<AtomicBool>) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{name}",
        name.len()
    );
    let mut line = String::new();
    while !stop.load(SeqCst) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.trim().is_empty() => {
                if writer.write_all(response.as_bytes()).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

/// The balancer binary next to this one, as a child process.
struct Balancer {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Balancer {
    fn start(env: &[(&str, &str)]) -> Result<Balancer, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let path = exe.with_file_name("balancer");
        let mut cmd = Command::new(&path);
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e} (build it first)", path.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") || line.contains("admin on") {
                    let _ = tx.send(line);
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let (mut addr, mut admin) = (None, None);
        while addr.is_none() || admin.is_none() {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .map_err(|_| {
                    "the balancer did not start (is the port free? see its log)".to_string()
                })?;
            let value = |marker: &str| {
                line.split(marker)
                    .nth(1)
                    .and_then(|s| s.split_whitespace().next())
                    .and_then(|s| s.parse::<SocketAddr>().ok())
            };
            addr = addr.or(value("listening on "));
            admin = admin.or(value("admin on "));
        }
        Ok(Balancer {
            child,
            addr: addr.ok_or("no address")?,
            admin: admin.ok_or("no admin address")?,
        })
    }

    fn terminate(&mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(35);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        self.child.wait().ok().and_then(|s| s.code())
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
